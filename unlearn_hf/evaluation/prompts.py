"""Prompt templates of the skills.

One template everywhere: prompt ``"Question: {question}\\nAnswer:"`` followed by ``" {answer}"``. MLQA puts
``"Context: {context}\\n"`` in front; HumanEval uses the raw function prompt continued by the canonical
solution.
The few-shot MMLU prompt built on top of these is :func:`unlearn_hf.evaluation.multiple_choice.mmlu_prompt`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .items import EvalItem

#: How the evaluation sends a question: ``"qa"`` (the template below) or ``"chat"`` (the tokenizer's chat
#: template around the bare question, as ``pipeline`` and lm-eval's ``apply_chat_template`` do).
PROMPT_FORMATS = ("qa", "chat")

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MLQA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    """``question`` in :data:`PROMPT_TEMPLATE`."""
    return PROMPT_TEMPLATE.format(question=question)


def mlqa_prompt(context: str, question: str) -> str:
    """``context`` and ``question`` in :data:`MLQA_TEMPLATE`."""
    return MLQA_TEMPLATE.format(context=context, question=question)


def render_item(item: EvalItem, tokenizer: Any, prompt_format: str) -> EvalItem:
    """``item`` with its prompt in ``prompt_format``: ``"qa"`` keeps it; ``"chat"`` sends the bare question
    (:attr:`EvalItem.query`) as one user message through the tokenizer's chat template, the answer following
    the assistant header directly.

    Raises:
        ValueError: an unknown format, or ``"chat"`` with a tokenizer that has no chat template.
    """
    if prompt_format == "qa":
        return item
    if prompt_format != "chat":
        raise ValueError(f"Unknown prompt format {prompt_format!r}; choose from {PROMPT_FORMATS}.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template: the 'chat' prompt format needs one.")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": item.query}], tokenize=False, add_generation_prompt=True
    )
    return dataclasses.replace(item, prompt=text, answer_sep="")
