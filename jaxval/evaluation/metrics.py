"""Metrics of influence scores against retrained models: LDS, leave-one-out correlation, brittleness masks.

Sign convention (the whole package): ``score[q, i] > 0`` means training on example ``i`` LOWERS the
loss of query ``q`` (``i`` is a proponent). Hence

- removing ``i`` is predicted to RAISE q's loss by ``score[q, i]`` (leave-one-out: ``Δloss ≈ score``);
- training on a subset ``S`` is predicted to give q a loss ``≈ const − Σ_{i∈S} score[q, i]``, so the
  LDS correlates ``−Σ_{i∈S} score[q, i]`` with the measured loss (a perfect method has LDS = +1).

The measured side (losses of models retrained on subsets) comes from :mod:`jaxval.evaluation.retraining`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxval._src.stats import pearson, spearman

__all__ = ["lds_masks", "LDSResult", "lds", "loo_correlation", "brittleness_masks"]


def lds_masks(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[M, N]`` boolean masks, each selecting exactly ``round(α N)`` examples at random."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = int(round(alpha * n))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n), bool)
    for m in range(num_subsets):
        masks[m, rng.choice(n, k, replace=False)] = True
    return masks


@dataclasses.dataclass
class LDSResult:
    mean: float
    std: float
    per_query: np.ndarray  # [Q] Spearman correlations

    def __str__(self):
        return f"{self.mean:.3f} ± {self.std:.3f}"


def lds(scores, masks, measured) -> LDSResult:
    """Linear datamodeling score.

    scores: ``[Q, N]`` (positive = proponent); masks: ``[M, N]`` subsets; measured: ``[M, Q]`` query
    losses of the models trained on each subset (or ``[M, S, Q]``: averaged over the S seeds first).
    Per query: Spearman over the M subsets between the predicted loss ``−Σ_{i∈S_m} score[q, i]`` and the
    measured loss. Returns mean ± std over queries (nan queries, e.g. constant losses, are dropped)."""
    scores = np.asarray(scores, np.float64)
    masks = np.asarray(masks, np.float64)
    measured = np.asarray(measured, np.float64)
    if measured.ndim == 3:
        measured = measured.mean(1)
    if scores.shape[1] != masks.shape[1] or measured.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes disagree: scores {scores.shape} [Q, N], masks {masks.shape} [M, N], "
                         f"measured {measured.shape} [M, Q]")
    predicted = -(masks @ scores.T)  # [M, Q]
    per = spearman(predicted, measured, axis=0)
    ok = per[np.isfinite(per)]
    return LDSResult(float(ok.mean()) if ok.size else float("nan"), float(ok.std()) if ok.size else float("nan"), per)


def loo_correlation(scores, deltas) -> dict:
    """Per-query Pearson / Spearman between ``scores [Q, n]`` and LOO loss changes ``deltas [Q, n]``."""
    p = pearson(scores, deltas, axis=1)
    s = spearman(scores, deltas, axis=1)
    return {"pearson_mean": float(np.nanmean(p)), "pearson_min": float(np.nanmin(p)),
            "spearman_mean": float(np.nanmean(s)), "pearson": p, "spearman": s}


def brittleness_masks(scores, ks, seed: int = 0, random: bool = False) -> np.ndarray:
    """``[Q, K, N]`` masks removing, for each query, its top-``k`` proponents (largest scores), or ``k``
    random examples with ``random=True``."""
    scores = np.asarray(scores)
    q, n = scores.shape
    rng = np.random.default_rng(seed)
    out = np.ones((q, len(ks), n), bool)
    for i in range(q):
        order = rng.permutation(n) if random else np.argsort(-scores[i], kind="stable")
        for j, k in enumerate(ks):
            out[i, j, order[:k]] = False
    return out
