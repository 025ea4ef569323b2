"""Neuron Adjust: the layer's real call (gather and full-width paths) against a numpy reference, statistics,
selection, reproducibility, dtypes, the untouched parts of the model, and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers_na import FORGET, RETAIN, Capture, token_batches
from tiny_models import hook_count, tiny_llama

from unlearn_hf import NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM, probe
from unlearn_hf.methods import NeuronAdjust
from unlearn_hf.methods.neuron_adjust import layer as layer_module
from unlearn_hf.methods.neuron_adjust import sampling
from unlearn_hf.methods.neuron_adjust.layer import (
    NeuronAdjustLayer,
    thresholds_from_uniforms,
    uses_full_width,
)
from unlearn_hf.methods.neuron_adjust.sampling import Draws, LayerGroup
from unlearn_hf.methods.selection import select_global, selection_size
from unlearn_hf.stats import RunningStats, SiteStatistics

# -- numpy reference (float64, straight from METHOD.md §3) -----------------------------------------------------


def np_log_normal(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def np_log_ratio(x, mu_f, sd_f, mu_r, sd_r):
    return np_log_normal(x, mu_f, sd_f) - np_log_normal(x, mu_r, sd_r)


def np_mirror(x, mu_f, sd_f, mu_r, sd_r):
    return mu_r - (x - mu_f) / sd_f * sd_r


def np_replace(x, stats, u=None):
    """Replace where pF > pR (and, given uniforms u, where u < pF / (pF + pR))."""
    d = np_log_ratio(x, *stats)
    if u is None:
        return d > 0
    return (d > 0) & (u < np_sigmoid(d))


def np_sigmoid(d):
    return np.exp(-np.logaddexp(0.0, -d))


F32 = 2.0**-24  # float32 unit roundoff


def np_error_bounds(x, mu_f, sd_f, mu_r, sd_r):
    """Bounds of the float32 rounding error of the layer's evaluation of d and of the mirror image: a few
    roundings of each term of its affine maps in x (so the result is exact for an input a few ulps away), then
    of their product. Tight for ordinary neurons, honest for σ floored at ε."""
    s1, b1 = 0.5 * (1 / sd_r - 1 / sd_f), 0.5 * (mu_f / sd_f - mu_r / sd_r)
    s2, b2 = 1 / sd_r + 1 / sd_f, -(mu_f / sd_f + mu_r / sd_r)
    c = np.log(sd_r / sd_f)
    half_diff, zsum = x * s1 + b1, x * s2 + b2
    e_half, e_sum = 4 * F32 * (np.abs(x * s1) + np.abs(b1)), 4 * F32 * (np.abs(x * s2) + np.abs(b2))
    e_d = np.abs(zsum) * e_half + np.abs(half_diff) * e_sum + e_half * e_sum
    e_d += 4 * F32 * (np.abs(half_diff * zsum) + np.abs(c))
    e_mirror = 4 * F32 * (np.abs(x * sd_r / sd_f) + np.abs(mu_r) + np.abs(mu_f * sd_r / sd_f))
    return e_d + 1e-6, e_mirror + 1e-6


def clear_of_boundary(x, ref, u=None):
    """Values whose decision cannot flip within the rounding error (nor within 1e-6 of a uniform)."""
    d = np_log_ratio(x, *ref)
    e_d, _ = np_error_bounds(x, *ref)
    clear = np.abs(d) > 2 * e_d
    if (
        u is not None
    ):  # u must not fall between sigmoid(d - e) and sigmoid(d + e) (logit(u) has float32 error)
        clear &= (u < np_sigmoid(d - e_d) - 1e-6) | (u > np_sigmoid(d + e_d) + 1e-6)
    return clear


# Six neurons: narrower forget, wider forget, equal widths, a zero-variance forget neuron floored at eps,
# a zero-variance retain neuron, and far-apart means.
EPS = 1e-5
STATS = {
    "forget_mean": [0.8, -0.2, 0.5, 0.3, 0.0, 4.0],
    "forget_std": [0.2, 1.5, 0.4, EPS, 0.5, 0.3],
    "retain_mean": [0.1, 0.1, -0.3, 0.1, 0.2, -4.0],
    "retain_std": [0.5, 0.4, 0.4, 0.6, EPS, 0.3],
}
#: The width of the synthetic layer's site and its six selected columns, in state order (any order).
WIDTH = 16
NEURONS = torch.tensor([9, 3, 14, 6, 0, 11])
PATHS = ["gather", "gather_large", "full_width"]


def synthetic_layer(dtype=torch.float32) -> tuple[NeuronAdjustLayer, tuple[np.ndarray, ...]]:
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in STATS.items()}
    layer = NeuronAdjustLayer(NEURONS, *t.values(), device="cpu", dtype=dtype, width=WIDTH)
    # the reference uses exactly the float32 statistics the layer received
    ref = tuple(t[k].double().numpy() for k in ("forget_mean", "forget_std", "retain_mean", "retain_std"))
    return layer, ref


def synthetic_values(n: int, seed: int = 0) -> torch.Tensor:
    """Values around both distributions of every neuron, plus exact means, ``[n, 6]`` float32."""
    g = torch.Generator().manual_seed(seed)
    mu_f, sd_f = torch.tensor(STATS["forget_mean"]), torch.tensor(STATS["forget_std"])
    mu_r, sd_r = torch.tensor(STATS["retain_mean"]), torch.tensor(STATS["retain_std"])
    half = n // 2
    a = mu_f + sd_f * 3 * torch.randn(half, 6, generator=g)
    b = mu_r + sd_r * 3 * torch.randn(n - half, 6, generator=g)
    x = torch.cat([a, b])
    x[0], x[1] = mu_f, mu_r
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns, to compare values bit for bit (NaN and -0.0 included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, exact_nan: bool = True) -> None:
    """``got`` equals ``want`` bit for bit (-0.0 and ±inf included); with ``exact_nan`` false, NaNs only need to
    stay NaNs."""
    if exact_nan:
        assert torch.equal(bits(got), bits(want))
        return
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got[~nan]), bits(want[~nan]))


def f32_rounded(v: np.ndarray, up: bool) -> np.ndarray:
    """``v`` rounded to float32 upwards (``up``) or downwards, so a float32 threshold tests at least the claim
    made for the float64 value."""
    f = v.astype(np.float32)
    if up:
        return np.where(f < v, np.nextafter(f, np.float32(np.inf)), f)
    return np.where(f > v, np.nextafter(f, np.float32(-np.inf)), f)


def full_output(x: torch.Tensor, neurons: torch.Tensor, width: int, seed: int = 0) -> torch.Tensor:
    """A pre-activation output ``[m, width]`` in ``x``'s dtype: the rows ``x[m, K]`` in the selected columns
    ``neurons``, random values elsewhere (NaN, ±inf and -0.0 in the first row)."""
    out = torch.randn(x.shape[0], width, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    others = [c for c in range(width) if c not in set(neurons.tolist())]
    for col, value in zip(others, [float("nan"), float("inf"), -float("inf"), -0.0]):
        out[0, col] = value
    out[:, neurons] = x
    return out


@contextlib.contextmanager
def large_gather(on: bool):
    """Within the block, every gather-path call gathers and writes back as large calls do (``on``) or as small ones
    do (not ``on``), whatever its row count."""
    saved = layer_module.LARGE_GATHER_MIN_ROWS
    layer_module.LARGE_GATHER_MIN_ROWS = 1 if on else 10**9
    try:
        yield
    finally:
        layer_module.LARGE_GATHER_MIN_ROWS = saved


def run_real_path(layer, x, path, thresholds=None, draws=None) -> torch.Tensor:
    """What the layer's real call writes to its K selected neurons for values ``x[..., K]`` (state order):
    ``[..., K]`` in ``x``'s dtype.

    ``x`` goes into the selected columns of full pre-activation outputs ``[..., width]`` (random values, NaN, ±inf
    and -0.0 included, elsewhere), and every call is checked to take ``path`` (``"gather"`` rewrites the output in
    place, ``"full_width"`` returns a new tensor and leaves the output alone) and to leave the unselected columns
    unchanged bit for bit. ``"gather"`` is one call (rows of random values appended when the output would be small
    enough for the full width), ``"gather_large"`` the same call through the gather and write-back of large calls
    (:func:`large_gather`); ``"full_width"`` cuts the rows into calls ``[rows, 1, width]`` of at most
    ``FULL_WIDTH_MAX_NUMEL`` values, like decoding steps.

    Args:
        thresholds: ``[..., K]`` in state order, put in the layout of the path (zeros at the unselected columns
            for the full width); ``None`` = deterministic.
        draws: ``(Draws(), seed)``: draw the thresholds as an attachment does instead, once per call (its
            generator seeded at the first call).
    """
    k, width = layer.num_neurons, layer.width
    neurons = layer.neurons.cpu()
    others = torch.ones(width, dtype=torch.bool)
    others[neurons] = False
    lead, rows = x.shape[:-1], x.reshape(-1, k)
    th = None if thresholds is None else thresholds.reshape(-1, k)
    limit = layer_module.FULL_WIDTH_MAX_NUMEL
    gather = path.startswith("gather")
    step = len(rows) if gather else limit // width
    group = LayerGroup({0: layer}) if draws is not None else None
    results = []
    for start in range(0, len(rows), step):
        xs, ts = rows[start : start + step], None if th is None else th[start : start + step]
        output = full_output(xs, neurons, width, seed=start)
        if gather:
            pad = max(0, limit // width + 1 - len(xs))
            if pad:  # too small to gather: more rows
                output = torch.cat(
                    [output, full_output(torch.zeros(pad, k, dtype=x.dtype), neurons, width, 1)]
                )
                ts = None if ts is None else torch.cat([ts, ts.new_zeros(pad, k)])
            else:  # the caller's leading shape
                output = output.reshape(*lead, width)
                ts = None if ts is None else ts.reshape(*lead, k)
        else:
            output = output.unsqueeze(1)
            if ts is not None:
                ts = ts.new_zeros(*output.shape).index_copy_(-1, neurons, ts.unsqueeze(1))
        assert uses_full_width(output) == (path == "full_width")
        given = output.clone()
        if draws is not None:
            draws[0].start(object(), given)
            draws[0].draw(given, group, lambda: draws[1], draws[0].mode(given, group)[0])
            ts = draws[0].views[0]
            assert ts.shape == (*output.shape[:-1], width if path == "full_width" else k)
            if path == "full_width":
                assert (ts[..., others] == 0).all()
        with large_gather(path == "gather_large"):
            got = layer(given, ts)
        assert got.shape == output.shape and got.dtype == output.dtype
        if gather:
            assert got is given  # rewritten in place
        else:
            assert got is not given and torch.equal(bits(given), bits(output))
        # unselected columns unchanged bit for bit; only a full-width call on a half-precision output (computed in
        # float32 and cast back) may rewrite the sign and payload of a NaN, which stays a NaN (torch's cast)
        exact_nan = gather or output.dtype == layer.dtype
        assert_same_bits(got[..., others], output[..., others], exact_nan)
        results.append(got[..., neurons].reshape(-1, k)[: len(xs)])
    return torch.cat(results).reshape(*lead, k)


@pytest.mark.parametrize("path", PATHS)
def test_log_density_ratio_and_mirror_match_numpy(path):
    """d and the mirror image, seen through the real call: thresholds at (float32 at or above) d_np - e_d replace
    every value (so d > d_np - e_d), by its mirror image to within e_mirror; thresholds at (or below)
    d_np + e_d keep every value (so d <= d_np + e_d)."""
    layer, ref = synthetic_layer()
    x = synthetic_values(2000)
    xn = x.double().numpy()
    e_d, e_mirror = np_error_bounds(xn, *ref)
    d_np, mirror = np_log_ratio(xn, *ref), np_mirror(xn, *ref)
    # a replacement shows almost everywhere (0.994 of the values here)
    assert (np.abs(mirror - xn) > 2 * e_mirror).mean() > 0.95
    low = torch.from_numpy(f32_rounded(d_np - e_d, up=True))
    replaced = run_real_path(layer, x, path, low).double().numpy()
    np.testing.assert_array_less(np.abs(replaced - mirror), e_mirror)
    high = torch.from_numpy(f32_rounded(d_np + e_d, up=False))
    assert torch.equal(bits(run_real_path(layer, x, path, high)), bits(x))
    # for neurons of ordinary width the bound is tight
    assert (e_d / (1 + np.abs(d_np)))[:, [0, 1, 2]].max() < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_transform_matches_numpy(stochastic, path):
    layer, ref = synthetic_layer()
    x = synthetic_values(4000, seed=1).reshape(2, 2000, 6)  # any leading shape
    xn = x.double().numpy()
    u = thresholds = None
    if stochastic:
        uniforms = torch.rand(x.shape, generator=torch.Generator().manual_seed(11))
        u, thresholds = uniforms.double().numpy(), thresholds_from_uniforms(uniforms.clone())
    out = run_real_path(layer, x, path, thresholds)
    expected = np_replace(xn, ref, u)
    clear = clear_of_boundary(xn, ref, u)
    assert clear.mean() > 0.95
    replaced = out != x
    assert expected[clear].any() and (~expected[clear]).any()
    # replaced exactly where the reference says so (a mirror image may coincide with x only by chance)
    mirror = np_mirror(xn, *ref)
    moved = np.abs(mirror - xn) > 1e-4 * (1 + np.abs(xn))
    np.testing.assert_array_equal(replaced.numpy()[clear & moved], expected[clear & moved])
    # replaced values are the mirror image; the others are bit-identical
    got = out.double().numpy()
    _, e_mirror = np_error_bounds(xn, *ref)
    np.testing.assert_array_less(np.abs(got - mirror)[expected & clear], e_mirror[expected & clear])
    keep = torch.from_numpy(~expected & clear)
    assert torch.equal(bits(out[keep]), bits(x[keep]))


@pytest.mark.parametrize("path", PATHS)
def test_replacement_given_uniforms_matches_rule(path):
    """Replaced (the output moves) exactly where d > max(0, logit(u)), and where d > 0 without uniforms."""
    layer, ref = synthetic_layer()
    x = synthetic_values(3000, seed=2)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    xn, un = x.double().numpy(), u.double().numpy()
    _, e_mirror = np_error_bounds(xn, *ref)
    moved = np.abs(np_mirror(xn, *ref) - xn) > 2 * e_mirror  # a replaced value cannot equal x
    for uniforms, thresholds in ((un, thresholds_from_uniforms(u.clone())), (None, None)):
        clear = clear_of_boundary(xn, ref, uniforms) & moved
        assert clear.mean() > 0.9
        expected = np_replace(xn, ref, uniforms)
        assert expected[clear].any() and (~expected[clear]).any()
        replaced = (run_real_path(layer, x, path, thresholds) != x).numpy()
        np.testing.assert_array_equal(replaced[clear], expected[clear])


@pytest.mark.parametrize("path", PATHS)
def test_fixed_seed_reproduces_the_replaced_set(path):
    """The attachment's draws (``Draws``) from a seed: the same seed replaces the same values."""
    layer, _ = synthetic_layer()
    x = synthetic_values(5000, seed=3)

    def replaced(seed):
        return run_real_path(layer, x, path, draws=(Draws(), seed)) != x

    first, again, other = replaced(7), replaced(7), replaced(8)
    assert first.any()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("path", PATHS)
