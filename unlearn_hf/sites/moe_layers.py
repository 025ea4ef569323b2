"""The sites of a model with mixture-of-experts layers: per decoder layer, its dense FFL (a dense layer), or its
shared experts' FFLs then one site per routed expert (an MoE layer), numbered in that order."""

from __future__ import annotations

import dataclasses

from torch import nn

from .discovery import _ATTENTION_MARKERS, discover_in_layer
from .experts import expert_taps, is_fused_experts
from .ffl_site import FFLSite, SiteError, SitePair, check_pairs, linear_io

#: Names of the dense FFLs every token goes through beside the routed experts (in the experts' container): shared
#: experts, or a dense MLP run next to them (Gemma 4's ``mlp`` beside its ``experts``).
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "mlp", "feed_forward", "ffn")


def experts_in(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fused experts modules of one decoder layer, ``[(relative name, module)]``."""
    return [(n, m) for n, m in layer.named_modules() if n and is_fused_experts(m)]


def moe_sites(
    model: nn.Module, layers_name: str, layers: nn.ModuleList, hidden: int | None, act: str | None
) -> list[FFLSite]:
    """Every site of a model whose decoder layers include mixture-of-experts layers (see the module docstring).

    Raises:
        SiteError: a layer with several experts modules, a dense part that cannot be told, or experts whose own
            forward is not transformers' eager computation.
    """
    prefix = f"{layers_name}." if layers_name else ""
    out: list[FFLSite] = []
    for i, layer in enumerate(layers):
        found = experts_in(layer)
        if len(found) > 1:
            raise SiteError(
                f"Decoder layer {i} holds several experts modules ({', '.join(n for n, _ in found)}); name the sites "
                "with an override."
            )
        if not found:
            pair = discover_in_layer(layer, i, hidden, None, act)
            out += _dense(model, prefix + f"{i}.", pair, hidden, i)
            continue
        experts_name, experts = found[0]
        container = experts_name.rpartition(".")[0]
        # in the experts' container, then on the layer beside it (GraniteMoeShared's shared_mlp)
        scopes = [(container, layer.get_submodule(container))] if container else []
        for where, scope in [*scopes, ("", layer)]:
            for name in _SHARED_NAMES:
                shared = getattr(scope, name, None)
                if not isinstance(shared, nn.Module) or any(m is experts for m in shared.modules()):
                    continue  # none, or the MoE block itself (a layer's ``mlp`` holding the experts)
                pair = discover_in_layer(shared, i, hidden, None, act, container=True)
                out += _dense(model, f"{prefix}{i}.{where + '.' if where else ''}{name}.", pair, hidden, i)
        _refuse_uncovered(layer, i, hidden, experts, [s for s in out if s.block == i])
        taps = expert_taps(experts)
        full = f"{prefix}{i}.{experts_name}"
        up = taps.layout.up_name
        out += [
            FFLSite(
                0,
                f"{full}.{up}[{e}]",
                f"{full}.{taps.layout.down_name}[{e}]",
                taps.pre[e],
                taps.key[e],
                taps.width,
                taps.gate,
                block=i,
                expert=e,
            )
            for e in range(experts.num_experts)
        ]
    return [dataclasses.replace(s, layer=n) for n, s in enumerate(out)]


def _dense(model: nn.Module, prefix: str, pair: SitePair, hidden: int | None, block: int) -> list[FFLSite]:
    """The validated site of one dense FFL whose names ``pair`` are relative to ``prefix``."""
    return [
        dataclasses.replace(s, block=block)
        for s in check_pairs(model, [pair.prefixed(prefix)], hidden, None, "discovery")
    ]


#: Blocks beside the FFL whose output projections map to the hidden size too: attention, state-space and recurrent
#: mixers (Granite 4.0-H's ``mamba.out_proj``) and gated norms (AXK2's ``input_layernorm.mlp``, a gate of the norm).
_NOT_FFL_MARKERS = (*_ATTENTION_MARKERS, "mamba", "mixer", "ssm", "conv", "recurrent", "rnn", "lstm", "norm")


def _refuse_uncovered(
    layer: nn.Module, index: int, hidden: int | None, experts: nn.Module, shared: list[FFLSite]
) -> None:
    """Refuse an MoE layer holding FFL output projections (``d_ff -> hidden``, outside attention and the experts)
    that none of its sites is: a dense FFL under a name this module does not know (LongCat-Flash's ``mlps``) would
    otherwise go unhooked, without a word."""
    if hidden is None:
        return
    own = {id(m) for m in experts.modules()} | {id(s.key) for s in shared}
    loose = [
        n
        for n, m in layer.named_modules()
        if n
        and id(m) not in own
        and not any(a in n.lower() for a in _NOT_FFL_MARKERS)
        and (io := linear_io(m)) is not None
        and io[1] == hidden
        and io[0] != hidden
    ]
    if loose:
        raise SiteError(
            f"Decoder layer {index} holds FFL output projections beside its experts that are not shared experts this "
            f"library knows ({', '.join(loose)}): they would not be hooked. Name the sites with an override."
        )
