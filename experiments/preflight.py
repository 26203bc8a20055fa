"""Preflight: everything an experiment needs on disk, checked at once before any heavy work.

    python -m experiments.preflight [EXP] [key=value ...]     (make check EXP=...)

Also run by ``make train`` / ``make cache`` / ``make eval`` before they start. Lists every
missing or wrong piece together — manifests and their audio, each pretrained directory
and the files it must hold, the evaluation weights, disk space for the latent cache — each
with the exact command that fixes it, and exits with status 2. Nothing is downloaded here.
The same steps, in order, are the README's "The paper recipe".
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

# Where the public checkpoints come from (the ones the paper configs name).
AUDIOLDM_REPO = "cvssp/audioldm-s-full-v2"  # diffusers AudioLDMPipeline: vae/ + vocoder/ (AudioLDM's VAE and HiFi-GAN)
T5_REPO = "google/flan-t5-large"
CLAP_REPO = "laion/clap-htsat-unfused"
AUDIOCAPS_CSV_URL = "https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset/{split}.csv"

VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
T5_TOKENIZER = ("spiece.model", "tokenizer.json")
CLAP_TOKENIZER = ("tokenizer.json", "vocab.json")
STAGES = ("train", "cache", "eval")


@dataclass
class Problem:
    """One missing or wrong piece: the config key, what is wrong, the commands that fix it."""

    key: str
    message: str
    fix: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"  - {self.key}: {self.message}"]
        lines += [f"      {line}" for line in self.fix]
        return "\n".join(lines)


class PreflightError(SystemExit):
    """Raised (exit status 2) after the problems were printed."""


# ---------------------------------------------------------------------------- pieces


def _missing_files(folder: Path, groups: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """For each (what, alternatives) group with none of the files in ``folder``: a description."""
    return [f"{what} ({' or '.join(names)})" for what, names in groups if not any((folder / n).is_file() for n in names)]


def _component_folder(directory: Path, subfolder: str) -> Path:
    """A pipeline dir holds the component under ``subfolder/``; a component dir holds it directly."""
    return directory / subfolder if (directory / subfolder).is_dir() else directory


def hf_download(repo: str, local_dir: str, include: Sequence[str] = ()) -> str:
    pattern = (" --include " + " ".join(f'"{p}"' for p in include)) if include else ""
    return f"huggingface-cli download {repo}{pattern} --local-dir {local_dir}"


def check_audioldm_component(key: str, directory: str | None, subfolder: str, weights: Sequence[str]) -> list[Problem]:
    """``vae.pretrained_dir`` / ``vocoder.pretrained_dir``: AudioLDM's pipeline folder (or the component folder)."""
    fix = [f"the AudioLDM pipeline in diffusers format ({subfolder}/ is what is read):",
           hf_download(AUDIOLDM_REPO, str(directory or "pretrained/audioldm"), ["model_index.json", "vae/*", "vocoder/*"])]
    if not directory:
        return [Problem(key, "is null", fix)]
    path = Path(directory)
    if not path.is_dir():
        return [Problem(key, f"directory {path} does not exist", fix)]
    folder = _component_folder(path, subfolder)
    missing = _missing_files(folder, [("config", ["config.json"]), ("weights", weights)])
    return [Problem(key, f"{folder} lacks {', '.join(missing)}", fix)] if missing else []


def check_hf_model(key: str, directory: str | None, repo: str, tokenizer: Sequence[str], extra=()) -> list[Problem]:
    """A transformers ``save_pretrained`` folder: config, weights, tokenizer (+ ``extra`` groups)."""
    # PyTorch weights, configs and tokenizer files only (the hub folders also hold TF/Flax copies)
    fix = [hf_download(repo, str(directory or f"pretrained/{repo.split('/')[-1]}"),
                       ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])]
    if not directory:
        return [Problem(key, "is null", fix)]
    path = Path(directory)
    if not path.is_dir():
        return [Problem(key, f"directory {path} does not exist", fix)]
    missing = _missing_files(path, [("config", ["config.json"]), ("weights", HF_WEIGHTS), ("tokenizer", tokenizer), *extra])
    return [Problem(key, f"{path} lacks {', '.join(missing)}", fix)] if missing else []


