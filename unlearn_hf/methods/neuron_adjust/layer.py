"""The Neuron Adjust transform applied to one layer's pre-activation output."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the densities are computed in: float64 for float64 models, float32 for every other dtype
    (bf16/fp16 densities underflow and their log-ratios are too coarse)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (the dtype its output comes in)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def thresholds_from_uniforms(u: torch.Tensor) -> torch.Tensor:
    """``max(0, logit(u))``, in place: a value with log density ratio d is replaced where d exceeds it, which
    happens with probability sigmoid(d) for d > 0 and never for d <= 0."""
    return u.logit_().clamp_min_(0)


#: Calls whose output holds at most this many values (decoding one or two sequences of a small model) take the
#: full-width path, the others gather the selected columns (see :class:`NeuronAdjustLayer`). Measured inside
#: SmolLM2-135M decode steps (d_ff 1536, 2 threads): full width 44 vs 53 µs per layer at 1 row, 63 vs 77 at
#: 2 rows, 82 vs 76 at 4 rows, 119 vs 84 at 8 rows.
FULL_WIDTH_MAX_NUMEL = 4096

#: Calls with at least this many rows gather the selected columns and write them back with ``aten.index`` /
#: ``aten.index_put_``, the others with ``index_select`` / ``index_copy_`` (same values). Measured on SmolLM2's width
#: (d_ff 1536, 2 threads), per call of the whole gather path, 46 / 150 selected columns: 41 / 115 µs against 54 / 120
#: at 128 rows, 92 / 299 against 93 / 196 at 256, 285 / 540 against 191 / 435 at 512, 856 / 2603 against 717 / 1664
#: at 2048 (prefill and scoring batches).
LARGE_GATHER_MIN_ROWS = 256


def uses_full_width(output: torch.Tensor, widths: list[int] | None = None) -> bool:
    """Whether a call on ``output[..., d_ff]`` takes the full-width path; with ``widths``, whether layers of
    those widths that share one block of thresholds do (decided by the widest, so that all of them agree)."""
    if widths is None:
        return output.numel() <= FULL_WIDTH_MAX_NUMEL
    rows = output.numel() // max(1, output.shape[-1])
    return rows * max(widths) <= FULL_WIDTH_MAX_NUMEL


class NeuronAdjustLayer:
    """Rewrites the selected neurons of one pre-activation site (``docs/METHOD.md`` §3).

    For a value x of neuron j, with zF = (x − μF)/σF and zR = (x − μR)/σR, the log density ratio is computed in
    float32 (float64 for float64 models), in log space, as

        d = log pF(x) − log pR(x) = ½ (zR − zF)(zR + zF) + log σR − log σF,

    both factors being affine in x. Where d > 0 (pF > pR), x is replaced by its mirror image
    x' = μR − zF·σR = μR + μF·σR/σF − x·σR/σF: always in deterministic mode, otherwise with probability
    sigmoid(d) = pF / (pF + pR): given uniforms u, x is replaced where ``d > max(0, logit(u))``, i.e. where
    d > 0 and u < sigmoid(d). Other values, and all unselected neurons, are left exactly as they were.

    Accuracy: unlike the expanded quadratic a·x² + b·x + c, the factored form is backward stable even for a σ
    floored at a tiny ε: the computed d (and x') is the exact value for an input within a few float32 ulps
    of x, well below the rounding of the matmul that produced x.

    Speed: the coefficients are precomputed once (in float64, then cast) on the layer's device. On CPU the
    tiny operations of a call cost fixed dispatch time and, right after the large matmuls, cache misses (~6 µs
    each inside a SmolLM2 decode step), so their number is what counts. Two paths, same arithmetic:

    * gather (calls with more than :data:`FULL_WIDTH_MAX_NUMEL` values: prefill, batched decoding): eight operations on
      the selected columns only: ``index_select``, three ``addcmul`` for d, a comparison, one ``addcmul`` for
      the mirror image, ``where``, ``index_copy_`` (into the output, in place); from :data:`LARGE_GATHER_MIN_ROWS`
      rows the gather and the write-back are ``aten.index`` / ``aten.index_put_``;
    * full width (decoding one or two sequences of a small model, with ``width`` given): the same six
      arithmetic operations on every column of the output, with coefficients that make d = −inf for unselected
      neurons, and no gather or scatter: measured 17% cheaper per call at batch 1 on SmolLM2 (and 40% dearer at
      batch 8, hence the switch).

    Two fused variants measured slower: one wide ``addcmul`` then ``split``, and ``torch.compile``. Centring on
    μF (more accurate for σ floored far below |μF|) costs one more operation. The thresholds max(0, logit(u))
    come from the caller (:class:`NeuronAdjust` draws them once per forward for all its layers), in the layout
    of the path: ``[..., n_selected]`` (state order) or ``[..., width]`` (zeros at unselected columns).

    Args:
        neurons: indices of the selected neurons in this layer (distinct).
        forget_mean / forget_std / retain_mean / retain_std: their statistics (σ already floored, > 0).
        device: the layer's device.
        dtype: the dtype of the layer's output (decides the compute dtype, see :func:`compute_dtype`).
        width: the site's width d_ff, to enable the full-width path (``None``: always gather).

    Raises:
        ValueError: a σ is not positive, or so small that the coefficients overflow the compute dtype.
    """

    def __init__(
        self,
        neurons: torch.Tensor,
        forget_mean: torch.Tensor,
        forget_std: torch.Tensor,
        retain_mean: torch.Tensor,
        retain_std: torch.Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        width: int | None = None,
    ) -> None:
        stats = [t.detach().to("cpu", torch.float64).flatten() for t in (forget_mean, forget_std)]
        stats += [t.detach().to("cpu", torch.float64).flatten() for t in (retain_mean, retain_std)]
        self._neurons_cpu = neurons.detach().to("cpu", torch.long).flatten()
        n = self._neurons_cpu.numel()
        if width is not None and (n > width or int(self._neurons_cpu.max()) >= width):
            raise ValueError(f"Neuron indices do not fit a layer of width {width}.")
        self.width = width
        if any(t.numel() != n for t in stats):
            raise ValueError(f"Expected {n} statistics per tensor, got {[t.numel() for t in stats]}.")
        if (stats[1] <= 0).any() or (stats[3] <= 0).any():
            raise ValueError("Standard deviations must be positive (floor them at eps).")
        mu_f, sd_f, mu_r, sd_r = stats
        self._coefficients = {
            # zR - zF = x (1/sR - 1/sF) + (muF/sF - muR/sR), halved;  zR + zF = x (1/sR + 1/sF) - (muF/sF + muR/sR)
            "half_diff_slope": 0.5 * (1 / sd_r - 1 / sd_f),
            "half_diff_bias": 0.5 * (mu_f / sd_f - mu_r / sd_r),
            "sum_slope": 1 / sd_r + 1 / sd_f,
            "sum_bias": -(mu_f / sd_f + mu_r / sd_r),
            "log_ratio": sd_r.log() - sd_f.log(),
            # x' = muR - (x - muF)/sF * sR = (muR + muF sR/sF) - x sR/sF
            "mirror_slope": -sd_r / sd_f,
            "mirror_bias": mu_r + mu_f * sd_r / sd_f,
        }
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.prepare(torch.device(device), compute_dtype(dtype))
        self._seen_dtype = dtype

    @property
    def num_neurons(self) -> int:
        return self._neurons_cpu.numel()

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Place the index and coefficient tensors on ``device``, the coefficients in ``dtype`` (the compute
        dtype)."""
        cast = {}
        for name, value in self._coefficients.items():
            c = value.to(dtype)
            if not torch.isfinite(c).all():
                raise ValueError(
                    f"Neuron Adjust coefficients overflow {dtype}: a standard deviation is too small (raise eps)."
                )
            cast[name] = c.to(device)
        for name, value in cast.items():
            setattr(self, name, value)
        self.neurons = self._neurons_cpu.to(device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.device, self.dtype = device, dtype
        self._run_gather = self._make_gather()
        self._run_full = self._make_full() if self.width is not None else None

    def _full(self, name: str, fill: float) -> torch.Tensor:
        """Coefficient ``name`` over all ``width`` columns, ``fill`` at the unselected ones."""
        out = torch.full((self.width,), fill, dtype=self.dtype, device=self.device)
        return out.index_copy_(0, self.neurons, getattr(self, name))

    def _make_gather(self):
        """The gather path as one closure over local tensors: inside a decode step every attribute lookup and
        call frame runs on cold caches (inlining measured ~3 µs, 6%, cheaper per layer)."""
        neurons, zero, dtype = self.neurons, self.zero, self.dtype
        hd_bias, hd_slope, sum_bias, sum_slope = (
            self.half_diff_bias,
            self.half_diff_slope,
            self.sum_bias,
            self.sum_slope,
        )
        log_ratio, mirror_bias, mirror_slope = self.log_ratio, self.mirror_bias, self.mirror_slope
        addcmul, gt, where = torch.addcmul, torch.gt, torch.where
        index, index_put, index_put_ = (
            torch.ops.aten.index,
            torch.ops.aten.index_put,
            torch.ops.aten.index_put_,
        )
        indices: dict[int, list] = {}  # per rank of the output: [None, ..., None, neurons]

        def run(output: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
            large = output.numel() >= LARGE_GATHER_MIN_ROWS * output.shape[-1]
            if large:
                at = indices.get(output.dim())
                if at is None:
                    at = indices[output.dim()] = [None] * (output.dim() - 1) + [neurons]
                x = index(output, at)
            else:
                x = output.index_select(-1, neurons)
            if x.dtype is not dtype:
                x = x.to(dtype)
            d = addcmul(log_ratio, addcmul(hd_bias, x, hd_slope), addcmul(sum_bias, x, sum_slope))
            # a 0-dim zero tensor, not the Python scalar 0, which would become a new tensor at every call
            new = where(
                gt(d, zero if thresholds is None else thresholds), addcmul(mirror_bias, x, mirror_slope), x
            )
            if new.dtype is not output.dtype:
                new = new.to(output.dtype)
            if large:
                return index_put(output, at, new) if output.requires_grad else index_put_(output, at, new)
            if output.requires_grad:
                return output.index_copy(-1, neurons, new)
            return output.index_copy_(-1, neurons, new)

        return run

    def _make_full(self):
        """The full-width path: unselected columns get zero slopes and biases and a log ratio of −inf, so their
        d is −inf (NaN for a non-finite input) and ``where`` keeps their value, bit for bit, except that a NaN in a
        bfloat16/float16 output may come back as another NaN (the round trip through the compute dtype rewrites
        NaN payloads; the gather path leaves unselected columns untouched)."""
        zero, dtype = self.zero, self.dtype
        hd_bias, hd_slope = self._full("half_diff_bias", 0.0), self._full("half_diff_slope", 0.0)
        sum_bias, sum_slope = self._full("sum_bias", 0.0), self._full("sum_slope", 0.0)
        log_ratio = self._full("log_ratio", float("-inf"))
        mirror_bias, mirror_slope = self._full("mirror_bias", 0.0), self._full("mirror_slope", 0.0)
        addcmul, gt, where = torch.addcmul, torch.gt, torch.where

        def run(output: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
            x = output if output.dtype is dtype else output.to(dtype)
            d = addcmul(log_ratio, addcmul(hd_bias, x, hd_slope), addcmul(sum_bias, x, sum_slope))
            new = where(
                gt(d, zero if thresholds is None else thresholds), addcmul(mirror_bias, x, mirror_slope), x
            )
            return new if new.dtype is output.dtype else new.to(output.dtype)

        return run

    # -- the hook's work -------------------------------------------------------------------------------------
    def __call__(
        self, output: torch.Tensor, thresholds: torch.Tensor | None = None, full: bool | None = None
    ) -> torch.Tensor:
        """Rewrite the selected columns of a pre-activation output ``[..., d_ff]`` and return it.

        Args:
            output: the site's output (any float dtype; the coefficients follow its device).
            thresholds: ``max(0, logit(u))`` in the layout of the path :func:`uses_full_width` picks for
                ``output``: ``[..., n_selected]`` (gather) or ``[..., width]`` (full width); ``None`` =
                deterministic.
            full: the path, when the caller chose it (the layers that share one block of thresholds must agree
                on it, whatever their widths); ``None``: :func:`uses_full_width`.

        The gather path rewrites the output in place (no full-width copy) unless it requires grad; the
        full-width path returns a new tensor.
        """
        if output.dtype is not self._seen_dtype:
            self.prepare(output.device, compute_dtype(output.dtype))
            self._seen_dtype = output.dtype
        if full is None:
            full = uses_full_width(output)
        try:
            return self._path(full)(output, thresholds)
        except RuntimeError:  # the model moved to another device since the last call
            if output.device == self.device:
                raise
            self.prepare(output.device, self.dtype)
            return self._path(full)(output, thresholds)

    def _path(self, full: bool):
        return self._run_full if full and self._run_full is not None else self._run_gather
