"""Samplers of vitlab/tasks/diffusion/samplers.py (issue 7): oracle denoisers for a single data point x* must
land on x*, classifier-free guidance must mix exactly u + s (c - u), and a seeded sampler is deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import SyncRecorder
from vitlab.tasks.diffusion.objectives import GaussianDiffusion, RectifiedFlow
from vitlab.tasks.diffusion.samplers import ddim_sample, ddpm_sample, euler_sample, guided, sample


def target_point(batch: int = 2) -> torch.Tensor:
    """x*: one fixed data point per sample, inside [-1, 1] so clipping never touches it."""
    g = torch.Generator().manual_seed(10)
    return (torch.rand(batch, 3, 4, 4, generator=g) * 1.8 - 0.9)             # (B, 3, 4, 4)


def oracle_eps(base: GaussianDiffusion, x_star: torch.Tensor, learn_sigma: bool = False):
    """The ideal noise predictor when the data is the single point x*: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar),
    abar read at the model's time (the original step, so it also checks model_time after respacing)."""
    abar = base.alphas_cumprod.double()

    def model(x, t_model, y):
        a = abar[t_model.long()].reshape(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x_star.double()) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model


def oracle_velocity(x_star: torch.Tensor):
    """The ideal rectified-flow velocity for the single point x*: (x_t - x*) / t."""

    def model(x, t_model, y):
        t = (t_model / 1000.0).reshape(-1, 1, 1, 1)
        return (x - x_star) / t

    return model


def noise_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ oracle samplers

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_lands_on_the_data_point(schedule):
    base = GaussianDiffusion(schedule, 1000)
    x_star = target_point()
    out = ddim_sample(oracle_eps(base, x_star), base, noise_like(x_star), None, steps=10, eta=0.0)
    assert torch.allclose(out, x_star, atol=1e-4)


def test_ddim_stochastic_also_lands_with_the_oracle():
    base = GaussianDiffusion("linear", 1000)
    x_star = target_point()
    out = ddim_sample(oracle_eps(base, x_star), base, noise_like(x_star), None, steps=10, eta=1.0,
                      generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x_star, atol=1e-3)


def test_ddim_eta0_follows_the_closed_form_trajectory():
    # With the oracle, deterministic DDIM keeps the implied noise fixed: x_{t_i} = sqrt(abar_i) x* + sqrt(1 - abar_i)
    # eps_T, eps_T the noise implied by x_T. Checks every intermediate step, not just the end point.
    base = GaussianDiffusion("linear", 1000)
    x_star = target_point()
    noise = noise_like(x_star)
    oracle = oracle_eps(base, x_star)
    seen = []

    def model(x, t_model, y):
        seen.append((int(t_model[0].item()), x.clone()))
        return oracle(x, t_model, y)

    ddim_sample(model, base, noise, None, steps=6, eta=0.0)
    abar = base.alphas_cumprod.double()
    eps_T = (noise.double() - abar[999].sqrt() * x_star) / (1 - abar[999]).sqrt()
    assert [step for step, _ in seen] == [999, 799, 599, 400, 200, 0]
    for step, x in seen:
        expected = abar[step].sqrt() * x_star + (1 - abar[step]).sqrt() * eps_T
        assert torch.allclose(x.double(), expected, atol=1e-4), step


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("ddpm", None)])
def test_oracle_chains_keep_the_forward_marginals(sampler, eta):
    # DDPM's reverse step with the oracle is the true posterior q(x_{t-1} | x_t, x*), and DDIM keeps the marginals
    # q(x_t | x*) for every eta (DDIM section 4.1): at a middle step the batch must look like
    # N(sqrt(abar) x*, 1 - abar). Catches a wrong noise scale or a wrong mean coefficient in any step.
    base = GaussianDiffusion("linear", 50)
    n = 4000
    x_star = torch.full((n, 1, 1, 1), 0.5)
    oracle = oracle_eps(base, x_star)
    middle = {}

    def model(x, t_model, y):
        if int(t_model[0].item()) == 25:
            middle["x"] = x.clone()
        return oracle(x, t_model, y)

    noise = noise_like(x_star, seed=4)
    generator = torch.Generator().manual_seed(5)
    if sampler == "ddim":
        ddim_sample(model, base, noise, None, steps=50, eta=eta, generator=generator)
    else:
        ddpm_sample(model, base, noise, None, generator=generator)
    abar = base.alphas_cumprod[25].item()
    assert middle["x"].mean().item() == pytest.approx(0.5 * abar ** 0.5, abs=0.05)
    assert middle["x"].var().item() == pytest.approx(1 - abar, rel=0.08)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_lands_on_the_data_point(shift):
    flow = RectifiedFlow(shift=shift)
    x_star = target_point()
    out = euler_sample(oracle_velocity(x_star), flow, noise_like(x_star), None, steps=7)
    assert torch.allclose(out, x_star, atol=1e-5)


