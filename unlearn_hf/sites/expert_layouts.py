"""How an experts module stores its experts and is called: the layouts of transformers 5.

* ``"top_k"``: the experts modules of ``use_experts_implementation`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS,
  ...): ``forward(hidden [T, h], top_k_index [T, k], top_k_weights [T, k])``; expert ``e`` computes only the tokens
  routed to it and its output is weighted afterwards. Flags ``has_gate``, ``is_concatenated``, ``is_transposed``,
  ``has_bias``, ``has_post_expert_norm`` and the method ``_apply_gate`` describe the computation.
* ``"scaled_rows"``: Llama 4's ``Llama4TextExperts``: ``forward(routed_in [E * T, h])`` computes every expert on
  every token, block ``e`` of the rows holding each token already scaled by its routing weight for expert ``e``
  (0 for a token not routed to it, whose output is then 0); weights ``gate_up_proj [E, h, 2I]`` (gate, then up),
  ``down_proj [E, I, h]``, ``act_fn``. Expert ``e``'s tokens are the rows of its block that are not all zero. (A
  routed token whose weight underflows to 0, as a sigmoid of a router logit below about -17 does in float16, has a
  zero row and counts as not routed: its output is 0 either way.)
* ``"top_k"`` with ``weights="stacked"``: DBRX's ``DbrxExperts``: called as the first layout (``hidden`` may be
  ``[batch, seq, h]``), its experts' weights stacked in 2-D parameters of its ``mlp``: ``w1``, ``v1``, ``w2``
  ``[E * I, h]`` (gate, up, down), ``w2(act(w1 x) * v1 x)``; the pre-activation site is the gate's output.

In every layout, expert ``e``'s sites are the output of its up (or fused gate/up) projection and the input of its down
projection over its tokens (:mod:`.experts`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertsLayout:
    """The layout of one experts module (see the module docstring).

    Attributes:
        routing: ``"top_k"`` or ``"scaled_rows"``.
        has_gate: the up projection is a fused gate/up projection (its gate enters the activation).
        gate: where the gate sits in the fused output (see :data:`~.ffl_site.GATE_LAYOUTS`), ``None`` without one.
        transposed: weights stored ``[E, in, out]`` (``x @ W``) rather than ``[E, out, in]``.
        has_bias: the projections have biases ``<name>_bias [E, out]``.
        weights: ``"fused"`` (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``) or ``"stacked"`` (DBRX).
    """

    routing: str
    has_gate: bool
    gate: str | None
    transposed: bool
    has_bias: bool
    weights: str = "fused"

    @property
    def up_name(self) -> str:
        """The name of the weight whose output is the pre-activation site."""
        if self.weights == "stacked":
            return "mlp.w1"
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def down_name(self) -> str:
        """The name of the weight whose input is the key site."""
        return "mlp.w2" if self.weights == "stacked" else "down_proj"


def _stacked(module: nn.Module, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s ``[I, h]`` slice of a DBRX weight ``mlp.<name>`` ``[E * I, h]``."""
    weight = getattr(module.mlp, name)
    return weight.view(module.num_experts, -1, weight.shape[-1])[expert]


def expert_weight(module: nn.Module, layout: ExpertsLayout, role: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weight of the pre-activation (``role="pre"``) or key (``"key"``) site's projection."""
    if layout.weights == "stacked":
        return _stacked(module, "w1" if role == "pre" else "w2", expert)
    return getattr(module, layout.up_name if role == "pre" else "down_proj")[expert]


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of an experts module with 3-D (DBRX: stacked 2-D) weights; ``None`` for any other module."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return None
    mlp, names = getattr(module, "mlp", None), ("w1", "v1", "w2")
    if (
        isinstance(mlp, nn.Module)
        and all(isinstance(getattr(mlp, n, None), torch.Tensor) and getattr(mlp, n).dim() == 2 for n in names)
        and callable(getattr(mlp, "activation_fn", None))
        and mlp.w1.shape == mlp.v1.shape == mlp.w2.shape
        and mlp.w1.shape[0] % module.num_experts == 0
        and list(inspect.signature(type(module).forward).parameters)[1:]
        == ["hidden_states", "top_k_index", "top_k_weights"]
    ):
        return ExpertsLayout("top_k", False, None, False, False, weights="stacked")
    down = getattr(module, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return None
    if all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "has_bias")):
        gate = (
            ("first_half" if getattr(module, "is_concatenated", True) else "even")
            if module.has_gate
            else None
        )
        return ExpertsLayout(
            "top_k", bool(module.has_gate), gate, bool(module.is_transposed), bool(module.has_bias)
        )
    up = getattr(module, "gate_up_proj", None)
    if (
        isinstance(up, torch.Tensor)
        and up.dim() == 3
        and callable(getattr(module, "act_fn", None))
        and up.shape[0] == down.shape[0] == module.num_experts
        and up.shape[2] == 2 * down.shape[1]
        and up.shape[1] == down.shape[2]
        and list(inspect.signature(type(module).forward).parameters)[1:] == ["hidden_states"]
    ):
        return ExpertsLayout("scaled_rows", True, "first_half", True, False)
    return None


