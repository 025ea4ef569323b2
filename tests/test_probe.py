"""The streaming probe against numpy float64 statistics of activations captured independently."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_llama

from unlearn_hf import SiteError, merge, probe, stats_chunks
from unlearn_hf.data import DataSpec
from unlearn_hf.sites import find_ffl_sites

TEXTS = [
    "Question: What is 12 plus 30?\nAnswer: 42",
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "x",
    "Bonjour, comment allez-vous aujourd'hui ?",
    "import numpy as np\nprint(np.arange(10).sum())",
    "A train leaves at 3 pm going 60 miles per hour; when does it arrive 150 miles away?",
    "hello world",
]


def capture_raw(model, tokenizer, texts, layer, batch_size=8):
    """Run the texts in the probe's batches with an independent hook and return the real tokens' raw pre/key
    activations of ``layer`` (and each text's last-token key vector) as float64 numpy arrays.

    Position ids count real tokens only, as the probe (and ``generate``) number them, so a capture with the
    probe's padding side runs the probe's very forward (bit-identical activations, either side); without them a
    left-padded row's RoPE positions would be shifted, which moves its activations by float32 rounding."""
    site = find_ffl_sites(model)[layer]
    got = {}
    h1 = site.pre.register_forward_hook(lambda m, a, o: got.__setitem__("pre", o.double().numpy()))
    h2 = site.key.register_forward_pre_hook(lambda m, a: got.__setitem__("key", a[0].double().numpy()))
    out = {"pre": [], "key": [], "last_key": []}
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
                positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                model(**enc, position_ids=positions)
                mask = enc["attention_mask"].numpy().astype(bool)
                for kind in ("pre", "key"):
                    out[kind].append(got[kind][mask])
                for row, m in enumerate(mask):
                    out["last_key"].append(got["key"][row, np.nonzero(m)[0][-1]])
    finally:
        h1.remove()
        h2.remove()
    return {
        "pre": np.concatenate(out["pre"]),
        "key": np.concatenate(out["key"]),
        "last_key": np.stack(out["last_key"]),
    }


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3)


