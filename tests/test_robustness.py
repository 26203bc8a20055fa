"""Never lose a run, never load code, refuse bad input clearly.

Faults injected here: SIGKILL mid-epoch, SIGTERM, a pickled code payload, truncated and
bit-flipped checkpoints, a NaN batch and a run of them, interrupted file writes, bad
generation settings, manifest paths that leave their folder, and random / truncated /
odd-rate / many-channel / NaN audio thrown at the loader and the manifest builder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from datamodules.atomic import TMP_MARK, atomic_directory, atomic_path, write_text_atomic
from datamodules.audio_io import AudioDecodeError, check_audio_file, load_audio, probe_audio
from datamodules.manifest import ManifestEntry, ManifestError, read_manifest, resolve_audio_path
from experiments import pipeline
from experiments.config import ConfigError, load_config
from lightning_modules.checkpoints import CheckpointError, load_checkpoint
from tests.test_audio_lm import CAPTIONS, TINY
from tests.test_pipeline import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def leftovers(root: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``root``."""
    return [p for p in root.rglob("*") if TMP_MARK in p.name]


# ----------------------------------------------------------------------------- atomic writes


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new conte")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and leftovers(tmp_path) == []

    folder = tmp_path / "vae"
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(folder) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert [p.name for p in folder.iterdir()] == ["config.json"] and leftovers(tmp_path) == []


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path):
    """mkstemp/mkdtemp make 0600/0700 temporaries; the written file and folder must have the
    umask's mode like any other (a corpus, cache or checkpoint others on the machine read)."""
    old_mask = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "manifest.jsonl", "{}")
        with atomic_directory(tmp_path / "vae") as tmp:
            (tmp / "config.json").write_text("{}")
        (tmp_path / "plain.txt").write_text("{}")
    finally:
        os.umask(old_mask)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "manifest.jsonl") == mode(tmp_path / "plain.txt") == 0o640
    assert mode(tmp_path / "vae") == 0o750


# ----------------------------------------------------------------------------- safe loading


