"""Data-parallel fitting: ``torchrun --nproc_per_node 2`` (gloo, CPU) against the single-process fit.

The workers (``tests/dist_worker.py``) write their fitted tensors with safetensors; this process computes the
single-process reference without any process group and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_data import REPO_ROOT, read_jsonl
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM, merge, probe
from unlearn_hf.data import DataSpec, iter_token_batches
from unlearn_hf.distributed import (
    DistributedProbeError,
    all_reduce_statistics,
    distributed_probing,
    get_rank,
    get_world_size,
    is_main_process,
    resolve_distributed,
)
from unlearn_hf.sharding import shard_batch_indices

WORKER = Path(__file__).with_name("dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import dist_worker  # noqa: E402

N_PROCS = 2
TIMEOUT_S = 240


def torchrun(scenario: str, workdir: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(N_PROCS),
        # the rendezvous binds a free port itself: a port picked here first could be taken by another test meanwhile
        "--standalone",
        str(WORKER),
        scenario,
        str(workdir),
    ]
    # A hang (a rank waiting for a collective that never comes) ends here as a test failure, not a stuck suite.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO_ROOT)


def own_continuations(model, tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt followed by the model's own greedy continuation: texts a random model partly predicts, so that
    ``ratio="auto"`` has a retain accuracy to lose."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids[:, :12]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def build_data(shared: Path, tokenizer, model) -> dict:
    gsm = read_jsonl(shared / "gsm8k" / "test.jsonl")
    mbpp = read_jsonl(shared / "mbpp" / "mbpp.jsonl")
    code = [m["code"].replace("\r\n", "\n") for m in mbpp]
    ids = [tokenizer(m["text"])["input_ids"][:20] for m in mbpp[40:52]]
    sizes, rows, batches = [3, 1, 2, 4, 2], iter(ids), []
    for n, size in enumerate(sizes):  # odd number of batches, uneven sizes, both padding sides
        batches.append({"rows": [next(rows) for _ in range(size)], "left": n % 2 == 0})
    return {
        "forget": [f"Question: {g['question']}\nAnswer: {g['answer']}" for g in gsm[:13]],
        "retain": [f"{m['text']}\n{c}" for m, c in zip(mbpp[:11], code)],
        "forget_pairs": [
            {"prompt": f"Question: {g['question']}\nAnswer:", "completion": " " + g["answer"]}
            for g in gsm[13:22]
        ],
        "retain_pairs": [
            {"prompt": m["text"] + "\n", "completion": c} for m, c in zip(mbpp[11:18], code[11:18])
        ],
        "queries": [f"Question: {g['question']}\nAnswer:" for g in gsm[22:37]],
        "retain_questions": [m["text"] for m in mbpp[60:72]],
        "auto_forget": own_continuations(model, tokenizer, [g["question"] for g in gsm[40:52]]),
        "auto_retain": own_continuations(model, tokenizer, [m["text"] for m in mbpp[80:92]]),
        "token_batches": batches,
        "bad_index": 5,  # a bad example: found on every rank (each reads all examples to plan the batches)
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smol_tokenizer, shared_data) -> Path:
    d = tmp_path_factory.mktemp("distributed")
    model = tiny_llama()
    model.save_pretrained(d / "model")
    smol_tokenizer.save_pretrained(d / "tokenizer")
    (d / "data.json").write_text(json.dumps(build_data(shared_data, smol_tokenizer, model)))
    return d


@pytest.fixture(scope="module")
def loaded(workdir):
    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    return model, tokenizer, json.loads((workdir / "data.json").read_text())


def single_thread(fn, *args, **kwargs):
    """Run ``fn`` with one intra-op thread, as the workers do, so float32 activations are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_matches(got: dict, ref: dict, keys) -> None:
    for key in keys:
        a, b = got[key], ref[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if b.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
        elif b.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(a, b), f"{key}: {a} != {b}"


class CharTokenizer:
    """A tokenizer stub: one token per character, ids = code points."""

    pad_token, eos_token, pad_token_id = "\0", "\0", 0
    truncation_side, padding_side = "right", "right"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


# -- sharding (no processes needed) ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch, world", [(13, 4, 2), (1, 4, 2), (7, 2, 3), (9, 3, 4), (5, 1, 5)])
def test_text_shards_cover_every_example_once_in_the_single_process_batches(n, batch, world):
    texts = [f"example {i} " + "word " * (i % 5) for i in range(n)]
    spec = DataSpec(batch_size=batch, max_length=32)

    def rows_of(batches):
        return [
            tuple(b.input_ids[r][b.attention_mask[r].bool()].tolist())
            for b in batches
            for r in range(len(b.input_ids))
        ]

    _, full = iter_token_batches(texts, CharTokenizer(), spec=spec)
    full_batches = [rows_of([b]) for b in full]
    per_rank = []
    for rank in range(world):
        count, it = iter_token_batches(texts, CharTokenizer(), spec=spec, shard=(rank, world))
        batches = [rows_of([b]) for b in it]
        assert count == sum(len(b) for b in batches)
        # the rank's batches are exactly the single-process batches rank, rank + world, ...
        assert batches == [full_batches[i] for i in range(rank, len(full_batches), world)]
        per_rank.append(batches)
    flat = sorted(r for batches in per_rank for b in batches for r in b)
    assert flat == sorted(tuple(ord(c) for c in t) for t in texts)


def test_tokenized_batches_and_generators_shard_by_batch_index():
    batches = [{"input_ids": torch.full((i % 3 + 1, 4), i)} for i in range(7)]
    prints = set()
    for world in (1, 2, 3, 8):
        seen = []
        for rank in range(world):
            n, it = iter_token_batches(batches, shard=(rank, world))
            ids = [int(b.input_ids[0, 0]) for b in it]
            assert ids == list(shard_batch_indices(7, rank, world)) == list(range(rank, 7, world))
            assert n == sum(i % 3 + 1 for i in ids)
            n_gen, gen = iter_token_batches(iter(batches), shard=(rank, world))
            assert n_gen is None and [int(b.input_ids[0, 0]) for b in gen] == ids
            prints.add(gen.fingerprint)  # the whole stream's, once it is exhausted: the same on every rank
            _, split = iter_token_batches(iter(batches[rank::world]), shard=(rank, world))
            list(split)
            if world > 1:  # a stream that is already one rank's share tells itself apart
                assert split.fingerprint != gen.fingerprint
            seen += ids
        assert sorted(seen) == list(range(7)) and len(prints) == 1


def test_bad_example_errors_name_the_global_index_on_every_rank():
    texts = [f"text {i}" for i in range(10)]
    texts[6] = 42
    for rank in range(2):  # the batches are planned over all examples, so every rank reads (and refuses) it
        with pytest.raises(TypeError, match="Example 6 "):
            iter_token_batches(texts, CharTokenizer(), spec=DataSpec(batch_size=2), shard=(rank, 2))


def test_bad_shards_are_refused():
    for shard in [(2, 2), (-1, 2), (0, 0), ("a", 2), (0,)]:
        with pytest.raises(ValueError, match="shard"):
            iter_token_batches(["x"], object(), shard=shard)


def test_without_a_process_group():
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    assert resolve_distributed(None) is False and resolve_distributed(False) is False
    with pytest.raises(ValueError, match="process group"):
        resolve_distributed(True)
    with distributed_probing(True), pytest.raises(ValueError, match="process group"):
        probe(tiny_llama(), [{"input_ids": torch.ones(1, 3, dtype=torch.long)}])


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of world size 1 in this process, destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_process_group_is_detected_and_can_be_opted_out_of(one_process_group):
    model = tiny_llama()
    batches = [{"input_ids": torch.randint(0, 1000, (n, 6))} for n in (3, 1, 2)]
    assert resolve_distributed(None) is True and resolve_distributed(False) is False
    with distributed_probing(False):
        assert resolve_distributed(None) is False
        local = probe(model, batches, site="key", mode="last", show_progress=False)
    auto = probe(model, batches, site="key", mode="last", show_progress=False)  # through the collectives
    for i, st in local.layers.items():
        got = auto.layers[i]
        assert got.count == st.count == 6
        for name in ("mean", "m2", "abs_sum", "minimum", "maximum"):
            assert torch.equal(getattr(got, name), getattr(st, name)), name
    merged = all_reduce_statistics({"key": local})["key"]
    assert torch.equal(merged.layers[0].mean, local.layers[0].mean)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):  # a rank's own error, re-raised
        probe(model, [{"input_ids": torch.full((1, 3), 10**6)}], show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        probe(model, iter([]), show_progress=False)


# -- two processes ----------------------------------------------------------------------------------------------
def _real_tokens(tokenizer, texts, max_length) -> int:
    return sum(min(len(tokenizer(t)["input_ids"]), max_length) for t in texts)


def test_two_processes_fit_like_one(workdir, loaded):
    model, tokenizer, data = loaded
    proc = torchrun("fit", workdir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [load_file(str(workdir / f"rank{r}.safetensors")) for r in range(N_PROCS)]
    ref = single_thread(dist_worker.run_fits, model, tokenizer, data)

    # The work was split: each rank ran the model on a part of the rows, together on all of them once.
    rows = [int(r["rows_seen"]) for r in ranks]
    assert sum(rows) == int(ref["rows_seen"]) and all(0 < n < int(ref["rows_seen"]) for n in rows)

    shared = sorted(k for k in ref if k != "rows_seen")
    for r in ranks[1:]:  # every rank holds exactly the same fitted state, bit for bit
        for key in shared:
            assert torch.equal(r[key], ranks[0][key]), key
    assert_matches(ranks[0], ref, shared)  # ... equal to the single-process fit

    # independent counts: every real token of every example was probed exactly once
    assert int(ranks[0]["probe.pre.0.count"]) == _real_tokens(
        tokenizer, data["forget"], dist_worker.MAX_LENGTH
    )
    assert int(ranks[0]["batches.0.count"]) == sum(len(b["rows"]) for b in data["token_batches"])
    assert int(ranks[0]["single.0.count"]) == _real_tokens(
        tokenizer, data["queries"][:1], dist_worker.MAX_LENGTH
    )
    assert ranks[0]["na.layer_index"].numel() > 0 and ranks[0]["sp.layer_index"].numel() > 0

    # opt-out: probe(distributed=False) and fits inside distributed_probing(False) saw only the rank's part
    spec = DataSpec(batch_size=dist_worker.BATCH_SIZE, max_length=dist_worker.MAX_LENGTH)
    parts = []
    for rank, got in enumerate(ranks):
        own = data["forget"][rank::N_PROCS]
        part = single_thread(probe, model, own, tokenizer, site="pre", spec=spec, show_progress=False)
        parts.append(part)
        assert_matches(
            got, dist_worker.flatten_stats("local", part), [k for k in got if k.startswith("local.")]
        )
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        ksd = single_thread(
            unlearned.fit, KeySpaceDetectionConfig(layers=[1]), own, None, tokenizer, show_progress=False
        )
        expected = {f"local_ksd.{k}": v for k, v in ksd.state_dict().items()}
        assert_matches(got, expected, expected)
        unlearned.remove_all_methods()
    reduced = dist_worker.flatten_stats("reduced", merge(*parts))
    for got in ranks:
        assert_matches(got, reduced, reduced)


def test_a_failure_on_one_rank_ends_every_rank_with_its_message(workdir, loaded):
    model, _, data = loaded
    proc = torchrun("failure", workdir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(N_PROCS)]

    bad = data["bad_index"]  # every rank reads every example to plan the batches: each names it itself
    for r in ranks:
        assert r["bad_example"]["type"] == "DataTypeError"  # a TypeError, named by its data set
        assert f"The forget data: Example {bad} is a NoneType" in r["bad_example"]["message"]

    vocab = model.config.vocab_size  # batch 2 is rank 0's: a DataError (ValueError) there, reported on rank 1
    assert ranks[0]["bad_token"]["type"] == "DataError"
    assert f"Token id {vocab + 5} is outside" in ranks[0]["bad_token"]["message"]
    assert ranks[1]["bad_token"]["type"] == DistributedProbeError.__name__
    assert "rank 0" in ranks[1]["bad_token"]["message"]
    assert f"DataError: Token id {vocab + 5} is outside" in ranks[1]["bad_token"]["message"]

    for r in ranks:  # ranks that disagree on the layers fail together instead of exchanging mismatched data
        assert r["mismatch"]["type"] == "ValueError" and "different" in r["mismatch"]["message"]
        for name in ("split", "order", "fewer", "batches", "stream"):  # or on the data they were given
            assert r[f"data_{name}"]["type"] == "ValueError", name
            assert "given different data" in r[f"data_{name}"]["message"], name
        assert r["empty"]["type"] == "DataError" and "empty" in r["empty"]["message"]
    # a failure in held-out scoring (rank 0's batch), raised on both ranks instead of leaving rank 1 waiting
    assert ranks[0]["scoring"]["type"] == "IndexError", ranks[0]["scoring"]
    assert ranks[1]["scoring"]["type"] == DistributedProbeError.__name__
    assert ranks[1]["scoring"]["message"].startswith("Scoring held-out examples failed on rank 0: IndexError")
    for r in ranks:
        assert r["after"]["type"] is None  # the group still works afterwards
        assert r["after"]["count"] == sum(len(row) for b in data["token_batches"] for row in b["rows"])
