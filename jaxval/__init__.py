"""jaxval: data valuation for large models in JAX (LoGra influence functions, LinFiK / ALinFiK)."""

from jaxval._src.logra import LoGra, explicit_grads, model_fingerprint
from jaxval.valuation import alinfik
from jaxval.evaluation import baselines
from jaxval import evaluation as evaluate
from jaxval.evaluation import (RetrainConfig, brittleness, fit, lds, lds_masks, leave_one_out, loo_correlation,
                               plot_brittleness, plot_stability, removal_effect, retrain)
from jaxval.valuation.linfik import gradient_stability, linfik, linfik_parts
from jaxval._src.scoring import cached_self_influence, influence, self_influence, top_k
from jaxval._src.layers import Layer, discover
from jaxval._src.logging import log_gradients
from jaxval._src.preconditioner import Preconditioner
from jaxval._src import curvature
from jaxval._src.curvature import (EigenState, KFACState, RawState, fit_from_store, fit_preconditioner,
                                   load_statistics, pca_projections, save_statistics)
from jaxval._src.store import GradientStore
from jaxval._src.errors import (CheckpointError, CheckpointNotFoundError, ConfigError, Error, IncompleteStoreError,
                                JaxvalError, MismatchError, NonFiniteError, OutputError, ProvenanceError, StoreCorruptError,
                                StoreError, StoreNotFoundError, StoreWriteError)
from jaxval._src.provenance import ProjectedGrads, Provenance, with_provenance
from jaxval._src.projection import init_projections, layer_key, projection_matrix
from jaxval._src.token_influence import TokenInfluence, token_influence

__version__ = "0.1.0"

__all__ = [
    "GradientStore",
    "Error",
    "JaxvalError",
    "ConfigError",
    "ProvenanceError",
    "MismatchError",
    "NonFiniteError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "OutputError",
    "StoreError",
    "StoreNotFoundError",
    "IncompleteStoreError",
    "StoreCorruptError",
    "StoreWriteError",
    "Provenance",
    "ProjectedGrads",
    "with_provenance",
    "log_gradients",
    "LoGra",
    "Layer",
    "Preconditioner",
    "discover",
    "fit_preconditioner",
    "fit_from_store",
    "curvature",
    "EigenState",
    "KFACState",
    "RawState",
    "load_statistics",
    "save_statistics",
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
    "linfik_parts",
    "plot_stability",
    "plot_brittleness",
    "influence",
    "init_projections",
    "self_influence",
    "top_k",
    "token_influence",
    "TokenInfluence",
    "layer_key",
    "model_fingerprint",
    "projection_matrix",
]
