"""jaxval: data valuation for large models in JAX (LoGra influence functions, LinFiK / ALinFiK)."""

from jaxval.grads import LoGra, explicit_grads, model_fingerprint
from jaxval import alinfik, baselines, evaluate
from jaxval.evaluate import (RetrainConfig, brittleness, fit, lds, lds_masks, leave_one_out, loo_correlation,
                             removal_effect, retrain)
from jaxval.linfik import gradient_stability, linfik, plot_stability
from jaxval.influence import cached_self_influence, influence, self_influence, top_k
from jaxval.layers import Layer, discover
from jaxval.pipeline import log_gradients
from jaxval.precondition import Preconditioner, fit_preconditioner, pca_projections
from jaxval.store import GradientStore, StoreError
from jaxval.projection import init_projections, layer_key, projection_matrix

__version__ = "0.1.0"

__all__ = [
    "GradientStore",
    "StoreError",
    "log_gradients",
    "LoGra",
    "Layer",
    "Preconditioner",
    "discover",
    "fit_preconditioner",
    "pca_projections",
    "explicit_grads",
    "RetrainConfig",
    "alinfik",
    "baselines",
    "brittleness",
    "evaluate",
    "fit",
    "lds",
    "lds_masks",
    "leave_one_out",
    "loo_correlation",
    "removal_effect",
    "retrain",
    "cached_self_influence",
    "gradient_stability",
    "linfik",
    "plot_stability",
    "influence",
    "init_projections",
    "self_influence",
    "top_k",
    "layer_key",
    "model_fingerprint",
    "projection_matrix",
]
