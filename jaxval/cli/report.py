"""Readable influence reports: each query beside its top proponents and opponents (images or text)."""

from __future__ import annotations

import html
import os

import numpy as np


def _image(x: np.ndarray) -> np.ndarray | None:
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] in (1, 3):
        return x[..., 0] if x.shape[-1] == 1 else x
    if x.ndim == 2:
        return x
    side = int(round(np.sqrt(x.size)))
    return x.reshape(side, side) if side * side == x.size else None


def render_examples(data: dict | None, tokenizer=None):
    """``f(row) -> ("image", array) | ("text", str) | ("none", "")`` for a data dict (x/y or tokens/mask)."""
    def f(row):
        if data is None or row is None:
            return "none", ""
        if "tokens" in data:
            toks = np.asarray(data["tokens"][row])
            if "mask" in data:
                toks = toks[np.asarray(data["mask"][row]) > 0]
            text = tokenizer.decode(toks) if tokenizer is not None else " ".join(map(str, toks[:64]))
            return "text", text
        img = _image(data["x"][row])
        label = f"y={int(data['y'][row])}" if "y" in data else ""
        return ("image", (img, label)) if img is not None else ("text", label)
    return f


def write_report(out_dir: str, query_ids, train_ids, top_vals, top_idx, bot_vals, bot_idx, *, mode: str,
                 query_render, train_render, train_row_of_id=None, query_row_of_id=None,
                 max_queries: int = 20, title: str = "Influence report") -> str:
    """Write ``report.md`` (and ``report_q*.png`` for image data) into ``out_dir``; returns the md path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# {title}", "", f"Mode `{mode}`; positive = training on the example lowers the query's loss "
             "(proponent), negative = raises it (opponent).", ""]
    nq = min(len(query_ids), max_queries)
    for q in range(nq):
        qrow = query_row_of_id(query_ids[q]) if query_row_of_id else None
        kind, payload = query_render(qrow)
        lines.append(f"## Query {query_ids[q]}")
        if kind == "image":
            png = _plot_row(out_dir, q, payload, [(train_render(train_row_of_id(train_ids[i]) if train_row_of_id else None),
                                                   v) for i, v in zip(top_idx[q], top_vals[q])],
                            [(train_render(train_row_of_id(train_ids[i]) if train_row_of_id else None), v)
                             for i, v in zip(bot_idx[q], bot_vals[q])])
            lines += [f"![query {query_ids[q]}]({os.path.basename(png)})", ""]
        elif kind == "text":
            lines += ["", "> " + html.escape(payload[:400]).replace("\n", " "), ""]
        for name, idx, vals in (("Proponents", top_idx[q], top_vals[q]), ("Opponents", bot_idx[q], bot_vals[q])):
            lines += [f"**{name}**", "", "| rank | train id | score | example |", "|---:|---:|---:|---|"]
            for r, (i, v) in enumerate(zip(idx, vals)):
                tk, tp = train_render(train_row_of_id(train_ids[i]) if train_row_of_id else None)
                ex = tp[1] if tk == "image" else html.escape(str(tp)[:160]).replace("\n", " ").replace("|", "\\|")
                lines.append(f"| {r + 1} | {train_ids[i]} | {v:+.4g} | {ex} |")
            lines.append("")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def _plot_row(out_dir, q, query, top, bottom) -> str:
    from jaxval.evaluation.plots import pyplot

    plt = pyplot()

    k = len(top)
    fig, axes = plt.subplots(1, 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.9))
    img, label = query
    axes[0].imshow(img, cmap="gray_r")
    axes[0].set_title(f"query\n{label}", fontsize=8, color="navy")
    for j, (((kind, payload), v), color) in enumerate([(t, "green") for t in top] + [(b, "firebrick") for b in bottom]):
        ax = axes[1 + j]
        if kind == "image":
            ax.imshow(payload[0], cmap="gray_r")
            ax.set_title(f"{payload[1]} {v:+.2g}", fontsize=7, color=color)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = os.path.join(out_dir, f"report_q{q}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
