"""Evaluate a trained language model (``make eval EXP=... CKPT=...``).

    python -m experiments.evaluate [EXP] [--ckpt CKPT] [key=value ...]

EXP's config (with the overrides) says which data and which eval settings (``eval.*``) to
use; the checkpoint's own stored config says how to generate (``sample.*``, its VAE).
``sample.*`` overrides on the command line also apply to generation (e.g. ``sample.steps=25``).
Without ``--ckpt``: ``<run.root>/<EXP>/last/checkpoints/last.ckpt``.

For every eval split (synthetic corpus: ``test`` and ``test_novel``; manifests such as
AudioCaps: ``data.test_split``), one clip is generated per eval clip from its first caption,
and generated and reference clips are written through the same path — 16 kHz mono PCM16
wav, the same length — to ``<run>/eval/<split>/{generated,reference}/<id>.wav``. Metrics
are computed from those files:

- synthetic corpus (offline, with the evaluator from ``make evaluator``): FD on evaluator
  embeddings, paired KL, IS, attribute accuracy; plus comparison rows: fresh real clips
  (oracle), VAE+vocoder resynthesis (ceiling), shuffled captions and noise (floors);
- manifests (AudioCaps, AudioLDM protocol): FAD (VGGish), FD / KL / IS (PANNs CNN14) and the
  CLAP score, with a table of the published baselines.

Results: ``<run>/eval/results.json`` and ``results.md``. The protocol: docs/EVAL_PROTOCOL.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

EVAL_SAMPLE_RATE = 16000  # every file written and every metric network runs at 16 kHz
GENERATED, REFERENCE = "generated", "reference"
ROW_DIRS = {  # row name in the tables -> folder under <eval>/<split>/
    "model": GENERATED,
    "oracle (fresh real clips)": "oracle",
    "VAE+vocoder resynthesis": "resynthesis",
    "shuffled captions": "shuffled",
    "noise": "noise",
}
ORACLE_SEED_SALT = 7919  # fresh real clips: clip i drawn from default_rng([eval.seed, salt, i])
NOISE_STD = 0.1  # white noise floor, ≈ -20 dBFS RMS

# AudioCaps test, AudioLDM protocol (DESIGN.md "Evaluation protocol").
PAPER_BASELINES = [
    ("AudioGen Base", "285M", 3.13, 2.09),
    ("AudioGen Large", "1B", 1.82, 1.69),
    ("AudioLDM-L", "739M", 2.08, 1.86),
    ("Tango", "866M", 1.73, 1.27),
    ("AudioLDM 2-AC-Large", "712M", 1.42, 0.98),
    ("IMPACT Base (sister paper)", "193M", 1.07, 1.05),
    ("AudioNTP Base (from the paper's relative claims)", "193M", "≈ 2.5", "≈ 1.25"),
    ("AudioMNTP Base / Large (likewise)", "193M / 462M", "≈ 1.85 / ≈ 1.22", "—"),
]


def log(message: str) -> None:
    print(f"[eval] {message}", flush=True)


# ----------------------------------------------------------------------------- clips and files


@dataclass
class EvalClip:
    """One eval clip: its id, the caption used for generation (the first) and its labels."""

    id: str
    caption: str
    labels: dict[str, str] = field(default_factory=dict)


def eval_splits(cfg: DictConfig) -> list[str]:
    if cfg.eval.splits:
        return [str(s) for s in cfg.eval.splits]
    if cfg.data.source == "synthetic":
        return [cfg.data.test_split, "test_novel"]
    return [cfg.data.test_split]


def eval_seconds(cfg: DictConfig) -> float:
    if cfg.eval.seconds is not None:
        return float(cfg.eval.seconds)
    return float(cfg.corpus.clip_seconds if cfg.data.source == "synthetic" else cfg.data.clip_seconds)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad (S,) to ``num_samples``."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.shape[0] >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - wave.shape[0]))


def write_clip(path: Path, wave: np.ndarray | torch.Tensor, num_samples: int, sample_rate: int = EVAL_SAMPLE_RATE) -> None:
    """The one path every evaluated clip takes to disk: (S,) float at ``sample_rate`` →
    trimmed/zero-padded to ``num_samples`` → clipped to [-1, 1] → 16 kHz mono PCM16 wav
    (resampled first if needed), written atomically."""
    from datamodules.audio_io import resample, save_wav

    wave = wave.detach().float().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    if sample_rate != EVAL_SAMPLE_RATE:
        wave = resample(wave, sample_rate, EVAL_SAMPLE_RATE)
    save_wav(path, fit_length(wave, num_samples), EVAL_SAMPLE_RATE)


def read_clips(folder: Path, ids: Sequence[str], num_samples: int) -> torch.Tensor:
    """Wavs ``<folder>/<id>.wav`` → (N, num_samples) float32 at 16 kHz (missing files raise)."""
    from datamodules.audio_io import load_audio

    missing = [i for i in ids if not (folder / f"{i}.wav").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} clip(s) missing in {folder}, e.g. {missing[:5]}")
    return torch.from_numpy(np.stack([fit_length(load_audio(folder / f"{i}.wav", EVAL_SAMPLE_RATE), num_samples) for i in ids]))


def files_digest(folder: Path, ids: Sequence[str]) -> str:
    """sha256 over the ids and the bytes of their wav files (the reference cache key)."""
    digest = hashlib.sha256()
    for clip_id in ids:
        digest.update(clip_id.encode())
        digest.update((folder / f"{clip_id}.wav").read_bytes())
    return digest.hexdigest()


def file_identity(path: str | Path) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def write_references(cfg: DictConfig, sources, split: str, seconds: float, folder: Path) -> list[EvalClip]:
    """Read the split's first ``eval.max_clips`` clips (start crop, first caption) and write
    them through :func:`write_clip`; returns the clips in manifest order."""
    from datamodules.audio_datamodule import AudioCapsDataModule

    datamodule = AudioCapsDataModule(
        manifests=sources, sample_rate=EVAL_SAMPLE_RATE, clip_seconds=seconds, batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers, seed=cfg.seed, val_split=None, test_split=split,
    )
    all_clips = datamodule.clips(split)
    if not all_clips:
        raise ValueError(f"split {split!r} has no clips in {', '.join(s.path for s in sources)}")
    limit = cfg.eval.max_clips if cfg.eval.max_clips > 0 else len(all_clips)
    loader = datamodule.split_dataloader(split, exclude_ids=[c.entry.id for c in all_clips[limit:]])
    num_samples = int(round(seconds * EVAL_SAMPLE_RATE))
    clips: list[EvalClip] = []
    for batch in progress(loader, len(loader), f"{split}: reference clips"):
        waves = batch["wave"] * batch["wave_mask"].to(batch["wave"].dtype)
        for clip_id, caption, labels, wave in zip(batch["ids"], batch["captions"], batch["labels"], waves):
            write_clip(folder / f"{clip_id}.wav", wave, num_samples)
            clips.append(EvalClip(clip_id, caption, dict(labels)))
    return clips


# ----------------------------------------------------------------------------- generation


def generation_settings(ckpt: Path, lm_cfg: DictConfig, cfg: DictConfig, seconds: float, clips: list[EvalClip]) -> dict:
    sample = lm_cfg.sample
    stat = ckpt.stat()
    return {
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_size": stat.st_size,
        "checkpoint_mtime": stat.st_mtime,
        "seconds": seconds,
        "cfg_scale": sample.cfg_scale,
        "cfg_schedule": sample.cfg_schedule,
        "cfg_rescale": sample.cfg_rescale,
        "steps": sample.steps,
        "temperature": sample.temperature,
        "sampler": sample.sampler,
        "seed": cfg.eval.seed,
        "batch_size": cfg.eval.batch_size,
        "ids_digest": hashlib.sha256("\n".join(c.id for c in clips).encode()).hexdigest()[:16],
    }


def generate_split(render_batch: Callable[[list[str], int], torch.Tensor], clips: list[EvalClip], folder: Path,
                   settings: dict, num_samples: int, sample_rate: int, batch_size: int, desc: str) -> float:
    """Generate one clip per eval clip (batch b with seed ``eval.seed + b``) into ``folder``.

    Resumable: when ``folder/generation.json`` holds the same settings, batches whose
    files all exist are skipped; otherwise the folder is cleared first. Returns the
    seconds spent generating.
    """
    settings_path = folder / "generation.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from datamodules.atomic import write_text_atomic

    write_text_atomic(settings_path, json.dumps(settings, indent=2))
    batches = batched(clips, batch_size)
    start = time.perf_counter()
    for index, batch in progress(enumerate(batches), len(batches), desc):
        if all((folder / f"{c.id}.wav").is_file() for c in batch):
            continue
        waves = render_batch([c.caption for c in batch], index)  # (B, S')
        if not torch.isfinite(waves).all():
            raise FloatingPointError(f"generated audio for {[c.id for c in batch]} contains NaN/inf")
        for clip, wave in zip(batch, waves):
            write_clip(folder / f"{clip.id}.wav", wave, num_samples, sample_rate)
    return time.perf_counter() - start


@torch.no_grad()
def write_resynthesis(pretransform, reference: Path, clips: list[EvalClip], folder: Path, num_samples: int, batch_size: int) -> None:
    """Reference clips through the VAE and the vocoder (posterior mean): the ceiling any LM
    over these latents can reach."""
    from datamodules.audio_io import resample

    device = next(pretransform.parameters()).device
    for batch in progress(batched(clips, batch_size), math.ceil(len(clips) / batch_size), "VAE+vocoder resynthesis"):
        waves = read_clips(reference, [c.id for c in batch], num_samples)  # (B, S) at 16 kHz
        if pretransform.sample_rate != EVAL_SAMPLE_RATE:
            waves = torch.from_numpy(resample(waves.numpy(), EVAL_SAMPLE_RATE, pretransform.sample_rate))
        tokens, _ = pretransform.encode(waves.to(device))
        out = pretransform.decode(tokens).float().cpu()
        for clip, wave in zip(batch, out):
            write_clip(folder / f"{clip.id}.wav", wave, num_samples, pretransform.sample_rate)


def write_oracle(clips: list[EvalClip], folder: Path, seconds: float, num_samples: int, seed: int) -> None:
    """Fresh clips from the corpus synthesiser for each clip's labels, with new random
    draws: what a perfect generator would produce (synthetic corpus only)."""
    from datamodules.synthetic import synthesize_clip

    for index, clip in enumerate(clips):
        rng = np.random.default_rng([seed, ORACLE_SEED_SALT, index])
        write_clip(folder / f"{clip.id}.wav", synthesize_clip(clip.labels, seconds, EVAL_SAMPLE_RATE, rng), num_samples)


def write_shuffled(reference: Path, clips: list[EvalClip], folder: Path, num_samples: int, seed: int) -> None:
    """Real reference audio under the wrong ids (a seeded derangement): right distribution,
    wrong captions — the floor for paired metrics (KL, accuracy, CLAP)."""
    ids = [c.id for c in clips]
    order = np.random.default_rng([seed, 17]).permutation(len(ids))
    for position, target in enumerate(order):
        source = order[(position + 1) % len(order)]
        shutil.copyfile(reference / f"{ids[source]}.wav", folder / f"{ids[target]}.wav")


def write_noise(clips: list[EvalClip], folder: Path, num_samples: int, seed: int) -> None:
    """White noise at ≈ -20 dBFS: the floor for every metric."""
    for index, clip in enumerate(clips):
        rng = np.random.default_rng([seed, 23, index])
        write_clip(folder / f"{clip.id}.wav", rng.standard_normal(num_samples).astype(np.float32) * NOISE_STD, num_samples)


# ----------------------------------------------------------------------------- metric suites


class ReferenceCache:
    """Network outputs for reference sets, stored as ``<dir>/<key>.pt`` where key hashes the
    reference files' bytes and the network's identity; reused across runs and checkpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def get_or_compute(self, key_parts: dict, compute: Callable[[], dict]) -> dict:
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        path = self.directory / f"{key}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        outputs = compute()
        from datamodules.atomic import torch_save_atomic

        torch_save_atomic(path, outputs)
        return outputs


