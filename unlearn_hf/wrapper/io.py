"""Saving, loading and pushing an unlearned model: the ``transformers``-style entry points (the work is done by
:mod:`unlearn_hf.persistence`)."""

from __future__ import annotations

from typing import Any


class PersistenceMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` of an unlearned model."""

    def save_pretrained(self, save_directory, *, save_base_model: bool | None = None, **kwargs: Any) -> None:
        """Save the attached methods (``unlearn_config.json`` + ``unlearn_model.safetensors``) and, with
        ``save_base_model=True``, the base model's own files in the same folder; unset, they are saved when a
        ``state_dict`` is given (``Trainer`` checkpoints). See ``FORMAT.md``."""
        from ..persistence import save_unlearned

        save_unlearned(self, save_directory, save_base_model=save_base_model, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, base_model=None, **kwargs: Any):
        """Load an unlearned model from a local folder or a Hub repo id, with the ``transformers`` calling
        convention (``revision``, ``torch_dtype``/``dtype``, ``device_map``, ... go to the base model), or attach
        saved unlearning to ``base_model`` already in memory."""
        from ..persistence import load_unlearned

        return load_unlearned(
            cls._wrapper_class(), pretrained_model_name_or_path, *model_args, base_model=base_model, **kwargs
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the unlearning files (and a model card) to the Hub; see :func:`unlearn_hf.persistence.push_unlearned`."""
        from ..persistence import push_unlearned

        return push_unlearned(self, repo_id, **kwargs)
