from .config import SelectivePruningConfig
from .layer import SelectivePruningLayer
from .model import SelectivePruning

__all__ = ["SelectivePruning", "SelectivePruningConfig", "SelectivePruningLayer"]
