"""What users pass that is not the plain type: numpy numbers in configs (accepted, normalised to Python's) and the
``datasets`` containers that are not one data set (refused in words, before any probing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny_models import tiny_llama

from unlearn_hf import (
    DataSpec,
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.data import iter_token_batches
from unlearn_hf.methods.ratio_search import split_examples


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25)])
def test_numpy_numbers_in_configs_are_normalised(value):
    config = NeuronAdjustConfig(ratio=value, seed=np.int64(7), max_retain_drop=np.float32(0.5))
    assert (config.ratio, config.seed, config.max_retain_drop) == (0.25, 7, 0.5)
    assert type(config.ratio) is float and type(config.seed) is int
    json.dumps(config.to_dict())  # plain JSON, as saved
    assert SelectivePruningConfig(ratio=value).ratio == 0.25
    assert KeySpaceDetectionConfig(alpha=np.float32(1.5)).alpha == 1.5


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.1", np.float32("nan")])
def test_non_numbers_are_still_refused_by_name(value):
    with pytest.raises(ValueError, match="ratio must be a finite number"):
        NeuronAdjustConfig(ratio=value)


@pytest.fixture(scope="module")
def unlearned():
    return UnlearnedModelForCausalLM.from_base(tiny_llama(layers=2))


def test_a_dataset_dict_is_refused_with_its_splits(unlearned, smol_tokenizer):
    ds = Dataset.from_dict({"text": ["a b c", "d e f"]})
    with pytest.raises(ValueError, match=r"DatasetDict of splits \['train', 'test'\]: pass one split"):
        unlearned.fit(
            NeuronAdjustConfig(ratio=0.1),
            forget=DatasetDict({"train": ds, "test": ds}),
            retain=ds,
            tokenizer=smol_tokenizer,
            show_progress=False,
        )
    assert not unlearned.methods


def test_a_streaming_dataset_is_refused_in_words(unlearned, smol_tokenizer):
    ds = Dataset.from_dict({"text": ["a b c", "d e f"]})
    with pytest.raises(ValueError, match="streaming IterableDataset has no length"):
        unlearned.fit(
            NeuronAdjustConfig(ratio=0.1),
            forget=ds.to_iterable_dataset(),
            retain=ds,
            tokenizer=smol_tokenizer,
            show_progress=False,
        )
    assert not unlearned.methods


# found by a review of the Python API: each of these failed with a torch or tokenizer error that named nothing
@pytest.mark.parametrize(
    "forget, kwargs, error, message",
    [
        (["", ""], {}, ValueError, "tokenize to no tokens at all"),
        ((t for t in ["a b c", "d e f"]), {}, TypeError, "pass texts as a list of strings or dicts"),
        ({"text": ["a b c", "d e f"]}, {}, TypeError, "Dataset.from_dict"),
        (
            [{"q": "a b", "a": "c"}, {"q": "d e", "a": "f"}],
            {"prompt_column": "q"},
            ValueError,
            "name both prompt_column and completion_column \\(got 'q' and None\\)",
        ),
    ],
    ids=["empty-texts", "generator", "dict-of-lists", "prompt-column-alone"],
)
def test_inputs_a_fit_cannot_read_are_named(unlearned, smol_tokenizer, forget, kwargs, error, message):
    pairs = "prompt_column" in kwargs
    retain = [{"q": "x y", "a": "z"}] * 2 if pairs else ["x y z", "u v w"]
    config = NeuronAdjustConfig(ratio=0.1, tokens="completion" if pairs else "all")
    with pytest.raises(error, match=message):
        unlearned.fit(config, forget, retain, smol_tokenizer, show_progress=False, **kwargs)
    assert not unlearned.methods


@pytest.mark.parametrize("mode", ["all", "last"])
@pytest.mark.parametrize("spec", [DataSpec(), DataSpec(batch_size=1), DataSpec(max_batch_tokens=8)])
def test_an_empty_text_is_refused_whatever_the_batching(smol_tokenizer, spec, mode):
    """An empty text among others passed with the default batches (it was padding) and failed with batches of one
    or a small token budget, where it formed a batch of no tokens (a review)."""
    with pytest.raises(
        ValueError, match=r"1 of 3 examples tokenize to no tokens at all .* example\(s\) \[1\]"
    ):
        list(iter_token_batches(["a b c", "", "d e"], smol_tokenizer, mode=mode, spec=spec)[1])


def test_a_dataset_column_that_is_not_text_is_named(unlearned, smol_tokenizer):
    """A ``None`` in a data set's column reached the tokenizer, whose error named no example (a review)."""
    forget = Dataset.from_dict({"text": ["a b c", None]})
    with pytest.raises(TypeError, match=r"Example 1 does not hold text \(got NoneType\)"):
        unlearned.fit(
            NeuronAdjustConfig(ratio=0.1), forget, ["x y", "z w"], smol_tokenizer, show_progress=False
        )
    pairs = Dataset.from_dict({"q": ["a b", "c d"], "a": ["e", None]})
    with pytest.raises(TypeError, match=r"Example 1 does not hold text \(got NoneType\)"):
        unlearned.fit(
            NeuronAdjustConfig(ratio=0.1, tokens="completion"),
            pairs,
            pairs,
            smol_tokenizer,
            prompt_column="q",
            completion_column="a",
            show_progress=False,
        )
    assert not unlearned.methods


