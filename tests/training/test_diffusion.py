"""Gaussian diffusion against independent closed forms (Bayes on Gaussians, torch.distributions,
Monte-Carlo statistics, an analytic optimal denoiser)."""
import math

import numpy as np
import pytest
import torch

from training.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl,
                                space_timesteps)


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion()


def test_schedule(diff):
    assert diff.num_timesteps == 1000
    assert diff.betas[0] == pytest.approx(1e-4) and diff.betas[-1] == pytest.approx(0.02)
    t = 537
    prod = 1.0
    for i in range(t + 1):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert diff.alphas_cumprod[t] == pytest.approx(prod, rel=1e-12)
    assert diff.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=0.01)  # known value of this schedule


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_equals_bayes(diff, t):
    """q(x_{t-1}|x_t,x_0) by Bayes: prior N(sqrt(acp_{t-1}) x0, 1-acp_{t-1}) times likelihood
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    x0, xt = torch.tensor([[0.7]]), torch.tensor([[-0.3]])
    a_prev = diff.alphas_cumprod[t - 1]
    beta = 1e-4 + (0.02 - 1e-4) * t / 999
    prec = 1 / (1 - a_prev) + (1 - beta) / beta
    var = 1 / prec
    mean = var * (math.sqrt(a_prev) * 0.7 / (1 - a_prev) + math.sqrt(1 - beta) * -0.3 / beta)
    m, v, logv = diff.q_posterior(x0, xt, torch.tensor([t]))
    assert m.item() == pytest.approx(mean, rel=1e-5)
    assert v.item() == pytest.approx(var, rel=1e-5)
    assert logv.item() == pytest.approx(math.log(var), rel=1e-5)


def test_posterior_log_variance_clipped_at_zero(diff):
    assert diff.posterior_variance[0] == 0.0
    assert diff.posterior_log_variance_clipped[0] == diff.posterior_log_variance_clipped[1]


def test_normal_kl():
    m, lv = torch.randn(100), torch.randn(100)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(100), atol=1e-7)
    m2, lv2 = torch.randn(100), torch.randn(100)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref, atol=1e-5, rtol=1e-5)


def test_q_sample_statistics(diff):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5)
    t = torch.full((200_000,), 300)
    xt = diff.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    a = diff.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 1.5, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - a), abs=0.01)


def test_discretized_likelihood_is_a_distribution():
    x = torch.linspace(-1, 1, 256)  # the 256 bin centres of 8-bit data
    for mean, log_scale in [(0.1, -1.0), (-0.8, -3.0), (0.0, 0.5)]:
        lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_respacing(diff):
    keep = space_timesteps(1000, 100)
    assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
    r = diff.respaced(100)
    assert r.num_timesteps == 100 and list(r.timestep_map) == keep
    np.testing.assert_allclose(r.alphas_cumprod, diff.alphas_cumprod[keep], rtol=1e-12)
    assert list(diff.respaced(1000).timestep_map) == list(range(1000))


def _official_space_timesteps(num_timesteps, section_counts):
    """Restatement of the official PixArt `diffusion/model/respace.py::space_timesteps` (IDDPM),
    sections given as a comma string like the official `IDDPM(str(steps))` call."""
    section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


def test_respacing_equals_official_for_every_step_count():
    differs = 0
    for n in range(1, 1001):
        assert space_timesteps(1000, n) == sorted(_official_space_timesteps(1000, str(n))), n
        stride = 999 / (n - 1) if n > 1 else 1
        differs += sorted({round(i * stride) for i in range(n)}) != space_timesteps(1000, n)
    assert differs == 278  # the multiply-then-round rule (the old one) ties differently this often


def test_learned_range_variance(diff):
    xt = torch.randn(2, 4, 2, 2)
    t = torch.tensor([5, 800])
    for v, ref in [(1.0, np.log(diff.betas)), (-1.0, diff.posterior_log_variance_clipped)]:
        out = diff.p_mean_variance(torch.cat([torch.zeros_like(xt), torch.full_like(xt, v)], 1), xt, t)
        assert out["log_variance"][0].flatten()[0].item() == pytest.approx(ref[5], rel=1e-5)
        assert out["log_variance"][1].flatten()[0].item() == pytest.approx(ref[800], rel=1e-5)


def test_training_losses_perfect_eps_and_stop_gradient(diff):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 4, 4, generator=g).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 3, 400, 999])
    var = torch.zeros(4, 4, 4, 4, requires_grad=True)
    eps = noise.clone().requires_grad_(True)
    seen = {}

    def model(xt, tm, y=None):
        seen["t"], seen["y"] = tm, y
        return torch.cat([eps, var], 1)

    terms = diff.training_losses(model, x0, t, model_kwargs={"y": "caption"}, noise=noise)
    assert seen["y"] == "caption" and torch.equal(seen["t"], t)
    assert torch.all(terms["mse"] == 0) and terms["loss"].shape == (4,)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.all(terms["vb"][1:] >= 0)
    terms["vb"].sum().backward()
    assert eps.grad is None or torch.all(eps.grad == 0)  # VB does not train the mean
    assert var.grad.abs().sum() > 0


def test_vb_zero_when_model_matches_posterior(diff):
    """With the true eps the predicted mean is the posterior mean; the KL is then the variance
    mismatch only, which is 0 for v = -1 (posterior variance) at t >= 1."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 2, 2, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([10, 500])
    xt = diff.q_sample(x0, t, noise)
    vb = diff.vb_terms_bpd(torch.cat([noise, -torch.ones_like(noise)], 1), x0, xt, t)
    assert torch.all(vb.abs() < 1e-4)


def _optimal_eps(diff, c):
    """eps of the data distribution concentrated at c: eps = (x - sqrt(acp) c) / sqrt(1 - acp)."""
    acp = torch.from_numpy(diff.alphas_cumprod).float()

    def model(x, t):
        a = acp[t.long()].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    return model


def test_iddpm_sampling_recovers_delta_data(diff):
    c = torch.tensor([0.5, -1.0, 0.25, 2.0]).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    x = diff.respaced(50).p_sample_loop(_optimal_eps(diff, c), (2, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, c, atol=1e-3, rtol=0)
