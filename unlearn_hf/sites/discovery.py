"""Discovery of the FFL sites of unknown model types: the decoder layer list, then in every layer the one
projection pair ``h -> d_ff -> h`` (the gate, for gated FFLs; the gate half of a fused gate/up projection, its
layout verified on the layer's own computation), or the key alone when no pre-activation can be told; mixtures
of experts are refused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..hooks import PassHooks
from .ffl_site import GATE_LAYOUTS, SiteError, SitePair, gate_and_up, linear_io
from .model_config import text_config

#: Names of a decoder layer's FFL container (Granite 4's ``shared_mlp``, RecurrentGemma's ``mlp_block``): the FFL is
#: searched there alone, so a state-space or convolution block beside it does not count.
_MLP_CONTAINER_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "ff", "ffl", "shared_mlp", "mlp_block")
_ATTENTION_MARKERS = ("attn", "attention")


def find_decoder_layers(
    model: nn.Module, path: str | None = None, holding: Sequence[str] = ()
) -> tuple[str, nn.ModuleList]:
    """Return ``(name, module_list)`` of the decoder layers.

    With ``path`` the list is taken from there. Otherwise the candidates are the ``nn.ModuleList`` of identical
    blocks holding linear modules (and every module named in ``holding``), of length ``num_hidden_layers`` when
    the config gives it; lists nested in another candidate are dropped, then (an image-text model's vision and text
    towers) those outside the model's text decoder (``get_decoder()``), and exactly one must remain.

    Raises:
        SiteError: no list, or several, were found (the message names them).
    """
    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError as err:
            raise SiteError(f"No module named {path!r} in {type(model).__name__}.") from err
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise SiteError(
                f"{path!r} is a {type(layers).__name__}, expected a non-empty nn.ModuleList of layers."
            )
        return path, layers
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and len({type(m) for m in mod}) == 1
        and any(linear_io(sub) is not None for sub in mod[0].modules())
        and all(_has_submodule(mod[0], h) for h in holding)
    ]
    if isinstance(n_layers, int) and any(len(m) == n_layers for _, m in candidates):
        candidates = [(n, m) for n, m in candidates if len(m) == n_layers]
    else:
        longest = max((len(m) for _, m in candidates), default=0)
        candidates = [(n, m) for n, m in candidates if len(m) == longest]
    outer = [
        (n, m)
        for n, m in candidates
        if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in candidates)
    ]
    if len(outer) > 1:  # an image-text model's towers: keep the lists of its decoder (``get_decoder()``)
        decoder = _decoder_name(model)
        if decoder is not None:
            outer = [(n, m) for n, m in outer if n == decoder or n.startswith(decoder + ".")] or outer
    if len(outer) != 1:
        found = ", ".join(f"{n or '<root>'} ({len(m)} x {type(m[0]).__name__})" for n, m in outer) or "none"
        expected = f" holding {', '.join(holding)}" if holding else ""
        raise SiteError(
            f"Cannot tell the decoder layers of {type(model).__name__}: lists of identical blocks{expected} "
            f"found: {found}. Name them with a site override {{'layers': ..., 'pre': ..., 'key': ...}}."
        )
    return outer[0]


def _decoder_name(model: nn.Module) -> str | None:
    """The name of the model's text decoder, as transformers' ``get_decoder()`` gives it (``None``: none to tell)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - a model without a decoder to name: nothing can be told
        return None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return next((n for n, m in model.named_modules() if m is decoder), None)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _weights_outside_linears(scope: nn.Module, prefix: str) -> list[str]:
    """``name [shape]`` of the weights of ``scope`` that no linear module holds (DBRX keeps its experts in
    ``[experts * d_ff, hidden]`` parameters)."""
    linear = {n for n, m in scope.named_modules() if n and linear_io(m) is not None}
    return [
        f"{prefix}{n} {list(p.shape)}"
        for n, p in scope.named_parameters()
        if p.dim() >= 2 and not any(n.startswith(lin + ".") for lin in linear)
    ]


def refuse_weights_outside_sites(model: nn.Module, key_names: Sequence[str], layers_name: str) -> None:
    """Refuse FFL containers (the module holding a key site, when it is not the decoder layer itself) that also
    compute with weights outside linear modules: experts kept in embeddings (Doge's MoE) would go unhooked.

    Raises:
        SiteError: naming the weights.
    """
    for key in key_names:
        container = key.rpartition(".")[0]
        if container.rpartition(".")[0] == layers_name:  # the key sits on the decoder layer: no FFL container
            continue
        outside = _weights_outside_linears(model.get_submodule(container), container + ".")
        if outside:
            raise SiteError(_outside_message(container, outside))


def _outside_message(where: str, outside: list[str]) -> str:
    return (
        f"The FFL of {where} also computes with weights outside linear modules ({', '.join(outside)}): experts kept "
        "in embeddings or stacked weights (Doge's mixture of experts), which no site could cover. It is not "
        "supported; name the sites yourself to use one projection pair."
    )


