"""One layer's FFL sites (:class:`FFLSite`), the error raised for sites, and the checks that a pair of modules
is the two ends of one FFL."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class SiteError(ValueError):
    """The feed-forward sites of a model could not be found or do not match its shapes."""


@dataclass(frozen=True)
class FFLSite:
    """The two sites of one decoder layer's feed-forward layer.

    Args:
        layer: index of the decoder layer.
        pre_name: full module name of the pre-activation module (its output is hooked).
        key_name: full module name of the output projection (its input is hooked).
        pre: the pre-activation module.
        key: the output projection module.
        d_ff: width of the feed-forward layer.
    """

    layer: int
    pre_name: str
    key_name: str
    pre: nn.Module
    key: nn.Module
    d_ff: int


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


def check_pairs(
    model: nn.Module, pairs: list[tuple[str, str]], hidden: int | None, d_ff: int | None, source: str
) -> list[FFLSite]:
    """Resolve and validate one ``(pre, key)`` pair of full names per layer; no module may serve twice."""
    if not pairs:
        raise SiteError(f"No FFL sites found in {type(model).__name__} ({source} gave none).")
    sites = [_validated_site(model, i, pre, key, hidden, d_ff, source) for i, (pre, key) in enumerate(pairs)]
    seen: dict[int, str] = {}
    for s in sites:
        for name, module in ((s.pre_name, s.pre), (s.key_name, s.key)):
            if id(module) in seen:
                raise SiteError(
                    f"Layer {s.layer}: module {name!r} is also the site {seen[id(module)]!r} of another layer or "
                    f"role ({source}); every layer needs its own two modules."
                )
            seen[id(module)] = name
    return sites


def _validated_site(
    model: nn.Module,
    layer: int,
    pre_name: str,
    key_name: str,
    hidden: int | None,
    d_ff: int | None,
    source: str,
) -> FFLSite:
    """Resolve and check one layer's pair: linear-like, ``pre: h -> d_ff``, ``key: d_ff -> h``."""
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
    (pre_in, width), (key_in, key_out) = pre_io, key_io
    if key_in != width or pre_in != key_out:
        raise SiteError(
            f"Layer {layer}: pre-activation {pre_name!r} ({pre_in}->{width}) and key {key_name!r} "
            f"({key_in}->{key_out}) from {source} are not the two ends of one FFL (expected h->d_ff and d_ff->h)."
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
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "bloom" and getattr(config, "slow_but_exact", False):
        if getattr(config, "pretraining_tp", 1) > 1:
            raise SiteError(
                "BLOOM with slow_but_exact=True and pretraining_tp > 1 never calls dense_4h_to_h (it uses its "
                "weight slices), so the key site would see nothing; set config.slow_but_exact = False."
            )
    return FFLSite(layer, pre_name, key_name, pre, key, width)
