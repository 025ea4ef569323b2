"""The Neuron Adjust transform applied to one layer's pre-activation output."""

from __future__ import annotations

import torch


class NeuronAdjustLayer:
    """Rewrites the selected neurons of one pre-activation site (METHOD.md §3).

    For a value x of neuron j: log pF − log pR is computed in float32 as ½(zR − zF)(zR + zF) + log σR − log σF
    with zF = (x − μF)/σF, zR = (x − μR)/σR. Where pF > pR, x is replaced, with probability
    sigmoid(log pF − log pR) (always, in deterministic mode), by its mirror image x' = μR − zF·σR.

    All coefficients are precomputed once on the layer's device as linear maps of x, so a call is a handful of
    fused tensor operations on the selected columns only.

    Args:
        neurons: indices of the selected neurons in this layer.
        forget_mean / forget_std / retain_mean / retain_std: their statistics (σ already floored).
        device: the layer's device.
    """

    def __init__(
        self,
        neurons: torch.Tensor,
        forget_mean: torch.Tensor,
        forget_std: torch.Tensor,
        retain_mean: torch.Tensor,
        retain_std: torch.Tensor,
        device: torch.device,
    ) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        mu_f, sd_f = forget_mean.to(torch.float64), forget_std.to(torch.float64)
        mu_r, sd_r = retain_mean.to(torch.float64), retain_std.to(torch.float64)
        self.neurons = neurons.to(device=device, dtype=torch.long)
        # zR - zF = x * (1/sR - 1/sF) + (muF/sF - muR/sR);  zR + zF = x * (1/sR + 1/sF) - (muF/sF + muR/sR)
        self.diff_slope = (1 / sd_r - 1 / sd_f).to(**f32)
        self.diff_bias = (mu_f / sd_f - mu_r / sd_r).to(**f32)
        self.sum_slope = (1 / sd_r + 1 / sd_f).to(**f32)
        self.sum_bias = (-(mu_f / sd_f + mu_r / sd_r)).to(**f32)
        self.log_ratio = (sd_r.log() - sd_f.log()).to(**f32)
        # x' = muR - (x - muF)/sF * sR = (muR + muF*sR/sF) + x * (-sR/sF)
        self.mirror_bias = (mu_r + mu_f * sd_r / sd_f).to(**f32)
        self.mirror_slope = (-sd_r / sd_f).to(**f32)

    def log_density_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """log pF(x) − log pR(x) for float32 values ``x[..., n_selected]``."""
        zdiff = torch.addcmul(self.diff_bias, x, self.diff_slope)
        zsum = torch.addcmul(self.sum_bias, x, self.sum_slope)
        return torch.addcmul(self.log_ratio, zdiff, zsum, value=0.5)

    def mirror(self, x: torch.Tensor) -> torch.Tensor:
        """The mirror image μR − (x − μF)/σF · σR."""
        return torch.addcmul(self.mirror_bias, x, self.mirror_slope)

    def transform(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Adjusted float32 values for float32 ``x[..., n_selected]``; ``generator=None`` = deterministic.

        Replacement happens where log pF − log pR > max(0, L) with L = logit(u), u ~ U(0, 1): for d > 0 that has
        probability sigmoid(d), and it never happens for d <= 0.
        """
        d = self.log_density_ratio(x)
        if generator is None:
            replace = d > 0
        else:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            replace = d > u.logit_().clamp_min_(0)
        return torch.where(replace, self.mirror(x), x)

    def __call__(self, output: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Rewrite the selected columns of a pre-activation output ``[..., d_ff]`` in place and return it."""
        x = output.index_select(-1, self.neurons).float()
        new = self.transform(x, generator)
        return output.index_copy_(-1, self.neurons, new.to(output.dtype))
