"""``UnlearnedLM``: lm-eval's ``HFLM`` for unlearned models, registered as ``unlearn_hf``.

**Semantics of scoring a model that abstains** (see ``docs/EVALUATION.md``):

- *The decision is made on the context*, per request, alone: the context's tokens (as lm-eval feeds them, left
  truncated to ``max_length``) go through :meth:`UnlearnedModelForCausalLM.detect` one request at a time, without
  padding. So a request's decision is the same at every batch size and padding side; decisions are cached by
  token sequence (the choices of a multiple-choice question share one).
- *The scoring forwards run with abstention switched off*, so they measure the model itself (the base model, or
  the base model as Neuron Adjust / Selective Pruning change it): a request the model does not abstain on scores
  exactly what the base model scores in the same batch.
- *An abstained request is answered by the refusal*: ``loglikelihood`` gives ``(-inf, False)`` (under the refusal
  the continuation has probability zero), ``loglikelihood_rolling`` ``-inf``, ``generate_until`` the refusal text.
  Every value carries its decision (:mod:`.results`), from which :mod:`.scoring` scores the document as wrong and
  reports the ``abstained`` metric.
- *Neuron Adjust scores deterministically* (``deterministic_neuron_adjust=True``, the default): its random
  replacement draws depend on the batch shape, so scores would change with lm-eval's batch size. The switch lasts
  each scoring call, in its thread only (:meth:`NeuronAdjust.deterministic`): the methods stay attached as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import get_dtype

from ...context import is_unlearned_model
from .results import GenerationResult, LoglikelihoodResult, RollingResult
from .scoring import install_scoring

logger = logging.getLogger(__name__)

#: HFLM arguments that load or shard a model in ways an unlearned checkpoint does not support.
UNSUPPORTED = {
    "parallelize": False,
    "tp_plan": None,
    "peft": None,
    "delta": None,
    "autogptq": False,
    "gptqmodel": False,
    "gguf_file": None,
    "subfolder": "",
}


@register_model("unlearn_hf")
class UnlearnedLM(HFLM):
    """lm-eval's Hugging Face model class for a model unlearned with unlearn_hf (see the module docstring).

    Args:
        pretrained: an unlearned checkpoint (a local folder or a Hub repo holding ``unlearn_config.json``, light
            or full layout) or an ``UnlearnedModelForCausalLM`` in memory.
        tokenizer: a tokenizer or its name; by default the checkpoint's own, else its base model's.
        revision / dtype / device / trust_remote_code: as for ``HFLM`` (``device`` falls back to the CPU when
            CUDA is asked for and missing).
        ignore_fingerprint: load even if the base model differs from the one the unlearning was fitted on.
        deterministic_neuron_adjust: random-mode Neuron Adjust methods replace deterministically while lm-eval
            scores (:meth:`NeuronAdjust.deterministic`, within each scoring call and its thread).
        kwargs: the other ``HFLM`` arguments (``batch_size``, ``max_length``, ``add_bos_token``, ...).
    """

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        *,
        revision: str | None = "main",
        dtype: str | torch.dtype | None = "auto",
        device: str | None = "cuda",
        trust_remote_code: bool | None = False,
        ignore_fingerprint: bool = False,
        deterministic_neuron_adjust: bool = True,
        **kwargs: Any,
    ) -> None:
        refused = sorted(k for k, default in UNSUPPORTED.items() if k in kwargs and kwargs[k] != default)
        if refused:
            raise ValueError(f"unlearn_hf models do not support the HFLM arguments {refused}.")
        for key in UNSUPPORTED:
            kwargs.pop(key, None)
        if kwargs.get("backend", "default") not in ("default", "causal"):
            raise ValueError(
                f"unlearn_hf models are causal LMs; backend={kwargs['backend']!r} is not supported."
            )
        if isinstance(pretrained, (str, os.PathLike)):
            name = pretrained = os.fspath(pretrained)
            pretrained, tokenizer = _load(
                pretrained, tokenizer, revision, dtype, device, trust_remote_code, ignore_fingerprint
            )
        elif not is_unlearned_model(pretrained):
            raise TypeError(
                f"pretrained must be an unlearned checkpoint or UnlearnedModelForCausalLM, got {type(pretrained).__name__}"
                " (evaluate a plain transformers model with lm-eval's 'hf' model)."
            )
        else:
            name = getattr(pretrained.config, "_name_or_path", type(pretrained).__name__)
        install_scoring()
        super().__init__(
            pretrained=pretrained, tokenizer=tokenizer, trust_remote_code=trust_remote_code, **kwargs
        )
        self.deterministic_neuron_adjust = deterministic_neuron_adjust
        switched = random_neuron_adjust(pretrained) if deterministic_neuron_adjust else []
        if switched:
            logger.warning(
                "Neuron Adjust %s scores with deterministic replacement (batch-independent) while lm-eval scores.",
                switched,
            )
        self.pretrained = name
        self._decisions: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._decisions_for: tuple = ()
        self._late: dict[tuple[int, ...], bool] = {}  # rechecking methods: answers that turned into a refusal

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model record, with the unlearning methods, without asking the Hub for a commit."""
        from ...version import __version__

        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": self.revision,
            "unlearn_hf_version": __version__,
            "unlearn_hf_methods": {n: m.method_type for n, m in self.model.methods.items()},
        }

    # --- the decision -------------------------------------------------------------------------------------------

    def abstainers(self, tokens: list[int]) -> tuple[str, ...]:
        """The abstaining methods that refuse a request whose context is ``tokens`` (empty: it is answered),
        decided on those tokens alone (batch of one, no padding)."""
        # methods attached, removed or switched off (disable_unlearning) since: decide anew
        attached = (
            tuple(self.model.methods.items()),
            tuple(self.model._active_abstaining()),
            tuple(getattr(m, "deterministic_now", None) for m in self.model.methods.values()),
        )
        if attached != self._decisions_for:
            self._decisions, self._decisions_for = {}, attached
        key = tuple(tokens[-self.max_length :])
        if key not in self._decisions:
            if not key or not self.model.has_abstention:
                self._decisions[key] = ()
            else:
                ids = torch.tensor([key], dtype=torch.long)
                # every token is real, the pad token's id too: lm-eval feeds it (no mask to infer from padding)
                by = self.model.detect(ids, attention_mask=torch.ones_like(ids), by_method=True)
                self._decisions[key] = tuple(n for n, flags in by.items() if bool(flags[0]))
        return self._decisions[key]

    def refusal_text(self, abstainers: tuple[str, ...], max_tokens: int | None = None) -> str:
        """What ``generate`` emits for a row these methods abstain on: the refusal of the last of them in attach
        order (its logits processor runs last), without end-of-sequence, at most ``max_tokens`` tokens."""
        names = [n for n in self.model.attachments if n in abstainers]
        refusal = getattr(self.model.attachments[names[-1]], "refusal", None) if names else None
        ids = getattr(refusal, "refusal_ids", None)
        ids = [] if ids is None else ids.tolist()[:max_tokens]
        return self.tok_decode(ids) if ids else ""

    def _rechecking(self) -> bool:
        """Whether an attached abstaining method may start refusing in the middle of an answer."""
        return any(
            getattr(m.config, "recheck_each_token", False) for m in self.model.methods.values() if m.abstains
        )

    def _context_tokens(self, context: str, continuation: str) -> list[int]:
        """The context's tokens as ``loglikelihood`` feeds them: HFLM scores ``(context + continuation)[-(max_length
        + 1):][:-1]``, so a long request loses the start of its context (empty context: nothing to decide on)."""
        if not context:
            return []
        ctx, cont = self._encode_pair(context, continuation)
        return ctx[max(0, len(ctx) + len(cont) - self.max_length - 1) :]

    # --- lm-eval's request types --------------------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        with self.model.disable_abstention():
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        if not self._rechecking():
            with self.model.disable_abstention():
                return super()._model_generate(context, max_length, stop, **kwargs)
        # an answer may still turn into the refusal: generate as generate does, and keep its per-row report
        out = super()._model_generate(context, max_length, stop, return_dict_in_generate=True, **kwargs)
        mask = kwargs.get("attention_mask")
        for i, flag in enumerate(out.abstained.tolist()):
            row = context[i] if mask is None else context[i][mask[i].bool()]
            self._late[tuple(row.tolist())] = bool(flag)
        return out.sequences

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        """One request type's call: random-mode Neuron Adjust deterministic for its duration, in this thread only
        (:meth:`NeuronAdjust.deterministic`: nothing is re-attached), and lm-eval's cache hook silent while HFLM
        scores: with ``--use_cache`` it stored every request's value as HFLM computed it, before the decision turns
        it into the refusal, so a run interrupted and resumed from the cache scored refused requests as answered (a
        review). ``CachingLM`` stores the final values when the call returns."""
        hook, self.cache_hook = self.cache_hook, CacheHook(None)
        try:
            with contextlib.ExitStack() as stack:
                for name in random_neuron_adjust(self.model) if self.deterministic_neuron_adjust else []:
                    stack.enter_context(self.model.methods[name].deterministic())
                yield
        finally:
            self.cache_hook = hook

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[LoglikelihoodResult]:
        with self._scoring():
            return self._loglikelihood(requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[RollingResult]:
        with self._scoring():
            return self._loglikelihood_rolling(requests, disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[GenerationResult]:
        with self._scoring():
            return self._generate_until(requests, disable_tqdm)

    def _loglikelihood(self, requests: list[Any], disable_tqdm: bool) -> list[LoglikelihoodResult]:
        # every request is scored, so the batches (and the answered requests' values) are the base model's
        scores = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        out = []
        for req, (logprob, greedy) in zip(requests, scores, strict=True):
            refused = bool(self.abstainers(self._context_tokens(*req.args)))
            out.append(
                LoglikelihoodResult(float("-inf"), False, True)
                if refused
                else LoglikelihoodResult(logprob, greedy, False)
            )
        return out

    def _loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool) -> list[RollingResult]:
        scores = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        out = []
        for req, logprob in zip(requests, scores, strict=True):
            # the text is the request: decided on its first max_length tokens (those the first window scores)
            refused = bool(self.abstainers(self.tok_encode(req.args[0])[: self.max_length]))
            out.append(RollingResult(float("-inf"), True) if refused else RollingResult(logprob, False))
        return out

    def _generate_until(self, requests: list[Any], disable_tqdm: bool) -> list[GenerationResult]:
        refusals: list[str | None] = []
        contexts: list[tuple[int, ...]] = []
        for req in requests:
            context, gen_kwargs = req.args
            # as HFLM reads it: max_gen_toks or an alias (max_new_tokens, max_tokens, max_completion_tokens)
            new_tokens = int(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)["max_gen_toks"])
            contexts.append(tuple(self.tok_encode(context)[-max(self.max_length - new_tokens, 1) :]))
            who = self.abstainers(list(contexts[-1]))
            refusals.append(
                postprocess_generated_text(self.refusal_text(who, new_tokens), gen_kwargs.get("until"), None)
                if who
                else None
            )
        answered = [req for req, r in zip(requests, refusals) if r is None]
        self._late.clear()
        texts = iter(super().generate_until(answered, disable_tqdm=disable_tqdm) if answered else [])
        # with recheck_each_token an answer may turn into the refusal: generate reported that row as abstained
        return [
            GenerationResult(refusal, True)
            if refusal is not None
            else GenerationResult(next(texts), self._late.get(tokens, False))
            for refusal, tokens in zip(refusals, contexts)
        ]


