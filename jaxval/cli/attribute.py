"""``jaxval attribute``: which training text made the model write what it wrote?

    jaxval attribute --config C --prompt "The album was released in" [--chat] [--max-new-tokens 32]
                     [--precond P | --precond none] [--mode cosine] [--top-k 5] [--highlight 3] [--out DIR]

The model of the config (the one ``jaxval log`` saved beside the store) continues the prompt greedily;
the query is the generation's loss (the prompt's tokens are context, not targets) and its LoGra gradient
is scored against the training store (``jaxval.top_k``, preconditioned by ``jaxval fit``'s checkpoint
when there is one). The top proponents and opponents are split over their tokens, and the generation over
its tokens, exactly (``jaxval.token_influence``: the parts sum to the pair's score), and written to
``attribution.html`` (self-contained: each token shaded by its part), ``attribution.json`` and
``report.md`` in the output folder.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["add_parser", "run", "generate_ids", "query_batch", "render_html"]


# ----------------------------------------------------------------------------------------------- generation

def generate_ids(model, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by any model ``tokens [B, T] -> logits [B, T, V]`` (a Llama:
    its key/value-cached decoder); stops after the first of ``stop_ids`` (kept) or at the model's context
    length (``model.cfg.block_size`` / ``max_seq_len``)."""
    from jaxval.models import llama
    from jaxval.models.generate import context_limit, greedy

    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("the prompt has no tokens")
    if isinstance(model, llama.Llama):
        return llama.generate_ids(model, ids, max_new_tokens, stop_ids=stop_ids)
    limit = context_limit(model)
    steps = int(max_new_tokens) if limit is None else min(int(max_new_tokens), limit - len(ids))
    if steps < 1:
        raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the model's context ({limit})")
    return greedy(model, [ids], steps, stop_ids=stop_ids, batch_size=1)[0]