class SyntheticSuite:
    """FD / KL / IS / attribute accuracy with the trained attribute evaluator."""

    name = "synthetic"

    def __init__(self, evaluator, evaluator_path: Path, is_splits: int, batch_size: int, device: torch.device,
                 clip_seconds: float) -> None:
        """``clip_seconds``: the corpus' clip length; an evaluator trained on another length is refused
        (its time grid would read fades and event order at the wrong places)."""
        from datamodules.synthetic import LABEL_VALUES

        if evaluator.label_values != {k: list(v) for k, v in LABEL_VALUES.items()}:
            raise ValueError(
                f"the evaluator at {evaluator_path} was trained on another label vocabulary than the corpus' "
                "LABEL_VALUES; retrain it with `make evaluator`"
            )
        trained_seconds = (getattr(evaluator, "extra", None) or {}).get("corpus", {}).get("clip_seconds")
        if trained_seconds is not None and abs(float(trained_seconds) - clip_seconds) > 1e-6:
            raise ValueError(
                f"the evaluator at {evaluator_path} was trained on {float(trained_seconds):g} s clips but this corpus "
                f"has {clip_seconds:g} s clips (corpus.clip_seconds); retrain it with `make evaluator`"
            )
        self.evaluator = evaluator.to(device).eval()
        self.identity = {"model": "attribute_evaluator", "file": file_identity(evaluator_path),
                         "physical_judge": PHYSICAL_JUDGE_VERSION}
        self.is_splits = is_splits
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def outputs(self, folder: Path, clips: list[EvalClip], num_samples: int, desc: str) -> dict:
        from lightning_modules.physical_judge import judge_clip

        embeddings, logits, physical = [], {name: [] for name in self.evaluator.attributes}, []
        for batch in progress(batched(clips, self.batch_size), math.ceil(len(clips) / self.batch_size), desc):
            waves = read_clips(folder, [c.id for c in batch], num_samples)
            out = self.evaluator.predict(waves.to(self.device))
            embeddings.append(out["embedding"].cpu())
            for name in logits:
                logits[name].append(out["logits"][name].cpu())
            physical += [judge_clip(wave, EVAL_SAMPLE_RATE) for wave in waves.numpy()]
        return {"ids": [c.id for c in clips], "embedding": torch.cat(embeddings),
                "logits": {k: torch.cat(v) for k, v in logits.items()}, "physical": physical}

    def score(self, ref: dict, gen: dict, clips: list[EvalClip]) -> dict[str, Any]:
        from lightning_modules.metrics import AttributeAccuracy, FrechetDistance, InceptionScore, PairedKLDivergence

        fd = FrechetDistance(self.evaluator.embed_dim)
        fd.update(ref["embedding"], real=True)
        fd.update(gen["embedding"], real=False)
        splits = max(1, min(self.is_splits, len(clips)))
        result: dict[str, Any] = {"fd": float(fd.compute())}
        kl_total, is_values = 0.0, []
        for name in self.evaluator.attributes:
            kl = PairedKLDivergence("softmax")
            kl.update(ref["ids"], ref["logits"][name], real=True)
            kl.update(gen["ids"], gen["logits"][name], real=False)
            result[f"kl/{name}"] = float(kl.compute())
            kl_total += result[f"kl/{name}"]
            inception = InceptionScore(splits=splits)
            inception.update(gen["logits"][name])
            is_values.append(float(inception.compute()[0]))
            result[f"is/{name}"] = is_values[-1]
        result["kl"] = kl_total
        result["is"] = float(np.mean(is_values))
        result["is_splits"] = splits
        accuracy = AttributeAccuracy(len(self.evaluator.attributes))
        predicted = torch.stack([gen["logits"][n].argmax(1) for n in self.evaluator.attributes], dim=1)
        accuracy.update(predicted, self.evaluator.encode_labels([c.labels for c in clips]))
        values = accuracy.compute().tolist()
        for name, value in zip(self.evaluator.attributes, values):
            result[f"acc/{name}"] = value
        result["acc/all"] = values[-1]
        # The second judge: plain signal measurements (lightning_modules.physical_judge).
        judged = [[p[name] == c.labels[name] for name in self.evaluator.attributes] for p, c in zip(gen["physical"], clips)]
        for i, name in enumerate(self.evaluator.attributes):
            result[f"phys/{name}"] = float(np.mean([row[i] for row in judged]))
        result["phys/all"] = float(np.mean([all(row) for row in judged]))
        return result


