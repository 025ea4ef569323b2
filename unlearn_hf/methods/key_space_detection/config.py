"""Configuration of Key Space Detection."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..base import MethodConfig

RULES = ("all", "any")
ACTIONS = ("refuse", "eos")


@dataclass
class KeySpaceDetectionConfig(MethodConfig):
    """Key Space Detection (METHOD.md §4): a query abstains when its key vector falls inside the forget skill's
    hypercube μ ± α·k·σ.

    Args:
        layers: layer(s) whose key site is checked; negative indices count from the end. ``None`` = the middle
            layer, ``n_layers // 2`` (on SmolLM2-135M-Instruct it separates GSM8K from MBPP and MMLU queries far
            better than the last layer). The fitted method's config holds the resolved, sorted indices.
        rule: with several layers, abstain when the query is inside at ``"all"`` of them (stricter: fewer false
            refusals) or at ``"any"`` of them (catches more).
        alpha: multiplier of the fitted radius k (> 0; α > 1 widens the hypercube, α < 1 narrows it). At α = 1
            every fitted query is inside.
        eps: floor of the per-dimension standard deviation (> 0).
        action: ``"refuse"`` emits the tokens of ``refusal``, then end-of-sequence; ``"eos"`` ends at once.
        refusal: the refusal message (``action="refuse"``), tokenized with the model's tokenizer at fit time,
            without special tokens. It must produce at least one token.
        recheck_each_token: also check the key vector of every generated token; a row then abstains from the
            first step that falls inside (its partial answer is kept, followed by the refusal), as the paper's
            code does. By default only the prompt's last token decides, at the prefill.
    """

    method_type = "key_space_detection"

    layers: list[int] | None = None
    rule: str = "all"
    alpha: float = 1.0
    eps: float = 1e-5
    action: str = "refuse"
    refusal: str = "I can't help with that."
    recheck_each_token: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"layers must be a layer index or a list of them, got {self.layers!r}.")
            layers = list(self.layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
            if bad:
                raise ValueError(f"layers must hold integer layer indices, got {bad}.")
            if not layers:
                raise ValueError("layers must name at least one layer (or be None for the middle layer).")
            self.layers = [int(i) for i in layers]
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}.")
        for name in ("alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}.")
            setattr(self, name, float(value))
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}.")
        if not isinstance(self.refusal, str):
            raise ValueError(f"refusal must be a string, got {type(self.refusal).__name__}.")
        if self.action == "refuse" and not self.refusal.strip():
            raise ValueError("action='refuse' needs a non-empty refusal text (or use action='eos').")
        if not isinstance(self.recheck_each_token, bool):
            raise ValueError(f"recheck_each_token must be a bool, got {self.recheck_each_token!r}.")
