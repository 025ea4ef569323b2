"""Key Space Detection, the fitted method: fit the forget skill's hypercube, its state, and attaching it (the
per-row decision is in :mod:`.decision`, the refusal in :mod:`.refusal`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...data import DataSpec
from ...hooks import HookRegistrar
from ...model_inputs import eos_token_id
from ..base import AbstainingMethod
from ..config import resolve_layers
from ..fitting import check_fit_inputs
from ..registry import register_method
from .config import AUTO, KeySpaceDetectionConfig
from .decision import KeySpaceAttachment
from .fit import STATISTICS, fit_key_space
from .key_units import unit_of, unit_readers
from .refusal import Refusal


@register_method
class KeySpaceDetection(AbstainingMethod):
    """Key Space Detection (abstention). State: ``layers`` (int64 ``[L]``), ``center`` and ``scale`` (float64
    ``[L, d_ff]``: μ and floored σ), ``k`` (float64 ``[L]``), ``count`` (int64 ``[L]``, queries fitted) and
    ``refusal_ids`` (int64, the refusal's tokens; end-of-sequence is appended at run time); after a calibrated
    fit also the calibration table ``calibration_layers`` (int64 ``[C]``), ``calibration_alphas`` (float64
    ``[A]``), ``calibration_forget`` and ``calibration_false`` (float64 ``[C, A]``: held-out forget abstention and
    worst-group false abstention of each candidate layer at each α, at the chosen window).

    **Decision and refusal.** Per row, at the prefill, on the key vectors of the prompt's last ``window`` real
    tokens (one inside = abstain): see :mod:`.decision`, where it is made; an abstaining row's logits carry only the refusal (:mod:`.refusal`).

    **Requests.** Each ``generate`` call is one request. Outside ``generate``, a forward given a KV cache that
    holds a past continues the request that filled the cache (a hand-written decoding loop); a forward without
    one (e.g. scoring full sequences) is a request of its own: an abstaining row's logits then carry nothing of
    the model, only the refusal's first token at every position.
    """

    config_class = KeySpaceDetectionConfig
    short_name = "ksd"
    label = "Key Space Detection"
    summary = (
        "Abstains (answers with its refusal text) on a prompt whose feed-forward key vectors lie inside the forget "
        "skill's hypercube at the chosen layers; other prompts get the base model's output unchanged. Its false-"
        "abstention budget holds on prompts like its calibration's retain questions, not on unlike ones."
    )
    cli_options = ("layers", "alpha", "refusal", "templates", "max_false_rate")
    statistics = STATISTICS

    def __init__(self, config: KeySpaceDetectionConfig, state) -> None:
        if isinstance(config, KeySpaceDetectionConfig) and not config.is_resolved:
            config = self._legacy_config(config)
        super().__init__(config, state)

    @staticmethod
    def _legacy_config(config: KeySpaceDetectionConfig) -> KeySpaceDetectionConfig:
        """A fitted config saved before windows and calibration existed decided on the prompt's last token."""
        if config.layers in ("auto", None) or config.alpha == "auto":
            raise ValueError(
                "A fitted Key Space Detection config needs concrete layers and alpha (got "
                f"layers={config.layers!r}, alpha={config.alpha!r})."
            )
        return dataclasses.replace(config, window=1 if config.window == "auto" else config.window)

    @classmethod
    def probe_sites(cls, config, n_layers):
        """The key site of every candidate layer (all of them when the layers are calibrated)."""
        if config.layers not in (AUTO, None):
            return {"key": resolve_layers(config.layers, n_layers)}
        return {"key": list(range(n_layers))}

    @classmethod
    def changed_sites(cls, config, n_layers):
        return {}  # it observes the keys and decides on abstention; no activation changes

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        """Fit the hypercube(s) on the key vectors at the forget questions' ends in every rendering, and with
        ``retain`` data calibrate layers, window and α on held-out questions (``docs/METHOD.md`` §4; see
        :class:`KeySpaceDetectionConfig` and :mod:`.fit`). ``retain`` may be a mapping ``{name: queries}``: the
        budget then holds for each named set in each rendering. The fitted config holds the resolved values.
        """
        check_fit_inputs(model, tokenizer)
        base = model.get_base_model()
        refusal_ids = cls.refusal_token_ids(config, tokenizer)
        vocab = getattr(base.config, "vocab_size", None)
        if vocab is not None and refusal_ids.numel() and int(refusal_ids.max()) >= vocab:
            raise ValueError(
                f"The refusal tokenizes to id {int(refusal_ids.max())}, outside the model's vocabulary ({vocab})."
            )
        cls.eos_token_id(base)  # fail early when the model has no end-of-sequence token
        result = fit_key_space(
            model, config, forget, retain, tokenizer, spec=spec, show_progress=show_progress
        )
        return cls(result.config, {**result.state, "refusal_ids": refusal_ids})

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
        eos = eos_token_id(model)
        if eos is None:
            raise ValueError("The model has no eos_token_id: abstaining rows could not end their output.")
        return eos

    @classmethod
    def state_spec(cls, config, state):
        n = len(config.layers) if config.layers is not None else 0
        d = state["center"].shape[-1] if "center" in state else 0
        r = state["refusal_ids"].shape[0] if "refusal_ids" in state else 0
        spec = {
            "layers": ((n,), torch.int64),
            "center": ((n, d), torch.float64),
            "scale": ((n, d), torch.float64),
            "k": ((n,), torch.float64),
            "count": ((n,), torch.int64),
            "refusal_ids": ((r,), torch.int64),
        }
        if "calibration_layers" in state:  # the calibration table, when the fit was calibrated
            c = state["calibration_layers"].shape[0]
            a = state["calibration_alphas"].shape[0] if "calibration_alphas" in state else 0
            spec.update(
                calibration_layers=((c,), torch.int64),
                calibration_alphas=((a,), torch.float64),
                calibration_forget=((c, a), torch.float64),
                calibration_false=((c, a), torch.float64),
            )
        return spec

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
    def attach(self, model, hooks: HookRegistrar) -> KeySpaceAttachment:
        sites = model.ffl_sites
        eos = self.eos_token_id(model)
        emb = model.get_output_embeddings()
        vocab = emb.weight.shape[0] if emb is not None else getattr(model.config, "vocab_size", None)
        ids = self.state["refusal_ids"]
        if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(
                f"Refusal token id {int(ids.max())} is outside the model's vocabulary ({vocab})."
            )
        state_rows = {layer: row for row, layer in enumerate(self.state["layers"].tolist())}
        for layer in state_rows:
            if layer >= len(sites):
                raise ValueError(
                    f"Key Space Detection state names layer {layer}; the model has {len(sites)}."
                )
            if self.state["center"].shape[-1] != sites[layer].d_ff:
                raise ValueError(
                    f"Layer {layer}: hypercube width {self.state['center'].shape[-1]} != d_ff {sites[layer].d_ff}."
                )
        cubes = {
            i: (self.state["center"][r], self.state["scale"][r], float(self.state["k"][r]))
            for i, r in state_rows.items()
        }
        owner = unit_of(sites)
        layers = unit_readers(sites, cubes, sorted({owner[i] for i in state_rows}), self.config.alpha)
        key_modules = {unit: sites[unit].key for unit in layers}
        return KeySpaceAttachment(
            self, model, hooks.method_name, hooks, layers, key_modules, Refusal(ids, eos)
        )
