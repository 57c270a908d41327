"""Diffusion training objectives: the noise-schedule maths and the per-sample losses.

- :class:`GaussianDiffusion`: DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") with the options of
  improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"): the cosine schedule,
  a learned variance trained with the hybrid loss (mse + variational bound) and respacing to fewer sampling steps.
- :class:`RectifiedFlow`: rectified flow / flow matching (Liu et al. 2023, "Flow Straight and Fast"; Lipman et al.
  2023, "Flow Matching for Generative Modeling") with SD3's logit-normal timestep sampling and time shift (Esser et
  al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

Both work on images (or latents) in [-1, 1] and call a denoiser as ``model_fn(x_t, model_time(t), y)``; the
samplers that run them backwards are in vitlab/tasks/diffusion/samplers.py. Pure torch.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

Schedule = Literal["linear", "cosine"]
TimeSampling = Literal["logit_normal", "uniform"]
ModelFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]

SCHEDULES = ("linear", "cosine")
TIME_SAMPLINGS = ("logit_normal", "uniform")


# ----------------------------------------------------------------------------------------------------------- helpers

def beta_schedule(name: Schedule, num_timesteps: int) -> Tensor:
    """The betas of a named schedule, float64 (T,).

    ``linear``: DDPM's linspace(1e-4, 0.02) for T = 1000; for other T both ends are scaled by 1000 / T so the
    total noise stays comparable (improved DDPM's ``get_named_beta_schedule``). ``cosine``: improved DDPM's
    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) with s = 0.008, betas = 1 - alpha_bar(t+1) / alpha_bar(t)
    clipped at 0.999 (the last steps would otherwise be singular).
    """
    if num_timesteps < 1:
        raise ValueError(f"a diffusion needs num_timesteps >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps      # (T+1,) t / T
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2                  # (T+1,) f(t)
        return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {name!r}; choose {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced steps of ``range(num_timesteps)``, the first and the last included (improved DDPM's
    ``space_timesteps`` with a single section)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} diffusion steps to {steps}: "
                         f"choose 1 <= steps <= {num_timesteps}")
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian integrated over each pixel's bin of width 2 / 255, the
    two end bins reaching to -inf / +inf (DDPM's decoder, improved DDPM's ``discretized_gaussian_log_likelihood``).
    Elementwise, in nats; the exact normal CDF (``torch.special``) replaces the tanh approximation."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)                             # the bin [-inf, x + 1/255]
    log_sf_lower = torch.special.log_ndtr(-lower)                             # the bin [x - 1/255, +inf]
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin = torch.log(bin_mass.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def _broadcast(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped (B, 1, ..., 1) to broadcast against ``like`` (B, C, H, W); a gather, no host sync."""
    out = values[t]                                                           # (B,)
    return out.reshape(out.shape + (1,) * (like.ndim - 1))


def _check_channels(out: Tensor, x: Tensor, expected: int, fix: str) -> None:
    if out.shape[1] != expected:
        raise ValueError(f"the denoiser returned {out.shape[1]} channels for {x.shape[1]}-channel inputs; "
                         f"expected {expected}: {fix}")


# ------------------------------------------------------------------------------------------------------------- DDPM

