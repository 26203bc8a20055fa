"""Callbacks shared by the systems: audio samples during training (checkpoint safety lives
in :mod:`lightning_modules.checkpoints`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
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
    """Renders audio for fixed captions every ``every_n_steps`` and at the end of training:
    wavs + captions under ``<out_dir>/step_<N>/`` and audio in TensorBoard.

    Args:
        captions: the prompts to render (held-out captions work best).
        render: ``render(pl_module, captions) -> waves (B, S)`` (e.g. generate tokens and
            decode them with the pretransform).
        sample_rate: of the rendered audio.
        out_dir: where the wavs go.
        every_n_steps: 0 renders only at the end of training.
        settings: stored beside the wavs.
    """

    def __init__(
        self,
        captions: Sequence[str],
        render: Callable[[L.LightningModule, list[str]], torch.Tensor],
        sample_rate: int,
        out_dir: str | Path,
        every_n_steps: int = 0,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.captions = list(captions)
        self.render = render
        self.sample_rate = sample_rate
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.settings = settings or {}
        self._last_rendered_step = -1

    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.captions or step == self._last_rendered_step or not trainer.is_global_zero:
            return
        self._last_rendered_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            waves = self.render(pl_module, self.captions)
        finally:
            pl_module.train(was_training)
        write_samples(self.out_dir / f"step_{step:07d}", waves, self.captions, self.sample_rate, self.settings)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_audio"):
            for i, (caption, wave) in enumerate(zip(self.captions, waves.float().cpu())):
                experiment.add_audio(f"samples/{i:02d}", wave.clamp(-1, 1).unsqueeze(0), step, self.sample_rate)
                experiment.add_text(f"samples/{i:02d}/caption", caption, step)

    # Registered after Lightning's EMA callback, these hooks see the EMA weights: it swaps
    # them in at the start of validation and copies them into the model when training ends.
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._render(trainer, pl_module)
