"""Where the methods look: the two sites of every feed-forward layer (FFL).

Every decoder layer has an FFL ``out = W_out · φ(W_in · x)`` (gated: ``W_down · (act(W_gate x) ⊙ W_up x)``).

* **pre-activation** site: the module whose output enters the activation (``gate_proj``, ``c_fc``, ``fc1``...).
  Neuron Adjust rewrites its output with a forward hook.
* **key** site: the FFL's output projection (``down_proj``, ``c_proj``, ``fc2``...). Its *input* holds the
  ``d_ff`` memory coefficients; Key Space Detection and Selective Pruning read/zero it with a forward pre-hook.

Sites come from, in order: a user override, the table of known model types, unambiguous discovery. Every site
is validated against the real module shapes before use.

Site tensors are ``[batch, seq, d_ff]`` for every architecture except OPT, which flattens the tokens to
``[batch * seq, d_ff]`` before its FFL: :func:`as_token_grid` gives the ``[batch, seq, d_ff]`` view of either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

_GATED = ("mlp.gate_proj", "mlp.down_proj")

#: model_type -> (pre-activation module, key module), relative to the decoder layer.
KNOWN_SITES: dict[str, tuple[str, str]] = {
    **{
        t: _GATED
        for t in (
            "llama",
            "mistral",
            "ministral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "stablelm",
            "olmo",
            "olmo2",
            "olmo3",
            "granite",
            "cohere",
            "smollm3",
            "helium",
            "exaone4",
            "seed_oss",
        )
    },
    "phi": ("mlp.fc1", "mlp.fc2"),
    **{t: ("mlp.c_fc", "mlp.c_proj") for t in ("gpt2", "gpt_bigcode", "gpt_neo", "starcoder2")},
    **{t: ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for t in ("gpt_neox", "bloom", "persimmon", "falcon")},
    **{t: ("fc1", "fc2") for t in ("opt", "xglm", "biogpt")},
    **{t: ("mlp.fc_in", "mlp.fc_out") for t in ("gptj", "codegen")},
    **{t: ("mlp.up_proj", "mlp.down_proj") for t in ("nemotron", "arcee")},
    "mpt": ("ffn.up_proj", "ffn.down_proj"),
}

#: model types whose FFL width is not a config attribute: d_ff = 4 * hidden (or ``n_inner``/``intermediate_size``
#: when set).
_FOUR_X_HIDDEN = {
    "bloom": None,
    "mpt": None,  # transformers' MptMLP ignores config.expansion_ratio
    "gpt2": "n_inner",
    "gpt_bigcode": "n_inner",
    "gptj": "n_inner",
    "codegen": "n_inner",
    "gpt_neo": "intermediate_size",
}

_MLP_CONTAINER_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "ff", "ffl")
_ATTENTION_MARKERS = ("attn", "attention")
_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
_OVERRIDE_KEYS = {"pre", "key", "layers"}


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
#: layer list), or a callable returning one ``(pre, key)`` pair per decoder layer, as modules or full names.
SiteOverride = Mapping[str, str] | Callable[[nn.Module], Sequence[tuple[nn.Module | str, nn.Module | str]]]


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


def as_token_grid(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View a site tensor as ``[batch, seq_len, d]``.

    Site tensors are ``[batch, seq, d]`` except in OPT, which runs its FFL on ``[batch * seq, d]``.

    Raises:
        SiteError: when ``x`` is neither layout.
    """
    if x.dim() == 3 and x.shape[1] == seq_len:
        return x
    if x.dim() == 2 and seq_len > 0 and x.shape[0] % seq_len == 0:
        return x.view(x.shape[0] // seq_len, seq_len, x.shape[1])
    raise SiteError(
        f"A site tensor of shape {tuple(x.shape)} is neither [batch, {seq_len}, d] nor [batch * {seq_len}, d]."
    )


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text(decoder=True)
        except (TypeError, ValueError):
            return get_text()
    return config


def _hidden_size(model: nn.Module, config) -> int | None:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    dim = getattr(emb, "embedding_dim", None)
    return dim if isinstance(dim, int) else None


def config_d_ff(config, hidden: int | None = None) -> int | None:
    """The FFL width a config declares (``intermediate_size``, ``n_inner``, ``ffn_dim``, ``4 * hidden``...)."""
    model_type = getattr(config, "model_type", None)
    if model_type in _FOUR_X_HIDDEN:
        attr = _FOUR_X_HIDDEN[model_type]
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, int) and value > 0:
            return value
        return 4 * hidden if hidden else None
    for attr in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _expert_count(config) -> int:
    for attr in _EXPERT_COUNT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return 0


