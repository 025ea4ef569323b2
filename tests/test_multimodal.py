"""Image-text models whose language model is a dense decoder (Gemma 3, LLaVA, Mistral 3) or a mixture of experts
(Llama 4, whose vision layers discovery tells from the text decoder's by ``get_decoder()``): the methods attach to
the language model's layers only, text-only and image+text ``generate`` both work, the vision tower is never
touched, and save/load round-trips."""

from __future__ import annotations

import pytest
import torch
from tiny_models import hook_count, small_text_kwargs
from transformers import AutoConfig, AutoModelForImageTextToText

from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM

IMAGE_TOKEN, EOS = 299, 2
_TEXT = small_text_kwargs(vocab_size=300)
_VISION = dict(
    hidden_size=16,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)

#: model_type -> (config keyword arguments, extra image inputs of generate, image tokens per image)
MODELS = {
    "gemma3": (
        dict(
            text_config=dict(_TEXT, query_pre_attn_scalar=8, sliding_window=16),
            vision_config=_VISION,
            mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN,
            boi_token_index=297,
            eoi_token_index=298,
        ),
        {},
    ),
    "llava": (
        dict(
            text_config=dict(_TEXT, model_type="llama"),
            vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=16),
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-1,
        ),
        {},
    ),
    "mistral3": (
        dict(
            text_config=dict(_TEXT, model_type="mistral"),
            vision_config=dict(_VISION, model_type="pixtral", head_dim=8),
            image_token_index=IMAGE_TOKEN,
            spatial_merge_size=1,
            vision_feature_layer=-1,
        ),
        {"image_sizes": torch.tensor([[28, 28]])},
    ),
    # Llama 4: a mixture of experts (a dense layer, then routed experts and a shared expert); one image token per
    # 28 x 28 image (4 patches, pixel shuffle 0.5)
    "llama4": (
        dict(
            text_config=dict(
                _TEXT,
                num_local_experts=4,
                intermediate_size=40,
                intermediate_size_mlp=80,
                interleave_moe_layer_step=2,
            ),
            vision_config=dict(
                _VISION,
                intermediate_size=64,
                vision_output_dim=16,
                projector_input_dim=16,
                projector_output_dim=16,
                pixel_shuffle_ratio=0.5,
            ),
            image_token_index=IMAGE_TOKEN,
        ),
        {},
    ),
}
#: where each model keeps its text decoder layers, vision tower, projector and image features
_PARTS = {
    "llama4": ("language_model.model.layers.", "vision_model", "multi_modal_projector", ""),
}
_DEFAULT_PARTS = (
    "model.language_model.layers.",
    "model.vision_tower",
    "model.multi_modal_projector",
    "model",
)


def _model(model_type: str):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(
        AutoConfig.for_model(model_type, **MODELS[model_type][0])
    ).eval()


def _rows(seed: int, lo: int, hi: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": (ids := torch.randint(lo, hi, (1, 6), generator=g)),
            "attention_mask": torch.ones_like(ids),
        }
        for _ in range(n)
    ]


def _part(model, model_type: str, which: int):
    name = _PARTS.get(model_type, _DEFAULT_PARTS)[which]
    return model.get_submodule(name) if name else model


def _image_inputs(model_type: str) -> dict[str, torch.Tensor]:
    if model_type == "gemma3":
        ids = [5, 297] + [IMAGE_TOKEN] * 4 + [298, 7, 8, 9]
    else:
        ids = [5] + [IMAGE_TOKEN] * (1 if model_type == "llama4" else 4) + [7, 8, 9]
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels,
        **MODELS[model_type][1],
    }