class AudioSetSuite:
    """The AudioLDM protocol: FAD (VGGish), FD / KL / IS (PANNs CNN14), CLAP score."""

    name = "audioldm"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        from lightning_modules.parts.audio_classifiers import load_clap, load_panns_cnn14, load_vggish

        self.metrics = [str(m) for m in cfg.eval.metrics]
        unknown = set(self.metrics) - {"fad", "fd", "kl", "is", "clap"}
        if unknown:
            raise ValueError(f"eval.metrics: unknown metrics {sorted(unknown)} (choose from fad, fd, kl, is, clap)")
        self.device = device
        self.batch_size = cfg.eval.batch_size
        self.is_splits = cfg.eval.is_splits
        self.vggish = load_vggish(cfg.eval.vggish_path).to(device) if "fad" in self.metrics else None
        self.panns = load_panns_cnn14(cfg.eval.panns_path).to(device) if {"fd", "kl", "is"} & set(self.metrics) else None
        self.clap = load_clap(cfg.eval.clap_dir).to(device) if "clap" in self.metrics else None
        self.identity = {
            "vggish": str(Path(cfg.eval.vggish_path).resolve()) + f":{Path(cfg.eval.vggish_path).stat().st_size}" if self.vggish else None,
            "panns": str(Path(cfg.eval.panns_path).resolve()) + f":{Path(cfg.eval.panns_path).stat().st_size}" if self.panns else None,
            "protocol": "audioldm-v1",
        }

    @torch.no_grad()
    def outputs(self, folder: Path, clips: list[EvalClip], num_samples: int, desc: str) -> dict:
        from lightning_modules.parts.audio_classifiers import prepare_panns_input

        out: dict[str, Any] = {"ids": [c.id for c in clips], "vggish": [], "panns_embedding": [], "panns_logits": []}
        for batch in progress(batched(clips, self.batch_size), math.ceil(len(clips) / self.batch_size), desc):
            waves = read_clips(folder, [c.id for c in batch], num_samples).to(self.device)
            if self.vggish is not None:
                out["vggish"].append(self.vggish.embed(waves).cpu())
            if self.panns is not None:
                panns = self.panns(prepare_panns_input(waves))
                out["panns_embedding"].append(panns["embedding"].cpu())
                out["panns_logits"].append(panns["logits"].cpu())
        return {k: (torch.cat(v) if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v) for k, v in out.items()}

    @torch.no_grad()
    def clap_score(self, folder: Path, clips: list[EvalClip], num_samples: int) -> float:
        from lightning_modules.metrics import ClapScore

        score = ClapScore()
        for batch in batched(clips, self.batch_size):
            waves = read_clips(folder, [c.id for c in batch], num_samples)
            score.update(self.clap.text([c.caption for c in batch]), self.clap.audio(waves, EVAL_SAMPLE_RATE))
        return float(score.compute())

    def score(self, ref: dict, gen: dict, clips: list[EvalClip], folder: Path, num_samples: int) -> dict[str, Any]:
        from lightning_modules.metrics import FrechetDistance, InceptionScore, PairedKLDivergence

        result: dict[str, Any] = {}
        if "fad" in self.metrics:
            fad = FrechetDistance(128)
            fad.update(ref["vggish"], real=True)
            fad.update(gen["vggish"], real=False)
            result["fad"] = float(fad.compute())
        if "fd" in self.metrics:
            fd = FrechetDistance(ref["panns_embedding"].shape[1])
            fd.update(ref["panns_embedding"], real=True)
            fd.update(gen["panns_embedding"], real=False)
            result["fd"] = float(fd.compute())
        if "kl" in self.metrics:
            for mode, key in (("softmax", "kl"), ("sigmoid", "kl_sigmoid")):
                kl = PairedKLDivergence(mode)
                kl.update(ref["ids"], ref["panns_logits"], real=True)
                kl.update(gen["ids"], gen["panns_logits"], real=False)
                result[key] = float(kl.compute())
        if "is" in self.metrics:
            splits = max(1, min(self.is_splits, len(clips)))
            inception = InceptionScore(splits=splits)
            inception.update(gen["panns_logits"])
            mean, std = inception.compute()
            result.update({"is": float(mean), "is_std": float(std), "is_splits": splits})
        if "clap" in self.metrics:
            result["clap"] = self.clap_score(folder, clips, num_samples)
        return result


