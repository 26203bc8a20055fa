"""Griffin-Lim and HiFi-GAN vocoders; log-spectral distance."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from lightning_modules.parts.mel import MelFrontEnd
from lightning_modules.parts.vocoder import GriffinLimVocoder, HifiGanVocoder, log_spectral_distance


def sine_wave(seconds: float = 1.0, sample_rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * torch.sin(2 * math.pi * 1000.0 * t)).unsqueeze(0)  # (1, S)


def tiny_hifigan_config(**overrides) -> SpeechT5HifiGanConfig:
    config = dict(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[5, 4, 4, 2],
        upsample_kernel_sizes=[10, 8, 8, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
    )
    config.update(overrides)
    return SpeechT5HifiGanConfig(**config)


def test_lsd_is_zero_for_identical_and_large_for_noise():
    wave = sine_wave()
    assert log_spectral_distance(wave, wave).item() == pytest.approx(0.0, abs=1e-4)
    assert log_spectral_distance(torch.randn_like(wave) * 0.1, wave).item() > 20.0


def test_griffin_lim_of_a_sine_is_close_and_beats_random_phase():
    mel = MelFrontEnd()
    wave = sine_wave()
    log_mel = mel(wave)
    out = GriffinLimVocoder(mel, n_iter=32)(log_mel)
    assert out.shape == wave.shape
    assert log_spectral_distance(out, wave).item() < 5.0  # dB, measured ~3.6

    # Phase retrieval itself, from the true magnitude: iterations must help a lot.
    magnitude = mel.magnitude(wave)
    random_phase = GriffinLimVocoder(mel, n_iter=0).griffin_lim(magnitude)
    retrieved = GriffinLimVocoder(mel, n_iter=32).griffin_lim(magnitude)
    shift = mel.hop_length // 2
    reference = wave[:, shift:]
    lsd_random = log_spectral_distance(random_phase[:, :-shift], reference).item()
    lsd_retrieved = log_spectral_distance(retrieved[:, :-shift], reference).item()
    assert lsd_retrieved < 0.6 * lsd_random, (lsd_retrieved, lsd_random)


def test_griffin_lim_mel_consistency_improves_with_iterations():
    mel = MelFrontEnd()
    torch.manual_seed(0)
    noise = torch.randn(1, 16000) * 0.1
    log_mel = mel(noise)
    errors = [(mel(GriffinLimVocoder(mel, n_iter=n)(log_mel)) - log_mel).abs().mean().item() for n in (0, 4, 16)]
    assert errors[1] < errors[0] and errors[2] < errors[1], errors
    assert errors[2] < 0.3 * errors[0], errors


def test_hifigan_loads_from_dir_or_pipeline_and_matches(tmp_path):
    torch.manual_seed(0)
    model = SpeechT5HifiGan(tiny_hifigan_config()).eval()
    model.save_pretrained(tmp_path / "vocoder")
    vocoder = HifiGanVocoder.from_pretrained(tmp_path)  # pipeline layout: tmp_path/vocoder
    assert vocoder.sample_rate == 16000 and vocoder.hop_length == 160 and vocoder.n_mels == 64
    log_mel = torch.randn(2, 64, 12)
    wave = vocoder(log_mel)
    assert wave.shape == (2, 12 * 160)
    with torch.no_grad():
        expected = model(log_mel.transpose(1, 2))[:, : 12 * 160]
    torch.testing.assert_close(wave, expected)
    torch.testing.assert_close(HifiGanVocoder.from_pretrained(tmp_path / "vocoder")(log_mel), wave)


def test_hifigan_tampered_or_missing_files_fail_clearly(tmp_path):
    SpeechT5HifiGan(tiny_hifigan_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state.pop("conv_post.bias")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"missing_keys: conv_post\.bias"):
        HifiGanVocoder.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no vocoder weight file"):
        HifiGanVocoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HifiGanVocoder.from_pretrained(tmp_path)
