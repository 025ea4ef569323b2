"""Where Key Space Detection decides, per row, whether a request abstains.

**The decision.** In the forward that ends the prompt (the prefill), at every checked layer, the key vectors of
each row's last ``window`` real prompt tokens (found through the attention mask, so either padding side works;
column 0 is the last token; candidate tokens that the forward carries after the prompt, as assisted decoding's
first forward does, are not read) are tested against that layer's hypercube (:mod:`.hypercube`; at the routed
experts of a mixture-of-experts layer, against the hypercube of every expert each token is routed to,
:mod:`.key_units`); the row is inside at that layer when *one* of them is. The hypercube was fitted on the key at
the end of the question's own text in every rendering (:mod:`.rendering`), and a template's closing tokens (``\nAnswer:``, the chat template's
``<|im_end|>\n<|im_start|>assistant\n``) only push that position back a few tokens: the window reaches past
them, so the same question abstains however it is wrapped. Positions before the prompt's first real token (a
prompt shorter than the window, padding) never count. The cost is O(window · d_ff) per row and layer, once per
request. With several layers, the config's ``rule`` combines the
per-layer results (``"all"``: inside at every layer; ``"any"``: at one of them). Beam search moves the rows of one
input together, so an input abstains when any of its beams does. With ``recheck_each_token``, every later
decoding step also tests its new token, and a row abstains from the first step found inside.

**After the decision.** An abstaining row's logits carry only the refusal (:mod:`.refusal`); the other rows are
untouched, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...context import ForwardContext, RequestState
from ...hooks import HookRegistrar
from ...sites import as_token_grid
from ..base import AbstainingAttachment
from .hypercube import KeySpaceLayer, inside_at
from .key_units import RoutedUnit, UnitDistances, wanted_tokens
from .refusal import AbstentionLogitsProcessor, Refusal


@dataclass
class AbstentionState:
    """Per-request abstention of one attached Key Space Detection.

    Attributes:
        abstained: bool ``[rows]`` (CPU), rows abstaining (``None`` before the decision).
        start: int64 ``[rows]``, generation step at which each abstaining row began its refusal.
        pending: per-layer inside flags gathered during the current forward.
        routed: per routed unit, the distances its experts are adding in the current forward.
        carry: per layer, the inside flags and validity ``[rows, window]`` (newest first) of the trailing tokens
            of the prompt chunks seen so far (chunked prefill: the window may span chunks).
        any: whether any row abstains (kept as a Python bool: decoding steps check it for free).
    """

    abstained: torch.Tensor | None = None
    start: torch.Tensor | None = None
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    carry: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    routed: dict[int, UnitDistances] = field(default_factory=dict)
    any: bool = False

    def select_rows(self, apply) -> None:
        """Follow a change of the request's rows (its KV cache's ``batch_select_indices`` and the like)."""
        if self.abstained is not None:
            self.abstained, self.start = apply(self.abstained), apply(self.start)
            self.any = bool(self.abstained.any())
        self.carry = {unit: (apply(flags), apply(valid)) for unit, (flags, valid) in self.carry.items()}


def combine_layers(per_layer: dict[int, torch.Tensor], rule: str) -> torch.Tensor:
    """Combine per-layer inside flags with the ``rule`` (``"all"`` or ``"any"``)."""
    stacked = torch.stack([per_layer[i] for i in sorted(per_layer)])
    return stacked.all(0) if rule == "all" else stacked.any(0)


class KeySpaceAttachment(AbstainingAttachment):
    """Key Space Detection attached to one model: the hypercube(s) of each checked key unit (:mod:`.key_units`)
    on its device, the refusal, and the hooks that take the decision: a pre-hook on a dense unit's key module; on
    a routed unit, hooks on its experts module (start, end) and on its experts' key taps."""

    def __init__(
        self,
        method: Any,
        model: Any,
        name: str,
        hooks: HookRegistrar,
        layers: dict[int, KeySpaceLayer | RoutedUnit],
        key_modules: dict[int, Any],
        refusal: Refusal,
    ) -> None:
        super().__init__(method, model, name, hooks)
        self.layers = layers  # unit id -> its reader (a dense unit's id is its layer)
        self.refusal = refusal
        self.rule = method.config.rule
        self.recheck = method.config.recheck_each_token
        self.window = method.config.window
        self.alpha = method.config.alpha
        for unit, reader in layers.items():
            if isinstance(reader, RoutedUnit):
                self._hook_routed(hooks, unit, reader)
            else:
                hook = self._dense_hook(unit, reader)
                hooks.forward_pre_hook(key_modules[unit], hook, observer=True, when=self._reads)

    # -- the contract ----------------------------------------------------------------------------------------
    def decision(self, request: RequestState) -> torch.Tensor | None:
        st = self.request_data(request)
        return None if st is None else st.abstained

    def logits_processor(self, request: RequestState) -> AbstentionLogitsProcessor:
        return AbstentionLogitsProcessor(self, request)

    def check_request(self, request: RequestState) -> None:
        if self.recheck and request.speculative:
            raise ValueError(
                f"Key Space Detection {self.name!r} has recheck_each_token=True, which tests each generated token as "
                "it is accepted; assisted decoding (assistant_model, prompt_lookup_num_tokens, assistant_early_exit, "
                "use_mtp) runs several candidate tokens per forward, some of them rejected afterwards, so the "
                "recheck cannot be made there. Generate without assisted decoding, or fit with "
                "recheck_each_token=False (the prompt is still checked)."
            )

    # -- reading the keys ------------------------------------------------------------------------------------
    def _reads(self, ctx: ForwardContext) -> bool:
        return ctx.is_prefill or ctx.is_prompt_chunk or self.recheck

    def _dense_hook(self, unit: int, kl: KeySpaceLayer):
        def hook(ctx: ForwardContext, key: torch.Tensor) -> None:
            key = as_token_grid(key, ctx.input_len)  # OPT runs its FFL on [batch * positions, d_ff]
            self._observe(ctx, unit, key.shape[0], key.device, lambda r, i: kl.inside(key[r, i]))

        return hook

    def _hook_routed(self, hooks: HookRegistrar, unit: int, reader: RoutedUnit) -> None:
        """The experts module's pre-hook starts the unit's forward (measuring only the tokens read), each expert's
        key tap adds the distances of its routed tokens, and the module's forward hook reads the unit."""

        def start(ctx: ForwardContext, inputs: tuple) -> None:
            hidden, tokens = inputs[0], reader.tokens(inputs)
            rows, rest = divmod(tokens, ctx.input_len)
            if rest:
                raise RuntimeError(
                    f"Key Space Detection: the experts module got hidden states {tuple(hidden.shape)} for {tokens} "
                    f"tokens, not [batch * {ctx.input_len}] tokens."
                )
            index, valid = self._read_positions(ctx, rows, hidden.device)
            wanted = wanted_tokens(rows, ctx.input_len, index, valid)
            st = self.request_data(ctx.request, AbstentionState)
            st.routed[unit] = reader.start(tokens, wanted, hidden.device)

        def distances(ctx: ForwardContext, pop: bool) -> UnitDistances:
            st = self.request_data(ctx.request, AbstentionState)
            found = st.routed.pop(unit, None) if pop else st.routed.get(unit)
            if found is None:
                raise RuntimeError(
                    f"Key Space Detection: the experts of layer {unit} were read without their module's start."
                )
            return found

        def tap(expert: int):
            return lambda ctx, inputs: distances(ctx, False).add(expert, inputs[0], inputs[1])

        def finish(ctx: ForwardContext, output: Any) -> None:
            z = distances(ctx, True).z.view(-1, ctx.input_len)  # -1: no expert with a hypercube saw the token
            self._observe(
                ctx, unit, z.shape[0], z.device, lambda r, i: ~(z[r, i] < 0) & inside_at(z[r, i], self.alpha)
            )

        reads = dict(observer=True, when=self._reads)
        hooks.forward_pre_hook(reader.owner, start, all_inputs=True, **reads)
        for site in reader.read_sites:
            hooks.forward_pre_hook(site.key, tap(site.expert), all_inputs=True, **reads)
        hooks.forward_hook(reader.owner, finish, **reads)

    def _read_positions(
        self, ctx: ForwardContext, rows: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` ``[rows, w]`` of the positions read in this forward: the prompt's trailing window
        at the prefill (or a prompt chunk), the newest position at a recheck."""
        if ctx.is_prefill or ctx.is_prompt_chunk:
            suffix = self._refusal_suffix(ctx, rows)
            if suffix is None:
                return ctx.trailing_token_index(rows, self.window, device)
            index, valid = ctx.trailing_token_index(rows, self.window + int(suffix.max()), device)
            reach = torch.arange(index.shape[1], device=device).unsqueeze(0)
            return index, valid & (reach < (self.window + suffix.to(device)).unsqueeze(1))
        index = torch.full((rows, 1), ctx.input_len - 1, dtype=torch.long, device=device)
        return index, torch.ones_like(index, dtype=torch.bool)

    def _refusal_suffix(self, ctx: ForwardContext, rows: int) -> torch.Tensor | None:
        """How many of each row's last real tokens are this method's refusal so far (int64 ``[rows]``), when a
        forward without a cache ends with the start of the refusal: a hand-written loop that re-feeds the whole
        sequence (no KV cache) is a new request at every step, and once the refusal's first tokens follow the
        question the window would no longer reach it. Such a row is decided on its last ``window + j`` tokens
        (the question's end and the ``j`` refusal tokens) and, abstaining, goes on with the refusal's token
        ``j``. Only in a plain forward, outside ``generate`` and ``detect`` (which decide on a prompt as given, in
        every decoding path alike). ``None`` when no row ends so, or outside such a forward."""
        key = ("refusal_suffix", id(self))
        if key in ctx._last:
            return ctx._last[key]
        ids, found = ctx.input_ids, None
        # a plain forward: not generate's request (its paths decide on the prompt as given), nor detect()'s
        plain = ctx.request.prompt_len is None and ctx.request.stop_when_decided is None
        if (
            ctx.is_prefill
            and plain
            and ctx.prompt_end is None
            and ctx.total_len == ctx.input_len
            and ids is not None
            and ids.ndim == 2
            and ids.shape[0] == rows
        ):
            forced = self.refusal.tokens(ctx.request.eos_token_id).tolist()
            last, real = ctx.last_token_index(rows, torch.device("cpu"))
            ids = ids.cpu()
            mask = None if ctx.attention_mask is None else ctx.attention_mask.cpu().bool()
            ends = ids.gather(1, last.unsqueeze(1)).squeeze(1)
            for r in (real & torch.isin(ends, torch.tensor(forced))).nonzero().squeeze(1).tolist():
                tokens = ids[r, : int(last[r]) + 1]
                tokens = (tokens if mask is None else tokens[mask[r, : int(last[r]) + 1]]).tolist()
                # end-of-sequence repeats after the refusal (a loop that goes on past it): those count too
                extra = 0
                while extra + 2 < len(tokens) and tokens[-1 - extra] == forced[-1] == tokens[-2 - extra]:
                    extra += 1
                j = _ends_with_prefix(tokens[: len(tokens) - extra], forced)
                j = j + extra if j == len(forced) else _ends_with_prefix(tokens, forced)
                if j:
                    found = torch.zeros(rows, dtype=torch.long) if found is None else found
                    found[r] = j
        ctx._last[key] = found
        return found

    def _observe(self, ctx: ForwardContext, unit: int, rows: int, device: torch.device, inside_at) -> None:
        """Record whether each row is inside ``unit`` (``inside_at(rows [R, 1], positions [R, w]) -> bool``), and
        decide once every unit has been read in this forward."""
        st = self.request_data(ctx.request, AbstentionState)
        index, valid = self._read_positions(ctx, rows, device)
        flags = inside_at(torch.arange(rows, device=device).unsqueeze(1), index) & valid
        if ctx.is_prefill or ctx.is_prompt_chunk:
            flags, valid = self._with_carried(ctx, st, unit, flags, valid)
            if ctx.is_prompt_chunk:
                st.carry[unit] = (flags, valid)
                return
            st.carry.pop(unit, None)
        st.pending[unit] = flags.any(1).cpu()
        if len(st.pending) == len(self.layers):
            self._decide(ctx, st)

    def _with_carried(
        self, ctx: ForwardContext, st: AbstentionState, unit: int, flags: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inside flags and validity ``[rows, window]`` (newest first) of each row's last ``window`` prompt tokens
        seen so far: this forward's, then those carried from earlier prompt chunks of the request."""
        carried = st.carry.get(unit)
        if carried is not None:
            flags, valid = torch.cat([flags, carried[0]], 1), torch.cat([valid, carried[1]], 1)
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, : self.window]
            return flags.gather(1, order), valid.gather(1, order)
        if ctx.total_len > ctx.input_len and self.window > 1 and not bool(valid.all()):
            raise ValueError(
                f"Key Space Detection {self.name!r} decides on the prompt's last {self.window} tokens, but this "
                f"request starts from a cache that already holds {ctx.total_len - ctx.input_len} tokens of the "
                "prompt (prefix caching), whose key vectors it cannot read. Pass the whole prompt without a "
                "prefilled cache (or prefill with prefill_chunk_size, which is supported)."
            )
        return flags, valid

    def _decide(self, ctx: ForwardContext, st: AbstentionState) -> None:
        flags = combine_layers(st.pending, self.rule)
        st.pending = {}
        group = ctx.request.group_size
        if group > 1 and flags.numel() % group == 0:  # beams of one input move together
            flags = flags.view(-1, group).any(1).repeat_interleave(group)
        if ctx.is_prefill or st.abstained is None:
            st.abstained = flags
            # the prompt's end predicts the first generated token (step 0), also when the forward goes on past it
            step = 0 if ctx.is_prefill else ctx.steps_generated
            st.start = torch.full(flags.shape, step, dtype=torch.long)
            suffix = self._refusal_suffix(ctx, flags.shape[0]) if ctx.is_prefill else None
            if suffix is not None:  # the row re-feeds the refusal's first j tokens: it goes on from token j
                st.start -= suffix
        else:
            new = flags & ~st.abstained
            st.start[new] = ctx.steps_generated
            st.abstained |= new
        st.any = bool(st.abstained.any())
        if ctx.is_prefill:
            ctx.request.decided(self.name)

    # -- the forward -----------------------------------------------------------------------------------------
    def on_forward_start(self, ctx: ForwardContext) -> None:
        st = self.request_data(ctx.request)
        if st is not None and (st.pending or st.routed):
            st.pending, st.routed = {}, {}  # left over from a forward that raised

    def on_forward_end(self, ctx: ForwardContext, output: Any) -> Any:
        """Force the refusal onto the logits of the abstaining rows (and recompute the loss from them when
        ``labels`` were given)."""
        st = self.request_data(ctx.request)
        if st is not None and st.pending:  # some units were read, not all: a path that bypasses their modules
            missing = sorted(set(self.layers) - set(st.pending))
            st.pending = {}
            raise RuntimeError(f"Key Space Detection did not see layers {missing} in this forward.")
        if ctx.is_prefill and (st is None or st.abstained is None):
            raise RuntimeError(
                f"Key Space Detection did not run at layers {sorted(self.layers)} during the prefill: the key "
                "modules were not called."
            )
        if st is None or not st.any:  # nothing to force (a decoding step of a request no row abstains in)
            return output
        at = (1 if ctx.labels is not None else 0) if isinstance(output, tuple) else None  # return_dict=False
        if at is not None:
            logits = output[at]
        else:
            logits = output.get("logits") if hasattr(output, "get") else getattr(output, "logits", None)
        if logits is None:
            return output
        if logits.shape[0] != st.abstained.shape[0]:
            raise RuntimeError(
                f"This forward has {logits.shape[0]} rows but its request decided abstention for "
                f"{st.abstained.shape[0]}: the rows of the KV cache it continues were changed other than through the "
                "cache's batch_select_indices, batch_repeat_interleave or reorder_cache (which carry the decisions "
                "along). Run the prompts again to start a new request."
            )
        self.refusal.force(logits, st.abstained, st.start, ctx.steps_generated, ctx.request)
        if at == 1:
            output = (self._loss(ctx, logits), *output[1:])
        elif at is None and ctx.labels is not None and output.get("loss") is not None:
            output["loss"] = self._loss(ctx, logits)
        return output

    @staticmethod
    def _loss(ctx: ForwardContext, logits: torch.Tensor) -> torch.Tensor:
        """The model's own loss function applied to the forced logits."""
        return ctx.model.loss_function(logits=logits, labels=ctx.labels, vocab_size=logits.shape[-1])


def _ends_with_prefix(tokens: list[int], forced: list[int]) -> int:
    """The length of the longest prefix of ``forced`` that ``tokens`` end with, leaving at least one token (of the
    question) before it; 0: none."""
    return next((j for j in range(min(len(forced), len(tokens) - 1), 0, -1) if tokens[-j:] == forced[:j]), 0)
