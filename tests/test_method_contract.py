"""The contract every registered unlearning method keeps, tested once for all of them.

A new method gets these tests by adding one row to ``ROWS``: how to build a config and its data. The first test
fails for a registered method without a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import hook_count, tiny_llama, tiny_tokenizer

from unlearn_hf import UnlearnedModelForCausalLM
from unlearn_hf.methods import METHOD_CLASSES, AbstainingAttachment, AbstainingMethod, Attachment

VOCAB = 128


def batches(seed: int, n: int = 2, rows: int = 6, length: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, VOCAB, (rows, length), generator=g)} for _ in range(n)]


@dataclasses.dataclass
class Row:
    """How to fit one method in these tests: its config, and whether it is fitted on retain data."""

    config: Callable[[], Any]
    retain: bool = True


#: method_type -> row. Add a row here for a new method.
ROWS: dict[str, Row] = {
    "neuron_adjust": Row(lambda: _na_config()),
    "selective_pruning": Row(lambda: _sp_config()),
    "key_space_detection": Row(lambda: _ksd_config(), retain=False),
}


def _na_config():
    from unlearn_hf import NeuronAdjustConfig

    return NeuronAdjustConfig(ratio=0.2, seed=3)


def _sp_config():
    from unlearn_hf import SelectivePruningConfig

    return SelectivePruningConfig(ratio=0.2)


def _ksd_config():
    from unlearn_hf import KeySpaceDetectionConfig

    return KeySpaceDetectionConfig(layers=[1], alpha=1.0)


FORGET = batches(0)
RETAIN = batches(1)
OTHER = batches(2, n=1)[0]


def fitted(method_type: str, model: torch.nn.Module | None = None):
    """``(base, unlearned A, fitted method)``: the method fitted on a tiny Llama and attached to A."""
    base = model if model is not None else tiny_llama(vocab_size=VOCAB, layers=3)
    a = UnlearnedModelForCausalLM.from_base(base)
    row = ROWS[method_type]
    method = a.fit(
        row.config(), FORGET, RETAIN if row.retain else None, tiny_tokenizer(), show_progress=False
    )
    return base, a, method


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


PARAMS = pytest.mark.parametrize("method_type", sorted(METHOD_CLASSES))


def test_every_registered_method_has_a_contract_row():
    assert set(METHOD_CLASSES) == set(ROWS), "add a row to ROWS for every registered method"


@PARAMS
def test_fitted_method_is_immutable_and_attaching_does_not_change_it(method_type):
    _, a, method = fitted(method_type)
    assert type(method) is METHOD_CLASSES[method_type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.config.eps = 1.0
    with pytest.raises(TypeError):
        method.state["extra"] = torch.zeros(1)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    b = UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=VOCAB, layers=3))
    b.add_method("again", method)
    b.remove_method("again")
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert isinstance(a.attachments[method_type], Attachment)
    assert a.attachments[method_type].method is method and a.attachments[method_type].model is a


@PARAMS
def test_one_fitted_method_on_two_models_at_once(method_type):
    base, a, method = fitted(method_type)
    b = UnlearnedModelForCausalLM.from_base(base)
    b.add_method("other", method)
    assert a.attachments[method_type] is not b.attachments["other"]
    batch = FORGET[0]
    # both run the method, identically, and the base model stays plain
    assert torch.equal(logits(a, batch), logits(b, batch))
    if isinstance(method, AbstainingMethod):
        # the reproduction of the bug: A's decision must stay A's after B attached the same object
        flags_a = a.detect(batch["input_ids"])
        assert flags_a.all()  # every fitted query is inside at α = 1 (same batch layout as the fit)
        assert torch.equal(b.detect(batch["input_ids"]), flags_a)
        out = a.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.abstained, flags_a)
        assert torch.equal(out.abstained_by[method_type], flags_a)
    else:
        assert not torch.equal(logits(a, batch), logits(base, batch))
    # removing it from B leaves A as it was
    expected = logits(a, OTHER)
    b.remove_method("other")
    assert torch.equal(logits(a, OTHER), expected)
    assert torch.equal(logits(b, OTHER), logits(base, OTHER))


@PARAMS
def test_disable_and_remove_restore_the_base_model(method_type):
    base, a, _ = fitted(method_type)
    reference = logits(base, OTHER)
    with a.disable_unlearning():
        assert torch.equal(logits(a, OTHER), reference)
    with a.disable_unlearning(method_type):
        assert torch.equal(logits(a, OTHER), reference)
    hooks = hook_count(base)
    assert hooks == len(a.attachments[method_type].hooks.handles) > 0
    a.remove_method(method_type)
    assert hook_count(base) == 0 and not a.attachments and not a.methods
    assert torch.equal(logits(a, OTHER), reference)


@PARAMS
def test_save_and_load_round_trip(method_type, tmp_path):
    base, a, method = fitted(method_type)
    a.save_pretrained(
        tmp_path / "saved", base_model_name_or_path="tiny-llama"
    )  # a name only; loaded onto a base
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved", base_model=tiny_llama(VOCAB, 3))
    again = loaded.methods[method_type]
    assert type(again) is type(method) and again.config == method.config
    assert again.state_dict().keys() == method.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in method.state_dict().items())
    for batch in (FORGET[0], OTHER):
        assert torch.equal(logits(loaded, batch), logits(a, batch))
    if isinstance(method, AbstainingMethod):
        assert torch.equal(loaded.detect(OTHER["input_ids"]), a.detect(OTHER["input_ids"]))


@PARAMS
def test_abstaining_methods_implement_the_abstention_contract(method_type):
    _, a, method = fitted(method_type)
    attachment = a.attachments[method_type]
    assert isinstance(method, AbstainingMethod) == isinstance(attachment, AbstainingAttachment)
    assert method.abstains == isinstance(method, AbstainingMethod) == a.has_abstention
    if not isinstance(method, AbstainingMethod):
        with pytest.raises(RuntimeError, match="No abstaining method"):
            a.detect(OTHER["input_ids"])
        return
    # detect == generate's decision, per row, for rows inside and outside
    batch = {"input_ids": torch.cat([FORGET[1]["input_ids"][:3], OTHER["input_ids"][:3]])}
    flags = a.detect(batch["input_ids"])
    assert flags[:3].all()
    out = a.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.abstained, flags)
    # the rows that do not abstain continue exactly as the base model
    with a.disable_unlearning():
        plain = a.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences[~flags], plain[~flags])


def test_registry_knows_every_method_folder_and_names_are_unique():
    import pkgutil

    import unlearn_hf.methods as methods_pkg

    folders = {info.name for info in pkgutil.iter_modules(methods_pkg.__path__) if info.ispkg}
    assert folders == {cls.__module__.split(".")[2] for cls in METHOD_CLASSES.values()}
    shorts = [cls.short_name for cls in METHOD_CLASSES.values()]
    labels = [cls.label for cls in METHOD_CLASSES.values()]
    assert len(set(shorts)) == len(shorts) and len(set(labels)) == len(labels) and all(shorts)


def test_a_duplicate_registration_is_an_error():
    from unlearn_hf.methods import NeuronAdjust, register_method

    class Impostor(NeuronAdjust):
        pass

    with pytest.raises(ValueError, match="already registered as 'neuron_adjust'"):
        register_method(Impostor)

    class OtherType(NeuronAdjust):
        short_name = "na"

    OtherType.config_class = type("OtherConfig", (NeuronAdjust.config_class,), {"method_type": "other_type"})
    with pytest.raises(ValueError, match=r"already registered as 'neuron_adjust' \('na'\)"):
        register_method(OtherType)
    assert METHOD_CLASSES["neuron_adjust"] is NeuronAdjust and "other_type" not in METHOD_CLASSES
    register_method(NeuronAdjust)  # registering the same class again changes nothing
    assert METHOD_CLASSES["neuron_adjust"] is NeuronAdjust


@PARAMS
def test_configs_validate_alike(method_type):
    """Every float setting of every config refuses the same bad values (one set of validators)."""
    cls = METHOD_CLASSES[method_type].config_class
    config = ROWS[method_type].config()
    floats = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(config, f.name), float)]
    assert floats, "every method has float settings (ratio, eps, alpha)"
    for name in floats:
        for bad in (True, float("nan"), float("inf"), -1.0, 0.0, "0.1", None):
            with pytest.raises(ValueError, match=name):
                dataclasses.replace(config, **{name: bad})
    with pytest.raises(ValueError, match="layers"):
        dataclasses.replace(config, layers=[True])
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="something_else"):
        cls.from_dict({**config.to_dict(), "method_type": "something_else"})


def test_seeds_are_64_bit():
    from unlearn_hf import NeuronAdjustConfig

    assert NeuronAdjustConfig(seed=2**64 - 1).seed == 2**64 - 1
    for bad in (2**64, -(2**63) - 1, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            NeuronAdjustConfig(seed=bad)


EXTRA_METHOD = '''
import dataclasses

import torch

from unlearn_hf.methods import Attachment, MethodConfig, UnlearningMethod, register_method
from unlearn_hf.methods import config as cfg


@dataclasses.dataclass(frozen=True)
class DampConfig(MethodConfig):
    method_type = "damp"
    factor: float = 0.5

    def __post_init__(self):
        self._set("factor", cfg.positive_float("factor", self.factor))


@register_method
class Damp(UnlearningMethod):
    """Scales every key vector by ``factor`` (a stand-in for a real method)."""

    config_class = DampConfig
    short_name = "damp"
    label = "Damp"
    needs_retain = False
    cli_options = ()

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec, show_progress=True):
        return cls(config, {"factor": torch.tensor([config.factor], dtype=torch.float32)})

    @classmethod
    def state_spec(cls, config, state):
        return {"factor": ((1,), torch.float32)}

    def attach(self, model, hooks):
        factor = float(self.state["factor"])
        for site in model.ffl_sites:
            hooks.forward_pre_hook(site.key, lambda ctx, key: key * factor)
        return Attachment(self, model, hooks.method_name, hooks)
'''


def test_a_fourth_method_is_one_folder(tmp_path, monkeypatch):
    """A method written in one folder (here a plug-in package found through the entry point group) is fitted,
    run, saved and loaded, offered by the CLI and named in model cards, with no list edited anywhere."""
    from importlib.metadata import EntryPoint

    from unlearn_hf.cli.main import build_parser
    from unlearn_hf.methods import registry
    from unlearn_hf.model_card import ModelCardInfo, render_model_card

    (tmp_path / "damp_method").mkdir()
    (tmp_path / "damp_method" / "__init__.py").write_text(EXTRA_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint("damp", "damp_method", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        registry.discover()
        assert (
            "damp" in METHOD_CLASSES and list(registry.by_short_name())[-1] != "damp"
        )  # abstaining ones last
        assert (
            "damp"
            in build_parser().parse_args(["fit", "--method", "damp", "--forget", "x", "--output", "o"]).method
        )
        base = tiny_llama(vocab_size=VOCAB, layers=3)
        a = UnlearnedModelForCausalLM.from_base(base)
        method = a.fit(METHOD_CLASSES["damp"].config_class(factor=0.25), FORGET, show_progress=False)
        assert not torch.equal(logits(a, OTHER), logits(base, OTHER))
        a.save_pretrained(tmp_path / "saved", base_model_name_or_path="tiny-llama")
        loaded = UnlearnedModelForCausalLM.from_pretrained(
            tmp_path / "saved", base_model=tiny_llama(VOCAB, 3)
        )
        assert loaded.methods["damp"].config == method.config
        assert torch.equal(logits(loaded, OTHER), logits(a, OTHER))
        card = render_model_card(
            ModelCardInfo(
                base_model="tiny-llama",
                forget_skill="x",
                retain_skills=[],
                methods=[{"name": "damp", "config": method.config.to_dict()}],
                repo_id="me/tiny",
            )
        )
        assert "### Damp (`damp`)" in card.text
    finally:
        registry._METHODS.pop("damp", None)
    assert "damp" not in METHOD_CLASSES
