from .config import KeySpaceDetectionConfig
from .decision import KeySpaceAttachment
from .hypercube import KeySpaceLayer, hypercube_radius
from .method import KeySpaceDetection

__all__ = [
    "KeySpaceAttachment",
    "KeySpaceDetection",
    "KeySpaceDetectionConfig",
    "KeySpaceLayer",
    "hypercube_radius",
]
