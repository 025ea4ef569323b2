"""Rendering questions the way the model will meet them, and finding where the question ends in each rendering.

Key Space Detection fits on *questions*, not on one prompt template: every question is rendered in each format
of the config (the bare question, the tokenizer's chat template with and without a system prompt, the user's
``templates``), and the token that ends the question's own text is located in each rendering (through the fast
tokenizer's offsets). The key vector read there depends only on what precedes it (causal attention), so the
template's closing tokens (``\\nAnswer:``, ``<|im_end|>\\n<|im_start|>assistant\\n``) cannot move it; how far
they push the question's end back from the prompt's last token is what the decision's trailing window covers
(:mod:`.decision`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...tokenizing import BosRule, encode_text

QUESTION_FIELD = "{question}"
#: Stands for the question in a second rendering that tells what a format puts after the question (its suffix), so
#: that the question's end is found by position, not by searching for its text (which the format's own text may
#: hold too: a question "Answer" in "Question: {question}\nAnswer:", or "assistant" in a chat prompt).
_SENTINEL = "unlearnhfquestionsentinel"


@dataclass(frozen=True)
class RenderedQuery:
    """One query in one format.

    Attributes:
        input_ids: the prompt's token ids, as ``generate`` would receive them.
        question_end: index in ``input_ids`` of the last token of the question's own text.
        rendering: the format's name (``"bare"``, ``"chat"``, ``"chat_system"``, ``"template_0"``, ...).
    """

    input_ids: list[int]
    question_end: int
    rendering: str

    @property
    def trailing(self) -> int:
        """Tokens after the question's end: the question ends this many positions before the prompt's last."""
        return len(self.input_ids) - 1 - self.question_end


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Validate user templates: strings holding ``{question}`` exactly once."""
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            raise ValueError(f"templates[{i}] must be a string, got {type(t).__name__}.")
        n = t.count(QUESTION_FIELD)
        if n != 1:
            raise ValueError(
                f"templates[{i}] = {t!r} must contain {QUESTION_FIELD} exactly once (found {n})."
            )
    return tuple(templates)


def _as_messages(query: Any, index: int) -> tuple[str, list[dict[str, str]] | None]:
    """``(question, messages or None)`` of a plain question or a chat message list (its last user turn is the
    question)."""
    if isinstance(query, str):
        return query, None
    if isinstance(query, Sequence) and query and all(isinstance(m, Mapping) for m in query):
        messages = [dict(m) for m in query]
        users = [m for m in messages if m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str):
            raise ValueError(f"Query {index}: a chat message list needs a user message with text content.")
        if messages[-1] is not users[-1]:
            raise ValueError(f"Query {index}: the last message must be the user's question.")
        return users[-1]["content"], messages
    raise TypeError(
        f"Query {index} is a {type(query).__name__}; expected a question string or a list of chat messages."
    )


