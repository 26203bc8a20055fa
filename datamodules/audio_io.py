"""Audio file I/O with soundfile and scipy (no torchaudio).

All loaders return float32 numpy arrays in [-1, 1]; resampling is polyphase
(`scipy.signal.resample_poly`) with the up/down factors reduced by their gcd.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from datamodules.atomic import atomic_path


class AudioDecodeError(RuntimeError):
    """An audio file could not be read or decoded; the message names the file."""


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along the last axis.

    Args:
        wave: (..., samples) float array.
        orig_sr, target_sr: sample rates in Hz (> 0).

    Returns:
        (..., ceil(samples * target_sr / orig_sr)) float32 array (the input if the rates match).
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave.astype(np.float32, copy=False)
    divisor = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // divisor, int(orig_sr) // divisor
    return resample_poly(wave, up, down, axis=-1).astype(np.float32)


def load_audio(
    path: str | os.PathLike,
    target_sr: int | None,
    mono: bool = True,
    offset_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode an audio file (or a segment of it), mix to mono and resample.

    Args:
        path: any format libsndfile reads (wav, flac, ogg; mp3 with libsndfile >= 1.1).
        target_sr: output rate in Hz, or None to keep the file's rate.
        mono: average the channels (True) or keep them.
        offset_seconds: where to start reading (only this segment is decoded).
        max_seconds: read at most this much audio from the offset; None: to the end.

    Returns:
        float32 array (samples,) if mono, else (channels, samples).

    Raises:
        AudioDecodeError: naming the file, if it is missing, unreadable, has no
            samples in the requested segment, or holds NaN / infinite samples.
    """
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as audio_file:
            file_sr = audio_file.samplerate
            start = int(round(offset_seconds * file_sr))
            frames = -1 if max_seconds is None else int(math.ceil(max_seconds * file_sr))
            if start > 0:
                audio_file.seek(start)
            data = audio_file.read(frames=frames, dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise AudioDecodeError(f"cannot decode audio file {path}: {error}") from error
    if data.shape[0] == 0:
        raise AudioDecodeError(f"audio file {path} has no samples (offset {offset_seconds:.3f} s)")
    if not np.isfinite(data).all():  # float wavs can hold NaN / Inf samples
        raise AudioDecodeError(f"audio file {path} contains NaN or infinite samples")
    wave = data.T  # (channels, samples)
    if mono:
        wave = wave.mean(axis=0)  # (samples,)
    if target_sr is not None:
        wave = resample(wave, int(file_sr), int(target_sr))
    return np.ascontiguousarray(wave, dtype=np.float32)


def save_wav(path: str | os.PathLike, wave: np.ndarray, sr: int) -> None:
    """Write a PCM16 wav atomically (temp file in the same folder, then os.replace).

    Args:
        wave: (samples,) or (channels, samples) float array, clipped to [-1, 1].
        sr: sample rate in Hz.
    """
    path = Path(path)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim not in (1, 2):
        raise ValueError(f"save_wav {path}: expected (samples,) or (channels, samples), got {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"save_wav {path}: waveform contains NaN or inf")
    data = np.clip(wave, -1.0, 1.0)
    if data.ndim == 2:
        data = data.T  # soundfile wants (samples, channels)
    with atomic_path(path) as tmp:
        sf.write(tmp, data, int(sr), subtype="PCM_16", format="WAV")


def probe_audio(path: str | os.PathLike) -> tuple[float, int, int]:
    """Read an audio file's header.

    Returns:
        (duration in seconds, sample rate in Hz, number of channels).

    Raises:
        AudioDecodeError: naming the file, if the header cannot be read.
    """
    try:
        info = sf.info(str(path))
    except Exception as error:
        raise AudioDecodeError(f"cannot read audio header of {path}: {error}") from error
    return float(info.frames) / float(info.samplerate), int(info.samplerate), int(info.channels)


def peak_dbfs(wave: np.ndarray) -> float:
    """Peak level of a waveform in dB relative to full scale (-inf for digital silence)."""
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def check_audio_file(
    path: str | os.PathLike, min_duration: float, silence_peak_db: float
) -> tuple[str | None, str, float, int]:
    """Decide whether an existing audio file is usable for a manifest.

    Decodes the whole file (a readable header is not enough: truncated files fail here).

    Args:
        path: the audio file (must exist).
        min_duration: shortest usable clip in seconds.
        silence_peak_db: a clip whose peak level is below this (dBFS) counts as silent.

    Returns:
        (reason, detail, duration_s, sample_rate); reason is None for a usable clip, else
        one of "corrupt", "too_short", "silent", with a human-readable detail.
    """
    try:
        wave = load_audio(path, target_sr=None, mono=True)  # (samples,)
        _, sample_rate, _ = probe_audio(path)
    except AudioDecodeError as error:
        return "corrupt", str(error), 0.0, 0
    duration = wave.shape[0] / float(sample_rate)
    if duration < min_duration:
        return "too_short", f"{duration:.3f} s < min_duration {min_duration:.3f} s", duration, sample_rate
    level = peak_dbfs(wave)
    if level < silence_peak_db:
        return "silent", f"peak {level:.1f} dBFS < {silence_peak_db:.1f} dBFS", duration, sample_rate
    return None, "", duration, sample_rate


WAVE_NORMALIZATIONS = ("none", "audioldm")


def audioldm_normalize(wave: np.ndarray, peak: float = 0.5) -> np.ndarray:
    """AudioLDM's waveform preprocessing before its STFT (``read_wav_file`` /
    ``normalize_wav`` in the AudioLDM code): remove the mean, scale the peak to ``peak``
    (0.5). ``wave``: (S,) float — the clip's real samples (padding is added afterwards, as
    AudioLDM pads after normalising). A silent clip stays silent."""
    wave = wave.astype(np.float32) - np.float32(wave.mean()) if wave.size else wave.astype(np.float32)
    top = float(np.max(np.abs(wave))) if wave.size else 0.0
    return wave * np.float32(peak / (top + 1e-8))