def _describe(linears: Sequence[tuple[str, tuple[int, int]]]) -> str:
    return ", ".join(f"{n} ({i}->{o})" for n, (i, o) in linears) or "no linear modules"


def discover_in_layer(
    layer: nn.Module,
    index: int,
    hidden: int | None,
    d_ff_hint: int | None,
    act: str | None = None,
    container: bool = False,
) -> SitePair:
    """Find the site names relative to one decoder layer, or raise naming what was found.

    Without one pre-activation projection, a fused gate/up projection ``h -> 2 d_ff`` is taken when one layout of
    :data:`~.ffl_site.GATE_LAYOUTS` reproduces the key input from its output with the config's activation ``act`` (or
    a common one); two projections ``h -> d_ff`` whose names do not tell the gate are told apart the same way
    (checked on a random input through the FFL container); otherwise only the key site is returned.
    ``container=True``: ``layer`` is itself an FFL (a shared expert), searched whole and run alone for those checks.
    """
    prefix, scope = "", layer
    for name in () if container else _MLP_CONTAINER_NAMES:
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module) and linear_io(sub) is None:
            prefix, scope = name + ".", sub
            break
    runs = prefix if prefix or container else None  # the FFL that runs alone (None: only a whole layer)
    linears = [
        (prefix + n, io)
        for n, m in scope.named_modules()
        if n
        and (io := linear_io(m)) is not None
        and (prefix or not any(a in n.lower() for a in _ATTENTION_MARKERS))
    ]
    found = _describe(linears)
    where = f"layer {index}" + (f" ({prefix[:-1]})" if prefix else "")
    ffl_modules = [
        m for n, m in scope.named_modules() if prefix or not any(a in n.lower() for a in _ATTENTION_MARKERS)
    ]
    if any(
        isinstance(m, nn.ModuleList) or any(p.dim() > 2 for p in m.parameters(recurse=False))
        for m in ffl_modules
    ):
        raise SiteError(
            f"The FFL of {where} holds module lists or weights of more than two dimensions: a mixture of experts "
            "that is not a transformers experts module (expert lists), or a convolution or state-space block. It is "
            f"not supported; found: {found}. Name the sites yourself to use one projection pair."
        )
    if hidden is None:
        raise SiteError(f"Cannot discover FFL sites without the model's hidden size; {where} has: {found}.")

    def wide_in(i: int) -> bool:  # the input width of an output projection: d_ff
        return i == d_ff_hint if d_ff_hint is not None and d_ff_hint == hidden else i != hidden

    downs = [(n, i) for n, (i, o) in linears if o == hidden and wide_in(i)]
    if len(downs) > 1 and d_ff_hint is not None:
        downs = [(n, i) for n, i in downs if i == d_ff_hint] or downs
    if len(downs) != 1:
        what = "Several candidate" if downs else "No"
        # weights that no linear holds, named inside an FFL container only (a whole layer also holds attention's)
        raw = [] if downs or not prefix else _weights_outside_linears(scope, prefix)
        why = (
            f" The FFL holds weights outside linear modules ({', '.join(raw)}): experts stacked in one weight, not "
            "a transformers experts module, are not supported."
            if raw
            else ""
        )
        raise SiteError(
            f"{what} FFL output projections (input width d_ff, output width {hidden}) in {where}: "
            f"{', '.join(n for n, _ in downs) or 'none'}; found: {found}.{why} Name the sites yourself."
        )
    key_name, d_ff = downs[0]
    if prefix and (outside := _weights_outside_linears(scope, prefix)):
        raise SiteError(_outside_message(where, outside))
    ups = [n for n, (i, o) in linears if i == hidden and o == d_ff and n != key_name]
    if len(ups) > 1:  # gated FFL: the pre-activation is the gate
        gates = [n for n in ups if "gate" in n.rsplit(".", 1)[-1].lower()]
        if (
            len(gates) != 1 and len(ups) == 2
        ):  # names that do not tell (w1 / w3): the layer's computation does
            gates = [g] if (g := gate_of_pair(layer, runs, ups, key_name, act)) else []
        ups = gates if len(gates) == 1 else ups
    sparsity = getattr(scope, "activation_sparsity", 0.0)
    if len(ups) == 1 and isinstance(sparsity, (int, float)) and sparsity > 0:
        return SitePair(
            None,
            key_name,
            pre_missing=f"{where}: it sparsifies the gate before the activation (activation_sparsity={sparsity}, as "
            f"Gemma 3n's first layers do), so what enters the activation is not the output of {ups[0]} and Neuron "
            "Adjust's formula has no site here (it can use the layers without it).",
        )
    if len(ups) == 1:
        return SitePair(ups[0], key_name)
    fused = [n for n, (i, o) in linears if i == hidden and o == 2 * d_ff]
    if not ups and len(fused) == 1:
        layout = fused_gate_layout(layer, runs, fused[0], key_name, act)
        if layout is not None:
            return SitePair(fused[0], key_name, layout)
        why = (
            f"{fused[0]} computes gate and up in one fused projection whose layout could not be verified (the "
            f"config's activation {act!r} and the common ones reproduce the key input with none of "
            f"{', '.join(GATE_LAYOUTS)})"
        )
    else:
        what = "several candidate" if ups else "no"
        why = (
            f"{what} FFL pre-activation projections (input width {hidden}, output width {d_ff}): "
            f"{', '.join(ups) or 'none'}"
        )
    return SitePair(
        None,
        key_name,
        pre_missing=f"{where}: {why}; found: {found}. Name the pre-activation with a site override "
        "{'pre': ..., 'key': ..., 'gate': ...} to use Neuron Adjust.",
    )