def expert_widths(module: nn.Module, layout: ExpertsLayout) -> tuple[int, int]:
    """``(hidden, I)`` of an experts module, from its down projection's weight."""
    if layout.weights == "stacked":
        return module.mlp.w1.shape[1], module.mlp.w1.shape[0] // module.num_experts
    down = module.down_proj
    return (down.shape[2], down.shape[1]) if layout.transposed else (down.shape[1], down.shape[2])


def token_count(module: nn.Module, layout: ExpertsLayout, args: tuple) -> int:
    """How many tokens a call of the module with positional ``args`` computes (the flattened batch)."""
    rows = args[0].numel() // args[0].shape[-1]
    return rows // module.num_experts if layout.routing == "scaled_rows" else rows


def routed(
    module: nn.Module, layout: ExpertsLayout, args: tuple
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(expert, token_index, rows, weights)`` of every expert that has tokens in a call with ``args``: the indices of
    its tokens ``[n]``, their input rows ``[n, h]`` and their routing weights ``[n, 1]`` to apply to its output
    (``None`` when the rows are already scaled), as transformers' eager loop finds them."""
    n = module.num_experts
    if layout.routing == "scaled_rows":
        blocks = args[0].view(n, -1, args[0].shape[-1])
        for e in range(n):  # one expert's [T, h] comparison at a time, not [E, T, h]
            with torch.no_grad():
                token_index = blocks[e].ne(0).any(-1).nonzero()[:, 0]
            if token_index.numel():
                yield e, token_index, blocks[e].index_select(0, token_index), None
        return
    hidden, top_k_index, top_k_weights = args[:3]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # DBRX's experts take [batch, seq, h]
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index.clamp(max=n), num_classes=n + 1).permute(2, 1, 0)
        experts = [int(e) for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0] if int(e) < n]
    for e in experts:
        top_k_pos, token_index = torch.where(mask[e])
        yield e, token_index, hidden[token_index], top_k_weights[token_index, top_k_pos, None]


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    out = x @ weight if transposed else nn.functional.linear(x, weight)
    return out if bias is None else out + bias


def up(module: nn.Module, layout: ExpertsLayout, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The output of ``expert``'s up (or fused gate/up; DBRX: gate) projection for its rows ``x``."""
    if layout.weights == "stacked":
        return nn.functional.linear(x, _stacked(module, "w1", expert))
    name = layout.up_name
    bias = getattr(module, f"{name}_bias")[expert] if layout.has_bias else None
    return _linear(x, getattr(module, name)[expert], bias, layout.transposed)


def activate(
    module: nn.Module, layout: ExpertsLayout, expert: int, x: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """The key (the input of the down projection) from the up projection's output ``h`` (and the rows ``x``)."""
    if layout.weights == "stacked":
        return module.mlp.activation_fn(h) * nn.functional.linear(x, _stacked(module, "v1", expert))
    if layout.routing == "scaled_rows":
        gate, up_ = h.chunk(2, dim=-1)
        return up_ * module.act_fn(gate)
    return module._apply_gate(h) if layout.has_gate else module.act_fn(h)


def down(module: nn.Module, layout: ExpertsLayout, expert: int, h: torch.Tensor) -> torch.Tensor:
    """The output of ``expert``'s down projection (and post-expert norm) for its keys ``h``."""
    if layout.weights == "stacked":
        return h @ _stacked(module, "w2", expert)
    bias = module.down_proj_bias[expert] if layout.has_bias else None
    y = _linear(h, module.down_proj[expert], bias, layout.transposed)
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def random_call(module: nn.Module, layout: ExpertsLayout, device: torch.device, dtype: torch.dtype) -> tuple:
    """Seeded positional arguments of one call that routes tokens to every expert (for the equivalence check)."""
    hidden, _ = expert_widths(module, layout)
    gen = torch.Generator().manual_seed(0)
    n, k = module.num_experts, min(2, module.num_experts)
    tokens = 2 * n
    x = torch.randn(tokens, hidden, generator=gen)
    index = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    if layout.routing == "scaled_rows":  # each expert's block: its tokens scaled by their weight, 0 elsewhere
        scores = torch.zeros(tokens, n).scatter_(1, index, weights)
        return ((x.repeat(n, 1) * scores.t().reshape(-1, 1)).to(device, dtype),)
    return x.to(device, dtype), index.to(device), weights.to(device, dtype)
