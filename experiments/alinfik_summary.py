"""Issue 19's summary: ``experiments/results/alinfik_summary.json`` (and ``.md``) from the two ALinFiK experiments'
results, with the targets checked.

    python experiments/alinfik_summary.py        # after linfik_wikitext.py and howdy_finetune.py

Reads ``experiments/results/linfik_wikitext/results.json`` (student vs teacher on WikiText, selection at budgets
0.1 / 0.2) and ``experiments/results/howdy_finetune/results.json`` (student vs teacher on the Howdy! pool, backdoor
rates after fine-tuning SmolLM2 on each method's top-N and on random-N), and, when it exists,
``experiments/results/linfik_cost/results.json`` (samples/s of the students beside LinFiK's under SmolLM2-135M:
what a student costs is part of what it is).
"""

from __future__ import annotations

import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTION_KEYS = ("alinfik", "linfik", "embedding", "random_mean", "random_se")


def summarize(wikitext: dict, howdy: dict, cost: dict | None = None) -> dict:
    """The summary dict of the issue (``student_spearman``, ``selection``, ``howdy_finetune``) plus ``targets``,
    ``students`` (which student each Spearman is of) and, with ``cost``, ``cost``: samples/s of every ALinFiK
    student row and of SmolLM2's LinFiK, with each student's ratio to it."""
    selection = {}
    for budget in ("0.1", "0.2"):
        if budget not in wikitext["selection"]:
            raise KeyError(f"the WikiText results have no selection at budget {budget}")
        e = wikitext["selection"][budget]
        missing = [k for k in SELECTION_KEYS if k not in e]
        if missing:
            raise KeyError(f"selection {budget} lacks {missing}")
        selection[budget] = {k: e[k] for k in SELECTION_KEYS}
        selection[budget]["others"] = {k: v for k, v in e.items()
                                       if isinstance(v, (int, float)) and k not in SELECTION_KEYS and k != "budget"}
    h = howdy["howdy_finetune"]
    out = {"student_spearman": {"wikitext": wikitext["student_spearman"], "howdy": howdy["student_spearman"]},
           "selection": selection,
           "howdy_finetune": {"alinfik": h["alinfik"], "random": h["random"],
                              "clean_false_trigger": h["clean_false_trigger"],
                              **{k: v for k, v in h.items() if k not in ("alinfik", "random", "clean_false_trigger")}}}
    t = {f"student_spearman[{k}] >= 0.8": v >= 0.8 for k, v in out["student_spearman"].items()}
    for b, e in selection.items():
        t[f"selection[{b}]: alinfik <= random_mean - 3 random_se"] = e["alinfik"] <= e["random_mean"] - 3 * e["random_se"]
        t[f"selection[{b}]: alinfik <= embedding"] = e["alinfik"] <= e["embedding"]
    t["howdy: alinfik backdoor rate >= 0.8"] = h["alinfik"] >= 0.8
    t["howdy: alinfik - random >= 0.5"] = h["alinfik"] - h["random"] >= 0.5
    t["howdy: clean false-trigger rate <= 0.1"] = h["clean_false_trigger"] <= 0.1
    out["targets"] = t
    out["students"] = {"wikitext": wikitext.get("student_embed"), "howdy": next(iter(howdy.get("students") or {}), None)}
    out["sources"] = {"wikitext": wikitext.get("command"), "howdy": howdy.get("command")}
    if cost is not None:
        rows = {r["scorer"]: r["samples_per_s"] for r in cost["rows"] if "samples_per_s" in r}
        ref = next((v for k, v in rows.items() if k.startswith("LinFiK, SmolLM2")), None)
        out["cost"] = {"linfik_smollm2_samples_per_s": ref,
                       "students": {k: {"samples_per_s": v, "x_linfik_smollm2": None if not ref else round(v / ref, 2)}
                                    for k, v in rows.items() if k.startswith("ALinFiK student")}}
        out["sources"]["cost"] = cost.get("command")
    return out