# ----------------------------------------------------------------------------- tables


SYNTHETIC_COLUMNS = [("fd", "FD ↓"), ("kl", "KL ↓"), ("is", "IS ↑"), ("acc/all", "all attrs ✓ ↑"),
                     ("phys/all", "all attrs ✓ physical ↑")]
PHYSICAL_JUDGE_VERSION = "physical-v1"  # part of the reference cache key: bump when the judge changes
AUDIOSET_COLUMNS = [("fad", "FAD ↓"), ("fd", "FD ↓"), ("kl", "KL ↓"), ("kl_sigmoid", "KL sigm. ↓"), ("is", "IS ↑"), ("clap", "CLAP ↑")]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        value = 0.0 if abs(value) < 5e-4 else value  # no "-0.000" from round-off
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def results_markdown(results: dict) -> str:
    """The results as markdown tables: one per split, plus the paper's baselines (AudioCaps)."""
    lines = [f"# Evaluation of `{results['checkpoint']}`", ""]
    lines.append(f"{results['protocol']}; {results['date']}; {results['num_clips_note']}.")
    lines.append("")
    synthetic = results["suite"] == "synthetic"
    columns = SYNTHETIC_COLUMNS if synthetic else AUDIOSET_COLUMNS
    for split, split_result in results["splits"].items():
        rows = split_result["rows"]
        extra = list(results.get("attributes", [])) if synthetic else []
        header = ["system"] + [c[1] for c in columns] + [f"acc {a}" for a in extra] + [f"phys {a}" for a in extra]
        lines += [f"## {split} ({split_result['num_clips']} clips)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for row_name, metrics in rows.items():
            cells = ([row_name] + [_fmt(metrics.get(key)) for key, _ in columns] + [_fmt(metrics.get(f"acc/{a}")) for a in extra]
                     + [_fmt(metrics.get(f"phys/{a}")) for a in extra])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if synthetic:
        lines += [
            "Rows: *model* = the checkpoint's samples; *oracle* = new clips from the corpus synthesiser for the same "
            "labels (the best any generator can do); *VAE+vocoder resynthesis* = reference clips through the "
            "pretransform (the ceiling for an LM over these latents); *shuffled captions* / *noise* = floors. "
            "FD on evaluator embeddings; KL = Σ over attributes of paired softmax KL(reference ‖ generated); "
            "IS = mean over attributes; accuracy against the caption's labels: *acc* by the learned attribute "
            "evaluator, *phys* by the physical judge (signal measurements, no training: "
            "`lightning_modules/physical_judge.py`).",
            "",
        ]
        if results.get("evaluator_accuracy"):
            acc = results["evaluator_accuracy"]
            lines.append("Evaluator accuracy on real held-out clips (from `make evaluator`): " + "; ".join(
                f"{split}: all attributes {v.get('all_correct', float('nan')):.1%}" for split, v in acc.items()))
            lines.append("")
    else:
        lines += ["## Published results on AudioCaps test (AudioLDM protocol, DESIGN.md)", "",
                  "| system | params | FAD ↓ | KL ↓ |", "|---|---|---|---|"]
        lines += [f"| {n} | {p} | {_fmt(f)} | {_fmt(k)} |" for n, p, f, k in PAPER_BASELINES]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main flow


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "scipy", "soundfile", "lightning", "torchmetrics", "transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolve_checkpoint(cfg: DictConfig, ckpt: str | None) -> Path:
    from experiments.config import last_run_dir

    path = Path(ckpt) if ckpt else last_run_dir(cfg.run.root, cfg.experiment) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train with `make train EXP={cfg.experiment}` or pass CKPT=)")
    return path


