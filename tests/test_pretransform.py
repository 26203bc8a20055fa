"""The token contract of MelVAEPretransform: shapes, rates, masks, save/load, fingerprint."""

import pytest
import torch
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from lightning_modules.parts.pretransform import MelVAEPretransform, compute_latent_stats
from lightning_modules.parts.vocoder import GriffinLimVocoder, HifiGanVocoder

# AudioLDM-like structure (3 blocks, 8 latent channels), tiny widths.
TINY_VAE = dict(block_out_channels=(4, 8, 8), layers_per_block=1, latent_channels=8, norm_num_groups=4)
FAST_GL = dict(kind="griffin_lim", griffin_lim_iters=2)


@pytest.fixture(scope="module")
def pretransform() -> MelVAEPretransform:
    torch.manual_seed(0)
    return MelVAEPretransform.from_scratch({}, TINY_VAE, FAST_GL).eval()


def test_token_contract_10_24_seconds(pretransform):
    assert pretransform.token_dim == 128
    assert pretransform.latent_channels == 8
    assert pretransform.tokens_per_second == 25.0
    assert pretransform.downsampling_ratio == 640
    assert pretransform.sample_rate == 16000
    with torch.no_grad():
        tokens, token_mask = pretransform.encode(torch.randn(1, 163840) * 0.1)
    assert tokens.shape == (1, 256, 128) and token_mask.shape == (1, 256) and token_mask.all()
    assert pretransform.num_tokens(163840) == 256


def test_padded_clips_get_masks_and_odd_lengths_are_padded(pretransform):
    wave = torch.randn(2, 16000) * 0.1  # 100 frames -> 25 tokens
    wave_mask = torch.zeros(2, 16000, dtype=torch.bool)
    wave_mask[0] = True
    wave_mask[1, :6400] = True  # 40 frames -> 10 tokens
    with torch.no_grad():
        mean, std, token_mask = pretransform.encode_moments(wave, wave_mask)
    assert mean.shape == std.shape == (2, 25, 128)
    assert token_mask.sum(dim=1).tolist() == [25, 10]
    assert (std > 0).all()
    # 1.01 s = 101 frames: padded to 104, token 26 holds one real frame.
    with torch.no_grad():
        tokens, token_mask = pretransform.encode(torch.randn(1, 16160) * 0.1)
    assert tokens.shape == (1, 26, 128) and token_mask.all()
    # a partly valid last token: 6480 samples -> 40.5 -> 41 valid frames -> 11 tokens
    wave_mask[1, :6480] = True
    with torch.no_grad():
        _, token_mask = pretransform.encode(wave, wave_mask)
    assert token_mask[1].sum() == 11


def test_decode_shapes_and_layout_roundtrip(pretransform):
    tokens = torch.randn(2, 5, 128)
    latent = pretransform.tokens_to_latent(tokens)
    assert latent.shape == (2, 8, 5, 16)
    torch.testing.assert_close(pretransform.latent_to_tokens(latent), tokens)
    # token dim index = channel * 16 + frequency
    assert tokens[0, 3, 2 * 16 + 7] == latent[0, 2, 3, 7]
    with torch.no_grad():
        assert pretransform.decode_mel(tokens).shape == (2, 64, 20)
        assert pretransform.decode(tokens).shape == (2, 5 * 640)


def test_normalisation_and_stats(pretransform):
    with pytest.raises(ValueError, match="shape"):
        pretransform.set_latent_stats(torch.zeros(128), torch.ones(128))
    batches = [(torch.randn(2, 3200) * 0.1, None), (torch.randn(1, 3200) * 0.1, torch.ones(1, 3200, dtype=torch.bool))]
    mean, std = compute_latent_stats(pretransform, batches)
    assert mean.shape == std.shape == (8,)
    pretransform.set_latent_stats(mean, std)
    try:
        with torch.no_grad():
            tokens, _ = pretransform.encode(torch.cat([b[0] for b in batches]))
        per_channel = tokens.reshape(-1, 8, 16).transpose(0, 1).reshape(8, -1)
        torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(8), atol=1e-4, rtol=0)
        torch.testing.assert_close(per_channel.std(dim=1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
        raw = torch.randn(3, 4, 128)
        torch.testing.assert_close(pretransform.denormalize(pretransform.normalize(raw)), raw)
    finally:
        pretransform.set_latent_stats(torch.zeros(8), torch.ones(8))


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    torch.manual_seed(1)
    original = MelVAEPretransform.from_scratch({}, TINY_VAE, FAST_GL).eval()
    original.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    original.save(tmp_path / "pt")
    loaded = MelVAEPretransform.load(tmp_path / "pt")
    assert loaded.fingerprint() == original.fingerprint()
    assert isinstance(loaded.vocoder, GriffinLimVocoder) and loaded.vocoder.n_iter == 2
    wave = torch.randn(1, 3200) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(wave)[0], original.encode(wave)[0])
    torch.testing.assert_close(loaded.latent_std, original.latent_std)

    other = MelVAEPretransform.from_scratch({}, TINY_VAE, FAST_GL)
    assert other.fingerprint() != original.fingerprint()
    assert MelVAEPretransform.from_scratch({"n_mels": 32}, TINY_VAE, FAST_GL).fingerprint() != other.fingerprint()

    with pytest.raises(FileNotFoundError, match="pretransform.json"):
        MelVAEPretransform.load(tmp_path)


def test_from_pretrained_with_hifigan(tmp_path):
    torch.manual_seed(2)
    vae_source = MelVAEPretransform.from_scratch({}, TINY_VAE, FAST_GL)
    vae_source.vae.save_pretrained(tmp_path / "audioldm" / "vae")
    config = SpeechT5HifiGanConfig(
        model_in_dim=64, upsample_initial_channel=16, upsample_rates=[5, 4, 4, 2], upsample_kernel_sizes=[10, 8, 8, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
    )
    SpeechT5HifiGan(config).save_pretrained(tmp_path / "audioldm" / "vocoder")
    loaded = MelVAEPretransform.from_pretrained(tmp_path / "audioldm", vocoder_dir=tmp_path / "audioldm").eval()
    assert isinstance(loaded.vocoder, HifiGanVocoder)
    assert loaded.fingerprint() == vae_source.fingerprint()
    with torch.no_grad():
        assert loaded.decode(torch.randn(1, 3, 128)).shape == (1, 3 * 640)
    loaded.save(tmp_path / "export")
    reloaded = MelVAEPretransform.load(tmp_path / "export")
    assert isinstance(reloaded.vocoder, HifiGanVocoder)
    assert (tmp_path / "export" / "vocoder" / "config.json").is_file()


def test_mismatched_vocoder_is_refused(tmp_path):
    config = SpeechT5HifiGanConfig(
        model_in_dim=80, upsample_initial_channel=16, upsample_rates=[5, 4, 4, 2], upsample_kernel_sizes=[10, 8, 8, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]], normalize_before=False,
    )
    SpeechT5HifiGan(config).save_pretrained(tmp_path / "vocoder")
    with pytest.raises(ValueError, match="model_in_dim 80"):
        MelVAEPretransform.from_scratch({}, TINY_VAE, dict(kind="hifigan", pretrained_dir=str(tmp_path)))
