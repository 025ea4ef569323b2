"""What :class:`~.model.UnlearnedLM` returns to lm-eval: its usual values, each carrying whether the request
abstained.

lm-eval stores a model's responses unchanged on its ``Instance`` objects (``Instance.resps``) before any filter
runs, so these markers reach :mod:`.scoring`, which decides the documents' scores from them. Anywhere else they
behave as the plain ``tuple`` / ``float`` / ``str`` lm-eval expects (JSON writes them as such).
"""

from __future__ import annotations

from typing import Any


class LoglikelihoodResult(tuple):
    """``(log-probability, is_greedy)`` of a continuation; an abstained request is ``(-inf, False)``: the model
    answers the refusal, under which the continuation has probability zero."""

    abstained: bool

    def __new__(cls, logprob: float, is_greedy: bool, abstained: bool) -> LoglikelihoodResult:
        out = super().__new__(cls, (float(logprob), bool(is_greedy)))
        out.abstained = bool(abstained)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self[0], self[1], self.abstained))


class RollingResult(float):
    """The log-probability of a whole text (``loglikelihood_rolling``); ``-inf`` when the model abstains on it."""

    abstained: bool

    def __new__(cls, logprob: float, abstained: bool = False) -> RollingResult:
        out = super().__new__(cls, logprob)
        out.abstained = bool(abstained)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (float(self), self.abstained))


class GenerationResult(str):
    """A generated text; for an abstained request, the refusal the model emits. (lm-eval builds values of the
    response's type from other text, e.g. the gold answer: those are not abstained.)"""

    abstained: bool

    def __new__(cls, text: str, abstained: bool = False) -> GenerationResult:
        out = super().__new__(cls, text)
        out.abstained = bool(abstained)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.abstained))


MARKERS = (LoglikelihoodResult, RollingResult, GenerationResult)


def abstained_of(response: Any) -> bool | None:
    """Whether ``response`` comes from an abstaining request: ``True`` / ``False`` for the values of
    :class:`~.model.UnlearnedLM`, ``None`` for any other model's."""
    return response.abstained if isinstance(response, MARKERS) else None