# found by a review of the data paths
@pytest.mark.parametrize("kind", ["dict", "dataframe"])
def test_ksd_refuses_columns_instead_of_fitting_on_their_names(unlearned, smol_tokenizer, kind):
    """Iterating a dict of lists or a DataFrame yields its column names: Key Space Detection fitted on the two
    "questions" 'question' and 'answer'."""
    import pandas as pd

    columns = {"question": ["What is 2 + 3?", "What is 4 + 5?"], "answer": ["5", "9"]}
    data = columns if kind == "dict" else pd.DataFrame(columns)
    with pytest.raises(
        TypeError, match=r"of columns: pass a list of questions \(e.g. list\(df\['question'\]\)\)"
    ):
        unlearned.fit(
            KeySpaceDetectionConfig(),
            data,
            None,
            smol_tokenizer,
            prompt_column="question",
            completion_column="answer",
            show_progress=False,
        )
    assert not unlearned.methods


def test_ksd_refuses_the_splits_of_a_dataset_as_retain_groups(unlearned, smol_tokenizer):
    ds = Dataset.from_dict({"text": ["Write a sort.", "Write a parser."]})
    questions = [f"What is {a} + {a}?" for a in range(10)]
    with pytest.raises(
        ValueError, match=r"DatasetDict of splits \['train', 'test'\]: calibration would read"
    ):
        unlearned.fit(
            KeySpaceDetectionConfig(),
            questions,
            DatasetDict({"train": ds, "test": ds}),
            smol_tokenizer,
            show_progress=False,
        )
    assert not unlearned.methods


@pytest.mark.parametrize("kind", ["splits", "streaming"])
def test_ratio_auto_refuses_containers_in_the_words_of_a_fixed_ratio(unlearned, smol_tokenizer, kind):
    ds = Dataset.from_dict({"text": [f"text number {i}" for i in range(12)]})
    data = DatasetDict({"train": ds}) if kind == "splits" else ds.to_iterable_dataset()
    message = "DatasetDict of splits" if kind == "splits" else "streaming IterableDataset has no length"
    with pytest.raises(ValueError, match=message):
        unlearned.fit(NeuronAdjustConfig(ratio="auto"), data, ds, smol_tokenizer, show_progress=False)
    assert not unlearned.methods


@pytest.mark.parametrize("fit_many", [False, True])
def test_named_retain_sets_given_to_a_neuron_method_are_explained(unlearned, smol_tokenizer, fit_many):
    """Named retain sets are Key Space Detection's; given to Neuron Adjust (alone or in ``fit([...])``) they failed
    with "Batch 0 is not a mapping with an 'input_ids' tensor" (a review)."""
    forget = [f"What is {a} + {a}?" for a in range(6)]
    retain = {"code": ["def f(): return 1", "def g(): return 2"], "prose": ["A cat sat.", "It rained."]}
    config = NeuronAdjustConfig(ratio=0.1)
    configs = [config, KeySpaceDetectionConfig()] if fit_many else config
    with pytest.raises(
        TypeError, match=r"retain data is a dict \(keys \['code', 'prose'\]\): Neuron Adjust reads"
    ):
        unlearned.fit(configs, forget, retain, smol_tokenizer, show_progress=False)
    assert not unlearned.methods


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_rows_longer_than_a_learned_position_table_are_cut_to_it(model_type, caplog):
    """A GPT-2 / OPT whose position table is shorter than max_length (512 by default) failed with a raw IndexError
    on a long text (a review); rows are now cut to the table with a warning, as a fit with that max_length."""
    import logging

    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    texts = ["ab" * 150, "cd" * 80, "efg" * 20]  # 300 characters: longer than the 128 positions
    model = tiny_model(model_type, vocab_size=len(tok))
    config = SelectivePruningConfig(ratio=0.1)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with caplog.at_level(logging.WARNING):
        got = unlearned.fit(config, texts, texts[::-1], tok, name="long", show_progress=False)
    assert "longer than the 128 positions of the model's learned position embeddings" in caplog.text
    unlearned.remove_method("long")  # the next fit must probe the plain model, as this one did
    want = unlearned.fit(config, texts, texts[::-1], tok, name="cut", max_length=128, show_progress=False)
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_tokenizer_output_of_lists_gets_the_return_tensors_hint(unlearned, smol_tokenizer):
    enc = smol_tokenizer(["a b c", "d e"], padding=True)  # lists, no return_tensors
    with pytest.raises(TypeError, match="tokenizer output of lists: tokenize with return_tensors='pt'"):
        unlearned.fit(NeuronAdjustConfig(ratio=0.1), dict(enc), ["x y z", "u v"], show_progress=False)