def test_replacement_frequency_is_sigmoid_of_log_ratio(path):
    layer, ref = synthetic_layer()
    # 16 fixed values per neuron, each decided n times with fresh draws (the attachment's, see Draws)
    grid = synthetic_values(16, seed=4)
    n = 4000
    x = grid.unsqueeze(0).expand(n, 16, 6).contiguous()
    out = run_real_path(layer, x, path, draws=(Draws(), 0))
    freq = (out != x).double().mean(0).numpy()
    d = np_log_ratio(grid.double().numpy(), *ref)
    p = np.where(d > 0, np_sigmoid(d), 0.0)
    moved = np.abs(np_mirror(grid.double().numpy(), *ref) - grid.double().numpy()) > 1e-4
    assert ((p > 0.05) & (p < 0.95) & moved).sum() >= 5  # the test covers genuinely random decisions
    bound = 5 * np.sqrt(p * (1 - p) / n) + 1.0 / n  # 5 sigma binomial bound
    assert np.all(np.abs(freq - p)[moved] <= bound[moved]), (freq, p)
    assert np.all(freq[d <= 0] == 0)


@pytest.mark.parametrize("path", PATHS)
def test_far_tails_use_log_space(path):
    """Values 40σ away: both densities underflow in linear space, the log ratio still decides. Seen through the
    real call: thresholds at d_np ∓ 1e-4·|d_np| replace / keep every value, so d is finite and within that
    relative tolerance of d_np."""
    layer, ref = synthetic_layer()
    mu_f, sd_f, mu_r, sd_r = ref
    far = np.stack([mu_f + 40 * sd_f, mu_f - 40 * sd_f, mu_r + 40 * sd_r, mu_r - 40 * sd_r]).astype(
        np.float32
    )
    assert np.all(
        np.exp(np_log_normal(far.astype(np.float64), mu_f, sd_f)).astype(np.float32)[:, [0, 2]] == 0
    )
    x, xn = torch.from_numpy(far), far.astype(np.float64)
    d_np, mirror = np_log_ratio(xn, *ref), np_mirror(xn, *ref)
    _, e_mirror = np_error_bounds(xn, *ref)
    assert np.all(np.abs(mirror - xn) > 2 * e_mirror)  # every replacement shows
    tol = 1e-4 * np.abs(d_np)
    low = torch.from_numpy(f32_rounded(d_np - tol, up=True))
    np.testing.assert_array_less(
        np.abs(run_real_path(layer, x, path, low).double().numpy() - mirror), e_mirror
    )
    high = torch.from_numpy(f32_rounded(d_np + tol, up=False))
    assert torch.equal(bits(run_real_path(layer, x, path, high)), bits(x))
    np.testing.assert_array_equal((run_real_path(layer, x, path) != x).numpy(), d_np > 0)