class CodePayload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_code_payload_truncation_and_bit_flips_are_refused_naming_the_file(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": CodePayload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*allow-list.*posix\.system|evil\.ckpt.*allow-list"):
        load_checkpoint(evil)
    assert not marker.exists()

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, good)
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], torch.arange(4096.0))
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt is truncated"):
        load_checkpoint(tmp_path / "cut.ckpt")
    middle = len(data) // 2  # inside the tensor's bytes: torch.load alone would return wrong weights
    (tmp_path / "flipped.ckpt").write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :])
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt is corrupt.*CRC"):
        load_checkpoint(tmp_path / "flipped.ckpt")

    # The same refusals where users meet them: `make generate` and `trainer.resume`.
    result = subprocess.run([sys.executable, "-m", "experiments.generate", "--ckpt", str(evil), "--prompt", "a dog barks"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "allow-list" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    cfg = load_config("demo", [f"trainer.resume={tmp_path / 'cut.ckpt'}"])
    with pytest.raises(ConfigError, match=r"trainer.resume: checkpoint .*cut\.ckpt is truncated"):
        pipeline.resolve_resume(cfg)


# ----------------------------------------------------------------------------- killed and resumed


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return {f"{key}.{name}": value for key in ("state_dict", "current_model_state")
            for name, value in state[key].items() if torch.is_tensor(value)}


def train_in_subprocess(experiment: str, overrides: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "experiments.train", experiment, *overrides],
                            cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


def wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before the fault could be injected:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting to inject the fault")
        time.sleep(0.02)


def killed_and_resumed_equals_uninterrupted(tmp_path: Path, experiment: str, timed: bool = False) -> None:
    """32 clips / batch 8 = 4 steps an epoch. Checkpoints every step (or, ``timed``, only
    last.ckpt refreshed every few milliseconds by trainer.ckpt_every_minutes); SIGKILL once
    last.ckpt holds step 5 or 6 (inside epoch 1); resume with trainer.resume=last."""
    saving = (["trainer.ckpt_every_steps=100000", "trainer.ckpt_every_minutes=0.00005", "trainer.log_every_steps=1"]
              if timed else ["trainer.ckpt_every_steps=1", "trainer.keep_checkpoints=2", "trainer.log_every_steps=4"])
    overrides = [*tiny_overrides(tmp_path), "trainer.max_steps=40", "trainer.val_every_steps=20", *saving,
                 "trainer.num_threads=1"]  # as this process: float sums in the same order
    straight = pipeline.run_task(load_config(experiment, overrides))  # also prepares corpus, VAE and cache
    log = tmp_path / "killed.log"
    process = train_in_subprocess(experiment, overrides, log)
    experiment_dir = tmp_path / "runs" / experiment

    def saved_step() -> int | None:
        # run folders only: the `last` link moves to the new run while this looks
        lasts = [p for p in experiment_dir.glob("*/checkpoints/last.ckpt")
                 if p.parent.parent != straight and not p.parent.parent.is_symlink()]
        try:
            return load_checkpoint(lasts[0])["global_step"] if lasts else None
        except (CheckpointError, FileNotFoundError):  # being replaced (atomically) / not there yet: "not yet"
            return None

    def frozen_mid_epoch() -> bool:
        """Freeze the trainer (SIGSTOP), then look: the kill lands exactly on what was seen,
        however fast the steps run. Mid-epoch = any step past epoch 0 that does not end an epoch."""
        process.send_signal(signal.SIGSTOP)
        step = saved_step()
        if step is not None and step >= 5 and step % 4 != 0:
            return True
        process.send_signal(signal.SIGCONT)
        return False

    wait_for(frozen_mid_epoch, process, log)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed = (experiment_dir / "last").resolve()
    assert killed != straight.resolve()
    stopped_at = load_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"]
    assert 5 <= stopped_at < 40 and stopped_at % 4 != 0, stopped_at  # killed mid-epoch
    assert len(list((killed / "checkpoints").glob("step*.ckpt"))) <= (0 if timed else 2)  # keep_checkpoints

    resumed = pipeline.run_task(load_config(experiment, [*overrides, "trainer.resume=last"]))
    assert leftovers(killed) == []  # a save the kill interrupted is cleaned up by the resume
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 40
    a, b = run_weights(straight), run_weights(resumed)
    assert len(a) > 20 and a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0, f"killed at step {stopped_at} and resumed: max weight difference {worst}"


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_mntp(tmp_path):
    killed_and_resumed_equals_uninterrupted(tmp_path, "demo")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_ntp_with_timed_checkpoints(tmp_path):
    killed_and_resumed_equals_uninterrupted(tmp_path, "demo_ntp", timed=True)


def test_resume_from_every_step_of_an_epoch_continues_exactly(tmp_path):
    """In process: resuming from a mid-epoch checkpoint replays the rest of that epoch's order
    (it fails without the sampler's resume: the epoch would restart from its first batch)."""
    overrides = [*tiny_overrides(tmp_path), "trainer.max_steps=7", "trainer.ckpt_every_steps=1",
                 "trainer.keep_checkpoints=-1", "trainer.val_every_steps=20"]
    straight = pipeline.run_task(load_config("demo", overrides))
    for step in (2, 5):  # within epoch 0 and epoch 1
        ckpt = straight / "checkpoints" / f"step{step:07d}.ckpt"
        resumed = pipeline.run_task(load_config("demo", [*overrides, f"trainer.resume={ckpt}"]))
        a, b = run_weights(straight), run_weights(resumed)
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0, f"from step {step}"


def test_the_final_step_is_in_last_ckpt_when_max_steps_is_off_the_checkpoint_interval(tmp_path):
    """max_steps 5 with step checkpoints every 4: last.ckpt holds step 5 — the weights a run
    checkpointing every step ends with — where it held step 4 before (the final step was
    lost, and a resumed run ended one step short); so does a run resumed from step 4."""
    base = [*tiny_overrides(tmp_path), "trainer.max_steps=5", "trainer.keep_checkpoints=-1", "trainer.val_every_steps=100000"]
    every_4 = pipeline.run_task(load_config("demo", [*base, "trainer.ckpt_every_steps=4"]))
    every_1 = pipeline.run_task(load_config("demo", [*base, "trainer.ckpt_every_steps=1"]))
    assert load_checkpoint(every_4 / "checkpoints" / "last.ckpt")["global_step"] == 5
    a, b = run_weights(every_4), run_weights(every_1)
    assert len(a) > 20 and max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    # Resumed from step 4, the run writes no interval checkpoint, so Lightning's ModelCheckpoint
    # also saves last.ckpt after training ends — after the EMA callback has put the averages
    # into the model. The raw weights must still be the optimizer's (they were the EMA's).
    resumed = pipeline.run_task(load_config("demo", [*base, "trainer.ckpt_every_steps=4",
                                                     f"trainer.resume={every_4 / 'checkpoints' / 'step0000004.ckpt'}"]))
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 5
    c = run_weights(resumed)
    assert max((a[k].float() - c[k].float()).abs().max().item() for k in a) == 0.0


def test_resuming_a_finished_run_is_refused_and_last_still_points_to_it(tmp_path):
    base = [*tiny_overrides(tmp_path), "trainer.max_steps=2", "trainer.val_every_steps=100000"]
    finished = pipeline.run_task(load_config("demo", base))
    with pytest.raises(ConfigError, match=r"last\.ckpt is at step 2 and trainer\.max_steps=2: nothing is left to train"):
        pipeline.run_task(load_config("demo", [*base, "trainer.resume=last"]))
    assert (tmp_path / "runs" / "demo" / "last").resolve() == finished.resolve()
    assert len(list((tmp_path / "runs" / "demo").glob("2*"))) == 1


def test_sigterm_writes_a_loadable_checkpoint_and_exits_143(tmp_path):
    overrides = [*tiny_overrides(tmp_path), "trainer.max_steps=100000", "trainer.ckpt_every_steps=100000",
                 "trainer.val_every_steps=100000", "trainer.log_every_steps=1"]
    log = tmp_path / "sigterm.log"
    process = train_in_subprocess("demo", overrides, log)
    events = tmp_path / "runs" / "demo"
    wait_for(lambda: any(events.glob("*/tensorboard/events.out.tfevents.*")) and "train/loss" in log.read_text(),
             process, log)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM: wrote" in text and 'trainer.resume=last' in text
    run_dir = (events / "last").resolve()
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    step = state["global_step"]
    assert step > 0 and leftovers(run_dir) == []
    # and it continues: two more steps from where SIGTERM stopped it
    resumed = pipeline.run_task(load_config("demo", [*tiny_overrides(tmp_path), "trainer.resume=last",
                                                     f"trainer.max_steps={step + 2}", "trainer.val_every_steps=100000"]))
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == step + 2


# ----------------------------------------------------------------------------- NaN / Inf guard


class Batches(torch.utils.data.Dataset):
    """Token batches of the tiny demo shape; the batches listed in ``poisoned`` hold NaN."""

    def __init__(self, count: int, poisoned: set[int]) -> None:
        self.count, self.poisoned = count, poisoned

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randn(4, 12, 8, generator=g)
        if i in self.poisoned:
            tokens[1, 3] = float("nan")
        return {"tokens": tokens, "token_mask": torch.ones(4, 12, dtype=torch.bool), "captions": CAPTIONS[:4],
                "lengths": [12] * 4}


class WeightsPerStep(L.Callback):
    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def guarded_fit(sp_model: str, tmp_path: Path, batches: Batches, max_bad_steps: int):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_modules.audio_lm import AudioLMSystem

    torch.manual_seed(0)
    cfg = load_config("demo", [*TINY, f"optim.max_bad_steps={max_bad_steps}", "optim.warmup_steps=0"])
    system = AudioLMSystem(OmegaConf.to_container(cfg, resolve=True), sp_model_path=sp_model)
    spy = WeightsPerStep()
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                        gradient_clip_val=1.0, callbacks=[spy], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    return system, trainer, spy, loader


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    from lightning_modules.parts.text_conditioning import train_sentencepiece

    return str(train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("spm") / "spm"), 40))


