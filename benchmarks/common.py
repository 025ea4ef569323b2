"""Timing helpers shared by the speed benchmarks: bare vs unlearned tokens per second.

The bare model and every variant run in turn within each repeat, the order reversing from one repeat to the next
(bare, A, B, then B, A, bare, ...), so that a noisy or shared machine slows them alike. Each variant's methods
are attached only while it runs: the bare runs, and the other variants, see no hooks at all. The report gives
median tokens/s and the median of the per-repeat ratios variant / bare (each ratio compares runs made next to
each other in time), with the smallest and largest ratio, also end to end and per second of CPU time.

Usage (see ``benchmarks/decode_speed.py``)::

    variants = fit_variants(model, tok, [("NA 0.03", NeuronAdjustConfig(ratio=0.03))], forget, retain)
    cases = [SpeedCase("decode b1", "generate", batch_size=1), SpeedCase("forward 512", "forward", seq_len=512)]
    results = compare_speed(model, variants, cases, token_stream(tok, texts), repeats=5)
    print(format_results(results))
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from unlearn_hf import MethodConfig, UnlearnedModelForCausalLM, UnlearningMethod

KINDS = ("generate", "forward")


@dataclass(frozen=True)
class SpeedCase:
    """One timed workload.

    Args:
        name: label in the report.
        kind: ``"generate"``: ``batch_size`` prompts of ``prompt_len`` tokens (no padding), ``new_tokens`` greedy
            tokens with ``min_new_tokens = max_new_tokens`` so every run makes the same number; the speed is the
            decode rate after the prefill (tokens of all rows / time from the first logits to the end), the
            end-to-end rate is reported too. ``"forward"``: one forward without cache over ``batch_size`` rows
            of ``seq_len`` tokens; the speed is tokens / time.
        batch_size / new_tokens / prompt_len / seq_len: the sizes.
    """

    name: str
    kind: str
    batch_size: int = 1
    new_tokens: int = 64
    prompt_len: int = 32
    seq_len: int = 512

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        if min(self.batch_size, self.new_tokens, self.prompt_len, self.seq_len) < 1:
            raise ValueError(f"Sizes must be >= 1: {self}.")
        if self.kind == "generate" and self.new_tokens < 2:
            raise ValueError("A decode rate needs new_tokens >= 2.")


@dataclass
class Variant:
    """An unlearned model to time against the bare model.

    Args:
        name: label in the report.
        model: the :class:`UnlearnedModelForCausalLM` (over the bare model's modules).
        methods: its methods (name -> fitted method), attached, in this order, only while it runs.
        call_base: time the *bare* model while the methods are attached: the cost their idle (gated) hooks add
            to the plain model.
    """

    name: str
    model: UnlearnedModelForCausalLM
    methods: dict[str, UnlearningMethod]
    call_base: bool = False

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """Attach the methods, yield the model to call, detach them."""
        for n, m in self.methods.items():
            self.model.add_method(n, m)
        try:
            yield self.model.get_base_model() if self.call_base else self.model
        finally:
            self.model.remove_all_methods()


def detach_all(unlearned: UnlearnedModelForCausalLM) -> dict[str, UnlearningMethod]:
    """Remove every method from ``unlearned`` and return them (name -> method, in attachment order)."""
    methods = dict(unlearned.methods)
    unlearned.remove_all_methods()
    return methods


def variant_of(name: str, unlearned: UnlearnedModelForCausalLM, call_base: bool = False) -> Variant:
    """A :class:`Variant` holding the methods now attached to ``unlearned`` (which are detached)."""
    return Variant(name, unlearned, detach_all(unlearned), call_base)


def fit_variants(
    model: Any,
    tokenizer: Any,
    configs: Sequence[tuple[str, MethodConfig | Sequence[MethodConfig]]],
    forget: Any,
    retain: Any = None,
    **fit_kwargs: Any,
) -> list[Variant]:
    """Fit each ``(name, config or list of configs)`` on its own wrapper over ``model`` and return the variants.

    ``forget``/``retain`` (and ``fit_kwargs``, e.g. ``batch_size``, ``max_length``, ``show_progress``) go to
    :meth:`UnlearnedModelForCausalLM.fit`; pass ``forget``/``retain`` as ``{method_type: data}`` to give each
    method type its own data (e.g. queries for Key Space Detection, precomputed statistics).
    """

    def pick(data: Any, config: MethodConfig) -> Any:
        if isinstance(data, Mapping) and config.method_type in data:
            return data[config.method_type]
        return data

    variants = []
    for name, cfgs in configs:
        cfgs = [cfgs] if isinstance(cfgs, MethodConfig) else list(cfgs)
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        for k, cfg in enumerate(cfgs):
            unlearned.fit(
                cfg,
                pick(forget, cfg),
                pick(retain, cfg),
                tokenizer,
                name=f"{cfg.method_type}_{k}",
                **fit_kwargs,
            )
        variants.append(variant_of(name, unlearned))
    return variants


def token_stream(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token ids of ``texts`` one after the other (without special tokens): material for :func:`make_batch`."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("The texts gave no tokens.")
    return ids


def make_batch(stream: Sequence[int], case: SpeedCase) -> dict[str, torch.Tensor]:
    """``batch_size`` rows of consecutive tokens of ``stream`` (``prompt_len`` or ``seq_len`` each; the stream is
    repeated if too short), with an all-ones attention mask."""
    width = case.prompt_len if case.kind == "generate" else case.seq_len
    need = case.batch_size * width
    reps = -(-need // len(stream))
    flat = torch.tensor((list(stream) * reps)[:need], dtype=torch.long)
    ids = flat.view(case.batch_size, width)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class PrefillClock(LogitsProcessor):
    """Records when the first logits arrive (the prefill is then done): wall clock and process CPU time."""

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())
        return scores


#: What :func:`run_case` measures: tokens per wall-clock second (decode only, for ``generate``), end to end
#: (prefill included), and per second of this process's CPU time (decode only): the CPU-time rate is far less
#: sensitive to other processes on a shared machine, though not to their effect on caches.
METRICS = ("tok/s", "e2e tok/s", "cpu tok/s")


@torch.no_grad()
def run_case(
    model: Any, batch: dict[str, torch.Tensor], case: SpeedCase, pad_token_id: int | None = None
) -> dict[str, float]:
    """Run ``case`` once on ``model``; return its rates (see :data:`METRICS`)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if case.kind == "forward":
        wall, cpu = time.perf_counter(), time.process_time()
        model(**batch, use_cache=False)
        n = case.batch_size * case.seq_len
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"tok/s": n / wall, "e2e tok/s": n / wall, "cpu tok/s": n / cpu}
    clock = PrefillClock()
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=case.new_tokens,
        min_new_tokens=case.new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        logits_processor=LogitsProcessorList([clock]),
    )
    end, end_cpu = time.perf_counter(), time.process_time()
    made = out.shape[1] - case.prompt_len
    if made != case.new_tokens:
        raise RuntimeError(f"{case.name}: generated {made} tokens, expected {case.new_tokens}.")
    decoded = case.batch_size * (case.new_tokens - 1)
    return {
        "tok/s": decoded / (end - clock.first[0]),
        "e2e tok/s": case.batch_size * case.new_tokens / (end - start),
        "cpu tok/s": decoded / (end_cpu - clock.first[1]),
    }


