from .attachment import NeuronAdjustAttachment
from .config import NeuronAdjustConfig
from .layer import NeuronAdjustLayer
from .method import NeuronAdjust

__all__ = ["NeuronAdjust", "NeuronAdjustAttachment", "NeuronAdjustConfig", "NeuronAdjustLayer"]
