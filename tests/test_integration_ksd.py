"""Key Space Detection on the real SmolLM2-135M-Instruct with the real data sets (docs/METHOD.md §4).

1. The paper's setting (``inputs="prompts"``, middle layer, α = 1, the prompt's last token): fit on 200 GSM8K
   train prompts in one template ``Question: …\\nAnswer:``; on 100 GSM8K test questions, 100 MBPP task texts and
   100 MMLU questions in that template it must abstain on ≥ 90% of GSM8K and ≤ 5% of each of the others. Data
   from ``benchmarks/ksd_eval.py``, shared with the sweep.
2. The library's default: fit on plain GSM8K questions, calibrated on MBPP train tasks and MMLU dev questions;
   held-out questions in every format a user sends (``benchmarks/ksd_formats.py``, shared with the benchmark).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.ksd_eval import BATCH, MAX_LENGTH, by_length, eval_sets, gsm8k_questions, left_batches
from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods.key_space_detection.calibration import LIMIT_SHARE

N_FIT = 200


def detect_all(unlearned, tok, texts: list[str]) -> torch.Tensor:
    """``detect`` over ``texts`` in length-sorted, left-padded batches; flags in the original order."""
    order = by_length(tok, texts)
    flags = torch.cat(
        [
            unlearned.detect(b["input_ids"], b["attention_mask"])
            for b in left_batches(tok, [texts[i] for i in order])
        ]
    )
    out = torch.empty_like(flags)
    out[torch.tensor(order)] = flags
    return out


@pytest.fixture
def unlearned_smollm2(smollm2):
    model, tok = smollm2
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    yield unlearned, tok
    unlearned.remove_all_methods()


@pytest.mark.slow
def test_paper_setting_separates_gsm8k_from_mbpp_and_mmlu(unlearned_smollm2, shared_data):
    unlearned, tok = unlearned_smollm2
    forget = gsm8k_questions(shared_data, "train", N_FIT)
    forget = [forget[i] for i in by_length(tok, forget)]  # same statistics, less padding
    method = unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=None, alpha=1.0, window=1),
        forget=forget,
        tokenizer=tok,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        show_progress=False,
    )
    n_layers = unlearned.config.num_hidden_layers
    assert method.config.layers == [n_layers // 2] and method.config.alpha == 1.0
    assert method.state["count"].tolist() == [N_FIT]
    sets = eval_sets(shared_data)
    flags = {name: detect_all(unlearned, tok, texts) for name, texts in sets.items()}
    refused = {name: int(f.sum()) for name, f in flags.items()}
    rates = {name: f"{count}/{len(sets[name])}" for name, count in refused.items()}
    # integer comparisons: at least 90% of GSM8K refused, at most 5% of MBPP and of MMLU. Measured (max_d
    # |v_d − μ_d|/σ_d / k per query, 1 or 2 threads, fit batches of 7 or 16): GSM8K 99/100 inside, MBPP 0/100,
    # MMLU 5/100 (at the limit), and the query nearest the boundary is 2.0% from it (MMLU, outside; GSM8K 2.3%,
    # MBPP 16%), while k and the distances moved by at most 1.1e-6 relative between those layouts: float rounding
    # cannot move a query across, the counts are decided by the model, not by the machine
    assert refused["gsm8k"] * 100 >= 90 * len(sets["gsm8k"]), rates
    assert refused["mbpp"] * 100 <= 5 * len(sets["mbpp"]), rates
    assert refused["mmlu"] * 100 <= 5 * len(sets["mmlu"]), rates

    # generation on the real model, one left-padded batch: two refused GSM8K questions say the refusal, two
    # answered MBPP tasks get exactly the base model's tokens (a batch layout unlike detect's, but these queries
    # lie far from the boundary: measured 0.28 and 0.45 of α·k for GSM8K, 2.9 and 3.0 for MBPP)
    g = [t for t, f in zip(sets["gsm8k"], flags["gsm8k"].tolist()) if f][:2]
    m = [t for t, f in zip(sets["mbpp"], flags["mbpp"].tolist()) if not f][:2]
    texts = [g[0], m[0], g[1], m[1]]
    expected = [True, False, True, False]
    batch = next(left_batches(tok, texts))
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=16, do_sample=False)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True)
    base = unlearned.get_base_model().generate(**batch, **kw)
    assert out.abstained.tolist() == expected
    refusal = tok(method.config.refusal, add_special_tokens=False)["input_ids"]
    for i, abstained in enumerate(expected):
        if abstained:
            assert out.sequences[i, n : n + len(refusal)].tolist() == refusal
            assert tok.decode(out.sequences[i, n:], skip_special_tokens=True) == method.config.refusal
        else:
            width = min(out.sequences.shape[1], base.shape[1])
            assert torch.equal(out.sequences[i, :width], base[i, :width])
            assert tok.decode(out.sequences[i, n:], skip_special_tokens=True) != method.config.refusal


#: Held-out questions per set, fitted questions (the issue's targets allow ≤ 200) in the format tests; the sets to
#: keep that no format ever abstained on (0 of 60 each, measured) are read at their first N_HELD_KEEP questions.
N_HELD, N_HELD_KEEP, N_FIT_FORMATS = 60, 40, 160


@pytest.fixture(scope="module")
def format_rates(smollm2, shared_data):
    """The library's default fitted on plain GSM8K train questions (rendered bare, through the chat template, and
    with a system prompt), calibrated on 60 MBPP train tasks and 60 MMLU dev questions; then abstention on held-out
    questions in every format a user sends: ``{set: {format: rate}}`` (``benchmarks/ksd_formats.py``)."""
    from benchmarks.ksd_formats import eval_sets, fit_data, measure

    model, tok = smollm2
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = fit_data(shared_data, N_FIT_FORMATS)
    retain = {name: qs[:60] for name, qs in retain.items()}
    try:
        method = unlearned.fit(
            KeySpaceDetectionConfig(), forget, retain, tok, name="math", batch_size=16, show_progress=False
        )
        cal = method.config.calibration
        assert cal["fitted_forget"] + cal["held_out_forget"] == N_FIT_FORMATS
        assert max(cal["false_rate"].values()) <= method.config.max_false_rate * LIMIT_SHARE
        sets = eval_sets(shared_data, N_HELD)
        del sets["mmlu_math"]  # reported by the benchmark; abstaining there is not a false abstention
        # long prompts: only the QA template, where one layer alone abstained most (23% at layer 8)
        mlqa = {"mlqa_en": sets.pop("mlqa_en")}
        sets.update({name: sets[name][:N_HELD_KEEP] for name in ("mbpp", "humaneval", "mmlu_other")})
        rates = {**measure(unlearned, tok, sets), **measure(unlearned, tok, mlqa, format_names=["qa"])}
        # the choice travels with the rates, so that a failure names it (measured: layers [8, 13], window 15)
        yield rates, (method.config.layers, method.config.window, round(method.config.alpha, 4))
    finally:
        unlearned.remove_all_methods()


@pytest.mark.slow
def test_default_ksd_abstains_however_the_question_is_asked(format_rates):
    """Held-out GSM8K test questions abstain in every format, including a system prompt and instruction wordings
    the fit never saw; held-out MBPP / HumanEval / MMLU non-math questions and MLQA-en reading comprehension
    (``Context: … Question: …``, unlike every calibration question) do not. The bounds are the issue's targets:
    ≥ 95% of GSM8K in the fitted formats, ≥ 90% in unseen wordings, ≤ 2% false abstention. Measured (calibration
    chose layers 8 and 13 under "all"): GSM8K 58-59 of 60 in every format (the bound is 57), 0 of 60 MBPP,
    HumanEval and MMLU (0 of their first 40 read here, where the bound is 0), 1 of 60 MLQA-en (the bound is 1).
    Every held-out query's score lies ≥ 0.2% (relative) from α, far beyond float rounding (~1e-6), so the counts are
    the model's and the data's, not the machine's. Before pairs of layers, one layer (8) abstained on 23% of
    MLQA-en."""
    rates, chosen = format_rates
    for fmt, rate in rates["gsm8k"].items():
        bound = 0.90 if fmt.startswith("unseen") else 0.95
        assert rate >= bound, (fmt, rates["gsm8k"], chosen)
    for name in ("mbpp", "humaneval", "mmlu_other", "mlqa_en"):
        for fmt, rate in rates[name].items():
            assert rate <= 0.02, (name, fmt, rates[name], chosen)