@dataclass
class SpeedResult:
    """Per-repeat rates (see :data:`METRICS`) of the bare model and one variant on one case, paired by repeat."""

    case: SpeedCase
    variant: str
    bare: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    unlearned: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})

    def ratios(self, metric: str = "tok/s") -> list[float]:
        return [u / b for u, b in zip(self.unlearned[metric], self.bare[metric])]

    def ratio(self, metric: str = "tok/s") -> float:
        """Median of the per-repeat ratios variant / bare."""
        return statistics.median(self.ratios(metric))

    def ratio_of_medians(self, metric: str = "tok/s") -> float:
        return statistics.median(self.unlearned[metric]) / statistics.median(self.bare[metric])

    def median(self, which: str = "unlearned", metric: str = "tok/s") -> float:
        return statistics.median(getattr(self, which)[metric])


def compare_speed(
    model: Any,
    variants: Sequence[Variant],
    cases: Sequence[SpeedCase],
    stream: Sequence[int],
    *,
    repeats: int = 5,
    warmup: int = 1,
    pad_token_id: int | None = None,
    log: Any = None,
) -> list[SpeedResult]:
    """Time ``model`` (bare) and each variant on each case, interleaved; return one result per (case, variant).

    Args:
        model: the bare base model (no methods may be attached to it while this runs).
        variants: what to compare (see :class:`Variant`, :func:`fit_variants`).
        cases: the workloads.
        stream: token ids the inputs are cut from (:func:`token_stream`).
        repeats: timed rounds; warmup: untimed rounds first.
        pad_token_id: passed to ``generate`` (avoids its warning).
        log: optional ``print``-like callable for progress lines.
    """
    if isinstance(model, UnlearnedModelForCausalLM):
        model = model.get_base_model()
    results = {(c.name, v.name): SpeedResult(c, v.name) for c in cases for v in variants}
    batches = {c.name: make_batch(stream, c) for c in cases}
    runners: list[Variant | None] = [None, *variants]  # None = the bare model
    for r in range(warmup + repeats):
        order = runners if r % 2 == 0 else runners[::-1]
        for case in cases:
            rates: dict[str | None, dict[str, float]] = {}
            for v in order:
                gc.collect()
                if v is None:
                    rates[None] = run_case(model, batches[case.name], case, pad_token_id)
                else:
                    with v.active() as target:
                        rates[v.name] = run_case(target, batches[case.name], case, pad_token_id)
            if r < warmup:
                continue
            for v in variants:
                res = results[(case.name, v.name)]
                for m in METRICS:
                    res.bare[m].append(rates[None][m])
                    res.unlearned[m].append(rates[v.name][m])
            if log is not None:
                parts = ", ".join(
                    f"{v.name} {rates[v.name]['tok/s'] / rates[None]['tok/s']:.3f} "
                    f"(cpu {rates[v.name]['cpu tok/s'] / rates[None]['cpu tok/s']:.3f})"
                    for v in variants
                )
                log(
                    f"  repeat {r - warmup + 1}/{repeats} {case.name}: bare {rates[None]['tok/s']:.1f} tok/s; {parts}"
                )
    return list(results.values())


def format_results(results: Sequence[SpeedResult]) -> str:
    """A plain-text table: median tokens/s (wall clock; decode only for ``generate``), the median paired ratio
    variant / bare with its range, the ratio of medians, and the median paired ratios end to end (``e2e``) and
    per CPU second (``cpu``)."""
    head = (
        f"{'case':<16} {'variant':<30} {'bare tok/s':>10} {'tok/s':>8} {'ratio':>7} {'(min..max)':>13} "
        f"{'med/med':>8} {'e2e':>6} {'cpu':>6}"
    )
    lines = [head, "-" * len(head)]
    for res in results:
        ratios = res.ratios()
        e2e = f"{res.ratio('e2e tok/s'):6.3f}" if res.case.kind == "generate" else f"{'':>6}"
        lines.append(
            f"{res.case.name:<16} {res.variant:<30} {res.median('bare'):>10.1f} {res.median():>8.1f} "
            f"{res.ratio():>7.3f} {f'({min(ratios):.3f}..{max(ratios):.3f})':>13} {res.ratio_of_medians():>8.3f} "
            f"{e2e} {res.ratio('cpu tok/s'):6.3f}"
        )
    return "\n".join(lines)