def test_euler_steps_on_the_shifted_grid():
    flow = RectifiedFlow(shift=3.0)
    x = torch.zeros(1, 1, 1, 1)
    times = []

    def model(x, t_model, y):
        times.append(t_model[0].item() / 1000)
        return torch.zeros_like(x)

    euler_sample(model, flow, x, None, steps=4)
    uniform = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert times == pytest.approx((3 * uniform / (1 + 2 * uniform)).tolist(), rel=1e-6)


def test_ddpm_full_chain_ends_close_to_the_data_point():
    base = GaussianDiffusion("linear", 200)
    x_star = target_point()
    out = ddpm_sample(oracle_eps(base, x_star), base, noise_like(x_star), None,
                      generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, x_star, atol=1e-3)


def test_ddpm_respaced_with_learned_variance_ends_close_to_the_data_point():
    base = GaussianDiffusion("cosine", 1000, learn_sigma=True)
    x_star = target_point()
    out = ddpm_sample(oracle_eps(base, x_star, learn_sigma=True), base, noise_like(x_star), None, steps=25,
                      generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, x_star, atol=1e-3)


def test_samplers_call_the_model_once_per_step_with_original_times():
    base = GaussianDiffusion("linear", 1000)
    seen = []

    def model(x, t_model, y):
        seen.append(t_model[0].item())
        return torch.zeros_like(x)

    ddim_sample(model, base, torch.zeros(1, 1, 2, 2), None, steps=5)
    assert seen == [999.0, 749.0, 500.0, 250.0, 0.0]                      # descending, in the model's step numbers
    seen.clear()
    ddpm_sample(model, base, torch.zeros(1, 1, 2, 2), None, steps=4)
    assert seen == [999.0, 666.0, 333.0, 0.0]


# ------------------------------------------------------------------------------------------------------- guidance

class ToyConditional(nn.Module):
    """out = x * 0.5 + offset[y]; the null label's offset is 0, so c - u = offset[y] exactly. Counts its calls."""

    def __init__(self, channels: int, num_classes: int = 3, out_mult: int = 1):
        super().__init__()
        self.offsets = torch.arange(num_classes + 1, dtype=torch.float32) + 1.0
        self.offsets[-1] = 0.0                                                 # the null label
        self.out_mult = out_mult
        self.calls: list[int] = []

    def forward(self, x, t_model, y):
        self.calls.append(x.shape[0])
        base = 0.5 * x + (0.0 if y is None else self.offsets[y].reshape(-1, 1, 1, 1))
        if self.out_mult == 1:
            return base
        # the variance channels carry the label too, to see which half they come from
        return torch.cat([base, torch.full_like(x, 0.1) * (0 if y is None else y.reshape(-1, 1, 1, 1))], dim=1)


def test_guided_mixes_conditional_and_unconditional():
    model = ToyConditional(channels=2)
    x = torch.randn(3, 2, 2, 2)
    t = torch.full((3,), 10.0)
    y = torch.tensor([0, 2, 1])
    out = guided(model, x, t, y, null_label=3, scale=4.0, channels=2)
    assert model.calls == [6]                                                 # one batched pass
    u = 0.5 * x
    c = u + (y.float() + 1.0).reshape(-1, 1, 1, 1)
    assert torch.allclose(out, u + 4.0 * (c - u))


def test_guided_scale_one_or_no_labels_is_one_plain_call():
    x = torch.randn(2, 1, 2, 2)
    t = torch.zeros(2)
    for y, null, scale in [(torch.tensor([1, 2]), 3, 1.0), (None, 3, 4.0), (torch.tensor([1, 2]), None, 4.0)]:
        model = ToyConditional(channels=1)
        out = guided(model, x, t, y, null_label=null, scale=scale, channels=1)
        assert model.calls == [2]
        assert torch.equal(out, model(x, t, y))


def test_guided_takes_the_variance_from_the_conditional_half():
    model = ToyConditional(channels=2, out_mult=2)
    x = torch.randn(2, 2, 2, 2)
    y = torch.tensor([1, 2])
    out = guided(model, x, torch.zeros(2), y, null_label=3, scale=2.0, channels=2)
    assert out.shape == (2, 4, 2, 2)
    assert torch.allclose(out[:, 2:], 0.1 * y.float().reshape(-1, 1, 1, 1).expand(2, 2, 2, 2))
    assert torch.allclose(out[:, :2], 0.5 * x + 2.0 * (y.float() + 1).reshape(-1, 1, 1, 1))