def test_tokenized_batches_keep_their_other_columns_and_refuse_model_inputs(smol_tokenizer):
    """Columns that do not change the forward (the text, labels, a dataset's ids, special_tokens_mask, all-zero
    token_type_ids) are left alone, as a tokenized ``datasets`` column set brings them; model inputs a fit would
    drop (images, positions) are refused by name (a review: the first version refused every other key)."""
    enc = smol_tokenizer(
        ["a b c", "d e f"], return_tensors="pt", padding=True, return_special_tokens_mask=True
    )
    batch = {
        **enc,
        "text": ["a b c", "d e f"],
        "label": torch.tensor([0, 1]),
        "idx": torch.tensor([7, 8]),
        "token_type_ids": torch.zeros_like(enc["input_ids"]),
    }
    got = list(iter_token_batches([batch], smol_tokenizer)[1])
    assert len(got) == 1 and torch.equal(got[0].input_ids, enc["input_ids"])
    for key, value in (
        ("pixel_values", torch.zeros(2, 3, 4, 4)),
        ("position_ids", torch.arange(enc["input_ids"].shape[1]).expand(2, -1)),
        ("token_type_ids", torch.ones_like(enc["input_ids"])),
    ):
        with pytest.raises(ValueError, match=rf"has \['{key}'\], model inputs that a fit does not pass"):
            list(iter_token_batches([{**enc, key: value}], smol_tokenizer)[1])


def test_tokenized_batches_a_fit_cannot_read_are_named_before_any_forward(smol_tokenizer):
    """A review: a 1-D or 3-D batch, float ids and a select_mask of another shape failed inside the forward with an
    index or broadcast error, an empty batch was called 'empty strings?', and a mask of 2s (packed sequences) was read
    as a padding mask, changing the positions unseen."""
    enc = dict(smol_tokenizer(["a b c", "d e"], return_tensors="pt", padding=True))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for batch, error, message in (
        (
            {"input_ids": ids[0]},
            ValueError,
            r"shape \(\d+,\); a batch is \[rows, tokens\] \(one row: input_ids\[None\]\)",
        ),
        ({"input_ids": ids[None]}, ValueError, r"shape \(1, 2, \d+\); a batch is \[rows, tokens\]"),
        ({"input_ids": ids.float()}, TypeError, "input_ids are torch.float32; token ids are integers"),
        ({"input_ids": ids[:0]}, ValueError, r"Batch 1 is empty \(input_ids of shape \(0, \d+\)\)"),
        ({**enc, "select_mask": mask[:, :1]}, ValueError, r"select_mask \(2, 1\) != input_ids"),
        ({**enc, "attention_mask": mask * 2}, ValueError, "values other than 0 and 1"),
    ):
        with pytest.raises(error, match=message):
            list(iter_token_batches([enc, batch], smol_tokenizer)[1])


@pytest.mark.parametrize(
    "data, message",
    [
        ("a b c", "a single string, not examples"),
        (Path("train.jsonl"), "a path, not examples: .*load_dataset"),
        ({"a b c", "d e f"}, "a set, which has no order"),
    ],
    ids=["string", "path", "set"],
)
@pytest.mark.parametrize("method", ["neuron_adjust", "key_space_detection"])
def test_what_is_no_collection_of_examples_is_named(unlearned, smol_tokenizer, data, message, method):
    """A review: a Path failed with "'PosixPath' object is not iterable", a set or a numpy array were read as tokenized
    batches ("Batch 0 is not a mapping"); a set would have been read in no fixed order."""
    import pandas as pd

    if method == "neuron_adjust":
        config, retain = NeuronAdjustConfig(ratio=0.1), ["x y z", "u v w"]
    else:
        config, retain = KeySpaceDetectionConfig(layers=[0], alpha=1.0), None
        message = message.replace("a single string, not examples", "not one string")
    with pytest.raises(TypeError, match=message):
        unlearned.fit(config, data, retain, smol_tokenizer, show_progress=False)
    if method == "neuron_adjust":
        with pytest.raises(TypeError, match=r"a pandas DataFrame: pass a Dataset"):
            unlearned.fit(
                config, pd.DataFrame({"text": ["a b c"]}), retain, smol_tokenizer, show_progress=False
            )
    assert not unlearned.methods


