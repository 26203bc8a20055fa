"""The pretransform: the only audio interface the language model sees.

    wave (B, S) ──MelFrontEnd──► log-mel (B, 64, T) ──pad T to ×4──► image (B, 1, T, 64)
        ──VAE encoder──► latent (B, 8, T/4, 16) ──'b c t f -> b t (c f)'──► tokens (B, T/4, 128)
        ──(x - latent_mean) / latent_std──► normalised tokens

and the reverse through the VAE decoder and a vocoder. At 16 kHz with hop 160 and 4x
VAE downsampling: 25 tokens/s, 640 samples per token, token_dim = 8 × 16 = 128.

Token mask: a mel frame is valid if its hop segment holds any real sample
(:func:`frame_mask_from_wave_mask`); frames are padded to a multiple of 4 with the log
floor (silence) and marked invalid; a token is valid if any of its 4 frames is.

Normalisation: ``latent_mean`` / ``latent_std`` buffers of shape ``(latent_channels,)``
(per-channel, computed once over training audio with :func:`compute_latent_stats`),
broadcast over the ``F/4`` frequency positions of each channel inside a token.
``encode`` returns normalised tokens and ``decode`` expects them, unless
``normalized=False`` (raw latents, e.g. when a latent cache normalises with its own stats).

On-disk layout (:meth:`MelVAEPretransform.save` / :meth:`load`)::

    dir/pretransform.json   mel config, vocoder config, latent stats, format version
    dir/vae/                diffusers AutoencoderKL (config.json + safetensors)
    dir/vocoder/            SpeechT5HifiGan, only for a HiFi-GAN vocoder
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from datamodules.atomic import atomic_directory, write_json_atomic
from lightning_modules.parts.mel import MelFrontEnd, frame_mask_from_wave_mask
from lightning_modules.parts.vae import build_mel_vae, load_mel_vae, vae_downsampling_factor
from lightning_modules.parts.vocoder import GriffinLimVocoder, HifiGanVocoder

PRETRANSFORM_FORMAT_VERSION = 1
PRETRANSFORM_CONFIG_NAME = "pretransform.json"


def build_vocoder(vocoder_cfg: dict | None, mel: MelFrontEnd) -> nn.Module:
    """Vocoder from the ``vocoder:`` config section.

    Keys: ``kind`` (``griffin_lim`` | ``hifigan``), ``griffin_lim_iters``,
    ``pretrained_dir`` (HiFi-GAN directory, or a pipeline dir with ``vocoder/``), and
    optionally ``momentum``, ``seed``.
    """
    cfg = dict(vocoder_cfg or {})
    kind = cfg.get("kind", "griffin_lim")
    if kind == "griffin_lim":
        return GriffinLimVocoder(
            mel, n_iter=int(cfg.get("griffin_lim_iters", 32)), momentum=float(cfg.get("momentum", 0.99)), seed=int(cfg.get("seed", 0))
        )
    if kind == "hifigan":
        if not cfg.get("pretrained_dir"):
            raise ValueError("vocoder.kind 'hifigan' needs vocoder.pretrained_dir (a local SpeechT5HifiGan directory)")
        return HifiGanVocoder.from_pretrained(cfg["pretrained_dir"])
    raise ValueError(f"unknown vocoder.kind {kind!r}; expected 'griffin_lim' or 'hifigan'")


class MelVAEPretransform(nn.Module):
    """Waveform <-> continuous tokens via log-mel and a KL mel-VAE; see the module docstring."""

    def __init__(self, mel: MelFrontEnd, vae, vocoder: nn.Module) -> None:
        super().__init__()
        self.mel = mel
        self.vae = vae
        self.vocoder = vocoder
        self.downsample = vae_downsampling_factor(vae)
        if mel.n_mels % self.downsample:
            raise ValueError(f"n_mels ({mel.n_mels}) must be divisible by the VAE downsampling ({self.downsample})")
        if vocoder.sample_rate != mel.sample_rate or vocoder.hop_length != mel.hop_length:
            raise ValueError(
                f"vocoder (sample_rate {vocoder.sample_rate}, hop {vocoder.hop_length}) does not match the mel front end "
                f"(sample_rate {mel.sample_rate}, hop {mel.hop_length})"
            )
        if isinstance(vocoder, HifiGanVocoder) and vocoder.n_mels != mel.n_mels:
            raise ValueError(f"vocoder model_in_dim {vocoder.n_mels} != n_mels {mel.n_mels}")
        channels = self.latent_channels
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self.has_latent_stats = False

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_scratch(cls, mel_cfg: dict | None = None, vae_cfg: dict | None = None, vocoder_cfg: dict | None = None) -> "MelVAEPretransform":
        """Random VAE (``build_mel_vae(**vae_cfg)``), identity stats."""
        mel = MelFrontEnd(**(mel_cfg or {}))
        return cls(mel, build_mel_vae(**(vae_cfg or {})), build_vocoder(vocoder_cfg, mel))

    @classmethod
    def from_pretrained(
        cls, vae_dir: str | Path, vocoder_dir: str | Path | None = None, mel_cfg: dict | None = None,
        vocoder_cfg: dict | None = None, latent_mean: torch.Tensor | None = None, latent_std: torch.Tensor | None = None,
    ) -> "MelVAEPretransform":
        """A diffusers VAE dir (or AudioLDM pipeline dir with ``vae/``) + optional HiFi-GAN dir.

        Without ``vocoder_dir`` the vocoder comes from ``vocoder_cfg`` (Griffin-Lim by
        default). Stats: pass them, or compute with :func:`compute_latent_stats`.
        """
        mel = MelFrontEnd(**(mel_cfg or {}))
        vocoder = HifiGanVocoder.from_pretrained(vocoder_dir) if vocoder_dir is not None else build_vocoder(vocoder_cfg, mel)
        pretransform = cls(mel, load_mel_vae(vae_dir), vocoder)
        if latent_mean is not None or latent_std is not None:
            pretransform.set_latent_stats(latent_mean, latent_std)
        return pretransform

    def save(self, directory: str | Path) -> None:
        """Write ``pretransform.json`` + ``vae/`` (+ ``vocoder/``) under ``directory``.

        The VAE folder is written first, the JSON last (atomically), so a folder with a
        ``pretransform.json`` is complete.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_directory(directory / "vae") as tmp:
            self.vae.save_pretrained(tmp)
        vocoder_cfg = self.vocoder.config
        if isinstance(self.vocoder, HifiGanVocoder):
            with atomic_directory(directory / "vocoder") as tmp:
                self.vocoder.save_pretrained(tmp)
            vocoder_cfg = dict(kind="hifigan", pretrained_dir="vocoder")  # relative to the pretransform dir
        write_json_atomic(directory / PRETRANSFORM_CONFIG_NAME, dict(
            format_version=PRETRANSFORM_FORMAT_VERSION,
            mel=self.mel.config,
            vocoder=vocoder_cfg,
            latent_mean=self.latent_mean.tolist(),
            latent_std=self.latent_std.tolist(),
            has_latent_stats=self.has_latent_stats,
        ))

    @classmethod
    def load(cls, directory: str | Path, vocoder_cfg: dict | None = None) -> "MelVAEPretransform":
        """Load what :meth:`save` wrote. ``vocoder_cfg`` overrides the saved vocoder choice."""
        directory = Path(directory)
        config_path = directory / PRETRANSFORM_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {PRETRANSFORM_CONFIG_NAME} in {directory}: not a saved MelVAEPretransform directory")
        config = json.loads(config_path.read_text())
        version = config.get("format_version")
        if version != PRETRANSFORM_FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {version}, this code reads {PRETRANSFORM_FORMAT_VERSION}")
        mel = MelFrontEnd(**config["mel"])
        vocoder_cfg = dict(vocoder_cfg or config["vocoder"])
        if vocoder_cfg.get("kind") == "hifigan" and vocoder_cfg.get("pretrained_dir") == "vocoder":
            vocoder_cfg["pretrained_dir"] = str(directory / "vocoder")
        pretransform = cls(mel, load_mel_vae(directory / "vae"), build_vocoder(vocoder_cfg, mel))
        mean, std = torch.tensor(config["latent_mean"]), torch.tensor(config["latent_std"])
        pretransform.latent_mean.copy_(mean)
        pretransform.latent_std.copy_(std)
        pretransform.has_latent_stats = bool(config.get("has_latent_stats", True))
        return pretransform

    # ----------------------------------------------------------------- properties
    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_freq_bins(self) -> int:
        """Frequency positions per latent frame: ``n_mels / downsample`` (16)."""
        return self.mel.n_mels // self.downsample

    @property
    def token_dim(self) -> int:
        """``latent_channels × n_mels / 4`` (128)."""
        return self.latent_channels * self.latent_freq_bins

    @property
    def downsampling_ratio(self) -> int:
        """Audio samples per token: ``hop × 4`` (640)."""
        return self.mel.hop_length * self.downsample

    @property
    def tokens_per_second(self) -> float:
        """``sample_rate / hop / 4`` (25.0)."""
        return self.sample_rate / self.downsampling_ratio

    def num_tokens(self, n_samples: int) -> int:
        """Tokens for a clip of ``n_samples``: ``ceil((n_samples // hop) / 4)``."""
        return -(-self.mel.num_frames(n_samples) // self.downsample)

    # ----------------------------------------------------------------- stats
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel stats, each ``(latent_channels,)``; ``std`` must be > 0."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        expected = (self.latent_channels,)
        if tuple(mean.shape) != expected or tuple(std.shape) != expected:
            raise ValueError(f"latent stats must have shape {expected}, got mean {tuple(mean.shape)}, std {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"latent std must be positive, got {std.tolist()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.has_latent_stats = True

    def _token_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel stats expanded to token dims ``(token_dim,)`` ('(c f)' order)."""
        f = self.latent_freq_bins
        return self.latent_mean.repeat_interleave(f), self.latent_std.repeat_interleave(f)

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw latent tokens ``(..., token_dim)`` -> normalised."""
        mean, std = self._token_stats()
        return (tokens - mean) / std

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(..., token_dim)`` -> raw latent tokens."""
        mean, std = self._token_stats()
        return tokens * std + mean

    # ----------------------------------------------------------------- encode
    def wave_to_vae_input(self, wave: torch.Tensor, wave_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``wave (B, S)`` -> (mel image ``(B, 1, T4, n_mels)``, frame mask ``(B, T4)``), T4 a multiple of 4.

        Padded samples are zeroed; padded frames hold the log floor (silence).
        """
        if wave_mask is not None:
            wave = wave * wave_mask.to(wave.dtype)
        log_mel = self.mel(wave)  # (B, n_mels, T)
        batch, _, n_frames = log_mel.shape
        if wave_mask is None:
            frame_mask = torch.ones(batch, n_frames, dtype=torch.bool, device=log_mel.device)
        else:
            frame_mask = frame_mask_from_wave_mask(wave_mask.bool(), self.mel.hop_length, n_frames)
        pad = (-n_frames) % self.downsample
        log_mel = F.pad(log_mel, (0, pad), value=self.mel.log_floor_value)  # (B, n_mels, T4)
        frame_mask = F.pad(frame_mask, (0, pad), value=False)  # (B, T4)
        return log_mel.transpose(1, 2).unsqueeze(1), frame_mask  # (B, 1, T4, n_mels)

    def token_mask_from_frame_mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T4)`` -> ``(B, T4 / 4)``: a token is valid if any of its frames is."""
        return frame_mask.reshape(frame_mask.shape[0], -1, self.downsample).any(dim=-1)

    def latent_to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        return rearrange(latent, "b c t f -> b t (c f)")  # (B, N, C * F/4)

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        return rearrange(tokens, "b t (c f) -> b c t f", c=self.latent_channels)  # (B, C, N, F/4)

    def _check_wave(self, wave: torch.Tensor) -> None:
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, S), got shape {tuple(wave.shape)}")
        if wave.shape[-1] < self.mel.hop_length:
            raise ValueError(f"wave has {wave.shape[-1]} samples, fewer than one hop ({self.mel.hop_length})")

    def encode_moments(self, wave: torch.Tensor, wave_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-normalised posterior moments, for caching.

        Args:
            wave: ``(B, S)`` float in [-1, 1] at ``sample_rate``.
            wave_mask: ``(B, S)`` bool, True on real samples (None: all real).
        Returns:
            mean ``(B, N, token_dim)``, std ``(B, N, token_dim)``, token_mask ``(B, N)`` bool,
            with ``N = ceil((S // hop) / 4)``.
        """
        self._check_wave(wave)
        image, frame_mask = self.wave_to_vae_input(wave, wave_mask)
        posterior = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        mean = self.latent_to_tokens(posterior.mean.float())
        std = self.latent_to_tokens(posterior.std.float())
        return mean, std, self.token_mask_from_frame_mask(frame_mask)

    def encode(self, wave: torch.Tensor, wave_mask: torch.Tensor | None = None, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``wave (B, S)`` -> (normalised tokens ``(B, N, token_dim)``, token_mask ``(B, N)``).

        ``sample=True`` draws from the posterior, else returns its mean.
        """
        mean, std, token_mask = self.encode_moments(wave, wave_mask)
        tokens = mean + std * torch.randn_like(std) if sample else mean
        return self.normalize(tokens), token_mask

    # ----------------------------------------------------------------- decode
    def decode_mel(self, tokens: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Tokens ``(B, N, token_dim)`` -> log-mel ``(B, n_mels, 4N)``."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must be (B, N, {self.token_dim}), got shape {tuple(tokens.shape)}")
        raw = self.denormalize(tokens.float()) if normalized else tokens.float()
        image = self.vae.decode(self.tokens_to_latent(raw).to(self.vae.dtype)).sample  # (B, 1, 4N, n_mels)
        return image.squeeze(1).transpose(1, 2).float()  # (B, n_mels, 4N)

    def decode(self, tokens: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Tokens ``(B, N, token_dim)`` -> wave ``(B, N * downsampling_ratio)``."""
        return self.vocoder(self.decode_mel(tokens, normalized))

    # ----------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """sha256 (16 hex chars) of mel config + VAE config + VAE weights.

        Changes whenever ``encode_moments`` could change. Not included: the vocoder and
        the latent stats (neither affects the un-normalised moments a cache stores).
        """
        digest = hashlib.sha256()
        header = dict(mel=self.mel.config, vae=_json_safe(dict(self.vae.config)))
        digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def _json_safe(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


@torch.no_grad()
def compute_latent_stats(
    pretransform: MelVAEPretransform, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std ``(latent_channels,)`` of posterior means over valid tokens.

    Args:
        batches: yields ``(wave (B, S), wave_mask (B, S) | None)`` of training audio.
    Raises:
        ValueError: no valid tokens seen.
    """
    channels, freq_bins = pretransform.latent_channels, pretransform.latent_freq_bins
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for index, (wave, wave_mask) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        mean, _, token_mask = pretransform.encode_moments(wave, wave_mask)
        valid = mean[token_mask].double().cpu().reshape(-1, channels, freq_bins)  # (n_valid, C, F/4)
        total += valid.sum(dim=(0, 2))
        total_sq += valid.pow(2).sum(dim=(0, 2))
        count += valid.shape[0] * freq_bins
    if count == 0:
        raise ValueError("compute_latent_stats: no valid tokens in the given batches")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp(min=1e-12).sqrt()
    return mean.float(), std.float()
