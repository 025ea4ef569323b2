"""The script ``tests/test_distributed.py`` runs under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py <fit|failure> <workdir>``

``workdir`` holds ``model/`` and ``tokenizer/`` (saved by the test) and ``data.json``. Each rank writes
``rank<r>.safetensors`` (fit) or ``rank<r>.json`` (failure) there; nothing is pickled.
The fits themselves are :func:`run_fits`, which the test also runs in a single process for the reference.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.data import DataSpec
from unlearn_hf.stats import SiteStatistics

BATCH_SIZE = 4
MAX_LENGTH = 64


def token_batches(data: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The tokenized batches of ``data["token_batches"]``: rows of token ids, left or right padded."""
    out = []
    for b in data["token_batches"]:
        width = max(len(r) for r in b["rows"])
        ids = torch.full((len(b["rows"]), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(b["rows"]):
            sl = slice(width - len(row), width) if b["left"] else slice(0, len(row))
            ids[i, sl] = torch.tensor(row)
            mask[i, sl] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def flatten_stats(prefix: str, stats: SiteStatistics) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in stats.layers.items():
        p = f"{prefix}.{i}"
        out.update({f"{p}.mean": st.mean, f"{p}.m2": st.m2, f"{p}.abs_sum": st.abs_sum})
        out[f"{p}.count"] = torch.tensor([st.count], dtype=torch.int64)
        if st.track_extremes:
            out.update({f"{p}.min": st.minimum, f"{p}.max": st.maximum})
    return out


def run_fits(model, tokenizer, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """NA, SP and KSD fits and a few raw probes; returns every fitted tensor and statistic, flat.

    Distribution is left to the default (detected from the process group), so the same function gives the
    single-process reference (no process group) and the data-parallel result (under torchrun).
    """

    out: dict[str, torch.Tensor] = {}
    rows = [0]  # rows this process ran through the model, to check that the work was split
    counter = model.get_input_embeddings().register_forward_pre_hook(
        lambda mod, args: rows.__setitem__(0, rows[0] + args[0].shape[0])
    )
    try:
        _fits(model, tokenizer, data, out)
    finally:
        counter.remove()
    out["rows_seen"] = torch.tensor(rows[0], dtype=torch.int64)
    return out


def _fits(model, tokenizer, data: dict[str, Any], out: dict[str, torch.Tensor]) -> None:
    from datasets import Dataset

    unlearned = UnlearnedModelForCausalLM.from_base(model)
    kw = dict(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, show_progress=False)
    na = unlearned.fit(
        NeuronAdjustConfig(ratio=0.05, deterministic=True), data["forget"], data["retain"], tokenizer, **kw
    )
    sp = unlearned.fit(
        SelectivePruningConfig(ratio=0.05, tokens="completion"),
        data["forget_pairs"],
        Dataset.from_list(data["retain_pairs"]),  # sharded with Dataset.select
        tokenizer,
        prompt_column="prompt",
        completion_column="completion",
        **kw,
    )
    ksd = unlearned.fit(KeySpaceDetectionConfig(layers=[0, 1]), data["queries"], None, tokenizer, **kw)
    # the passes a fit makes after its probe: ratio="auto"'s held-out scoring and KSD's calibration
    auto = unlearned.fit(
        NeuronAdjustConfig(
            ratio="auto", deterministic=True, ratio_grid=[0.01, 0.05, 0.2], max_retain_drop=0.5
        ),
        data["auto_forget"],
        data["auto_retain"],
        tokenizer,
        name="auto",
        **kw,
    )
    calibrated = unlearned.fit(
        KeySpaceDetectionConfig(max_layers=1, max_false_rate=0.5),
        data["queries"],
        data["retain_questions"],
        tokenizer,
        name="calibrated",
        **kw,
    )
    for name, method in (("na", na), ("sp", sp), ("ksd", ksd), ("auto", auto), ("calibrated", calibrated)):
        out.update({f"{name}.{k}": v for k, v in method.state_dict().items()})
    unlearned.remove_all_methods()

    spec = DataSpec(batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
    both = probe(model, data["forget"], tokenizer, site=("pre", "key"), spec=spec, show_progress=False)
    for kind, st in both.items():
        out.update(flatten_stats(f"probe.{kind}", st))
    batches = token_batches(data)
    out.update(flatten_stats("batches", probe(model, batches, site="key", mode="last", show_progress=False)))
    gen: Iterator = iter(batches[:3])  # a generator of unknown length: sharded by batch index
    out.update(flatten_stats("generator", probe(model, gen, site="pre", show_progress=False)))
    one = probe(model, data["queries"][:1], tokenizer, site="key", spec=spec, show_progress=False)
    out.update(flatten_stats("single", one))  # one batch only: rank 1 probes nothing


def _fit(workdir: Path, rank: int) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_hf.distributed import all_reduce_statistics, distributed_probing

    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    data = json.loads((workdir / "data.json").read_text())
    out = run_fits(model, tokenizer, data)
    # The opt-out: each rank probes only its own part here, then the parts are all-reduced explicitly.
    own = data["forget"][rank::2]
    spec = DataSpec(batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
    local = probe(model, own, tokenizer, site="pre", spec=spec, show_progress=False, distributed=False)
    out.update(flatten_stats("local", local))
    out.update(flatten_stats("reduced", all_reduce_statistics(local)))
    with distributed_probing(False):  # a whole fit without collectives, on this rank's part only
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        ksd = unlearned.fit(KeySpaceDetectionConfig(layers=[1]), own, None, tokenizer, show_progress=False)
        out.update({f"local_ksd.{k}": v for k, v in ksd.state_dict().items()})
        unlearned.remove_all_methods()
    save_file({k: v.contiguous() for k, v in out.items()}, str(workdir / f"rank{rank}.safetensors"))
    dist.barrier()


def _record(fn) -> dict[str, Any]:
    try:
        fn()
    except Exception as err:  # the test checks what every rank raised
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None, "message": ""}


def _failure(workdir: Path, rank: int) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    data = json.loads((workdir / "data.json").read_text())
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    results: dict[str, Any] = {}

    # 1. A bad example (not text), found during a fit (on every rank: each reads all examples to plan batches).
    bad = list(data["forget"])
    bad[data["bad_index"]] = None
    results["bad_example"] = _record(
        lambda: unlearned.fit(NeuronAdjustConfig(), bad, data["retain"], tokenizer, batch_size=BATCH_SIZE)
    )
    # 2. A token id outside the vocabulary in a tokenized batch that only rank 0 reads.
    batches = token_batches(data)
    batches[2]["input_ids"][0, -1] = model.config.vocab_size + 5
    results["bad_token"] = _record(lambda: probe(model, batches, site="pre", show_progress=False))
    # 3. The ranks disagree about what to probe.
    results["mismatch"] = _record(
        lambda: probe(model, batches[:2], site="pre", layers=[rank], show_progress=False)
    )
    # 3b. Ranks given different data (each must be given all of it, in one order): a per-rank split of the texts, a
    # per-rank order, one example fewer, and tokenized batches that differ; a review found them all accepted.
    texts = list(data["forget"])
    for name, mine in (
        ("split", texts[rank::2]),
        ("order", texts if rank == 0 else texts[::-1]),
        ("fewer", texts[: len(texts) - rank]),
    ):
        results[f"data_{name}"] = _record(
            lambda mine=mine: probe(
                model, mine, tokenizer, site="pre", spec=DataSpec(batch_size=2), show_progress=False
            )
        )
    other = token_batches(data)
    other[0]["input_ids"][0, 0] = (other[0]["input_ids"][0, 0] + rank) % model.config.vocab_size
    results["data_batches"] = _record(lambda: probe(model, other, site="pre", show_progress=False))
    # a stream of batches already split per rank (a DistributedSampler's DataLoader, a per-rank generator): it was
    # sharded a second time, each rank probing half of its half, and merged without a word (a review)
    mine = token_batches(data)[rank::2]
    results["data_stream"] = _record(lambda: probe(model, iter(mine), site="pre", show_progress=False))
    # 4. A stream of batches that is empty on every rank: the same error as on one process.
    results["empty"] = _record(lambda: probe(model, iter([]), site="pre", show_progress=False))
    # 4b. A failure in ratio="auto"'s held-out scoring (after the probe's exchange), on rank 0 only: a token id
    # outside the vocabulary in rank 0's first held-out batch. Rank 1 must not wait for rank 0's counts forever.
    import unlearn_hf.methods.ratio_search as ratio_search

    real = ratio_search.iter_token_batches

    def poisoned(*args, **kwargs):
        n, batches = real(*args, **kwargs)

        def gen():
            for i, b in enumerate(batches):
                if i == 0:
                    b.input_ids[0, -1] = model.config.vocab_size + 5
                yield b

        return n, gen()

    ratio_search.iter_token_batches = poisoned if rank == 0 else real
    try:
        results["scoring"] = _record(
            lambda: unlearned.fit(
                NeuronAdjustConfig(ratio="auto"), data["auto_forget"], data["auto_retain"], tokenizer
            )
        )
    finally:
        ratio_search.iter_token_batches = real
    # 5. The process group still works after the failures.
    counts = {}
    results["after"] = _record(
        lambda: counts.setdefault(
            "n", probe(model, token_batches(data), site="pre", show_progress=False).count
        )
    )
    results["after"]["count"] = counts.get("n")
    assert not unlearned.methods, "a failed fit left a method attached"
    (workdir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    scenario, workdir = argv[0], Path(argv[1])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    try:
        {"fit": _fit, "failure": _failure}[scenario](workdir, dist.get_rank())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
