"""Every matplotlib figure of the library (the only library module that imports matplotlib).

matplotlib is an optional dependency (``pip install 'jaxval[plots]'``), imported lazily by
:func:`pyplot` when a figure is drawn, never by ``import jaxval``. Figures are written with the
non-interactive ``Agg`` backend, so they work on headless machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["pyplot", "plot_stability", "plot_brittleness", "plot_prices"]


def _finish(plt, fig, path: str, title: str = "") -> str:
    """Title, lay out, save at 120 dpi and close ``fig``; returns ``path``."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend; a clear error naming the extra if it is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("jaxval's figures need matplotlib: pip install 'jaxval[plots]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stability(stats: Mapping, path: str, steps: Sequence[int] | None = None, title: str = "") -> str:
    """The two panels of :func:`jaxval.gradient_stability`'s statistics, saved to ``path`` (PNG).

    Left: distribution of ``cos(g_z(θ_c), g_z(θ_ref))`` per checkpoint (median and 10–90% band, and the
    median cosine to the previous checkpoint); right: Spearman of the per-sample gradient norms of every
    checkpoint vs the reference and vs the first. ``steps`` labels the checkpoints (default 0..C-1).
    Returns ``path``."""
    plt = pyplot()
    cos = np.asarray(stats["cosine"])
    rho = np.asarray(stats["norm_spearman"])
    ref = int(stats.get("reference", cos.shape[0] - 1))
    c_n = cos.shape[0]
    x = np.asarray(steps if steps is not None else np.arange(c_n))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    med = np.median(cos, axis=1)
    lo, hi = np.percentile(cos, 10, axis=1), np.percentile(cos, 90, axis=1)
    ax[0].fill_between(x, lo, hi, alpha=0.3, label="10–90%")
    ax[0].plot(x, med, "o-", label="median")
    if "cosine_consecutive" in stats:
        cc = np.median(np.asarray(stats["cosine_consecutive"]), axis=1)
        ax[0].plot(x[1:], cc, "s--", label="median cos to previous ckpt")
    ax[0].set_xlabel("checkpoint (training step)")
    ax[0].set_ylabel(f"cos(g(θ_c), g(θ_{x[ref]}))")
    ax[0].set_title("gradient direction vs reference")
    ax[0].legend(fontsize=8)
    ax[1].plot(x, rho[:, ref], "o-", label=f"vs step {x[ref]}")
    ax[1].plot(x, rho[:, 0], "s--", label=f"vs step {x[0]}")
    ax[1].set_ylim(min(0.0, float(np.nanmin(rho)) - 0.05), 1.02)
    ax[1].set_xlabel("checkpoint (training step)")
    ax[1].set_ylabel("Spearman of per-sample ‖g‖")
    ax[1].set_title("rank stability of gradient norms")
    ax[1].legend(fontsize=8)
    return _finish(plt, fig, path, title)


def plot_brittleness(curves: Mapping[str, np.ndarray], ks, path: str, title: str = "",
                     ylabel: str = "fraction of test predictions flipped") -> str:
    """Flip rate (or ``ylabel``) vs ``k``, one line per method (``random`` dashed grey), saved to ``path``.

    ``curves``: ``{method: [K] values}`` as returned by :func:`jaxval.brittleness` or
    :func:`jaxval.removal_effect`. Returns ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, ys in curves.items():
        ax.plot(list(ks), np.asarray(ys), "--" if name == "random" else "-o", label=name, ms=4,
                color="gray" if name == "random" else None)
    ax.set_xlabel("k = training points removed")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "brittleness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_prices(scores: Mapping[str, np.ndarray], prices: Mapping[str, np.ndarray], path: str,
                groups: Sequence | None = None, title: str = "", unit: str = "") -> str:
    """Price against score, one panel per method (``scores[m]``, ``prices[m]``: ``[M]`` each, e.g. from
    :func:`jaxval.alinfik.price`), saved to ``path``. ``groups`` ``[M]`` (e.g. each sample's provider) colours
    the points by group; the legend gives each group's share of the total payout. Returns ``path``."""
    plt = pyplot()
    names = list(scores)
    if set(names) != set(prices):
        raise ValueError(f"scores and prices must name the same methods, got {sorted(scores)} / {sorted(prices)}")
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    g = None if groups is None else np.asarray([str(x) for x in groups])
    for ax, name in zip(axes[0], names):
        s, p = np.asarray(scores[name], np.float64), np.asarray(prices[name], np.float64)
        if s.shape != p.shape or (g is not None and g.shape != s.shape):
            raise ValueError(f"{name}: scores {s.shape}, prices {p.shape} and groups must have one entry per sample")
        total = p.sum()
        for j, grp in enumerate([None] if g is None else list(dict.fromkeys(g))):
            sel = np.ones(len(s), bool) if grp is None else g == grp
            share = p[sel].sum() / total if total > 0 else 0.0
            ax.scatter(s[sel], p[sel], s=8, alpha=0.7, color=f"C{j}",
                       label=None if grp is None else f"{grp} (n={sel.sum()}, {100 * share:.1f}% of payout)")
        ax.set_xlabel(f"{name} score")
        ax.set_ylabel(f"price{f' ({unit})' if unit else ''}")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if g is not None:
            ax.legend(fontsize=7)
    return _finish(plt, fig, path, title)
