"""Configuration of Key Space Detection."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfg
from ..config import MethodConfig

RULES = ("all", "any")
ACTIONS = ("refuse", "eos")


@dataclass(frozen=True)
class KeySpaceDetectionConfig(MethodConfig):
    """Key Space Detection (``docs/METHOD.md`` §4): a query abstains when its key vector falls inside the forget skill's
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
        self._set("layers", cfg.layer_list("layers", self.layers))
        self._set("rule", cfg.choice("rule", self.rule, RULES))
        self._set("alpha", cfg.positive_float("alpha", self.alpha))
        self._set("eps", cfg.positive_float("eps", self.eps))
        self._set("action", cfg.choice("action", self.action, ACTIONS))
        self._set("refusal", cfg.text("refusal", self.refusal))
        if self.action == "refuse" and not self.refusal.strip():
            raise ValueError("action='refuse' needs a non-empty refusal text (or use action='eos').")
        self._set("recheck_each_token", cfg.flag("recheck_each_token", self.recheck_each_token))
