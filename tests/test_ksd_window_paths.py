"""Key Space Detection's window of prompt tokens however the prompt reaches the model: split over prefill chunks,
partly in a prefix cache (refused: its keys cannot be read), or given as embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_ksd import FORGET, N_LAYERS, OTHER, encode
from test_ksd_generation import REFUSAL, expected_abstaining_row
from tiny_models import tiny_llama
from transformers import DynamicCache

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM

TAIL = " ok ok ok"  # tokens after the fitted question end: only a window of 4 reaches back to it
FORGET_ROW, RETAIN_ROW = FORGET[0] + TAIL, OTHER[0] + TAIL
NEW = 8


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


def fitted(tok, window: int):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = KeySpaceDetectionConfig(layers=[1], alpha=1.5, refusal=REFUSAL, inputs="prompts", window=window)
    unlearned.fit(config, forget=FORGET, tokenizer=tok, show_progress=False)
    return model, unlearned


@pytest.fixture(scope="module")
def setup(tok):
    return fitted(tok, 4)


def test_the_rows_need_the_window(setup, tok):
    _, unlearned = setup
    batch = encode(tok, [FORGET_ROW, RETAIN_ROW], "left")
    assert unlearned.detect(**batch).tolist() == [True, False]
    _, last_token_only = fitted(tok, 1)
    assert last_token_only.detect(**batch).tolist() == [False, False]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_prefill_decides_on_the_window_across_chunks(setup, tok, chunk):
    model, unlearned = setup
    for text, forget in ((FORGET_ROW, True), (RETAIN_ROW, False)):
        ids = tok(text, return_tensors="pt")["input_ids"]
        kw = dict(max_new_tokens=NEW, do_sample=False)
        out = unlearned.generate(input_ids=ids, prefill_chunk_size=chunk, return_dict_in_generate=True, **kw)
        assert out.abstained.tolist() == [forget], (chunk, text)
        new = out.sequences[0, ids.shape[1] :].tolist()
        if forget:
            assert new == expected_abstaining_row(tok, model, NEW)[: len(new)]
        else:
            assert new == model.generate(input_ids=ids, **kw)[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("prefill_through", ["unlearned", "plain"])
def test_a_prefix_cache_that_hides_part_of_the_window_is_refused(setup, tok, prefill_through):
    model, unlearned = setup
    ids = tok(FORGET_ROW, return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        (unlearned if prefill_through == "unlearned" else model)(input_ids=ids[:, :-2], cache=cache)
    with pytest.raises(ValueError, match="prefix caching"):
        unlearned.generate(input_ids=ids, cache=cache, max_new_tokens=NEW, do_sample=False)


def test_a_prefix_cache_is_fine_for_a_window_of_one(tok):
    model, unlearned = fitted(tok, 1)
    ids = tok(FORGET[0], return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], cache=cache)
    out = unlearned.generate(input_ids=ids, cache=cache, max_new_tokens=NEW, return_dict_in_generate=True)
    assert out.abstained.tolist() == [True]


def test_inputs_embeds_get_the_refusal(setup, tok):
    model, unlearned = setup
    ids = tok(FORGET_ROW, return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach()
    out = unlearned.generate(
        inputs_embeds=embeds, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True
    )
    assert out.abstained.tolist() == [True]
    assert out.sequences[0].tolist() == expected_abstaining_row(tok, model, NEW)[: out.sequences.shape[1]]
