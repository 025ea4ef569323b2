"""Where the methods look: the two sites of every feed-forward layer (FFL).

Every decoder layer has an FFL ``out = W_out · φ(W_in · x)`` (gated: ``W_down · (act(W_gate x) ⊙ W_up x)``).

* **pre-activation** site: the module whose output enters the activation (``gate_proj``, ``c_fc``, ``fc1``...).
  Neuron Adjust rewrites its output with a forward hook.
* **key** site: the FFL's output projection (``down_proj``, ``c_proj``, ``fc2``...). Its *input* holds the
  ``d_ff`` memory coefficients; Key Space Detection and Selective Pruning read/zero it with a forward pre-hook.

Sites come from, in order: a user override, the table of known model types, unambiguous discovery. Every site
is validated against the real module shapes before use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

#: model_type -> (pre-activation module, key module), relative to the decoder layer.
KNOWN_SITES: dict[str, tuple[str, str]] = {
    **{
        t: ("mlp.gate_proj", "mlp.down_proj")
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "stablelm",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "smollm3",
        )
    },
    "phi": ("mlp.fc1", "mlp.fc2"),
    **{t: ("mlp.c_fc", "mlp.c_proj") for t in ("gpt2", "gpt_bigcode", "gpt_neo", "starcoder2")},
    **{t: ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for t in ("gpt_neox", "bloom", "persimmon")},
    **{t: ("fc1", "fc2") for t in ("opt", "xglm")},
    **{t: ("mlp.fc_in", "mlp.fc_out") for t in ("gptj", "codegen")},
    "mpt": ("ffn.up_proj", "ffn.down_proj"),
}

_MLP_CONTAINER_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "ff")


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


#: A user override: relative names ``{"pre": ..., "key": ...}`` (optionally ``"layers"``: the path of the
#: layer list), or a callable returning one ``(pre_module, key_module)`` pair per decoder layer.
SiteOverride = dict[str, str] | Callable[[nn.Module], Sequence[tuple[nn.Module, nn.Module]]]


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


def _config_d_ff(config) -> int | None:
    for attr in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(name, module_list)`` of the decoder layers.

    With ``path`` the list is taken from there; otherwise it is the largest ``nn.ModuleList`` whose length equals
    ``config.num_hidden_layers`` (or, without a config, the largest ``ModuleList`` of identical blocks).
    """
    if path is not None:
        try:
            layers = model.get_submodule(path)
        except AttributeError as err:
            raise SiteError(f"No module named {path!r} in {type(model).__name__}.") from err
        if not isinstance(layers, nn.ModuleList):
            raise SiteError(f"{path!r} is a {type(layers).__name__}, expected an nn.ModuleList of layers.")
        return path, layers
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
    ]
    if n_layers is not None:
        matching = [(n, m) for n, m in candidates if len(m) == n_layers]
        candidates = matching or candidates
    if not candidates:
        raise SiteError(
            f"No list of decoder layers found in {type(model).__name__}; name the sites yourself."
        )
    return max(candidates, key=lambda nm: (len(nm[1]), -nm[0].count(".")))


def _discover_in_layer(layer: nn.Module, hidden: int | None, d_ff_hint: int | None) -> tuple[str, str, int]:
    """Find ``(pre, key, d_ff)`` relative names inside one layer, or raise naming what was found."""
    container_prefix = ""
    for name in _MLP_CONTAINER_NAMES:
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module):
            container_prefix = name + "."
            layer = sub
            break
    linears = [(n, io) for n, m in layer.named_modules() if n and (io := linear_io(m)) is not None]
    found = ", ".join(f"{container_prefix}{n} ({i}->{o})" for n, (i, o) in linears) or "no linear modules"
    if hidden is None:
        raise SiteError(f"Cannot discover FFL sites without config.hidden_size; found: {found}.")
    downs = [(n, i) for n, (i, o) in linears if o == hidden and i != hidden and (d_ff_hint in (None, i))]
    if len(downs) != 1:
        raise SiteError(
            f"Ambiguous or missing FFL output projection (input width d_ff, output width {hidden}); found: {found}."
        )
    key_name, d_ff = downs[0]
    ups = [n for n, (i, o) in linears if i == hidden and o == d_ff]
    if len(ups) > 1:  # gated FFL: the pre-activation is the gate
        gates = [n for n in ups if "gate" in n.rsplit(".", 1)[-1]]
        ups = gates if len(gates) == 1 else ups
    if len(ups) != 1:
        raise SiteError(
            f"Ambiguous or missing FFL pre-activation projection (input width {hidden}, output width {d_ff}); "
            f"found: {found}."
        )
    return container_prefix + ups[0], container_prefix + key_name, d_ff


