"""One layer's FFL sites (:class:`FFLSite`), the error raised for sites, and the checks that a pair of modules
is the two ends of one FFL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Where the gate's pre-activation sits in the output ``[..., 2 * d_ff]`` of a fused gate/up projection:
#: ``"first_half"``: ``gate, up = out.chunk(2, -1)`` (Phi-3, GLM, GLM-4); ``"second_half"``: ``up, gate = ...``;
#: ``"even"``: interleaved ``[g0, u0, g1, u1, ...]``, the gate at even columns.
GATE_LAYOUTS = ("first_half", "second_half", "even")


class SiteError(ValueError):
    """The feed-forward sites of a model could not be found or do not match its shapes."""


@dataclass(frozen=True)
class FFLSite:
    """The two sites of one decoder layer's feed-forward layer.

    Args:
        layer: index of the decoder layer.
        pre_name: full module name of the pre-activation module (its output is hooked); ``None`` when the layer
            has no usable pre-activation site (Key Space Detection and Selective Pruning still work; Neuron
            Adjust does not, see ``pre_missing``).
        key_name: full module name of the output projection (its input is hooked).
        pre: the pre-activation module (``None`` with ``pre_name``).
        key: the output projection module.
        d_ff: width of the feed-forward layer.
        gate: for a fused gate/up projection, where the gate sits in its output (one of :data:`GATE_LAYOUTS`);
            ``None``: the whole output is the pre-activation.
        pre_missing: why there is no pre-activation site (empty when there is one).
    """

    layer: int
    pre_name: str | None
    key_name: str
    pre: nn.Module | None
    key: nn.Module
    d_ff: int
    gate: str | None = None
    pre_missing: str = ""

    def pre_activation(self, output: torch.Tensor) -> torch.Tensor:
        """The pre-activation ``[..., d_ff]`` in the pre module's output: the output itself, or a view of the gate
        columns of a fused gate/up output (writing into the view writes into the output)."""
        if self.gate is None:
            return output
        if self.gate == "first_half":
            return output[..., : self.d_ff]
        if self.gate == "second_half":
            return output[..., self.d_ff :]
        return output[..., 0::2]

    def with_pre_activation(self, output: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``output`` with its pre-activation ``old`` (from :meth:`pre_activation`) replaced by ``new``: in place
        when ``new`` is that view already rewritten, else in a copy (autograd sees an out-of-place edit)."""
        if self.gate is None or new is old:
            return new if self.gate is None else output
        out = output.clone()
        self.pre_activation(out).copy_(new)
        return out