def _load(
    name: str,
    tokenizer: Any,
    revision: str | None,
    dtype: Any,
    device: str | None,
    trust_remote_code: bool | None,
    ignore_fingerprint: bool,
) -> tuple[Any, Any]:
    """Load an unlearned checkpoint (refusing a plain model) and its tokenizer, on ``device``."""
    from ...cli.common import has_unlearning, load_tokenizer, saved_base_name
    from ...persistence.format import looks_like_local_path
    from ...wrapper import UnlearnedModelForCausalLM

    if looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"pretrained={name!r}: no such file or folder.")
    if not has_unlearning(name):
        where = (
            "" if Path(name).expanduser().exists() else " (no local folder: as a Hub repo, or not reached)"
        )
        raise ValueError(
            f"{name!r} holds no unlearn_config.json{where}, so it is not an unlearned model; evaluate a plain model "
            "with lm-eval's 'hf' model."
        )
    torch_dtype = dtype if dtype in (None, "auto") else get_dtype(dtype)
    model = UnlearnedModelForCausalLM.from_pretrained(
        name,
        revision=None if revision in (None, "main") else revision,
        dtype=torch_dtype if torch_dtype is not None else "auto",
        trust_remote_code=bool(trust_remote_code),
        ignore_fingerprint=ignore_fingerprint,
    )
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: evaluating %s on the CPU.", name)
        device = "cpu"
    model.to(torch.device(device or "cpu")).eval()
    if tokenizer is None:
        base = lambda: saved_base_name(name, revision)  # noqa: E731 - asked only when the others have none
        tokenizer = load_tokenizer([name, getattr(model.config, "_name_or_path", ""), base], model)
    return model, tokenizer


def random_neuron_adjust(model: Any) -> list[str]:
    """The names of the model's Neuron Adjust methods in random mode."""
    from ...methods import NeuronAdjust

    return [n for n, m in model.methods.items() if isinstance(m, NeuronAdjust) and not m.config.deterministic]