@pytest.mark.parametrize("path", PATHS)
def test_kept_values_are_kept_bit_for_bit_even_huge_or_negative_zero(path):
    """A selected value that is not replaced comes back with its bits: -0.0 and values near the float32 maximum
    included (selecting between x and its mirror image arithmetically, x + w·(x' − x), turned -0.0 into +0.0 and
    huge values into NaN; a review)."""
    layer, _ = synthetic_layer()
    k = layer.num_neurons
    x = torch.tensor([[-0.0] * k, [3e38] * k, [-3e38] * k, [1e35] * k], dtype=torch.float32)
    out = run_real_path(layer, x, path, torch.full_like(x, float("inf")))  # no threshold is exceeded
    assert torch.equal(bits(out), bits(x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_decide_like_float32(dtype, path):
    layer, ref = synthetic_layer(dtype)
    layer32, _ = synthetic_layer(torch.float32)
    assert layer.dtype == torch.float32 and layer.half_diff_slope.dtype == torch.float32
    # far tails too: plain fp16 densities would underflow long before
    x = torch.cat([synthetic_values(3000, seed=5), synthetic_values(8, seed=6) * 30]).to(dtype)
    xn = x.double().numpy()
    d_np, mirror = np_log_ratio(xn, *ref), np_mirror(xn, *ref)
    out = run_real_path(layer, x, path)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert layer.dtype == torch.float32  # the call computed in float32
    # a replaced value is the float32 mirror image (within e_mirror) rounded to dtype (half an ulp, <= eps |x|)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    _, e_mirror = np_error_bounds(xn, *ref)
    got = (out != x).numpy()
    near = e_mirror + eps * (np.abs(mirror) + e_mirror) + tiny
    np.testing.assert_array_less(np.abs(out.double().numpy() - mirror)[got], near[got])
    # where the mirror image is over an ulp of x away (beyond e_mirror), a replacement cannot round back to x
    moved = np.abs(mirror - xn) > e_mirror + 2 * eps * np.abs(xn) + tiny
    clear = torch.from_numpy((np.abs(d_np) > 1e-2) & moved)
    assert clear.double().mean() > 0.75  # 0.91 here: the test decides most values
    replaced32 = run_real_path(layer32, x.float(), path) != x.float()
    assert torch.equal(torch.from_numpy(got)[clear], replaced32[clear])
    assert torch.equal(torch.from_numpy(got)[clear], torch.from_numpy(d_np > 0)[clear])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("stochastic", [False, True])
def test_full_width_path_equals_gather_path(rows, stochastic):
    """Single-sequence decoding takes the full-width path: the same values as gathering the selected columns,
    and the unselected columns (NaN, ±inf, -0.0 included) untouched, bit for bit."""
    width = 64
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in STATS.items()}
    neurons = torch.tensor([9, 3, 40, 17, 63, 0])  # any order: the state's
    full = NeuronAdjustLayer(neurons, *t.values(), width=width)
    gather = NeuronAdjustLayer(neurons, *t.values())  # no width: always gathers
    out = torch.randn(rows, 1, width, generator=torch.Generator().manual_seed(7))
    out[..., neurons] = synthetic_values(8, seed=8)[:rows].reshape(rows, 1, 6)
    out[0, 0, 1], out[0, 0, 2], out[0, 0, 4], out[0, 0, 5] = float("nan"), float("inf"), -float("inf"), -0.0
    sel = None
    if stochastic:
        sel = thresholds_from_uniforms(torch.rand(rows, 1, 6, generator=torch.Generator().manual_seed(3)))
        wide = torch.zeros(rows, 1, width).index_copy_(-1, neurons, sel)
    assert uses_full_width(out)
    got = full(out.clone(), None if sel is None else wide)
    want = gather(out.clone(), sel)
    others = torch.ones(width, dtype=torch.bool)
    others[neurons] = False
    assert torch.equal(got[..., others].view(torch.int32), out[..., others].view(torch.int32))
    torch.testing.assert_close(got[..., neurons], want[..., neurons], rtol=2e-7, atol=0)
    assert not uses_full_width(torch.zeros(1, 1, layer_module.FULL_WIDTH_MAX_NUMEL + 1))


@pytest.mark.parametrize("stochastic", [False, True])
def test_large_gather_equals_small_gather_on_views_and_under_autograd(stochastic):
    """The gather and write-back of large calls give the values and gradients of the small calls' ones, on a view
    of a wider output (the gate half of a fused gate/up projection) rewritten in place, and out of place under
    autograd."""
    width, rows = 64, 300
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in STATS.items()}
    neurons = torch.tensor([9, 3, 40, 17, 63, 0])
    layer = NeuronAdjustLayer(neurons, *t.values(), width=width)
    fused = torch.randn(2, rows // 2, 2 * width, generator=torch.Generator().manual_seed(5)) * 2
    sel = None
    if stochastic:
        sel = thresholds_from_uniforms(
            torch.rand(2, rows // 2, 6, generator=torch.Generator().manual_seed(6))
        )
    results = []
    for on in (False, True):
        given = fused.clone()
        with large_gather(on):
            got = layer(given[..., :width], sel, full=False)
        assert got.data_ptr() == given.data_ptr()  # the view, rewritten in place
        assert torch.equal(given[..., width:], fused[..., width:])
        leaf = fused[..., :width].clone().requires_grad_(True)
        with large_gather(on):
            out = layer(leaf * 1.0, sel, full=False)
        out.pow(2).sum().backward()
        results.append((given, out.detach(), leaf.grad))
    (a, out_a, grad_a), (b, out_b, grad_b) = results
    assert torch.equal(a, b) and torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)
    assert torch.equal(out_a, a[..., :width])
    changed = set((a[..., :width] != fused[..., :width]).any(dim=(0, 1)).nonzero().flatten().tolist())
    assert len(changed) >= 4 and changed <= set(neurons.tolist())
    # a replaced value's gradient flows through the mirror image (slope -σR/σF), a kept one's through x
    slope = torch.zeros(width).index_copy_(0, neurons, -t["retain_std"] / t["forget_std"])
    replaced = a[..., :width] != fused[..., :width]
    expected = 2 * out_a * torch.where(replaced, slope, torch.ones(width))
    torch.testing.assert_close(grad_a, expected)


def test_zero_width_statistics_are_refused():
    t = {k: torch.tensor(v) for k, v in STATS.items()}
    t["retain_std"] = torch.zeros(6)
    with pytest.raises(ValueError, match="positive"):
        NeuronAdjustLayer(torch.arange(6), *t.values())
    t["retain_std"] = torch.full((6,), 1e-40, dtype=torch.float64)  # 1/σ overflows float32
    with pytest.raises(ValueError, match="overflow"):
        NeuronAdjustLayer(torch.arange(6), *t.values())


# -- selection -------------------------------------------------------------------------------------------------


def brute_force_size(ratio: float, total: int) -> int:
    exact = Fraction(str(ratio)) * total  # the ratio as written
    return min(total, max(1, math.floor(exact + Fraction(1, 2))))


@pytest.mark.parametrize(
    "ratio,total",
    [(0.03, 46080), (0.005, 46080), (0.25, 10), (0.15, 10), (0.35, 10), (0.0125, 200), (1e-9, 50), (1.0, 7)]
    + [(0.05, n) for n in range(1, 60)]
    + [(r / 1000, 333) for r in range(1, 1000, 37)],
)
def test_selection_size_rounds_half_up(ratio, total):
    assert selection_size(ratio, total) == brute_force_size(ratio, total)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_global_selection_equals_brute_force_ranking(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    # integer-valued scores: many ties across and within layers
    scores = {i: torch.randint(-5, 6, (40 + 3 * i,), generator=g).double() for i in (0, 2, 5)}
    got = select_global(scores, ratio)
    triples = [(i, j, float(v)) for i, s in scores.items() for j, v in enumerate(s.tolist())]
    k = brute_force_size(ratio, len(triples))
    best = sorted(triples, key=lambda t: (-t[2], t[0], t[1]))[:k]
    assert got[0].tolist() == [t[0] for t in best]
    assert got[1].tolist() == [t[1] for t in best]
    assert got[2].tolist() == [t[2] for t in best]


def test_selection_refuses_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        select_global({0: torch.tensor([0.0, float("nan")])}, 0.5)


# -- fitting on a tiny model -----------------------------------------------------------------------------------


def capture_pre(model, batches):
    """Pre-activation values of every layer at real tokens, captured with our own hooks: ``{layer: [n, d_ff]}``."""
    caught: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.mlp.gate_proj.register_forward_hook(
                lambda m, a, out, i=i: caught.setdefault(i, []).append(out.detach().clone())
            )
        )
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return {i: torch.cat([v[m] for v, m in zip(vals, masks)]) for i, vals in caught.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_fitted_statistics_equal_numpy_on_captured_activations(side):
    model = tiny_llama(layers=3)
    forget, retain = token_batches(0, side=side, **FORGET), token_batches(1, side=side, **RETAIN)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    cfg = NeuronAdjustConfig(ratio=1.0, eps=1e-5)
    na = unlearned.fit(cfg, forget, retain, show_progress=False)
    caught = {role: capture_pre(model, data) for role, data in (("forget", forget), ("retain", retain))}
    layer_index, neuron_index = na.state["layer_index"].numpy(), na.state["neuron_index"].numpy()
    for role in ("forget", "retain"):
        values = {i: v.double().numpy() for i, v in caught[role].items()}
        mean = np.array([values[i][:, j].mean() for i, j in zip(layer_index, neuron_index)])
        std = np.array([max(values[i][:, j].std(ddof=1), 1e-5) for i, j in zip(layer_index, neuron_index)])
        np.testing.assert_allclose(na.state[f"{role}_mean"].double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(na.state[f"{role}_std"].double().numpy(), std, rtol=1e-5, atol=1e-6)
    # ratio 1.0 keeps every neuron, ranked by the paper's score mu_F - mu_R (brute force over the numpy means)
    f = {i: v.double().numpy().mean(0) for i, v in caught["forget"].items()}
    r = {i: v.double().numpy().mean(0) for i, v in caught["retain"].items()}
    triples = [(i, j, f[i][j] - r[i][j]) for i in sorted(f) for j in range(f[i].shape[0])]
    assert len(triples) == len(layer_index)
    score = na.state["score"].double().numpy()
    np.testing.assert_allclose(score, sorted((t[2] for t in triples), reverse=True), rtol=1e-4, atol=1e-6)
    unlearned.remove_all_methods()


def test_completion_token_mode_counts_only_the_completion(smol_tokenizer):
    model = tiny_llama(layers=2)
    tok = smol_tokenizer
    pairs = [
        {"prompt": "Question: what is 3 plus 4?\nAnswer:", "completion": " 3 + 4 = 7. The answer is 7."},
        {"prompt": "Question: 12 times 2?\nAnswer:", "completion": " 24"},
        {"prompt": "Question: half of 10?\nAnswer:", "completion": " 10 / 2 = 5, so 5."},
    ]
    retain = [{"prompt": "Write code:", "completion": " def f(x):\n    return x * 2\n"}] * 2
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    cfg = NeuronAdjustConfig(ratio=1.0, tokens="completion")
    na = unlearned.fit(
        cfg, pairs, retain, tok, prompt_column="prompt", completion_column="completion", show_progress=False
    )
    # our own capture: each example alone, counting the positions after the prompt's tokens
    rows = []
    for p in pairs:
        ids = tok(p["prompt"] + p["completion"], return_tensors="pt")["input_ids"]
        n_prompt = len(tok(p["prompt"])["input_ids"])
        vals = capture_pre(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
        rows.append({i: v[n_prompt:] for i, v in vals.items()})
    li, ni = na.state["layer_index"].numpy(), na.state["neuron_index"].numpy()
    values = {i: torch.cat([r[i] for r in rows]).double().numpy() for i in rows[0]}
    mean = np.array([values[i][:, j].mean() for i, j in zip(li, ni)])
    np.testing.assert_allclose(na.state["forget_mean"].double().numpy(), mean, rtol=1e-4, atol=1e-5)
    unlearned.remove_all_methods()


def test_zero_variance_neurons_are_floored_at_eps():
    model = tiny_llama(layers=2)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    kw = dict(site="pre", layers=[0, 1], show_progress=False)
    stats_f = probe(model, token_batches(0, **FORGET), **kw)
    stats_r = probe(model, token_batches(1, **RETAIN), **kw)
    # make neurons 0..4 of layer 1 constant on the forget set, at a mean far above the retain mean
    stats_f.layers[1].m2[:5] = 0.0
    stats_f.layers[1].mean[:5] = stats_r.layers[1].mean[:5] + 10.0
    eps = 1e-4
    na = unlearned.fit(NeuronAdjustConfig(ratio=0.05, eps=eps, deterministic=True), stats_f, stats_r)
    picked = (na.state["layer_index"] == 1) & (na.state["neuron_index"] < 5)
    assert int(picked.sum()) == 5  # the largest mean differences
    assert torch.equal(na.state["forget_std"][picked], torch.full((5,), eps, dtype=torch.float32))
    assert (na.state["forget_std"] >= eps).all() and (na.state["retain_std"] >= eps).all()
    # a value at the forget mean is replaced by the retain mean, through the attached layer's real call: one row
    # (full width) and enough rows to gather
    adj = unlearned.attachments["neuron_adjust"].layers[1]
    ref = tuple(
        na.state[k][picked].double().numpy()
        for k in ("forget_mean", "forget_std", "retain_mean", "retain_std")
    )
    order = na.state["neuron_index"][picked].argsort().numpy()  # state order -> neurons 0..4
    ref = tuple(r[order] for r in ref)
    x = stats_f.layers[1].mean[:5].float()
    _, e_mirror = np_error_bounds(x.double().numpy(), *ref)  # σF = eps: x' = μR to a few ulps of x
    for rows in (1, layer_module.FULL_WIDTH_MAX_NUMEL // adj.width + 1):
        output = torch.zeros(rows, adj.width)
        output[:, :5] = x
        given = output.clone()
        got = adj(given, None)
        assert (got is given) != uses_full_width(output)  # the gather path rewrites in place
        assert (rows == 1) == uses_full_width(output)
        err = np.abs(got[:, :5].double().numpy() - ref[2])
        np.testing.assert_array_less(err, np.broadcast_to(e_mirror, err.shape))
    assert e_mirror.max() < 0.1 * ref[3].min()  # (|μF| / σF = 1e5 here) still well below the retain width
    ids = token_batches(3, **FORGET)[0]
    with torch.no_grad():
        assert torch.isfinite(unlearned(**ids).logits).all()
    unlearned.remove_all_methods()


# -- on the model: only the selected columns change, reproducibly ----------------------------------------------


def fitted(model, **cfg):
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = NeuronAdjustConfig(**{"ratio": 0.1, **cfg})
    unlearned.fit(config, token_batches(0, **FORGET), token_batches(1, **RETAIN), show_progress=False)
    return unlearned, unlearned.methods["neuron_adjust"]


def stats_of(na, layer):
    pos = (na.state["layer_index"] == layer).nonzero().squeeze(1)
    cols = na.state["neuron_index"][pos]
    ref = tuple(
        na.state[k][pos].double().numpy() for k in ("forget_mean", "forget_std", "retain_mean", "retain_std")
    )
    return cols, ref


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(
    ("path", "draw"),
    [("gather", "block"), ("gather", "per_layer"), ("gather_large", "per_layer"), ("full_width", "block")],
)
@pytest.mark.parametrize("rows", [(4, 12), (1, 2)], ids=["4x12", "1x2"])
def test_only_selected_pre_activation_columns_change(deterministic, path, draw, rows, monkeypatch):
    """Only the selected columns change, each as the numpy rule says given the draws Neuron Adjust makes: one block
    per forward (the layers' columns side by side in layer order) for a small forward, one draw per layer from the
    same generator, in layer order, for a large one."""
    monkeypatch.setattr(layer_module, "FULL_WIDTH_MAX_NUMEL", 10**9 if path == "full_width" else 0)
    monkeypatch.setattr(layer_module, "LARGE_GATHER_MIN_ROWS", 1 if path == "gather_large" else 10**9)
    monkeypatch.setattr(sampling, "GROUP_DRAW_MAX_NUMEL", 0 if draw == "per_layer" else 10**9)
    model = tiny_llama(layers=3)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    gates = [f"model.layers.{i}.mlp.gate_proj" for i in range(3)]
    before = Capture(model, gates)  # registered first: sees the raw outputs
    unlearned, na = fitted(model, deterministic=deterministic, seed=4)
    after = Capture(model, gates)  # registered after Neuron Adjust: sees the adjusted outputs
    before.values.clear()  # drop what the probe's forwards produced
    batch = token_batches(5, **FORGET, n=1, batch=rows[0], width=rows[1])[0]
    with torch.no_grad():
        unlearned(**batch)
    layers = sorted(set(na.state["layer_index"].tolist()))
    attachment = unlearned.attachments["neuron_adjust"]
    assert sorted(attachment.layers) == layers
    # the draws Neuron Adjust makes: one block per forward, the layers' columns side by side in layer order
    widths = [int((na.state["layer_index"] == i).sum()) for i in layers]
    offsets = dict(zip(layers, np.cumsum([0, *widths[:-1]]).tolist()))
    assert attachment.thresholds_layout() == {i: (offsets[i], w) for i, w in zip(layers, widths)}
    lead = before.values[gates[0]][0].shape[:-1]
    gen = torch.Generator().manual_seed(4)
    if draw == "block":
        block = torch.rand((*lead, sum(widths)), generator=gen).double().numpy()
    else:
        block = np.concatenate([torch.rand((*lead, w), generator=gen).double().numpy() for w in widths], -1)
    n_replaced = 0
    for i, name in enumerate(gates):
        x, y = before.values[name][0], after.values[name][0]
        if i not in layers:
            assert torch.equal(x, y)
            continue
        cols, ref = stats_of(na, i)
        assert torch.equal(attachment.layers[i].neurons.cpu(), cols)  # its columns, in state order
        others = torch.ones(x.shape[-1], dtype=torch.bool)
        others[cols] = False
        assert torch.equal(x[..., others], y[..., others])
        xs = x[..., cols].double().numpy()
        u = None if deterministic else block[..., offsets[i] : offsets[i] + len(cols)]
        expected = np_replace(xs, ref, u)
        clear = clear_of_boundary(xs, ref, u)
        assert clear.mean() > 0.9
        ys = y[..., cols].double().numpy()
        want = np.where(expected, np_mirror(xs, *ref), xs)
        _, e_mirror = np_error_bounds(xs, *ref)
        np.testing.assert_array_less(np.abs(ys - want)[clear], e_mirror[clear])
        n_replaced += int(expected.sum())
    assert n_replaced > 0
    before.remove()
    after.remove()
    unlearned.remove_all_methods()
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_attention_embeddings_and_unselected_sites_are_bit_identical():
    model = tiny_llama(layers=3)
    unlearned, na = fitted(model, ratio=0.05, deterministic=True)
    first = int(na.state["layer_index"].min())
    names = ["model.embed_tokens"]
    names += [f"model.layers.{i}.self_attn" for i in range(first + 1)]
    names += [f"model.layers.{first}.mlp.up_proj", f"model.layers.{first}.input_layernorm"]
    batch = token_batches(6, **FORGET, n=1)[0]
    cap = Capture(model, names)
    with torch.no_grad():
        unlearned(**batch)
        changed = unlearned(**batch).logits
        base = model(**batch).logits
    cap.remove()
    assert not torch.equal(changed, base)  # the method does something
    for name in names:
        got, plain = cap.values[name][0], cap.values[name][2]
        assert torch.equal(got, plain), name
    unlearned.remove_all_methods()
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, base)


def test_same_seed_same_output_and_seeds_can_change_per_call():
    model = tiny_llama(layers=3)
    unlearned, na = fitted(model, ratio=0.3, seed=1)
    batch = token_batches(7, **FORGET, n=1)[0]
    with torch.no_grad():
        a = unlearned(**batch).logits
        b = unlearned(**batch).logits
        with na.seeded(2):
            c = unlearned(**batch).logits
            c2 = unlearned(**batch).logits
        d = unlearned(**batch).logits
        base = model(**batch).logits
    assert torch.equal(a, b) and torch.equal(a, d)
    assert torch.equal(c, c2) and not torch.equal(a, c)
    assert not torch.equal(a, base)
    # a second fit with the same seed reproduces the first one exactly
    model2 = tiny_llama(layers=3)
    unlearned2, _ = fitted(model2, ratio=0.3, seed=1)
    with torch.no_grad():
        assert torch.equal(unlearned2(**batch).logits, a)
    # a fitted method's config is frozen: another seed is another method (same state), or a seeded() block
    with pytest.raises(dataclasses.FrozenInstanceError):
        na.config.seed = 2
    reseeded = NeuronAdjust(dataclasses.replace(na.config, seed=2), na.state)
    unlearned.remove_method("neuron_adjust")
    unlearned.add_method("neuron_adjust", reseeded)
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, c)
    assert na.config.seed == 1 and reseeded.config.seed == 2
    # generation: identical sequences and scores for the same seed
    prompt = {k: v[:2, :6] for k, v in batch.items()}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    g1, g2 = unlearned.generate(**prompt, **kw), unlearned.generate(**prompt, **kw)
    assert torch.equal(g1.sequences, g2.sequences)
    assert all(torch.equal(s1, s2) for s1, s2 in zip(g1.scores, g2.scores))
    unlearned.remove_all_methods()
    unlearned2.remove_all_methods()


def test_deterministic_mode_ignores_the_seed():
    model = tiny_llama(layers=2)
    batch = token_batches(8, **FORGET, n=1)[0]
    outs = []
    for seed in (0, 1):
        unlearned, _ = fitted(model, ratio=0.3, seed=seed, deterministic=True)
        with torch.no_grad():
            outs.append(unlearned(**batch).logits)
        unlearned.remove_all_methods()
    assert torch.equal(outs[0], outs[1])


def test_bfloat16_model_is_finite_and_decides_like_float32():
    model = tiny_llama(layers=3).to(torch.bfloat16)
    unlearned, na = fitted(model, ratio=0.2, deterministic=True)
    gates = [f"model.layers.{i}.mlp.gate_proj" for i in range(3)]
    before = Capture(model, gates)
    unlearned.remove_all_methods()
    attachment = unlearned.add_method("neuron_adjust", na)
    assert attachment is unlearned.attachments["neuron_adjust"]
    adjs = attachment.layers
    assert all(adj.dtype == torch.float32 for adj in adjs.values())
    assert all(adj.half_diff_bias.dtype == adj.log_ratio.dtype == torch.float32 for adj in adjs.values())
    after = Capture(model, gates)
    # one call small enough for the full width, one that gathers
    batches = [token_batches(9, **FORGET, n=1, batch=b)[0] for b in (4, 8)]
    with torch.no_grad():
        for batch in batches:
            logits = unlearned(**batch).logits
            assert torch.isfinite(logits).all()
    eps, tiny = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.bfloat16).tiny
    checked = 0
    for call, full_width in enumerate((True, False)):
        for i in sorted(adjs):
            cols, ref = stats_of(na, i)
            raw = before.values[gates[i]][call]
            assert uses_full_width(raw) == full_width
            x, y = raw[..., cols], after.values[gates[i]][call][..., cols]
            assert torch.isfinite(y).all()
            xn = x.double().numpy()
            d, mirror = np_log_ratio(xn, *ref), np_mirror(xn, *ref)
            _, e_mirror = np_error_bounds(xn, *ref)
            # a replaced value is the float32 mirror image rounded to bfloat16
            decided = (y != x).numpy()
            near = e_mirror + eps * (np.abs(mirror) + e_mirror) + tiny
            np.testing.assert_array_less(np.abs(y.double().numpy() - mirror)[decided], near[decided])
            # where the mirror image is over an ulp of x away, a replacement cannot round back to x
            moved = np.abs(mirror - xn) > e_mirror + 2 * eps * np.abs(xn) + tiny
            clear = torch.from_numpy((np.abs(d) > 1e-2) & moved)
            decided = torch.from_numpy(decided)
            # the same neurons in a float32 layer, through its real call on the float32 output (both paths)
            for width in (None, raw.shape[-1]):
                ref32 = NeuronAdjustLayer(
                    cols, *(torch.from_numpy(r).float() for r in ref), dtype=torch.float32, width=width
                )
                out32 = raw.float()
                replaced32 = ref32(out32.clone(), None)[..., cols] != out32[..., cols]
                assert torch.equal(decided[clear], replaced32[clear])
            assert torch.equal(decided[clear], torch.from_numpy(d > 0)[clear])
            checked += int(clear.sum())
    assert checked > 0
    before.remove()
    after.remove()
    unlearned.remove_all_methods()


def test_float64_model_computes_in_float64():
    model = tiny_llama(layers=2).to(torch.float64)
    unlearned, na = fitted(model, ratio=0.1)
    adjs = unlearned.attachments["neuron_adjust"].layers
    assert adjs and all(adj.dtype == torch.float64 for adj in adjs.values())
    with torch.no_grad():
        assert unlearned(**token_batches(3, **FORGET, n=1)[0]).logits.dtype == torch.float64
    unlearned.remove_all_methods()


def test_model_moved_to_another_dtype_after_attaching():
    model = tiny_llama(layers=2)
    unlearned, _ = fitted(model, ratio=0.2, deterministic=True)
    adjs = unlearned.attachments["neuron_adjust"].layers
    batch = token_batches(3, **FORGET, n=1)[0]
    for dtype, compute in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        model.to(dtype)
        gates = [f"model.layers.{i}.mlp.gate_proj" for i in sorted(adjs)]
        cap = Capture(model, gates)
        with torch.no_grad():
            logits = unlearned(**batch).logits
        cap.remove()
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        assert all(adj.dtype == compute and adj.half_diff_slope.dtype == compute for adj in adjs.values())
        assert all(v[0].dtype == dtype for v in cap.values.values())
    unlearned.remove_all_methods()


def test_fitted_state_is_tensors_and_plain_config():
    model = tiny_llama(layers=2)
    unlearned, na = fitted(model, ratio=0.1, seed=3)
    assert set(na.state) == {
        "layer_index", "neuron_index", "forget_mean", "forget_std", "retain_mean", "retain_std", "score",
    }  # fmt: skip
    assert all(torch.is_tensor(v) for v in na.state.values())
    k = selection_size(0.1, 2 * 64)
    assert all(v.shape == (k,) for v in na.state.values())
    assert na.config.to_dict() == {
        "method_type": "neuron_adjust", "ratio": 0.1, "tokens": "all", "layers": None, "max_retain_drop": 0.05,
        "holdout_fraction": 0.2, "ratio_grid": None, "score": "mean_diff", "eps": 1e-5, "seed": 3,
        "deterministic": False,
    }  # fmt: skip
    # scores are non-increasing, and the state alone rebuilds an identical method
    assert (na.state["score"][:-1] >= na.state["score"][1:]).all()
    batch = token_batches(4, **FORGET, n=1)[0]
    with torch.no_grad():
        a = unlearned(**batch).logits
        unlearned.remove_all_methods()
        unlearned.add_method(
            "copy", NeuronAdjust(NeuronAdjustConfig.from_dict(na.config.to_dict()), na.state_dict())
        )
        assert torch.equal(unlearned(**batch).logits, a)
    unlearned.remove_all_methods()


def test_layer_subset_and_scores():
    model = tiny_llama(layers=3)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = token_batches(0, **FORGET), token_batches(1, **RETAIN)
    na = unlearned.fit(NeuronAdjustConfig(ratio=0.1, layers=[-1, 0]), forget, retain, show_progress=False)
    assert set(na.state["layer_index"].tolist()) <= {0, 2}
    assert na.state["layer_index"].numel() == selection_size(0.1, 2 * 64)
    unlearned.remove_all_methods()
    caught = {role: capture_pre(model, d) for role, d in (("f", forget), ("r", retain))}
    for score in ("abs_mean_diff", "standardized"):
        na = unlearned.fit(NeuronAdjustConfig(ratio=0.05, score=score), forget, retain, show_progress=False)
        triples = []
        for i in range(3):
            f, r = caught["f"][i].double().numpy(), caught["r"][i].double().numpy()
            diff = f.mean(0) - r.mean(0)
            if score == "abs_mean_diff":
                s = np.abs(diff)
            else:
                s = diff / np.sqrt((f.std(0, ddof=1) ** 2 + r.std(0, ddof=1) ** 2) / 2)
            triples += [(i, j, v) for j, v in enumerate(s)]
        best = sorted(triples, key=lambda t: (-t[2], t[0], t[1]))[: selection_size(0.05, len(triples))]
        assert list(zip(na.state["layer_index"].tolist(), na.state["neuron_index"].tolist())) == [
            (t[0], t[1]) for t in best
        ]
        unlearned.remove_all_methods()


# -- bad input: clear errors, nothing left attached ------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        NeuronAdjustConfig(ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        SelectivePruningConfig(ratio=ratio)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(score="max"), "score"),
        (dict(tokens="last"), "tokens"),
        (dict(eps=0.0), "eps"),
        (dict(layers=[]), "layers"),
        (dict(layers=["a"]), "layers"),
        (dict(seed=1.5), "seed"),
        (dict(deterministic="yes"), "deterministic"),
    ],
)
def test_bad_config_fields_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronAdjustConfig(**kwargs)


