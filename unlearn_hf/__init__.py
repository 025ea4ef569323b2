"""unlearn_hf: training-free skill unlearning for Hugging Face causal language models.

Implements Neuron Adjust and Key Space Detection (Li, Sun, Weng, NAACL 2025) and the Selective Pruning
baseline, attached to any ``AutoModelForCausalLM`` through owned forward hooks.
"""

from .data import DataSpec
from .integrations.lm_eval import register as _register_lm_eval
from .methods import (
    KeySpaceDetection,
    KeySpaceDetectionConfig,
    MethodConfig,
    NeuronAdjust,
    NeuronAdjustConfig,
    SelectivePruning,
    SelectivePruningConfig,
    UnlearningMethod,
)
from .probe import probe
from .sites import FFLSite, SiteError, find_ffl_sites
from .stats import RunningStats, SiteStatistics, merge
from .version import __version__
from .wrapper import UnlearnedModelForCausalLM

_register_lm_eval()  # the lm-eval model "unlearn_hf", where lm-eval is installed

__all__ = [
    "DataSpec",
    "FFLSite",
    "KeySpaceDetection",
    "KeySpaceDetectionConfig",
    "MethodConfig",
    "NeuronAdjust",
    "NeuronAdjustConfig",
    "RunningStats",
    "SelectivePruning",
    "SelectivePruningConfig",
    "SiteError",
    "SiteStatistics",
    "UnlearnedModelForCausalLM",
    "UnlearningMethod",
    "__version__",
    "find_ffl_sites",
    "merge",
    "probe",
]
