"""Per-token diffusion head (MAR's DiffLoss in spirit): p(x_i | z_i) for a continuous token.

* Network: an MLP of residual adaLN blocks conditioned on (timestep embedding + cond
  projection); modulation and output layers are zero-initialised, so at init every block
  is the identity and the predicted noise is 0.
* Schedule: cosine (Nichol & Dhariwal 2021), ``num_train_steps`` = 1000, betas clipped at
  0.999 as in the paper. Training timesteps are 0-based, t in {0, ..., T-1}.
* Objective (``prediction``): ``"eps"`` — epsilon-prediction, MSE (MAR, the paper) — or
  ``"v"`` — v-prediction (Salimans & Ho 2022), v = sqrt(abar) eps - sqrt(1 - abar) x0.
  In terms of the clean-token error, the eps-MSE is SNR_t * |x0 - x0_hat|^2 while the
  v-MSE is (1 + SNR_t) * |x0 - x0_hat|^2: at high noise (SNR -> 0) the eps loss hardly
  cares what the network predicts for x0, which is exactly where only the condition z
  (the text, for the first token) can tell the answer. v keeps that weight >= 1.
  The variance is *fixed* (the posterior variance ``beta_tilde``, "fixed small"); MAR
  learns it, which matters little at 100 steps once the first step is made safe (below).
* Sampling: the T-step chain is respaced to ``num_steps`` evenly spaced timesteps
  (IDDPM's ``space_timesteps``: round(linspace(0, T-1, n))). DDPM ancestral (default),
  DDIM (``ddim_eta``, 0 = deterministic), or DPM-Solver++(2M) (``dpmpp``; Lu et al. 2022:
  the multistep second-order solver of the probability-flow ODE in data prediction,
  first order at the first and last step, deterministic; equal to diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  final_sigmas_type="zero")`` on the same timesteps, which a test checks).

The first-step pitfall (DESIGN.md): respacing 1000 -> 100 makes the first reverse step's
beta ~ 0.99999 (alpha_bar drops from 2.4e-4 to 2.4e-9), and the epsilon-form posterior
mean ``(x_t - beta / sqrt(1 - abar) * eps) / sqrt(alpha)`` multiplies the epsilon error by
1 / sqrt(alpha) ~ 300. We always go through the predicted x0 and the posterior mean
``mu = c0 * x0 + c1 * x_t`` of q(x_{t-1} | x_t, x0), and clamp x0 to ``[-clip_x0, clip_x0]``
(default 5: tokens are normalised to ~unit variance, so a clean token beyond 5 sigma is
rare; raise it for heavy-tailed latents, ``None`` disables the safety). With the clamp the
first step's output is bounded by 5 * c0 + |x_T| * c1 ~ 0.08 + 0.003 |x_T|, plus noise.

Autocast: the chain (x, coefficients, noise) stays in float32 while the network may run
in bf16 under the caller's autocast; open ONE autocast region around ``sample``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

SAMPLERS = ("ddpm", "ddim", "dpmpp")
DETERMINISTIC_SAMPLERS = ("ddim", "dpmpp")  # with ddim_eta = 0: no per-step noise for a temperature to scale


def check_temperature(sampler: str, temperature: float, ddim_eta: float = 0.0) -> None:
    """A temperature other than 1 with a sampler that adds no per-step noise would be
    silently ignored: refuse it (measured: DDIM-25 at temperature 0.8 gave the same clips)."""
    deterministic = sampler == "dpmpp" or (sampler == "ddim" and ddim_eta == 0)
    if temperature != 1.0 and deterministic:
        raise ValueError(f"sample.temperature={temperature:g} has no effect with the deterministic {sampler} sampler "
                         "(temperature scales the per-step noise of ddpm): set sample.sampler=ddpm or sample.temperature=1")
PREDICTIONS = ("eps", "v")


# ----------------------------------------------------------------------------- schedule


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule. Returns alpha_bar (num_steps,) float64 for t = 0..T-1, built from
    betas_t = min(1 - f(t+1)/f(t), max_beta), f(u) = cos^2(((u/T) + s) / (1 + s) * pi/2)."""
    def f(u: float) -> float:
        return math.cos((u / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def respace(alphas_cumprod: torch.Tensor, num_steps: int) -> list[dict]:
    """Reverse-chain coefficients for ``num_steps`` evenly spaced timesteps.

    Returns one dict per reverse step, from the noisiest to t = 0 (python floats, float64
    precision): t (original timestep), abar, abar_prev, beta (respaced), var (posterior
    variance beta_tilde), c_x0 / c_xt (posterior-mean coefficients).
    """
    T = alphas_cumprod.shape[0]
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    ts = sorted({round(i * (T - 1) / max(num_steps - 1, 1)) for i in range(num_steps)})
    if num_steps == 1:
        ts = [T - 1]
    ab = alphas_cumprod.tolist()
    steps = []
    for i, t in enumerate(ts):
        abar = ab[t]
        abar_prev = ab[ts[i - 1]] if i > 0 else 1.0
        beta = 1.0 - abar / abar_prev
        steps.append(dict(
            t=t, abar=abar, abar_prev=abar_prev, beta=beta,
            var=beta * (1.0 - abar_prev) / (1.0 - abar),
            c_x0=beta * math.sqrt(abar_prev) / (1.0 - abar),
            c_xt=(1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar),
        ))
    return steps[::-1]


# ----------------------------------------------------------------------------- network


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer timestep (N,) -> sinusoidal features (N, freq_dim) -> MLP -> (N, width)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); (shift, scale, gate) = Linear(SiLU(c))."""

    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # zero-initialised

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x, c: (N, width) -> (N, width)."""
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)  # 3 x (N, width)
        return x + gate * self.mlp(modulate(self.ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Linear(modulate(LN(x), shift, scale)); modulation and Linear zero-initialised."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)  # 2 x (N, width)
        return self.linear(modulate(self.ln(x), shift, scale))


class DenoiserMLP(nn.Module):
    """eps_theta(x_t, t, z): (N, token_dim), (N,), (N, cond_dim) -> (N, token_dim)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([AdaLNBlock(width) for _ in range(depth)])
        self.final = FinalLayer(width, token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:  # zero modulation => every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for m in (self.final.ada[-1], self.final.linear):  # zero output => eps_pred = 0 at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = self.input_proj.weight.dtype  # also correct for bf16-true weights
        h = self.input_proj(x.to(dtype))  # (N, width)
        c = self.time_embed(t) + self.cond_embed(z.to(dtype))  # (N, width)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)  # (N, token_dim)


# ----------------------------------------------------------------------------- head


class DiffusionHead(nn.Module):
    """Diffusion loss and sampler for one continuous token per row.

    Args:
        token_dim: size of a token x.
        cond_dim: size of the decoder output z.
        width, depth: adaLN MLP size (MAR default 1024 x 3).
        num_train_steps: T of the training chain.
        schedule: only "cosine".
        batch_mul: independent (t, eps) draws per row in :meth:`loss`.
        sampler: default sampler, "ddpm" (ancestral) or "ddim".
        num_sample_steps: default number of respaced sampling steps.
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] while sampling (the
            first-step safety; None disables it).
        ddim_eta: DDIM stochasticity (0 = deterministic).
        min_snr_gamma: None (plain MSE of the prediction) or γ for Min-SNR-γ weighting
            (Hang et al. 2023): each draw is weighted by min(SNR_t, γ) / SNR_t (eps) or
            min(SNR_t, γ) / (SNR_t + 1) (v), i.e. the clean-token error weighted min(SNR_t, γ).
        prediction: "eps" (the paper's) or "v" (see the module docstring).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 3,
                 num_train_steps: int = 1000, schedule: str = "cosine", batch_mul: int = 4,
                 sampler: str = "ddpm", num_sample_steps: int = 100, clip_x0: float | None = 5.0,
                 ddim_eta: float = 0.0, min_snr_gamma: float | None = None, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if schedule != "cosine":
            raise ValueError(f"only the 'cosine' schedule is implemented, got {schedule!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.token_dim, self.cond_dim = token_dim, cond_dim
        self.num_train_steps, self.batch_mul = num_train_steps, batch_mul
        self.sampler, self.num_sample_steps = sampler, num_sample_steps
        self.clip_x0, self.ddim_eta = clip_x0, ddim_eta
        self.min_snr_gamma = min_snr_gamma
        self.prediction = prediction
        self.net = DenoiserMLP(token_dim, cond_dim, width, depth)
        # float64 on CPU, deliberately not a buffer: .to(bf16) must not round it
        self.alphas_cumprod = cosine_alphas_cumprod(num_train_steps)
        self._abar_cache: dict[torch.device, torch.Tensor] = {}

    def _abar(self, device: torch.device) -> torch.Tensor:
        """alpha_bar as float32 on ``device`` (cached)."""
        if device not in self._abar_cache:
            self._abar_cache[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._abar_cache[device]

    # -------------------------------------------------------------- training

    def loss(self, target: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> dict:
        """Diffusion loss (MSE of the eps or v prediction), ``batch_mul`` noise draws per row.

        Args:
            target: (N, token_dim) clean tokens x0.
            z: (N, cond_dim) decoder outputs.
            weight: (N,) float (e.g. a validity mask) or None.
            generator: draws t and ε on the tokens' device (so it must live there: no
                host-to-device copy of the noise); None uses the global RNG. A seeded
                generator makes a training step reproducible.
        Returns:
            dict(loss=scalar weighted mean over the N * batch_mul draws,
                 per_sample=(N * batch_mul,) MSE of the prediction per draw (float32, detached),
                 t=(N * batch_mul,) timesteps). Draw r of row i is at index r * N + i.
        """
        if target.shape[0] != z.shape[0]:
            raise ValueError(f"target rows {target.shape[0]} != z rows {z.shape[0]}")
        x0 = target.float().repeat(self.batch_mul, 1)  # (N*bm, D)
        z = z.repeat(self.batch_mul, 1)  # (N*bm, C)
        n = x0.shape[0]
        t = torch.randint(0, self.num_train_steps, (n,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        abar = self._abar(x0.device)[t][:, None]  # (N*bm, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        goal = eps if self.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0  # (N*bm, D)
        per_sample = (self.net(x_t, t, z).float() - goal).pow(2).mean(dim=-1)  # (N*bm,)
        w = torch.ones_like(per_sample) if weight is None else weight.float().repeat(self.batch_mul)
        weighted = per_sample
        if self.min_snr_gamma is not None:
            snr = (abar / (1 - abar)).squeeze(-1).float()  # (N*bm,)
            weighted = per_sample * snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        loss = (weighted * w).sum() / w.sum().clamp_min(1e-8)
        return dict(loss=loss, per_sample=per_sample.detach(), t=t)

    # -------------------------------------------------------------- sampling

    def predict(self, x: torch.Tensor, t: int, z_cond: torch.Tensor, z_uncond: torch.Tensor | None,
                cfg_scale: float | torch.Tensor, cfg_rescale: float = 0.0) -> torch.Tensor:
        """x (B, D) float32, t int -> the network's prediction (eps or v, (B, D) float32), with CFG.

        Conditional and unconditional rows go through ONE forward of 2B rows. CFG on v
        equals CFG on eps (both are linear in the prediction for a fixed x_t).
        cfg_scale may be a float or a (B,) tensor (per-row scale). cfg_rescale = φ in [0, 1]
        (Lin et al. 2024, diffusers' ``guidance_rescale``): the guided prediction is rescaled
        to the per-row std of the conditional one and mixed back, φ·rescaled + (1 − φ)·guided,
        which keeps guidance from pushing a token's magnitude off the data.
        """
        B = x.shape[0]
        use_cfg = z_uncond is not None and not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0)
        if not use_cfg:
            tt = torch.full((B,), t, dtype=torch.long, device=x.device)
            return self.net(x, tt, z_cond).float()
        tt = torch.full((2 * B,), t, dtype=torch.long, device=x.device)
        eps = self.net(torch.cat([x, x]), tt, torch.cat([z_cond, z_uncond])).float()  # (2B, D)
        eps_c, eps_u = eps[:B], eps[B:]
        s = cfg_scale[:, None].float() if torch.is_tensor(cfg_scale) else cfg_scale
        guided = eps_u + s * (eps_c - eps_u)
        if cfg_rescale > 0:
            rescaled = guided * (eps_c.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True).clamp_min(1e-8))
            guided = cfg_rescale * rescaled + (1 - cfg_rescale) * guided
        return guided

    def respaced(self, num_steps: int) -> list[dict]:
        """:func:`respace` of this head's schedule, computed once per step count (not per token)."""
        cache = self.__dict__.setdefault("_respaced", {})
        if num_steps not in cache:
            steps = respace(self.alphas_cumprod, num_steps)
            for st in steps:  # log-SNR, for DPM-Solver++
                st["lambda"] = 0.5 * math.log(st["abar"] / (1 - st["abar"]))
            cache[num_steps] = steps
        return cache[num_steps]

    @torch.no_grad()
    def sample(self, z_cond: torch.Tensor, z_uncond: torch.Tensor | None = None, cfg_scale: float = 1.0,
               temperature: float = 1.0, num_steps: int | None = None, sampler: str | None = None,
               generator: torch.Generator | None = None, cfg_rescale: float = 0.0) -> torch.Tensor:
        """Draw one token per row by the respaced reverse chain.

        Args:
            z_cond: (B, cond_dim) conditional decoder outputs.
            z_uncond: (B, cond_dim) outputs for the null text prefix, or None (no CFG).
            cfg_scale: s in eps = eps_u + s (eps_c - eps_u); 1 = conditional only.
            temperature: scales the per-step noise (MAR style; the initial x_T is N(0, I)).
                DDIM with eta = 0 and DPM-Solver++ have none: anything but 1 is refused.
            num_steps: respaced steps (default ``num_sample_steps``).
            sampler: "ddpm", "ddim" or "dpmpp" (default ``self.sampler``).
            generator: torch.Generator on z's device, for reproducible noise.
            cfg_rescale: guidance rescale φ (``predict``); 0 = plain CFG.
        Returns:
            x: (B, token_dim) float32.
        """
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        check_temperature(sampler, temperature, self.ddim_eta)
        steps = self.respaced(num_steps or self.num_sample_steps)
        B, device = z_cond.shape[0], z_cond.device

        def noise() -> torch.Tensor:
            return torch.randn(B, self.token_dim, device=device, dtype=torch.float32, generator=generator)

        x = noise()  # x_T ~ N(0, I)
        x0_prev = None
        for i, st in enumerate(steps):
            out = self.predict(x, st["t"], z_cond, z_uncond, cfg_scale, cfg_rescale)
            if self.prediction == "eps":
                x0 = (x - math.sqrt(1 - st["abar"]) * out) / math.sqrt(st["abar"])
            else:  # v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v, well conditioned at every t
                x0 = math.sqrt(st["abar"]) * x - math.sqrt(1 - st["abar"]) * out
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            last = i == len(steps) - 1
            if sampler == "dpmpp":
                if last:  # to sigma = 0: the solution is the data prediction itself
                    x = x0
                else:
                    lam, lam_next = st["lambda"], steps[i + 1]["lambda"]
                    h = lam_next - lam
                    d = x0
                    if x0_prev is not None:  # second order from the previous data prediction
                        r = (lam - steps[i - 1]["lambda"]) / h
                        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
                    sigma, sigma_next = math.sqrt(1 - st["abar"]), math.sqrt(1 - steps[i + 1]["abar"])
                    x = (sigma_next / sigma) * x - math.sqrt(steps[i + 1]["abar"]) * math.expm1(-h) * d
                x0_prev = x0
            elif sampler == "ddpm":
                x = st["c_x0"] * x0 + st["c_xt"] * x  # posterior mean of q(x_{t-1} | x_t, x0)
                if not last:
                    x = x + (math.sqrt(st["var"]) * temperature) * noise()
            else:  # DDIM
                eps_hat = (x - math.sqrt(st["abar"]) * x0) / math.sqrt(1 - st["abar"])  # consistent with clamped x0
                sigma = self.ddim_eta * math.sqrt(st["var"])
                x = math.sqrt(st["abar_prev"]) * x0 + math.sqrt(max(1 - st["abar_prev"] - sigma ** 2, 0.0)) * eps_hat
                if sigma > 0 and not last:
                    x = x + (sigma * temperature) * noise()
        return x
