"""Noise-schedule maths and training losses of vitlab/tasks/diffusion/objectives.py (issue 7): every number is
checked against a closed form computed here by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from vitlab.tasks.diffusion.objectives import (GaussianDiffusion, RectifiedFlow, beta_schedule,
                                               discretized_gaussian_log_likelihood, space_timesteps)


def linear_betas(T: int) -> list[float]:
    """DDPM's linear schedule by hand: linspace(1e-4, 0.02) scaled by 1000 / T."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def linear_alpha_bar(t: int, T: int = 1000) -> float:
    return math.prod(1.0 - b for b in linear_betas(T)[: t + 1])


def cosine_f(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


# ------------------------------------------------------------------------------------------------------- schedules

def test_linear_schedule_endpoints_and_alpha_bar():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    diffusion = GaussianDiffusion("linear", 1000)
    alpha_bar = diffusion.alphas_cumprod.double()
    assert alpha_bar[-1].item() == pytest.approx(linear_alpha_bar(999), rel=1e-5)
    assert alpha_bar[-1].item() == pytest.approx(4.0e-5, rel=0.02)          # the value quoted by improved DDPM
    for t in (0, 10, 500):
        assert alpha_bar[t].item() == pytest.approx(linear_alpha_bar(t), rel=1e-5)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())


def test_linear_schedule_scales_with_T():
    betas = beta_schedule("linear", 250)
    assert betas[0].item() == pytest.approx(1e-4 * 4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * 4, rel=1e-12)
    assert torch.allclose(betas, torch.tensor(linear_betas(250), dtype=torch.float64), rtol=1e-12, atol=0)


def test_cosine_schedule_matches_cos2():
    T = 1000
    diffusion = GaussianDiffusion("cosine", T)
    alpha_bar = diffusion.alphas_cumprod.double()
    # alphas_cumprod[t - 1] = alpha_bar(t) = f(t / T) / f(0), until the 0.999 clip bites at the very end
    for t in (1, 100, 250, 500, 750, 900):
        assert alpha_bar[t - 1].item() == pytest.approx(cosine_f(t / T) / cosine_f(0.0), rel=1e-5)
    betas = beta_schedule("cosine", T)
    assert betas.max().item() == pytest.approx(0.999)                        # clipped, not 1 at t = T
    assert bool((betas <= 0.999).all())
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        beta_schedule("quadratic", 10)


def test_schedule_buffers_float32_not_in_checkpoint_and_survive_casts():
    diffusion = GaussianDiffusion("linear", 1000)
    assert diffusion.alphas_cumprod.dtype == torch.float32
    assert diffusion.state_dict() == {}                                      # non-persistent: not in checkpoints
    reference = diffusion.alphas_cumprod.clone()
    diffusion.to(torch.bfloat16)                                             # e.g. "bf16-true" precision
    assert diffusion.alphas_cumprod.dtype == torch.float32
    assert torch.equal(diffusion.alphas_cumprod, reference)
    assert diffusion.timestep_map.dtype == torch.long


# ------------------------------------------------------------------------------------------------ forward process

def test_q_sample_moments_match_closed_form():
    diffusion = GaussianDiffusion("linear", 1000)
    t_step = 300
    abar = linear_alpha_bar(t_step)
    n = 20000
    x0 = torch.tensor([0.5, -0.3, 0.9, -1.0]).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x_t = diffusion.q_sample(x0, torch.full((n,), t_step), noise)
    assert torch.allclose(x_t.mean(0), math.sqrt(abar) * x0[0], atol=0.02)
    assert torch.allclose(x_t.var(0), torch.full_like(x_t[0], 1 - abar), rtol=0.04)


@pytest.mark.parametrize("schedule, last", [("linear", 999), ("cosine", 900)])
def test_predict_x0_and_eps_invert_q_sample(schedule, last):
    # float32 x_t carries ~1e-7 relative error, amplified by 1 / sqrt(alpha_bar): 158x at the linear schedule's
    # last step, ~2e4x at the cosine one's (alpha_bar ~ 2e-9) - so the cosine check stops at t = 900
    diffusion = GaussianDiffusion(schedule, 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 400, 800, last])
    x_t = diffusion.q_sample(x0, t, noise)
    assert torch.allclose(diffusion.predict_x0_from_eps(x_t, t, noise), x0, atol=1e-4)
    assert torch.allclose(diffusion.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-4)