class GaussianDiffusion(nn.Module):
    """DDPM's forward process q(x_t | x_0) and reverse-step maths, with improved DDPM's options.

    The denoiser predicts the noise eps. With ``learn_sigma`` it returns 2C channels: eps, then v in [-1, 1] that
    interpolates the log variance between the posterior's and beta_t (improved DDPM eq. 15). Without it the
    variance is improved DDPM's "fixed small": the posterior variance beta~_t (its log clipped at t = 0, where
    beta~_0 = 0).

    ``timestep_map`` (from :meth:`respace`): this diffusion runs on the original schedule's steps
    ``timestep_map`` only (betas recomputed from alpha_bar there); ``model_time`` maps its step i back to the step
    number the model was trained on. ``num_timesteps`` is then the number of kept steps.

    The schedule is computed in float64 and kept as float32 non-persistent buffers: checkpoints do not carry them,
    ``.to(device)`` moves them, and a cast of the module (``.to(torch.bfloat16)``, "bf16-true" training) leaves
    them float32 (see :meth:`_apply`).
    """

    def __init__(self, schedule: Schedule = "linear", num_timesteps: int = 1000, learn_sigma: bool = False,
                 timestep_map: Optional[Tensor] = None):
        super().__init__()
        with torch.device("cpu"):         # host maths, also when a model is built under `with torch.device("meta")`
            self._build(schedule, num_timesteps, learn_sigma, timestep_map)

    def _build(self, schedule: Schedule, num_timesteps: int, learn_sigma: bool, timestep_map: Optional[Tensor]) -> None:
        base_betas = beta_schedule(schedule, num_timesteps)                   # (T0,) float64
        base_alpha_bar = torch.cumprod(1.0 - base_betas, dim=0)
        if timestep_map is None:
            timestep_map = torch.arange(num_timesteps)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        increasing = bool((timestep_map[1:] > timestep_map[:-1]).all())
        if timestep_map.ndim != 1 or len(timestep_map) == 0 or not increasing \
                or int(timestep_map[0]) < 0 or int(timestep_map[-1]) >= num_timesteps:
            raise ValueError(f"timestep_map must be increasing steps in [0, {num_timesteps}); "
                             "build respaced diffusions with GaussianDiffusion.respace(steps)")
        self.schedule = schedule
        self.base_timesteps = num_timesteps
        self.num_timesteps = len(timestep_map)
        self.learn_sigma = learn_sigma

        # Respacing keeps alpha_bar at the kept steps: beta_i = 1 - alpha_bar(s_i) / alpha_bar(s_{i-1}).
        alpha_bar = base_alpha_bar[timestep_map]                              # (T,)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])   # (T,) alpha_bar_{t-1}, 1 at t = 0
        betas = 1.0 - alpha_bar / alpha_bar_prev
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # beta~_0 = 0: log(0) would be -inf, so t = 0 borrows beta~_1 (improved DDPM); one step has only beta_0.
        first = posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        schedule64 = {
            "betas": betas,
            "alphas_cumprod": alpha_bar,
            "alphas_cumprod_prev": alpha_bar_prev,
            "sqrt_alphas_cumprod": alpha_bar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alpha_bar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alpha_bar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alpha_bar - 1.0).sqrt(),
            "log_betas": betas.log(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.cat([first, posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_mean_coef2": (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar),
        }
        self._schedule64 = schedule64                    # host copies in float64: the source of every re-cast
        self._host_timestep_map = timestep_map           # so respace never reads the device back
        for name, value in schedule64.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.register_buffer("timestep_map", timestep_map, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Module.to / .half() / .bfloat16() cast floating buffers too; the schedule's small numbers (alpha_bar ~ 4e-5
        # at T, 1 - alpha_bar ~ 1e-4 at 0) must stay float32 whatever precision the network trains in.
        super()._apply(fn, recurse)
        for name, value in self._schedule64.items():
            self._buffers[name] = value.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        respaced = f", respaced from {self.base_timesteps}" if self.num_timesteps != self.base_timesteps else ""
        return (f"schedule={self.schedule}, num_timesteps={self.num_timesteps}{respaced}, "
                f"learn_sigma={self.learn_sigma}")

    # -- time -------------------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training steps, uniform in [0, T): long (B,)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def model_time(self, t: Tensor) -> Tensor:
        """The step the model sees: the original schedule's step number (respacing maps it back), float (B,)."""
        return self.timestep_map[t].float()

    # -- forward process ----------------------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise: a draw of q(x_t | x_0)."""
        return (_broadcast(self.sqrt_alphas_cumprod, t, x0) * x0
                + _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert :meth:`q_sample`: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (_broadcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _broadcast(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that takes x_0 to x_t: eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
        return ((_broadcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / _broadcast(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t): mean, variance, log variance (clipped)."""
        mean = (_broadcast(self.posterior_mean_coef1, t, x_t) * x0
                + _broadcast(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = _broadcast(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _broadcast(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- reverse process ----------------------------------------------------------------------------------------------
    def split_output(self, model_out: Tensor, x_t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(eps, v): the model's noise prediction and, with ``learn_sigma``, its variance value v in [-1, 1]."""
        channels = x_t.shape[1]
        if self.learn_sigma:
            _check_channels(model_out, x_t, 2 * channels, "learn_sigma=true needs a denoiser built with "
                            "learn_sigma=true (eps and the variance, 2C channels)")
            eps, v = model_out.split(channels, dim=1)                         # (B, C, H, W) each
            return eps, v
        _check_channels(model_out, x_t, channels, "a fixed-variance diffusion needs a denoiser built with "
                        "learn_sigma=false, or set the objective's learn_sigma=true")
        return model_out, None

    def model_log_variance(self, v: Optional[Tensor], x_t: Tensor, t: Tensor) -> Tensor:
        """log Sigma_theta: fixed small (log beta~_t, clipped) or, given v, improved DDPM's interpolation
        frac * log beta_t + (1 - frac) * log beta~_t with frac = (v + 1) / 2."""
        min_log = _broadcast(self.posterior_log_variance_clipped, t, x_t)
        if v is None:
            return min_log.expand_as(x_t)
        max_log = _broadcast(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, t: Tensor, clip_x0: bool = True) -> dict[str, Tensor]:
        """p_theta(x_{t-1} | x_t) from the model's output: ``mean``, ``variance``, ``log_variance``, ``x0`` (the
        predicted x_0, clamped to [-1, 1] when ``clip_x0``) and ``eps`` (the model's noise prediction, as given)."""
        eps, v = self.split_output(model_out, x_t)
        log_variance = self.model_log_variance(v, x_t, t)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "x0": x0, "eps": eps}

    # -- losses -------------------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The variational bound's term at step t, bits/dim (B,): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
        t > 0, the discretised-Gaussian decoder's negative log-likelihood of x_0 at t = 0 (DDPM's L_0)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t, clip_x0=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor,
                        y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-sample losses (B,): ``mse`` (eps-prediction, mean over C, H, W), with ``learn_sigma`` also ``vb``
        (the bound's term with the mean's gradient stopped, so it trains only the variance) added unscaled to
        ``loss``: improved DDPM's hybrid loss as DiT trains it (its LossType.MSE)."""
        x_t = self.q_sample(x0, t, noise)                                     # (B, C, H, W)
        model_out = model_fn(x_t, self.model_time(t), y)                      # (B, C or 2C, H, W)
        eps, v = self.split_output(model_out, x_t)
        mse = mean_flat((noise - eps) ** 2)                                   # (B,)
        if v is None:
            return {"loss": mse, "mse": mse}
        # Stop-gradient on eps: the bound only steers the variance; the mean learns from the mse alone.
        vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def respace(self, steps: int) -> "GaussianDiffusion":
        """A copy running on ``steps`` evenly spaced steps of this one (for sampling with fewer steps); alpha_bar is
        unchanged at the kept steps, and ``model_time`` still returns the steps the model was trained on."""
        kept = space_timesteps(self.num_timesteps, steps)
        timestep_map = self._host_timestep_map[kept]                          # compose with an earlier respacing
        return GaussianDiffusion(self.schedule, self.base_timesteps, self.learn_sigma,
                                 timestep_map=timestep_map).to(self.betas.device)


# ---------------------------------------------------------------------------------------------------- rectified flow

class RectifiedFlow(nn.Module):
    """Rectified flow: x_t = (1 - t) x_0 + t noise on t in [0, 1] (t = 1 is pure noise); the model predicts the
    velocity v = noise - x_0 (dx_t / dt). Training times are SD3's logit-normal, sigmoid(N(logit_mean, logit_std)),
    which weights the middle of the path, or uniform; ``shift`` s > 1 then moves them towards the noise end,
    t -> s t / (1 + (s - 1) t) (SD3's resolution-dependent shift; samplers use the same map)."""

    def __init__(self, t_sampling: TimeSampling = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0):
        super().__init__()
        if t_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown flow time sampling {t_sampling!r}; choose {', '.join(TIME_SAMPLINGS)}")
        if logit_std <= 0:
            raise ValueError(f"the flow's logit_std must be > 0, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"the flow's time shift must be > 0 (1 = no shift), got {shift}")
        self.t_sampling = t_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift

    def extra_repr(self) -> str:
        return (f"t_sampling={self.t_sampling}, logit_mean={self.logit_mean}, logit_std={self.logit_std}, "
                f"shift={self.shift}")

    def shift_time(self, t: Tensor) -> Tensor:
        """SD3's time shift s t / (1 + (s - 1) t): keeps 0 and 1, moves the rest towards 1 for s > 1."""
        if self.shift == 1.0:
            return t
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training times, float (B,) in (0, 1), shifted."""
        if self.t_sampling == "logit_normal":
            u = torch.randn(batch, device=device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        else:
            t = torch.rand(batch, device=device, generator=generator)
        return self.shift_time(t)

    def model_time(self, t: Tensor) -> Tensor:
        """The time the model sees: t * 1000, the range of DDPM's step numbers (DiT's sinusoidal embedding)."""
        return t.float() * 1000.0

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t noise, t (B,) broadcast over (B, C, H, W)."""
        t = t.reshape(t.shape + (1,) * (x0.ndim - 1)).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def training_losses(self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor,
                        y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Per-sample velocity regression (B,): ``loss`` = ``mse`` = mean over C, H, W of (v_theta - (noise - x0))^2."""
        x_t = self.interpolate(x0, noise, t)                                  # (B, C, H, W)
        velocity = model_fn(x_t, self.model_time(t), y)                       # (B, C, H, W)
        _check_channels(velocity, x0, x0.shape[1], "a rectified flow predicts a velocity: build the denoiser "
                        "with learn_sigma=false")
        mse = mean_flat((velocity - (noise - x0)) ** 2)
        return {"loss": mse, "mse": mse}
