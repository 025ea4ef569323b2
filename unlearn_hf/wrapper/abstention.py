"""Abstention on the model's side: ``generate`` tells the request what it will do and runs the abstaining
attachments' logits processors last; their per-row decisions are combined, mapped onto the returned rows and
reported; :meth:`detect` takes the same decision from one (shortened) forward.

Each abstaining method decides in its own ``decision.py`` (see :class:`unlearn_hf.methods.AbstainingAttachment`).

**Decoding modes.** Greedy search, sampling, beam search (also sampling beams) and assisted decoding (an assistant
model, prompt lookup, early exit) carry abstention: the decision reads the prompt's own last tokens, also when
assisted decoding's first forward carries candidate tokens after the prompt, and the refusal is forced in every
forward and by the last logits processor, so candidate verification accepts exactly the refusal. While an
abstaining method is active, the modes that run decoding code unlearn_hf cannot check are refused with a
``ValueError``: ``custom_generate`` and the modes transformers 5 moved to Hub repositories (contrastive search,
DoLa, group and constrained beam search); so is continuous batching (``generate_batch``,
``cache_implementation="paged"``), which packs requests into shared forwards.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from ..context import _GENERATION, RequestState, disabled_for
from ..methods.base import AbstainingAttachment
from ..model_inputs import StopForward, accepts, eos_token_id, input_device, position_ids_from_mask

#: The ``generate`` modes that carry abstention (see the module docstring); others are refused while an abstaining
#: method is active.
ABSTAINING_GENERATION_MODES = frozenset(
    {
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
        GenerationMode.ASSISTED_GENERATION,
    }
)

_MODE_LABELS = {
    GenerationMode.CONTRASTIVE_SEARCH: "Contrastive search",
    GenerationMode.DOLA_GENERATION: "DoLa decoding",
    GenerationMode.GROUP_BEAM_SEARCH: "Group beam search",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "Constrained beam search",
}


class AbstentionMixin:
    """``generate`` with abstention, the report of which rows abstained, and :meth:`detect`."""

    @property
    def has_abstention(self) -> bool:
        """Whether an attached method can make the model abstain."""
        return any(isinstance(a, AbstainingAttachment) for a in self._unlearn_attachments.values())

    def _active_abstaining(self) -> dict[str, AbstainingAttachment]:
        """The attached abstaining methods that are not switched off in this context."""
        disabled = disabled_for(self)
        if disabled is None:
            return {}
        return {
            n: a
            for n, a in self._unlearn_attachments.items()
            if isinstance(a, AbstainingAttachment) and n not in disabled
        }

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers`` ``generate`` with the attached methods active.

        Every call is one request: abstaining methods decide per row at the prefill, and their logits processor
        runs after every other processor, so sampling settings, ``min_new_tokens``, repetition penalties and the
        like cannot alter an abstaining row's refusal. With an abstaining method and
        ``return_dict_in_generate=True``, the output has ``abstained`` (a bool tensor with one entry per returned
        sequence) and ``abstained_by`` (the same, per abstaining method name).
        """
        bound = self._signature("generate").bind_partial(self, *args, **kwargs)
        del bound.arguments["self"]
        if self._is_own_draft(bound):
            # assisted decoding drafting with this very model (assistant_early_exit): drafts are proposals that the
            # verifying forwards, with unlearning, accept or reject, so they run as the base model
            with self.disable_unlearning():
                return super().generate(*bound.args, **bound.kwargs)
        request = RequestState(self)
        abstaining = self._active_abstaining()
        if abstaining:
            self._prepare_generate(request, bound, abstaining)
        token = _GENERATION.set(request)
        try:
            output = super().generate(*bound.args, **bound.kwargs)
        finally:
            _GENERATION.reset(token)
        if isinstance(output, ModelOutput) and self.has_abstention:
            n_inputs, n_returned = self._count_inputs(bound), output.sequences.shape[0]
            by = {
                n: self._rows(f, n_inputs, n_returned)
                for n, f in self._decisions(request, abstaining).items()
            }
            output["abstained_by"] = by
            output["abstained"] = self._rows(self.combine_abstention(by), n_inputs, n_returned)
        return output

    @staticmethod
    def _generate_inputs(bound: inspect.BoundArguments) -> tuple[torch.Tensor | None, dict[str, Any]]:
        extra = bound.arguments.get("kwargs", {})
        ids = bound.arguments.get("inputs")
        if not torch.is_tensor(ids):
            ids = extra.get("input_ids", extra.get("inputs_embeds"))
        return (ids if torch.is_tensor(ids) else None), extra

    def _is_own_draft(self, bound: inspect.BoundArguments) -> bool:
        """Whether this ``generate`` call drafts candidates for a running ``generate`` of this same model."""
        outer = _GENERATION.get()
        config = bound.arguments.get("generation_config")
        return outer is not None and outer.owner is self and bool(getattr(config, "is_assistant", False))

    def _generation_mode(
        self, bound: inspect.BoundArguments, abstaining: dict[str, AbstainingAttachment]
    ) -> tuple[Any, GenerationMode]:
        """The generation config this call runs with and its mode; raises ``ValueError`` for a mode that cannot
        carry abstention (see :data:`ABSTAINING_GENERATION_MODES`)."""
        _, extra = self._generate_inputs(bound)
        names = sorted(abstaining)
        switch_off = (
            "Use greedy search, sampling, beam search or assisted decoding, or run this call without abstention "
            "(`with model.disable_abstention(): model.generate(...)`)."
        )
        if bound.arguments.get("custom_generate") is not None:
            raise ValueError(
                f"generate(custom_generate=...) runs decoding code that unlearn_hf cannot check, so it could bypass "
                f"the abstention of {names}. {switch_off}"
            )
        given = bound.arguments.get("generation_config")
        config = copy.deepcopy(given if given is not None else self.generation_config)
        # generate fills what a given config leaves unset from the model's own (a saved generation_config.json)
        for key, value in self.generation_config.to_dict().items() if given is not None else ():
            if key != "watermarking_config" and hasattr(config, key) and getattr(config, key) is None:
                setattr(config, key, value)
        for key, value in extra.items():  # what generate will merge (without validating twice: no warnings)
            if hasattr(config, key):
                setattr(config, key, value)
        mode = config.get_generation_mode(bound.arguments.get("assistant_model"))
        if mode not in ABSTAINING_GENERATION_MODES:
            label = _MODE_LABELS.get(mode, mode.value.replace("_", " ").capitalize())
            raise ValueError(
                f"{label} cannot carry the abstention of {names}: transformers 5 "
                "runs it from a Hub repository (custom_generate, trust_remote_code=True), decoding code that "
                f"unlearn_hf cannot check. {switch_off}"
            )
        return config, mode

    def _prepare_generate(
        self,
        request: RequestState,
        bound: inspect.BoundArguments,
        abstaining: dict[str, AbstainingAttachment],
    ) -> None:
        """Check the decoding mode, tell the request what ``generate`` will do (prompt length, end-of-sequence
        token, beam groups, speculative forwards) and add the abstaining attachments' logits processors at the end
        of the processor list."""
        ids, extra = self._generate_inputs(bound)
        config, mode = self._generation_mode(bound, abstaining)
        request.speculative = mode == GenerationMode.ASSISTED_GENERATION
        for attachment in abstaining.values():
            attachment.check_request(request)
        mask = extra.get("attention_mask")
        if torch.is_tensor(mask) and mask.ndim == 2:
            request.prompt_len = mask.shape[1]
        elif ids is not None and ids.ndim >= 2:
            request.prompt_len = ids.shape[1]
        has_ids = torch.is_tensor(bound.arguments.get("inputs")) or torch.is_tensor(extra.get("input_ids"))
        if not has_ids and torch.is_tensor(extra.get("inputs_embeds")):
            request.ids_missing = extra["inputs_embeds"].shape[1]  # processors see only the generated tokens
        eos = extra.get("eos_token_id")
        eos = getattr(config, "eos_token_id", None) if eos is None else eos
        request.eos_token_id = eos_token_id(self, {"eos_token_id": eos})
        request.group_size = max(1, int(getattr(config, "num_beams", 1) or 1))
        processors = [p for a in abstaining.values() if (p := a.logits_processor(request)) is not None]
        request.processors = processors
        if processors:
            user = bound.arguments.get("logits_processor")
            bound.arguments["logits_processor"] = LogitsProcessorList([*(user or []), *processors])

    def _get_candidate_generator(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' candidate generator for assisted decoding, without the abstention processors when the
        assistant has another vocabulary: they force this model's token ids (the verifying forwards of this model
        force the refusal anyway)."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        request = _GENERATION.get()
        if (
            request is not None
            and request.owner is self
            and request.processors
            and isinstance(generator, AssistedCandidateGeneratorDifferentTokenizers)
        ):
            ours = {id(p) for p in request.processors}
            kept = [p for p in generator.logits_processor if id(p) not in ours]
            generator.logits_processor = LogitsProcessorList(kept)
        return generator

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' continuous batching (also behind ``generate_batch`` and
        ``generate(cache_implementation="paged")``); refused while an abstaining method is active."""
        abstaining = self._active_abstaining()
        if abstaining:
            raise ValueError(
                f"Continuous batching packs many requests into shared forwards, where the abstention of "
                f"{sorted(abstaining)} cannot be decided per request. Use generate() (a batch of prompts is "
                "decided row by row), or run without abstention (`with model.disable_abstention(): ...`)."
            )
        return super().init_continuous_batching(*args, **kwargs)

    def _count_inputs(self, bound: inspect.BoundArguments) -> int:
        ids, _ = self._generate_inputs(bound)
        return 1 if ids is None or ids.ndim < 2 else ids.shape[0]

    @staticmethod
    def _decisions(
        request: RequestState, abstaining: dict[str, AbstainingAttachment]
    ) -> dict[str, torch.Tensor]:
        """The decisions taken in ``request``, per abstaining method (CPU bool ``[rows]``)."""
        out = {}
        for name, attachment in abstaining.items():
            flags = attachment.decision(request)
            if flags is not None:
                out[name] = flags.cpu()
        return out

    @staticmethod
    def _rows(flags: torch.Tensor | None, n_inputs: int, n_returned: int) -> torch.Tensor:
        """Per returned row, whether it abstained.

        Rows map one to one when ``generate`` returns as many rows as it ran (greedy, sampling, also with
        ``num_return_sequences``); with beam search the rows of one input share the input's decision.
        """
        if flags is None:
            return torch.zeros(n_returned, dtype=torch.bool)
        if flags.numel() == n_returned:
            return flags
        if flags.numel() % n_inputs or n_returned % n_inputs:
            raise RuntimeError(
                f"Cannot map {flags.numel()} abstention flags onto {n_returned} returned rows of {n_inputs} inputs."
            )
        per_input = flags.view(n_inputs, -1).any(1)
        return per_input.repeat_interleave(n_returned // n_inputs)

    def combine_abstention(self, decisions: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Combine the per-row decisions of several abstaining methods (default: a row abstains when any method
        says so). Override in a subclass for another vote."""
        flags = [f for f in decisions.values() if f is not None]
        if not flags:
            return None
        out = flags[0].clone()
        for f in flags[1:]:
            out |= f.to(out.device)
        return out

    @torch.no_grad()
    def detect(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        by_method: bool = False,
        **model_inputs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Which rows the attached abstaining methods would refuse (bool ``[batch]``), from one forward pass;
        with ``by_method=True``, ``{method name: bool [batch]}`` (which skill makes each row abstain).

        The decision is the one ``generate`` takes at the prefill (either padding side), given the same inputs
        (without ``attention_mask``, the mask is inferred from the model's ``generation_config.pad_token_id`` as
        ``generate`` infers it; a pad token given to ``generate`` only is not seen here: pass the mask):
        ``model_inputs`` are the model's other inputs (an image-text model's ``pixel_values`` and the processor's
        other image inputs); a prompt with image tokens and no ``pixel_values`` is refused, since the image
        changes the decision. The forward stops as soon as every abstaining method has decided (e.g. after the
        last layer Key Space Detection reads), so this is cheaper than a full forward.
        """
        if not self.has_abstention:
            raise RuntimeError("No abstaining method (e.g. Key Space Detection) is attached.")
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}."
            )
        image_token = getattr(self.config, "image_token_id", None)
        image_token = getattr(self.config, "image_token_index", None) if image_token is None else image_token
        if (
            isinstance(image_token, int)
            and "pixel_values" not in model_inputs
            and bool((input_ids == image_token).any())
        ):
            raise ValueError(
                "These input_ids hold image tokens but no pixel_values were given: pass the processor's image inputs "
                "too (detect(**inputs)), as generate gets them; the image changes the decision."
            )
        if attention_mask is None:  # the mask generate infers from padding: the same rows are real
            attention_mask = mask_as_generate_infers(input_ids, self.generation_config)
        abstaining = self._active_abstaining()
        device = input_device(self)
        inputs = {
            **{k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs.items()},
            "input_ids": input_ids.to(device),
            "use_cache": False,
        }
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(device)
            if accepts(self, "position_ids"):  # as generate does: the same decision
                inputs["position_ids"] = position_ids_from_mask(attention_mask).to(device)
        if accepts(self, "logits_to_keep"):
            inputs["logits_to_keep"] = 1
        request = RequestState(self, stop_when_decided=set(abstaining))
        token = _GENERATION.set(request)
        try:
            if abstaining:
                self(**inputs)
        except StopForward:
            pass
        finally:
            _GENERATION.reset(token)
        decisions = self._decisions(request, abstaining)
        if by_method:
            none = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            return {
                n: (decisions.get(n) if decisions.get(n) is not None else none.clone()) for n in abstaining
            }
        flags = self.combine_abstention(decisions)
        return flags if flags is not None else torch.zeros(input_ids.shape[0], dtype=torch.bool)


def mask_as_generate_infers(input_ids: torch.Tensor, config: Any) -> torch.Tensor | None:
    """The attention mask ``generate`` infers for ``input_ids`` given none (transformers'
    ``_prepare_attention_mask_for_generation``): ``input_ids != pad`` when the pad token occurs in them and is not an
    end-of-sequence token; otherwise ``None`` (every position is real)."""
    pad, eos = config.pad_token_id, config.eos_token_id
    if pad is None or not bool((input_ids == pad).any()):
        return None
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return None if pad in eos_ids else (input_ids != pad).long()
