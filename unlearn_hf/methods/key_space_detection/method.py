"""Key Space Detection: fit the forget skill's hypercube, decide per row at prefill, and abstain."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor

from ...data import DataSpec
from ...runtime import ForwardContext, HookRegistrar, RequestState
from ...sites import as_token_grid, module_device
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
        abstained: bool ``[rows]`` (CPU), rows abstaining (``None`` before the decision).
        start: int64 ``[rows]``, generation step at which each abstaining row began its refusal.
        pending: per-layer inside flags gathered during the current forward.
        any: whether any row abstains (kept as a Python bool: decoding steps check it for free).
    """

    abstained: torch.Tensor | None = None
    start: torch.Tensor | None = None
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    any: bool = False


class AbstentionLogitsProcessor(LogitsProcessor):
    """Runs last in ``generate``: re-imposes the forced token of every abstaining row after all other processors
    (``min_new_tokens``, repetition penalties, bad words, temperature, top-k/p...), which could otherwise move or
    erase it."""

    def __init__(self, method: KeySpaceDetection, request: RequestState) -> None:
        self.method = method
        self.request = request

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        st = self.request.data.get(self.method._name)
        if st is None or not st.any or self.request.prefill_len is None:
            return scores
        step = input_ids.shape[1] - self.request.prefill_len
        self.method.force(scores, st, step, self.request)
        return scores


# ``LogitsProcessorList`` inspects every processor's signature at every step: give it a ready one.
AbstentionLogitsProcessor.__call__.__signature__ = inspect.signature(AbstentionLogitsProcessor.__call__)


