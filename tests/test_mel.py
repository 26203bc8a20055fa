"""MelFrontEnd and the slaney mel filterbank (AudioLDM / librosa conventions)."""

import math

import torch

from lightning_modules.parts.mel import (
    MelFrontEnd,
    frame_mask_from_wave_mask,
    hz_to_mel_slaney,
    mel_center_frequencies,
    mel_filterbank,
    mel_to_hz_slaney,
)


def sine(freq_hz: float, seconds: float, sample_rate: int = 16000, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return amplitude * torch.sin(2 * math.pi * freq_hz * t)


def test_slaney_mel_scale_hand_values():
    # Linear below 1 kHz (200/3 Hz per mel), 27 mels per factor 6.4 above.
    assert math.isclose(float(hz_to_mel_slaney(torch.tensor(500.0))), 7.5, rel_tol=1e-9)
    assert math.isclose(float(hz_to_mel_slaney(torch.tensor(1000.0))), 15.0, rel_tol=1e-9)
    assert math.isclose(float(hz_to_mel_slaney(torch.tensor(6400.0))), 42.0, rel_tol=1e-9)
    assert math.isclose(float(hz_to_mel_slaney(torch.tensor(8000.0))), 15 + 27 * math.log(8) / math.log(6.4), rel_tol=1e-9)
    hz = torch.tensor([0.0, 123.0, 999.0, 1000.0, 3000.0, 8000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz_slaney(hz_to_mel_slaney(hz)), hz)


def test_filterbank_shape_and_slaney_area_normalisation():
    weights = mel_filterbank(16000, 1024, 64, 0.0, 8000.0)
    assert weights.shape == (64, 513)  # (n_mels, n_freqs), as librosa
    assert (weights >= 0).all()
    # Slaney norm: each triangle has area ~1 in Hz (sum of weights x bin width).
    bin_hz = 16000 / 1024
    area = weights.sum(dim=1) * bin_hz
    assert torch.allclose(area[8:], torch.ones(56), rtol=0.02), area[8:]
    # Peak height of a triangle = 2 / (upper edge - lower edge) when a bin hits the centre.
    edges = mel_center_frequencies(64, 0.0, 8000.0)
    assert torch.all(weights.max(dim=1).values <= (2.0 / (edges[2:] - edges[:-2])).float() * (1 + 1e-5))


def test_10_24_seconds_gives_1024_frames_and_sine_peaks_in_right_bin():
    front_end = MelFrontEnd()
    log_mel = front_end(torch.zeros(2, 163840))
    assert log_mel.shape == (2, 64, 1024)
    assert torch.allclose(log_mel, torch.full_like(log_mel, math.log(1e-5)))  # silence = log floor
    assert front_end(torch.zeros(1, 16000 + 100)).shape == (1, 64, 100)  # frames = S // hop

    log_mel = front_end(sine(1000.0, 1.0).unsqueeze(0))  # (1, 64, 100)
    peak_bin = int(log_mel[0, :, 10:-10].mean(dim=1).argmax())
    centres = mel_center_frequencies(64, 0.0, 8000.0)[1:-1]
    assert peak_bin == int((centres - 1000.0).abs().argmin())


def test_mel_to_linear_is_consistent_with_the_filterbank():
    front_end = MelFrontEnd()
    log_mel = front_end(torch.randn(1, 8000) * 0.1)
    linear = front_end.mel_to_linear(log_mel)
    assert linear.shape == (1, 513, 50) and (linear >= 0).all()
    back = torch.log(torch.clamp(front_end.mel_basis @ linear, min=1e-5))
    assert (back - log_mel).abs().mean() < 0.1


def test_frame_mask_from_wave_mask():
    wave_mask = torch.zeros(2, 1600, dtype=torch.bool)
    wave_mask[0, :800] = True
    wave_mask[1, :801] = True
    frames = frame_mask_from_wave_mask(wave_mask, 160, 10)
    assert frames.sum(dim=1).tolist() == [5, 6]


def test_filterbank_equals_librosa():
    """The AudioLDM filterbank is librosa's slaney mel (AudioLDM builds it with librosa)."""
    import librosa

    reference = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)
    ours = mel_filterbank(16000, 1024, 64, 0.0, 8000.0).double().numpy()
    assert abs(ours - reference).max() < 2e-9


def test_log_mel_equals_librosa_stft_path():
    """AudioLDM's TacotronSTFT framing: reflect pad (n_fft - hop) / 2, center=False, magnitude,
    mel, log(clamp 1e-5) — computed with librosa on a 2 s tone plus noise."""
    import librosa
    import numpy as np

    g = torch.Generator().manual_seed(0)
    wave = sine(440.0, 2.0, amplitude=0.3) + 0.05 * torch.randn(32000, generator=g)
    x = wave.double().numpy()
    pad = (1024 - 160) // 2
    padded = np.pad(x, (pad, pad), mode="reflect")
    magnitude = np.abs(librosa.stft(padded, n_fft=1024, hop_length=160, win_length=1024, window="hann", center=False))
    mel = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000) @ magnitude
    reference = np.log(np.clip(mel, 1e-5, None))
    ours = MelFrontEnd()(wave.unsqueeze(0))[0].double().numpy()
    assert ours.shape == reference.shape == (64, 200)
    assert abs(ours - reference).max() < 1e-5  # measured 2.9e-6: our STFT runs in float32
