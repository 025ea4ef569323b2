"""The unlearned model: :class:`UnlearnedModelForCausalLM` and the modules its behaviour is split into."""

from .unlearned_model import UnlearnedModelForCausalLM

__all__ = ["UnlearnedModelForCausalLM"]