def test_q_posterior_matches_hand_computation():
    diffusion = GaussianDiffusion("linear", 1000)
    t_step = 10
    beta = linear_betas(1000)[t_step]
    abar, abar_prev = linear_alpha_bar(t_step), linear_alpha_bar(t_step - 1)
    x0 = torch.tensor([[[[0.25, -0.75]]]])
    x_t = torch.tensor([[[[0.4, 0.1]]]])
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, torch.tensor([t_step]))
    coef1 = beta * math.sqrt(abar_prev) / (1 - abar)                          # DDPM eq. 7
    coef2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
    expected_var = beta * (1 - abar_prev) / (1 - abar)
    assert torch.allclose(mean, coef1 * x0 + coef2 * x_t, rtol=1e-5)
    assert torch.allclose(variance, torch.full_like(x0, expected_var), rtol=1e-5)
    assert torch.allclose(log_variance, torch.full_like(x0, math.log(expected_var)), rtol=1e-5)


def test_posterior_log_variance_clipped_at_t0():
    diffusion = GaussianDiffusion("linear", 1000)
    assert diffusion.posterior_variance[0].item() == 0.0                    # beta~_0 = 0
    x = torch.zeros(1, 1, 1, 1)
    _, variance, log_variance = diffusion.q_posterior(x, x, torch.tensor([0]))
    assert variance.item() == 0.0
    assert torch.isfinite(log_variance).all()
    assert log_variance.item() == pytest.approx(math.log(diffusion.posterior_variance[1].item()), rel=1e-6)


# ----------------------------------------------------------------------------------------- variance and the bound

def test_learned_variance_interpolates_between_posterior_and_beta():
    diffusion = GaussianDiffusion("linear", 1000, learn_sigma=True)
    t = torch.tensor([5, 500])
    x = torch.zeros(2, 1, 2, 2)
    log_beta = torch.tensor(linear_betas(1000))[t].log().float().reshape(2, 1, 1, 1)
    ones = torch.ones_like(x)
    assert torch.allclose(diffusion.model_log_variance(ones, x, t), log_beta.expand_as(x), rtol=1e-6)  # frac = 1
    low = diffusion.posterior_log_variance_clipped[t].reshape(2, 1, 1, 1)
    assert torch.allclose(diffusion.model_log_variance(-ones, x, t), low.expand_as(x))                  # frac = 0
    mid = diffusion.model_log_variance(torch.zeros_like(x), x, t)
    assert torch.allclose(mid, ((log_beta + low) / 2).expand_as(x), rtol=1e-6)
    out = diffusion.p_mean_variance(torch.cat([x, ones], dim=1), x, t)
    assert torch.allclose(out["variance"], log_beta.exp().expand_as(x), rtol=1e-5)


def test_vb_is_zero_for_the_true_posterior_and_the_kl_otherwise():
    diffusion = GaussianDiffusion("linear", 1000, learn_sigma=True)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 2, 4, 4, generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    v_posterior = -torch.ones_like(x0)                                       # frac = 0: the posterior variance
    vb = diffusion.vb_terms_bpd(torch.cat([noise, v_posterior], dim=1), x0, x_t, t)
    assert torch.allclose(vb, torch.zeros(4), atol=1e-4)
    # a mean off by d under the same variance: KL = d^2 / (2 var) nats per dimension
    t1 = torch.tensor([500])
    d = 0.01
    x0_1, noise_1 = x0[:1], noise[:1]
    x_t1 = diffusion.q_sample(x0_1, t1, noise_1)
    coef1 = diffusion.posterior_mean_coef1[500].item()
    eps_shift = -d / coef1 / diffusion.sqrt_recipm1_alphas_cumprod[500].item()   # moves the mean by exactly d
    vb1 = diffusion.vb_terms_bpd(torch.cat([noise_1 + eps_shift, v_posterior[:1]], dim=1), x0_1, x_t1, t1)
    expected = d ** 2 / (2 * diffusion.posterior_variance[500].item()) / math.log(2)
    assert vb1.item() == pytest.approx(expected, rel=1e-3)


