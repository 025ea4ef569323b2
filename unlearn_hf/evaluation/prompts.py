"""Prompt templates of the skills.

One template everywhere: prompt ``"Question: {question}\\nAnswer:"`` followed by ``" {answer}"``. MLQA puts
``"Context: {context}\\n"`` in front; HumanEval uses the raw function prompt continued by the canonical
solution.
The few-shot MMLU prompt built on top of these is :func:`unlearn_hf.evaluation.multiple_choice.mmlu_prompt`.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MLQA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    """``question`` in :data:`PROMPT_TEMPLATE`."""
    return PROMPT_TEMPLATE.format(question=question)


def mlqa_prompt(context: str, question: str) -> str:
    """``context`` and ``question`` in :data:`MLQA_TEMPLATE`."""
    return MLQA_TEMPLATE.format(context=context, question=question)