def test_a_nan_batch_is_skipped_and_counted(sp_model, tmp_path):
    system, trainer, spy, loader = guarded_fit(sp_model, tmp_path, Batches(6, poisoned={2}), max_bad_steps=3)
    trainer.fit(system, loader)
    before, during, after = spy.snapshots[1], spy.snapshots[2], spy.snapshots[3]
    assert all(torch.equal(before[k], during[k]) for k in before)  # the NaN step changed nothing
    assert any(not torch.equal(during[k], after[k]) for k in during)  # the next one trains again
    assert all(torch.isfinite(v).all() for v in spy.snapshots[-1].values() if v.is_floating_point())
    optimizer = trainer.optimizers[0]
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {5.0}  # AdamW counted 5 of 6 steps: the skipped one left its moments alone
    assert system._totals["skipped_steps"] == 1
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "train/skipped_steps" in logged and "train/grad_norm" in logged


def test_consecutive_nan_steps_stop_the_run_with_a_message(sp_model, tmp_path):
    from lightning_modules.audio_lm import NonFiniteTrainingError

    system, trainer, spy, loader = guarded_fit(sp_model, tmp_path, Batches(10, poisoned={3, 4, 5, 6, 7, 8, 9}),
                                               max_bad_steps=3)
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive optimizer steps had NaN/Inf gradients"):
        trainer.fit(system, loader)
    assert len(spy.snapshots) == 6  # stopped at the third bad step
    assert all(torch.equal(spy.snapshots[2][k], spy.snapshots[-1][k]) for k in spy.snapshots[2])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "prompt 1 is empty or whitespace"),
    (["--prompt", "a dog", "--prompt", ""], "prompt 2 is empty"),
    (["--prompt", "x", "--cfg", "-1"], "--cfg / CFG=-1 must be >= 0"),
    (["--prompt", "x", "--temperature", "0"], "--temperature / TEMPERATURE=0 must be > 0"),
    (["--prompt", "x", "--steps", "0"], "--steps / STEPS=0 must be >= 1"),
    (["--prompt", "x", "--seconds", "-2"], "--seconds / SECONDS=-2 must be > 0"),
    (["--prompt", "x", "--seconds", "nan"], "--seconds / SECONDS=nan must be > 0"),
    (["--prompt", "x", "--cfg-rescale", "1.5"], "must be in [0, 1]"),
    (["--prompt", "x", "--sampler", "euler"], "SAMPLER='euler' is not one of ddpm, ddim, dpmpp"),
])
def test_generate_refuses_bad_settings_before_loading_anything(args, message, tmp_path):
    from experiments import generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main([*args, "--ckpt", str(tmp_path / "never_read.ckpt")])
    assert message in str(exit_info.value)