def test_decoder_nll_matches_gaussian_bin_mass():
    x = torch.tensor([-1.0, -0.2, 0.5, 1.0])
    mean = torch.tensor([-0.95, -0.21, 0.48, 0.9])
    log_scale = torch.log(torch.tensor([0.05, 0.02, 0.1, 0.2]))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    s, m = log_scale.exp().double().numpy(), mean.double().numpy()
    xs = x.double().numpy()
    expected = [norm.cdf((xs[0] + 1 / 255 - m[0]) / s[0]),                  # the lowest bin reaches to -inf
                norm.cdf((xs[1] + 1 / 255 - m[1]) / s[1]) - norm.cdf((xs[1] - 1 / 255 - m[1]) / s[1]),
                norm.cdf((xs[2] + 1 / 255 - m[2]) / s[2]) - norm.cdf((xs[2] - 1 / 255 - m[2]) / s[2]),
                1 - norm.cdf((xs[3] - 1 / 255 - m[3]) / s[3])]              # the highest to +inf
    assert torch.allclose(got.double(), torch.log(torch.tensor(expected)), rtol=1e-4)


def test_vb_at_t0_is_the_decoder_nll():
    diffusion = GaussianDiffusion("linear", 1000, learn_sigma=True)
    x0 = (torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(3)) / 255.0) * 2 - 1
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0])
    x_t = diffusion.q_sample(x0, t, noise)
    v = torch.full_like(x0, 0.3)
    vb = diffusion.vb_terms_bpd(torch.cat([noise, v], dim=1), x0, x_t, t)
    p = diffusion.p_mean_variance(torch.cat([noise, v], dim=1), x_t, t, clip_x0=False)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean() / math.log(2)
    assert vb.item() == pytest.approx(nll.item(), rel=1e-6)
    assert vb.item() > 0


# ---------------------------------------------------------------------------------------------- training losses

def test_training_losses_mse_and_model_time():
    diffusion = GaussianDiffusion("linear", 1000)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 7, 999])
    seen = {}

    def zero_model(x, t_model, y):
        seen["t"], seen["y"] = t_model, y
        return torch.zeros_like(x)

    y = torch.tensor([1, 2, 0])
    losses = diffusion.training_losses(zero_model, x0, t, noise, y)
    assert set(losses) == {"loss", "mse"}
    assert torch.allclose(losses["mse"], (noise ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(losses["loss"], losses["mse"])
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], t.float())
    assert torch.equal(seen["y"], y)
    perfect = diffusion.training_losses(lambda x, tm, y: noise, x0, t, noise)
    assert torch.allclose(perfect["loss"], torch.zeros(3))


def test_hybrid_loss_stops_the_gradient_of_the_mean_through_vb():
    diffusion = GaussianDiffusion("linear", 100, learn_sigma=True)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn(2, 1, 4, 4)
    out = torch.zeros(2, 2, 4, 4, requires_grad=True)
    losses = diffusion.training_losses(lambda x, tm, y: out, x0, torch.tensor([3, 60]), noise)
    assert set(losses) == {"loss", "mse", "vb"}
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert torch.count_nonzero(grad[:, :1]) == 0                             # eps channels: stop-gradient
    assert torch.count_nonzero(grad[:, 1:]) > 0                              # variance channels: trained by vb


def test_wrong_channel_count_names_the_fix():
    x0 = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="learn_sigma=true"):
        GaussianDiffusion("linear", 10, learn_sigma=True).training_losses(
            lambda x, tm, y: torch.zeros_like(x), x0, torch.tensor([1]), x0)
    with pytest.raises(ValueError, match="learn_sigma=false"):
        RectifiedFlow().training_losses(lambda x, tm, y: torch.zeros(1, 6, 4, 4), x0, torch.tensor([0.5]), x0)


# --------------------------------------------------------------------------------------------------- respacing

def test_space_timesteps_evenly_spaced():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(10, 10) == list(range(10))
    assert space_timesteps(1000, 1) == [0]
    with pytest.raises(ValueError, match="1 <= steps <= 100"):
        space_timesteps(100, 101)


