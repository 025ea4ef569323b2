"""Key Space Detection however the model is driven: ``generate`` (greedy, sampling, beams,
``num_return_sequences``), chunked prefill, ``pipeline``, ``TextStreamer``, threads, hand-written cached loops.

Every check compares against an independent run: the base model for rows that do not abstain (token for token),
the refusal's own tokenization for rows that do.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import warnings
import weakref

import pytest
import torch
from helpers_ksd import FORGET, OTHER, encode, separable_ksd
from transformers import DynamicCache, TextStreamer, pipeline

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM

REFUSAL = "I can't help with that."
MIXED = [FORGET[0], OTHER[0], FORGET[4], OTHER[2], OTHER[4], FORGET[9]]
IS_FORGET = [t in FORGET for t in MIXED]


@pytest.fixture
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


@pytest.fixture
def setup(tok):
    return separable_ksd(tok, REFUSAL)


def refusal_ids(tok):
    return tok(REFUSAL, add_special_tokens=False)["input_ids"]


def expected_abstaining_row(tok, model, new_tokens: int) -> list[int]:
    """What an abstaining row must generate: the refusal, end-of-sequence, then padding (as generate pads)."""
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    row = [*refusal_ids(tok), eos]
    return (row + [pad] * new_tokens)[:new_tokens]


def check_rows(tok, model, new, reference, is_forget):
    """``new`` rows (generated part) of abstaining inputs are the refusal; the others equal ``reference``."""
    for i, forget in enumerate(is_forget):
        if forget:
            assert new[i].tolist() == expected_abstaining_row(tok, model, new.shape[1]), i
        else:
            assert torch.equal(new[i], reference[i]), i


def test_greedy_left_padded_mixed_batch(setup, tok):
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=12, do_sample=False)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True, output_logits=True)
    base = model.generate(**batch, **kw)
    assert out.abstained.tolist() == IS_FORGET
    assert unlearned.detect(batch["input_ids"], batch["attention_mask"]).tolist() == IS_FORGET
    width = max(out.sequences.shape[1], base.shape[1]) - n
    pad = model.generation_config.pad_token_id
    grow = lambda t: torch.nn.functional.pad(t[:, n:], (0, width - (t.shape[1] - n)), value=pad)  # noqa: E731
    check_rows(tok, model, grow(out.sequences), grow(base), IS_FORGET)
    # the raw logits of an abstaining row carry nothing of the model: one finite entry per step
    for step_logits in out.logits:
        for i, forget in enumerate(IS_FORGET):
            if forget:
                assert torch.isfinite(step_logits[i]).sum().item() == 1
    # plain tensor output (no return_dict_in_generate) is the same
    assert torch.equal(unlearned.generate(**batch, **kw), out.sequences)


def test_detect_without_a_mask_reads_padding_as_generate_does(setup, tok):
    """Given no attention mask, ``generate`` infers one from the pad token (when it is not end-of-sequence);
    ``detect`` read every position as real, so its decision on padded rows could differ from generate's (a review).
    Both forwards now get the same mask."""
    _, unlearned = setup
    padded = copy.deepcopy(tok)
    padded.pad_token = "<|endoftext|>"
    unlearned.generation_config.pad_token_id = padded.pad_token_id
    assert padded.pad_token_id != unlearned.generation_config.eos_token_id
    ids = encode(padded, MIXED, "left")["input_ids"]
    masks = []
    handle = unlearned.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        decided = unlearned.detect(ids)
        out = unlearned.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    finally:
        handle.remove()
    expected = (ids != padded.pad_token_id).long()
    assert (expected == 0).any() and torch.equal(masks[0], expected) and torch.equal(masks[1], expected)
    assert decided.tolist() == out.abstained.tolist() == IS_FORGET


def test_refusal_survives_other_logits_processors(setup, tok):
    """min_new_tokens would ban end-of-sequence, repetition penalties and n-gram bans would alter the refusal: the
    abstention processor runs after them all, so abstaining rows still say the refusal and end."""
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    n = batch["input_ids"].shape[1]
    kw = dict(
        max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=1
    )
    out = unlearned.generate(**batch, **kw)
    base = model.generate(**batch, **kw)
    check_rows(tok, model, out[:, n:], base[:, n:], IS_FORGET)


def test_eos_token_given_to_generate_ends_the_refusal(setup, tok):
    model, unlearned = setup
    batch = encode(tok, MIXED[:2], "left")
    n = batch["input_ids"].shape[1]
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eos != model.generation_config.eos_token_id
    out = unlearned.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    refusal = refusal_ids(tok)
    assert out[0, n : n + len(refusal) + 1].tolist() == [*refusal, eos]


def test_sampling_with_fixed_seed(setup, tok):
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=100, num_return_sequences=2)
    torch.manual_seed(11)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True)
    torch.manual_seed(11)
    base = model.generate(**batch, **kw)
    expanded = [f for f in IS_FORGET for _ in range(2)]
    assert out.abstained.tolist() == expanded
    assert out.sequences.shape == base.shape
    check_rows(tok, model, out.sequences[:, n:], base[:, n:], expanded)
    torch.manual_seed(11)
    assert torch.equal(unlearned.generate(**batch, **kw), out.sequences)  # reproducible


def test_beam_search_and_num_return_sequences(setup, tok):
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True)
    base = model.generate(**batch, **kw, return_dict_in_generate=True)
    expanded = [f for f in IS_FORGET for _ in range(2)]
    assert out.abstained.tolist() == expanded
    width = max(out.sequences.shape[1], base.sequences.shape[1]) - n
    pad = model.generation_config.pad_token_id
    grow = lambda t: torch.nn.functional.pad(t[:, n:], (0, width - (t.shape[1] - n)), value=pad)  # noqa: E731
    check_rows(tok, model, grow(out.sequences), grow(base.sequences), expanded)
    keep = [i for i, f in enumerate(expanded) if not f]
    assert torch.equal(out.sequences_scores[keep], base.sequences_scores[keep])


def test_chunked_prefill_decides_on_the_last_prompt_token(setup, tok):
    _, unlearned = setup
    batch = encode(tok, MIXED, "left")
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    whole = unlearned.generate(**batch, **kw)
    chunked = unlearned.generate(**batch, **kw, prefill_chunk_size=3)
    assert chunked.abstained.tolist() == IS_FORGET
    assert torch.equal(chunked.sequences, whole.sequences)


def test_streamer_receives_the_refusal(setup, tok, capsys):
    _, unlearned = setup
    enc = tok(FORGET[3], return_tensors="pt")
    unlearned.generate(
        **enc,
        max_new_tokens=12,
        do_sample=False,
        streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
    )
    assert capsys.readouterr().out.strip() == REFUSAL


def test_pipeline_refuses_forget_prompts_and_answers_others_without_warnings(setup, tok, caplog):
    from transformers.utils import logging as hf_logging

    model, unlearned = setup
    hf_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            pipe = pipeline("text-generation", model=unlearned, tokenizer=tok)
            refused = pipe(FORGET[1], max_new_tokens=12, do_sample=False, return_full_text=False)
            answered = pipe(OTHER[1], max_new_tokens=12, do_sample=False, return_full_text=False)
            plain = pipeline("text-generation", model=model, tokenizer=tok)
            reference = plain(OTHER[1], max_new_tokens=12, do_sample=False, return_full_text=False)
    finally:
        hf_logging.disable_propagation()
    assert not [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert refused[0]["generated_text"] == REFUSAL
    assert answered[0]["generated_text"] == reference[0]["generated_text"]
    assert answered[0]["generated_text"] != REFUSAL


def test_threads_get_what_sequential_calls_get(setup, tok):
    """Four threads generating at once, each its own mix of prompts, get exactly the sequential results."""
    _, unlearned = setup
    jobs = [MIXED[0:2], MIXED[2:4], [MIXED[4], MIXED[1]], [MIXED[5], MIXED[0]]]
    batches = [encode(tok, texts, "left") for texts in jobs]
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    sequential = [unlearned.generate(**b, **kw) for b in batches]
    for repeat in range(2):
        results: list = [None] * len(jobs)
        errors: list = []
        barrier = threading.Barrier(len(jobs))

        def work(i, barrier=barrier, results=results, errors=errors):
            try:
                barrier.wait()
                results[i] = unlearned.generate(**batches[i], **kw)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, (got, want) in enumerate(zip(results, sequential)):
            assert torch.equal(got.sequences, want.sequences), (repeat, i)
            assert got.abstained.tolist() == [t in FORGET for t in jobs[i]]


def greedy_loop(model, batch, steps, cache_kw):
    """A hand-written greedy decoding loop with a KV cache, as users write it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position = (mask.cumsum(1) - 1).clamp(min=0)
    out, nxt, tokens = None, None, []
    with torch.no_grad():
        for _ in range(steps):
            if out is None:
                kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
                if cache_kw == "cache":
                    kwargs["cache"] = DynamicCache()
            else:
                kwargs = dict(input_ids=nxt, attention_mask=mask, position_ids=position[:, -1:] + 1)
                kwargs[cache_kw] = out.cache
                position = torch.cat([position, position[:, -1:] + 1], 1)
            out = model(**kwargs)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(tokens, 1)


