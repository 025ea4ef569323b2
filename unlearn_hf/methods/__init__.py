"""Unlearning methods, one folder each, found by :mod:`.registry` (adding a method = adding a folder):
``config.py`` (settings), ``method.py`` (the fitted method: fit, state, attach), the attachment and per-layer
computation (``layer.py``, ``attachment.py``; Key Space Detection: ``hypercube.py``, ``decision.py``,
``refusal.py``)."""

from .base import AbstainingAttachment, AbstainingMethod, Attachment, UnlearningMethod
from .config import MethodConfig
from .registry import METHOD_CLASSES, by_short_name, config_from_dict, discover, method_class, register_method

discover()

from .key_space_detection import KeySpaceDetection, KeySpaceDetectionConfig  # noqa: E402
from .neuron_adjust import NeuronAdjust, NeuronAdjustConfig  # noqa: E402
from .selective_pruning import SelectivePruning, SelectivePruningConfig  # noqa: E402

__all__ = [
    "METHOD_CLASSES",
    "AbstainingAttachment",
    "AbstainingMethod",
    "Attachment",
    "KeySpaceDetection",
    "KeySpaceDetectionConfig",
    "MethodConfig",
    "NeuronAdjust",
    "NeuronAdjustConfig",
    "SelectivePruning",
    "SelectivePruningConfig",
    "UnlearningMethod",
    "by_short_name",
    "config_from_dict",
    "discover",
    "method_class",
    "register_method",
]