def test_respace_keeps_alpha_bar_and_maps_time():
    base = GaussianDiffusion("cosine", 1000, learn_sigma=True)
    small = base.respace(10)
    kept = torch.tensor([0, 111, 222, 333, 444, 555, 666, 777, 888, 999])
    assert small.num_timesteps == 10 and small.learn_sigma
    assert torch.equal(small.timestep_map, kept)
    assert torch.allclose(small.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-6, atol=0)
    abar = torch.cumprod(1 - beta_schedule("cosine", 1000), dim=0)[kept]   # float64, as the class computes it
    expected_betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert torch.allclose(small.betas.double(), expected_betas, rtol=1e-5)
    assert torch.equal(small.model_time(torch.tensor([0, 3, 9])), torch.tensor([0.0, 333.0, 999.0]))
    smaller = small.respace(4)                                               # respacing a respaced copy composes
    assert torch.equal(smaller.timestep_map, kept[[0, 3, 6, 9]])
    assert torch.allclose(smaller.alphas_cumprod, base.alphas_cumprod[kept[[0, 3, 6, 9]]], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------- rectified flow

def test_logit_normal_times():
    g = torch.Generator().manual_seed(5)
    t = RectifiedFlow("logit_normal").sample_timesteps(20000, "cpu", generator=g)
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert bool(((t > 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    assert t.std().item() < 1 / math.sqrt(12)                                # concentrated in the middle vs uniform
    shifted = RectifiedFlow("logit_normal", shift=3.0).sample_timesteps(20000, "cpu", generator=g)
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)          # 3 * 0.5 / (1 + 2 * 0.5)
    assert shifted.mean().item() > t.mean().item() + 0.1
    moved = RectifiedFlow("logit_normal", logit_mean=1.0).sample_timesteps(20000, "cpu", generator=g)
    assert moved.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.02)


def test_uniform_times_and_shift_map():
    g = torch.Generator().manual_seed(6)
    t = RectifiedFlow("uniform").sample_timesteps(20000, "cpu", generator=g)
    assert bool(((t >= 0) & (t < 1)).all())
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    flow = RectifiedFlow(shift=3.0)
    grid = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(flow.shift_time(grid), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_flow_interpolation_and_velocity_loss():
    flow = RectifiedFlow()
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn(2, 1, 4, 4)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(2)), noise)
    half = flow.interpolate(x0, noise, torch.full((2,), 0.25))
    assert torch.allclose(half, 0.75 * x0 + 0.25 * noise)
    t = torch.tensor([0.2, 0.9])
    seen = {}

    def oracle(x, t_model, y):
        seen["t"] = t_model
        return noise - x0

    losses = flow.training_losses(oracle, x0, t, noise)
    assert torch.allclose(losses["loss"], torch.zeros(2))
    assert torch.allclose(seen["t"], torch.tensor([200.0, 900.0]))
    zero = flow.training_losses(lambda x, tm, y: torch.zeros_like(x), x0, t, noise)
    assert torch.allclose(zero["mse"], ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------------------- a tiny model learns

class TinyDenoiser(nn.Module):
    """An MLP on flattened 8x8 images with a sinusoidal time input: enough to memorise two images."""

    def __init__(self, pixels: int = 64, out_mult: int = 1, hidden: int = 128):
        super().__init__()
        self.out_mult = out_mult
        self.net = nn.Sequential(nn.Linear(pixels + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, pixels * out_mult))

    def forward(self, x, t_model, y=None):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)           # (8,)
        angles = t_model[:, None] / 1000.0 * 50.0 * freqs                    # (B, 8)
        h = torch.cat([x.flatten(1), angles.sin(), angles.cos()], dim=1)
        return self.net(h).reshape(x.shape[0], x.shape[1] * self.out_mult, *x.shape[2:])


@pytest.mark.parametrize("objective", ["ddpm", "ddpm_learned", "flow"])
def test_tiny_model_training_reduces_the_loss(objective):
    torch.manual_seed(0)
    if objective == "flow":
        obj = RectifiedFlow()
    else:
        obj = GaussianDiffusion("linear", 100, learn_sigma=objective == "ddpm_learned")
    model = TinyDenoiser(out_mult=2 if objective == "ddpm_learned" else 1)
    images = torch.stack([torch.linspace(-1, 1, 64).reshape(1, 8, 8), -torch.ones(1, 8, 8)])   # (2, 1, 8, 8)
    g = torch.Generator().manual_seed(7)
    x_eval = images.repeat(64, 1, 1, 1)                                      # (128, 1, 8, 8) fixed evaluation draws
    t_eval = obj.sample_timesteps(128, "cpu", generator=g)
    noise_eval = torch.randn(x_eval.shape, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return obj.training_losses(model, x_eval, t_eval, noise_eval)["mse"].mean().item()

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        x0 = images.repeat(16, 1, 1, 1)                                      # (32, 1, 8, 8)
        t = obj.sample_timesteps(32, "cpu", generator=g)
        loss = obj.training_losses(model, x0, t, torch.randn(x0.shape, generator=g))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