def query_batch(prompt_ids: Sequence[int], new_ids: Sequence[int], limit: int | None = None,
                length: int | None = None) -> dict:
    """``{"tokens": [1, L], "mask": [1, L]}``: prompt and generation, the loss on the generated tokens only,
    right-padded to ``length`` when it fits (the training chunks' length: their compiled LoGra step is
    reused), else to a multiple of 8 tokens; at most ``limit + 1`` (the LM loss reads ``L - 1`` positions)."""
    seq = [int(i) for i in prompt_ids] + [int(i) for i in new_ids]
    length = int(length) if length is not None and len(seq) <= int(length) else -(-len(seq) // 8) * 8
    if limit is not None:
        length = min(length, limit + 1)
    toks = np.zeros((1, length), np.int32)
    mask = np.zeros((1, length), np.float32)
    toks[0, : len(seq)] = seq
    mask[0, len(prompt_ids): len(seq)] = 1.0
    return {"tokens": toks, "mask": mask}


# ----------------------------------------------------------------------------------------------- the page

def _token_texts(tok, ids: Sequence[int]) -> list[str]:
    out = []
    for i in ids:
        try:
            out.append(tok.decode([int(i)]) if tok is not None else f"<{int(i)}>")
        except Exception:  # noqa: BLE001 - a token that does not decode alone is shown by its id
            out.append(f"<{int(i)}>")
    return out


def _spans(tokens: Sequence[str], parts: Sequence[float] | None, scale: float | None = None,
           muted: Sequence[bool] | None = None) -> str:
    """Each token as a ``<span class="tok">`` shaded by its part (green: lowers the query's loss, red:
    raises it), its value in the tooltip."""
    vals = np.zeros(len(tokens)) if parts is None else np.asarray(parts, np.float64)
    scale = float(np.abs(vals).max()) if scale is None else float(scale)
    out = []
    for j, t in enumerate(tokens):
        v = float(vals[j])
        a = 0.0 if scale <= 0 else min(1.0, abs(v) / scale)
        rgb = "22,150,60" if v > 0 else "210,40,40"
        style = f"background: rgba({rgb},{0.85 * a:.3f})" if a > 0.004 else ""
        cls = "tok ctx" if muted is not None and muted[j] else "tok"
        text = html.escape(t).replace("\n", "⏎<br>")
        out.append(f'<span class="{cls}" data-part="{v:.6g}" title="{v:+.4g}" style="{style}">{text}</span>')
    return "".join(out)


_CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 21px; margin-bottom: 4px; } h2 { font-size: 16px; margin: 26px 0 8px; }
.meta { color: #666; font-size: 12px; }
.text { font-family: 'DejaVu Sans Mono', Menlo, monospace; font-size: 12.5px; white-space: pre-wrap;
        word-break: break-word; background: #fafafa; border: 1px solid #e5e5e5; border-radius: 6px; padding: 8px 10px; }
.tok { border-radius: 3px; padding: 1px 0; } .ctx { color: #888; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 10px 14px; margin: 10px 0; }
.card.pro { border-left: 5px solid rgb(22,150,60); } .card.opp { border-left: 5px solid rgb(210,40,40); }
.head { display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; margin-bottom: 6px; }
.score { font-weight: 600; } .label { color: #666; font-size: 12px; margin: 6px 0 2px; }
.legend span { display: inline-block; padding: 1px 6px; border-radius: 3px; margin-right: 6px; }
"""


def render_html(result: dict) -> str:
    """The self-contained page of an attribution ``result`` (the dict ``run`` writes as attribution.json)."""
    q = result["query"]
    esc = html.escape
    lines = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>jaxval attribution: {esc(result['prompt'][:60])}</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Which training text made the model write this?</h1>",
             f'<div class="meta">{esc(result["model"])} · store {esc(result["store"])} ({result["n_train"]} examples) · '
             f'score {esc(result["mode"])} with {esc(result["precond_kind"])} · '
             f'{esc(result["date"])}</div>',
             '<p class="legend"><span style="background: rgba(22,150,60,0.6)">green</span>a token whose loss, '
             'trained on, lowers the loss of the generation (supports it) <span style="background: '
             'rgba(210,40,40,0.6)">red</span>raises it. The parts of each example sum exactly to its score; '
             'hover a token for its part.</p>',
             "<h2>Prompt and greedy generation</h2>"]
    pro = [e for e in result["proponents"] if e.get("parts") is not None]
    support = np.sum([e["query_parts"] for e in pro], axis=0) if pro and pro[0].get("query_parts") else None
    lines.append('<div class="text">' + _spans(q["tokens"], support, muted=[not t for t in q["target"]]) + "</div>")
    lines.append('<div class="meta">grey: the prompt (context); the generated tokens shaded by their summed parts '
                 f'over the top {len(pro)} proponents</div>')
    for side, title, cls in (("proponents", "Top proponents (training on them lowers the generation's loss)", "pro"),
                             ("opponents", "Top opponents (training on them raises it)", "opp")):
        lines.append(f"<h2>{title}</h2>")
        for e in result[side]:
            head = (f'<div class="head"><span>#{e["rank"]}</span><span>id <b>{esc(str(e["id"]))}</b></span>'
                    f'<span class="score">score {e["score_store"]:+.4g}</span>')
            if e.get("parts") is not None:
                head += f'<span class="meta">recomputed {e["score"]:+.4g} = Σ token parts {sum(e["parts"]):+.4g}</span>'
            lines.append(f'<div class="card {cls}">{head}</div>')
            if e.get("parts") is not None:
                lines.append('<div class="label">the training example, each token shaded by its part</div>')
                lines.append('<div class="text">' + _spans(e["tokens"], e["parts"]) + "</div>")
                if e.get("query_parts") is not None:
                    lines.append('<div class="label">the generation, each token shaded by its part for this '
                                 'example</div>')
                    lines.append('<div class="text">' + _spans(q["tokens"], e["query_parts"],
                                                               muted=[not t for t in q["target"]]) + "</div>")
            else:
                lines.append('<div class="text">' + esc(e["text"]) + "</div>")
            lines.append("</div>")
    lines.append("</body></html>")
    return "\n".join(lines)


def _report_md(result: dict) -> str:
    lines = ["# Attribution of a generation", "",
             f"- Model: {result['model']}; store `{result['store']}` ({result['n_train']} examples); "
             f"mode `{result['mode']}`, preconditioner {result['precond_kind']}.",
             f"- Prompt: {result['prompt']!r}", f"- Generation (greedy): {result['generation']!r}", "",
             "Per-token highlighting: [attribution.html](attribution.html). Positive = training on the example "
             "lowers the generation's loss (proponent).", ""]
    for side in ("proponents", "opponents"):
        lines += [f"## {side.capitalize()}", "", "| rank | id | score | text |", "|---:|---|---:|---|"]
        for e in result[side]:
            text = " ".join(e["text"].split())[:160].replace("|", "\\|")
            lines.append(f"| {e['rank']} | {e['id']} | {e['score_store']:+.4g} | {html.escape(text)} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the command

def run(args) -> int:
    import jax

    import jaxval as jv
    from jaxval.cli import config as C
    from jaxval.cli.app import model_path
    from jaxval.models import factory
    from jaxval.models.generate import context_limit
    from jaxval._src.store import GradientStore, StoreError

    t0 = time.perf_counter()
    cfg = C.load_config(args.config)
    out = cfg["log"]["output"]
    store = GradientStore.open(out)
    if not store.is_complete():
        raise StoreError(f"store {out} is incomplete ({store.num_done()}/{len(store)} rows): finish `jaxval log` "
                         "first")
    if os.path.exists(model_path(out)):   # the model the store was logged with
        cfg["model"] = dict(cfg["model"], checkpoint=model_path(out), save_trained=None)
    model, _loss_fn, data, ids, logra = C.prepare(cfg, progress=not args.no_progress)
    if jv.model_fingerprint(model) != store.config.get("model_fingerprint"):
        raise StoreError(f"the model of {args.config} is not the one the store at {out} was logged with: rerun "
                         "`jaxval log`")
    if logra.config().get("projection_sha256") != store.config.get("logra", {}).get("projection_sha256"):
        raise StoreError(f"the store at {out} was logged with another LoGra configuration than {args.config}")
    tok = factory.tokenizer(cfg["model"]) if factory.is_named_model(cfg["model"]) else C.build_tokenizer(cfg["data"])
    if tok is None:
        raise C.ConfigError("jaxval attribute needs a tokenizer: a text model (model.kind smollm2, a factory "
                            "returning (model, tokenizer), or data.kind text)")
    precond = args.precond if args.precond is not None else cfg["fit"]["output"]
    pc = None
    if precond and precond != "none":
        if os.path.exists(precond):
            pc = jv.Preconditioner.load(precond)
        elif args.precond is not None:
            raise FileNotFoundError(f"preconditioner {precond} not found (run `jaxval fit`, or --precond none)")

    if args.chat:
        if not hasattr(tok, "apply_chat_template"):
            raise C.ConfigError("--chat: the tokenizer has no chat template")
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        prompt_ids = ([tok.bos_id] if cfg["data"].get("add_bos") else []) + list(tok.encode(args.prompt))
    new_ids = generate_ids(model, prompt_ids, args.max_new_tokens, getattr(tok, "stop_ids", ()))
    qb = query_batch(prompt_ids, new_ids, context_limit(model),
                     length=np.shape(data["tokens"])[1] if "tokens" in data else None)
    chunk = int(cfg["log"]["batch_size"])
    # [1, D]: the query repeated to the chunk the per-token split runs in (one compiled step for both)
    gq = logra.grads(model, {key: np.repeat(v, chunk, axis=0) for key, v in qb.items()})[:1]
    if not isinstance(gq, jv.ProjectedGrads):   # record the provenance the store and pc are checked against
        gq = jv.with_provenance(gq, logra, model)
    k = min(int(args.top_k), len(store))
    top_v, top_i = jv.top_k(gq, store, k, precond=pc, mode=args.mode, largest=True, progress=False)
    bot_v, bot_i = jv.top_k(gq, store, k, precond=pc, mode=args.mode, largest=False, progress=False)
    top_v, top_i, bot_v, bot_i = (np.asarray(a)[0] for a in (top_v, top_i, bot_v, bot_i))
    store_ids = np.asarray(store.ids)
    row_of = {str(v): r for r, v in enumerate(ids)}
    h = max(0, min(int(args.highlight), k))
    chosen = [(s, r, int(i), float(v)) for s, (vals, idx) in (("proponents", (top_v, top_i)),
                                                               ("opponents", (bot_v, bot_i)))
              for r, (v, i) in enumerate(zip(vals, idx))]
    missing = [str(store_ids[i]) for _s, _r, i, _v in chosen if str(store_ids[i]) not in row_of]
    if missing:
        raise StoreError(f"the store's rows {missing[:3]} are not in the data of {args.config} (another corpus, "
                         "chunking or limit than `jaxval log` used): rerun `jaxval log`")
    split_rows = [row_of[str(store_ids[i])] for _s, r, i, _v in chosen if r < h]
    ti = None
    if split_rows and args.mode in ("dot", "cosine", "relative"):
        train_sel = {key: np.asarray(v)[split_rows] for key, v in data.items()}
        ti = jv.token_influence(logra, model, qb, train_sel, precond=pc, mode=args.mode, chunk=chunk)
    n_q = int(len(prompt_ids) + len(new_ids))
    result: dict[str, Any] = {
        "prompt": args.prompt, "generation": tok.decode(new_ids), "mode": args.mode,
        "precond": precond if pc is not None else None, "precond_kind": pc.kind if pc is not None else "identity",
        "store": str(out), "n_train": len(store), "config": str(args.config),
        "model": cfg["model"].get("factory") or cfg["model"].get("kind"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "query": {"ids": [int(t) for t in qb["tokens"][0, :n_q]],
                  "tokens": _token_texts(tok, qb["tokens"][0, :n_q]),
                  "target": [bool(m) for m in qb["mask"][0, :n_q] > 0]},
        "proponents": [], "opponents": []}
    j = 0
    for side, r, i, v in chosen:
        row = row_of.get(str(store_ids[i]))
        toks = np.asarray(data["tokens"][row]) if row is not None else np.zeros(0, np.int32)
        live = np.asarray(data["mask"][row]) > 0 if row is not None and "mask" in data else np.ones(len(toks), bool)
        n_t = int(np.nonzero(live)[0].max()) + 1 if live.any() else 0
        e = {"rank": r + 1, "id": str(store_ids[i]), "score_store": v, "text": tok.decode(toks[:n_t]),
             "parts": None}
        if ti is not None and r < h:
            e.update(score=float(ti.scores[0, j]), ids=[int(t) for t in toks[:n_t]],
                     tokens=_token_texts(tok, toks[:n_t]), parts=[float(p) for p in ti.train_tokens[0, j, :n_t]],
                     query_parts=([float(p) for p in ti.query_tokens[0, j, :n_q]]
                                  if ti.query_tokens is not None else None))
            j += 1
        result[side].append(e)
    out_dir = args.out or os.path.join(os.path.dirname(str(out).rstrip("/")) or ".", "attribution")
    os.makedirs(out_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "attribution.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "attribution.html"), "w", encoding="utf-8") as f:
            f.write(render_html(result))
        with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(_report_md(result))
    print(f"generation: {result['generation']!r}\n"
          f"top proponent {result['proponents'][0]['id']} ({top_v[0]:+.4g}), top opponent "
          f"{result['opponents'][0]['id']} ({bot_v[0]:+.4g}); {h} of each split over their tokens -> "
          f"{os.path.join(out_dir, 'attribution.html')} ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_parser(sub) -> None:
    a = sub.add_parser("attribute", help="attribute a generation of the model to its training text (per token)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    a.add_argument("--config", required=True, help="the config `jaxval log` ran with (a text model and corpus)")
    a.add_argument("--prompt", required=True, help="the prompt the model continues greedily")
    a.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--precond", default=None,
                   help="preconditioner checkpoint (default: fit.output when it exists; 'none': identity)")
    a.add_argument("--mode", default="cosine", choices=["dot", "cosine", "relative"])
    a.add_argument("--top-k", type=int, default=5, help="proponents and opponents listed")
    a.add_argument("--highlight", type=int, default=3,
                   help="of these, how many of each side are split over their tokens (a forward and backward "
                        "per token)")
    a.add_argument("--out", default=None,
                   help="folder for attribution.html, .json and report.md (default: attribution/ beside the store)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run)