def test_samplers_guide_every_step():
    model = ToyConditional(channels=1)
    x = torch.zeros(2, 1, 2, 2)
    ddim_sample(model, GaussianDiffusion("linear", 100), x, torch.tensor([0, 1]), steps=5, guidance=3.0,
                null_label=3)
    assert model.calls == [4] * 5
    model.calls.clear()
    euler_sample(model, RectifiedFlow(), x, torch.tensor([0, 1]), steps=3, guidance=1.0, null_label=3)
    assert model.calls == [2] * 3


# ---------------------------------------------------------------------------------------------------- determinism

class TinyConv(nn.Module):
    def __init__(self, out_mult: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3 * out_mult, 3, padding=1)

    def forward(self, x, t_model, y):
        return torch.tanh(self.conv(x) + t_model.reshape(-1, 1, 1, 1) / 1000)


RUNS = {
    "ddim_eta0": lambda m, n, g: ddim_sample(m, GaussianDiffusion("linear", 100), n, None, steps=8, eta=0.0,
                                             generator=g),
    "ddim_eta1": lambda m, n, g: ddim_sample(m, GaussianDiffusion("linear", 100), n, None, steps=8, eta=1.0,
                                             generator=g),
    "ddpm": lambda m, n, g: ddpm_sample(m, GaussianDiffusion("cosine", 100), n, None, steps=10, generator=g),
    "euler": lambda m, n, g: euler_sample(m, RectifiedFlow(shift=2.0), n, None, steps=8, generator=g),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_seeded_samplers_are_deterministic(name):
    model = TinyConv()
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    first = RUNS[name](model, noise.clone(), torch.Generator().manual_seed(1))
    torch.randn(10)                                                          # global RNG state must not matter
    second = RUNS[name](model, noise.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    other_noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(RUNS[name](model, other_noise, torch.Generator().manual_seed(1)), first)
    if name in ("ddim_eta1", "ddpm"):                                         # the noise they add follows the seed
        assert not torch.allclose(RUNS[name](model, noise.clone(), torch.Generator().manual_seed(2)), first)
    else:                                                                     # deterministic: the seed is unused
        assert torch.equal(RUNS[name](model, noise.clone(), torch.Generator().manual_seed(2)), first)


def test_sampler_loops_never_sync_the_host():
    model = TinyConv(out_mult=2)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    learned = GaussianDiffusion("linear", 50, learn_sigma=True).respace(10)   # respace before: it builds on the host
    y = torch.tensor([0, 1])
    conv = TinyConv()
    with SyncRecorder() as rec:
        ddim_sample(model, learned, noise, y, steps=10, eta=1.0, guidance=2.0, null_label=2,
                    generator=torch.Generator().manual_seed(1))
        ddpm_sample(model, learned, noise, y, steps=None, guidance=2.0, null_label=2,
                    generator=torch.Generator().manual_seed(1))
        euler_sample(conv, RectifiedFlow(shift=3.0), noise, y, steps=5, guidance=2.0, null_label=2, clip_x0=True)
    assert rec.seen == []


# ------------------------------------------------------------------------------------------------------- dispatch

def test_sample_dispatches_and_matches_direct_calls():
    model = TinyConv()
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    diffusion = GaussianDiffusion("linear", 100)
    assert torch.equal(sample(model, diffusion, noise, None, "ddim", steps=5, eta=0.0),
                       ddim_sample(model, diffusion, noise, None, steps=5))
    via_sample = sample(model, diffusion, noise, None, "ddpm", steps=5, generator=torch.Generator().manual_seed(1))
    direct = ddpm_sample(model, diffusion, noise, None, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(via_sample, direct)
    flow = RectifiedFlow()
    assert torch.equal(sample(model, flow, noise, None, "euler", steps=4, eta=0.0),
                       euler_sample(model, flow, noise, None, steps=4))


def test_sample_rejects_wrong_pairings_with_the_fix():
    model = TinyConv()
    noise = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sampler=euler integrates a rectified flow.*use sampler=ddim or ddpm"):
        sample(model, GaussianDiffusion("linear", 10), noise, None, "euler")
    for sampler in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match="use sampler=euler"):
            sample(model, RectifiedFlow(), noise, None, sampler)
    with pytest.raises(ValueError, match="choose ddim, ddpm, euler"):
        sample(model, RectifiedFlow(), noise, None, "heun")
    with pytest.raises(ValueError, match="eta=0.5 applies to sampler=ddim only"):
        sample(model, RectifiedFlow(), noise, None, "euler", eta=0.5)


def test_progress_bar_runs(capsys):
    out = ddim_sample(TinyConv(), GaussianDiffusion("linear", 20), torch.zeros(1, 3, 8, 8), None, steps=3,
                      progress=True)
    assert out.shape == (1, 3, 8, 8)