def evaluate(cfg: DictConfig, ckpt: Path, sample_overrides: Sequence[str] = ()) -> dict:
    """Generate, write and score every eval split; returns the results dict (also written
    to ``<out>/results.json`` and ``results.md``)."""
    from datamodules.atomic import write_text_atomic
    from experiments.config import config_from_container, parse_overrides
    from experiments.pipeline import (
        check_length, check_pretransform, load_audio_lm, load_pretransform_for, manifest_sources, render_fn, set_threads,
    )

    set_threads(cfg)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("auto", "gpu") and torch.cuda.is_available() else "cpu")
    synthetic = cfg.data.source == "synthetic"
    ckpt = ckpt.resolve()
    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else ckpt.parent.parent / "eval"
    seconds = eval_seconds(cfg)
    num_samples = int(round(seconds * EVAL_SAMPLE_RATE))

    # Metric networks first: a missing weights file fails before any generation time is spent.
    if synthetic:
        from lightning_modules.evaluator import AttributeEvaluator

        evaluator_path = Path(cfg.eval.evaluator.path)
        if not evaluator_path.is_file():
            raise FileNotFoundError(
                f"no trained evaluator at {evaluator_path} (eval.evaluator.path): run `make evaluator` first "
                f"(with the same run.root), or point eval.evaluator.path at an evaluator.pt"
            )
        evaluator = AttributeEvaluator.load(evaluator_path)
        suite: SyntheticSuite | AudioSetSuite = SyntheticSuite(
            evaluator, evaluator_path, cfg.eval.is_splits, cfg.eval.batch_size, device,
            clip_seconds=float(cfg.corpus.clip_seconds),
        )
    else:
        evaluator = None
        suite = AudioSetSuite(cfg, device)

    log(f"loading {ckpt}")
    system = load_audio_lm(ckpt, device)
    lm_cfg = config_from_container(system.hparams["config"])
    if sample_overrides:
        lm_cfg = OmegaConf.merge(lm_cfg, parse_overrides(sample_overrides))
    pretransform = load_pretransform_for(lm_cfg).to(device).eval()
    check_pretransform(system, pretransform)
    if note := check_length(lm_cfg, system, pretransform, seconds):
        log(note)

    def render_batch(captions: list[str], batch_index: int) -> torch.Tensor:
        return render_fn(lm_cfg, pretransform, seconds, int(cfg.eval.seed) + batch_index)(system, captions)

    sources = manifest_sources(cfg)
    cache = ReferenceCache(Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(cfg.run.data_root) / "eval_cache")
    results: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "experiment": cfg.experiment,
        "suite": suite.name,
        "protocol": ("synthetic corpus, attribute evaluator" if synthetic else "AudioLDM protocol (VGGish FAD; PANNs CNN14 FD/KL/IS; CLAP)")
        + f"; {EVAL_SAMPLE_RATE} Hz mono PCM16, {seconds:g} s clips, first caption of each clip",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "seconds": seconds,
        "sample_rate": EVAL_SAMPLE_RATE,
        "generation": {k: v for k, v in OmegaConf.to_container(lm_cfg.sample, resolve=True).items()},
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "versions": package_versions(),
        "splits": {},
    }
    if synthetic:
        results["attributes"] = evaluator.attributes
        results["evaluator"] = str(Path(cfg.eval.evaluator.path).resolve())
        results["evaluator_accuracy"] = getattr(evaluator, "extra", {}).get("accuracy", {})

    counts = []
    for split in eval_splits(cfg):
        split_dir = out_dir / split
        reference = split_dir / REFERENCE
        clips = write_references(cfg, sources, split, seconds, reference)
        counts.append(f"{split}: {len(clips)}")
        settings = generation_settings(ckpt, lm_cfg, cfg, seconds, clips)
        gen_seconds = generate_split(render_batch, clips, split_dir / GENERATED, settings, num_samples,
                                     pretransform.sample_rate, cfg.eval.batch_size, f"{split}: generating")
        log(f"{split}: {len(clips)} clips generated in {gen_seconds:.1f} s → {split_dir / GENERATED}")

        rows = ["model"]
        if cfg.eval.reference_rows:
            if synthetic:
                write_oracle(clips, _fresh(split_dir / ROW_DIRS["oracle (fresh real clips)"]), seconds, num_samples, cfg.eval.seed)
                rows.append("oracle (fresh real clips)")
            write_resynthesis(pretransform, reference, clips, _fresh(split_dir / ROW_DIRS["VAE+vocoder resynthesis"]), num_samples, cfg.eval.batch_size)
            write_shuffled(reference, clips, _fresh(split_dir / ROW_DIRS["shuffled captions"]), num_samples, cfg.eval.seed)
            write_noise(clips, _fresh(split_dir / ROW_DIRS["noise"]), num_samples, cfg.eval.seed)
            rows += ["VAE+vocoder resynthesis", "shuffled captions", "noise"]

        ids = [c.id for c in clips]
        ref_out = cache.get_or_compute(
            {"files": files_digest(reference, ids), "network": suite.identity, "num_samples": num_samples},
            lambda: suite.outputs(reference, clips, num_samples, f"{split}: reference embeddings"),
        )
        split_rows = {}
        for row in rows:
            folder = split_dir / ROW_DIRS[row]
            gen_out = suite.outputs(folder, clips, num_samples, f"{split}: {row}")
            if synthetic:
                split_rows[row] = suite.score(ref_out, gen_out, clips)
            else:
                split_rows[row] = suite.score(ref_out, gen_out, clips, folder, num_samples)
            log(f"{split} / {row}: " + ", ".join(f"{k} {v:.3f}" for k, v in split_rows[row].items() if isinstance(v, float) and ("/" not in k or k in ("acc/all", "phys/all"))))
        results["splits"][split] = {"num_clips": len(clips), "generation_seconds": round(gen_seconds, 1),
                                    "folder": str(split_dir), "rows": split_rows}
    results["num_clips_note"] = "clips per split: " + ", ".join(counts)

    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2))
    write_text_atomic(out_dir / "results.md", results_markdown(results))
    log(f"results: {out_dir / 'results.md'} and results.json")
    return results