def manifest_fix(path: str) -> list[str]:
    base = Path(path).parent
    return [
        f"AudioCaps: the CSVs into {base}/csv/ (" + ", ".join(AUDIOCAPS_CSV_URL.format(split=s) for s in ("train", "val", "test")) + "),",
        f"the clips (10 s YouTube excerpts, your own download) into {base}/audio/, then:",
        f"python -m datamodules.build_manifest audiocaps --csv-dir {base}/csv --audio-dir {base}/audio --out {path}",
        "(other data: README \"Data: the manifest format\")",
    ]


def check_manifests(cfg: DictConfig, splits: Sequence[str]) -> tuple[list[Problem], int]:
    """Every configured manifest exists and parses, and the audio of ``splits`` is on disk.

    Returns the problems and the number of clips of ``splits`` found (for the disk estimate).
    """
    from datamodules.manifest import ManifestError, parse_manifest_sources, read_manifest, resolve_audio_path

    if cfg.data.source != "manifest":
        return [], 0
    if not cfg.data.manifests:
        return [Problem("data.manifests", "is empty", manifest_fix("data/audiocaps/manifest.jsonl"))], 0
    try:
        sources = parse_manifest_sources(OmegaConf.to_container(cfg.data.manifests, resolve=True),
                                         allow_absolute_paths=bool(cfg.data.allow_absolute_paths))
    except (ManifestError, ValueError, TypeError) as err:
        return [Problem("data.manifests", str(err))], 0
    problems, clips = [], 0
    for k, source in enumerate(sources):
        key = f"data.manifests[{k}]"
        if not Path(source.path).is_file():
            problems.append(Problem(key, f"manifest {source.path} does not exist", manifest_fix(source.path)))
            continue
        try:
            entries = [e for e in read_manifest(source.path) if e.split in splits]
        except ManifestError as err:
            problems.append(Problem(key, str(err), manifest_fix(source.path)))
            continue
        try:
            paths = [resolve_audio_path(source.path, e, source.allow_absolute_paths) for e in entries]
        except ManifestError as err:
            problems.append(Problem(key, str(err)))
            continue
        missing = [p for p in paths if not p.is_file()]
        clips += len(entries) - len(missing)
        if missing:
            examples = ", ".join(str(p) for p in missing[:3])
            problems.append(Problem(
                key, f"{len(missing)} of {len(entries)} audio files of splits {list(splits)} are missing (e.g. {examples})",
                [f"restore them, or rebuild the manifest from what is on disk (its report lists what was left out): "
                 f"python -m datamodules.build_manifest audiocaps --csv-dir ... --audio-dir ... --out {source.path}"],
            ))
    return problems, clips


def cache_bytes(cfg: DictConfig, clips: int) -> int:
    """Latent cache size: posterior mean + std of every clip's tokens, plus the frozen-text file."""
    tokens = min(int(cfg.model.max_tokens), round(float(cfg.data.clip_seconds) * 25)) + 1
    value_bytes = 2 if cfg.cache.dtype == "float16" else 4
    latents = clips * tokens * int(cfg.model.token_dim) * 2 * value_bytes
    text = clips * 5 * 20 * 1024 * value_bytes if cfg.text.kind == "pretrained" and cfg.text.precompute else 0  # ≤5 captions × ~20 T5 tokens × d 1024
    return latents + text


def check_disk(cfg: DictConfig, clips: int) -> list[Problem]:
    if clips == 0 or cfg.cache.dir and (Path(cfg.cache.dir) / "index.json").is_file():
        return []
    need = cache_bytes(cfg, clips)
    where = Path(cfg.cache.dir or Path(cfg.run.data_root) / "cache").absolute()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 1.1 * need:
        return [Problem("cache.dir", f"the latent cache of {clips} clips needs ≈{need / 2**30:.1f} GiB, "
                                     f"{probe} has {free / 2**30:.1f} GiB free",
                        ["free space, or put the cache elsewhere: cache.dir=/big/disk/cache"])]
    return []


