"""Gaussian diffusion as PixArt trains it (IDDPM formulation, written from the papers' equations).

- 1000 steps, linear betas 1e-4 -> 0.02 (float64 tables, cast to float32 on use).
- The model predicts eps (first C channels) and a learned-range variance v in [-1, 1] (last C
  channels): log var = f * log(beta_t) + (1 - f) * log(posterior var clipped), f = (v + 1) / 2.
- Loss = MSE(eps) + VB, where VB is the KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits with the
  mean STOP-GRADIENTED (only the variance learns from VB, as IDDPM), and at t = 0 the discretized
  Gaussian decoder NLL. t ~ uniform{0..T-1}.
- `respaced(n)` gives the IDDPM sampler on n evenly spaced steps (betas recomputed from the kept
  alphas_cumprod; the model is still called with the ORIGINAL timestep indices).

Quirk fixed vs the official code: the decoder NLL uses the exact normal CDF (`torch.special.ndtr`)
instead of the tanh approximation. Like the original, it assumes data binned on [-1, 1] with 255
levels, which for latents is only a convention (t = 0 is 1 of 1000 draws).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """`count` evenly spaced indices in [0, num_steps - 1], first and last included: the IDDPM /
    official PixArt rule for one section. The stride (num_steps - 1) / (count - 1) is ACCUMULATED in
    floating point and each position rounded (Python's round-half-even), so the float error of the
    running sum decides ties exactly as the official `space_timesteps` does (multiplying i * stride
    rounds 278 of the 1000 counts differently)."""
    if count > num_steps or count < 1:
        raise ValueError(f"cannot respace {num_steps} steps to {count}")
    stride = 1 if count == 1 else (num_steps - 1) / (count - 1)
    cur, out = 0.0, []
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) for x in [-1, 1] quantised to 255 levels (bin width 2/255); edge bins open."""
    centered = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray | None = None, timestep_map: list[int] | None = None,
                 learn_sigma: bool = True):
        """Default (no betas): PixArt's 1000-step linear schedule 1e-4 -> 0.02."""
        b = np.asarray(linear_betas() if betas is None else betas, dtype=np.float64)
        self.betas = b
        self.num_timesteps = len(b)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(len(b)), dtype=np.int64)
        a = 1.0 - b
        self.alphas_cumprod = acp = np.cumprod(a)
        self.alphas_cumprod_prev = acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, posterior_variance)
        self.posterior_variance = b * (1.0 - acp_prev) / (1.0 - acp)
        # variance is 0 at t = 0: clip the log with the t = 1 value (as IDDPM)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(a) / (1.0 - acp)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def pixart(cls, num_steps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        return cls(linear_betas(num_steps), learn_sigma=learn_sigma)

    def respaced(self, count: int) -> "GaussianDiffusion":
        """Same process on `count` kept steps: beta'_i = 1 - acp[k_i] / acp[k_{i-1}]."""
        keep = space_timesteps(self.num_timesteps, count)
        new_b, last = [], 1.0
        for k in keep:
            new_b.append(1.0 - self.alphas_cumprod[k] / last)
            last = self.alphas_cumprod[k]
        return GaussianDiffusion(np.array(new_b), [int(self.timestep_map[k]) for k in keep], self.learn_sigma)

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _at(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 (B, 1, 1, ...) broadcastable to `like`."""
        v = torch.from_numpy(arr).to(device=t.device)[t].float()
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this (possibly respaced) process -> the original timesteps the model saw."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    # -- forward process ---------------------------------------------------------------
    def q_sample(self, x0, t, noise=None):
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """(mean, variance, log variance clipped) of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    def predict_x0(self, xt, t, eps):
        return self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    # -- reverse process ---------------------------------------------------------------
    def p_mean_variance(self, model_out, xt, t, clip_x0: bool = False) -> dict:
        """model_out (B, 2C, ...) = [eps, v] (or (B, C, ...) eps with fixed small variance)."""
        c = xt.shape[1]
        if self.learn_sigma:
            eps, v = model_out[:, :c], model_out[:, c:2 * c]
            min_log = self._at(self.posterior_log_variance_clipped, t, xt)
            max_log = self._at(np.log(self.betas), t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_out[:, :c]
            log_var = self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        x0 = self.predict_x0(xt, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "variance": torch.exp(log_var), "pred_x0": x0, "eps": eps}

    def vb_terms_bpd(self, model_out, x0, xt, t) -> torch.Tensor:
        """(B,) variational bound term in bits per dim: KL for t > 0, decoder NLL for t == 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(model_out, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x0, t, model_kwargs: dict | None = None, noise=None) -> dict:
        """model_fn(x_t (B,C,H,W), t (B,), **model_kwargs) -> (B, 2C, H, W). Returns per-sample
        (B,) terms: loss = mse + vb; vb sees the eps prediction detached (only the variance learns
        from it)."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t), **(model_kwargs or {}))
        c = x0.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :c]) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([out[:, :c].detach(), out[:, c:2 * c]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    @torch.no_grad()
    def p_sample_loop(self, model_fn, shape, noise=None, generator=None, device=None, progress: bool = False,
                      model_kwargs: dict | None = None):
        """Ancestral sampling from x_T ~ N(0, I) over this process's steps. model_fn(x, t_model,
        **model_kwargs) receives ORIGINAL timestep indices (respacing-aware). Returns x_0."""
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="iddpm")
        for i in steps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t), **(model_kwargs or {})), x, t)
            if i > 0:
                gdev = generator.device if generator is not None else x.device  # CPU generator ok on GPU
                z = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
            else:
                x = out["mean"]
        return x
