"""The skill registry (:func:`get_skill`) and a skill's probe and evaluation items (:class:`Skill`).

Every skill reads either a local folder laid out like the project's ``shared/data/<name>`` copies (``data_dir``
may be the folder of all skills or the skill's own folder) or, with ``data_dir=None``, the Hugging Face Hub
through ``datasets.load_dataset``. Probing and evaluation use disjoint parts (an evaluation item that repeats a probe item, case and whitespace aside,
is left out):

| skill | probe (fit) | eval |
|---|---|---|
| ``gsm8k`` | train (7,473) | test (1,319) |
| ``mbpp`` | train, task_id 601-974 | test, task_id 11-510 |
| ``humaneval`` | odd positions | even positions |
| ``mmlu`` | odd rows of each subject's test file | even rows (5-shot from the subject's dev rows) |
| ``mlqa-<lang>`` | odd contexts of the dev split | even contexts (questions on one context stay together) |

The skills themselves are described in :mod:`~unlearn_hf.evaluation.skill_specs`, the prompt templates in
:mod:`~unlearn_hf.evaluation.prompts`, the file reading in :mod:`~unlearn_hf.evaluation.data_files` and the
per-skill loaders in :mod:`~unlearn_hf.evaluation.skill_loaders`.
Orders are deterministic (file order; MMLU round-robin over subjects) unless a ``seed`` asks for a shuffle.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from .items import EvalItem
from .skill_loaders import LOADERS
from .skill_specs import SPECS, SkillSpec

logger = logging.getLogger(__name__)


def available_skills() -> list[str]:
    """Names accepted by :func:`get_skill`."""
    return list(SPECS)


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_skill(name: str, data_dir: str | Path | None = None, seed: int | None = None) -> Skill:
    """Return the skill called ``name``.

    Args:
        name: one of :func:`available_skills` (case-insensitive; ``mlqa_de`` is accepted for ``mlqa-de``).
        data_dir: local data: the folder holding all skills' folders or this skill's own folder. ``None``
            downloads from the Hugging Face Hub through ``datasets.load_dataset``.
        seed: shuffle probe and eval orders with this seed; ``None`` keeps the deterministic file order.

    Raises:
        ValueError: unknown skill name (the message lists the known ones).
        FileNotFoundError: ``data_dir`` does not exist.
    """
    key = _normalise_name(name)
    if key not in SPECS:
        raise ValueError(f"Unknown skill {name!r}. Known skills: {', '.join(available_skills())}.")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"Skill data folder {str(data_dir)!r} does not exist or is not a folder.")
    return Skill(SPECS[key], Path(data_dir).expanduser() if data_dir is not None else None, seed)


@dataclass
class Skill:
    """A skill's data: probe items (to fit an unlearning method) and disjoint evaluation items.

    Use :func:`get_skill` to build one. Items are loaded on first use and kept.

    Args:
        spec: the skill's static description.
        data_dir: local data folder, or ``None`` for the Hugging Face Hub.
        seed: optional shuffle seed for both splits.
    """

    spec: SkillSpec
    data_dir: Path | None = None
    seed: int | None = None
    _splits: dict[str, list[EvalItem]] = field(default_factory=dict, init=False, repr=False)
    _dev: dict[str, tuple[EvalItem, ...]] = field(default_factory=dict, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def category(self) -> str:
        return self.spec.category

    # public API -------------------------------------------------------------------------------------------
    def probe_items(self, n: int | None = None) -> list[EvalItem]:
        """The first ``n`` (default all) items of the probe split."""
        return _take(self._split("probe"), n, self.name, "probe")

    def eval_items(self, n: int | None = None) -> list[EvalItem]:
        """The first ``n`` (default all) items of the evaluation split, disjoint from the probe split."""
        return _take(self._split("eval"), n, self.name, "eval")

    def probe_texts(self, n: int | None = None) -> list[str]:
        """Prompt + answer texts of the probe split (for neuron statistics: Neuron Adjust, pruning)."""
        return [item.text for item in self.probe_items(n)]

    def probe_queries(self, n: int | None = None) -> list[str]:
        """Prompts only of the probe split (for Key Space Detection)."""
        return [item.prompt for item in self.probe_items(n)]

    def probe_questions(self, n: int | None = None) -> list[str]:
        """The bare questions of the probe split, without a prompt template (for Key Space Detection, which
        renders them in the formats the model will meet)."""
        return [item.query for item in self.probe_items(n)]

    def probe_pairs(self, n: int | None = None) -> list[dict[str, str]]:
        """``{"prompt", "completion", "text"}`` dicts of the probe split, for prompt/completion token modes."""
        return [
            {"prompt": it.prompt, "completion": it.completion, "text": it.text} for it in self.probe_items(n)
        ]

    def dev_shots(self, subject: str) -> tuple[EvalItem, ...]:
        """MMLU only: the dev examples (5) of ``subject``."""
        if self.spec.name != "mmlu":
            raise ValueError(f"dev_shots is only defined for 'mmlu', not {self.name!r}.")
        self._split("eval")
        if subject not in self._dev:
            raise ValueError(f"Unknown MMLU subject {subject!r}. Known: {', '.join(sorted(self._dev))}.")
        return self._dev[subject]

    # loading ----------------------------------------------------------------------------------------------
    def _split(self, which: str) -> list[EvalItem]:
        if which not in self._splits:
            loader = LOADERS[self.spec.name.split("-")[0]]
            probe, evals, self._dev = loader(self.spec, self.data_dir)
            evals = _without_copies(evals, probe, self.name)
            for items, part in ((probe, "probe"), (evals, "eval")):
                if self.seed is not None:
                    random.Random(f"{self.seed}/{self.name}/{part}").shuffle(items)
            self._splits["probe"], self._splits["eval"] = probe, evals
            logger.debug("Loaded skill %s: %d probe / %d eval items", self.name, len(probe), len(evals))
        return self._splits[which]


def _copy_key(item: EvalItem) -> tuple[str, ...]:
    """What makes two items the same question: their prompt and choices, case and whitespace aside."""
    return tuple(" ".join(t.casefold().split()) for t in (item.prompt, *(item.choices or ())))


def _without_copies(evals: list[EvalItem], probe: list[EvalItem], name: str) -> list[EvalItem]:
    """``evals`` less the items that repeat a probe item (:func:`_copy_key`): a data set's splits can hold copies
    (MMLU's test rows repeat across subjects, three MBPP test tasks are train tasks), and a model fitted on the
    probe items must not be scored on them."""
    seen = {_copy_key(it) for it in probe}
    kept = [it for it in evals if _copy_key(it) not in seen]
    if len(kept) < len(evals):
        logger.info(
            "Skill %s: %d evaluation items repeat a probe item; left out.", name, len(evals) - len(kept)
        )
    return kept


def _take(items: list[EvalItem], n: int | None, name: str, part: str) -> list[EvalItem]:
    if n is None:
        return list(items)
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}.")
    if n > len(items):
        logger.warning("Skill %s: asked for %d %s items, only %d exist.", name, n, part, len(items))
    return list(items[:n])