class QueryRenderer:
    """Renders queries in the formats of a Key Space Detection config.

    Args:
        tokenizer: the model's tokenizer (a fast tokenizer locates the question's end exactly through its
            offsets; with a slow one the question's prefix is tokenized on its own).
        inputs: ``"questions"`` (render them) or ``"prompts"`` (already formatted: used as they are, the
            question ending at the prompt's last token).
        chat: render with the tokenizer's chat template (when it has one).
        system_prompt: the system prompt of the ``"chat_system"`` rendering (``""``: no such rendering).
        templates: user templates holding ``{question}``.
        bare: render the bare question.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        inputs: str = "questions",
        chat: bool = True,
        system_prompt: str = "",
        templates: Sequence[str] = (),
        bare: bool = True,
    ) -> None:
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to render questions (pass tokenizer=...).")
        self.tokenizer = tokenizer
        self._bos = BosRule.of(tokenizer)
        self.inputs = inputs
        self.templates = check_templates(templates)
        self.has_chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        self.bare = bare
        if inputs == "questions" and not (bare or self.has_chat or self.templates):
            raise ValueError(
                "No format to render questions in: the tokenizer has no chat template and neither the bare "
                "question nor templates were asked for."
            )

    @property
    def names(self) -> list[str]:
        """The names of the renderings, in order."""
        if self.inputs == "prompts":
            return ["prompt"]
        names = ["bare"] if self.bare else []
        if self.has_chat:
            names.append("chat")
            if self.system_prompt:
                names.append("chat_system")
        names += [f"template_{i}" for i in range(len(self.templates))]
        return names

    def render(self, queries: Sequence[Any]) -> list[list[RenderedQuery]]:
        """Every query in every format: ``result[i]`` holds query ``i``'s renderings.

        Raises:
            ValueError: no queries, a query that is not a question, or a chat template that fails to render
                or drops the question's text.
        """
        if len(queries) == 0:
            raise ValueError("No queries given: Key Space Detection needs at least 2 forget questions.")
        return [self._render_one(q, i) for i, q in enumerate(queries)]

    def _render_one(self, query: Any, index: int) -> list[RenderedQuery]:
        if self.inputs == "prompts":
            if not isinstance(query, str):
                raise TypeError(
                    f"Prompt {index} is a {type(query).__name__}; inputs='prompts' takes strings."
                )
            ids = self._ids(query, special=True)
            if not ids:
                raise ValueError(f"Prompt {index} tokenizes to no tokens.")
            return [RenderedQuery(ids, len(ids) - 1, "prompt")]
        question, messages = _as_messages(query, index)
        if not question.strip():
            raise ValueError(f"Query {index} is an empty question.")
        out = []
        if self.bare:
            out.append(self._locate(question, "", question, "bare", special=True, index=index))
        if self.has_chat:
            msgs = messages or [{"role": "user", "content": question}]
            variants = [("chat", msgs)]
            if self.system_prompt:  # with and without a system turn: the list's own one, else the config's
                own = msgs[0].get("role") == "system"
                system = msgs if own else [{"role": "system", "content": self.system_prompt}, *msgs]
                variants = [("chat", msgs[1:] if own else msgs), ("chat_system", system)]
            for name, msgs in variants:
                text = self._chat(msgs, index, name)
                stand_in = [*msgs[:-1], {**msgs[-1], "content": _SENTINEL}]
                suffix = _after_sentinel(self._chat(stand_in, index, name))
                out.append(self._locate(text, suffix, question, name, special=False, index=index))
        for i, template in enumerate(self.templates):
            text = template.replace(QUESTION_FIELD, question)
            suffix = template[template.index(QUESTION_FIELD) + len(QUESTION_FIELD) :]
            out.append(self._locate(text, suffix, question, f"template_{i}", special=True, index=index))
        return out

    def _chat(self, messages: list[dict[str, str]], index: int, name: str = "chat") -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja errors, templates refusing roles...
            hint = (
                " (a template without system turns: pass system_prompt='')" if name == "chat_system" else ""
            )
            raise ValueError(
                f"Query {index}: the tokenizer's chat template failed to render its {name} rendering{hint}: {err}"
            ) from err
        if not isinstance(text, str):
            raise ValueError(f"Query {index}: the chat template rendered {type(text).__name__}, not text.")
        return text

    def _ids(self, text: str, special: bool) -> list[int]:
        return encode_text(self.tokenizer, text, self._bos, special)

    def _locate(
        self, text: str, suffix: str | None, question: str, name: str, *, special: bool, index: int
    ) -> RenderedQuery:
        """Tokenize ``text`` and find the token holding the last character of ``question`` in it: the last
        non-space character before the format's ``suffix`` (what it puts after any question), when ``text`` ends
        with it; otherwise the last place ``text`` holds the question's text."""
        stripped = question.strip()
        head = (
            text[: len(text) - len(suffix)].rstrip() if suffix is not None and text.endswith(suffix) else None
        )
        if head is not None and head.endswith(stripped):
            end = len(head)  # one past the question's last character
        else:
            start = text.rfind(stripped)
            if start < 0:
                raise ValueError(
                    f"Query {index}: the {name} rendering does not contain the question's text verbatim, so its end "
                    "cannot be located."
                )
            end = start + len(stripped)
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            drop = self._bos.drop(text, ids) if special else 0
            ids, offsets = ids[drop:], offsets[drop:]
            hits = [j for j, (a, b) in enumerate(offsets) if b > a and a < end]
            if not hits:
                raise ValueError(f"Query {index}: no token of the {name} rendering covers the question.")
            return RenderedQuery(ids, hits[-1], name)
        ids = self._ids(text, special)
        head = self._ids(text[:end], special)
        return RenderedQuery(ids, min(len(head), len(ids)) - 1, name)


def _after_sentinel(text: str) -> str | None:
    """What a rendering of the stand-in question puts after it (``None`` when the stand-in is not in it verbatim)."""
    at = text.rfind(_SENTINEL)
    return None if at < 0 else text[at + len(_SENTINEL) :]