def linear_io(module: nn.Module) -> tuple[int, int] | None:
    """Return ``(in_features, out_features)`` of a linear-like module (``nn.Linear``, GPT-2 ``Conv1D``...)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return module.weight.shape[0], module.nf
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(inf, int) and isinstance(outf, int):  # quantized / custom linears
        return inf, outf
    return None


def require_pre_sites(sites: Sequence[FFLSite], what: str) -> None:
    """Raise :class:`SiteError` when one of ``sites`` has no pre-activation site, saying why and what to do."""
    missing = [s for s in sites if s.pre is None]
    if missing:
        raise SiteError(
            f"{what} needs the FFL pre-activation site, which layers {[s.layer for s in missing]} do not have: "
            f"{missing[0].pre_missing} Key Space Detection and Selective Pruning need only the key site."
        )


@dataclass(frozen=True)
class SitePair:
    """One layer's site names as found or given: full module names, the fused gate layout, and why the
    pre-activation is missing (``pre=None``)."""

    pre: str | None
    key: str
    gate: str | None = None
    pre_missing: str = ""


def check_pairs(
    model: nn.Module, pairs: list[SitePair], hidden: int | None, d_ff: int | None, source: str
) -> list[FFLSite]:
    """Resolve and validate one :class:`SitePair` of full names per layer; no module may serve twice."""
    if not pairs:
        raise SiteError(f"No FFL sites found in {type(model).__name__} ({source} gave none).")
    sites = [_validated_site(model, i, pair, hidden, d_ff, source) for i, pair in enumerate(pairs)]
    seen: dict[int, str] = {}
    for s in sites:
        for name, module in ((s.pre_name, s.pre), (s.key_name, s.key)):
            if module is None:
                continue
            if id(module) in seen:
                raise SiteError(
                    f"Layer {s.layer}: module {name!r} is also the site {seen[id(module)]!r} of another layer or "
                    f"role ({source}); every layer needs its own two modules."
                )
            seen[id(module)] = name
    return sites


def _validated_site(
    model: nn.Module, layer: int, pair: SitePair, hidden: int | None, d_ff: int | None, source: str
) -> FFLSite:
    """Resolve and check one layer's pair: linear-like, ``pre: h -> d_ff`` (``h -> 2 d_ff`` fused),
    ``key: d_ff -> h``."""
    if pair.gate is not None and pair.gate not in GATE_LAYOUTS:
        raise SiteError(
            f"Layer {layer}: gate layout {pair.gate!r} from {source} is not one of {GATE_LAYOUTS}."
        )
    if pair.pre is None:
        return _key_only_site(model, layer, pair, hidden, d_ff, source)
    pre_name, key_name = pair.pre, pair.key
    modules = {}
    for role, name in (("pre-activation", pre_name), ("key", key_name)):
        try:
            modules[role] = model.get_submodule(name)
        except AttributeError as err:
            raise SiteError(
                f"Layer {layer}: the {role} module {name!r} from {source} does not exist in "
                f"{type(model).__name__}."
            ) from err
    pre, key = modules["pre-activation"], modules["key"]
    pre_io, key_io = linear_io(pre), linear_io(key)
    if pre_io is None or key_io is None:
        bad = [
            f"{n!r} is a {type(m).__name__}"
            for n, m, io in ((pre_name, pre, pre_io), (key_name, key, key_io))
            if io is None
        ]
        raise SiteError(
            f"Layer {layer}: the sites from {source} must be linear projections; {', '.join(bad)}."
        )
    if pre is key:
        raise SiteError(f"Layer {layer}: pre-activation and key sites are the same module {pre_name!r}.")
    (pre_in, pre_out), (key_in, key_out) = pre_io, key_io
    width = pre_out // 2 if pair.gate is not None else pre_out
    if key_in != width or pre_in != key_out or (pair.gate is not None and pre_out != 2 * key_in):
        expected = "h->2*d_ff (fused gate/up)" if pair.gate is not None else "h->d_ff"
        raise SiteError(
            f"Layer {layer}: pre-activation {pre_name!r} ({pre_in}->{pre_out}) and key {key_name!r} "
            f"({key_in}->{key_out}) from {source} are not the two ends of one FFL (expected {expected} and "
            "d_ff->h)."
        )
    if hidden is not None and pre_in != hidden:
        raise SiteError(
            f"Layer {layer}: the FFL {pre_name!r} / {key_name!r} from {source} works on width {pre_in}, "
            f"but the model's hidden size is {hidden}."
        )
    if d_ff is not None and width != d_ff:
        raise SiteError(
            f"Layer {layer}: d_ff of {pre_name!r} / {key_name!r} from {source} is {width} but the config says {d_ff}."
        )
    _check_bloom(model)
    return FFLSite(layer, pre_name, key_name, pre, key, width, pair.gate)


def _key_only_site(
    model: nn.Module, layer: int, pair: SitePair, hidden: int | None, d_ff: int | None, source: str
) -> FFLSite:
    """A layer whose only site is the key: ``key: d_ff -> h``."""
    try:
        key = model.get_submodule(pair.key)
    except AttributeError as err:
        raise SiteError(
            f"Layer {layer}: the key module {pair.key!r} from {source} does not exist in {type(model).__name__}."
        ) from err
    io = linear_io(key)
    if io is None:
        raise SiteError(
            f"Layer {layer}: the key site from {source} must be a linear projection; {pair.key!r} is a "
            f"{type(key).__name__}."
        )
    width, out = io
    if hidden is not None and out != hidden:
        raise SiteError(
            f"Layer {layer}: the key {pair.key!r} ({width}->{out}) from {source} does not project to the model's "
            f"hidden size {hidden}."
        )
    if d_ff is not None and width != d_ff:
        raise SiteError(
            f"Layer {layer}: d_ff of {pair.key!r} from {source} is {width} but the config says {d_ff}."
        )
    _check_bloom(model)
    missing = pair.pre_missing or f"{source} names no pre-activation module"
    return FFLSite(layer, None, pair.key, None, key, width, None, missing)


def _check_bloom(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "bloom" and getattr(config, "slow_but_exact", False):
        if getattr(config, "pretraining_tp", 1) > 1:
            raise SiteError(
                "BLOOM with slow_but_exact=True and pretraining_tp > 1 never calls dense_4h_to_h (it uses its "
                "weight slices), so the key site would see nothing; set config.slow_but_exact = False."
            )
