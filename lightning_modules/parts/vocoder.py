"""Vocoders: log-mel ``(B, n_mels, frames)`` -> waveform ``(B, frames * hop)``.

- :class:`GriffinLimVocoder` — no weights: mel pseudo-inverse, then fast Griffin-Lim
  (Perraudin et al. 2013, momentum 0.99 as torchaudio).
- :class:`HifiGanVocoder` — transformers ``SpeechT5HifiGan`` (AudioLDM's vocoder in
  diffusers pipeline layout) loaded from a local directory.

Both expose ``forward(log_mel) -> wave``, ``sample_rate`` and ``hop_length``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.parts.mel import MelFrontEnd
from lightning_modules.parts.vae import load_pretrained_strict

_HIFIGAN_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class GriffinLimVocoder(nn.Module):
    """Log-mel -> linear magnitude (filterbank pseudo-inverse) -> Griffin-Lim phase.

    The STFT inside Griffin-Lim is centred (``center=True``: frame ``i`` at sample
    ``i * hop``) while AudioLDM's frame ``i`` sits at ``i * hop + hop / 2``; the output
    is shifted by ``hop // 2`` samples to line up with the input clip.
    """

    def __init__(self, mel: MelFrontEnd, n_iter: int = 32, momentum: float = 0.99, rand_init: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.mel = mel
        self.n_iter = n_iter
        self.momentum = momentum
        self.rand_init = rand_init
        self.seed = seed

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    @property
    def hop_length(self) -> int:
        return self.mel.hop_length

    @property
    def config(self) -> dict:
        return dict(kind="griffin_lim", griffin_lim_iters=self.n_iter, momentum=self.momentum, seed=self.seed)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        mel = self.mel
        return torch.istft(spec, mel.n_fft, mel.hop_length, mel.win_length, window=mel.window, center=True, length=length)

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.mel
        return torch.stft(wave, mel.n_fft, mel.hop_length, mel.win_length, window=mel.window, center=True, return_complex=True)

    def griffin_lim(self, magnitude: torch.Tensor, n_iter: int | None = None) -> torch.Tensor:
        """Phase retrieval for a linear magnitude ``(B, n_freqs, T)`` -> wave ``(B, T * hop)``.

        Uses the centred STFT framing (no hop/2 alignment shift; see :meth:`forward`).
        """
        n_iter = self.n_iter if n_iter is None else n_iter
        n_frames = magnitude.shape[-1]
        length = n_frames * self.hop_length
        if self.rand_init:
            generator = torch.Generator(device=magnitude.device).manual_seed(self.seed)
            phase = torch.rand(magnitude.shape, generator=generator, device=magnitude.device) * (2 * math.pi)
            angles = torch.polar(torch.ones_like(magnitude), phase)
        else:
            angles = torch.ones_like(magnitude, dtype=torch.complex64)
        previous = torch.zeros_like(angles)
        accel = self.momentum / (1.0 + self.momentum)
        for _ in range(n_iter):
            rebuilt = self._stft(self._istft(magnitude * angles, length))[..., :n_frames]
            angles = rebuilt - accel * previous
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        return self._istft(magnitude * angles, length)

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``log_mel (B, n_mels, T)`` -> ``wave (B, T * hop)``."""
        magnitude = self.mel.mel_to_linear(log_mel)  # (B, n_freqs, T)
        wave = self.griffin_lim(magnitude)  # (B, T * hop), frame i at sample i * hop
        shift = self.hop_length // 2
        return F.pad(wave, (shift, 0))[:, : wave.shape[-1]]  # frame i at i * hop + hop / 2, as AudioLDM


class HifiGanVocoder(nn.Module):
    """Wraps transformers ``SpeechT5HifiGan``; the model takes ``(B, frames, n_mels)``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.model_dir: str | None = None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HifiGanVocoder":
        """Load ``SpeechT5HifiGan`` from ``directory`` (or its ``vocoder/`` subfolder), strictly.

        Raises:
            FileNotFoundError: directory / config.json / weights absent.
            RuntimeError: missing, unexpected or mismatched keys.
        """
        from transformers import SpeechT5HifiGan

        model, vocoder_dir = load_pretrained_strict(
            SpeechT5HifiGan, directory, "vocoder", _HIFIGAN_WEIGHT_FILES, "vocoder", "transformers"
        )
        vocoder = cls(model.eval())
        vocoder.model_dir = str(vocoder_dir)
        return vocoder

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return math.prod(self.model.config.upsample_rates)

    @property
    def n_mels(self) -> int:
        return int(self.model.config.model_in_dim)

    @property
    def config(self) -> dict:
        return dict(kind="hifigan", pretrained_dir=self.model_dir)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``log_mel (B, n_mels, T)`` -> ``wave (B, T * hop)`` (cropped: transposed convs may overshoot)."""
        if log_mel.shape[1] != self.n_mels:
            raise ValueError(f"vocoder expects {self.n_mels} mel bins (model_in_dim), got log_mel shape {tuple(log_mel.shape)}")
        wave = self.model(log_mel.transpose(1, 2).to(self.model.dtype))  # (B, ~T * hop)
        length = log_mel.shape[-1] * self.hop_length
        if wave.shape[-1] < length:
            wave = F.pad(wave, (0, length - wave.shape[-1]))
        return wave[:, :length].float()


def log_spectral_distance(
    wave_a: torch.Tensor, wave_b: torch.Tensor, n_fft: int = 1024, hop_length: int = 160, floor_db: float = -60.0
) -> torch.Tensor:
    """Log-spectral distance in dB per clip, for reporting resynthesis quality.

    ``LSD = mean_frames sqrt(mean_freqs (P_a_dB - P_b_dB) ** 2)`` on STFT power, both
    clipped at ``floor_db`` below the loudest bin of ``wave_b`` (the reference) so that
    near-silent bins do not dominate. Clips are trimmed to the shorter length.

    Args:
        wave_a, wave_b: ``(B, S)`` (or ``(S,)``).
    Returns:
        ``(B,)`` dB.
    """
    if wave_a.dim() == 1:
        wave_a, wave_b = wave_a.unsqueeze(0), wave_b.unsqueeze(0)
    length = min(wave_a.shape[-1], wave_b.shape[-1])
    window = torch.hann_window(n_fft, device=wave_a.device)

    def power_db(wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave[:, :length].float(), n_fft, hop_length, window=window, return_complex=True)
        return 10.0 * torch.log10(spec.abs().pow(2) + 1e-20)  # (B, n_freqs, frames)

    db_a, db_b = power_db(wave_a), power_db(wave_b)
    floor = db_b.amax(dim=(1, 2), keepdim=True) + floor_db
    db_a, db_b = torch.maximum(db_a, floor), torch.maximum(db_b, floor)
    return (db_a - db_b).pow(2).mean(dim=1).sqrt().mean(dim=-1)
