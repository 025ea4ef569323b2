from .config import NeuronAdjustConfig
from .layer import NeuronAdjustLayer
from .model import NeuronAdjust

__all__ = ["NeuronAdjust", "NeuronAdjustConfig", "NeuronAdjustLayer"]