def test_statistics_equal_numpy_float64(model, smol_tokenizer):
    # one text per forward on both sides, so the float32 activations are bit-identical (a batch's shape can
    # change a matrix product's rounding); mixed batches are compared in the invariance tests below
    spec = DataSpec(batch_size=1)
    stats = probe(model, TEXTS, smol_tokenizer, site=("pre", "key"), spec=spec, show_progress=False)
    for layer in range(3):
        raw = capture_raw(model, smol_tokenizer, TEXTS, layer, batch_size=1)
        for kind in ("pre", "key"):
            s, x = stats[kind].layers[layer], raw[kind]
            assert s.count == x.shape[0]
            np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(s.variance.numpy(), x.var(0, ddof=1), rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(s.abs_mean.numpy(), np.abs(x).mean(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_and_padding_invariance(model, smol_tokenizer, side, batch_size):
    ref = probe(model, TEXTS, smol_tokenizer, spec=DataSpec(batch_size=3), show_progress=False)
    tok = smol_tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        got = probe(model, TEXTS, tok, spec=DataSpec(batch_size=batch_size), show_progress=False)
    finally:
        tok.padding_side = old
    for layer, s in ref.layers.items():
        g = got.layers[layer]
        assert g.count == s.count
        torch.testing.assert_close(g.mean, s.mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.m2, s.m2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g.abs_sum, s.abs_sum, rtol=1e-5, atol=1e-7)


def test_merge_equals_probe_of_union(model, smol_tokenizer):
    a, b = TEXTS[:4], TEXTS[4:]
    # batch size 1: each text's activations are then the same in every call, so only the merge can differ
    kw = dict(site="key", mode="last", spec=DataSpec(batch_size=1), show_progress=False)
    whole = probe(model, a + b, smol_tokenizer, **kw)
    merged = merge(probe(model, a, smol_tokenizer, **kw), probe(model, b, smol_tokenizer, **kw))
    for layer, s in whole.layers.items():
        m = merged.layers[layer]
        assert m.count == s.count == len(TEXTS)
        for name in ("mean", "m2", "abs_sum", "minimum", "maximum"):
            torch.testing.assert_close(getattr(m, name), getattr(s, name), rtol=1e-9, atol=1e-10)


def test_merge_refuses_mismatched_results(model, smol_tokenizer):
    a = probe(model, TEXTS[:3], smol_tokenizer, site="key", show_progress=False)
    b = probe(model, TEXTS[:3], smol_tokenizer, site="pre", show_progress=False)
    with pytest.raises(ValueError, match="Cannot merge"):
        merge(a, b)


def test_statistics_of_other_weights_of_one_architecture_are_refused(smol_tokenizer):
    """Two checkpoints of one architecture (a base model and its fine-tune: here two seeds) had one id, so their
    statistics merged, and a fit on one took the other's, selecting other neurons without a word (a review). The id
    now reads each parameter's first row: one weight changed anywhere is another model; the same weights, built
    again, offloaded or cast, are the same model."""
    from unlearn_hf import SelectivePruningConfig, UnlearnedModelForCausalLM
    from unlearn_hf.model_identity import architecture_id, same_model

    def stats(model):
        return [
            probe(model, t, smol_tokenizer, site="key", show_progress=False) for t in (TEXTS[:3], TEXTS[3:])
        ]

    base = tiny_llama(layers=2, seed=0)
    tuned = tiny_llama(layers=2, seed=0)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.o_proj.weight[0, 0] += 1e-3  # one weight, one step of a fine-tune
    merge(stats(base)[0], stats(tiny_llama(layers=2, seed=0))[1])  # the same weights: merged
    with pytest.raises(ValueError, match="probed on different models"):
        merge(stats(base)[0], stats(tuned)[1])
    unlearned = UnlearnedModelForCausalLM.from_base(base)
    with pytest.raises(ValueError, match="probed on a different model"):
        unlearned.fit(SelectivePruningConfig(ratio=0.1), *stats(tuned), show_progress=False)
    assert not unlearned.methods
    probed = stats(base)
    # the same weights elsewhere keep the id (the first version read in-memory rows exactly; a review): offloaded by
    # accelerate, or cast to bfloat16 after the probe
    from accelerate import cpu_offload

    offloaded = tiny_llama(layers=2, seed=0)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].mlp.down_proj.weight.is_meta
    merge(probed[0], stats(offloaded)[1])
    # in one dtype the rows are compared as stored; across dtypes (a float16 load of a bfloat16 checkpoint rounds
    # some values apart from a bfloat16 one, 55% of real rows; a review) only the architecture can be
    assert not same_model(
        architecture_id(tuned.to(torch.bfloat16)), architecture_id(copy.deepcopy(base).bfloat16())
    )
    assert same_model(architecture_id(base), architecture_id(copy.deepcopy(base).half()))
    base.to(torch.bfloat16)
    unlearned.fit(SelectivePruningConfig(ratio=0.1), *probed, show_progress=False)
    assert list(unlearned.methods) == ["selective_pruning"]


def test_query_mode_takes_last_real_token(model, smol_tokenizer):
    tok = smol_tokenizer
    for side in ("left", "right"):
        old = tok.padding_side
        tok.padding_side = side
        try:
            stats = probe(model, TEXTS, tok, site="key", mode="last", layers=[1], show_progress=False)
        finally:
            tok.padding_side = old
        last = capture_raw(model, tok, TEXTS, 1)["last_key"]
        s = stats.layers[1]
        assert s.count == len(TEXTS)
        # the capture is right-padded: after a left-padded probe the key vectors differ by float32 rounding (other
        # padding, other reduction order), measured up to 1.1e-8 absolute on values of ~7e-3 (batch sizes 3 and 8,
        # 1 or 2 threads), so atol is 1e-6, ~100x that; a wrong token would be off by ~1e-3
        np.testing.assert_allclose(s.mean.numpy(), last.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.minimum.numpy(), last.min(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.maximum.numpy(), last.max(0), rtol=1e-6, atol=1e-6)


def test_dataset_columns_and_prompt_completion_modes(model, smol_tokenizer):
    prompts = ["Question: 2+2?\nAnswer:", "Question: capital of France?\nAnswer:"]
    answers = [" 4", " Paris is the capital."]
    ds = Dataset.from_dict({"q": prompts, "a": answers, "text": [p + a for p, a in zip(prompts, answers)]})
    spec = DataSpec(prompt_column="q", completion_column="a")
    full = probe(model, ds, smol_tokenizer, site="pre", mode="all", spec=DataSpec(), show_progress=False)
    p = probe(model, ds, smol_tokenizer, site="pre", mode="prompt", spec=spec, show_progress=False)
    c = probe(model, ds, smol_tokenizer, site="pre", mode="completion", spec=spec, show_progress=False)
    n_prompt = sum(len(smol_tokenizer(q)["input_ids"]) for q in prompts)
    assert p.count == n_prompt
    assert p.count + c.count == full.count
    for layer, s in full.layers.items():  # prompt + completion statistics merge back to the whole texts
        m = p.layers[layer].merge(c.layers[layer])
        torch.testing.assert_close(m.mean, s.mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(m.m2, s.m2, rtol=1e-7, atol=1e-9)
    # query mode on a Dataset reads the prompt column
    q = probe(
        model,
        ds,
        smol_tokenizer,
        site="key",
        mode="last",
        spec=DataSpec(text_column="q"),
        show_progress=False,
    )
    assert q.count == 2


def test_tokenized_batches_equal_text_input(model, smol_tokenizer):
    enc = smol_tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    from_ids = probe(model, [dict(enc)], show_progress=False)
    from_text = probe(model, TEXTS[:4], smol_tokenizer, show_progress=False)
    for layer, s in from_text.layers.items():
        torch.testing.assert_close(from_ids.layers[layer].mean, s.mean, rtol=1e-6, atol=1e-8)
    # a generator of batches works too (length unknown up front)
    gen = (dict(smol_tokenizer([t], return_tensors="pt")) for t in TEXTS[:4])
    assert probe(model, gen, show_progress=False).count == from_text.count


def test_progress_bar_can_be_silenced(model, smol_tokenizer, capsys):
    probe(model, TEXTS, smol_tokenizer, show_progress=False)
    assert capsys.readouterr().err == ""
    probe(model, TEXTS, smol_tokenizer, show_progress=True)
    assert "probing" in capsys.readouterr().err


def test_clear_errors(model, smol_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        probe(model, [], smol_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        probe(model, Dataset.from_dict({"text": []}), smol_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match=r"available columns: \['question', 'answer'\]"):
        probe(
            model,
            Dataset.from_dict({"question": ["a"], "answer": ["b"]}),
            smol_tokenizer,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="available keys"):
        probe(model, [{"question": "a"}], smol_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        probe(model, TEXTS, None, show_progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        probe(model, [{"input_ids": torch.tensor([[1, 2, 10**6]])}], show_progress=False)
    with pytest.raises(ValueError, match="Token id -3 is outside the model's vocabulary"):
        probe(model, [{"input_ids": torch.tensor([[1, -3, 2]])}], show_progress=False)
    with pytest.raises(SiteError, match="not FFL layers"):
        probe(model, TEXTS, smol_tokenizer, layers=[7], show_progress=False)

    class NoFFL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

    with pytest.raises(SiteError):
        probe(NoFFL(), [{"input_ids": torch.tensor([[1, 2]])}], show_progress=False)


def test_memory_is_independent_of_tokens(model, smol_tokenizer):
    s = probe(model, TEXTS * 5, smol_tokenizer, site="pre", show_progress=False)
    tensors = [t for r in s.layers.values() for t in (r.mean, r.m2, r.abs_sum)]
    assert all(t.shape == (64,) and t.dtype == torch.float64 for t in tensors)


def test_running_stats_leave_float64_input_untouched_and_match_numpy():
    """``update`` works on float64 copies in place: a float64 input (whose ``.to(float64)`` would be the same
    tensor) must come back unchanged, and its statistics and extremes must still be right, over several chunks."""
    from unlearn_hf import stats as stats_mod

    # width 256: chunks of 512 rows on a CPU, so 1029 rows span three chunks (width 3 would need 87k rows)
    rows = 2 * stats_chunks.chunk_rows(256, torch.device("cpu")) + 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 256, dtype=torch.float64, generator=gen) * 4 - 1
    before = x.clone()
    rs = stats_mod.RunningStats(256, track_extremes=True)
    rs.update(x)
    assert torch.equal(x, before)
    ref = before.numpy()
    np.testing.assert_allclose(rs.mean.numpy(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rs.variance.numpy(), ref.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(rs.abs_mean.numpy(), np.abs(ref).mean(0), rtol=1e-12)
    np.testing.assert_array_equal(rs.minimum.numpy(), ref.min(0))
    np.testing.assert_array_equal(rs.maximum.numpy(), ref.max(0))


def test_running_stats_exclude_rows_by_zeroing_them(monkeypatch, model, smol_tokenizer):
    """``update(x, exclude=rows)`` equals the statistics of the other rows (numpy float64), over several chunks,
    whatever the left-out rows hold (NaN, inf), with rows left out at chunk edges, a chunk left out whole and a new
    set of rows of the same count next (the per-chunk split is cached per set); extremes refuse it."""
    from unlearn_hf.stats import RunningStats

    chunk = stats_chunks.chunk_rows(256, torch.device("cpu"))
    rows = 3 * chunk + 5
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 256, generator=gen) * 3 + 0.5
    first = [0, chunk - 1, chunk, *range(2 * chunk, 3 * chunk), rows - 1]  # edges, and the third chunk whole
    second = sorted(set(range(0, rows, 7)) - {0})
    for left_out in (first, second):
        assert len(first) != len(second) or left_out is first
        y = x.clone()
        y[left_out[::2]] = float("nan")
        y[left_out[1::2]] = float("inf")
        exclude = torch.tensor(left_out)
        keep = np.setdiff1d(np.arange(rows), left_out)
        ref = x.double().numpy()[keep]
        for quantities in (("moments",), ("abs",), ("moments", "abs")):
            rs = RunningStats.tracking(256, quantities)
            rs.update(y, exclude=exclude)
            rs.update(x[:3])  # a later update without exclusion adds to the same sums
            both = np.concatenate([ref, x[:3].double().numpy()])
            assert rs.count == both.shape[0]
            if "moments" in quantities:
                np.testing.assert_allclose(rs.mean.numpy(), both.mean(0), rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(rs.variance.numpy(), both.var(0, ddof=1), rtol=1e-10)
            if "abs" in quantities:
                np.testing.assert_allclose(rs.abs_mean.numpy(), np.abs(both).mean(0), rtol=1e-12)
    everything = RunningStats.tracking(256, ("moments",))
    everything.update(x, exclude=torch.arange(rows))
    assert everything.count == 0
    with pytest.raises(ValueError, match="extremes"):
        RunningStats(256, track_extremes=True).update(x, exclude=torch.tensor([1]))

    # a probe of padded batches takes this path (and still equals the one-by-one statistics, see the invariance test)
    calls = []
    split = stats_chunks.excluded_by_chunk
    monkeypatch.setattr(stats_chunks, "excluded_by_chunk", lambda *a: calls.append(a[0].numel()) or split(*a))
    texts = [TEXTS[3] + " more" * k for k in range(6)]  # padding: 8% of the batch, under _EXCLUDE_AT_MOST
    padded = probe(model, texts, smol_tokenizer, spec=DataSpec(batch_size=6), show_progress=False)
    one = probe(model, texts, smol_tokenizer, spec=DataSpec(batch_size=1), show_progress=False)
    assert calls and all(n > 0 for n in calls)
    for layer, s in one.layers.items():
        assert padded.layers[layer].count == s.count
        torch.testing.assert_close(padded.layers[layer].mean, s.mean, rtol=1e-5, atol=1e-7)


def test_running_stats_of_concurrent_threads_do_not_share_a_work_buffer():
    """On a CPU the float64 work buffer is reused, one per thread: statistics updated in two threads at once (torch
    releases the GIL inside its kernels) are each the numpy statistics of their own rows."""
    import threading

    from unlearn_hf.stats import RunningStats

    gen = torch.Generator().manual_seed(5)
    data = [[torch.randn(300, 256, generator=gen) * (k + 1) + 10 * k for _ in range(40)] for k in range(2)]
    results: dict[int, RunningStats] = {}

    def run(k: int) -> None:
        rs = RunningStats.tracking(256, ("moments", "abs"))
        for x in data[k]:
            rs.update(x)
        results[k] = rs

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        ref = torch.cat(data[k]).double().numpy()
        # worst-case float64 summation bounds (any order, any BLAS), as in the fold test: a column mean near zero
        # makes a relative tolerance alone depend on the summation order; a corrupted buffer misses by far more
        tol = 4 * ref.shape[0] * np.finfo(np.float64).eps
        abs_mean = np.abs(ref).mean(0)
        assert (np.abs(results[k].mean.numpy() - ref.mean(0)) <= tol * abs_mean).all()
        var = ref.var(0, ddof=1)
        assert (np.abs(results[k].variance.numpy() - var) <= tol * (1 + ref.mean(0) ** 2 / var) * var).all()
        assert (np.abs(results[k].abs_mean.numpy() - abs_mean) <= tol * abs_mean).all()


@pytest.mark.parametrize("fold_rows", [1 << 16, 8])
def test_running_stats_fold_pending_sums_exactly_whenever_read(monkeypatch, fold_rows):
    """``update`` only adds to pending float64 sums; reading a statistic folds them in (Chan's formula). Reads
    between updates, ``merge_``/``copy``/``to_`` with sums pending and a mean 10^3 standard deviations away from
    zero (where Σx² − n·mean² cancels most) must all give numpy's float64 statistics of the whole stream, within
    the worst-case summation bounds (variance: about n·eps·(1 + mean²/var) relative; 1.7e-9 measured, bound 3e-7)."""
    from unlearn_hf import stats as stats_mod
    from unlearn_hf.stats import RunningStats

    monkeypatch.setattr(stats_mod, "_FOLD_ROWS", fold_rows)  # 8: folded inside the stream, not only when read
    gen = torch.Generator().manual_seed(3)
    offset = torch.tensor([1e3, -2.5, 0.0])
    batches = [torch.randn(n, 3, generator=gen) + offset for n in (7, 1, 300, 2, 41)]
    ref = torch.cat(batches).double().numpy()

    def check(rs: RunningStats, rows: np.ndarray) -> None:
        assert rs.count == rows.shape[0]
        # worst-case float64 summation bounds (any order, any BLAS): n·eps relative to the sum of |x|
        tol = 4 * rows.shape[0] * np.finfo(np.float64).eps
        abs_mean = np.abs(rows).mean(0)
        assert (np.abs(rs.mean.numpy() - rows.mean(0)) <= tol * abs_mean).all()
        var = rows.var(0, ddof=1)
        bound = tol * (1 + rows.mean(0) ** 2 / var)
        assert (np.abs(rs.variance.numpy() - var) <= bound * var).all(), (rs.variance, var, bound)
        assert (np.abs(rs.abs_mean.numpy() - abs_mean) <= tol * abs_mean).all()
        np.testing.assert_array_equal(rs.minimum.numpy(), rows.min(0))
        np.testing.assert_array_equal(rs.maximum.numpy(), rows.max(0))

    read_between = RunningStats(3, track_extremes=True)
    seen = 0
    for b in batches:
        read_between.update(b)
        seen += b.shape[0]
        check(read_between, ref[:seen])  # folds after every batch

    pending = RunningStats(3, track_extremes=True)
    for b in batches[:3]:
        pending.update(b)
    other = RunningStats(3, track_extremes=True)
    for b in batches[3:]:
        other.update(b)
    assert pending.count == 308 and other.count == 43  # counts include pending rows without folding
    merged = pending.copy().merge_(other)  # both sides still hold pending sums
    check(merged, ref)
    moved = RunningStats(3, track_extremes=True)
    for b in batches:
        moved.update(b)
    check(moved.to_("cpu"), ref)
    with pytest.raises(ValueError, match="different widths"):
        pending.merge_(RunningStats(4, track_extremes=True))


@pytest.mark.parametrize("site", ["key", "pre", ("pre", "key")])
def test_a_dense_probe_stops_as_soon_as_its_last_site_is_read(model, smol_tokenizer, site):
    """Probing layer 1 stops the forward once layer 1's last site is read: a key site as soon as its input arrives,
    so layer 1's down projection (and everything after it) never runs; the statistics are a full pass's."""
    full = probe(model, TEXTS, smol_tokenizer, site=site, show_progress=False)
    ran = []
    handles = [
        model.model.layers[i].mlp.down_proj.register_forward_hook(lambda *a, i=i: ran.append(i))
        for i in (0, 1, 2)
    ]
    try:
        part = probe(model, TEXTS, smol_tokenizer, site=site, layers=[1], show_progress=False)
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == {0}
    for kind in (site,) if isinstance(site, str) else site:
        got = part if isinstance(site, str) else part[kind]
        ref = full if isinstance(site, str) else full[kind]
        assert torch.equal(got.layers[1].mean, ref.layers[1].mean)
        assert torch.equal(got.layers[1].m2, ref.layers[1].m2)


def test_a_probe_keeps_only_the_statistics_asked_for(model, smol_tokenizer):
    """Each statistic costs the probe a pass over the activations, so a method asks only for what it reads (Neuron
    Adjust the moments, Selective Pruning mean |x|): the kept values are bit-identical to a full probe's (same chunks,
    and |x|² = x² exactly), the others are refused by name, and merging needs the same statistics on both sides."""
    full = probe(model, TEXTS, smol_tokenizer, site=("pre", "key"), show_progress=False)
    moments = probe(
        model, TEXTS, smol_tokenizer, site=("pre", "key"), statistics=["moments"], show_progress=False
    )
    absolute = probe(model, TEXTS, smol_tokenizer, site="key", statistics="abs", show_progress=False)
    for kind in ("pre", "key"):
        for i, ref in full[kind].layers.items():
            got = moments[kind].layers[i]
            assert got.quantities == ("moments",) and got.count == ref.count
            assert torch.equal(got.mean, ref.mean) and torch.equal(got.m2, ref.m2)
            with pytest.raises(ValueError, match="without 'abs'"):
                _ = got.abs_mean
    for i, ref in full["key"].layers.items():
        got = absolute.layers[i]
        assert got.quantities == ("abs",)
        assert torch.equal(got.abs_sum, ref.abs_sum)
        with pytest.raises(ValueError, match="without 'moments'"):
            _ = got.variance
        # a result that keeps more merges into one that keeps less, never the other way round
        merged = got.merge(ref)
        assert merged.quantities == ("abs",) and merged.count == 2 * ref.count
        torch.testing.assert_close(merged.abs_sum, 2 * ref.abs_sum, rtol=1e-15, atol=0)
        with pytest.raises(ValueError, match=r"without \['moments'\]"):
            ref.copy().merge_(got)
    per_kind = probe(
        model,
        TEXTS,
        smol_tokenizer,
        site=("pre", "key"),
        statistics={"pre": ["moments"], "key": ["abs"]},
        show_progress=False,
    )
    for i, ref in full["pre"].layers.items():
        assert per_kind["pre"].layers[i].quantities == ("moments",)
        assert torch.equal(per_kind["pre"].layers[i].m2, ref.m2)
        assert per_kind["key"].layers[i].quantities == ("abs",)
        assert torch.equal(per_kind["key"].layers[i].abs_sum, full["key"].layers[i].abs_sum)
    for bad in ([], ["extremes"], ["moments", "median"], {"pre": []}):
        with pytest.raises(ValueError, match="statistics must name one or more of"):
            probe(model, TEXTS, smol_tokenizer, statistics=bad, show_progress=False)
    with pytest.raises(ValueError, match=r"must name exactly \['pre', 'key'\]"):
        probe(
            model,
            TEXTS,
            smol_tokenizer,
            site=("pre", "key"),
            statistics={"pre": ["abs"]},
            show_progress=False,
        )


def test_a_model_that_adds_positions_of_its_own_is_refused_with_the_reason():
    """CPM-Ant prepends ``prompt_length`` positions of its own to the input ids, so its FFLs see more rows than the
    input has tokens: no row can be told to be a token's, and every method refuses it, saying why."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_hf import (
        KeySpaceDetection,
        KeySpaceDetectionConfig,
        SelectivePruningConfig,
        UnlearnedModelForCausalLM,
    )
    from unlearn_hf.sites.site_tensors import site_shape_error

    config = AutoConfig.for_model(
        "cpmant",
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        dim_head=8,
        dim_ff=48,
        num_hidden_layers=2,
        prompt_types=3,
        prompt_length=4,
        segment_types=3,
        position_bias_num_buckets=32,
        position_bias_max_distance=64,
    )
    torch.manual_seed(0)
    cpmant = AutoModelForCausalLM.from_config(config).eval()
    unlearned = UnlearnedModelForCausalLM.from_base(cpmant)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    why = (
        r"ran over 10 positions for 6 input tokens \(shape \(2, 10, 48\).*adds positions of its own "
        r"\(e\.g\. CPM-Ant's prompt tokens\).*cannot tell which rows are the input's tokens"
    )
    with pytest.raises(SiteError, match=why):
        unlearned.fit(SelectivePruningConfig(ratio=0.1), rows, rows, show_progress=False)
    with pytest.raises(SiteError, match=r"Layer 0 pre site ran over 10 positions"):
        probe(cpmant, rows, site="pre", show_progress=False)
    # a hypercube that never probed this model (saved, or built from statistics) refuses at its first decision
    ksd = KeySpaceDetection(
        KeySpaceDetectionConfig(layers=[0], alpha=1.0, window=1, inputs="prompts"),
        {
            "layers": torch.tensor([0]),
            "center": torch.zeros(1, 48, dtype=torch.float64),
            "scale": torch.ones(1, 48, dtype=torch.float64),
            "k": torch.ones(1, dtype=torch.float64),
            "count": torch.tensor([2]),
            "refusal_ids": torch.tensor([5, 6]),
        },
    )
    cpmant.generation_config.eos_token_id = 7  # abstaining rows need one to end with
    unlearned.add_method("ksd", ksd)
    with pytest.raises(
        SiteError, match=r"ran over 10 positions for 6 input tokens.*adds positions of its own"
    ):
        unlearned.detect(ids, torch.ones_like(ids))
    # any other mismatch keeps the plain message
    other = site_shape_error("Layer 0 key site", (2, 6, 40), (2, 6), 48)
    assert str(other) == (
        "Layer 0 key site produced shape (2, 6, 40), expected [batch, seq, 48]; the site does not match the model."
    )
    fewer = site_shape_error("Layer 0 key site", (2, 3, 48), (2, 6), 48)
    assert "ran over 3 positions for 6 input tokens" in str(fewer) and "drops or merges" in str(fewer)
