"""Neuron Adjust and Selective Pruning on the real SmolLM2-135M-Instruct: forgetting GSM8K (math) hurts GSM8K
more than MBPP (code), measured with the teacher-forced answer-token accuracy (METHOD.md §7).

Forget: GSM8K train, question + answer. Retain: MBPP train (task_id 601-974), task + code (CRLF normalised by
the skill loader). Neuron Adjust is fitted on precomputed statistics (part of the fit API), Selective Pruning with
``ratio="auto"`` on texts. Evaluation: 30 GSM8K test items and 30 MBPP test items (task_id 11-510), before and after.

Measured (64 + 64 probe items; 30 + 30 eval items, 50 + 50 in brackets): base 0.666 / 0.671 (0.657 / 0.664);
Neuron Adjust 0.03: relative drop 12.2% GSM8K vs 0.9% MBPP (12.6% vs 1.1%); Selective Pruning at the ratio
``"auto"`` chooses (0.03): 34.4% vs 2.5% (34.2% vs 2.9%).
"""

from __future__ import annotations

import logging

import pytest
import torch

from unlearn_hf import DataSpec, NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM, probe
from unlearn_hf.evaluation import answer_token_accuracy, relative_drop
from unlearn_hf.evaluation.skills import get_skill

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

N_PROBE = 64
N_EVAL = 30
EVAL = dict(batch_size=8, max_length=256)


@pytest.fixture(scope="module")
def skills(shared_data):
    return get_skill("gsm8k", shared_data), get_skill("mbpp", shared_data)


@pytest.fixture(scope="module")
def statistics(smollm2, skills):
    """``(forget, retain)``: pre-activation statistics of GSM8K and MBPP probe texts."""
    model, tok = smollm2
    gsm8k, mbpp = skills
    texts = mbpp.probe_texts(N_PROBE)
    assert not any("\r" in t for t in texts)  # CRLF normalised
    kw = dict(site="pre", spec=DataSpec(batch_size=8, max_length=256), show_progress=False)
    return probe(model, gsm8k.probe_texts(N_PROBE), tok, **kw), probe(model, texts, tok, **kw)


@pytest.fixture(scope="module")
def eval_items(skills):
    gsm8k, mbpp = skills
    return {"gsm8k": gsm8k.eval_items(N_EVAL), "mbpp": mbpp.eval_items(N_EVAL)}


def scores(model, tok, eval_items) -> dict[str, float]:
    return {
        name: answer_token_accuracy(model, tok, items, **EVAL).score for name, items in eval_items.items()
    }


@pytest.fixture(scope="module")
def base_scores(smollm2, eval_items):
    model, tok = smollm2
    return scores(model, tok, eval_items)


@pytest.fixture
def unlearned(smollm2):
    wrapper = UnlearnedModelForCausalLM.from_base(smollm2[0])
    yield wrapper
    wrapper.remove_all_methods()


def test_forgetting_gsm8k_hurts_math_more_than_code(smollm2, unlearned, statistics, eval_items, base_scores):
    # margin on drop(GSM8K) − drop(MBPP), measured with eval batches of 8 and 5 on 1 thread: 0.113 / 0.110 (margin
    # 0.05: 0.06 to spare, ~20x the 0.003 the batch layout moved it; 0.116 / 0.119 on 50 + 50 items)
    config, margin = NeuronAdjustConfig(ratio=0.03, seed=0), 0.05
    model, tok = smollm2
    forget, retain = statistics
    method = unlearned.fit(config, forget, retain)
    assert method.state["layer_index"].numel() == round(config.ratio * 30 * 1536)
    after = scores(unlearned, tok, eval_items)
    drop = {k: relative_drop(base_scores[k], after[k]) for k in after}
    logger.info(
        "%s: before %s, after %s, relative drop GSM8K %.3f, MBPP %.3f",
        config.method_type,
        base_scores,
        after,
        drop["gsm8k"],
        drop["mbpp"],
    )
    assert drop["gsm8k"] > drop["mbpp"] + margin, (base_scores, after)
    # the base model is untouched meanwhile, and the wrapper is the base model again once the method is removed
    ids = tok([eval_items["mbpp"][0].text], return_tensors="pt")
    with torch.no_grad():
        plain = model(**ids).logits
        unlearned.remove_all_methods()
        assert torch.equal(unlearned(**ids).logits, plain)


N_AUTO = 60  # examples per skill for ratio="auto": 48 fitted, 12 held out to measure the drops


def test_auto_ratio_meets_the_retain_budget_on_independent_items(
    smollm2, skills, eval_items, base_scores, unlearned
):
    """``ratio="auto"`` (Selective Pruning, whose retain drop reaches the budget inside the grid): the chosen ratio
    keeps the drop within the budget on its own held-out split and on independent MBPP test items."""
    model, tok = smollm2
    gsm8k, mbpp = skills
    config = SelectivePruningConfig(ratio="auto", ratio_grid=[0.01, 0.03, 0.1], max_retain_drop=0.05)
    method = unlearned.fit(
        config, gsm8k.probe_texts(N_AUTO), mbpp.probe_texts(N_AUTO), tok, max_length=192, show_progress=False
    )
    curve = method.ratio_curve
    after = scores(unlearned, tok, eval_items)
    drop = {k: relative_drop(base_scores[k], after[k]) for k in after}
    logger.info("auto: %s\nindependent test items: relative drop %s", curve.table(), drop)
    # measured: held-out retain drop 0.7% at 0.03 (chosen), 6.7% at 0.1 (beyond the budget, so the budget is what
    # decided); independent test items: MBPP drop 2.5% (2.5 points within the 5% budget), GSM8K 34.4% (on 50 + 50
    # items: 2.9% and 34.2%)
    assert curve.retain_drop[curve.chosen] <= config.max_retain_drop < curve.retain_drop[-1]
    assert method.state["layer_index"].numel() == round(curve.ratio * 30 * 1536)
    assert drop["mbpp"] <= config.max_retain_drop
    assert drop["gsm8k"] > 0.2
