"""Rectified flow, the whole objective in one place (cf. minRF).

x_t = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0.
sigma = 0 is data, sigma = 1 is noise. FLUX shifts sigmas towards noise for
larger images: sigma' = e^mu / (e^mu + 1/sigma - 1), with mu growing with the
number of target tokens (diffusers' `calculate_shift`).
"""

from __future__ import annotations

import math

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


def resolution_mu(target_tokens: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's shift parameter for a target of `target_tokens` packed tokens (source tokens do not count)."""
    return calculate_shift(target_tokens, base_seq_len, max_seq_len, base_shift, max_shift)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The exponential time shift FlowMatchEulerDiscreteScheduler applies with dynamic shifting."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


SIGMA_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
REGION_WEIGHTING = ("none", "log", "log_both")


def sample_sigmas(
    batch: int,
    mode: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mu: float | None = None,
    generator: torch.Generator | None = None,
    device=None,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Training sigmas in (0, 1): logit-normal (SD3/FLUX), SD3's mode sampling or uniform, then the shift."""
    if mode not in SIGMA_SAMPLING:
        raise ValueError(f"unknown sigma sampling {mode!r}; expected one of {SIGMA_SAMPLING}")
    sigmas = compute_density_for_timestep_sampling(mode, batch, mean, std, mode_scale, generator=generator)
    sigmas = sigmas.clamp(1e-5, 1 - 1e-5)
    if mu is not None:
        sigmas = shift_sigmas(sigmas, mu)
    return sigmas.to(device)


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights: none, SD3's sigma_sqrt (sigma^-2) or cosmap."""
    if scheme not in LOSS_WEIGHTING:
        raise ValueError(f"unknown loss weighting {scheme!r}; expected one of {LOSS_WEIGHTING}")
    return compute_loss_weighting_for_sd3(scheme, sigmas.float())


def region_weights(scheme: str, region: torch.Tensor) -> torch.Tensor | None:
    """Per-latent loss weights (B, 1, h, w) from the changed region (B, h, w), or None for "none".

    "log" (the public GPT-Image-Edit code's `mask_weight_type: 'log'`): 1 outside the region and
    1 + log2(cells / region cells) inside, so a small edit is not drowned by the unchanged rest.
    "log_both": the same boost on both sides, each by its own share, so whichever part is small counts:
    the edit of a local change, and the objects kept when the whole background changes.
    A sample whose region is empty or everything gets weight 1 everywhere."""
    if scheme not in REGION_WEIGHTING:
        raise ValueError(f"unknown region weighting {scheme!r}; expected one of {REGION_WEIGHTING}")
    if scheme == "none":
        return None
    region = region.bool()
    cells = region[0].numel()

    def boost(part: torch.Tensor) -> torch.Tensor:  # (B, 1, 1): 1 + log2(cells / cells in part), 1 if empty
        inside = part.flatten(1).sum(1)
        return torch.where(inside > 0, 1.0 + torch.log2(cells / inside.clamp(min=1).float()), 1.0).view(-1, 1, 1)

    outside = boost(~region) if scheme == "log_both" else 1.0
    return torch.where(region, boost(region), outside).unsqueeze(1)


def training_loss(editor, x0, noise, sigmas, sources, states, mask, guidance, weighting: str = "none",
                  padded: bool | None = None, region_weight: torch.Tensor | None = None):
    """(weighted mean loss to backpropagate, unweighted per-sample losses for logging) of one micro-batch.

    region_weight: optional per-latent weights (B, 1, h, w), see `region_weights`."""
    pred = editor(add_noise(x0, noise, sigmas), sources, states, mask, sigmas, guidance, padded)
    error = (pred.float() - velocity(x0, noise).float()) ** 2
    losses = error.flatten(1).mean(1)
    weighted = losses if region_weight is None else (error * region_weight.float()).flatten(1).mean(1)
    return (weighted * loss_weights(weighting, sigmas)).mean(), losses.detach()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def sigma_bin_losses(losses: torch.Tensor, sigmas: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """(2, bins) tensor: sum and count of per-sample losses in equal-width sigma bins.

    Stays on the device (no host sync); `sigma_bin_names` labels the bins when logging."""
    index = (sigmas.float().clamp(0, 1 - 1e-6) * bins).long()
    totals = torch.zeros(2, bins, device=losses.device)
    totals[0].index_add_(0, index, losses.float())
    totals[1].index_add_(0, index, torch.ones_like(losses, dtype=torch.float))
    return totals


def sigma_bin_names(bins: int = 4) -> list[str]:
    return [f"{b / bins:.2f}-{(b + 1) / bins:.2f}" for b in range(bins)]
