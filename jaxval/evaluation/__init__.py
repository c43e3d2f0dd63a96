"""Evaluation of data-valuation scores: the retraining harness, its metrics, rank statistics, figures.

Public names (re-exported here; ``jaxval.evaluate`` is this package):

* :mod:`~jaxval.evaluation.retraining`: :class:`RetrainConfig`, :func:`retrain`, :func:`fit`,
  :func:`subset_seeds`, :func:`leave_one_out`, :func:`brittleness`, :func:`removal_effect`, :class:`Cost`,
  :func:`masks_n`;
* :mod:`~jaxval.evaluation.metrics`: :func:`lds_masks`, :func:`lds` (:class:`LDSResult`),
  :func:`loo_correlation`, :func:`brittleness_masks`;
* rank statistics: :func:`rankdata`, :func:`pearson`, :func:`spearman` (along an axis, as ``scipy.stats``);
* :mod:`~jaxval.evaluation.plots` (matplotlib, the ``[plots]`` extra, imported when a figure is drawn):
  :func:`plot_brittleness`, :func:`plot_stability`;
* :mod:`~jaxval.evaluation.baselines`: other attribution methods (import the submodule).
"""

from jaxval._src.stats import pearson, rankdata, spearman
from jaxval.evaluation.metrics import LDSResult, brittleness_masks, lds, lds_masks, loo_correlation
from jaxval.evaluation.plots import plot_brittleness, plot_stability
from jaxval.evaluation.retraining import (Cost, RetrainConfig, brittleness, fit, leave_one_out, masks_n,
                                          removal_effect, retrain, subset_seeds)

__all__ = ["Cost", "LDSResult", "RetrainConfig", "brittleness", "brittleness_masks", "fit", "lds", "lds_masks",
           "leave_one_out", "loo_correlation", "masks_n", "pearson", "plot_brittleness", "plot_stability",
           "rankdata", "removal_effect", "retrain", "spearman", "subset_seeds"]
