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


def gate_and_up(output: torch.Tensor, layout: str, d_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and the up columns of a fused gate/up output ``[..., 2 * d_ff]`` in ``layout``."""
    if layout == "first_half":
        return output[..., :d_ff], output[..., d_ff:]
    if layout == "second_half":
        return output[..., d_ff:], output[..., :d_ff]
    return output[..., 0::2], output[..., 1::2]


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
        block: the decoder layer the site is in (sites of a mixture-of-experts layer share one); ``None``: ``layer``.
        expert: for one expert of a mixture of experts, its index: its sites see the tokens routed to it only,
            ``[n_tokens, width]``, and their modules are :class:`~.experts.ExpertTap` objects (``None``: a dense FFL,
            whose sites see every token).
    """

    layer: int
    pre_name: str | None
    key_name: str
    pre: nn.Module | None
    key: nn.Module
    d_ff: int
    gate: str | None = None
    pre_missing: str = ""
    block: int | None = None
    expert: int | None = None

    @property
    def routed(self) -> bool:
        """Whether the site sees only the tokens routed to one expert (the hooks get their indices too)."""
        return self.expert is not None

    @property
    def decoder_layer(self) -> int:
        """The index of the decoder layer the site is in."""
        return self.layer if self.block is None else self.block

    def pre_activation(self, output: torch.Tensor) -> torch.Tensor:
        """The pre-activation ``[..., d_ff]`` in the pre module's output: the output itself, or a view of the gate
        columns of a fused gate/up output (writing into the view writes into the output)."""
        return output if self.gate is None else gate_and_up(output, self.gate, self.d_ff)[0]

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

    def prefixed(self, prefix: str) -> SitePair:
        """The same sites with ``prefix`` before each module name."""
        pre = None if self.pre is None else prefix + self.pre
        return SitePair(pre, prefix + self.key, self.gate, self.pre_missing)


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
    """Resolve and check one layer's sites: linear-like, ``pre: h -> d_ff`` (``h -> 2 d_ff`` fused, or none),
    ``key: d_ff -> h``."""
    if pair.gate is not None and pair.gate not in GATE_LAYOUTS:
        raise SiteError(
            f"Layer {layer}: gate layout {pair.gate!r} from {source} is not one of {GATE_LAYOUTS}."
        )
    named = [("pre-activation", pair.pre), ("key", pair.key)] if pair.pre is not None else [("key", pair.key)]
    modules, shapes = {}, {}
    for role, name in named:
        try:
            modules[role] = model.get_submodule(name)
        except AttributeError as err:
            raise SiteError(
                f"Layer {layer}: the {role} module {name!r} from {source} does not exist in "
                f"{type(model).__name__}."
            ) from err
        shapes[role] = linear_io(modules[role])
    bad = [f"{name!r} is a {type(modules[role]).__name__}" for role, name in named if shapes[role] is None]
    if bad:
        raise SiteError(
            f"Layer {layer}: the sites from {source} must be linear projections; {', '.join(bad)}."
        )
    key, (key_in, key_out) = modules["key"], shapes["key"]
    if pair.pre is None:
        if hidden is not None and key_out != hidden:
            raise SiteError(
                f"Layer {layer}: the key {pair.key!r} ({key_in}->{key_out}) from {source} does not project to the "
                f"model's hidden size {hidden}."
            )
        return _checked_width(
            model,
            FFLSite(
                layer,
                None,
                pair.key,
                None,
                key,
                key_in,
                None,
                pair.pre_missing or f"{source} names no pre-activation module.",
            ),
            d_ff,
            source,
        )
    pre, (pre_in, pre_out) = modules["pre-activation"], shapes["pre-activation"]
    if pre is key:
        raise SiteError(f"Layer {layer}: pre-activation and key sites are the same module {pair.pre!r}.")
    width = pre_out // 2 if pair.gate is not None else pre_out
    if key_in != width or pre_in != key_out or (pair.gate is not None and pre_out != 2 * key_in):
        expected = "h->2*d_ff (fused gate/up)" if pair.gate is not None else "h->d_ff"
        if pair.gate is None and pre_out == 2 * key_in:
            expected += f"; for a fused gate/up projection add its 'gate' layout, one of {GATE_LAYOUTS}"
        raise SiteError(
            f"Layer {layer}: pre-activation {pair.pre!r} ({pre_in}->{pre_out}) and key {pair.key!r} "
            f"({key_in}->{key_out}) from {source} are not the two ends of one FFL (expected {expected} and "
            "d_ff->h)."
        )
    if hidden is not None and pre_in != hidden:
        raise SiteError(
            f"Layer {layer}: the FFL {pair.pre!r} / {pair.key!r} from {source} works on width {pre_in}, "
            f"but the model's hidden size is {hidden}."
        )
    return _checked_width(model, FFLSite(layer, pair.pre, pair.key, pre, key, width, pair.gate), d_ff, source)


def _checked_width(model: nn.Module, site: FFLSite, d_ff: int | None, source: str) -> FFLSite:
    """``site``, once its width matches the config's ``d_ff`` and the model's FFL runs through its modules."""
    if d_ff is not None and site.d_ff != d_ff:
        names = f"{site.pre_name!r} / {site.key_name!r}" if site.pre is not None else repr(site.key_name)
        raise SiteError(
            f"Layer {site.layer}: d_ff of {names} from {source} is {site.d_ff} but the config says {d_ff}."
        )
    _check_bloom(model)
    return site


def _check_bloom(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "bloom" and getattr(config, "slow_but_exact", False):
        if getattr(config, "pretraining_tp", 1) > 1:
            raise SiteError(
                "BLOOM with slow_but_exact=True and pretraining_tp > 1 never calls dense_4h_to_h (it uses its "
                "weight slices), so the key site would see nothing; set config.slow_but_exact = False."
            )
