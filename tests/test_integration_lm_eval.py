"""lm-evaluation-harness on the real SmolLM2-135M-Instruct unlearned by Key Space Detection (fitted on plain GSM8K
train questions, layer 20, α = 1): multiple-choice tasks built from GSM8K test questions (the forget skill) and
MMLU test questions of non-math subjects (``benchmarks/lm_eval_formats.py``), in the QA template and through the
chat template."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from benchmarks.ksd_formats import gsm8k
from benchmarks.lm_eval_formats import evaluate, gsm8k_mc, mmlu_mc
from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.integrations.lm_eval.model import UnlearnedLM

#: Documents per task: 10 GSM8K + 10 MMLU, 4 choices each, 80 requests (five batches of 16) per evaluation.
N_DOCS = 10


@pytest.fixture(scope="module")
def unlearned(smollm2, shared_data):
    model, tok = smollm2
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[20], alpha=1.0),
        forget=gsm8k(shared_data, "train", 100),
        tokenizer=tok,
        show_progress=False,
    )
    yield unlearned, tok
    unlearned.remove_all_methods()


def decided_alone(unlearned, tok, sample) -> bool:
    context = sample["arguments"][0][0]
    return bool(unlearned.detect(torch.tensor([tok(context)["input_ids"]]))[0])


@pytest.mark.slow
def test_lm_eval_on_smollm2_abstains_per_context_and_scores_answered_items_as_the_base_model(
    unlearned, shared_data, tmp_path
):
    unlearned, tok = unlearned
    tasks = [gsm8k_mc(tmp_path, shared_data, N_DOCS), mmlu_mc(tmp_path, shared_data, N_DOCS, math=False)]
    one = evaluate(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1), tasks, chat=False)
    sixteen = evaluate(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=16), tasks, chat=False)
    base = evaluate(
        HFLM(pretrained=unlearned.get_base_model(), tokenizer=tok, batch_size=16), tasks, chat=False
    )
    for name in ("gsm8k_mc", "mmlu_other_mc"):
        for s1, s16, b in zip(one["samples"][name], sixteen["samples"][name], base["samples"][name]):
            assert s1["abstained"] == s16["abstained"] == float(decided_alone(unlearned, tok, s1))
            if s16["abstained"]:
                assert s1["acc"] == s16["acc"] == 0.0
            else:  # bit-identical to the base model in the same batches
                assert [r[0] for r in s16["resps"]] == [r[0] for r in b["resps"]]
    rates = {n: r["abstained,none"] for n, r in sixteen["results"].items()}
    # measured on the first 40 + 40 such items: GSM8K 38/40 abstained, MMLU non-math 0/40; on the first 20 + 20
    # (these 10 + 10 among them): GSM8K 20/20 and MMLU 0/20, unchanged when the fit's α is 0.8 or 1.6 instead of 1: no
    # item near the boundary
    assert rates["gsm8k_mc"] >= 0.8 and rates["mmlu_other_mc"] <= 0.05, rates

    # through the chat template lm-eval renders "Question: …\nAnswer:" inside the user turn: the decision is the
    # one generate takes on that very prompt (measured: GSM8K 0/40 abstained at this fit, reported in the README)
    chat = evaluate(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=16), tasks, chat=True)
    for name in ("gsm8k_mc", "mmlu_other_mc"):
        for s in chat["samples"][name]:
            assert "<|im_start|>assistant" in s["arguments"][0][0]
            assert s["abstained"] == float(decided_alone(unlearned, tok, s))
            assert s["acc"] == 0.0 or not s["abstained"]
