"""Samplers for the objectives of vitlab/tasks/diffusion/objectives.py, with classifier-free guidance.

- :func:`ddim_sample`: DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic at eta = 0.
- :func:`ddpm_sample`: DDPM's ancestral sampling (Ho et al. 2020) with the fixed or learned variance (Nichol &
  Dhariwal 2021), on all steps or a respaced subsequence.
- :func:`euler_sample`: Euler integration of a rectified flow's ODE from noise (t = 1) to data (t = 0) (Liu et al.
  2023; Esser et al. 2024 for the time shift).
- :func:`guided`: classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"),
  u + s (c - u), the conditional and unconditional passes batched into one call.

Every sampler takes the initial noise x_T from the caller (drawn from a seeded generator) and a ``generator`` for
the noise it adds itself: the same noise and generator give the same images. The loops never read a tensor back to
the host. Pure torch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional

import torch
from torch import Tensor

from vitlab.tasks.diffusion.objectives import GaussianDiffusion, RectifiedFlow

Sampler = Literal["ddim", "ddpm", "euler"]
SAMPLERS = ("ddim", "ddpm", "euler")
ModelFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def guided(model_fn: ModelFn, x: Tensor, t_model: Tensor, y: Optional[Tensor], null_label: Optional[int],
           scale: float, channels: int) -> Tensor:
    """The model's output under classifier-free guidance with weight ``scale``.

    One plain call when guidance is off (``scale == 1``, no labels or no null label). Otherwise one call on the
    doubled batch (labels ``y`` then ``null_label``): the first ``channels`` channels (eps or velocity) become
    u + scale * (c - u); any further channels (a learned variance) are the conditional half's.
    """
    if scale == 1.0 or y is None or null_label is None:
        return model_fn(x, t_model, y)
    null = torch.full_like(y, null_label)
    out = model_fn(torch.cat([x, x]), torch.cat([t_model, t_model]), torch.cat([y, null]))   # (2B, C_out, H, W)
    cond, uncond = out.chunk(2)                                                               # (B, C_out, H, W)
    mixed = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)


def _progress(steps: Iterable[int], progress: bool, desc: str, total: int) -> Iterable[int]:
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, total=total, leave=False)


def _gaussian_noise(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _step_tensor(x: Tensor, step: int) -> Tensor:
    """The step ``step`` for every sample: long (B,), built on the device (no host -> device copy per step)."""
    return torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------------- DDPM

def _respaced(diffusion: GaussianDiffusion, steps: Optional[int]) -> GaussianDiffusion:
    if steps is None or steps == diffusion.num_timesteps:
        return diffusion
    return diffusion.respace(steps)


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, noise: Tensor, y: Optional[Tensor], *,
                steps: int = 50, eta: float = 0.0, guidance: float = 1.0, null_label: Optional[int] = None,
                clip_x0: bool = True, generator: Optional[torch.Generator] = None,
                progress: bool = False) -> Tensor:
    """DDIM on ``steps`` evenly spaced steps of the diffusion (its :meth:`~GaussianDiffusion.respace`).

    x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) (DDIM eq. 12 and 16). eta = 0 is
    deterministic, eta = 1 has DDPM's posterior variance. With ``clip_x0`` the predicted x0 is clamped to [-1, 1]
    and eps recomputed from it, so the step stays consistent with the clamped x0.
    """
    diffusion = _respaced(diffusion, steps)
    channels = noise.shape[1]
    x = noise
    for i in _progress(reversed(range(diffusion.num_timesteps)), progress, "ddim", diffusion.num_timesteps):
        t = _step_tensor(x, i)                                                           # (B,)
        out = guided(model_fn, x, diffusion.model_time(t), y, null_label, guidance, channels)
        p = diffusion.p_mean_variance(out, x, t, clip_x0=clip_x0)
        x0 = p["x0"]                                                                     # (B, C, H, W)
        eps = diffusion.predict_eps_from_x0(x, t, x0) if clip_x0 else p["eps"]
        alpha_bar = diffusion.alphas_cumprod[i]                                          # 0-d, stays on the device
        alpha_bar_prev = diffusion.alphas_cumprod_prev[i]
        x = alpha_bar_prev.sqrt() * x0
        if eta > 0 and i > 0:
            sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
            x = x + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * _gaussian_noise(x, generator)
        else:
            x = x + (1 - alpha_bar_prev).sqrt() * eps                 # eta = 0, or the last step (abar_prev = 1)
    return x


@torch.no_grad()
def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, noise: Tensor, y: Optional[Tensor], *,
                steps: Optional[int] = None, guidance: float = 1.0, null_label: Optional[int] = None,
                clip_x0: bool = True, generator: Optional[torch.Generator] = None,
                progress: bool = False) -> Tensor:
    """Ancestral sampling x_{t-1} ~ N(mu_theta(x_t), Sigma_theta) with the model's learned variance or the fixed
    one; all T steps (``steps=None``) or a respaced subsequence; the last step returns the mean (no noise)."""
    diffusion = _respaced(diffusion, steps)
    channels = noise.shape[1]
    x = noise
    for i in _progress(reversed(range(diffusion.num_timesteps)), progress, "ddpm", diffusion.num_timesteps):
        t = _step_tensor(x, i)                                                           # (B,)
        out = guided(model_fn, x, diffusion.model_time(t), y, null_label, guidance, channels)
        p = diffusion.p_mean_variance(out, x, t, clip_x0=clip_x0)
        x = p["mean"]
        if i > 0:
            x = x + (0.5 * p["log_variance"]).exp() * _gaussian_noise(x, generator)
    return x


# ---------------------------------------------------------------------------------------------------- rectified flow

@torch.no_grad()
def euler_sample(model_fn: ModelFn, flow: RectifiedFlow, noise: Tensor, y: Optional[Tensor], *, steps: int = 50,
                 guidance: float = 1.0, null_label: Optional[int] = None, clip_x0: bool = False,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> Tensor:
    """Euler steps x <- x + (t_next - t) v_theta(x, t) from t = 1 (noise) to t = 0 on ``steps`` uniform steps
    mapped through the flow's time shift. With ``clip_x0`` the implied x0 = x - t v is clamped to [-1, 1] and v
    recomputed from it. Deterministic: ``generator`` is accepted for a uniform signature and unused."""
    if steps < 1:
        raise ValueError(f"euler_sample needs steps >= 1, got {steps}")
    # The time grid on the host in float64: python floats, so no device tensor is read back in the loop.
    grid = flow.shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).tolist()
    channels = noise.shape[1]
    x = noise
    for i in _progress(range(steps), progress, "euler", steps):
        t, t_next = grid[i], grid[i + 1]
        t_model = flow.model_time(torch.full((x.shape[0],), t, device=x.device))        # (B,)
        v = guided(model_fn, x, t_model, y, null_label, guidance, channels)             # (B, C, H, W)
        if clip_x0:                                                                      # t > 0 on every step
            x0 = (x - t * v).clamp(-1.0, 1.0)
            v = (x - x0) / t
        x = x + (t_next - t) * v
    return x


# ---------------------------------------------------------------------------------------------------------- dispatch

def sample(model_fn: ModelFn, objective: GaussianDiffusion | RectifiedFlow, noise: Tensor, y: Optional[Tensor],
           sampler: Sampler, **options) -> Tensor:
    """Run ``sampler`` for ``objective``: ddim / ddpm for a :class:`GaussianDiffusion`, euler for a
    :class:`RectifiedFlow`; ``options`` go to the sampler (steps, eta, guidance, null_label, clip_x0, generator,
    progress). ``eta`` may be passed (as 0 or None) to every sampler; only ddim uses it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    eta = options.pop("eta", None)                       # DDIM's alone: a caller may pass it for every sampler
    if eta is not None and sampler == "ddim":
        options["eta"] = eta
    elif eta:
        raise ValueError(f"eta={eta} applies to sampler=ddim only; drop it or set it to 0 for sampler={sampler}")
    if sampler == "euler":
        if not isinstance(objective, RectifiedFlow):
            raise ValueError("sampler=euler integrates a rectified flow; with objective=ddpm use sampler=ddim or ddpm")
        return euler_sample(model_fn, objective, noise, y, **options)
    if not isinstance(objective, GaussianDiffusion):
        raise ValueError(f"sampler={sampler} inverts a Gaussian diffusion; with objective=flow use sampler=euler")
    if sampler == "ddim":
        return ddim_sample(model_fn, objective, noise, y, **options)
    return ddpm_sample(model_fn, objective, noise, y, **options)