#: Activations tried, after the config's, to tell the gate of a gated FFL from its computation (some FFLs call one
#: whatever the config says, e.g. LFM2's ``F.silu``; some configs name none).
_COMMON_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


def _activations(act: str | None) -> list:
    names = ([act] if isinstance(act, str) and act in ACT2FN else []) + list(_COMMON_ACTIVATIONS)
    return [ACT2FN[n] for n in dict.fromkeys(names)]


def _run_ffl(
    layer: nn.Module, prefix: str | None, outputs: Sequence[str], key: str
) -> dict[str, torch.Tensor] | None:
    """The outputs of the modules ``outputs`` and the input of ``key`` (under ``"key"``) when the FFL container
    (``prefix``; ``""``: ``layer`` itself) runs on a random input; ``None`` when the run cannot be made (no container,
    weights not materialized, a container that needs other arguments)."""
    if prefix is None:
        return None
    container, key_mod = layer.get_submodule(prefix[:-1]), layer.get_submodule(key)
    first = layer.get_submodule(outputs[0])
    weight = next((p for p in first.parameters() if p.is_floating_point()), None)
    if weight is None or weight.is_meta:
        return None
    got: dict[str, torch.Tensor] = {}
    hooks = PassHooks()  # another thread's forward through the layer must not write into ``got``
    for n in outputs:
        hooks.post(layer.get_submodule(n), lambda m, a, out, n=n: got.__setitem__(n, out))
    hooks.pre(key_mod, lambda m, a: got.__setitem__("key", a[0]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, linear_io(first)[0], generator=gen).to(weight.device, weight.dtype)
    try:
        with torch.no_grad(), hooks.running():
            container(x)
    except Exception:  # noqa: BLE001 - a container that needs other arguments: nothing can be told
        return None
    finally:
        hooks.remove()
    return got if all(n in got for n in (*outputs, "key")) else None


def _reproduces(gate: torch.Tensor, up: torch.Tensor, key: torch.Tensor, act) -> bool:
    """Whether ``act(gate) * up`` is the key input ``key``, recomputed in the layer's own dtype (half-precision
    rounding, bf16: 2^-8, must not hide the match)."""
    rtol = max(1e-3, 4 * torch.finfo(key.dtype).eps)
    atol = max(1e-5, rtol * float(key.abs().mean()))
    return torch.allclose((act(gate) * up).float(), key.float(), rtol=rtol, atol=atol)


def gate_of_pair(
    layer: nn.Module, prefix: str | None, ups: Sequence[str], key: str, act: str | None
) -> str | None:
    """Of two projections ``h -> d_ff`` of a gated FFL whose names do not tell, the one that enters the activation:
    the ``a`` with which ``act(a) * b`` equals the input of ``key`` when the FFL runs on a random input (the config's
    activation, else a common one); ``None`` when neither or both do, or the check cannot run."""
    got = _run_ffl(layer, prefix, ups, key)
    if got is None:
        return None
    a, b = ups
    for fn in _activations(act):
        found = [g for g, u in ((a, b), (b, a)) if _reproduces(got[g], got[u], got["key"], fn)]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def fused_gate_layout(
    layer: nn.Module, prefix: str | None, fused: str, key: str, act: str | None
) -> str | None:
    """The layout of a fused gate/up projection in ``layer``: the one with which ``act(gate) * up`` equals the
    input of ``key`` when the FFL container (``prefix``) runs on a random input (the config's activation ``act``,
    else a common one); ``None`` when none does or the check cannot run (no container, weights not materialized)."""
    got = _run_ffl(layer, prefix, [fused], key)
    if got is None:
        return None
    d_ff = got["key"].shape[-1]
    for fn in _activations(act):
        for layout in GATE_LAYOUTS:
            gate, up = gate_and_up(got[fused], layout, d_ff)
            if _reproduces(gate, up, got["key"], fn):
                return layout
    return None
