"""Which tokens a fit reads: a prompt/completion pair is the text it joins, with the prompt/completion boundary
exact (BPE merges across the join; SentencePiece marks a word start where a part starts alone; a tokenizer may
append EOS), truncation on the side that matters, and a warning that counts truncated rows."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from unlearn_hf.data import DataSpec, iter_token_batches

PAIRS = [
    {"prompt": "Q: hi\nA: ", "completion": "Paris"},  # " Paris" is one token of the joined text
    {"prompt": "Question: What is the capital of France?\nAnswer:", "completion": " Paris, on the Seine."},
    {"prompt": "2 + 2 =", "completion": "4"},
]
SPEC = DataSpec(prompt_column="prompt", completion_column="completion", batch_size=8)


def expected_rows(tok, pairs, part: str) -> list[list[int]]:
    """The ids a fit must read, computed independently from the character offsets of the joined text: its tokens
    that lie within the prompt's characters (from the start on; special tokens there included), or the others."""
    out = []
    for p in pairs:
        enc = tok(p["prompt"] + p["completion"], return_offsets_mapping=True)
        n = 0
        while n < len(enc["input_ids"]) and enc["offset_mapping"][n][1] <= len(p["prompt"]):
            n += 1
        out.append(enc["input_ids"][:n] if part == "prompt" else enc["input_ids"][n:])
    return out


def read_rows(tok, pairs, part: str) -> list[list[int]]:
    _, batches = iter_token_batches(pairs, tok, mode=part, spec=SPEC)
    (batch,) = list(batches)
    return [batch.input_ids[r][batch.select[r]].tolist() for r in range(len(pairs))], batch


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("part", ["prompt", "completion"])
def test_prompt_and_completion_masks_are_exact_at_the_boundary(smol_tokenizer, side, part):
    tok = smol_tokenizer
    joined = tok(PAIRS[0]["prompt"] + PAIRS[0]["completion"])["input_ids"]
    assert len(joined) < len(tok(PAIRS[0]["prompt"])["input_ids"]) + 1  # the merge the old count tripped over
    old_side = tok.padding_side
    tok.padding_side = side
    try:
        got, batch = read_rows(tok, PAIRS, part)
    finally:
        tok.padding_side = old_side
    assert sorted(got) == sorted(expected_rows(tok, PAIRS, part))  # rows come longest first
    assert all(got)  # "Q: hi\nA: " + "Paris" used to select no completion token at all
    real = batch.attention_mask.bool()
    assert torch.equal(
        real[:, 0] if side == "right" else real[:, -1], torch.ones(len(PAIRS), dtype=torch.bool)
    )
    rows = sorted(batch.input_ids[r][real[r]].tolist() for r in range(len(PAIRS)))
    assert rows == sorted(tok(p["prompt"] + p["completion"])["input_ids"] for p in PAIRS)  # the joined texts


def sentencepiece_like(eos: bool) -> PreTrainedTokenizerFast:
    """A Llama-2-style fast tokenizer (Metaspace, a word-start marker before the first word) adding BOS, and EOS
    too with ``eos`` (Llama's add_eos_token=True)."""
    corpus = ["What is the capital of France? Paris", "Q: 2+3=5", "The answer is 42.", "Paris is big"] * 50
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(corpus, trainer)
    single = "<s> $A </s>" if eos else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@pytest.mark.parametrize("eos", [False, True])
def test_a_pair_reads_the_text_it_joins_with_sentencepiece_and_an_appended_eos(eos):
    """Part by part, "2+3=" + "5" was read as "2+3= 5" (the completion alone got a word-start marker) and an EOS the
    tokenizer appends came between prompt and completion (a review)."""
    tok = sentencepiece_like(eos)
    pairs = [
        {"prompt": "Q: 2+3=", "completion": "5"},
        {"prompt": "What is the capital of France?", "completion": " Paris"},
        {"prompt": "What is the capital of France? ", "completion": "Paris"},
    ]
    alone = tok(pairs[0]["completion"], add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0].startswith("\u2581")  # the marker part by part would add
    for part in ("prompt", "completion"):
        got, batch = read_rows(tok, pairs, part)
        assert sorted(got) == sorted(expected_rows(tok, pairs, part))
        assert all(got)
    rows = [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(len(pairs))]
    assert sorted(rows) == sorted(tok(p["prompt"] + p["completion"])["input_ids"] for p in pairs)
    assert all((row[-1] == tok.eos_token_id) == eos for row in rows)  # EOS last, after the completion


def test_truncated_rows_are_counted_in_one_warning(smol_tokenizer, caplog):
    tok = smol_tokenizer
    texts = ["short", "a much longer text " * 10, "another rather long text " * 10]
    spec = DataSpec(batch_size=2, max_length=8)
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.data"):
        _, batches = iter_token_batches(texts, tok, mode="all", spec=spec)
        batches = list(batches)
    assert caplog.text.count("rows are longer") == 1
    assert "2 of 3 rows are longer than max_length=8 tokens: only their beginning is read" in caplog.text
    first = tok(texts[1])["input_ids"][:8]
    rows = [
        b.input_ids[r][b.attention_mask[r].bool()].tolist() for b in batches for r in range(len(b.input_ids))
    ]
    assert first in rows


