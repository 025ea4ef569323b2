"""Key Space Detection: fit the forget skill's hypercube, decide per row at prefill, and abstain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...data import DataSpec
from ...runtime import ForwardContext, HookRegistrar
from ...sites import module_device
from ..base import UnlearningMethod, check_layers, register_method
from ..neurons import check_tokenizer, probe_or_check
from .config import KeySpaceDetectionConfig
from .layer import KeySpaceLayer


def hypercube_radius(
    mean: torch.Tensor, std: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor
) -> float:
    """The smallest k with every probe vector inside μ ± k·σ: max over d of max(max−μ, μ−min)/σ (exact)."""
    return float(torch.maximum(maximum - mean, mean - minimum).div(std).max())


@dataclass
class AbstentionState:
    """Per-request abstention of one KSD method.

    Attributes:
        abstained: bool ``[rows]``, rows currently abstaining.
        start: int ``[rows]``, generation step at which each abstaining row began its refusal.
        pending: per-layer inside flags gathered during the current forward.
    """

    abstained: torch.Tensor | None = None
    start: torch.Tensor | None = None
    pending: dict[int, torch.Tensor] = field(default_factory=dict)


@register_method
class KeySpaceDetection(UnlearningMethod):
    """Key Space Detection (abstention). State: ``layers`` (int64 ``[L]``), ``center`` and ``scale`` (float64
    ``[L, d_ff]``: μ and floored σ), ``k`` (float64 ``[L]``), ``count`` (int64 ``[L]``, queries fitted) and
    ``refusal_ids`` (int64, the refusal's tokens followed by nothing; end-of-sequence is appended at run time).

    **Forward semantics.** The decision is taken on the last real token of the first forward of a request
    (prefill; with a cache, later forwards continue the request). An abstaining row's logits are replaced at
    every position by a one-hot distribution (0 for the forced token, -inf elsewhere): the refusal's next token,
    then end-of-sequence. A plain full-sequence forward (scoring) is its own request: the row's logits then
    carry nothing of the model, only the refusal's first token. Rows that do not abstain are untouched.
    """

    config_class = KeySpaceDetectionConfig
    abstains = True

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        base = model.base_model
        check_tokenizer(base, tokenizer)
        sites = model.ffl_sites
        if config.layers is None:
            config.layers = [len(sites) // 2]
        layers = check_layers(config.layers, sites)
        refusal_ids = cls.refusal_token_ids(config, tokenizer)
        cls.eos_token_id(base)  # fail early when the model has no end-of-sequence token
        stats = probe_or_check(
            base,
            forget,
            tokenizer,
            role="forget",
            site="key",
            mode="last",
            layers=layers,
            spec=spec,
            show_progress=show_progress,
        )
        if stats.count < 2:
            raise ValueError(
                f"Key Space Detection needs at least 2 forget queries (σ is undefined for {stats.count})."
            )
        if stats.layers[layers[0]].minimum is None:
            raise ValueError("Precomputed key statistics must track per-dimension min/max (query mode).")
        centers, scales, ks = [], [], []
        for i in layers:
            s = stats.layers[i]
            std = s.std(config.eps)
            centers.append(s.mean)
            scales.append(std)
            ks.append(hypercube_radius(s.mean, std, s.minimum, s.maximum))
        state = {
            "layers": torch.tensor(layers, dtype=torch.int64),
            "center": torch.stack(centers),
            "scale": torch.stack(scales),
            "k": torch.tensor(ks, dtype=torch.float64),
            "count": torch.tensor([stats.layers[i].count for i in layers], dtype=torch.int64),
            "refusal_ids": refusal_ids,
        }
        return cls(config, state)

    @staticmethod
    def refusal_token_ids(config: KeySpaceDetectionConfig, tokenizer: Any) -> torch.Tensor:
        if config.action == "eos":
            return torch.zeros(0, dtype=torch.int64)
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to tokenize the refusal text (pass tokenizer=...).")
        ids = tokenizer(config.refusal, add_special_tokens=False)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"The refusal text {config.refusal!r} tokenizes to no tokens.")
        return torch.tensor(ids, dtype=torch.int64)

    @staticmethod
    def eos_token_id(model) -> int:
        for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            eos = getattr(cfg, "eos_token_id", None)
            if isinstance(eos, (list, tuple)):
                eos = eos[0] if eos else None
            if eos is not None:
                return int(eos)
        raise ValueError("The model has no eos_token_id: abstaining rows could not end their output.")

    @classmethod
    def state_spec(cls, config, state):
        n = len(config.layers) if config.layers is not None else 0
        d = state["center"].shape[-1] if "center" in state else 0
        r = state["refusal_ids"].shape[0] if "refusal_ids" in state else 0
        return {
            "layers": ((n,), torch.int64),
            "center": ((n, d), torch.float64),
            "scale": ((n, d), torch.float64),
            "k": ((n,), torch.float64),
            "count": ((n,), torch.int64),
            "refusal_ids": ((r,), torch.int64),
        }

    @classmethod
    def validate_state(cls, state, config=None):
        super().validate_state(state, config)
        if config is not None:
            if state["layers"].tolist() != sorted(set(config.layers)):
                raise ValueError(
                    f"State layers {state['layers'].tolist()} do not match config layers {config.layers}."
                )
            if (state["scale"] <= 0).any():
                raise ValueError("Tensor 'scale' holds non-positive standard deviations.")
            if (state["count"] < 2).any():
                raise ValueError("Tensor 'count': every layer needs at least 2 fitted queries.")
            if config.action == "refuse" and state["refusal_ids"].numel() == 0:
                raise ValueError("Tensor 'refusal_ids' is empty but the action is 'refuse'.")

    # -- applying --------------------------------------------------------------------------------------------
    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        self._name = hooks.method_name
        self._eos = self.eos_token_id(model)
        vocab = (
            model.get_output_embeddings().weight.shape[0]
            if model.get_output_embeddings() is not None
            else None
        )
        ids = self.state["refusal_ids"]
        if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(
                f"Refusal token id {int(ids.max())} is outside the model's vocabulary ({vocab})."
            )
        self._forced = torch.cat([ids, torch.tensor([self._eos])])
        self.layers: dict[int, KeySpaceLayer] = {}
        for row, layer in enumerate(self.state["layers"].tolist()):
            if layer >= len(sites):
                raise ValueError(
                    f"Key Space Detection state names layer {layer}; the model has {len(sites)}."
                )
            site = sites[layer]
            if self.state["center"].shape[-1] != site.d_ff:
                raise ValueError(
                    f"Layer {layer}: hypercube width {self.state['center'].shape[-1]} != d_ff {site.d_ff}."
                )
            kl = KeySpaceLayer(
                self.state["center"][row],
                self.state["scale"][row],
                float(self.state["k"][row]),
                self.config.alpha,
                module_device(site.key),
            )
            self.layers[layer] = kl
            hooks.forward_pre_hook(site.key, self._make_hook(layer, kl))

    def request_state(self, ctx: ForwardContext) -> AbstentionState:
        return ctx.request.data.setdefault(self._name, AbstentionState())

    def _make_hook(self, layer: int, kl: KeySpaceLayer):
        recheck = self.config.recheck_each_token

        def hook(ctx: ForwardContext, key: torch.Tensor) -> None:
            if ctx.is_prefill:
                vectors = key[ctx.last_token_mask(key.shape[0], key.device)]
            elif recheck:
                vectors = key[:, -1]
            else:
                return None
            self.request_state(ctx).pending[layer] = kl.inside(vectors).cpu()
            return None

        return hook

    def inside(self, per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
        """Combine per-layer inside flags with the configured rule."""
        stacked = torch.stack([per_layer[i] for i in sorted(per_layer)])
        return stacked.all(0) if self.config.rule == "all" else stacked.any(0)

    def on_forward_end(self, ctx: ForwardContext, output: Any) -> Any:
        st = self.request_state(ctx)
        if st.pending:
            if len(st.pending) != len(self.layers):
                raise RuntimeError("Key Space Detection did not see every configured layer in this forward.")
            flags = self.inside(st.pending)
            st.pending = {}
            if ctx.is_prefill or st.abstained is None:
                st.abstained = flags
                st.start = torch.full(flags.shape, ctx.steps_generated, dtype=torch.long)
            else:
                new = flags & ~st.abstained
                st.start[new] = ctx.steps_generated
                st.abstained |= new
        if st.abstained is not None and st.abstained.any():
            logits = getattr(output, "logits", None)
            if logits is not None:
                self.force(logits, st, ctx.steps_generated)
        return output

    def force(self, logits: torch.Tensor, st: AbstentionState, step: int) -> None:
        """Overwrite abstaining rows of ``logits [rows, positions, vocab]`` with the forced next token."""
        rows = st.abstained.nonzero().squeeze(1)
        index = (step - st.start[rows]).clamp(0, self._forced.numel() - 1)
        tokens = self._forced[index].to(logits.device)
        rows = rows.to(logits.device)
        logits[rows] = float("-inf")
        logits[rows, :, tokens] = 0.0