def test_generate_refuses_a_prompts_file_of_blank_lines_or_binary(tmp_path):
    from experiments import generate

    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    for name, message in (("blank.txt", "holds no prompt"), ("binary.txt", "is not UTF-8 text")):
        with pytest.raises(SystemExit, match=message):
            generate.main(["--prompts", str(tmp_path / name)])


def test_overlong_prompts_are_found_for_the_truncation_warning(sp_model, capsys):
    from experiments.generate import warn_overlong
    from lightning_modules.audio_lm import AudioLMSystem

    cfg = load_config("demo", TINY)  # text.max_len 10
    system = AudioLMSystem(OmegaConf.to_container(cfg, resolve=True), sp_model_path=sp_model)
    long_prompt = " ".join(["a high pitched beep pulsing"] * 5)
    assert system.text.overlong(["hum", long_prompt]) == [False, True]
    warn_overlong(system, ["hum", long_prompt])
    assert capsys.readouterr().err.count("is truncated") == 1


def test_manifest_paths_cannot_leave_the_manifest_folder(tmp_path):
    manifest = tmp_path / "data" / "manifest.jsonl"
    entry = lambda path: ManifestEntry(id="c1", path=path, captions=["x"], duration=1.0, sample_rate=16000, split="train")  # noqa: E731
    assert resolve_audio_path(manifest, entry("audio/c1.wav")) == tmp_path / "data" / "audio" / "c1.wav"
    assert resolve_audio_path(manifest, entry("audio/../c1.wav")) == tmp_path / "data" / "c1.wav"
    with pytest.raises(ManifestError, match=r"clip 'c1' path '\.\./\.\./etc/passwd' leaves the manifest's folder"):
        resolve_audio_path(manifest, entry("../../etc/passwd"))
    with pytest.raises(ManifestError, match="absolute path '/etc/passwd'.*data.allow_absolute_paths=true"):
        resolve_audio_path(manifest, entry("/etc/passwd"))
    assert resolve_audio_path(manifest, entry("/srv/a.wav"), allow_absolute=True) == Path("/srv/a.wav")

    # preflight reports it before any work
    from experiments.preflight import run_preflight

    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps(entry("../outside.wav").to_json_dict()) + "\n")
    cfg = load_config("masked_base", [f"data.manifests=[{{path: {manifest}}}]"])
    problems = run_preflight(cfg, "train")
    assert any("leaves the manifest's folder" in p.message for p in problems)


