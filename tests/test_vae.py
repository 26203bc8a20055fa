"""Mel-VAE construction and strict loading from a local diffusers-format directory."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_modules.parts.vae import build_mel_vae, load_mel_vae, vae_downsampling_factor

TINY_VAE = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_tiny_vae_downsamples_4x_in_time_and_frequency():
    vae = build_mel_vae(**TINY_VAE)
    assert vae_downsampling_factor(vae) == 4
    posterior = vae.encode(torch.randn(2, 1, 32, 64)).latent_dist
    assert posterior.mean.shape == (2, 8, 8, 16)
    assert vae.decode(posterior.mean).sample.shape == (2, 1, 32, 64)


def test_bad_group_count_is_rejected():
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_mel_vae(block_out_channels=(8, 16, 16), norm_num_groups=32)


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_saved_vae_loads_and_reproduces_outputs(tmp_path, layout):
    torch.manual_seed(0)
    vae = build_mel_vae(**TINY_VAE).eval()
    directory = tmp_path / "vae" if layout == "pipeline" else tmp_path / "my_vae"
    vae.save_pretrained(directory)
    loaded = load_mel_vae(tmp_path if layout == "pipeline" else directory)
    image = torch.randn(1, 1, 16, 64)
    with torch.no_grad():
        expected = vae.decode(vae.encode(image).latent_dist.mean).sample
        actual = loaded.decode(loaded.encode(image).latent_dist.mean).sample
    torch.testing.assert_close(actual, expected)


def test_missing_and_unexpected_keys_fail_loudly(tmp_path):
    build_mel_vae(**TINY_VAE).save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state.pop("decoder.conv_in.bias")
    state["encoder.not_a_layer.weight"] = torch.zeros(1)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(RuntimeError, match=r"missing_keys: decoder\.conv_in\.bias") as error:
        load_mel_vae(tmp_path)
    assert "unexpected_keys: encoder.not_a_layer.weight" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_missing_dir_config_or_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_mel_vae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_mel_vae(tmp_path)
    build_mel_vae(**TINY_VAE).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no VAE weight file"):
        load_mel_vae(tmp_path)


def test_wrong_channel_count_is_refused(tmp_path):
    build_mel_vae(**TINY_VAE).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["in_channels"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="could not load|do not match"):
        load_mel_vae(tmp_path)


# ---------------------------------------------------------------- MelVAESystem training


def sine_batch(batch_size: int = 4, samples: int = 6400, seed: int = 0) -> dict:
    """Synthetic clips: sines at random frequencies, the last clip half padded."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    freqs = 200 + 3000 * torch.rand(batch_size, 1, generator=generator)
    wave = 0.5 * torch.sin(2 * torch.pi * freqs * t)
    wave_mask = torch.ones(batch_size, samples, dtype=torch.bool)
    wave_mask[-1, samples // 2 :] = False
    wave = wave * wave_mask
    return dict(wave=wave, wave_mask=wave_mask, captions=[["a sine"]] * batch_size, ids=[str(i) for i in range(batch_size)], labels=[[]] * batch_size)


def test_vae_system_learns_logs_and_exports(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.mel_vae import MelVAESystem
    from lightning_modules.parts.pretransform import MelVAEPretransform

    L.seed_everything(0)
    system = MelVAESystem(vae=TINY_VAE, lr=1e-2, kl_weight=1e-5, griffin_lim_iters=2, log_examples=1)
    batch = sine_batch()
    with torch.no_grad():
        system.eval()
        before = system.losses(batch)["recon"].item()
    system.train()
    from torch.utils.data import DataLoader

    train = DataLoader([batch] * 30, batch_size=None)  # each item is already a batch
    val = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(
        max_steps=30, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10, limit_val_batches=1, val_check_interval=30, num_sanity_val_steps=0,
    )
    trainer.fit(system, train_dataloaders=train, val_dataloaders=val)
    with torch.no_grad():
        system.eval()
        after = system.losses(batch)["recon"].item()
    assert after < 0.5 * before, (before, after)
    assert "val/recon" in trainer.callback_metrics and "train/kl" in trainer.callback_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent)).Reload()
    assert "val/mel_0" in events.Tags()["images"]
    assert "val/audio_0_recon_gl" in events.Tags()["audio"]

    exported = system.export_pretransform(tmp_path / "pretransform", [batch], vocoder_cfg=dict(griffin_lim_iters=2))
    loaded = MelVAEPretransform.load(tmp_path / "pretransform")
    assert loaded.has_latent_stats and loaded.fingerprint() == exported.fingerprint()
    with torch.no_grad():
        tokens, token_mask = loaded.encode(batch["wave"], batch["wave_mask"])
    assert tokens.shape == (4, 10, 128) and token_mask.sum(dim=1).tolist() == [10, 10, 10, 5]
    assert tokens[token_mask].mean().abs() < 0.5
