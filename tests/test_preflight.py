"""Preflight (`make check`, and the start of `make train` / `cache` / `eval`): everything
missing is named at once, with the command that fixes it, without a traceback; and the
paper recipe rehearsed end to end on an AudioCaps-shaped tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from experiments import preflight
from experiments.config import load_config
from experiments.rehearsal import rehearsal_overrides, write_rehearsal

REPO = Path(__file__).resolve().parents[1]
SHRINK = [
    "data.clip_seconds=2.0", "data.batch_size=8", "data.num_workers=0", "trainer.num_workers=0",
    "model.width=32", "model.depth=2", "model.heads=2", "model.max_tokens=50", "model.head.width=32", "model.head.depth=1",
    "trainer.max_steps=4", "trainer.batch_size=4", "trainer.val_every_steps=2", "trainer.ckpt_every_steps=2",
    "trainer.log_every_steps=2", "trainer.num_threads=1", "trainer.accelerator=cpu", "optim.warmup_steps=2",
    "sample.num_captions=2", "sample.steps=4", "sample.seconds=1.0",
]


def cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_fresh_clone_gets_every_missing_piece_at_once_and_nothing_starts(tmp_path):
    """`make train EXP=masked_large` on a machine with nothing downloaded."""
    result = cli("experiments.train", ["masked_large"], cwd=tmp_path)
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err and "5 problems, nothing was started" in err
    for key, fix in [
        ("data.manifests[0]", "python -m datamodules.build_manifest audiocaps --csv-dir data/audiocaps/csv"),
        ("vae.pretrained_dir", "huggingface-cli download cvssp/audioldm-s-full-v2"),
        ("vocoder.pretrained_dir", "vocoder/ is what is read"),
        ("text.t5_dir", "huggingface-cli download google/flan-t5-large"),
        ("text.clap_dir", "huggingface-cli download laion/clap-htsat-unfused"),
    ]:
        assert f"- {key}:" in err and fix in err, key
    assert "cdjkim/audiocaps/master/dataset/train.csv" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no data/: nothing was written
    check = cli("experiments.preflight", ["masked_large"], cwd=tmp_path)  # make check: the same report
    assert check.returncode == 2 and check.stderr == err


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    return root, write_rehearsal(root, {"train": 8, "val": 2, "test": 2}, seconds=2.0)


def config_for(tree, *extra: str):
    root, paths = tree
    return load_config("masked_base", [*rehearsal_overrides(root, paths), *SHRINK, *extra])


def test_a_complete_tree_passes(tree):
    assert preflight.run_preflight(config_for(tree), "train") == []
    assert preflight.run_preflight(config_for(tree), "cache") == []


def test_each_broken_piece_is_named_with_what_it_lacks(tree, tmp_path):
    root, paths = tree
    broken = tmp_path / "pretrained"
    shutil.copytree(root / "pretrained", broken)
    (broken / "audioldm" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "flan-t5-large" / "tokenizer.json").unlink(missing_ok=True)  # transformers 5 writes it, 4 only spiece.model
    (broken / "flan-t5-large" / "spiece.model").unlink(missing_ok=True)
    (broken / "clap-htsat-unfused" / "config.json").unlink()
    manifest = tmp_path / "manifest.jsonl"
    lines = Path(paths["data.manifests"]).read_text().splitlines()
    first = json.loads(lines[0])
    first["path"] = "audio/gone.wav"
    manifest.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    (tmp_path / "audio").mkdir()
    for line in lines[1:]:  # the other clips stay reachable from the new manifest's folder
        entry = json.loads(line)
        src = Path(paths["data.manifests"]).parent / entry["path"]
        (tmp_path / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, tmp_path / entry["path"])
    cfg = config_for(tree, f"data.manifests=[{{path: {manifest}}}]", f"vae.pretrained_dir={broken / 'audioldm'}",
                     f"text.t5_dir={broken / 'flan-t5-large'}", f"text.clap_dir={broken / 'clap-htsat-unfused'}")
    problems = {p.key: p.message for p in preflight.run_preflight(cfg, "train")}
    assert set(problems) == {"data.manifests[0]", "vae.pretrained_dir", "text.t5_dir", "text.clap_dir"}
    assert "1 of " in problems["data.manifests[0]"] and "gone.wav" in problems["data.manifests[0]"]
    assert "weights (diffusion_pytorch_model.safetensors" in problems["vae.pretrained_dir"]
    assert "tokenizer (spiece.model or tokenizer.json)" in problems["text.t5_dir"]
    assert "config (config.json)" in problems["text.clap_dir"]


def test_too_little_disk_for_the_cache_is_reported(tree, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    (problem,) = preflight.run_preflight(config_for(tree, "cache.dir=/nonexistent/cache"), "cache")
    assert problem.key == "cache.dir" and "GiB free" in problem.message and "cache.dir=/big/disk" in problem.fix[0]


def test_eval_needs_the_metric_weights(tree):
    problems = {p.key for p in preflight.run_preflight(config_for(tree), "eval")}
    assert problems == {"eval.vggish_path", "eval.panns_path"}  # CLAP is in the tree; VGGish/CNN14 were not written
    assert not preflight.run_preflight(config_for(tree, "eval.metrics=[clap]"), "eval")


@pytest.mark.slow
def test_paper_recipe_rehearsed_end_to_end(tmp_path):
    """AudioCaps-shaped data (44.1 kHz stereo, odd rates, bad files) + tiny random AudioLDM /
    FLAN-T5 / CLAP / VGGish / CNN14 in their real layouts → manifest → preflight → cache →
    masked_base (shrunk) → `make generate` → `make eval` → results.json."""
    paths = write_rehearsal(tmp_path, {"train": 16, "val": 4, "test": 4}, seconds=2.0, eval_weights=True)
    report = json.loads((Path(paths["data.manifests"]).parent / "manifest.report.json").read_text())
    assert report["num_usable"] == 24 and len(report["problems"]) == 4  # corrupt, silent, too short, not downloaded
    args = ["masked_base", *rehearsal_overrides(tmp_path, paths), *SHRINK]
    check = cli("experiments.preflight", args, cwd=REPO)
    assert check.returncode == 0 and "everything is in place" in check.stdout
    train = cli("experiments.train", args, cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "runs" / "masked_base" / "last" / "checkpoints" / "last.ckpt"
    gen = cli("experiments.generate", ["--ckpt", str(ckpt), "--prompt", "a dog barks", "--seconds", "1", "--steps", "4",
                                       "--out", str(tmp_path / "gen")], cwd=REPO)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert (tmp_path / "gen" / "000.wav").is_file()
    ev = cli("experiments.evaluate", [*args, "eval.max_clips=4", "eval.batch_size=4", "eval.seconds=2.0"], cwd=REPO)
    assert ev.returncode == 0, ev.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "masked_base" / "last" / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert all(metric in text for metric in ("fad", "fd", "kl", "is", "clap"))