# ----------------------------------------------------------------------------- fuzzing


def fuzz_audio_files(folder: Path, rng: np.random.Generator) -> dict[str, bytes | None]:
    """Write a zoo of good, odd and broken audio files; returns name -> None (written by soundfile)."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, bytes | None] = {}

    def tone(seconds: float, rate: int, channels: int) -> np.ndarray:
        t = np.arange(int(seconds * rate)) / rate
        return np.stack([0.3 * np.sin(2 * np.pi * (110 + 50 * c) * t) for c in range(channels)], axis=1)

    for rate in (1, 7, 8000, 11025, 22050, 44100, 96000, 192000):
        sf.write(folder / f"rate{rate}_0.wav", tone(2.0 if rate > 7 else 40.0, rate, 1), rate, subtype="PCM_16")
        made[f"rate{rate}_0.wav"] = None
    for channels in (2, 3, 6, 8):
        sf.write(folder / f"ch{channels}_0.wav", tone(1.5, 16000, channels), 16000, subtype="PCM_16")
        made[f"ch{channels}_0.wav"] = None
    for subtype in ("PCM_U8", "PCM_24", "FLOAT", "DOUBLE"):
        sf.write(folder / f"sub{subtype.lower().replace('_', '')}_0.wav", tone(1.5, 16000, 1), 16000, subtype=subtype)
        made[f"sub{subtype.lower().replace('_', '')}_0.wav"] = None
    nan_wave = tone(1.5, 16000, 1).astype(np.float32)
    nan_wave[100] = np.nan
    sf.write(folder / "nanfloat_0.wav", nan_wave, 16000, subtype="FLOAT")
    sf.write(folder / "flacinwav_0.wav", tone(1.5, 16000, 1), 16000, format="FLAC")
    sf.write(folder / "ogg_0.wav", tone(1.5, 16000, 1), 16000, format="OGG")
    made.update({"nanfloat_0.wav": None, "flacinwav_0.wav": None, "ogg_0.wav": None})
    good = (folder / "rate16000ref.wav")
    sf.write(good, tone(1.5, 16000, 1), 16000, subtype="PCM_16")
    data = good.read_bytes()
    good.unlink()
    blobs = {f"random{n}_0.wav": rng.bytes(n) for n in (0, 1, 44, 1000, 100_000)}
    blobs.update({f"cut{n}_0.wav": data[:n] for n in (4, 12, 30, 44, 46, len(data) // 2)})
    blobs["riffjunk_0.wav"] = data[:44] + rng.bytes(2000)
    blobs["hugeheader_0.wav"] = data[:40] + (2**31 - 1).to_bytes(4, "little") + data[44:1000]
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    made.update(blobs)
    return made


def test_fuzzed_audio_loads_or_raises_the_documented_error(tmp_path):
    files = fuzz_audio_files(tmp_path / "audio", np.random.default_rng(0))
    outcomes = {}
    for name in files:
        path = tmp_path / "audio" / name
        for call in (lambda: probe_audio(path), lambda: load_audio(path, target_sr=16000)):
            try:
                value = call()
            except AudioDecodeError as error:
                assert name in str(error)  # the message names the file
                outcomes[name] = "error"
                continue
            if isinstance(value, np.ndarray):
                assert value.ndim == 1 and value.dtype == np.float32 and np.isfinite(value).all(), name
                outcomes.setdefault(name, "loaded")
        reason, _, _, _ = check_audio_file(path, min_duration=1.0, silence_peak_db=-60.0)  # never raises
        assert reason in (None, "corrupt", "too_short", "silent")
    assert outcomes["nanfloat_0.wav"] == "error" and outcomes["random1000_0.wav"] == "error"
    assert outcomes["rate7_0.wav"] == outcomes["ch8_0.wav"] == outcomes["ogg_0.wav"] == "loaded"


def test_fuzzed_dataset_gives_a_manifest_of_exactly_the_usable_files(tmp_path):
    from datamodules.audiocaps import build_audiocaps_manifest
    from tests.test_manifest import _write_csv

    root = tmp_path / "audiocaps"
    files = fuzz_audio_files(root / "audio", np.random.default_rng(1))
    (root / "csv").mkdir(parents=True)
    rows = [(str(k), name.rsplit("_", 1)[0], "0", f"caption of {name}") for k, name in enumerate(sorted(files))]
    _write_csv(root / "csv" / "train.csv", rows)
    with open(root / "csv" / "train.csv", "ab") as handle:  # and rows that are not rows
        handle.write(b"\xff\xfe garbage,,\n,,,\n99,onlyid\n")
    for split in ("val", "test"):
        _write_csv(root / "csv" / f"{split}.csv", [])
    out = root / "manifest.jsonl"
    report = build_audiocaps_manifest(root / "csv", root / "audio", out, min_duration=1.0, workers=0)

    entries = read_manifest(out)
    usable = {name.rsplit("_", 1)[0] for name in files
              if check_audio_file(root / "audio" / name, 1.0, -60.0)[0] is None}
    assert {e.id.rsplit("_", 1)[0] for e in entries} == usable and len(usable) >= 10
    assert report.num_usable == len(entries) and report.problems
    for entry in entries:  # everything in the manifest loads, below its folder
        assert np.isfinite(load_audio(resolve_audio_path(out, entry), target_sr=16000)).all()
    assert leftovers(root) == []


def test_fuzzed_wavcaps_metadata_gives_the_documented_error_or_bad_rows(tmp_path):
    from datamodules.audiocaps import find_audio_file
    from datamodules.wavcaps import read_wavcaps_json

    cases = {"binary.json": b"\xff\xfe{\x00", "cut.json": b'{"data": [{"id": "a", "caption": "x"',
             "random.json": np.random.default_rng(2).bytes(500), "list.json": b"[1, 2]"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ManifestError, match=name):
            read_wavcaps_json(tmp_path / name)
    (tmp_path / "odd.json").write_text(json.dumps({"data": [
        1, None, {"id": "../../etc/passwd", "caption": "x"}, {"id": 5, "caption": ""}, {"id": "ok", "caption": "fine"}]}))
    entries, bad = read_wavcaps_json(tmp_path / "odd.json")
    assert [e["id"] for e in entries] == ["ok"] and len(bad) == 4
    assert "not a plain name" in bad[2]["detail"]
    # and the file finder never looks outside the audio folder, whatever a field holds
    (tmp_path / "secret.wav").write_bytes(b"x")
    (tmp_path / "audio").mkdir()
    found, tried = find_audio_file(tmp_path / "audio", ["{id}.wav"], {"id": "../secret"})
    assert found is None and tried == []
