"""Pretrained audio networks of the AudioLDM evaluation protocol, loaded from local files.

- :class:`VGGish` — FAD embeddings. Layer names of the torch port
  (harritaylor/torchvggish), so ``vggish-10086976.pth`` loads with strict key checking.
  Embeddings as the ``frechet_audio_distance`` package uses them for FAD
  (``use_pca=False, use_activation=False``): the 128-d output of the last linear layer,
  before its ReLU, without PCA/quantisation, one embedding per 0.96 s patch.
- :class:`Cnn14` — PANNs CNN14, 16 kHz variant (``Cnn14_16k_mAP=0.438.pth``), as
  ``audioldm_eval`` uses it: 2048-d embedding (FD) and 527 AudioSet logits (KL, IS).
- :class:`ClapEmbedder` — transformers ``ClapModel`` from a local directory (CLAP score).

Nothing is ever downloaded: each loader takes a path and, when the file is missing or is
not the expected checkpoint, raises an error naming the file and where to get it.

Front ends are re-implemented with torch only (no torchaudio / torchlibrosa / librosa):

- VGGish (``vggish_input.waveform_to_examples``): 25 ms periodic-Hann frames (400 samples)
  every 10 ms, no padding, |rfft| with n = 512, 64 **HTK** mel bands 125–7500 Hz (unnormalised
  triangles, DC bin zeroed), log(mel + 0.01), non-overlapping patches of 96 frames × 64 bands.
  Framing is done with ``unfold`` + ``rfft`` rather than ``torch.stft`` because VGGish
  zero-pads each 400-sample frame at its end to 512 while ``torch.stft`` centres the
  window inside n_fft (a 56-sample shift and a different frame count).
- CNN14 (torchlibrosa ``Spectrogram`` + ``LogmelFilterBank``): ``torch.stft`` n_fft 512,
  hop 160, periodic Hann, centred with reflect padding, power spectrum; 64 **Slaney** mel
  bands 50–8000 Hz (librosa's default filters = :func:`mel_filterbank`), 10·log10(max(x, 1e-10)).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.parts.mel import mel_filterbank

VGGISH_FILE = "vggish-10086976.pth"
VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
PANNS_FILE = "Cnn14_16k_mAP=0.438.pth"
PANNS_URL = "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth"
SAMPLE_RATE = 16000


class WeightsError(RuntimeError):
    """A weights file is missing or is not the checkpoint a loader expects."""


def _require_file(path: str | os.PathLike | None, what: str, file_name: str, url: str, config_key: str) -> Path:
    if path is None or str(path) == "":
        raise WeightsError(
            f"{what}: no weights file configured. Download {file_name} from {url} "
            f"and set {config_key}=/path/to/{file_name}"
        )
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{what}: weights file {path} does not exist. Download {file_name} from {url} "
            f"and put it at {path} (or point {config_key} at it)"
        )
    return path


def _torch_load(path: Path) -> Any:
    """Load a weights file on CPU without executing code: tensors, containers and numpy
    data (official PANNs files also pickle numpy training state); anything else is refused."""
    from lightning_modules.checkpoints import CheckpointError, load_checkpoint, numpy_data_globals

    try:
        return load_checkpoint(path, extra_safe_globals=numpy_data_globals())
    except CheckpointError as err:
        raise WeightsError(f"cannot read {path} as a torch weights file: {err}") from err


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: Path, expected_file: str) -> None:
    """Strict key and shape check with an error that names the file."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"{path} is not a {expected_file} checkpoint for {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}, "
            f"{len(wrong_shape)} shape mismatches {wrong_shape[:4]}"
        )


# ----------------------------------------------------------------------------- VGGish