def check_eval_weights(cfg: DictConfig) -> list[Problem]:
    from lightning_modules.parts.audio_classifiers import PANNS_FILE, PANNS_URL, VGGISH_FILE, VGGISH_URL

    if cfg.data.source != "manifest":
        return []
    metrics = set(cfg.eval.metrics)
    problems = []
    for needed, key, file_name, url in (({"fad"}, "eval.vggish_path", VGGISH_FILE, VGGISH_URL),
                                        ({"fd", "kl", "is"}, "eval.panns_path", PANNS_FILE, PANNS_URL)):
        path = cfg.eval[key.split(".")[1]]
        if needed & metrics and not (path and Path(path).is_file()):
            target = path or f"pretrained/eval/{file_name}"
            problems.append(Problem(key, f"{'is null' if not path else f'{path} does not exist'} (needed for {sorted(needed & metrics)})",
                                    [f"wget -O '{target}' '{url}'", f"then {key}={target}"]))
    if "clap" in metrics:
        problems += check_hf_model("eval.clap_dir", cfg.eval.clap_dir, CLAP_REPO, CLAP_TOKENIZER,
                                   extra=[("audio preprocessor", ["preprocessor_config.json", "processor_config.json"])])
    return problems


# ---------------------------------------------------------------------------- entry


def run_preflight(cfg: DictConfig, stage: str = "train") -> list[Problem]:
    """Every problem of ``cfg`` for ``stage`` (train | cache | eval), all at once."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    problems: list[Problem] = []
    if cfg.task != "audio_lm" and stage != "train":
        return problems
    splits = list(cfg.cache.splits) if stage != "eval" else (list(cfg.eval.splits) or [cfg.data.test_split])
    manifest_problems, clips = check_manifests(cfg, splits)
    problems += manifest_problems
    if cfg.vae.pretrained_dir:
        problems += check_audioldm_component("vae.pretrained_dir", cfg.vae.pretrained_dir, "vae", VAE_WEIGHTS)
    elif not cfg.vae.train_if_missing and not (Path(cfg.vae.dir) / "pretransform.json").is_file():
        problems.append(Problem("vae.dir", f"{cfg.vae.dir} holds no trained pretransform (and vae.train_if_missing is false)",
                                [f"make train EXP={cfg.vae.experiment}", "or set vae.pretrained_dir to AudioLDM's pipeline folder"]))
    if cfg.vocoder.kind == "hifigan":
        problems += check_audioldm_component("vocoder.pretrained_dir", cfg.vocoder.pretrained_dir, "vocoder",
                                             ("model.safetensors", "pytorch_model.bin"))
    if cfg.task == "audio_lm" and cfg.text.kind == "pretrained":
        problems += check_hf_model("text.t5_dir", cfg.text.t5_dir, T5_REPO, T5_TOKENIZER)
        problems += check_hf_model("text.clap_dir", cfg.text.clap_dir, CLAP_REPO, CLAP_TOKENIZER)
    if stage in ("train", "cache"):
        problems += check_disk(cfg, clips)
    if stage == "train" and cfg.trainer.resume not in (None, "last") and not Path(cfg.trainer.resume).is_file():
        problems.append(Problem("trainer.resume", f"checkpoint {cfg.trainer.resume} does not exist",
                                ["trainer.resume=last resumes the newest run of this experiment"]))
    if stage == "train":
        from experiments.config import ConfigError
        from experiments.pipeline import check_distributed_settings

        try:
            check_distributed_settings(cfg)
        except ConfigError as err:
            problems.append(Problem("trainer.strategy", str(err)))
    if stage == "eval":
        problems += check_eval_weights(cfg)
    return problems


def report(cfg: DictConfig, stage: str, problems: list[Problem]) -> str:
    if not problems:
        return f"preflight for {cfg.experiment} ({stage}): everything is in place"
    head = (f"preflight for {cfg.experiment} ({stage}): {len(problems)} problem{'s' if len(problems) > 1 else ''}, "
            "nothing was started. Fix them (README \"The paper recipe\" has the steps in order):")
    return "\n".join([head, *(p.render() for p in problems)])


def preflight_or_exit(cfg: DictConfig, stage: str) -> None:
    """Print the problems and exit with status 2 when there are any (the entry points' contract)."""
    problems = run_preflight(cfg, stage)
    if problems:
        print(report(cfg, stage, problems), file=sys.stderr)
        raise PreflightError(2)


def main(argv: list[str] | None = None) -> int:
    from experiments.config import config_from_argv

    args = list(sys.argv[1:] if argv is None else argv)
    stage = "train"
    for item in list(args):
        if item.startswith("--stage="):
            stage = item.split("=", 1)[1]
            args.remove(item)
    cfg = config_from_argv(args)
    problems = run_preflight(cfg, stage)
    print(report(cfg, stage, problems), file=sys.stderr if problems else sys.stdout)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
