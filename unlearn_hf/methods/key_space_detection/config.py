"""Configuration of Key Space Detection."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig

RULES = ("all", "any")
ACTIONS = ("refuse", "eos")


@dataclass
class KeySpaceDetectionConfig(MethodConfig):
    """Key Space Detection (METHOD.md §4): abstain when a query's key vector falls in the forget skill's
    hypercube μ ± α·k·σ.

    Args:
        layers: layers whose key site is checked (``None`` = the middle layer, ``n_layers // 2``, which separated
            skills far better than the last layer on SmolLM2-135M). Resolved and stored at fit time.
        rule: with several layers, abstain when the query is inside at ``"all"`` of them or at ``"any"``.
        alpha: multiplier of the fitted radius k (α > 1 widens the hypercube, α < 1 narrows it).
        eps: floor of the per-dimension standard deviation.
        action: ``"refuse"`` emits ``refusal`` then end-of-sequence; ``"eos"`` ends the sequence at once.
        refusal: the refusal message, tokenized with the model's tokenizer at fit time.
        recheck_each_token: also check the key vector of every generated token (a row abstains from the first
            step that falls inside); by default only the prompt's last token decides, at prefill.
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
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = [int(i) for i in self.layers]
            if not self.layers:
                raise ValueError("layers must name at least one layer (or be None for the default).")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}.")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}.")
        if self.action == "refuse" and (not isinstance(self.refusal, str) or not self.refusal.strip()):
            raise ValueError("action='refuse' needs a non-empty refusal text.")
