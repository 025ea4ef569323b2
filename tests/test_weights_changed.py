"""A light checkpoint names the base model it was loaded from: when the weights changed since (a Trainer fine-tuning
the unlearned model, adapters merged in), a default save writes them (the full layout), an explicit light save is
refused, and a light checkpoint of a model changed before wrapping fails on the fingerprint at load."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from datasets import Dataset
from tiny_models import random_batches, tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from unlearn_hf import NeuronAdjustConfig, UnlearnedModelForCausalLM
from unlearn_hf.persistence import CONFIG_NAME, FingerprintMismatchError
from unlearn_hf.persistence.fingerprint import parameter_records

VOCAB = 512
PROMPT = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def base_dir(tmp_path):
    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def unlearned(base_dir, model=None) -> UnlearnedModelForCausalLM:
    """NA (deterministic) fitted on ``model`` (default: the base loaded from ``base_dir``)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir) if model is None else model
    out = UnlearnedModelForCausalLM.from_base(model)
    out.fit(
        NeuronAdjustConfig(ratio=0.1, deterministic=True),
        random_batches(1, VOCAB),
        random_batches(2, VOCAB),
        show_progress=False,
    )
    return out


def layout(folder) -> str:
    return json.loads((folder / CONFIG_NAME).read_text())["layout"]


def test_trainer_checkpoints_of_an_unlearned_model_keep_the_trained_weights(base_dir, tmp_path):
    """Relearning: fine-tuning an unlearned model with Trainer. Its checkpoints are full unlearned checkpoints that
    load with the trained weights and the method, and training resumes from them."""
    model = unlearned(base_dir)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (12,), generator=gen).tolist() for _ in range(8)]
    data = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    args = TrainingArguments(
        tmp_path / "run",
        per_device_train_batch_size=4,
        max_steps=2,
        save_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",  # a resumed run still moves the weights
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert layout(checkpoint) == "full" and (checkpoint / "model.safetensors").is_file()

    loaded = UnlearnedModelForCausalLM.from_pretrained(checkpoint)
    torch.testing.assert_close(loaded(PROMPT).logits, model(PROMPT).logits, rtol=0, atol=0)
    before = unlearned(base_dir)(PROMPT).logits
    assert not torch.allclose(before, model(PROMPT).logits)  # trained: not the weights of the base folder

    resumed = UnlearnedModelForCausalLM.from_pretrained(checkpoint)  # a fresh process would start here
    args.max_steps = 3
    Trainer(model=resumed, args=args, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    last = tmp_path / "run" / "checkpoint-3"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 3
    assert layout(last) == "full" and list(resumed.methods) == ["neuron_adjust"]
    torch.testing.assert_close(
        UnlearnedModelForCausalLM.from_pretrained(last)(PROMPT).logits, resumed(PROMPT).logits, rtol=0, atol=0
    )


def test_weights_changed_in_memory(base_dir, tmp_path, caplog):
    model = unlearned(base_dir)
    assert model.weights_changed() == []
    model.save_pretrained(tmp_path / "light")
    assert layout(tmp_path / "light") == "light"

    with torch.no_grad():
        model.get_base_model().model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
    assert model.weights_changed() == [
        "the values of 1 of 21 parameters differ (model.layers.1.self_attn.q_proj.weight)"
    ]
    with pytest.raises(ValueError, match=r"Cannot save light: .*model\.layers\.1\.self_attn\.q_proj\.weight"):
        model.save_pretrained(tmp_path / "refused", save_base_model=False)
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "auto")
    assert layout(tmp_path / "auto") == "full" and "Saving the full layout" in caplog.text
    torch.testing.assert_close(
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "auto")(PROMPT).logits, model(PROMPT).logits
    )
    # naming the base explicitly is the user's word (the fingerprint checks it at load)
    model.save_pretrained(tmp_path / "named", base_model_name_or_path="me/tuned")
    assert layout(tmp_path / "named") == "light"