def _fresh(folder: Path) -> Path:
    """An empty folder (rows other than the model are cheap and always rewritten)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="make eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="demo", help="experiment name (default: demo)")
    parser.add_argument("--ckpt", help="LM checkpoint (default: <run.root>/<EXP>/last/checkpoints/last.ckpt)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (eval.max_clips=8, sample.steps=25, ...)")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.overrides) + rest
    experiment = args.experiment
    if "=" in experiment:  # `python -m experiments.evaluate key=value` without an experiment name
        overrides.insert(0, experiment)
        experiment = "demo"
    return experiment, args.ckpt, overrides


def main(argv: list[str] | None = None) -> int:
    from experiments.config import ConfigError, load_config
    from lightning_modules.checkpoints import CheckpointError
    from lightning_modules.parts.audio_classifiers import WeightsError

    experiment, ckpt, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(experiment, overrides)
        checkpoint = resolve_checkpoint(cfg, ckpt)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from experiments.preflight import report, run_preflight

    problems = run_preflight(cfg, "eval")
    if problems:
        print(report(cfg, "eval", problems), file=sys.stderr)
        return 2
    sample_overrides = [o for o in overrides if o.startswith("sample.")]
    start = time.perf_counter()
    try:
        evaluate(cfg, checkpoint, sample_overrides)
    except (FileNotFoundError, ValueError, WeightsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log(f"finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
