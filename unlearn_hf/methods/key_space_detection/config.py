"""Configuration of Key Space Detection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import config as cfg
from ..config import MethodConfig
from .rendering import check_templates

RULES = ("all", "any")
ACTIONS = ("refuse", "eos")
INPUTS = ("questions", "prompts")
AUTO = cfg.AUTO
#: The most layers calibration may combine (the candidates grow as layers^max_layers).
MAX_COMBINED = 3
#: The widest trailing window the decision may read (tokens before and including the prompt's last).
MAX_WINDOW = 32


@dataclass(frozen=True)
class KeySpaceDetectionConfig(MethodConfig):
    """Key Space Detection (``docs/METHOD.md`` §4): a query abstains when the key vector at the end of its question
    falls inside the forget skill's hypercube μ ± α·k·σ.

    **What is fitted.** Forget queries are *questions* (strings, or chat message lists whose last user turn is
    the question), rendered in every format of this config (:mod:`.rendering`); the hypercube is fitted on the
    key vector of the last token of the question's own text in each rendering. ``inputs="prompts"`` takes
    already formatted prompts and fits on their last token (the paper's setting).

    **What is decided.** At the prefill, per row, the key vectors of the prompt's last ``window`` real tokens are
    tested; the row abstains when one of them is inside (:mod:`.decision`).

    **Calibration.** With retain queries given to ``fit``, every ``"auto"`` field is chosen on held-out data: a
    ``calibration_fraction`` of the forget questions is kept out of the fit, and the layer(s) (each layer alone and
    combinations of up to ``max_layers`` layers under ``rule``), window and α that abstain on most held-out forget
    questions while abstaining on at most ``max_false_rate`` of the retain
    questions *of every retain group and rendering* are chosen (:mod:`.calibration`). Without retain data the
    ``"auto"`` fields fall back to the middle layer, α = 1 and the narrowest window that covers every fitted
    rendering (a log line says so).

    Args:
        layers: layer(s) whose key site is checked (negative indices count from the end); ``"auto"``: calibrated;
            ``None``: the middle layer. The fitted config holds the resolved, sorted indices.
        rule: with several layers, abstain when inside at ``"all"`` of them or at ``"any"`` of them (also how
            calibration combines the layers of a candidate set).
        max_layers: with ``layers="auto"`` and calibration data, the largest number of layers (of one key width)
            calibration combines under ``rule`` (1: one layer). On SmolLM2 a pair under ``"all"`` abstained on
            96-99% of held-out GSM8K questions in every rendering where one layer reached 85-89% in the QA template
            and bare, at 0-1% false abstention (README). 3 is slow on deep models (``len(layers) ** 3`` candidates).
        alpha: multiplier of the fitted radius k (> 0), or ``"auto"``. At α = 1 every fitted key is inside.
        window: how many trailing prompt tokens the decision reads (1 = the last token only), or ``"auto"``:
            the widest window (up to ``max_window_slack`` tokens past the fitted renderings' closing tokens)
            whose calibrated forget abstention is within one point of the best; without calibration data, the
            narrowest window covering every fitted rendering.
        max_false_rate: the false-abstention budget of calibration, in (0, 1). A calibrated α keeps the
            calibration's own retain questions within half of it in every retain group (the rest is room for
            retain queries unlike them), so a group of fewer than 100 questions at 0.02 allows none to abstain.
        calibration_fraction: share of the forget questions held out to calibrate, in (0, 1).
        inputs: ``"questions"`` (rendered by the library) or ``"prompts"`` (already formatted).
        chat_template: render questions with the tokenizer's chat template (when it has one).
        system_prompt: also render them with this system prompt in the chat template (``""``: don't). A chat
            message list with its own system turn is rendered with it (``"chat_system"``) and without it
            (``"chat"``); with ``""``, once, as given (``"chat"``).
        templates: more renderings: strings holding ``{question}`` (e.g. ``"Question: {question}\\nAnswer:"``).
        bare_question: render the bare question.
        max_window_slack: how far past the fitted renderings' closing tokens ``window="auto"`` may look.
        eps: floor of the per-dimension standard deviation (> 0).
        action: ``"refuse"`` emits the tokens of ``refusal``, then end-of-sequence; ``"eos"`` ends at once.
        refusal: the refusal message (``action="refuse"``), tokenized without special tokens at fit time.
        recheck_each_token: also check the key vector of every generated token; a row then abstains from the
            first step that falls inside (its partial answer is kept, followed by the refusal).
        calibration: set by ``fit``, not by users: how the fitted values were chosen (held-out counts, the
            forget and false abstention per rendering and retain group at the choice), saved with the method.
    """

    method_type = "key_space_detection"

    layers: Any = AUTO
    rule: str = "all"
    max_layers: int = 2
    alpha: Any = AUTO
    window: Any = AUTO
    max_false_rate: float = 0.02
    calibration_fraction: float = 0.2
    inputs: str = "questions"
    chat_template: bool = True
    system_prompt: str = "You are a helpful assistant."
    templates: tuple[str, ...] = ()
    bare_question: bool = True
    max_window_slack: int = 8
    eps: float = 1e-5
    action: str = "refuse"
    refusal: str = "I can't help with that."
    recheck_each_token: bool = False
    calibration: dict | None = None

    def __post_init__(self) -> None:
        self._set("layers", cfg.auto_or("layers", self.layers, cfg.layer_list))
        self._set("rule", cfg.choice("rule", self.rule, RULES))
        self._set("max_layers", cfg.integer("max_layers", self.max_layers, lo=1, hi=MAX_COMBINED))
        self._set(
            "alpha", cfg.auto_or("alpha", self.alpha, lambda n, v: cfg.positive_float(n, v, cfg.MAX_ALPHA))
        )
        self._set(
            "window", cfg.auto_or("window", self.window, lambda n, v: cfg.integer(n, v, lo=1, hi=MAX_WINDOW))
        )
        self._set("max_false_rate", cfg.fraction("max_false_rate", self.max_false_rate))
        self._set("calibration_fraction", cfg.fraction("calibration_fraction", self.calibration_fraction))
        self._set("inputs", cfg.choice("inputs", self.inputs, INPUTS))
        self._set("chat_template", cfg.flag("chat_template", self.chat_template))
        self._set("system_prompt", cfg.text("system_prompt", self.system_prompt))
        if isinstance(self.templates, str):
            raise ValueError("templates must be a list of strings, not one string.")
        self._set("templates", check_templates(list(self.templates)))
        self._set("bare_question", cfg.flag("bare_question", self.bare_question))
        self._set(
            "max_window_slack", cfg.integer("max_window_slack", self.max_window_slack, lo=0, hi=MAX_WINDOW)
        )
        self._set("eps", cfg.positive_float("eps", self.eps, cfg.MAX_EPS))
        self._set("action", cfg.choice("action", self.action, ACTIONS))
        self._set("refusal", cfg.text("refusal", self.refusal))
        if self.action == "refuse" and not self.refusal.strip():
            raise ValueError("action='refuse' needs a non-empty refusal text (or use action='eos').")
        self._set("recheck_each_token", cfg.flag("recheck_each_token", self.recheck_each_token))
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(f"calibration must be a dict or None, got {type(self.calibration).__name__}.")

    @property
    def is_resolved(self) -> bool:
        """Whether layers, α and window are concrete values (true of every fitted method's config)."""
        return (
            isinstance(self.layers, list) and isinstance(self.alpha, float) and isinstance(self.window, int)
        )