def _flat(features) -> torch.Tensor:
    """The image features of ``get_image_features`` (a tensor, a list of tensors or an output object) as one tensor."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    if isinstance(features, (list, tuple)):
        return torch.cat([t.flatten() for t in features])
    return features.flatten()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_methods_on_the_language_model_only(model_type, tmp_path):
    base = _model(model_type)
    image = _image_inputs(model_type)
    with torch.no_grad():
        plain = base.generate(**image, max_new_tokens=4, do_sample=False)
        vision_before = _part(base, model_type, 3).get_image_features(
            pixel_values=image["pixel_values"], **MODELS[model_type][1]
        )
    vision, projector = _part(base, model_type, 1), _part(base, model_type, 2)
    own_hooks = hook_count(vision), hook_count(projector)  # transformers' own
    unlearned = UnlearnedModelForCausalLM.from_base(base)
    layers = _PARTS.get(model_type, _DEFAULT_PARTS)[0]
    assert all(s.key_name.startswith(layers) for s in unlearned.ffl_sites)
    forget, retain = _rows(0, 3, 150), _rows(1, 150, 296)
    ksd = KeySpaceDetectionConfig(inputs="prompts", layers=[-1], alpha=1.0, window=1, action="eos")
    unlearned.fit(ksd, forget, name="ksd", show_progress=False, batch_size=1)

    # text only: a fitted query abstains (ends at once); image + text: runs, and a row that does not abstain is
    # the base model's, bit for bit
    out = unlearned.generate(**forget[0], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out["abstained"].tolist() == [True] and out.sequences[0, 6:].tolist() == [EOS]
    with torch.no_grad():
        assert not bool(unlearned.detect(**image)[0])
        # image tokens without the image: the decision could not be generate's (a review: detect then differed)
        with pytest.raises(ValueError, match="hold image tokens but no pixel_values"):
            unlearned.detect(image["input_ids"], image["attention_mask"])
    assert torch.equal(unlearned.generate(**image, max_new_tokens=4, do_sample=False), plain)
    # fitting reads input_ids and attention_mask only: a batch with an image is refused, not read without it
    with pytest.raises(
        ValueError, match=r"has \[.*'pixel_values'.*\], model inputs that a fit does not pass"
    ):
        unlearned.fit(ksd, [image], name="with_image", show_progress=False)

    unlearned.fit(NeuronAdjustConfig(ratio=0.1, seed=1), forget, retain, name="na", show_progress=False)
    assert (hook_count(vision), hook_count(projector)) == own_hooks
    with torch.no_grad():
        sequences = unlearned.generate(**image, max_new_tokens=4, do_sample=False)
        vision_after = _part(base, model_type, 3).get_image_features(
            pixel_values=image["pixel_values"], **MODELS[model_type][1]
        )
    assert sequences.shape[1] == image["input_ids"].shape[1] + 4
    assert torch.equal(_flat(vision_before), _flat(vision_after))

    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path=f"tiny/{model_type}")
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=_model(model_type))
    # and with nothing but the folder: the base model is built as the image-text model it was (AutoModelForCausalLM
    # has no class for LLaVA's config and builds Llama 4's text model alone; a review)
    unlearned.save_pretrained(tmp_path / "full", save_base_model=True)
    base.save_pretrained(tmp_path / "base")
    unlearned.save_pretrained(tmp_path / "light", base_model_name_or_path=str(tmp_path / "base"))
    alone = [UnlearnedModelForCausalLM.from_pretrained(tmp_path / f) for f in ("full", "light")]
    with torch.no_grad():
        for row in (forget[1], retain[0]):
            assert torch.equal(loaded(**row).logits, unlearned(**row).logits)
        assert torch.equal(loaded.generate(**image, max_new_tokens=4, do_sample=False), sequences)
        for model in alone:
            assert type(model.get_base_model()).__name__ == type(base).__name__
            assert torch.equal(model.generate(**image, max_new_tokens=4, do_sample=False), sequences)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_a_vision_towers_position_table_does_not_limit_the_text(model_type):
    """A fit cuts rows to a learned position table of the text decoder only: the vision tower's patch table (4-5
    positions in these tiny models, 256 in PaliGemma-224) cut every text row to that (a review of the change)."""
    from unlearn_hf.model_inputs import learned_position_limit

    assert learned_position_limit(_model(model_type)) is None


def test_a_text_model_loaded_from_an_image_text_checkpoint_reloads_as_the_text_model(tmp_path):
    """Llama 4's checkpoint names the image-text class, but AutoModelForCausalLM builds its text model alone
    (``llama4_text``): a checkpoint fitted on that text model reloads as it, not as the image-text model (a review
    of the first version, which picked the class from the checkpoint's config alone)."""
    from transformers import AutoModelForCausalLM

    _model("llama4").save_pretrained(tmp_path / "base")
    text = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert text.config.model_type == "llama4_text"
    unlearned = UnlearnedModelForCausalLM.from_base(text)
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.1, seed=1), _rows(0, 3, 150), _rows(1, 150, 296), show_progress=False
    )
    unlearned.save_pretrained(tmp_path / "light")
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "light")
    assert type(loaded.get_base_model()) is type(text)
    row = _rows(2, 3, 296, n=1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**row).logits, unlearned(**row).logits)
