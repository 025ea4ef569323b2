"""Neuron Adjust where it used to break: layers of different widths (pruned or NAS models) that share one block of
random thresholds agree on its layout; scores that must not depend on the batch (deterministic mode)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer
from transformers.models.llama.modeling_llama import LlamaMLP

from unlearn_hf import NeuronAdjustConfig, UnlearnedModelForCausalLM
from unlearn_hf.context import current_context
from unlearn_hf.methods.neuron_adjust import layer as layer_module
from unlearn_hf.methods.neuron_adjust import sampling

WIDTHS = [64, 48]  # rows * 64 > 4096 >= rows * 48 for 65..85 rows: the two layers' own choices disagree


def mixed_width_llama() -> torch.nn.Module:
    model = tiny_llama(layers=2, vocab_size=100)
    config = model.config
    config.intermediate_size = WIDTHS[1]
    torch.manual_seed(5)
    model.model.layers[1].mlp = LlamaMLP(config)
    # per-layer widths, as configs of pruned / NAS models declare them (Llama's strict config would refuse a list)
    config.__dict__["intermediate_size"] = list(WIDTHS)
    return model.eval()


@pytest.fixture(scope="module")
def unlearned():
    model = mixed_width_llama()
    tok = tiny_tokenizer()
    u = UnlearnedModelForCausalLM.from_base(model)
    assert [s.d_ff for s in u.ffl_sites] == WIDTHS
    texts = ["1 + 1 = 2", "3 * 4 = 12", "10 - 7 = 3", "9 / 3 = 3"]
    other = ["the cat sat", "a red fox", "blue sky today", "green tea"]
    u.fit(NeuronAdjustConfig(ratio=0.2, seed=1), texts, other, tok, show_progress=False)
    return u


@pytest.mark.parametrize("rows", [1, 70, 100])
def test_every_row_count_runs_and_matches_the_gather_path(unlearned, rows, monkeypatch):
    """70 rows: the wide layer alone would gather and the narrow one alone take the full width (the crash of
    the issue); the result must equal the all-gather computation with the same draws."""
    ids = torch.randint(4, 100, (1, rows))
    torch.manual_seed(0)
    with torch.no_grad():
        got = unlearned(input_ids=ids).logits
    monkeypatch.setattr(layer_module, "FULL_WIDTH_MAX_NUMEL", 0)  # every layer gathers
    with torch.no_grad():
        reference = unlearned(input_ids=ids).logits
    with torch.no_grad(), unlearned.disable_unlearning():
        base = unlearned(input_ids=ids).logits
    assert torch.allclose(got, reference, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, base)  # the methods did act


@pytest.mark.parametrize("deterministic", [True, False])
def test_scores_do_not_depend_on_the_batch_in_deterministic_mode(deterministic):
    """A text scored alone and as the third row of a padded batch of four: deterministic Neuron Adjust gives the same logits
    (up to float rounding of the batched matmuls); random replacement draws per position of the batch, so its
    logits differ, which is why scoring should use ``deterministic=True`` (README)."""
    tok = tiny_tokenizer()
    model = tiny_llama(layers=2, vocab_size=100)
    u = UnlearnedModelForCausalLM.from_base(model)
    forget = ["1 + 1 = 2", "3 * 4 = 12", "10 - 7 = 3", "9 / 3 = 3"]
    u.fit(
        NeuronAdjustConfig(ratio=0.3, seed=1, deterministic=deterministic),
        forget,
        ["the cat sat", "a red fox", "blue sky today", "green tea"],
        tok,
        show_progress=False,
    )
    text = "12 + 30 = 42"
    alone = tok([text], return_tensors="pt")
    batch = tok(["a much longer other text here", "x", text, "5 * 5 = 25"], return_tensors="pt", padding=True)
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        one = u(**alone).logits[0]
        many = u(**batch).logits[2, :n]
    with torch.no_grad(), u.disable_unlearning():
        assert not torch.allclose(u(**alone).logits[0], one)  # the method acts on this text
    assert torch.allclose(one, many, atol=1e-5) == deterministic


def test_deterministic_block_replaces_as_the_deterministic_config_in_its_thread_only():
    """NeuronAdjust.deterministic(): inside the block the random-mode method computes exactly what the same state
    fitted with deterministic=True computes, nothing is re-attached, and another thread keeps drawing. (lm-eval's
    model re-attached the methods instead: for a moment none was attached, the user's handles were replaced, and the
    change outlived the evaluation; reviews.)"""
    import threading

    from unlearn_hf import NeuronAdjust

    tok = tiny_tokenizer()
    u = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=2, vocab_size=100))
    forget = ["1 + 1 = 2", "3 * 4 = 12", "10 - 7 = 3", "9 / 3 = 3"]
    other = ["the cat sat", "a red fox", "blue sky today", "green tea"]
    method = u.fit(NeuronAdjustConfig(ratio=0.3, seed=1), forget, other, tok, show_progress=False)
    det = NeuronAdjust(NeuronAdjustConfig(ratio=0.3, seed=1, deterministic=True), method.state)
    twin = UnlearnedModelForCausalLM.from_base(u.get_base_model())
    batch = tok(["12 + 30 = 42", "a much longer other text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        drawn = u(**batch).logits
        attached = (dict(u.methods), dict(u.attachments))
        with method.deterministic():
            assert method.deterministic_now and (dict(u.methods), dict(u.attachments)) == attached
            inside = u(**batch).logits
            elsewhere = []
            thread = threading.Thread(target=lambda: elsewhere.append(u(**batch).logits))
            thread.start()
            thread.join()
        twin.remove_all_methods()
        twin.add_method("neuron_adjust", det)
        assert torch.equal(inside, twin(**batch).logits)  # bit for bit the deterministic rule
        assert not torch.allclose(inside, drawn)
        # the other thread drew, from the same seed (to float rounding: its matmuls may split work otherwise)
        torch.testing.assert_close(elsewhere[0], drawn, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(elsewhere[0], inside, rtol=1e-3, atol=1e-4)
        assert not method.deterministic_now and torch.equal(u(**batch).logits, drawn)


def test_draws_hold_one_layer_in_a_large_forward_and_drop_the_prefill_when_decoding(monkeypatch):
    """A forward above GROUP_DRAW_MAX_NUMEL draws layer by layer into one buffer of the largest layer's size; the
    decoding steps after it hold only their own small block, not the prefill's buffer."""
    model = tiny_llama(layers=4)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    tok = tiny_tokenizer()
    texts = ["the quick brown fox " * 3, "jumps over the lazy dog " * 3]
    unlearned.fit(NeuronAdjustConfig(ratio=0.2), texts, ["0123456789 " * 4] * 2, tok, show_progress=False)
    attachment = unlearned.attachments["neuron_adjust"]
    counts = [adj.num_neurons for _, adj in sorted(attachment.layers.items())]
    prompt = tok(["a b c d e f g h i j k l"] * 3, return_tensors="pt")
    rows = prompt.input_ids.numel()
    # the prefill is large, the decoding steps small
    monkeypatch.setattr(sampling, "GROUP_DRAW_MAX_NUMEL", rows * sum(counts) - 1)
    monkeypatch.setattr(layer_module, "FULL_WIDTH_MAX_NUMEL", 0)
    held = []  # (rows of the call, values held by the draws) at the last adjusted layer of every forward

    def record(module, args, output):
        draws = current_context().request.data["neuron_adjust"]
        held.append((output.shape[:-1].numel(), sum(b[0].numel() for b in draws.buffers.values())))

    last = max(attachment.layers)
    handle = model.model.layers[last].mlp.gate_proj.register_forward_hook(record)
    try:
        unlearned.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert held[0] == (rows, rows * max(counts))  # one layer's worth, not rows * sum(counts)
    assert max(counts) < sum(counts)
    assert held[1:] == [(3, 3 * sum(counts))] * 2  # each step's block; the prefill's is gone