def test_a_given_state_dict_is_what_the_fingerprint_records(base_dir, tmp_path):
    """``save_pretrained(state_dict=sd)`` writes ``sd`` as the base weights: the fingerprint records ``sd``, not the
    weights in memory. It recorded the model in memory, so a checkpoint whose ``sd`` differed in a recorded row never
    loaded: its own base files failed the check (a review)."""
    model = unlearned(base_dir)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name][0, 0] += 0.5
    model.save_pretrained(tmp_path / "ckpt", state_dict=sd)
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.get_base_model().state_dict()[name], sd[name])
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["base_model"]["fingerprint"]
    recorded = {r[0]: r for r in saved["parameters"]}[name]
    fresh = UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))
    assert recorded == {r[0]: r for r in parameter_records(fresh.get_base_model())}[name]
    with pytest.raises(
        FingerprintMismatchError, match="up_proj"
    ):  # the model in memory is not the checkpoint's base
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=model.get_base_model())


def test_resized_embeddings_and_non_finite_rows(base_dir, tmp_path):
    """A resize keeps row 0 (the shapes tell); a row 0 with inf values still saves (its sample is null)."""
    model = unlearned(base_dir)
    model.resize_token_embeddings(VOCAB + 8)
    assert model.weights_changed() == [
        "the shapes of 2 parameters differ (model.embed_tokens.weight, lm_head.weight)"
    ]
    model.save_pretrained(tmp_path / "resized")
    assert layout(tmp_path / "resized") == "full"
    UnlearnedModelForCausalLM.from_pretrained(tmp_path / "resized")

    model = unlearned(base_dir)
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "inf")
    records = json.loads((tmp_path / "inf" / CONFIG_NAME).read_text())["base_model"]["fingerprint"][
        "parameters"
    ]
    assert [r[4] for r in records if r[0] == "model.layers.0.mlp.up_proj.weight"] == [None]
    assert layout(tmp_path / "inf") == "full"
    UnlearnedModelForCausalLM.from_pretrained(tmp_path / "inf")


def test_copies_of_a_changed_model_are_changed_too(base_dir, tmp_path):
    """A copy is wrapped anew over the copied weights: it keeps the original's record of the weights as wrapped
    (a copy of a fine-tuned model saved light, and its trained weights were lost; a review)."""
    model = unlearned(base_dir)
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.up_proj.weight[0, 1] += 1e-2
    for i, other in enumerate((copy.deepcopy(model), copy.copy(model))):
        assert other.weights_changed() == model.weights_changed() != []
        other.save_pretrained(tmp_path / str(i))
        assert layout(tmp_path / str(i)) == "full"


def test_a_small_change_after_an_upcast_is_a_change(base_dir):
    """bfloat16 weights cast to float32 hold the same values exactly: a change below the bfloat16 tolerance made
    after the upcast (one small training step) is a change; the upcast alone is not (a review)."""
    model = unlearned(base_dir, AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)).float()
    assert model.weights_changed() == []
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] *= 1 + 2**-12
    assert model.weights_changed() == [
        "the values of 1 of 21 parameters differ (model.layers.0.mlp.up_proj.weight)"
    ]


def test_a_change_of_dtype_is_not_a_change_of_weights(base_dir, tmp_path):
    """A cast is not a change; the light checkpoint of the cast model (its fingerprint in bfloat16) loads onto the
    float32 base folder, in either dtype (a review found the loader's tolerance had become one-way)."""
    model = unlearned(base_dir).to(torch.bfloat16)
    assert model.weights_changed() == []
    model.save_pretrained(tmp_path / "light")
    assert layout(tmp_path / "light") == "light"
    for dtype in (None, torch.float32, torch.bfloat16):
        kwargs = {} if dtype is None else {"dtype": dtype}
        loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "light", **kwargs)
        assert list(loaded.methods) == ["neuron_adjust"]


def test_adapters_merged_before_wrapping_fail_at_load(base_dir, tmp_path):
    """LoRA on peft's default targets for Llama (q_proj, v_proj), merged: none of the fingerprint's three weight
    slices changes, the per-parameter records do."""
    config = peft.LoraConfig(r=4, init_lora_weights=False)
    assert set(config.target_modules or []) <= {"q_proj", "v_proj"}
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    merged = lora.merge_and_unload()
    model = unlearned(base_dir, merged)
    model.save_pretrained(tmp_path / "light")  # names the base folder: the merge happened before wrapping
    assert layout(tmp_path / "light") == "light"
    with pytest.raises(
        FingerprintMismatchError,
        match=r"the values of 4 of 21 parameters differ \(model\.layers\.0\.self_attn\.q_proj\.weight, .*"
        r"merged PEFT adapters.*save_base_model=True",
    ):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "light")
