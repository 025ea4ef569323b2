from .config import KeySpaceDetectionConfig
from .layer import KeySpaceLayer
from .model import KeySpaceDetection, hypercube_radius

__all__ = ["KeySpaceDetection", "KeySpaceDetectionConfig", "KeySpaceLayer", "hypercube_radius"]
