"""lm-evaluation-harness on the real SmolLM2-135M-Instruct unlearned by Key Space Detection (fitted on plain GSM8K
train questions, layer 20, α = 1): multiple-choice tasks built from GSM8K test questions (the forget skill) and
MMLU test questions of non-math subjects, in the QA template and through the chat template."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers_data import read_jsonl
from helpers_lm_eval import MC_METRICS, _write
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from benchmarks.ksd_formats import MATH_SUBJECTS, gsm8k
from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.integrations.lm_eval.model import UnlearnedLM

N_DOCS = 20


def gsm8k_mc(folder, data):
    docs = []
    for i, r in enumerate(read_jsonl(data / "gsm8k" / "test.jsonl")[:N_DOCS]):
        gold = int(r["answer"].split("####")[-1].strip().replace(",", ""))
        wrong = [gold + 1, 2 * gold + 2, gold + 10]
        g = i % 4
        docs.append(
            {
                "question": r["question"],
                "choices": [str(c) for c in wrong[:g] + [gold] + wrong[g:]],
                "answer": g,
            }
        )
    body = (
        "output_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\ntarget_delimiter: ' '\n" + MC_METRICS
    )
    return _write(folder, "gsm8k_mc", docs, body)


def mmlu_other_mc(folder, data):
    docs = []
    for path in sorted((data / "mmlu" / "test").glob("*.csv")):
        if path.stem.rsplit("_", 1)[0] in MATH_SUBJECTS or len(docs) == N_DOCS:
            continue
        with open(path, encoding="utf-8", newline="") as f:
            r = next(csv.DictReader(f))
        docs.append(
            {
                "question": r["question"],
                **{k: r[f"choice{i}"] for i, k in enumerate("ABCD")},
                "answer": int(r["answer"]),
            }
        )
    body = (
        "output_type: multiple_choice\n"
        "doc_to_text: 'Question: {{question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\nAnswer:'\n"
        "doc_to_choice: ['A', 'B', 'C', 'D']\ndoc_to_target: answer\ntarget_delimiter: ' '\n" + MC_METRICS
    )
    return _write(folder, "mmlu_other_mc", docs, body)


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


def run(lm, tasks, chat=False):
    return simple_evaluate(
        model=lm,
        tasks=[str(t) for t in tasks],
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=chat,
    )


def decided_alone(unlearned, tok, sample) -> bool:
    context = sample["arguments"][0][0]
    return bool(unlearned.detect(torch.tensor([tok(context)["input_ids"]]))[0])


@pytest.mark.slow
def test_lm_eval_on_smollm2_abstains_per_context_and_scores_answered_items_as_the_base_model(
    unlearned, shared_data, tmp_path
):
    unlearned, tok = unlearned
    tasks = [gsm8k_mc(tmp_path, shared_data), mmlu_other_mc(tmp_path, shared_data)]
    one = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1), tasks)
    sixteen = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=16), tasks)
    base = run(HFLM(pretrained=unlearned.get_base_model(), tokenizer=tok, batch_size=16), tasks)
    for name in ("gsm8k_mc", "mmlu_other_mc"):
        for s1, s16, b in zip(one["samples"][name], sixteen["samples"][name], base["samples"][name]):
            assert s1["abstained"] == s16["abstained"] == float(decided_alone(unlearned, tok, s1))
            if s16["abstained"]:
                assert s1["acc"] == s16["acc"] == 0.0
            else:  # bit-identical to the base model in the same batches
                assert [r[0] for r in s16["resps"]] == [r[0] for r in b["resps"]]
    rates = {n: r["abstained,none"] for n, r in sixteen["results"].items()}
    # measured on the first 40 + 40 such items: GSM8K 38/40 abstained, MMLU non-math 0/40 (these are the first 20)
    assert rates["gsm8k_mc"] >= 0.8 and rates["mmlu_other_mc"] <= 0.05, rates

    # through the chat template lm-eval renders "Question: …\nAnswer:" inside the user turn: the decision is the
    # one generate takes on that very prompt (measured: GSM8K 0/40 abstained at this fit, reported in the README)
    chat = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=16), tasks, chat=True)
    for name in ("gsm8k_mc", "mmlu_other_mc"):
        for s in chat["samples"][name]:
            assert "<|im_start|>assistant" in s["arguments"][0][0]
            assert s["abstained"] == float(decided_alone(unlearned, tok, s))
            assert s["acc"] == 0.0 or not s["abstained"]
