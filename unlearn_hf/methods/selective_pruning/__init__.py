from .config import SelectivePruningConfig
from .layer import SelectivePruningLayer
from .method import SelectivePruning, SelectivePruningAttachment

__all__ = [
    "SelectivePruning",
    "SelectivePruningAttachment",
    "SelectivePruningConfig",
    "SelectivePruningLayer",
]
