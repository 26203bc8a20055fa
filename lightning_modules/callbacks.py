"""Callbacks shared by the systems: audio samples during training and the run-long progress
bar (checkpoint safety lives in :mod:`lightning_modules.checkpoints`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
import numpy as np
import torch

from datamodules.atomic import write_json_atomic
from datamodules.audio_io import save_wav


def write_samples(
    out_dir: Path,
    waves: torch.Tensor,
    captions: Sequence[str],
    sample_rate: int,
    settings: dict[str, Any],
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``waves`` (B, S) as ``out_dir/<name>.wav`` plus ``out_dir/samples.json`` listing
    each file with its caption and the generation settings. Returns the wav paths."""
    out_dir = Path(out_dir)
    names = list(names) if names is not None else [f"{i:03d}" for i in range(len(captions))]
    paths = []
    for name, wave in zip(names, waves.detach().float().cpu().numpy()):
        path = out_dir / f"{name}.wav"
        save_wav(path, np.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0), sample_rate)
        paths.append(path)
    listing = {
        "settings": settings,
        "samples": [{"file": p.name, "caption": c} for p, c in zip(paths, captions)],
    }
    write_json_atomic(out_dir / "samples.json", listing)
    return paths


class AudioSamplesCallback(L.Callback):
    """Renders audio for fixed captions at the validation that follows every
    ``every_n_steps`` optimizer steps and at the end of training, at each of ``cfg_scales``:
    wavs + captions under ``<out_dir>/step_<N>/`` (the first scale; the others in
    ``step_<N>/cfg_<scale>/``) and, in TensorBoard, for caption ``i`` at scale ``s``:
    audio ``samples/cfg_<s>/<i>``, its log-mel image ``samples/cfg_<s>/<i>/mel`` and the
    caption as text ``samples/<i>/caption``.

    Registered after Lightning's EMA callback, it renders with the EMA weights (the EMA
    callback swaps them in for validation and copies them into the model at the end).

    Args:
        captions: the prompts to render (held-out captions work best).
        render: ``render(pl_module, captions, cfg_scale=s) -> waves (B, S)`` (e.g. generate
            tokens and decode them with the pretransform).
        sample_rate: of the rendered audio.
        out_dir: where the wavs go.
        every_n_steps: 0 renders only at the end of training.
        settings: stored beside the wavs (``cfg_scale`` set per scale).
        cfg_scales: the guidance scales to render, the main one first.
        picture: ``picture(wave (S,)) -> image (C, H, W)`` in [0, 1], e.g. its log-mel; None:
            no images.
    """

    def __init__(
        self,
        captions: Sequence[str],
        render: Callable[..., torch.Tensor],
        sample_rate: int,
        out_dir: str | Path,
        every_n_steps: int = 0,
        settings: dict[str, Any] | None = None,
        cfg_scales: Sequence[float] = (3.0,),
        picture: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not cfg_scales:
            raise ValueError("AudioSamplesCallback: cfg_scales is empty")
        self.captions = list(captions)
        self.render = render
        self.sample_rate = sample_rate
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.settings = settings or {}
        self.cfg_scales = [float(s) for s in cfg_scales]
        self.picture = picture
        self._last_rendered_step = -1

    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank renders the same samples (a sharded model's forward needs all ranks:
        FSDP gathers each layer's weights; under DDP the others would only wait); global
        rank zero writes the wavs and the TensorBoard events."""
        step = trainer.global_step
        if not self.captions or step == self._last_rendered_step:
            return
        self._last_rendered_step = step
        experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
        writer = experiment if experiment is not None and hasattr(experiment, "add_audio") else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            for index, scale in enumerate(self.cfg_scales):
                waves = self.render(pl_module, self.captions, cfg_scale=scale).float().cpu()  # (B, S)
                if not trainer.is_global_zero:
                    continue
                folder = self.out_dir / f"step_{step:07d}"
                write_samples(folder if index == 0 else folder / f"cfg_{scale:g}", waves, self.captions,
                              self.sample_rate, {**self.settings, "cfg_scale": scale})
                if writer is not None:
                    self._to_tensorboard(writer, waves, scale, step)
        finally:
            pl_module.train(was_training)
        if writer is not None:  # rank zero
            for i, caption in enumerate(self.captions):
                writer.add_text(f"samples/{i:02d}/caption", caption, step)

    def _to_tensorboard(self, writer: Any, waves: torch.Tensor, scale: float, step: int) -> None:
        for i, wave in enumerate(torch.nan_to_num(waves).clamp(-1, 1)):
            writer.add_audio(f"samples/cfg_{scale:g}/{i:02d}", wave.unsqueeze(0), step, self.sample_rate)
            if self.picture is not None:
                writer.add_image(f"samples/cfg_{scale:g}/{i:02d}/mel", self.picture(wave), step, dataformats="CHW")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every > 0 and step > 0 and step // every > max(self._last_rendered_step, 0) // every:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._render(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar over the whole run's optimizer steps (``trainer.max_steps``)
    instead of restarting every epoch: its ETA is the time left in training. A resumed run
    starts the bar at its step (the rate counts only the steps run now). The readout of the
    logged metrics is a host sync, so it refreshes every ``refresh_rate`` steps."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.reset(total=total)
        bar.initial = bar.n = trainer.global_step
        bar.unit = "step"
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: no per-epoch reset

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and trainer.max_steps and 0 < trainer.max_steps != bar.total:
            bar.total = trainer.max_steps  # set by a time budget
        if bar is None or step == bar.n or not self._should_update(step, bar.total):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # no per-epoch readout (a host sync every epoch) and no per-epoch bar to close


class TimeBudget(L.Callback):
    """End a run by a wall-clock deadline with its learning-rate schedule complete: after
    ``calibrate_steps`` optimizer steps, set ``trainer.max_steps`` to the steps that fit, and
    correct it once, ``refine_at`` of the way through the run.

    The seconds per step are measured from optimizer step ``start_step`` on (the first steps
    are slow: allocations, caches), in the real loop (EMA, logging and all). The first
    decision comes inside the warmup, where the schedule does not yet depend on the step
    count (``AudioLMSystem.configure_optimizers`` reads ``trainer.max_steps`` at every step);
    it pads the rate by ``overhead`` for what recurs between steps and has not happened yet
    (validation, sample renders, checkpoints). The correction, at ``refine_at`` of the
    decided steps, times everything since ``start_step``, recurring work included, so it
    pads only by ``refine_overhead``; it anchors the schedule there
    (``AudioLMSystem.schedule_anchor``, see ``audio_lm.cosine_progress``), so the learning
    rate stays continuous and still anneals to its end. The count never exceeds the
    configured ``max_steps``. Global rank zero decides and broadcasts, so every process
    stops at the same step. Decisions and the anchor are kept in checkpoints: a resumed run
    keeps them.

    Args:
        deadline: ``time.time()`` by which training should end.
        calibrate_steps: the optimizer step at which the count is first decided: the LR
            warmup's length (where the cosine part of the schedule starts).
        start_step: the step the timing starts from (< ``calibrate_steps``).
        overhead: factor on the seconds per step at the first decision.
        refine_at: where the correction comes, as a share of the first decision's steps
            after ``calibrate_steps`` (0: no correction).
        refine_overhead: factor on the seconds per step at the correction.
    """

    def __init__(self, deadline: float, calibrate_steps: int, start_step: int = 10, overhead: float = 1.15,
                 refine_at: float = 0.5, refine_overhead: float = 1.05) -> None:
        if not 0 <= start_step < calibrate_steps:
            raise ValueError(f"TimeBudget needs 0 <= start_step < calibrate_steps, got {start_step}, {calibrate_steps}")
        if not 0.0 <= refine_at < 1.0:
            raise ValueError(f"TimeBudget needs 0 <= refine_at < 1, got {refine_at}")
        self.deadline, self.calibrate_steps, self.start_step, self.overhead = deadline, calibrate_steps, start_step, overhead
        self.refine_at, self.refine_overhead = refine_at, refine_overhead
        self.decided_max_steps: int | None = None
        self.configured_max_steps: int | None = None
        self.refine_step: int | None = None  # the step of the correction; None once it is done (or off)
        self.anchor: tuple[int, float] | None = None
        self._start: tuple[float, int] | None = None

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop.max_steps = self.decided_max_steps
        pl_module.schedule_anchor = self.anchor

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.decided_max_steps is not None:  # restored from a checkpoint
            self._apply(trainer, pl_module)

    def _fitting_steps(self, trainer: L.Trainer, step: int, overhead: float) -> tuple[int, float]:
        """(steps that fit by the deadline at the rate measured since ``_start``, that rate);
        at least one more step, at most the configured ones; rank zero's answer on every rank."""
        seconds_per_step = (time.perf_counter() - self._start[0]) / max(1, step - self._start[1])
        fitting = step + int(max(0.0, self.deadline - time.time()) / (seconds_per_step * overhead))
        decided = max(step + 1, min(self.configured_max_steps, fitting))
        return int(trainer.strategy.broadcast(decided, src=0)), seconds_per_step

    def _report(self, trainer: L.Trainer, what: str, seconds_per_step: float, step: int) -> None:
        if trainer.is_global_zero:
            minutes = (self.deadline - time.time()) / 60
            print(f"[lm] time budget ({what}): {seconds_per_step:.3f} s per step → trainer.max_steps "
                  f"{self.decided_max_steps} ({minutes:.1f} min left)", flush=True)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"train/budget_max_steps": self.decided_max_steps,
                                        "train/budget_step_time_s": seconds_per_step}, step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.start_step or (self.decided_max_steps is not None and self.refine_step is None):
            return
        if self._start is None:
            self._start = (time.perf_counter(), step)
            return
        if self.decided_max_steps is None and step >= self.calibrate_steps:
            self.configured_max_steps = int(trainer.max_steps)
            self.decided_max_steps, seconds_per_step = self._fitting_steps(trainer, step, self.overhead)
            later = int(self.refine_at * (self.decided_max_steps - step))
            self.refine_step = step + later if self.refine_at > 0 and later > 0 else None
            self._apply(trainer, pl_module)
            self._report(trainer, "first decision", seconds_per_step, step)
        elif self.refine_step is not None and step >= self.refine_step:
            from lightning_modules.audio_lm import cosine_progress

            progress = cosine_progress(step, self.calibrate_steps, self.decided_max_steps, self.anchor)
            self.decided_max_steps, seconds_per_step = self._fitting_steps(trainer, step, self.refine_overhead)
            self.anchor, self.refine_step = (step, progress), None
            self._apply(trainer, pl_module)
            self._report(trainer, "corrected", seconds_per_step, step)

    def state_dict(self) -> dict[str, Any]:
        return {"decided_max_steps": self.decided_max_steps, "configured_max_steps": self.configured_max_steps,
                "refine_step": self.refine_step, "anchor": list(self.anchor) if self.anchor else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decided_max_steps = state_dict.get("decided_max_steps")
        self.configured_max_steps = state_dict.get("configured_max_steps")
        self.refine_step = state_dict.get("refine_step")  # checkpoints from before the correction: None, no correction
        anchor = state_dict.get("anchor")
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor else None