def bad_fit_cases(model):
    other = tiny_llama(layers=3, seed=1)  # another architecture (3 layers)
    stats_other = probe(other, token_batches(0, **FORGET), site="pre", show_progress=False)
    stats_key = probe(model, token_batches(0, **FORGET), site="key", show_progress=False)
    stats_ok = probe(model, token_batches(0, **FORGET), site="pre", show_progress=False)
    out_of_vocab = token_batches(1, **RETAIN)
    out_of_vocab[1]["input_ids"][0, 0] = 49152 + 7
    one_token = [{"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]])}]
    return [
        ("retain None", dict(forget=token_batches(0, **FORGET), retain=None), "retain"),
        ("retain empty", dict(forget=token_batches(0, **FORGET), retain=[]), "empty"),
        ("token ids outside the vocabulary", dict(forget=token_batches(0, **FORGET), retain=out_of_vocab), "vocab"),
        ("statistics of another model", dict(forget=stats_other, retain=token_batches(1, **RETAIN)), "different model"),
        ("statistics of the key site", dict(forget=stats_key, retain=token_batches(1, **RETAIN)), "site"),
        ("retain statistics of another model", dict(forget=stats_ok, retain=stats_other), "retain"),
        ("one-token forget set", dict(forget=one_token, retain=token_batches(1, **RETAIN)), "at least 2"),
    ]  # fmt: skip


def test_bad_fit_input_raises_and_leaves_no_hooks():
    model = tiny_llama(layers=2)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    n_hooks = hook_count(model)
    for what, data, match in bad_fit_cases(model):
        with pytest.raises(ValueError, match=match):
            unlearned.fit(NeuronAdjustConfig(ratio=0.1), **data, show_progress=False)
        assert hook_count(model) == n_hooks, what
        assert not unlearned.methods, what


def test_tokenizer_larger_than_the_vocabulary_is_refused(smol_tokenizer):
    model = tiny_llama(vocab_size=1000, layers=2)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with pytest.raises(ValueError, match="tokenizer has 49152 tokens"):
        unlearned.fit(NeuronAdjustConfig(), ["a b c"], ["d e f"], smol_tokenizer, show_progress=False)
    assert hook_count(model) == 0 and not unlearned.methods


def test_precomputed_statistics_of_another_width_are_refused():
    model = tiny_llama(layers=2)
    layers = {
        i: RunningStats(96) for i in (0, 1)
    }  # hand-built statistics: no fingerprint, the width must fit
    for rs in layers.values():
        rs.update(torch.randn(10, 96))
    stats = SiteStatistics("pre", "all", layers)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with pytest.raises(ValueError, match="width 96"):
        unlearned.fit(NeuronAdjustConfig(), stats, token_batches(1, **RETAIN), show_progress=False)
    assert hook_count(model) == 0


def test_state_that_does_not_fit_the_model_fails_to_attach_cleanly():
    model = tiny_llama(layers=2)
    unlearned, na = fitted(model, ratio=0.1)
    unlearned.remove_all_methods()
    bad_layer = dict(na.state_dict(), layer_index=torch.full_like(na.state["layer_index"], 5))
    bad_neuron = dict(na.state_dict(), neuron_index=torch.full_like(na.state["neuron_index"], 64))
    duplicate = dict(na.state_dict(), neuron_index=torch.zeros_like(na.state["neuron_index"]))
    for state, match in ((bad_layer, "layers"), (bad_neuron, "outside"), (duplicate, "more than once")):
        with pytest.raises(ValueError, match=match):
            unlearned.add_method("bad", NeuronAdjust(na.config, state))
        assert hook_count(model) == 0 and not unlearned.methods
    with pytest.raises(ValueError, match="non-positive"):
        NeuronAdjust(na.config, dict(na.state_dict(), retain_std=torch.zeros_like(na.state["retain_std"])))
