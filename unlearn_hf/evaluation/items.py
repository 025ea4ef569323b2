"""One evaluation example (:class:`EvalItem`): a prompt, its reference answer, and what task metrics need."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Where a generated answer ends by default: the template's next question.
ANSWER_STOP = ("\nQuestion:",)


@dataclass(frozen=True)
class EvalItem:
    """One example: a prompt and its reference answer, plus what the task-specific metrics need.

    Args:
        prompt: the text the model sees (ends with ``"Answer:"`` except for HumanEval).
        answer: the reference answer, without the separator.
        id: stable identifier (``"<skill>/<split>/<key>"``).
        answer_sep: text between prompt and answer (``" "``; ``""`` for HumanEval).
        choices / label / subject / shots: multiple choice (MMLU): the options, the index of the right one,
            the subject, and the few-shot dev examples of that subject.
        program_prefix / test_code: code execution (MBPP, HumanEval): the program run is
            ``program_prefix + completion + "\\n\\n" + test_code``.
        question: the question's own text, without any prompt template (what a user would type or send as a
            chat message); :attr:`query` falls back to ``prompt`` when it is empty.
        stop: strings that end a generated answer (:func:`~unlearn_hf.evaluation.generate_completions` cuts there):
            the next ``"\nQuestion:"`` of the template; for HumanEval, a line that leaves the function body
            (``"\ndef"``, ``"\nclass"``, ``"\nif"``, ``"\nprint"``, ``"\n#"``, as in the Codex paper's
            evaluation).
    """

    prompt: str
    answer: str
    id: str = ""
    answer_sep: str = " "
    choices: tuple[str, ...] | None = None
    label: int | None = None
    subject: str | None = None
    shots: tuple[EvalItem, ...] = field(default=(), repr=False)
    program_prefix: str = field(default="", repr=False)
    test_code: str | None = field(default=None, repr=False)
    question: str = field(default="", repr=False)
    stop: tuple[str, ...] = field(default=ANSWER_STOP, repr=False)

    @property
    def query(self) -> str:
        """The bare question (or the prompt, for items without one)."""
        return self.question or self.prompt

    @property
    def completion(self) -> str:
        """The text appended to the prompt: ``answer_sep + answer``."""
        return self.answer_sep + self.answer

    @property
    def text(self) -> str:
        """Prompt and answer together, as used for teacher forcing and neuron statistics."""
        return self.prompt + self.completion
