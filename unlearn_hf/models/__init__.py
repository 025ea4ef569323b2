"""Model loaders for models that are not on the Hugging Face Hub in a directly loadable form."""

from .smollm2 import (
    SMOLLM2_135M_INSTRUCT,
    GGUFModelSpec,
    default_cache_dir,
    gguf_path,
    load_gguf_model,
    load_smollm2,
    smollm2_gguf_path,
)

__all__ = [
    "GGUFModelSpec",
    "SMOLLM2_135M_INSTRUCT",
    "default_cache_dir",
    "gguf_path",
    "load_gguf_model",
    "load_smollm2",
    "smollm2_gguf_path",
]