def hz_to_mel_htk(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale, ``1127 ln(1 + hz / 700)`` (VGGish's ``mel_features.hertz_to_mel``)."""
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def vggish_mel_matrix(
    n_mels: int = 64, n_freqs: int = 257, sample_rate: int = SAMPLE_RATE, fmin: float = 125.0, fmax: float = 7500.0
) -> torch.Tensor:
    """VGGish's ``spectrogram_to_mel_matrix``: HTK triangles, no area normalisation, DC row zeroed.

    Returns:
        (n_freqs, n_mels) float32; ``mel = magnitude @ matrix``.
    """
    freqs_mel = hz_to_mel_htk(torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64))  # (F,)
    edges = torch.linspace(float(hz_to_mel_htk(torch.tensor(fmin))), float(hz_to_mel_htk(torch.tensor(fmax))), n_mels + 2, dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,)
    rising = (freqs_mel[:, None] - lower) / (center - lower)  # (F, n_mels)
    falling = (upper - freqs_mel[:, None]) / (upper - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0, :] = 0.0
    return weights.float()


class VGGishFrontEnd(nn.Module):
    """wave (B, S) at 16 kHz → log-mel patches (B, P, 96, 64), P = number of whole 0.96 s patches."""

    window_length = 400  # 25 ms
    hop_length = 160  # 10 ms
    fft_length = 512
    patch_frames = 96  # 0.96 s
    log_offset = 0.01

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(self.window_length, periodic=True, dtype=torch.float64), persistent=False)
        self.register_buffer("mel_matrix", vggish_mel_matrix().double(), persistent=False)

    def min_samples(self) -> int:
        """Shortest clip that yields one patch: 95 hops + one window (15 600 samples)."""
        return (self.patch_frames - 1) * self.hop_length + self.window_length

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) → (B, T, 64) with T = 1 + (S − 400) // 160, computed in float64."""
        frames = wave.double().unfold(-1, self.window_length, self.hop_length) * self.window  # (B, T, 400)
        magnitude = torch.fft.rfft(frames, n=self.fft_length).abs()  # (B, T, 257)
        return torch.log(magnitude @ self.mel_matrix + self.log_offset)  # (B, T, 64)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, S), got {tuple(wave.shape)}")
        if wave.shape[1] < self.min_samples():
            raise ValueError(f"VGGish needs clips of at least {self.min_samples()} samples (0.975 s), got {wave.shape[1]}")
        log_mel = self.log_mel(wave)  # (B, T, 64)
        patches = log_mel.unfold(1, self.patch_frames, self.patch_frames)  # (B, P, 64, 96)
        return patches.transpose(2, 3).float()  # (B, P, 96, 64)


class VGGish(nn.Module):
    """VGGish with torchvggish's layer names (``features.*``, ``embeddings.*``).

    ``forward(patches (N, 1, 96, 64)) -> (N, 128)``; ``embed(wave (B, S))`` returns the
    embeddings of every 0.96 s patch of every clip, (B · P, 128), as FAD uses them.
    ``hidden`` (4096 in VGGish) is only lowered by tests.
    """

    def __init__(self, hidden: int = 4096) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, hidden), nn.ReLU(True), nn.Linear(hidden, hidden), nn.ReLU(True), nn.Linear(hidden, 128), nn.ReLU(True)
        )
        self.front_end = VGGishFrontEnd()

    def forward(self, patches: torch.Tensor, activation: bool = False) -> torch.Tensor:
        """patches (N, 1, 96, 64) → (N, 128); ``activation=False`` drops the final ReLU (FAD)."""
        x = self.features(patches)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (N, 6·4·512), TF's channels-last order
        head = self.embeddings if activation else self.embeddings[:-1]
        return head(x)

    @torch.no_grad()
    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, S) at 16 kHz → patch embeddings (B · P, 128), clip-major."""
        patches = self.front_end(wave)  # (B, P, 96, 64)
        return self(patches.reshape(-1, 1, *patches.shape[2:]))


def load_vggish(path: str | os.PathLike | None, config_key: str = "eval.vggish_path") -> VGGish:
    """VGGish in eval mode from the torchvggish port's state dict (``vggish-10086976.pth``)."""
    path = _require_file(path, "VGGish (FAD)", VGGISH_FILE, VGGISH_URL, config_key)
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(state).__name__}); expected {VGGISH_FILE}")
    model = VGGish()
    _check_keys(model, state, path, VGGISH_FILE)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- PANNs CNN14

# Keys of torchlibrosa's front end in the official checkpoint; the front end is recomputed
# with torch.stft here, so these are checked (shapes, and the mel matrix's values) not loaded.
PANNS_FRONT_END_KEYS = (
    "spectrogram_extractor.stft.conv_real.weight",
    "spectrogram_extractor.stft.conv_imag.weight",
    "logmel_extractor.melW",
)