def test_each_device_decides_its_own_draw(monkeypatch):
    """On a model split over two devices, each device's layers choose block or per-layer draws from their own
    number of thresholds (the first device's choice used to apply to the second: a device holding many selected
    neurons drew them all in one block). Two devices are simulated: layer 0 reports ``cpu:0``, the others ``cpu``."""
    from unlearn_hf.methods.neuron_adjust import method as na_method

    model = tiny_llama(layers=4)
    first = model.model.layers[0].mlp.gate_proj
    real = na_method.module_device
    monkeypatch.setattr(
        na_method, "module_device", lambda m: torch.device("cpu", 0) if m is first else real(m)
    )
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    tok = tiny_tokenizer()
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.3, seed=2), ["1 + 1 = 2", "3 * 4 = 12"] * 2, ["the cat", "a red fox"] * 2, tok,
        show_progress=False,
    )  # fmt: skip
    attachment = unlearned.attachments["neuron_adjust"]
    assert {str(adj.device) for adj in attachment.layers.values()} == {"cpu:0", "cpu"}
    k_first = attachment.layers[0].num_neurons
    k_rest = sum(adj.num_neurons for i, adj in attachment.layers.items() if i != 0)
    ids = torch.randint(4, 60, (2, 40), generator=torch.Generator().manual_seed(0))
    rows = ids.numel()
    assert k_first < k_rest
    monkeypatch.setattr(sampling, "GROUP_DRAW_MAX_NUMEL", rows * k_first)  # small for cpu:0, large for cpu
    monkeypatch.setattr(layer_module, "FULL_WIDTH_MAX_NUMEL", 0)
    held = set()  # (kind of buffer, values held): a block (False: the gather layout) or a per-layer scratch

    def record(module, args, output):
        draws = current_context().request.data["neuron_adjust"]
        held.update((kind, b[0].numel()) for (_, _, _, kind), b in draws.buffers.items())

    last = max(attachment.layers)
    handle = model.model.layers[last].mlp.gate_proj.register_forward_hook(record)
    try:
        with torch.no_grad():
            unlearned(input_ids=ids)
    finally:
        handle.remove()
    widest_rest = max(adj.num_neurons for i, adj in attachment.layers.items() if i != 0)
    # cpu:0 drew its one layer in a block; cpu drew layer by layer into one layer's scratch (not a block of k_rest)
    assert held == {(False, rows * k_first), ("layer", rows * widest_rest)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 100])
def test_the_first_forward_after_a_cast_draws_as_every_later_one(dtype, rows):
    """Random mode draws its thresholds in the dtype the output is computed in (float64 for a float64 model, else
    float32); the first forward after a cast must not draw in the layer's previous dtype (which gave it other
    thresholds than every later identical request). One row: one block for all layers; 100 rows: layer by layer."""
    model = tiny_llama(layers=2, vocab_size=100)
    tok = tiny_tokenizer()
    u = UnlearnedModelForCausalLM.from_base(model)
    texts = ["1 + 1 = 2", "3 * 4 = 12", "10 - 7 = 3", "9 / 3 = 3"]
    u.fit(
        NeuronAdjustConfig(ratio=0.2, seed=1), texts, ["the cat sat", "a red fox"], tok, show_progress=False
    )
    ids = torch.randint(4, 100, (1, rows), generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    with torch.no_grad():
        first, second = (u(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second)