def find_ffl_sites(model: nn.Module, override: SiteOverride | None = None) -> list[FFLSite]:
    """Return the FFL sites of every decoder layer of ``model``, validated against the real shapes.

    Args:
        model: a causal LM (``PreTrainedModel``) or any ``nn.Module`` when ``override`` is given.
        override: relative module names ``{"pre": "mlp.gate_proj", "key": "mlp.down_proj"}`` (plus optional
            ``"layers"``, the path of the layer list), or a callable ``model -> [(pre_module, key_module), ...]``.

    Raises:
        SiteError: when sites cannot be found unambiguously or do not match the model's shapes.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    names = {id(m): n for n, m in model.named_modules()}
    pairs: list[tuple[str, str]] = []
    if callable(override):
        for pre, key in override(model):
            if id(pre) not in names or id(key) not in names:
                raise SiteError("The site override returned modules that are not part of the model.")
            pairs.append((names[id(pre)], names[id(key)]))
    else:
        if override is not None and not {"pre", "key"} <= set(override):
            raise SiteError(
                f"A site override needs 'pre' and 'key' module names, got keys {sorted(override)}."
            )
        layers_name, layers = find_decoder_layers(model, (override or {}).get("layers"))
        if override is not None:
            rel = [(override["pre"], override["key"])] * len(layers)
        elif model_type in KNOWN_SITES:
            rel = [KNOWN_SITES[model_type]] * len(layers)
        else:
            hidden, hint = _hidden_size(model), _config_d_ff(config) if config is not None else None
            rel = [_discover_in_layer(layer, hidden, hint)[:2] for layer in layers]
            logger.info("Discovered FFL sites for model type %r: %s / %s", model_type, *rel[0])
        pairs = [(f"{layers_name}.{i}.{p}", f"{layers_name}.{i}.{k}") for i, (p, k) in enumerate(rel)]
    if not pairs:
        raise SiteError(f"No FFL sites found in {type(model).__name__}.")
    return [_validated_site(model, i, pre, key, config) for i, (pre, key) in enumerate(pairs)]


def _validated_site(model: nn.Module, layer: int, pre_name: str, key_name: str, config) -> FFLSite:
    modules = {}
    for role, name in (("pre-activation", pre_name), ("key", key_name)):
        try:
            modules[role] = model.get_submodule(name)
        except AttributeError as err:
            raise SiteError(
                f"Layer {layer}: {role} module {name!r} does not exist in {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})."
            ) from err
    pre_io, key_io = linear_io(modules["pre-activation"]), linear_io(modules["key"])
    if pre_io is None or key_io is None:
        raise SiteError(f"Layer {layer}: sites {pre_name!r} / {key_name!r} are not linear projections.")
    d_ff = pre_io[1]
    if key_io[0] != d_ff:
        raise SiteError(
            f"Layer {layer}: pre-activation {pre_name!r} outputs {d_ff} values but key module {key_name!r} "
            f"takes {key_io[0]}; they are not the two ends of one FFL."
        )
    expected = _config_d_ff(config) if config is not None else None
    if expected is not None and expected != d_ff and getattr(config, "model_type", None) in KNOWN_SITES:
        raise SiteError(f"Layer {layer}: d_ff from the modules is {d_ff} but the config says {expected}.")
    return FFLSite(layer, pre_name, key_name, modules["pre-activation"], modules["key"], d_ff)


def module_device(module: nn.Module):
    """The device a module computes on (accelerate's execution device for offloaded modules)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        import torch

        return torch.device(device) if not isinstance(device, torch.device) else device
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    raise SiteError(f"Cannot tell the device of {type(module).__name__}: it has no parameters.")
