"""Unlearning methods, one folder each: ``config.py`` (settings), ``model.py`` (fit/attach), ``layer.py``
(the per-layer computation)."""

from .base import METHOD_CLASSES, MethodConfig, UnlearningMethod, config_from_dict, register_method
from .key_space_detection import KeySpaceDetection, KeySpaceDetectionConfig
from .neuron_adjust import NeuronAdjust, NeuronAdjustConfig
from .selective_pruning import SelectivePruning, SelectivePruningConfig

__all__ = [
    "METHOD_CLASSES",
    "KeySpaceDetection",
    "KeySpaceDetectionConfig",
    "MethodConfig",
    "NeuronAdjust",
    "NeuronAdjustConfig",
    "SelectivePruning",
    "SelectivePruningConfig",
    "UnlearningMethod",
    "config_from_dict",
    "register_method",
]
