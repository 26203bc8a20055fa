"""``MelVAESystem``: trains the mel-VAE that defines the LM's token space.

batch (from a datamodule): ``wave (B, S)``, ``wave_mask (B, S)`` bool, plus captions/ids/labels
(unused here) ─► log-mel ─► VAE ─► loss = masked reconstruction on log-mel + kl_weight × KL.

Loss reductions: the reconstruction term is the mean |x - x̂| (or squared) over valid
log-mel pixels; KL is the mean over valid latent elements of
``0.5 (μ² + σ² - 1 - log σ²)``. Both are *means*, so ``kl_weight`` is comparable to
AudioLDM's sum-reduced 1e-6 up to a factor ~2 (there are 2× as many pixels as latent
elements). AudioLDM also adds a patch-GAN and LPIPS-like terms; they are left out here
(reconstructions are blurrier; a HiFi-GAN vocoder or longer training partly compensates).

``export_pretransform(dir, batches)`` writes the trained VAE + latent stats as a
:class:`MelVAEPretransform` directory that every other experiment loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import lightning as L
import torch

from lightning_modules.parts.mel import MelFrontEnd
from lightning_modules.parts.pretransform import MelVAEPretransform, build_vocoder, compute_latent_stats
from lightning_modules.parts.vae import build_mel_vae, load_mel_vae


class MelVAESystem(L.LightningModule):
    """Trains ``AutoencoderKL`` on log-mel images ``(B, 1, T, n_mels)``.

    Args:
        mel: ``MelFrontEnd`` kwargs (config section ``mel:``).
        vae: ``build_mel_vae`` kwargs (block_out_channels, layers_per_block, latent_channels, norm_num_groups).
        init_vae_dir: start from a local diffusers VAE instead of random weights (fine-tuning).
        lr, betas, weight_decay: AdamW.
        kl_weight: weight of the mean KL against the mean reconstruction error.
        recon_loss: ``"l1"`` or ``"l2"``.
        griffin_lim_iters: Griffin-Lim iterations for validation audio.
        log_examples: clips rendered (pictures + audio) at each validation.
    """

    def __init__(
        self,
        mel: dict | None = None,
        vae: dict | None = None,
        init_vae_dir: str | None = None,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        kl_weight: float = 1e-6,
        recon_loss: str = "l1",
        griffin_lim_iters: int = 32,
        log_examples: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        mel_frontend = MelFrontEnd(**(mel or {}))
        mel_vae = load_mel_vae(init_vae_dir).train() if init_vae_dir else build_mel_vae(**(vae or {}))
        # The only submodule: wires mel + VAE exactly as the LM will see them (layout, masks, padding).
        self.pretransform = MelVAEPretransform(mel_frontend, mel_vae, build_vocoder({"griffin_lim_iters": griffin_lim_iters}, mel_frontend))

    @property
    def mel(self) -> MelFrontEnd:
        return self.pretransform.mel

    @property
    def vae(self):
        return self.pretransform.vae

    def forward(self, wave: torch.Tensor, wave_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode (sampling the posterior) and decode.

        Returns dict: ``log_mel`` / ``recon`` ``(B, 1, T4, n_mels)``, ``frame_mask (B, T4)``,
        ``mean`` / ``logvar`` ``(B, C, T4/4, n_mels/4)``, ``token_mask (B, T4/4)``.
        """
        image, frame_mask = self.pretransform.wave_to_vae_input(wave, wave_mask)  # (B,1,T4,F), (B,T4)
        posterior = self.vae.encode(image).latent_dist
        latent = posterior.sample() if self.training else posterior.mean
        recon = self.vae.decode(latent).sample  # (B, 1, T4, F)
        token_mask = self.pretransform.token_mask_from_frame_mask(frame_mask)
        return dict(log_mel=image, recon=recon, frame_mask=frame_mask, mean=posterior.mean, logvar=posterior.logvar, token_mask=token_mask)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self(batch["wave"], batch.get("wave_mask"))
        pixel_mask = out["frame_mask"][:, None, :, None].to(out["recon"].dtype)  # (B, 1, T4, 1)
        error = out["recon"] - out["log_mel"]
        error = error.abs() if self.hparams.recon_loss == "l1" else error.pow(2)
        n_pixels = (pixel_mask.sum() * error.shape[-1]).clamp(min=1.0)
        recon = (error * pixel_mask).sum() / n_pixels

        mean, logvar = out["mean"], out["logvar"]
        latent_mask = out["token_mask"][:, None, :, None].to(mean.dtype)  # (B, 1, N, 1)
        kl_map = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        n_latent = (latent_mask.sum() * mean.shape[1] * mean.shape[-1]).clamp(min=1.0)
        kl = (kl_map * latent_mask).sum() / n_latent

        valid_means = mean.permute(0, 2, 1, 3)[out["token_mask"]]  # (n_valid, C, F/4)
        return dict(
            loss=recon + self.hparams.kl_weight * kl,
            recon=recon.detach(),
            kl=kl.detach(),
            latent_mean=valid_means.mean().detach(),
            latent_std=valid_means.std().detach() if valid_means.numel() > 1 else torch.zeros((), device=mean.device),
            _out=out,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        batch_size = batch["wave"].shape[0]
        for name in ("loss", "recon", "kl", "latent_mean", "latent_std"):
            self.log(f"train/{name}", losses[name], prog_bar=name in ("loss", "recon"), batch_size=batch_size)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self.losses(batch)
        batch_size = batch["wave"].shape[0]
        for name in ("loss", "recon", "kl", "latent_mean", "latent_std"):
            self.log(f"val/{name}", losses[name], prog_bar=name == "recon", batch_size=batch_size, sync_dist=True)
        if batch_idx == 0:
            self._log_examples(losses["_out"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)

    # ----------------------------------------------------------------- logging
    def _tensorboard(self):
        """The TensorBoard ``SummaryWriter`` if the logger is TensorBoard, else None."""
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = getattr(self, "loggers", None) or []
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    @torch.no_grad()
    def _log_examples(self, out: dict) -> None:
        writer = self._tensorboard()
        if writer is None or self.trainer.global_rank != 0:
            return
        step = self.global_step
        for index in range(min(self.hparams.log_examples, out["log_mel"].shape[0])):
            n_valid = int(out["frame_mask"][index].sum())
            original = out["log_mel"][index, 0, :n_valid].float().t()  # (F, T)
            recon = out["recon"][index, 0, :n_valid].float().t()  # (F, T)
            writer.add_image(f"val/mel_{index}", spectrogram_picture(original, recon), step, dataformats="CHW")
            waves = self.pretransform.vocoder(torch.stack([original, recon]))  # (2, T * hop)
            peak = waves.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
            waves = (waves / peak * 0.9).cpu()
            writer.add_audio(f"val/audio_{index}_original_gl", waves[0], step, sample_rate=self.mel.sample_rate)
            writer.add_audio(f"val/audio_{index}_recon_gl", waves[1], step, sample_rate=self.mel.sample_rate)

    # ----------------------------------------------------------------- export
    @torch.no_grad()
    def export_pretransform(
        self, directory: str | Path, stats_batches: Iterable[dict], vocoder_cfg: dict | None = None, max_batches: int | None = None
    ) -> MelVAEPretransform:
        """Compute latent stats over ``stats_batches`` (training batches: dicts with
        ``wave``, ``wave_mask``) and save VAE + stats as a pretransform directory.

        The caller (experiments) supplies the batches; this module reads no data itself.
        """
        was_training = self.training
        self.eval()
        try:
            pretransform = MelVAEPretransform(self.mel, self.vae, build_vocoder(vocoder_cfg, self.mel))
            pretransform.to(self.device)
            batches = ((b["wave"].to(self.device), _to_device(b.get("wave_mask"), self.device)) for b in stats_batches)
            mean, std = compute_latent_stats(pretransform, batches, max_batches=max_batches)
            pretransform.set_latent_stats(mean, std)
            pretransform.save(directory)
        finally:
            self.train(was_training)
        return pretransform


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def spectrogram_picture(*log_mels: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Log-mels ``(F, T)`` stacked top to bottom (e.g. original over reconstruction; low
    frequencies at the bottom of each), scaled jointly to [0, 1] by the first one's range:
    a ``(C, n F + (n - 1) gap, T)`` image for ``add_image`` — RGB (magma) when matplotlib is
    installed, else grey (C = 1)."""
    first = log_mels[0]
    low, high = first.min(), first.max()
    scale = lambda x: ((x.float() - low) / (high - low).clamp(min=1e-6)).clamp(0, 1).flip(0)  # noqa: E731
    separator = torch.ones(gap, first.shape[1], device=first.device)
    rows = [part for i, mel in enumerate(log_mels) for part in ((separator,) if i else ()) + (scale(mel),)]
    grey = torch.cat(rows, dim=0).float().cpu()  # (n F + (n - 1) gap, T)
    try:
        from matplotlib import colormaps
    except ImportError:
        return grey.unsqueeze(0)
    rgb = colormaps["magma"](grey.numpy())[..., :3]  # (H, W, 3)
    return torch.from_numpy(rgb).permute(2, 0, 1).float()
