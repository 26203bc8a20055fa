"""README pictures from a finished run: ``make figures [RUN=runs/demo/last] [OUT=docs/figures]``.

Writes, for the run's experiment ``<exp>``:

* ``<OUT>/<exp>_samples.png`` — log-mel spectrograms of the newest samples rendered during
  training (EMA weights), one row per caption, one column per CFG scale rendered
  (``sample.cfg_scale`` and ``sample.extra_cfg_scales``), each titled with its caption;
* ``<OUT>/<exp>_learning_curve.png`` — from the run's TensorBoard events: training loss
  (next-token and MNTP skipped-target draws apart, where logged), validation loss, and
  ``val/caption_gain`` (how much the first token's loss drops with the true caption);

and prints ``eval/results.md`` of the run when ``make eval`` has written it.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from datamodules.atomic import atomic_path
from lightning_modules.parts.mel import MelFrontEnd


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class FigureError(Exception):
    """A run without what a figure needs (named in the message)."""


def sample_folders(run_dir: Path) -> tuple[Path, list[tuple[float, Path]]]:
    """The newest ``samples/step_N`` of a run and its (CFG scale, folder) pairs, ascending."""
    steps = sorted((run_dir / "samples").glob("step_*"))
    if not steps:
        raise FigureError(f"{run_dir / 'samples'} holds no step_* folder: the run rendered no samples yet")
    latest = steps[-1]
    folders = [latest, *sorted(p for p in latest.glob("cfg_*") if (p / "samples.json").is_file())]
    scaled = [(float(json.loads((f / "samples.json").read_text())["settings"]["cfg_scale"]), f) for f in folders]
    return latest, sorted(scaled)


def samples_figure(run_dir: Path, out: Path, max_captions: int = 4) -> Path:
    """Rows: captions; columns: CFG scales. -> the PNG path."""
    plt = pyplot()
    latest, scaled = sample_folders(run_dir)
    listings = {scale: json.loads((folder / "samples.json").read_text())["samples"] for scale, folder in scaled}
    captions = [entry["caption"] for entry in next(iter(listings.values()))][:max_captions]
    mel = MelFrontEnd()
    fig, axes = plt.subplots(len(captions), len(scaled), figsize=(3.2 * len(scaled), 1.9 * len(captions)), squeeze=False)
    for c, (scale, folder) in enumerate(scaled):
        for r, entry in enumerate(listings[scale][: len(captions)]):
            wave, rate = sf.read(folder / entry["file"], dtype="float32")
            if rate != mel.sample_rate:
                raise FigureError(f"{folder / entry['file']} is at {rate} Hz; the figure's mel front end expects {mel.sample_rate}")
            log_mel = mel(torch.from_numpy(wave)[None])[0].numpy()  # (64, T)
            axis = axes[r, c]
            axis.imshow(log_mel, origin="lower", aspect="auto", cmap="magma",
                        extent=(0, len(wave) / rate, 0, log_mel.shape[0]))
            axis.set_title(("\n".join(textwrap.wrap(entry["caption"], 38)) + "\n" if c == 0 else "\n") + f"CFG {scale:g}",
                           fontsize=8, loc="left")
            axis.set_yticks([])
            axis.tick_params(labelsize=7)
            if r == len(captions) - 1:
                axis.set_xlabel("s", fontsize=7)
    fig.suptitle(f"{run_dir.parent.name}: generated for held-out captions at {latest.name.replace('_', ' ')} (log-mel)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / f"{run_dir.parent.name}_samples.png")


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a small PNG (80 dpi, a 256-colour palette), atomically;
    close it."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(colors=256)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``tag -> (steps, values)`` of every scalar in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tensorboard"
    if not list(folder.glob("events.out.tfevents.*")):
        raise FigureError(f"{folder} holds no TensorBoard event file")
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: (np.array([e.step for e in events.Scalars(tag)]), np.array([e.value for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"]}


def smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Moving average over ``width`` points (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - width, 0)
    return (cumulative[1:] - cumulative[starts]) / (np.arange(1, len(values) + 1) - starts)


def learning_curve_figure(run_dir: Path, out: Path) -> Path:
    """Losses (left) and caption gain (right) over optimizer steps. -> the PNG path."""
    plt = pyplot()
    scalars = read_scalars(run_dir)
    if "train/loss" not in scalars:
        raise FigureError(f"{run_dir / 'tensorboard'} has no train/loss: is it a language-model run?")
    fig, (losses, gain) = plt.subplots(1, 2, figsize=(10, 3))
    for tag, label, style in (("train/loss", "train (all draws)", "-"), ("train/loss_next_token", "train: next-token draws", "-"),
                              ("train/loss_skipped_target", "train: MNTP skipped-target draws", "-"),
                              ("val/loss", "validation (next-token, true captions)", "o-")):
        if tag in scalars:
            steps, values = scalars[tag]
            losses.plot(steps, smooth(values) if style == "-" else values, style, label=label, lw=1.2, ms=4)
    losses.set_yscale("log")
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("diffusion loss")
    losses.legend(fontsize=7)
    if "val/caption_gain" in scalars:
        steps, values = scalars["val/caption_gain"]
        gain.plot(steps, values, "o-", color="C3")
    gain.set_ylim(0, 1)
    gain.set_xlabel("optimizer step")
    gain.set_title("val/caption_gain: 1 − first-token loss (true / shuffled captions)", fontsize=8)
    fig.suptitle(f"{run_dir.parent.name}: learning curves (TensorBoard scalars)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / f"{run_dir.parent.name}_learning_curve.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo/last", help="a finished language-model run directory")
    parser.add_argument("--out", default="docs/figures", help="where the PNGs go")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run).resolve()
    if not (run_dir / "summary.json").is_file():
        print(f"error: {args.run} is not a finished run (no summary.json); `make train` first", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths = [samples_figure(run_dir, out), learning_curve_figure(run_dir, out)]
    except FigureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"[figures] {path}")
    results = run_dir / "eval" / "results.md"
    if results.is_file():
        print(f"[figures] {results}:\n{results.read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