def check_loop_rows(tok, model, got, base, steps):
    """Rows of :data:`MIXED` from a hand-written loop: forget rows give the refusal, then end-of-sequence for as long
    as the loop goes on; the others equal the base model's loop."""
    eos = model.generation_config.eos_token_id
    refusal = [*refusal_ids(tok), eos]
    for i, forget in enumerate(IS_FORGET):
        if forget:
            assert got[i].tolist() == (refusal + [eos] * steps)[:steps], i
        else:
            assert torch.equal(got[i], base[i]), i


# ``past_key_values`` is deprecated in transformers 5 (in favour of ``cache``) but still what most loops pass
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_kw", ["cache", "past_key_values"])
def test_hand_written_cached_loop(setup, tok, cache_kw):
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    steps = len(refusal_ids(tok)) + 3
    got = greedy_loop(unlearned, batch, steps, cache_kw)
    base = greedy_loop(model, batch, steps, cache_kw)
    check_loop_rows(tok, model, got, base, steps)
    # a new loop is a new request: nothing carries over from the previous one
    assert torch.equal(greedy_loop(unlearned, batch, steps, cache_kw), got)


def continue_loop(model, cache, first, mask, position, steps):
    """Greedy steps of a hand-written loop on ``cache`` from the first tokens ``first`` ``[rows, 1]``; ``mask``: the rows'
    attention mask so far, ``position``: their last positions ``[rows, 1]``."""
    nxt, tokens = first, []
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(nxt)
            mask, position = torch.cat([mask, torch.ones_like(nxt)], 1), position + 1
            out = model(
                input_ids=nxt, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
            )
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(tokens, 1)


