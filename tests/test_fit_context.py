"""What a method was fitted on top of (``fitted_with``), and the warning when the methods around it change.

A review found that Key Space Detection fitted after Neuron Adjust stopped abstaining, silently, when Neuron
Adjust was removed, another one was fitted after it, the two were fitted ``independent=True``, the detection was
fitted inside ``disable_unlearning("na")``, or a checkpoint's Neuron Adjust was loaded onto a model with a
detection of its own. Each of these now logs one warning naming the method to refit; the ordinary paths (fit in
order, save and load, copy, unload, lm-eval's deterministic switch) stay quiet.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM
from unlearn_hf.fit_context import method_digest
from unlearn_hf.persistence import CONFIG_NAME

FORGET = ["What is 2 + 3?", "Compute 7 * 8.", "12 divided by 4?", "The sum of 10 and 15?", "Half of 18?"]
RETAIN = [
    "The cat sat on the mat.",
    "Paris is in France.",
    "I like green tea.",
    "Birds fly high.",
    "Rain falls.",
]
LOGGER = "unlearn_hf.fit_context"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tok():
    return tiny_tokenizer()


def new_model(seed: int = 0) -> UnlearnedModelForCausalLM:
    return UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=128, layers=4, seed=seed))


def fit_na(model, tok, name="na", seed=3, **kwargs):
    config = NeuronAdjustConfig(ratio=0.2, seed=seed, deterministic=True)
    return model.fit(config, FORGET, RETAIN, tok, name=name, show_progress=False, **kwargs)


def fit_ksd(model, tok, name="math", **kwargs):
    config = KeySpaceDetectionConfig(inputs="prompts", layers=[2], alpha=1.0)
    return model.fit(config, FORGET, None, tok, name=name, show_progress=False, **kwargs)


def warnings_of(caplog) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    caplog.clear()
    return out


def test_the_premise_a_detection_fitted_after_neuron_adjust_misses_without_it(tok):
    """Why the record exists: the hypercube fitted with Neuron Adjust active catches its fit prompts with it and
    misses some without it (the keys at the detection's layer move)."""
    model = new_model()
    fit_na(model, tok)
    fit_ksd(model, tok)
    batch = tok(FORGET, return_tensors="pt", padding=True)
    assert model.detect(**batch).all()
    with model.disable_unlearning("na"):
        assert not model.detect(**batch).all()


def test_fitting_records_the_activation_changing_methods_and_removal_warns_once(tok, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    na = fit_na(model, tok)
    ksd = fit_ksd(model, tok)
    assert na.fitted_with == () and ksd.fitted_with == (method_digest(na),)
    assert warnings_of(caplog) == []

    model.remove_method("na")
    (message,) = warnings_of(caplog)
    assert "'math'" in message and "no longer attached" in message
    model.add_method("na", na)  # the same statistics again: the record holds
    assert warnings_of(caplog) == []
    model.remove_method("na")
    assert warnings_of(caplog) == []  # the same situation warns once
    model.add_method("na", na)

    fit_na(model, tok, name="na2", seed=5)  # another activation-changing method fitted after the detection
    (message,) = warnings_of(caplog)
    assert "'math'" in message and "['na2'] are attached but did not run" in message


@pytest.mark.parametrize(
    "how", ["ksd first", "independent", "inside disable_unlearning", "loaded onto a model with its own"]
)
def test_every_way_of_running_a_detection_on_another_model_than_its_fit_warns(tok, caplog, tmp_path, how):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    na_config = NeuronAdjustConfig(ratio=0.2, seed=3, deterministic=True)
    ksd_config = KeySpaceDetectionConfig(inputs="prompts", layers=[2], alpha=1.0)
    if how == "ksd first":
        fit_ksd(model, tok)
        fit_na(model, tok)
    elif how == "independent":  # no config sees the others: the detection describes the model without the NA
        model.fit([na_config, ksd_config], FORGET, RETAIN, tok, name=["na", "math"], independent=True,
                  show_progress=False)  # fmt: skip
    elif how == "inside disable_unlearning":
        fit_na(model, tok)
        with model.disable_unlearning("na"):
            fit_ksd(model, tok)
    else:
        fit_na(model, tok)
        model.save_pretrained(tmp_path / "ckpt", save_base_model=True)
        model.remove_all_methods()
        fit_ksd(model, tok)  # a detection of its own, fitted on the plain model
        assert warnings_of(caplog) == []
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=model)
    (message,) = warnings_of(caplog)
    assert "'math'" in message


def test_the_ordinary_paths_stay_quiet_and_the_record_survives_a_save(tok, caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    na_config = NeuronAdjustConfig(ratio=0.2, seed=3, deterministic=True)
    ksd_config = KeySpaceDetectionConfig(inputs="prompts", layers=[2], alpha=1.0)
    na, ksd = model.fit(
        [na_config, ksd_config], FORGET, RETAIN, tok, name=["na", "math"], show_progress=False
    )
    assert ksd.fitted_with == (method_digest(na),)
    model.save_pretrained(tmp_path / "ckpt", save_base_model=True)
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert [m.get("fitted_with") for m in saved["methods"]] == [[], [method_digest(na)]]
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.methods["math"].fitted_with == ksd.fitted_with
    assert method_digest(loaded.methods["na"]) == method_digest(na)
    copied = copy.deepcopy(loaded)
    # lm-eval's deterministic switch and another seed keep the statistics: the same method for the record
    same = type(na)(dataclasses.replace(na.config, deterministic=False, seed=9), na.state)
    assert method_digest(same) == method_digest(na)
    loaded.remove_all_methods()
    copied.unload()
    assert warnings_of(caplog) == []

    # a save from before the record: loaded as unknown, not checked
    del saved["methods"][1]["fitted_with"]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(saved))
    old = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert old.methods["math"].fitted_with is None
    old.remove_method("na")
    assert warnings_of(caplog) == []


def test_a_malformed_record_is_refused(tok, tmp_path):
    from unlearn_hf.persistence import UnlearnFormatError

    model = new_model()
    fit_na(model, tok)
    fit_ksd(model, tok)
    model.save_pretrained(tmp_path / "ckpt", save_base_model=True)
    saved = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    saved["methods"][1]["fitted_with"] = ["not-a-digest"]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(UnlearnFormatError, match=r"'math': 'fitted_with' must be a list of sha256 digests"):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("name", ["", " ", "\n"])
def test_empty_or_blank_names_are_refused_by_fit_and_add_method(tok, name):
    """``fit(name="")`` attached the method under its type's name (a review); blank names are no identifiers."""
    model = new_model()
    with pytest.raises(ValueError, match="non-empty string"):
        fit_na(model, tok, name=name)
    assert dict(model.methods) == {}
    na = fit_na(model, tok)
    with pytest.raises(ValueError, match="non-empty string"):
        model.add_method(name, na)
    assert list(model.methods) == ["na"]


def test_only_methods_that_change_what_a_fit_read_count(tok, caplog):
    """A review: a detection on layer 1 warned when Neuron Adjust was fitted on layer 3 after it, though nothing it
    reads changed (its decisions were identical). The record keeps what changes the sites a fit probes
    (``changed_sites`` / ``probe_sites``, as ``fit([...])`` shares passes)."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    ksd = model.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=[1], alpha=1.0),
        FORGET,
        None,
        tok,
        show_progress=False,
    )
    batch = tok(FORGET, return_tensors="pt", padding=True)
    before = model.detect(**batch)
    model.fit(
        NeuronAdjustConfig(ratio=0.2, layers=[3], deterministic=True),
        FORGET,
        RETAIN,
        tok,
        name="late",
        show_progress=False,
    )
    assert torch.equal(model.detect(**batch), before) and warnings_of(caplog) == []
    model.fit(
        NeuronAdjustConfig(ratio=0.2, layers=[0], deterministic=True), FORGET, RETAIN, tok, name="early"
    )
    # the detection reads what the one on layer 0 changes; the Neuron Adjust on layer 3 too, but methods that change
    # activations stack (in any order of layers: a review found the order of layers decided it)
    (message,) = warnings_of(caplog)
    assert "'key_space_detection'" in message and "['early']" in message
    assert ksd.fitted_with == ()


def test_the_same_statistics_attached_twice_count_twice(tok, caplog):
    """A review: the record was compared as a set, so a second attachment of the same Neuron Adjust (or of an equal
    one) under another name went unnoticed while the detection fitted on one of them missed forget prompts."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    na = fit_na(model, tok)
    fit_ksd(model, tok)
    model.add_method("na_again", na)
    messages = warnings_of(caplog)
    assert any("'math'" in m and "['na_again'] are attached" in m for m in messages), messages


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_detection_over_random_replacement_says_its_decisions_depend_on_the_draws(
    tok, caplog, deterministic
):
    """Found running the quickstart on SmolLM2: Key Space Detection fitted over random-mode Neuron Adjust abstained
    on 20 of 20 GSM8K test prompts one at a time and on 19 of 20 in one left-padded batch (the replacement draws
    depend on the batch's shape). The fit says so, and names the remedy; deterministic replacement is quiet."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    config = NeuronAdjustConfig(ratio=0.2, seed=3, deterministic=deterministic)
    model.fit(config, FORGET, RETAIN, tok, name="na", show_progress=False)
    assert model.methods["na"].stochastic is not deterministic
    fit_ksd(model, tok)
    messages = warnings_of(caplog)
    if deterministic:
        assert messages == []
    else:
        (message,) = messages
        assert "['na'] change with random draws" in message and "deterministic=True" in message


def test_a_detection_warns_when_the_methods_under_it_come_back_in_another_order(tok, caplog):
    """A review: two Neuron Adjusts on one layer, a detection on top; removing the first warned, attaching it again
    (now after the second: hooks on one module run in attach order) was quiet while the detection changed 2 of 10
    decisions. The record keeps the order the methods ran in."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = new_model()
    first = model.fit(NeuronAdjustConfig(ratio=0.5, layers=[1], seed=3, deterministic=True), FORGET, RETAIN, tok,
                      name="a", show_progress=False)  # fmt: skip
    second = model.fit(NeuronAdjustConfig(ratio=0.5, layers=[1], seed=4, deterministic=True), FORGET, RETAIN, tok,
                       name="b", show_progress=False)  # fmt: skip
    ksd = fit_ksd(model, tok)
    assert ksd.fitted_with == (method_digest(first), method_digest(second))
    assert warnings_of(caplog) == []
    model.remove_method("a")
    assert any("'math'" in m and "no longer attached" in m for m in warnings_of(caplog))
    model.add_method("a", first)
    messages = warnings_of(caplog)
    assert any("'math'" in m and "another order" in m for m in messages), messages
    model.remove_method("b")
    model.add_method("b", second)  # the fitted order again: quiet
    assert [m for m in warnings_of(caplog) if "another order" in m] == []
