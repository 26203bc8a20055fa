"""The whole pipeline on the real `demo` config shrunk to seconds: corpus → VAE → cache → LM
→ samples; `make generate` on its checkpoint; cache resume and refusal; exact resume."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.latent_cache import CacheMismatchError, LatentCacheWriter
from experiments import pipeline
from experiments.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(root: Path) -> list[str]:
    return [
        f"run.root={root}/runs",
        f"run.data_root={root}/data",
        "corpus.num_train=32",
        "corpus.num_val=4",
        "corpus.num_test=4",
        "corpus.num_test_novel=4",
        "corpus.clip_seconds=2.0",
        "data.clip_seconds=2.0",
        "data.batch_size=8",
        "vae_train.max_steps=4",
        "vae_train.val_every_steps=4",
        "vae_train.stats_batches=2",
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "model.max_tokens=50",
        "model.head.width=32",
        "model.head.depth=1",
        "text.width=16",
        "text.depth=1",
        "text.heads=2",
        "trainer.max_steps=8",
        "trainer.batch_size=8",
        "trainer.val_every_steps=4",
        "trainer.ckpt_every_steps=4",
        "trainer.log_every_steps=2",
        "sample.num_captions=2",
        "sample.steps=4",
        "sample.seconds=1.0",
        "vocoder.griffin_lim_iters=4",
    ]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config("demo", [*tiny_overrides(root), "sample.every_steps=4"])  # samples at steps 4 and 8
    run_dir = pipeline.run_task(cfg)
    return root, run_dir


def test_demo_pipeline_writes_samples_checkpoints_and_logs(demo_run):
    root, run_dir = demo_run
    assert (root / "runs" / "vae_demo" / "last" / "pretransform" / "pretransform.json").is_file()
    assert (root / "runs" / "demo" / "last").resolve() == run_dir.resolve()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    samples = run_dir / "samples" / "step_0000008"
    listing = json.loads((samples / "samples.json").read_text())
    assert len(listing["samples"]) == 2 and all(s["caption"] for s in listing["samples"])
    import soundfile as sf

    for entry in listing["samples"]:
        wave, rate = sf.read(samples / entry["file"])
        assert rate == 16000 and len(wave) == 16000 and abs(wave).max() > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["timings_s"]) == {"corpus", "vae", "cache", "lm"}
    assert "val/loss" in summary["final_metrics"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["model"]["width"] == 32  # resolved config in every checkpoint
    assert ckpt["hyper_parameters"]["pretransform_fingerprint"]


def test_tensorboard_reads_back_training_curves_samples_and_hparams(demo_run):
    """What `make tensorboard` shows, read back with TensorBoard's own event reader: the
    training scalars, and per render (steps 4 and 8, EMA weights) audio + log-mel image at
    each CFG scale with the captions as text; the HParams tab with the final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, run_dir = demo_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"audio": 0, "images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/loss_next_token", "train/loss_skipped_target", "train_loss_by_t/50", "val/loss",
            "val/caption_gain", "lr-AdamW/pg1", "train/grad_norm", "train/clipped_steps", "train/audio_tokens_per_s",
            "train/step_time_s", "final/val/loss"} <= set(tags["scalars"])
    # tokens/s = (audio tokens in a step) / (time per step): 8 clips of 2 s = 8 × 50 tokens a step
    speed, step_time = events.Scalars("train/audio_tokens_per_s")[-1].value, events.Scalars("train/step_time_s")[-1].value
    assert speed > 0 and step_time > 0 and speed * step_time == pytest.approx(400, rel=1e-3)
    for scale in ("5", "1", "3"):  # sample.cfg_scale of the demo, then sample.extra_cfg_scales
        for i in ("00", "01"):
            audio = events.Audio(f"samples/cfg_{scale}/{i}")
            assert [a.step for a in audio] == [4, 8] and all(a.sample_rate == 16000 for a in audio)
            assert [image.step for image in events.Images(f"samples/cfg_{scale}/{i}/mel")] == [4, 8]
        assert len(list((run_dir / "samples" / "step_0000008" / (f"cfg_{scale}" if scale != "5" else "")).glob("*.wav"))) == 2
    captions = [json.loads((run_dir / "samples" / "step_0000004" / "samples.json").read_text())["samples"][i]["caption"]
                for i in range(2)]
    for i, caption in enumerate(captions):
        texts = events.Tensors(f"samples/{i:02d}/caption/text_summary")
        assert [t.step for t in texts] == [4, 8] and caption in texts[-1].tensor_proto.string_val[0].decode()
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "final/val/loss" in {m.name.tag for m in experiment.metric_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["model/width"].number_value == 32 and session.hparams["mntp/ratio/kind"].string_value == "mixture"


def test_make_train_shows_progress_with_eta_for_every_long_stage(tmp_path):
    """`make train` from nothing: the corpus, the VAE's and the LM's training (one bar over
    trainer.max_steps each, not per epoch) and the latent cache each show a bar with its ETA."""
    result = subprocess.run([sys.executable, "-m", "experiments.train", "demo", *tiny_overrides(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    eta = r"\[[\d:]+<[\d:]+"
    assert re.search(r"\[corpus\] synthetic: +100%\|.*\| 44/44 " + eta, output)
    assert re.search(r"\[cache\] train: +100%\|.*\| 2/2 " + eta, output)
    assert len(re.findall(r"Training: 100%\|.*\| (\d+)/\1 " + eta + r".*step/s", output)) >= 2  # VAE, then LM
    assert re.search(r"Training: 100%\|.*\| 8/8 ", output) and re.search(r"Training: 100%\|.*\| 4/4 ", output)
    assert "Epoch 1" not in output  # one bar for the run


def test_figures_draw_the_samples_grid_and_learning_curve_of_a_run(demo_run, tmp_path, capsys):
    from matplotlib.image import imread

    from experiments import figures

    root, run_dir = demo_run
    assert figures.main(["--run", str(run_dir), "--out", str(tmp_path / "figures")]) == 0
    samples, curve = tmp_path / "figures" / "demo_samples.png", tmp_path / "figures" / "demo_learning_curve.png"
    printed = capsys.readouterr().out
    assert str(samples) in printed and str(curve) in printed
    grid = imread(samples)  # 2 captions × 3 CFG scales at 80 dpi: (2 × 1.9 in, 3 × 3.2 in)
    assert grid.shape[:2] == (304, 768) and grid.std() > 0.05
    assert imread(curve).shape[:2] == (240, 800)
    scalars = figures.read_scalars(run_dir)
    assert list(scalars["val/loss"][0]) == [3, 7]  # Lightning logs a validation at the step index before the count
    empty = tmp_path / "runs" / "demo" / "empty"
    empty.mkdir(parents=True)
    (empty / "summary.json").write_text("{}")
    assert figures.main(["--run", str(empty), "--out", str(tmp_path / "figures")]) == 2
    assert "holds no step_* folder" in capsys.readouterr().err


def test_generate_cli_on_the_demo_checkpoint(demo_run, tmp_path):
    root, run_dir = demo_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a high pitched beep pulsing\n\nlow hum fading away\n")
    out = tmp_path / "gen"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--prompts", str(prompts),
         "--prompt", "white noise", "--seconds", "0.5", "--steps", "3", "--cfg", "2", "--cfg-schedule", "linear",
         "--cfg-rescale", "0.5", "--seed", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"\[generate\] 3 clips: +100%\|.*\| 12/12 \[[\d:]+<[\d:]+", result.stderr)  # tokens, with ETA
    listing = json.loads((out / "samples.json").read_text())
    assert [s["caption"] for s in listing["samples"]] == ["white noise", "a high pitched beep pulsing", "low hum fading away"]
    assert listing["settings"]["cfg_scale"] == 2 and listing["settings"]["steps"] == 3 and listing["settings"]["seed"] == 1
    assert listing["settings"]["cfg_schedule"] == "linear" and listing["settings"]["cfg_rescale"] == 0.5
    assert len(list(out.glob("*.wav"))) == 3

    # Longer than the checkpoint's model.max_tokens (50 tokens = 2 s): generated with a sliding window.
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--prompt", "white noise",
         "--seconds", "3", "--steps", "2", "--out", str(tmp_path / "long")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "needs 75 tokens, beyond the checkpoint's context (model.max_tokens=50, 2 s)" in result.stdout
    assert "sliding window of 48 tokens (sample.window_end_tokens=2) that keeps the newest 36" in result.stdout
    import soundfile as sf

    wave, rate = sf.read(next((tmp_path / "long").glob("*.wav")))
    assert len(wave) == 3 * rate
    settings = json.loads((tmp_path / "long" / "samples.json").read_text())["settings"]
    assert settings["window_shift_seconds"] == [1.92, 2.4, 2.88]  # tokens 48, 60, 72 at 25 tokens/s: where to listen
    assert settings["window_end_tokens"] == 2 and settings["window_overlap"] == 0.75
    result = subprocess.run(  # the window set on the command line: the whole context, half kept
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--prompt", "white noise",
         "--seconds", "3", "--steps", "2", "--window-end-tokens", "0", "--window-overlap", "0.5", "--out", str(tmp_path / "whole")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "whole" / "samples.json").read_text())["settings"]["window_shift_seconds"] == [2.0]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--prompt", "white noise",
         "--seconds", "3", "--window-end-tokens", "49", "--out", str(tmp_path / "never")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "sample.window_end_tokens must be in [0, model.max_tokens - 2 = 48], got 49" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_seam_measure_tells_a_planted_seam_from_its_control():
    from experiments.seam import measure_seam

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 40, 8, generator=generator).cumsum(dim=1) * 0.1  # a smooth walk
    tokens[:, 20:] += 5.0  # a jump at the window shift (token 20), none at the control (30)
    log_mel = tokens.repeat_interleave(4, dim=1)
    result = measure_seam(tokens, log_mel, [20], frames_per_token=4)
    assert result["tokens"]["ratio"] > 10 and result["tokens"]["exceed_p95"] == 1.0
    assert result["tokens_control"]["ratio"] < 3 and result["log_mel"]["ratio"] > 10
    assert result["log_mel_control"]["exceed_p95"] < 1.0


def test_seam_cli_measures_the_window_shifts_of_the_demo_checkpoint(demo_run, tmp_path, capsys):
    from experiments import seam

    root, run_dir = demo_run
    out = tmp_path / "seam.json"
    assert seam.main(["--runs", str(root / "runs"), "--seconds", "3", "--captions", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shifts"] == [48, 60, 72] and len(result["captions"]) == 2  # as make generate's window_shift_seconds
    assert result["window_end_tokens"] == 2  # the demo's sample.window_end_tokens
    assert {"tokens", "tokens_control", "log_mel", "log_mel_control"} <= set(result)
    assert all(result[key]["at_boundary"] > 0 for key in ("tokens", "log_mel"))
    assert "[seam] tokens " in capsys.readouterr().out
    assert seam.main(["--runs", str(root / "runs"), "--seconds", "3", "--captions", "1", "--end-tokens", "0",
                      "--out", str(out)]) == 0
    assert json.loads(out.read_text())["shifts"] == [50, 62, 74]  # the whole context, as before the option
    with pytest.raises(SystemExit, match="--end-tokens=49 must be in \\[0, model.max_tokens - 2 = 48\\]"):
        seam.main(["--runs", str(root / "runs"), "--seconds", "3", "--end-tokens", "49", "--out", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit, match="fits the context"):
        seam.main(["--runs", str(root / "runs"), "--seconds", "1", "--out", str(tmp_path / "none.json")])
    assert not (tmp_path / "none.json").exists()


def test_generate_cli_continues_an_audio_prompt(demo_run, tmp_path):
    """`make generate AUDIO_PROMPT=clip.wav`: the wav is the prompt's resynthesis followed by the
    continuation; samples.json records what was given; a clip that does not decode is refused."""
    import soundfile as sf

    root, run_dir = demo_run
    clip = sorted((root / "data" / "synthetic").rglob("*.wav"))[0]
    out = tmp_path / "continued"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--audio-prompt", str(clip),
         "--prompt-seconds", "0.4", "--seconds", "0.8", "--steps", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listing = json.loads((out / "samples.json").read_text())
    settings = listing["settings"]
    assert settings["audio_prompt"] == str(clip.resolve()) and settings["unconditional"] is True
    assert settings["prompt_tokens"] == 10 and settings["prompt_seconds"] == 0.4  # 25 tokens per second
    wave, rate = sf.read(out / listing["samples"][0]["file"])
    assert len(wave) == round((0.4 + 0.8) * rate)  # prompt + continuation

    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio at all")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--audio-prompt",
         str(tmp_path / "broken.wav"), "--prompt", "white noise", "--out", str(tmp_path / "never")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "audio prompt: cannot decode audio file" in result.stderr
    assert "broken.wav" in result.stderr and "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_audio_prompt_is_cut_from_an_encoding_that_sees_past_it(demo_run, tmp_path):
    """The VAE encodes a clip's last token as a clip end: the prompt's tokens come from an
    encoding of the file read past them; a file that ends within the prompt loses that last
    token; one shorter than two tokens is refused, naming the file."""
    import soundfile as sf

    from datamodules.audio_io import load_audio
    from experiments.config import config_from_container

    root, run_dir = demo_run
    system = pipeline.load_audio_lm(run_dir / "checkpoints" / "last.ckpt", torch.device("cpu"))
    cfg = config_from_container(system.hparams["config"])
    pretransform = pipeline.load_pretransform_for(cfg).eval()
    clip = sorted((root / "data" / "synthetic").rglob("*.wav"))[0]  # 2 s
    prompt = pipeline.encode_audio_prompt(cfg, system, pretransform, clip, 0.4)
    wave = load_audio(clip, target_sr=pretransform.sample_rate)
    with torch.no_grad():
        mean, _, _ = pretransform.encode_moments(torch.from_numpy(wave)[None])
    whole = (mean - system.latent_mean) / system.latent_std  # (1, 50, D): the clip encoded at once
    assert prompt.shape == (1, 10, system.token_dim)
    # the VAE's GroupNorm statistics span its whole input, so a longer read shifts every token a little
    torch.testing.assert_close(prompt, whole[:, :10], atol=2e-2, rtol=0)

    sf.write(tmp_path / "short.wav", wave[: int(0.4 * pretransform.sample_rate)], pretransform.sample_rate)
    assert pipeline.encode_audio_prompt(cfg, system, pretransform, tmp_path / "short.wav", 0.4).shape[1] == 9
    sf.write(tmp_path / "tiny.wav", wave[:1000], pretransform.sample_rate)  # 62 ms: under two 40 ms tokens
    with pytest.raises(ValueError, match="tiny.wav holds 0.062 s, less than two tokens"):
        pipeline.encode_audio_prompt(cfg, system, pretransform, tmp_path / "tiny.wav", 0.4)


def test_generate_cli_streams_pcm_while_sampling(demo_run, tmp_path):
    """`--stream --pcm FILE`: chunks are written as they come (16-bit PCM of the first clip),
    the time to first audio is recorded, and the wav has the one-shot length."""
    import numpy as np
    import soundfile as sf

    root, run_dir = demo_run
    out, pcm = tmp_path / "streamed", tmp_path / "stream.pcm"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(root / "runs"), "--prompt", "white noise",
         "--seconds", "1.0", "--steps", "2", "--stream", "--pcm", str(pcm), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "first audio of batch 1 after" in result.stdout
    settings = json.loads((out / "samples.json").read_text())["settings"]
    assert settings["stream"]["chunk_tokens"] == 8 and len(settings["first_audio_seconds"]) == 1
    wave, rate = sf.read(next(out.glob("*.wav")))
    streamed = np.frombuffer(pcm.read_bytes(), dtype="<i2") / 32767.0
    assert len(wave) == rate and len(streamed) == rate
    assert np.abs(streamed - wave).max() < 2e-4  # the wav is the streamed chunks (16-bit rounding apart)

    result = subprocess.run([sys.executable, "-m", "experiments.generate", "--prompt", "x", "--pcm", "-"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--pcm writes streamed chunks; add --stream" in result.stderr


def test_generate_cli_without_prompt_or_checkpoint_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--runs", str(tmp_path), "--prompt", "x"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "make train EXP=demo" in result.stderr


def test_cache_is_reused_and_a_stale_one_is_refused(demo_run):
    root, _ = demo_run
    cfg = load_config("demo", tiny_overrides(root))
    sources = pipeline.manifest_sources(cfg)
    pretransform = pipeline.load_pretransform_for(cfg)
    fingerprint = pipeline.cache_fingerprint(cfg, pretransform, sources)
    cache_dir = pipeline.ensure_latent_cache(cfg, pretransform, sources)  # already complete: reused
    assert cache_dir == pipeline.cache_dir_for(cfg, fingerprint)
    stale = dict(fingerprint, pretransform="another-vae")
    with pytest.raises(CacheMismatchError, match="pretransform"):
        LatentCacheWriter(cache_dir, fingerprint=stale, dtype=cfg.cache.dtype)


def test_cache_takes_captions_edited_in_the_manifest_without_encoding_again(demo_run, tmp_path, capsys):
    """The cache fingerprint covers what the latents depend on; captions edited in the
    manifest afterwards reach the cache (and so training) instead of staying stale."""
    from datamodules.latent_cache import LatentCache
    from datamodules.manifest import read_manifest, write_manifest

    root, _ = demo_run
    cfg = load_config("demo", [*tiny_overrides(root), f"run.data_root={tmp_path}",
                               f"vae.dir={root}/runs/vae_demo/last/pretransform"])
    sources = pipeline.manifest_sources(cfg)
    pretransform = pipeline.load_pretransform_for(cfg)
    cache_dir = pipeline.ensure_latent_cache(cfg, pretransform, sources)
    shards = {p: p.stat().st_mtime_ns for p in cache_dir.glob("shard_*.pt")}
    entries = read_manifest(sources[0].path)
    index, edited = next((i, e) for i, e in enumerate(entries) if e.split == "train")
    entries[index] = edited = dataclasses.replace(edited, captions=["a brand new caption", "and another one"])
    write_manifest(sources[0].path, entries)
    capsys.readouterr()
    assert pipeline.ensure_latent_cache(cfg, pretransform, sources) == cache_dir
    assert "captions or labels of 1 clips updated" in capsys.readouterr().out
    record = next(r for r in LatentCache(cache_dir).records("train") if r["id"] == edited.id)
    assert record["captions"] == ["a brand new caption", "and another one"]
    assert sum(p.stat().st_mtime_ns != t for p, t in shards.items()) == 1  # one shard rewritten, nothing encoded
    pipeline.ensure_latent_cache(cfg, pretransform, sources)
    assert "updated" not in capsys.readouterr().out


@pytest.mark.slow
def test_resumed_run_continues_exactly(tmp_path):
    """Train 8 steps straight; resume the step-4 checkpoint to step 8: same weights."""
    overrides = tiny_overrides(tmp_path)
    straight = pipeline.run_task(load_config("demo", overrides))
    resumed = pipeline.run_task(
        load_config("demo", [*overrides, f"trainer.resume={straight / 'checkpoints' / 'step0000004.ckpt'}"])
    )
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        tensors = {name: value for name, value in a[key].items() if torch.is_tensor(value)}
        assert len(tensors) > 20
        for name, value in tensors.items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"


def test_bench_reports_every_ratio(tmp_path):
    from experiments import bench

    assert bench.main(["demo", *tiny_overrides(tmp_path), "--repeats", "1", "--no-compile",
                       "--gen-seconds", "2.4", "--gen-batches", "1", "2"]) == 0
    (report,) = (tmp_path / "runs" / "bench").glob("*.json")
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"kv_cache", "diffusion_batch_mul", "latent_cache", "bf16_autocast", "autocast_region",
                            "activation_checkpointing", "generation"}
    assert results["activation_checkpointing"]["memory_ratio"] > 1  # checkpointing keeps fewer activations
    generation = results.pop("generation")
    assert [row["batch"] for row in generation] == [1, 2] and all(row["tokens"] == 60 for row in generation)  # beyond the 50-token context
    assert all(v > 0 for r in [*results.values(), *generation] for k, v in r.items() if k.endswith("_s"))
    assert all(row["rtf"] == pytest.approx(row["wall_s"] / 2.4) for row in generation)


def test_corpus_cli_generates_and_counts(tmp_path, capsys):
    from experiments import corpus

    overrides = [f"run.data_root={tmp_path}", "corpus.num_train=4", "corpus.num_val=2", "corpus.num_test=2",
                 "corpus.num_test_novel=2", "corpus.clip_seconds=1.0"]
    assert corpus.main(["demo", *overrides]) == 0
    out = capsys.readouterr().out
    assert "train 4" in out and "test_novel 2" in out
    assert corpus.main(["ntp_base"]) == 2


def test_resume_last_continues_the_previous_run(demo_run):
    """`trainer.resume=last` takes the previous run's last.ckpt (resolved before the new run
    directory becomes `last`) and continues from its step."""
    root, previous = demo_run
    cfg = load_config("demo", [*tiny_overrides(root), "trainer.resume=last", "trainer.max_steps=10"])
    resumed = pipeline.run_task(cfg)
    assert resumed != previous
    state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 10
    assert not (resumed / "checkpoints" / "step0000004.ckpt").exists()  # steps 1-8 were not trained again


def test_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path, capsys):
    """`make gpu-check`'s whole path (rehearsal tree → masked_base through the pipeline →
    KV-cache generation → report) with tiny shapes on the CPU; without --smoke and without a
    GPU it refuses clearly."""
    from experiments import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main(["--root", str(tmp_path / "refused")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert gpu_check.main(["--smoke", "--root", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps_timed"] == 3 and report["step_s"] > 0 and report["generation"]["finite"]
    assert report["generation"]["samples"] == 16000  # 1 s at 16 kHz through the HiFi-GAN directory


def test_bench_paper_config_generation_only_with_random_pretrained_folders(tmp_path, monkeypatch):
    """`make bench EXP=ntp_base ARGS="--no-train --random-pretrained DIR"`: the folders are
    written once (here tiny, through the same writer the full size uses), the experiment
    loads its VAE, HiFi-GAN, FLAN-T5 and CLAP from them, and only generation is timed."""
    from experiments import bench, rehearsal

    sizes = []
    real_write = rehearsal.write_pretrained

    def tiny_write(directory, captions, seed=0, size="tiny"):
        sizes.append(size)
        return real_write(directory, captions, seed=seed, size="tiny")

    monkeypatch.setattr(rehearsal, "write_pretrained", tiny_write)
    folder = tmp_path / "pretrained"
    argv = ["ntp_base", f"run.root={tmp_path}/runs", "model.width=32", "model.depth=2", "model.heads=2",
            "model.max_tokens=50", "model.head.width=32", "model.head.depth=1", "text.t5_max_tokens=8",
            "--no-train", "--random-pretrained", str(folder), "--gen-seconds", "0.4", "--gen-batches", "1",
            "sample.steps=2"]  # an override after a list option is still an override
    assert bench.main(argv) == 0
    assert sizes == ["full"] and (folder / "audioldm" / "vocoder" / "config.json").is_file()
    (report,) = (tmp_path / "runs" / "bench").glob("*.json")
    data = json.loads(report.read_text())
    assert set(data["results"]) == {"generation"} and str(folder) in data["pretrained"]
    (row,) = data["results"]["generation"]
    assert row["tokens"] == 10 and row["vocoder_s"] > 0 and row["sampler"] == "ddpm" and row["steps"] == 2
    report.unlink()
    assert bench.main(argv) == 0 and sizes == ["full"]  # the folders are reused, not written again


def test_time_budget_ends_the_run_by_its_deadline_with_the_schedule_complete(demo_run):
    """trainer.time_budget_minutes times the warmup's steps and sets max_steps to what fits,
    then corrects it half-way: the run stops near the deadline (not at the configured 100000
    steps), its LR has annealed to min_lr, and the decisions travel in the checkpoint."""
    root, _ = demo_run  # corpus, VAE and cache exist: the budget goes to the LM
    budget_s = 20.0
    cfg = load_config("demo", [*tiny_overrides(root), "trainer.max_steps=100000", f"trainer.time_budget_minutes={budget_s / 60}",
                               "optim.warmup_steps=20", "trainer.val_every_steps=1000000", "trainer.ckpt_every_steps=1000000",
                               "sample.every_steps=0"])
    start = time.time()
    run_dir = pipeline.run_task(cfg)
    elapsed = time.time() - start
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = state["global_step"]
    assert 20 < steps < 100000
    assert budget_s * 0.6 < elapsed < budget_s * 1.5, elapsed  # the final sample render and checkpoint come after the last step
    (budget,) = [v for k, v in state["callbacks"].items() if "TimeBudget" in k]
    assert budget["decided_max_steps"] == steps
    # corrected once, half-way, with the schedule anchored there
    assert budget["refine_step"] is None and budget["anchor"] is not None and 20 < budget["anchor"][0] < steps
    assert 0.0 < budget["anchor"][1] < 1.0
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio, rel=0.05)


def test_cosine_progress_stays_continuous_where_a_time_budget_changes_the_step_count():
    from lightning_modules.audio_lm import cosine_progress

    warmup, old_total, anchor_step = 100, 1000, 550
    before = cosine_progress(anchor_step, warmup, old_total)
    assert before == pytest.approx(0.5)
    for new_total in (800, 1300):  # fewer or more steps than first decided
        anchor = (anchor_step, before)
        assert cosine_progress(anchor_step, warmup, new_total, anchor) == pytest.approx(before)
        assert cosine_progress(anchor_step + 1, warmup, new_total, anchor) - before == pytest.approx(0.5 / (new_total - anchor_step))
        assert cosine_progress(new_total, warmup, new_total, anchor) == 1.0


def test_time_budget_decisions_and_anchor_survive_a_checkpoint():
    from types import SimpleNamespace

    from lightning_modules.callbacks import TimeBudget

    saved = TimeBudget(deadline=0.0, calibrate_steps=20)
    saved.decided_max_steps, saved.configured_max_steps, saved.refine_step, saved.anchor = 900, 5000, None, (455, 0.5)
    restored = TimeBudget(deadline=0.0, calibrate_steps=20)
    restored.load_state_dict(saved.state_dict())
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=5000)))
    module = SimpleNamespace(schedule_anchor=None)
    restored.on_train_start(trainer, module)
    assert trainer.fit_loop.epoch_loop.max_steps == 900 and module.schedule_anchor == (455, 0.5)
    assert restored.refine_step is None
    with pytest.raises(ValueError, match="refine_at"):
        TimeBudget(deadline=0.0, calibrate_steps=20, refine_at=1.0)


def test_time_budget_needs_a_warmup_to_time(tmp_path):
    cfg = load_config("demo", [*tiny_overrides(tmp_path), "trainer.time_budget_minutes=1", "optim.warmup_steps=5"])
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        pipeline.run_task(cfg)