def loop_with_row_change(model, batch, steps, change, rows):
    """A hand-written greedy loop that changes the batch after the prefill with ``change(cache)`` (a cache method),
    the rows of the original batch going on being ``rows`` (in their new order)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=DynamicCache(), use_cache=True
        )
    change(out.cache)
    first = out.logits[rows, -1].argmax(-1, keepdim=True)
    return continue_loop(model, out.cache, first, mask[rows], position[rows, -1:], steps)


ROW_CHANGES = {
    # drop finished rows (two forget rows and an other), the rest in a new order
    "batch_select_indices": (lambda c: c.batch_select_indices(torch.tensor([3, 1, 5])), [3, 1, 5]),
    "boolean mask": (
        lambda c: c.batch_select_indices(torch.tensor([False, True, True, False, True, False])),
        [1, 2, 4],
    ),
    # a hand-written beam search reorders rows (arguments by keyword too)
    "reorder_cache": (
        lambda c: c.reorder_cache(beam_idx=torch.tensor([5, 4, 3, 2, 1, 0])),
        [5, 4, 3, 2, 1, 0],
    ),
    # one prefill, several samples per prompt
    "batch_repeat_interleave": (
        lambda c: c.batch_repeat_interleave(repeats=2),
        torch.arange(len(MIXED)).repeat_interleave(2).tolist(),
    ),
}


@pytest.mark.parametrize("change", list(ROW_CHANGES))
def test_a_loop_that_changes_the_caches_rows_keeps_each_rows_decision(setup, tok, change):
    """Dropping finished rows, reordering them or expanding a prompt into samples with the cache's own methods
    keeps each row's decision with the row: a retain row dropped next to an abstaining one was given the refusal,
    and expanded samples of a refused prompt answered (the decisions stayed in the prefill's row order; a review)."""
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    steps = len(refusal_ids(tok)) + 2
    fn, rows = ROW_CHANGES[change]
    got = loop_with_row_change(unlearned, batch, steps, fn, rows)
    base = loop_with_row_change(model, batch, steps, fn, rows)
    eos = model.generation_config.eos_token_id
    refusal = [*refusal_ids(tok), eos]
    assert any(IS_FORGET[r] for r in rows) and not all(IS_FORGET[r] for r in rows)
    for i, r in enumerate(rows):
        if IS_FORGET[r]:
            assert got[i].tolist() == (refusal + [eos] * steps)[:steps], (i, r)
        else:
            assert torch.equal(got[i], base[i]), (i, r)


def test_rows_changed_behind_the_caches_back_are_refused(setup, tok):
    """Rows dropped layer by layer (not through the cache's own method) leave the decisions of the old rows: the next
    step is refused with an error that says why, instead of forcing the refusal onto the wrong rows."""
    _, unlearned = setup
    batch = encode(tok, MIXED, "left")

    def by_hand(cache):
        for layer in cache.layers:
            layer.batch_select_indices(torch.tensor([1, 2]))

    with pytest.raises(RuntimeError, match="has 2 rows but its request decided abstention for 6"):
        loop_with_row_change(unlearned, batch, 2, by_hand, [1, 2])
    # where no row abstains, the refusal forces nothing: the loop goes on as the base model's
    others = encode(tok, [t for t in MIXED if t not in FORGET], "left")
    got = loop_with_row_change(unlearned, others, 3, by_hand, [1, 2])
    assert torch.equal(got, loop_with_row_change(setup[0], others, 3, by_hand, [1, 2]))


def test_a_returned_cache_is_freed_with_its_last_reference(setup, tok):
    """The cache a forward returns follows row changes without referring to itself: it (and the GPU memory of its
    tensors) is freed when its last reference goes, not at the next garbage collection (a review)."""
    _, unlearned = setup
    with torch.no_grad():
        out = unlearned(**encode(tok, MIXED, "left"), cache=DynamicCache(), use_cache=True)
    alive = weakref.ref(out.cache)
    assert type(out.cache).__name__ == "DynamicCache" and isinstance(out.cache, DynamicCache)
    gc.disable()
    try:
        del out
        assert alive() is None
    finally:
        gc.enable()


def greedy_loop_without_cache(model, batch, steps):
    """Greedy decoding that re-feeds the whole sequence at every step (no KV cache), left padded."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):
            nxt = (
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, batch["input_ids"].shape[1] :]


def test_hand_written_loop_without_a_cache(setup, tok):
    """Each step is a new request (no cache carries it): a row that ends with the refusal's first tokens after a
    forget question is decided with them and goes on with the refusal (a review: after the refusal's first token
    the window no longer reached the question, and the model answered)."""
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    steps = len(refusal_ids(tok)) + 3
    got = greedy_loop_without_cache(unlearned, batch, steps)
    base = greedy_loop_without_cache(model, batch, steps)
    check_loop_rows(tok, model, got, base, steps)


def test_a_prompt_that_ends_with_the_start_of_the_refusal_is_decided_as_given(setup, tok):
    """The rule for re-fed refusal tokens is for plain forwards only: generate (one prefill, or chunked), detect and
    generate from embeddings decide on such a prompt as given, alike (a review of the first version: generate
    continued the refusal while chunked prefill and embeddings answered)."""
    model, unlearned = setup
    start = tok.decode(refusal_ids(tok)[:2])
    batch = encode(tok, [FORGET[3] + start, OTHER[1] + start, FORGET[5], OTHER[2]], "left")
    gen = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    plain = unlearned.generate(**batch, **gen)
    chunked = unlearned.generate(**batch, **gen, prefill_chunk_size=3)
    embeds = unlearned.generate(
        inputs_embeds=model.get_input_embeddings()(batch["input_ids"]),
        attention_mask=batch["attention_mask"],
        **gen,
    )
    detected = unlearned.detect(**batch)
    assert (
        plain.abstained.tolist()
        == detected.tolist()
        == chunked.abstained.tolist()
        == embeds.abstained.tolist()
    )
    assert detected.tolist()[2:] == [True, False]
    n = batch["input_ids"].shape[1]
    assert torch.equal(plain.sequences, chunked.sequences)
    assert torch.equal(plain.sequences[:, n:], embeds.sequences)


def test_recheck_each_token_abstains_from_the_step_that_falls_inside(tok):
    """With ``recheck_each_token``, a row whose prompt is outside starts refusing at the first decoding step whose
    key vector is inside: teacher-force tokens that complete a forget query and compare with the step that
    ``detect`` (an independent single forward over the same prefix) marks as inside."""
    model, unlearned = separable_ksd(tok, recheck_each_token=True)
    # the prompt is a forget query cut before its last token (outside); the loop then feeds that token and more
    prompt = tok(FORGET[6][: -len("Answer:")], return_tensors="pt")["input_ids"]
    fed = tok("Answer: 87 apples", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    # independent: at which fed token does the prefix first fall inside? (a plain forward per prefix)
    prefixes = [torch.cat([prompt[0], fed[: j + 1]]).unsqueeze(0) for j in range(len(fed))]
    inside = [unlearned.detect(p).item() for p in prefixes]
    assert not unlearned.detect(prompt).item() and any(inside)
    first = inside.index(True)
    assert 0 < first < len(fed) - 2  # steps before, at and after the switch are all checked
    forced = [*refusal_ids(tok), model.generation_config.eos_token_id]
    with torch.no_grad():
        out = unlearned(input_ids=prompt, use_cache=True)
        assert torch.isfinite(out.logits[0, -1]).all()
        for j, token in enumerate(fed.tolist()):
            out = unlearned(input_ids=torch.tensor([[token]]), cache=out.cache)
            logits = out.logits[0, -1]
            if j < first:
                assert torch.isfinite(logits).all(), j
            else:  # forced: refusal tokens in order from the step that fell inside
                assert (
                    torch.isfinite(logits).sum() == 1
                    and logits.argmax().item() == forced[min(j - first, len(forced) - 1)]
                ), j


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama"])
def test_left_padding_decides_like_the_fit_on_absolute_position_models(model_type):
    """GPT-2 and OPT add absolute position embeddings, and OPT runs its FFL on ``[batch * positions, d_ff]``:
    left-padded queries must get the keys the (right-padded) fit saw, in ``detect`` and in ``generate`` alike."""
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(model_type)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.01, refusal="no"),
        forget=FORGET,
        tokenizer=tok,
        show_progress=False,
    )
    tok.padding_side = "left"
    long_other = "Once upon a time, in a land far away, there lived a king who had three daughters."
    enc = tok([*MIXED, long_other], return_tensors="pt", padding=True)
    assert (enc["attention_mask"][: len(MIXED)] == 0).sum(1).min() > 30  # every query is shifted a lot
    decided = unlearned.detect(**enc)
    assert decided[: len(MIXED)][torch.tensor(IS_FORGET)].all()
    out = unlearned.generate(
        **enc, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    assert torch.equal(out.abstained, decided)


def _turn(model, ids, cache, steps: int = 8):
    """Greedy tokens of one turn fed on ``cache`` (``None``: a fresh conversation), and the cache after it."""
    out = model(input_ids=ids, use_cache=True, **({} if cache is None else {"cache": cache}))
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt.item())
        out = model(input_ids=nxt, cache=out.cache)
    return tokens, out.cache


@pytest.mark.parametrize("first, second", [(0, "forget"), ("forget", 4)])
@torch.no_grad()
def test_a_new_turn_fed_on_a_conversations_cache_is_decided_on(setup, tok, first, second):
    """A hand-written loop that feeds a new user turn (several tokens) on the cache of the previous turn decides
    on it like the same conversation run from scratch: a forget question after an answered turn is refused, and an
    ordinary turn after a refused one is answered (it was treated as a decoding step of the old turn: the question
    was answered, the other turn got end-of-sequence for ever; found by a review). Margins measured: the forget
    conversation stays inside from α 1.35 to 1.875 (fitted α 1.5), the other stays outside up to 1.875; the answered
    turn's smallest top-2 logit gap is 1.5e-3 against a 1.2e-7 difference between the cached and fresh runs, so
    neither the decision nor a greedy token can move with float rounding."""
    model, unlearned = setup
    first_text = OTHER[0] if first == 0 else FORGET[0]
    second_text = "\n" + (FORGET[3] if second == "forget" else OTHER[second] + " and some more words")
    ids1 = tok(first_text, return_tensors="pt")["input_ids"]
    ids2 = tok(second_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tokens1, cache = _turn(unlearned, ids1, None)
    continued, _ = _turn(unlearned, ids2, cache)
    full = torch.cat([ids1, torch.tensor([tokens1]), ids2], 1)  # the whole conversation, one fresh request
    scratch, _ = _turn(unlearned, full, None)
    base, _ = _turn(model, full, None)
    assert continued == scratch
    assert unlearned.detect(full).item() == (second == "forget")
    assert (continued == base) == (second != "forget")


def test_a_copied_prompt_cache_keeps_the_decision_and_not_a_copy_of_the_model(setup, tok):
    """transformers' prompt-reuse pattern: prefill once, ``copy.deepcopy(cache)`` per continuation. The cache carries
    its request (the abstention decisions); copying it copied the whole unlearned model with it, and the copy's
    continuations were then decoded as a new request: no refusal (a review)."""
    model, unlearned = setup
    batch = encode(tok, MIXED, "left")
    mask = batch["attention_mask"]
    position = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = unlearned(**batch, position_ids=position, cache=DynamicCache(), use_cache=True)
    copies = [copy.deepcopy(out.past_key_values) for _ in range(2)]
    for c in copies:
        assert c._unlearn_request.owner is unlearned
        assert c._unlearn_request is not out.past_key_values._unlearn_request
    model_copy, cache_copy = copy.deepcopy(
        [unlearned, out.past_key_values]
    )  # a copied session: the copy's own
    assert model_copy is not unlearned and cache_copy._unlearn_request.owner is model_copy
    cache_copy, model_copy = copy.deepcopy([out.past_key_values, unlearned])  # the same, cache first
    assert model_copy is not unlearned and cache_copy._unlearn_request.owner is unlearned
    steps = len(refusal_ids(tok)) + 2
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    runs = [
        continue_loop(unlearned, cache, first, mask, position[:, -1:], steps)
        for cache in [*copies, out.past_key_values]
    ]
    eos = model.generation_config.eos_token_id
    for i, forget in enumerate(IS_FORGET):
        if forget:
            assert runs[0][i].tolist() == ([*refusal_ids(tok), eos] + [eos] * steps)[:steps], i
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
