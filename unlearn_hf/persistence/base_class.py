"""Which ``transformers`` auto class rebuilds a saved unlearned model's base model: the image-text one for an
image-text model (LLaVA, Gemma 3, Llama 4, ...), the causal-LM one otherwise."""

from __future__ import annotations

import os
from typing import Any


def base_auto_class(
    name: str, hub_kwargs: dict[str, Any], base_kwargs: dict[str, Any], fitted_type: str | None
) -> Any:
    """The auto class that builds the base model as it was fitted: ``AutoModelForImageTextToText`` when its config
    names an image-text architecture and the model fitted was that one (its fingerprint's model type is the
    config's: ``AutoModelForCausalLM`` has no class for LLaVA's config, and builds Llama 4's text model alone),
    else ``AutoModelForCausalLM`` (also for a text model loaded from an image-text checkpoint, as Llama 4's
    ``llama4_text``, and when the config cannot be read here: the model's own loading then reports why)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = base_kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        keep = {
            k: v
            for k, v in base_kwargs.items()
            if k in ("trust_remote_code", "subfolder", "gguf_file", "code_revision")
        }
        try:
            config = AutoConfig.from_pretrained(config or name, **hub_kwargs, **keep)
        except (OSError, ValueError):
            return AutoModelForCausalLM
    architectures = getattr(config, "architectures", None) or []
    image_text = architectures and architectures[0] in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
    if image_text and fitted_type in (None, getattr(config, "model_type", None)):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM
