"""Training an unlearned model (a relearning experiment): abstention would give the abstaining rows an infinite loss
and no gradient, so a training forward in which a method abstains is refused with the way out
(``disable_abstention()``); inside it the model trains like the plain one and abstains again after it."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tiny_models import random_batches, tiny_llama
from transformers import Trainer, TrainingArguments

from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM

VOCAB = 512
FORGET, RETAIN = random_batches(1, VOCAB), random_batches(2, VOCAB)


@pytest.fixture
def model() -> UnlearnedModelForCausalLM:
    """NA and KSD (prompts as fitted, the paper's setting: every forget batch is inside) on a tiny model."""
    out = UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=VOCAB))
    out.fit(NeuronAdjustConfig(ratio=0.1, deterministic=True), FORGET, RETAIN, show_progress=False)
    ksd = KeySpaceDetectionConfig(inputs="prompts", layers=[1], alpha=1.0, window=1, action="eos")
    out.fit(ksd, FORGET, show_progress=False, name="math")
    assert out.detect(**FORGET[0]).all() and not out.detect(**RETAIN[0]).any()
    return out


def test_a_training_forward_that_abstains_is_refused(model):
    ids = FORGET[0]["input_ids"]
    model.eval()
    assert math.isinf(model(input_ids=ids, labels=ids).loss.item())  # inference: the refusal, by design
    model.train()
    with pytest.raises(RuntimeError, match=r"refuse rows \(\{'math': 2\}\).*disable_abstention"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # no gradients: not training, the refusal applies
        assert math.isinf(float(model(input_ids=ids, labels=ids).loss))

    retained = RETAIN[0]["input_ids"]  # rows that do not abstain train as usual
    loss = model(input_ids=retained, labels=retained).loss
    loss.backward()
    assert math.isfinite(float(loss))

    with model.disable_abstention():
        loss = model(input_ids=ids, labels=ids).loss
        with model.disable_unlearning("math", "neuron_adjust"):
            plain = model(input_ids=ids, labels=ids).loss
        with model.disable_unlearning("math"):
            with_na = model(input_ids=ids, labels=ids).loss
    assert torch.equal(loss, with_na) and not torch.equal(loss, plain)  # NA still acts, KSD does not


def test_relearning_with_trainer_inside_disable_abstention(model, tmp_path):
    rows = [r.tolist() for batch in FORGET for r in batch["input_ids"]]
    data = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    args = TrainingArguments(
        tmp_path / "run",
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with pytest.raises(RuntimeError, match="disable_abstention"):
        trainer.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with model.disable_abstention():
        result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it learned
    # after the block the methods abstain again (on the weights they were fitted on: every forget row)
    model.load_state_dict(before)
    ids = FORGET[0]["input_ids"]
    with pytest.raises(RuntimeError, match="disable_abstention"):
        model(input_ids=ids, labels=ids)
