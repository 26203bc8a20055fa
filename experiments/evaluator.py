"""Train the synthetic-corpus evaluator (``make evaluator`` = ``python -m experiments.train evaluator``).

Training data: the evaluator is a measuring instrument, so it must read the attribute
combinations held out of the LM's training (``test_novel``) as well as the seen ones. It
is therefore trained on its *own* synthetic corpus, ``<run.data_root>/evaluator_corpus``:
the same generator with seed ``corpus.seed + EVALUATOR_SEED_OFFSET`` and sizes derived from
``corpus.*`` — its ``train`` clips plus ``corpus.num_train // 6`` clips of the novel
combinations, all used for training. It never sees a clip of the corpus the LM is trained
and evaluated on; its accuracy is then measured on that corpus' ``val``, ``test`` and
``test_novel`` clips (held-out real clips).

Stores in ``<run.root>/<experiment>/<timestamp>/``:

    evaluator.pt     the classifier (weights + config), read by `make eval` (eval.evaluator.path)
    evaluator.json   its accuracy per attribute on held-out real clips (val, test, test_novel),
                     training time and steps, and the corpus settings it was trained on
    checkpoints/     the Lightning checkpoint; tensorboard/ the training curves

and fails (after writing them) when an attribute's val, test or test_novel accuracy is
below ``eval.evaluator.min_accuracy``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from datamodules.manifest import ManifestSource
from datamodules.synthetic import LABEL_VALUES, describe_corpus_vocabulary
from datamodules.atomic import write_text_atomic
from experiments.config import make_run_dir
from lightning_modules.evaluator import EvaluatorSystem, attribute_accuracy

EVALUATOR_FILE = "evaluator.pt"
REPORT_FILE = "evaluator.json"
EVALUATOR_SEED_OFFSET = 1000  # the evaluator's corpus: same generator, another seed
NOVEL_SHARE = 6  # one novel-combination clip per this many training clips
TRAIN_MANIFEST = "evaluator_train.jsonl"


def evaluator_training_manifest(cfg: DictConfig) -> Path:
    """Generate (or reuse) the evaluator's own corpus and write a manifest whose ``train``
    split holds its train clips and its novel-combination clips (module docstring)."""
    from datamodules.manifest import read_manifest, write_manifest
    from datamodules.synthetic import generate_corpus

    corpus = cfg.corpus
    directory = Path(cfg.run.data_root) / "evaluator_corpus"
    manifest = generate_corpus(
        directory,
        seed=corpus.seed + EVALUATOR_SEED_OFFSET,
        clip_seconds=corpus.clip_seconds,
        sample_rate=corpus.sample_rate,
        num_train=corpus.num_train,
        num_val=0,
        num_test=0,
        num_test_novel=max(1, corpus.num_train // NOVEL_SHARE),
        progress=True,
    )
    entries = [dataclasses.replace(entry, split="train") for entry in read_manifest(manifest)]
    path = directory / TRAIN_MANIFEST
    write_manifest(path, entries)
    return path


def evaluator_trainer(cfg: DictConfig, run_dir: Path, max_steps: int, val_every_steps: int) -> L.Trainer:
    """A single-device Trainer (the network is tiny) logging to ``run_dir``."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.callbacks import StepProgressBar
    from lightning_modules.checkpoints import SafeCheckpointIO

    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        val_check_interval=val_every_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.trainer.log_every_steps,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False),
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0),
                   StepProgressBar(refresh_rate=max(1, int(cfg.trainer.log_every_steps)))],
        plugins=[SafeCheckpointIO()],
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def train_evaluator(cfg: DictConfig) -> Path:
    """Train the attribute classifier on the synthetic corpus; returns the run directory."""
    from experiments.pipeline import audio_datamodule, container, log, manifest_sources, mel_kwargs, set_threads

    if cfg.data.source != "synthetic":
        raise ValueError("the evaluator is trained on the synthetic corpus: set data.source=synthetic")
    set_threads(cfg)
    ev = cfg.eval.evaluator
    run_dir = make_run_dir(cfg)
    log("evaluator", f"run directory: {run_dir}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sources = manifest_sources(cfg)  # the corpus the LM uses: held-out accuracy is measured on it
    datamodule = audio_datamodule(cfg, sources, batch_size=ev.batch_size)
    train_manifest = evaluator_training_manifest(cfg)
    log("evaluator", f"training clips: {train_manifest}")
    train_data = audio_datamodule(cfg, [ManifestSource(path=str(train_manifest), weight=1.0)], batch_size=ev.batch_size)
    train_data.val_split = None
    system = EvaluatorSystem(
        label_values=LABEL_VALUES,
        mel_cfg=mel_kwargs(cfg),
        channels=list(ev.channels),
        embed_dim=ev.embed_dim,
        lr=ev.lr,
        max_steps=ev.max_steps,
        splice_share=ev.splice_share,
    )
    trainer = evaluator_trainer(cfg, run_dir, ev.max_steps, ev.val_every_steps)
    start = time.perf_counter()
    trainer.fit(
        system,
        train_dataloaders=train_data.train_dataloader(),
        val_dataloaders=datamodule.split_dataloader(cfg.data.val_split),
    )
    train_seconds = time.perf_counter() - start
    log("evaluator", f"trained {trainer.global_step} steps in {train_seconds:.0f} s")

    model = system.model.cpu().eval()
    accuracy = {}
    for split in (cfg.data.val_split, cfg.data.test_split, "test_novel"):
        loader = datamodule.split_dataloader(split) if split else None
        if loader is not None:
            accuracy[split] = attribute_accuracy(model, loader)
            worst = min((v, k) for k, v in accuracy[split].items() if k not in ("clips", "all_correct"))
            log("evaluator", f"{split}: all attributes right on {accuracy[split]['all_correct']:.1%} of "
                f"{accuracy[split]['clips']} clips; worst attribute {worst[1]} {worst[0]:.1%}")
    checked = [s for s in (cfg.data.val_split, cfg.data.test_split, "test_novel") if s in accuracy]
    failing = {
        f"{split}/{name}": round(value, 4)
        for split in checked
        for name, value in accuracy[split].items()
        if name not in ("clips", "all_correct") and value < ev.min_accuracy
    }
    report = {
        "evaluator": str(run_dir / EVALUATOR_FILE),
        "attributes": model.attributes,
        "accuracy": accuracy,
        "min_accuracy": ev.min_accuracy,
        "meets_min_accuracy": not failing,
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.global_step,
        "corpus": container(cfg.corpus),
        "training_manifest": str(train_manifest),
        "vocabulary": describe_corpus_vocabulary()["label_values"],
        "torch": torch.__version__,
    }
    model.save(run_dir / EVALUATOR_FILE, extra={"accuracy": accuracy, "corpus": report["corpus"]})
    write_text_atomic(run_dir / REPORT_FILE, json.dumps(report, indent=2))
    log("evaluator", f"saved {run_dir / EVALUATOR_FILE} and {run_dir / REPORT_FILE}")
    if failing:
        raise RuntimeError(
            f"the evaluator is below eval.evaluator.min_accuracy={ev.min_accuracy} on {failing}; "
            f"train longer (eval.evaluator.max_steps) or on more clips (corpus.num_train). Report: {run_dir / REPORT_FILE}"
        )
    return run_dir