def test_query_mode_keeps_the_end_of_long_prompts(smol_tokenizer, caplog):
    tok = smol_tokenizer
    text = "word " * 40 + "the question's own last words"
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.data"):
        _, batches = iter_token_batches([text], tok, mode="last", spec=DataSpec(max_length=8))
        (batch,) = list(batches)
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == tok(text)["input_ids"][-8:]
    assert "only their end is read" in caplog.text
    assert tok.truncation_side == "right"  # the caller's tokenizer is not changed


def test_no_warning_when_nothing_is_truncated(smol_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.data"):
        _, batches = iter_token_batches(["a b c", "d e"], smol_tokenizer, spec=DataSpec(max_length=512))
        list(batches)
    assert "rows are longer" not in caplog.text


# found by a review of the data paths
def test_text_that_carries_its_own_bos_token_gets_it_once(bos_tokenizer):
    """A chat-templated text (``apply_chat_template(..., tokenize=False)``) passed as plain text starts with the BOS
    token; a tokenizer that adds BOS itself doubled it ([1, 1, ...]), which generation never shows the model. The
    probe's rows and Key Space Detection's prompts and templates now hold it once, other texts still get it."""
    from unlearn_hf.methods.key_space_detection.rendering import QueryRenderer

    tok = bos_tokenizer
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith(tok.bos_token) and tok(chat)["input_ids"][:2] == [tok.bos_token_id] * 2
    expected = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert expected[0] == tok.bos_token_id != expected[1]
    _, batches = iter_token_batches([chat, "What is 2 + 2?"], tok, spec=DataSpec(batch_size=1))
    rows = [b.input_ids[0][b.attention_mask[0].bool()].tolist() for b in batches]
    assert sorted(rows, key=len) == sorted([expected, tok("What is 2 + 2?")["input_ids"]], key=len)

    (prompt,) = QueryRenderer(tok, inputs="prompts").render([chat])[0]
    assert prompt.input_ids == expected
    template = tok.bos_token + "Q: {question}\nA:"
    renderer = QueryRenderer(tok, chat=False, bare=False, templates=[template])
    (rendered,) = renderer.render(["What is 2 + 2?"])[0]
    assert rendered.input_ids[:2] == [tok.bos_token_id, tok.encode("Q", add_special_tokens=False)[0]]
    assert tok.convert_ids_to_tokens(rendered.input_ids[rendered.question_end]).endswith("?")


def test_the_bos_rule_drops_only_a_bos_the_tokenizer_added(bos_tokenizer, smol_tokenizer):
    """A tokenizer that adds no BOS keeps a text's own leading BOS tokens, even two of them (a review: the first
    rule looked at the ids only); the evaluation's prompts and prompt + answer texts get BOS once, as the probe's."""
    from unlearn_hf.evaluation.batching import encode_pairs, encode_prompts
    from unlearn_hf.tokenizing import BosRule, TextTokenizer

    bos = smol_tokenizer.bos_token
    assert (
        BosRule.of(smol_tokenizer) == BosRule() and BosRule.of(bos_tokenizer).id == bos_tokenizer.bos_token_id
    )
    twice = bos + bos + "hi"
    plain = TextTokenizer.of(smol_tokenizer, "all")
    assert plain.encode(twice) == smol_tokenizer(twice)["input_ids"] and plain.encode(twice)[:2] == [1, 1]
    assert TextTokenizer.of(bos_tokenizer, "all").encode(twice)[:3] == [
        1,
        1,
        bos_tokenizer.encode("hi", add_special_tokens=False)[0],
    ]

    tok = bos_tokenizer
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert encode_prompts(tok, [chat, "hi"], 512) == [expected, tok("hi")["input_ids"]]
    ((ids, start, lost, _),) = encode_pairs(tok, [chat], [chat + "4"], 512)
    assert ids[: len(expected)] == expected and start == len(expected) and lost == 0


def test_probing_text_leaves_the_users_tokenizer_as_it_was(smol_tokenizer):
    """The probe pads with the EOS token when there is no pad token and truncates queries on the left, without
    copying the tokenizer (a copy per probe took 0.08 s) and without changing it."""
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.pad_token = None
    tok.truncation_side = "right"
    spec = DataSpec(max_length=3, batch_size=2)
    ((batch),) = list(iter_token_batches(["a b c d e f", "a"], tok, mode="last", spec=spec)[1])
    assert tok.pad_token is None and tok.truncation_side == "right"
    real = [row[m.bool()].tolist() for row, m in zip(batch.input_ids, batch.attention_mask)]
    assert real == [tok("a b c d e f")["input_ids"][-3:], tok("a")["input_ids"]]
    assert batch.input_ids[1][~batch.attention_mask[1].bool()].tolist() == [tok.eos_token_id] * 2


def test_tokenized_batches_without_attention_mask_count_every_token_and_say_so_once(caplog):
    """Without an attention_mask every token counts (as in transformers): right for rows of one length, padding
    counted for padded rows, which the probe cannot tell apart; a batch of several rows without a mask is named
    in one warning (a review found the padding counted silently)."""
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    data = [{"input_ids": ids}, {"input_ids": ids.clone()}, {"input_ids": torch.tensor([[1, 2]])}]
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.data"):
        batches = list(iter_token_batches(data)[1])
    assert [int(b.select.sum()) for b in batches] == [6, 6, 2]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Batch 0 has 2 rows and no attention_mask" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.data"):
        list(iter_token_batches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])[1])
        list(iter_token_batches([{"input_ids": torch.tensor([[1, 2]])}])[1])
    assert not caplog.records