class PannsFrontEnd(nn.Module):
    """wave (B, S) → log-mel (B, 1, T, 64), T = 1 + S // hop (torchlibrosa conventions)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 512, hop_length: int = 160, n_mels: int = 64,
                 fmin: float = 50.0, fmax: float = 8000.0, amin: float = 1e-10) -> None:
        super().__init__()
        self.n_fft, self.hop_length, self.amin = n_fft, hop_length, amin
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer("melW", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).t().contiguous(), persistent=False)  # (F, n_mels)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            wave.float(), self.n_fft, hop_length=self.hop_length, win_length=self.n_fft, window=self.window,
            center=True, pad_mode="reflect", return_complex=True,
        )  # (B, F, T)
        power = spec.real.pow(2) + spec.imag.pow(2)
        mel = power.transpose(1, 2) @ self.melW  # (B, T, n_mels)
        return (10.0 * torch.log10(torch.clamp(mel, min=self.amin))).unsqueeze(1)  # (B, 1, T, n_mels)


class ConvBlock(nn.Module):
    """PANNs ConvBlock: (conv3×3 → BN → ReLU) × 2 → 2-D average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class Cnn14(nn.Module):
    """PANNs CNN14 (inference only), the official layer names.

    ``forward(wave (B, S))`` → dict with ``embedding`` (B, 2048) = ReLU(fc1(·)),
    ``logits`` (B, 527) = fc_audioset(embedding) and ``clipwise_output`` = sigmoid(logits),
    matching audioldm_eval's ``"2048"`` / ``"logits"`` features in eval mode.
    """

    def __init__(self, classes_num: int = 527, widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048), n_mels: int = 64) -> None:
        super().__init__()
        self.front_end = PannsFrontEnd(n_mels=n_mels)
        self.bn0 = nn.BatchNorm2d(n_mels)
        channels = (1, *widths)
        for i in range(len(widths)):
            setattr(self, f"conv_block{i + 1}", ConvBlock(channels[i], channels[i + 1]))
        self.num_blocks = len(widths)
        self.fc1 = nn.Linear(widths[-1], widths[-1], bias=True)
        self.fc_audioset = nn.Linear(widths[-1], classes_num, bias=True)

    def forward(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.front_end(wave)  # (B, 1, T, 64)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BN over mel bins
        for i in range(self.num_blocks):
            last = i == self.num_blocks - 1
            x = getattr(self, f"conv_block{i + 1}")(x, pool_size=(1, 1) if last else (2, 2))
        x = x.mean(dim=3)  # (B, C, T') — mean over frequency
        x = x.max(dim=2).values + x.mean(dim=2)  # (B, C)
        embedding = F.relu(self.fc1(x))  # (B, 2048)
        logits = self.fc_audioset(embedding)  # (B, 527)
        return {"embedding": embedding, "logits": logits, "clipwise_output": torch.sigmoid(logits)}


def load_panns_cnn14(path: str | os.PathLike | None, config_key: str = "eval.panns_path") -> Cnn14:
    """CNN14 (16 kHz) in eval mode from ``Cnn14_16k_mAP=0.438.pth`` (a dict with a ``model`` key).

    Every network key must be present with the right shape (strict). The torchlibrosa
    front-end keys (:data:`PANNS_FRONT_END_KEYS`) must be present too; their mel matrix is
    compared with the one computed here, so a checkpoint for other STFT settings (e.g. the
    32 kHz ``Cnn14_mAP=0.431.pth``) is refused.
    """
    path = _require_file(path, "PANNs CNN14 (FD, KL, IS)", PANNS_FILE, PANNS_URL, config_key)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        keys = list(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(f"{path} has no 'model' entry (found {keys}); expected the official {PANNS_FILE}")
    state = dict(checkpoint["model"])
    model = Cnn14()
    missing_front = [k for k in PANNS_FRONT_END_KEYS if k not in state]
    if missing_front:
        raise WeightsError(f"{path} is not a {PANNS_FILE} checkpoint: front-end keys {missing_front} are missing")
    front = {k: state.pop(k) for k in PANNS_FRONT_END_KEYS}
    mel_w = model.front_end.melW
    if tuple(front["logmel_extractor.melW"].shape) != tuple(mel_w.shape) or not torch.allclose(
        front["logmel_extractor.melW"].float(), mel_w, atol=1e-5
    ):
        raise WeightsError(
            f"{path}: its mel filterbank {tuple(front['logmel_extractor.melW'].shape)} differs from the 16 kHz CNN14 "
            f"front end (n_fft 512, 64 mels, 50-8000 Hz); expected {PANNS_FILE}"
        )
    _check_keys(model, state, path, PANNS_FILE)
    model.load_state_dict(state, strict=True)
    return model.eval()


def panns_official_state_dict(model: Cnn14) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official checkpoint layout (with torchlibrosa's front-end
    tensors), e.g. to write a file :func:`load_panns_cnn14` reads."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_fft = model.front_end.n_fft
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = -2 * math.pi * k[:, None] * n[None, :] / n_fft  # (F, n_fft)
    window = model.front_end.window.double()
    state["spectrogram_extractor.stft.conv_real.weight"] = (torch.cos(angle) * window).float().unsqueeze(1)
    state["spectrogram_extractor.stft.conv_imag.weight"] = (torch.sin(angle) * window).float().unsqueeze(1)
    state["logmel_extractor.melW"] = model.front_end.melW.clone()
    return state


def prepare_panns_input(wave: torch.Tensor, min_samples: int = 32000) -> torch.Tensor:
    """audioldm_eval's loading of a clip for CNN14: remove the DC offset of each clip and
    zero-pad clips shorter than 2 s. (B, S) → (B, max(S, min_samples))."""
    wave = wave - wave.mean(dim=1, keepdim=True)
    if wave.shape[1] < min_samples:
        wave = F.pad(wave, (0, min_samples - wave.shape[1]))
    return wave


# ----------------------------------------------------------------------------- CLAP


class ClapEmbedder(nn.Module):
    """A transformers ``ClapModel`` + ``ClapProcessor`` from a local directory.

    ``text(captions) -> (N, D)`` and ``audio(wave (N, S) at sample_rate) -> (N, D)``, both
    L2-normalised projections. Audio is resampled (polyphase) to the processor's rate
    (48 kHz for the LAION checkpoints).
    """

    def __init__(self, model: nn.Module, processor: Any, directory: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.directory = directory

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
        return F.normalize(tensor.float(), dim=-1)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        inputs = self.processor(text=list(captions), return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return self._features(self.model.get_text_features(**inputs)).cpu()

    @torch.no_grad()
    def audio(self, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        from datamodules.audio_io import resample

        target = int(self.processor.feature_extractor.sampling_rate)
        audio = [resample(w, sample_rate, target) for w in wave.detach().cpu().numpy().astype(np.float32)]
        # the feature extractor itself: ClapProcessor's keyword is `audios` in transformers 4, `audio` in 5
        inputs = self.processor.feature_extractor(audio, sampling_rate=target, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_features", "is_longer")}
        return self._features(self.model.get_audio_features(**inputs)).cpu()


def load_clap(directory: str | os.PathLike | None, config_key: str = "eval.clap_dir") -> ClapEmbedder:
    """``ClapModel`` and ``ClapProcessor`` from a local dir (``local_files_only=True``)."""
    if directory is None or str(directory) == "":
        raise WeightsError(
            f"CLAP score: no CLAP model configured. Save a transformers CLAP checkpoint locally "
            f"(e.g. ClapModel/ClapProcessor.from_pretrained('laion/clap-htsat-unfused').save_pretrained(DIR)) "
            f"and set {config_key}=DIR"
        )
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise WeightsError(
            f"CLAP score: {directory} holds no config.json; {config_key} must be a directory written by "
            "ClapModel.save_pretrained + ClapProcessor.save_pretrained"
        )
    from transformers import ClapModel, ClapProcessor

    try:
        model = ClapModel.from_pretrained(str(directory), local_files_only=True)
        processor = ClapProcessor.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:
        raise WeightsError(f"cannot load a CLAP model and processor from {directory}: {err}") from err
    return ClapEmbedder(model, processor, str(directory))
