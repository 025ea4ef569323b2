"""Non-finite activations (float16 overflow, NaN that padding spreads through an attention implementation): a probe
refuses them with the site and layers named, Key Space Detection's calibration names the queries it cannot place, and
at run time a row whose key vector holds a NaN or an inf abstains (it fails closed) instead of counting as
outside."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_ksd import FORGET, N_LAYERS, OTHER, encode, separable_ksd
from tiny_models import tiny_llama

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.methods.key_space_detection.hypercube import KeySpaceLayer
from unlearn_hf.sites import find_ffl_sites

#: Appended to the rows whose activations the tests poison (after a space: one token of its own).
MARK = "~"


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread."""


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


class Poison:
    """Sets the activations of one site to NaN at the last position of every row that contains ``mark`` (the
    model's input ids are read by a pre-hook on the model), as a broken forward would, before any other hook of the
    site reads them."""

    def __init__(
        self, model, module: torch.nn.Module, mark: int, on_input: bool, value: float = float("nan")
    ) -> None:
        self.mark, self.ids, self.value = mark, None, value
        self.handles = [model.register_forward_pre_hook(self._read_ids, with_kwargs=True)]
        if on_input:
            hook = module.register_forward_pre_hook(lambda m, args: (self._spoil(args[0]),), prepend=True)
        else:
            hook = module.register_forward_hook(lambda m, args, out: self._spoil(out), prepend=True)
        self.handles.append(hook)

    def _read_ids(self, module, args, kwargs) -> None:
        self.ids = kwargs.get("input_ids", args[0] if args else None)

    def _spoil(self, x: torch.Tensor) -> torch.Tensor:
        rows = (self.ids == self.mark).any(1)
        if x.shape[:2] != self.ids.shape or not rows.any():
            return x
        x = x.clone()
        x[rows, -1] = self.value
        return x

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def mark_id(tok) -> int:
    ids = tok(" " + MARK, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def test_a_nan_key_vector_is_inside_the_hypercube():
    layer = KeySpaceLayer(torch.zeros(4), torch.ones(4), k=2.0, alpha=1.0, device="cpu")
    nan, inf = float("nan"), float("inf")
    keys = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [9.0, 0.0, 0.0, 0.0], [0.0, nan, 0.0, 0.0], [0.0, 0.0, -inf, 0.0]]
    )
    assert layer.inside(keys).tolist() == [True, False, True, True]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_row_whose_key_is_not_finite_abstains_and_the_others_are_untouched(tok, value):
    """Left padding: the last position is each row's last real token, where the decision reads and the poison
    lands."""
    model, unlearned = separable_ksd(tok)
    site = find_ffl_sites(model)[1]
    rows = [OTHER[0], OTHER[1] + " " + MARK, FORGET[0]]
    enc = encode(tok, rows, side="left")
    reference = unlearned.detect(**enc).tolist()
    assert reference == [False, False, True]
    poison = Poison(model, site.key, mark_id(tok), on_input=True, value=value)
    try:
        assert unlearned.detect(**enc).tolist() == [False, True, True]
    finally:
        poison.remove()


@pytest.mark.parametrize("site_kind", ["pre", "key"])
def test_the_probe_refuses_nan_activations_naming_site_and_layer(tok, site_kind):
    """Poisoned at layer 2, the NaN flows on into layer 3: both are named."""
    model = tiny_llama(layers=N_LAYERS)
    site = find_ffl_sites(model)[2]
    module = site.key if site_kind == "key" else site.pre
    poison = Poison(model, module, mark_id(tok), on_input=site_kind == "key")
    texts = [*OTHER, OTHER[0] + " " + MARK]
    try:
        with pytest.raises(
            ValueError, match=rf"NaN or inf activations at the {site_kind} site of layers \[2, 3\]"
        ):
            probe(model, texts, tok, site=site_kind, show_progress=False)
        probe(model, OTHER, tok, site=site_kind, show_progress=False)  # the clean rows alone are fine
    finally:
        poison.remove()


@pytest.mark.parametrize("method", ["na", "sp", "ksd"])
def test_fits_refuse_nan_activations_and_attach_nothing(tok, method):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    site = find_ffl_sites(model)[1]
    on_key = method != "na"
    poison = Poison(model, site.key if on_key else site.pre, mark_id(tok), on_input=on_key)
    forget = [*FORGET[:6], FORGET[6] + " " + MARK]
    config = {
        "na": NeuronAdjustConfig(ratio=0.1),
        "sp": SelectivePruningConfig(ratio=0.1),
        "ksd": KeySpaceDetectionConfig(layers=[1], alpha=1.0),
    }[method]
    try:
        with pytest.raises(
            ValueError, match=r"NaN or inf activations at the (pre|key) site of layers \[1[,\]]"
        ):
            unlearned.fit(config, forget, OTHER, tokenizer=tok, show_progress=False)
    finally:
        poison.remove()
    assert unlearned.methods == {}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_calibration_names_the_queries_it_cannot_place(tok, value):
    """The forget questions probe cleanly; one retain question of the calibration gives a NaN key."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sites = find_ffl_sites(model)
    poisons = [Poison(model, s.key, mark_id(tok), on_input=True, value=value) for s in sites]
    retain = [*OTHER, *(o + " !" for o in OTHER), OTHER[2] + " " + MARK]
    config = KeySpaceDetectionConfig(inputs="prompts", window=1, max_layers=1)
    try:
        with pytest.raises(ValueError, match=r"NaN or inf key vectors at layer \d+ for 1 of"):
            unlearned.fit(config, FORGET, retain, tokenizer=tok, show_progress=False)
    finally:
        for p in poisons:
            p.remove()
    assert unlearned.methods == {}