@register_method
class KeySpaceDetection(UnlearningMethod):
    """Key Space Detection (abstention). State: ``layers`` (int64 ``[L]``), ``center`` and ``scale`` (float64
    ``[L, d_ff]``: μ and floored σ), ``k`` (float64 ``[L]``), ``count`` (int64 ``[L]``, queries fitted) and
    ``refusal_ids`` (int64, the refusal's tokens; end-of-sequence is appended at run time).

    **Decision.** Per row, on the key vector of the prompt's last real token (found through the attention mask,
    so either padding side works), in the forward that ends the prompt (the prefill). With several layers, the
    config's ``rule`` combines them. Beam search and ``num_return_sequences`` expand the decision with the rows.

    **Forward semantics.** An abstaining row's logits are replaced at every position by a one-hot distribution
    (0 for the forced token, -inf elsewhere): the refusal's tokens in order, then end-of-sequence (repeated).
    Position ``p`` of a forward whose last position predicts generation step ``s`` is forced to the token of step
    ``s - (P - 1 - p)`` (earlier steps: the refusal's first token). If ``labels`` were given, the loss is
    recomputed from the forced logits. Rows that do not abstain are untouched.

    **Requests.** Each ``generate`` call is one request. Outside ``generate``, a forward given a KV cache that
    holds a past continues the request that filled the cache (a hand-written decoding loop); a forward without
    one (e.g. scoring full sequences) is a request of its own: an abstaining row's logits then carry nothing of
    the model, only the refusal's first token at every position.
    """

    config_class = KeySpaceDetectionConfig
    abstains = True

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        """One streaming pass over the forget queries' last real tokens (METHOD.md §4): per layer μ, σ (sample std,
        floored at ``eps``), min and max, then k = max_d max(max_d − μ_d, μ_d − min_d) / σ_d. ``retain`` is unused.

        ``config`` is copied: the fitted method's config holds the resolved layer indices.
        """
        base = model.base_model
        check_tokenizer(base, tokenizer)
        sites = model.ffl_sites
        layers = check_layers([len(sites) // 2] if config.layers is None else config.layers, sites)
        config = dataclasses.replace(config, layers=layers)
        refusal_ids = cls.refusal_token_ids(config, tokenizer)
        vocab = getattr(base.config, "vocab_size", None)
        if vocab is not None and refusal_ids.numel() and int(refusal_ids.max()) >= vocab:
            raise ValueError(
                f"The refusal tokenizes to id {int(refusal_ids.max())}, outside the model's vocabulary ({vocab})."
            )
        cls.eos_token_id(base)  # fail early when the model has no end-of-sequence token
        stats = probe_or_check(
            model,
            forget,
            tokenizer,
            role="forget",
            site="key",
            mode="last",
            layers=layers,
            spec=spec,
            show_progress=show_progress,
            sites=sites,
        )
        if stats.count < 2:
            raise ValueError(
                f"Key Space Detection needs at least 2 forget queries: the standard deviation is undefined for "
                f"{stats.count}."
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
            "center": torch.stack(centers).to(torch.float64),
            "scale": torch.stack(scales).to(torch.float64),
            "k": torch.tensor(ks, dtype=torch.float64),
            "count": torch.tensor([stats.layers[i].count for i in layers], dtype=torch.int64),
            "refusal_ids": refusal_ids,
        }
        return cls(config, state)

    @staticmethod
    def refusal_token_ids(config: KeySpaceDetectionConfig, tokenizer: Any) -> torch.Tensor:
        """The refusal's token ids (int64 ``[n]``), empty for ``action="eos"``."""
        if config.action == "eos":
            return torch.zeros(0, dtype=torch.int64)
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to tokenize the refusal text (pass tokenizer=...).")
        ids = tokenizer(config.refusal, add_special_tokens=False)["input_ids"]
        if torch.is_tensor(ids):
            ids = ids.flatten().tolist()
        if len(ids) == 0:
            raise ValueError(
                f"The refusal text {config.refusal!r} tokenizes to no tokens with this tokenizer; choose another "
                "text or action='eos'."
            )
        return torch.tensor(ids, dtype=torch.int64)

    @staticmethod
    def eos_token_id(model) -> int:
        """The model's end-of-sequence token (the first one when there are several)."""
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
            if config.layers is None or state["layers"].tolist() != sorted(set(config.layers)):
                raise ValueError(
                    f"State layers {state['layers'].tolist()} do not match config layers {config.layers}."
                )
            if (state["scale"] <= 0).any():
                raise ValueError("Tensor 'scale' holds non-positive standard deviations.")
            if (state["k"] < 0).any():
                raise ValueError("Tensor 'k' holds negative radii.")
            if (state["count"] < 2).any():
                raise ValueError("Tensor 'count': every layer needs at least 2 fitted queries.")
            if config.action == "refuse" and state["refusal_ids"].numel() == 0:
                raise ValueError("Tensor 'refusal_ids' is empty but the action is 'refuse'.")
            if config.action == "eos" and state["refusal_ids"].numel() != 0:
                raise ValueError("Tensor 'refusal_ids' is not empty but the action is 'eos'.")
            if state["refusal_ids"].numel() and int(state["refusal_ids"].min()) < 0:
                raise ValueError("Tensor 'refusal_ids' holds negative token ids.")

    # -- applying --------------------------------------------------------------------------------------------
    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        self._eos = self.eos_token_id(model)
        emb = model.get_output_embeddings()
        vocab = emb.weight.shape[0] if emb is not None else getattr(model.config, "vocab_size", None)
        ids = self.state["refusal_ids"]
        if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(
                f"Refusal token id {int(ids.max())} is outside the model's vocabulary ({vocab})."
            )
        layers: dict[int, KeySpaceLayer] = {}
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
            layers[layer] = KeySpaceLayer(
                self.state["center"][row],
                self.state["scale"][row],
                float(self.state["k"][row]),
                self.config.alpha,
                module_device(site.key),
            )
        self._name = hooks.method_name
        self.layers = layers
        self._last_layer = max(layers)
        self._forced: dict[int, torch.Tensor] = {}
        for layer, kl in layers.items():
            hooks.forward_pre_hook(sites[layer].key, self._make_hook(layer, kl))

    def forced_tokens(self, eos: int) -> torch.Tensor:
        """The tokens an abstaining row emits: the refusal, then ``eos`` (int64, CPU)."""
        tokens = self._forced.get(eos)
        if tokens is None:
            tokens = self._forced[eos] = torch.cat([self.state["refusal_ids"], torch.tensor([eos])])
        return tokens

    def _make_hook(self, layer: int, kl: KeySpaceLayer):
        recheck = self.config.recheck_each_token

        def hook(ctx: ForwardContext, key: torch.Tensor) -> None:
            key = as_token_grid(key, ctx.input_len)  # OPT runs its FFL on [batch * positions, d_ff]
            if ctx.is_prefill:
                index, real = ctx.last_token_index(key.shape[0], key.device)
                rows = torch.arange(key.shape[0], device=key.device)
                inside = kl.inside(key[rows, index]) & real
            elif recheck and not ctx.is_prompt_chunk:
                inside = kl.inside(key[:, -1])
            else:
                return None
            st = ctx.request.data.get(self._name)
            if st is None:
                st = ctx.request.data[self._name] = AbstentionState()
            st.pending[layer] = inside.cpu()
            if layer == self._last_layer:
                self._decide(ctx, st)
            return None

        return hook

    def inside(self, per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
        """Combine per-layer inside flags with the configured rule."""
        stacked = torch.stack([per_layer[i] for i in sorted(per_layer)])
        return stacked.all(0) if self.config.rule == "all" else stacked.any(0)

    def _decide(self, ctx: ForwardContext, st: AbstentionState) -> None:
        if len(st.pending) != len(self.layers):
            missing = sorted(set(self.layers) - set(st.pending))
            st.pending = {}
            raise RuntimeError(f"Key Space Detection did not see layers {missing} in this forward.")
        flags = self.inside(st.pending)
        st.pending = {}
        group = ctx.request.group_size
        if group > 1 and flags.numel() % group == 0:  # beams of one input move together
            flags = flags.view(-1, group).any(1).repeat_interleave(group)
        if ctx.is_prefill or st.abstained is None:
            st.abstained = flags
            st.start = torch.full(flags.shape, ctx.steps_generated, dtype=torch.long)
        else:
            new = flags & ~st.abstained
            st.start[new] = ctx.steps_generated
            st.abstained |= new
        st.any = bool(st.abstained.any())
        if ctx.is_prefill:
            ctx.request.decided(self._name)

    def on_forward_start(self, ctx: ForwardContext) -> None:
        st = ctx.request.data.get(self._name)
        if st is not None and st.pending:
            st.pending = {}  # left over from a forward that raised

    def on_forward_end(self, ctx: ForwardContext, output: Any) -> Any:
        st = ctx.request.data.get(self._name)
        if ctx.is_prefill and (st is None or st.abstained is None):
            raise RuntimeError(
                f"Key Space Detection did not run at layers {sorted(self.layers)} during the prefill: the key "
                "modules were not called."
            )
        if st is None or not st.any:
            return output
        if isinstance(output, tuple):  # return_dict=False: (loss?, logits, ...)
            at = 1 if ctx.labels is not None else 0
            self.force(output[at], st, ctx.steps_generated, ctx.request)
            if at == 1:
                output = (self._loss(ctx, output[1]), *output[1:])
            return output
        logits = output.get("logits") if hasattr(output, "get") else getattr(output, "logits", None)
        if logits is not None:
            self.force(logits, st, ctx.steps_generated, ctx.request)
            if ctx.labels is not None and output.get("loss") is not None:
                output["loss"] = self._loss(ctx, logits)
        return output

    @staticmethod
    def _loss(ctx: ForwardContext, logits: torch.Tensor) -> torch.Tensor:
        """The model's own loss function applied to the forced logits."""
        return ctx.model.loss_function(logits=logits, labels=ctx.labels, vocab_size=logits.shape[-1])

    def force(
        self, scores: torch.Tensor, st: AbstentionState, step: int, request: RequestState | None
    ) -> None:
        """Overwrite, in place, the abstaining rows of ``scores`` (``[rows, vocab]``, or ``[rows, positions, vocab]``
        whose last position predicts generation step ``step``) with the one-hot forced token."""
        eos = request.eos_token_id if request is not None and request.eos_token_id is not None else self._eos
        forced = self.forced_tokens(eos)
        rows = st.abstained.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        view = scores.unsqueeze(1) if scores.ndim == 2 else scores
        n_pos = view.shape[1]
        steps = torch.arange(step - n_pos + 1, step + 1)
        index = (steps.unsqueeze(0) - st.start[rows].unsqueeze(1)).clamp_(0, forced.numel() - 1)
        device = scores.device
        tokens = forced[index].to(device)
        rows = rows.to(device)
        view[rows] = float("-inf")
        view[rows.unsqueeze(1), torch.arange(n_pos, device=device).unsqueeze(0), tokens] = 0.0

    def logits_processor(self, request: RequestState) -> LogitsProcessor:
        """The processor ``generate`` runs after all others for this request."""
        return AbstentionLogitsProcessor(self, request)