def test_a_numpy_array_or_pandas_series_of_texts_fits_as_their_list(unlearned, smol_tokenizer):
    """They are no Sequence, so they were read as tokenized batches ('Batch 0 is not a mapping'); Key Space Detection
    read them, and must still (a review of the first mend, which refused them there too)."""
    import pandas as pd

    forget = [f"{a} plus {b} is {a + b}" for a, b in zip(range(8), range(3, 11))]
    retain = [f"the {w} sat on the mat" for w in ("cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak")]
    config = NeuronAdjustConfig(ratio=0.1, deterministic=True)
    kw = dict(tokenizer=smol_tokenizer, show_progress=False)
    ksd = KeySpaceDetectionConfig(layers=[0], alpha=1.0)

    def fitted(config, *data):  # alone on the model: a fit probes with the attached methods active
        try:
            return unlearned.fit(config, *data, **kw).state_dict()
        finally:
            unlearned.remove_all_methods()

    reference, reference_ksd = fitted(config, forget, retain), fitted(ksd, forget)
    for convert in (np.array, pd.Series):
        got, got_ksd = fitted(config, convert(forget), convert(retain)), fitted(ksd, convert(forget))
        for a, b in ((got, reference), (got_ksd, reference_ksd)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert split_examples(convert(forget), 0.25, "forget") == split_examples(
            forget, 0.25, "forget"
        )  # "auto"


@pytest.mark.parametrize("method", ["neuron_adjust", "selective_pruning", "key_space_detection"])
def test_an_error_in_the_data_names_the_data_set_it_is_in(unlearned, smol_tokenizer, method):
    """Forget and retain are read alike, so "Example 2 is a NoneType" or "Query 2 is an empty question" did not say
    which of the two sets to look in (a review). The message now starts with the set: forget, retain, or the named
    retain set of a detection."""
    good = [f"What is {a} + {b}?" for a in range(4) for b in range(3)]
    bad = ["The cat sat.", "Paris is in France.", None]
    if method == "key_space_detection":  # calibrated (the default): the retain questions are read
        config, bad[2] = KeySpaceDetectionConfig(), " "
        calls = [(good, {"code": bad}, "retain \\(code\\)"), (good, bad, "retain"), (bad, None, "forget")]
    else:
        config = (NeuronAdjustConfig if method == "neuron_adjust" else SelectivePruningConfig)(ratio=0.1)
        ids = smol_tokenizer(["a b c", "d e f"], return_tensors="pt")
        outside = {**ids, "input_ids": torch.full_like(ids["input_ids"], len(smol_tokenizer) + 5)}
        calls = [(good, bad, "retain"), (bad, good, "forget"), (good, [outside], "retain")]
    for forget, retain, where in calls:
        with pytest.raises((ValueError, TypeError), match=f"^The {where} data: "):
            unlearned.fit(config, forget, retain, smol_tokenizer, show_progress=False)
        assert not unlearned.methods


def test_ratio_auto_names_a_bad_example_by_its_index_in_the_data_given(unlearned, smol_tokenizer):
    """``ratio="auto"`` holds some examples out before reading them: a bad one was named by its index within its
    part ("Example 6" for the user's 7), without the set (a review). The examples are checked before the split."""
    forget = [f"What is {a} + {b}? It is {a + b}." for a in range(5) for b in range(2)]
    retain = [f"Sentence number {i} is plain English." for i in range(10)]
    retain[7] = 5
    with pytest.raises(TypeError, match=r"^The retain data: Example 7 is a int"):
        unlearned.fit(NeuronAdjustConfig(ratio="auto"), forget, retain, smol_tokenizer, show_progress=False)
    retain[7] = ""  # an empty text, found when tokenized: it was named by its index within its part
    with pytest.raises(
        ValueError, match=r"^The retain data: 1 of 10 examples tokenize to no tokens .* \[7\]"
    ):
        unlearned.fit(NeuronAdjustConfig(ratio="auto"), forget, retain, smol_tokenizer, show_progress=False)
    assert not unlearned.methods