def find_decoder_layers(
    model: nn.Module, path: str | None = None, holding: Sequence[str] = ()
) -> tuple[str, nn.ModuleList]:
    """Return ``(name, module_list)`` of the decoder layers.

    With ``path`` the list is taken from there. Otherwise the candidates are the ``nn.ModuleList`` of identical
    blocks holding linear modules (and every module named in ``holding``), of length ``num_hidden_layers`` when
    the config gives it; lists nested in another candidate are dropped, and exactly one must remain.

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
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
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
    if len(outer) != 1:
        found = ", ".join(f"{n or '<root>'} ({len(m)} x {type(m[0]).__name__})" for n, m in outer) or "none"
        expected = f" holding {', '.join(holding)}" if holding else ""
        raise SiteError(
            f"Cannot tell the decoder layers of {type(model).__name__}: lists of identical blocks{expected} "
            f"found: {found}. Name them with a site override {{'layers': ..., 'pre': ..., 'key': ...}}."
        )
    return outer[0]


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _describe(linears: Sequence[tuple[str, tuple[int, int]]]) -> str:
    return ", ".join(f"{n} ({i}->{o})" for n, (i, o) in linears) or "no linear modules"


def _discover_in_layer(
    layer: nn.Module, index: int, hidden: int | None, d_ff_hint: int | None
) -> tuple[str, str]:
    """Find the ``(pre, key)`` names, relative to one decoder layer, or raise naming what was found."""
    prefix, scope = "", layer
    for name in _MLP_CONTAINER_NAMES:
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module) and linear_io(sub) is None:
            prefix, scope = name + ".", sub
            break
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
            f"The FFL of {where} looks like a mixture of experts (expert lists or fused expert weights), which "
            f"is not supported; found: {found}. Name the sites yourself to use one projection pair."
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
        raise SiteError(
            f"{what} FFL output projections (input width d_ff, output width {hidden}) in {where}: "
            f"{', '.join(n for n, _ in downs) or 'none'}; found: {found}. Name the sites yourself."
        )
    key_name, d_ff = downs[0]
    ups = [n for n, (i, o) in linears if i == hidden and o == d_ff and n != key_name]
    if len(ups) > 1:  # gated FFL: the pre-activation is the gate
        gates = [n for n in ups if "gate" in n.rsplit(".", 1)[-1].lower()]
        ups = gates if len(gates) == 1 else ups
    if len(ups) != 1:
        fused = [n for n, (i, o) in linears if i == hidden and o == 2 * d_ff]
        hint = (
            f" {', '.join(fused)} computes gate and up in one fused projection, which is not supported."
            if fused and not ups
            else ""
        )
        what = "Several candidate" if ups else "No"
        raise SiteError(
            f"{what} FFL pre-activation projections (input width {hidden}, output width {d_ff}) in {where}: "
            f"{', '.join(ups) or 'none'}; found: {found}.{hint} Name the sites yourself."
        )
    return ups[0], key_name


def _pairs_from_callable(model: nn.Module, override: Callable) -> list[tuple[str, str]]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    pairs = []
    try:
        returned = list(override(model))
    except TypeError as err:
        raise SiteError(f"The site override callable failed or did not return pairs: {err}") from err
    for i, pair in enumerate(returned):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise SiteError(f"The site override returned {pair!r} for layer {i}; expected a (pre, key) pair.")
        resolved = []
        for role, item in zip(("pre-activation", "key"), pair):
            if isinstance(item, str):
                resolved.append(item)
            elif isinstance(item, nn.Module) and id(item) in names:
                resolved.append(names[id(item)])
            else:
                raise SiteError(
                    f"The site override returned a {role} {type(item).__name__} for layer {i} that is not a "
                    f"module of {type(model).__name__} (nor a module name)."
                )
        pairs.append((resolved[0], resolved[1]))
    return pairs


def find_ffl_sites(model: nn.Module, override: SiteOverride | None = None) -> list[FFLSite]:
    """Return the FFL sites of every decoder layer of ``model``, validated against the real shapes.

    Args:
        model: a causal LM (``PreTrainedModel``) or any ``nn.Module`` when ``override`` is given.
        override: relative module names ``{"pre": "mlp.gate_proj", "key": "mlp.down_proj"}`` (plus optional
            ``"layers"``, the path of the layer list), or a callable ``model -> [(pre, key), ...]`` returning
            modules or full module names, one pair per decoder layer.

    Raises:
        SiteError: when sites cannot be found unambiguously or do not match the model's shapes.
    """
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    hidden = _hidden_size(model, config)
    expected_d_ff = config_d_ff(config, hidden) if config is not None else None
    if callable(override) and not isinstance(override, Mapping):
        return _check_pairs(model, _pairs_from_callable(model, override), hidden, None, "the override")
    if override is not None:
        if not isinstance(override, Mapping):
            raise SiteError(
                "A site override is a mapping {'pre': ..., 'key': ...} or a callable, "
                f"got {type(override).__name__}."
            )
        unknown, missing = set(override) - _OVERRIDE_KEYS, {"pre", "key"} - set(override)
        if unknown or missing or not all(isinstance(v, str) and v for v in override.values()):
            raise SiteError(
                "A site override needs module names under 'pre' and 'key' (and optionally 'layers'); "
                f"got {dict(override)!r}."
            )
        name, layers = find_decoder_layers(model, override.get("layers"))
        pairs = _full_names(name, [(override["pre"], override["key"])] * len(layers))
        return _check_pairs(model, pairs, hidden, None, "the override")
    table_error = None
    if model_type in KNOWN_SITES:
        rel = KNOWN_SITES[model_type]
        source = f"the table entry for {model_type!r}"
        try:
            name, layers = find_decoder_layers(model, holding=rel)
            return _check_pairs(model, _full_names(name, [rel] * len(layers)), hidden, expected_d_ff, source)
        except SiteError as err:
            table_error = err
    try:
        name, layers = find_decoder_layers(model)
        hint = None if _expert_count(config) else expected_d_ff
        pairs = _full_names(
            name, [_discover_in_layer(layer, i, hidden, hint) for i, layer in enumerate(layers)]
        )
        sites = _check_pairs(model, pairs, hidden, expected_d_ff if table_error else None, "discovery")
    except SiteError as err:
        if table_error is not None:
            raise SiteError(f"{table_error} Discovery failed too: {err}") from err
        raise
    if table_error is not None:
        logger.warning(
            "%s Using the discovered sites %s / %s.", table_error, sites[0].pre_name, sites[0].key_name
        )
    else:
        logger.info(
            "Discovered FFL sites of model type %r: %s / %s", model_type, sites[0].pre_name, sites[0].key_name
        )
    return sites


def _full_names(layers_name: str, rel: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    prefix = f"{layers_name}." if layers_name else ""
    return [(f"{prefix}{i}.{p}", f"{prefix}{i}.{k}") for i, (p, k) in enumerate(rel)]


def _check_pairs(
    model: nn.Module, pairs: list[tuple[str, str]], hidden: int | None, d_ff: int | None, source: str
) -> list[FFLSite]:
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


def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on (accelerate's execution device for offloaded modules)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return device if isinstance(device, torch.device) else torch.device(device)
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    raise SiteError(f"Cannot tell the device of {type(module).__name__}: it has no parameters.")


__all__ = [
    "KNOWN_SITES",
    "FFLSite",
    "SiteError",
    "SiteOverride",
    "as_token_grid",
    "config_d_ff",
    "find_decoder_layers",
    "find_ffl_sites",
    "linear_io",
    "module_device",
]
