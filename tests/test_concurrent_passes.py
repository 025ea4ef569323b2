"""A fit's own passes (the probe, KSD's calibration) while another thread runs the same base model: the other
forward must run as if no fit were going on, and the fit must read only its own forwards.

The other thread's forward is placed deterministically inside the pass: a hook of the test holds the pass's
forward (in the fitting thread) until the other thread has finished a whole forward through the same modules,
while the pass's hooks are registered. Before the mend the other forward fed the pass's statistics and met its
early stop (the library's ``StopForward`` raised in the other thread).
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import tiny_llama

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.data import DataSpec

OTHER = {"input_ids": torch.arange(5, 14).view(1, 9), "attention_mask": torch.ones(1, 9, dtype=torch.long)}


class OtherForwardInside:
    """A pre-hook on ``module``: the first time it runs in this thread, it lets a thread run ``run()`` to the end
    and waits for it; the thread's exception or result is kept."""

    def __init__(self, module: torch.nn.Module, run) -> None:
        self.run, self.main = run, threading.get_ident()
        self.result, self.error, self.done = None, None, False
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        if self.done or threading.get_ident() != self.main:
            return
        self.done = True

        def target() -> None:
            try:
                self.result = self.run()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.error = err

        t = threading.Thread(target=target)
        t.start()
        t.join(timeout=120)
        assert not t.is_alive(), "the other thread's forward did not finish"

    def remove(self) -> None:
        self.handle.remove()


def base_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**OTHER).logits


@pytest.fixture
def model():
    return tiny_llama(layers=3)


def texts(n: int, offset: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(offset)
    return [{"input_ids": torch.randint(3, 49152, (2, 11), generator=gen)} for _ in range(n)]


def test_a_probe_reads_only_its_own_forwards(model):
    batches = texts(3, 0)
    alone = probe(model, batches, site=("pre", "key"), show_progress=False)
    expected = base_logits(model)
    layer = model.model.layers[1]  # inside the probed part: the probe stops after its last layer (2)
    other = OtherForwardInside(layer, lambda: base_logits(model))
    try:
        got = probe(model, batches, site=("pre", "key"), show_progress=False)
    finally:
        other.remove()
    assert other.done and other.error is None, repr(other.error)
    torch.testing.assert_close(other.result, expected, rtol=0, atol=0)
    for kind in ("pre", "key"):
        for i, st in alone[kind].layers.items():
            assert got[kind].layers[i].count == st.count, (kind, i)
            torch.testing.assert_close(got[kind].layers[i].mean, st.mean, rtol=0, atol=0)


def test_a_fit_beside_a_served_wrapper_of_the_same_base(model, smol_tokenizer):
    """A wrapper serving generate while a second wrapper of the same base fits Neuron Adjust."""
    served = UnlearnedModelForCausalLM.from_base(model)
    fitting = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = texts(2, 1), texts(2, 2)
    config = NeuronAdjustConfig(ratio=0.1, deterministic=True)
    alone = fitting.fit(config, forget, retain, name="alone").state_dict()
    fitting.remove_method("alone")
    expected = base_logits(model)
    other = OtherForwardInside(model.model.layers[1], lambda: base_logits(served))
    try:
        got = fitting.fit(config, forget, retain, name="na").state_dict()
    finally:
        other.remove()
    assert other.error is None, repr(other.error)
    torch.testing.assert_close(other.result, expected, rtol=0, atol=0)
    for k, v in alone.items():
        assert torch.equal(got[k], v), k


def test_ksd_calibration_reads_only_its_own_forwards(model, smol_tokenizer):
    questions = [f"What is {a} plus {b}?" for a, b in zip(range(3, 13), range(20, 30))]
    retain = [f"Write a function named f{i} that returns {i}." for i in range(8)]
    config = KeySpaceDetectionConfig(max_layers=1, max_false_rate=0.5)
    spec = dict(batch_size=4, show_progress=False)
    fitting = UnlearnedModelForCausalLM.from_base(model)
    alone = fitting.fit(config, questions, retain, smol_tokenizer, name="alone", **spec).state_dict()
    fitting.remove_method("alone")
    expected = base_logits(model)
    calls = {"n": 0}
    real_plan = DataSpec.plan

    def plan(self, *args, **kwargs):  # the calibration plans its batches after the fit's probe
        calls["n"] += 1
        return real_plan(self, *args, **kwargs)

    DataSpec.plan = plan
    others = []
    try:
        # one forward of the other thread inside the probe's first forward, and (re-armed) inside calibration's
        other = OtherForwardInside(model.model.layers[0], lambda: base_logits(model))
        others.append(other)
        got_state = None

        def rearm(module, args):
            if other.done and calls["n"] >= 2 and len(others) == 1:
                others.append(OtherForwardInside(model.model.layers[0], lambda: base_logits(model)))

        h = model.model.layers[0].register_forward_pre_hook(rearm, prepend=True)
        try:
            got_state = fitting.fit(
                config, questions, retain, smol_tokenizer, name="ksd", **spec
            ).state_dict()
        finally:
            h.remove()
    finally:
        DataSpec.plan = real_plan
        for o in others:
            o.remove()
    assert len(others) == 2 and all(o.done for o in others)
    for o in others:
        assert o.error is None, repr(o.error)
        torch.testing.assert_close(o.result, expected, rtol=0, atol=0)
    for k, v in alone.items():
        assert torch.equal(got_state[k], v), k