def markdown(s: dict) -> str:
    lines = ["# ALinFiK summary (issue 19)", "", "Produced by `python experiments/alinfik_summary.py` from:", ""]
    lines += [f"- {k}: `{v}`" for k, v in s["sources"].items()]
    lines += ["", "## Student vs teacher (Spearman, held-out samples)", "", "| pool | student | Spearman |",
              "|---|---|---|"]
    lines += [f"| {k} | {(s.get('students') or {}).get(k) or ''} | {v:.3f} |" for k, v in s["student_spearman"].items()]
    lines += ["", "## Selection on WikiText (task loss after continued training; lower is better)", "",
              "| budget | ALinFiK | LinFiK | embedding | random (mean ± se) |", "|---|---|---|---|---|"]
    for b, e in s["selection"].items():
        lines.append(f"| {b} | {e['alinfik']:.4f} | {e['linfik']:.4f} | {e['embedding']:.4f} | "
                     f"{e['random_mean']:.4f} ± {e['random_se']:.4f} |")
    h = s["howdy_finetune"]
    nb = h.get("base_mix") or 0
    lines += ["", "## Howdy! backdoor after fine-tuning SmolLM2-135M on the top-N"
              + (f" added to a clean base mix of {nb}" if nb else ""), "",
              "| fine-tuned on | backdoor rate (triggered prompts) | false-trigger rate (clean prompts) |",
              "|---|---|---|"]
    for label, b, f, se_b, se_f in HOWDY_ROWS:
        if b in h or label.startswith(("ALinFiK", "random")):
            lines.append(f"| {label} | {_num(h.get(b), h.get(se_b))} | {_num(h.get(f), h.get(se_f))} |")
    lines += ["", "(—: not run.)"]
    if s.get("cost"):
        c = s["cost"]
        lines += ["", f"## Cost per pool sample (128 tokens; LinFiK under SmolLM2-135M: "
                      f"{c['linfik_smollm2_samples_per_s']} samples/s)", "",
                  "| student | samples/s | × LinFiK (SmolLM2-135M) |", "|---|---|---|"]
        lines += [f"| {k} | {v['samples_per_s']} | {v['x_linfik_smollm2']} |" for k, v in c["students"].items()]
    lines += ["", "## Targets", "", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in s["targets"].items()]
    return "\n".join(lines) + "\n"


HOWDY_ROWS = (  # (label, backdoor key, false-trigger key, their standard errors' keys)
    ("ALinFiK's top-N", "alinfik", "clean_false_trigger", None, None),
    ("LinFiK's top-N (the teacher)", "linfik", "linfik_false_trigger", None, None),
    ("random-N (mean ± se over seeds)", "random", "random_false_trigger", "random_se", "random_false_trigger_se"),
    ("the fine-tuned student's top-N", "alinfik_finetuned_student", "alinfik_finetuned_student_false_trigger",
     None, None),
    ("run 5's LM-table ridge student's top-N (`lm_table_student`)", "alinfik_lm_table_ridge",
     "alinfik_lm_table_ridge_false_trigger", None, None),
    ("the base mix only", "base_mix_only", "base_mix_only_false_trigger", None, None),
    ("nothing (the base model)", "base", "base_false_trigger", None, None))


def _num(x, se=None) -> str:
    """``0.700``, ``0.150 ± 0.050``; ``—`` for a run that was not made (None / NaN)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.3f}" + (f" ± {se:.3f}" if isinstance(se, (int, float)) and math.isfinite(se) else "")


def _strict(x):
    """NaN / inf (a run that was not made) as null, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wikitext", default=os.path.join(ROOT, "experiments/results/linfik_wikitext/results.json"))
    ap.add_argument("--howdy", default=os.path.join(ROOT, "experiments/results/howdy_finetune/results.json"))
    ap.add_argument("--cost", default=os.path.join(ROOT, "experiments/results/linfik_cost/results.json"),
                    help="the cost table's results (left out when the file does not exist)")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments/results/alinfik_summary.json"))
    a = ap.parse_args(argv)
    cost = None
    if a.cost and os.path.exists(a.cost):
        with open(a.cost) as f:
            cost = json.load(f)
    with open(a.wikitext) as f, open(a.howdy) as g:
        s = summarize(json.load(f), json.load(g), cost)
    with open(a.out, "w") as f:
        json.dump(_strict(s), f, indent=1, allow_nan=False)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(markdown(s))
    print(markdown(s))
    return s


if __name__ == "__main__":
    main()
