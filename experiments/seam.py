"""Measure the seam at long-form window shifts (``make seam``).

    python -m experiments.seam [--ckpt CKPT | --exp demo] [--seconds 6] [--overlap 0.75]
        [--end-tokens N] [--captions 16] [--seed 0] [--out FILE.json]

Generates the first caption of ``--captions`` clips of the checkpoint's test split
(``data.test_split`` of its manifests; the synthetic corpus for the demo) for ``--seconds``,
beyond the model's context, so the sliding window shifts (``sample.window_overlap`` and
``sample.window_end_tokens``, or ``--overlap`` and ``--end-tokens``), with the checkpoint's
other sampling settings. Then it measures how far the
sequence jumps across the shifts against every other step
(:func:`lightning_modules.metrics.boundary_jumps`), in tokens and in the VAE decoder's
log-mel frames, and, as a control, at the midpoints between shifts, where nothing special
happens. A seam shows as ``ratio`` well above the control's and ``exceed_p95`` well above
0.05. Prints the numbers and writes them as JSON (default: ``<run>/seam/<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make seam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint (default: <runs>/<exp>/last/checkpoints/last.ckpt)")
    parser.add_argument("--exp", default="demo", help="experiment whose newest run is used when --ckpt is not given")
    parser.add_argument("--runs", default="runs", help="runs root for the default checkpoint")
    parser.add_argument("--seconds", type=float, help="length generated (default: three contexts)")
    parser.add_argument("--overlap", type=float, help="window overlap (default: the checkpoint's sample.window_overlap)")
    parser.add_argument("--end-tokens", type=int, help="the context's last positions the window never samples "
                        "(default: the checkpoint's sample.window_end_tokens)")
    parser.add_argument("--captions", type=int, default=16, help="test clips whose first caption is generated")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", help="JSON file to write")
    return parser.parse_args(argv)


def test_captions(cfg, count: int) -> list[str]:
    """The first captions of up to ``count`` clips of the test split of ``cfg``'s manifests."""
    from datamodules.manifest import read_manifest
    from experiments.pipeline import manifest_sources

    captions = [entry.captions[0] for source in manifest_sources(cfg) for entry in read_manifest(source.path)
                if entry.split == cfg.data.test_split]
    if not captions:
        raise SystemExit(f"error: the manifests hold no clip of split {cfg.data.test_split!r} (data.test_split)")
    return captions[:count]


def measure_seam(tokens: torch.Tensor, log_mel: torch.Tensor, shifts: list[int], frames_per_token: int) -> dict:
    """``tokens (B, N, D)``, ``log_mel (B, frames_per_token × N, F)`` and the token indices
    right after each window shift -> boundary jumps at the shifts and at the midpoints between
    them (the control), in tokens and in log-mel frames."""
    from lightning_modules.metrics import boundary_jumps

    num_tokens = tokens.shape[1]
    ends = [*shifts[1:], num_tokens]
    control = [(start + end) // 2 for start, end in zip(shifts, ends) if (start + end) // 2 > start]
    return {
        "tokens": boundary_jumps(tokens, shifts),
        "tokens_control": boundary_jumps(tokens, control),
        "log_mel": boundary_jumps(log_mel, [frames_per_token * t for t in shifts]),
        "log_mel_control": boundary_jumps(log_mel, [frames_per_token * t for t in control]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.captions < 1:
        raise SystemExit(f"error: --captions={args.captions} must be >= 1")
    if args.overlap is not None and not 0 < args.overlap < 1:
        raise SystemExit(f"error: --overlap={args.overlap:g} must be in (0, 1)")
    from datamodules.atomic import write_json_atomic
    from experiments.config import config_from_container, last_run_dir
    from experiments.pipeline import _sampling_kwargs, check_pretransform, load_audio_lm, load_pretransform_for, num_tokens_for
    from lightning_modules.audio_lm import check_window_end_tokens, window_shifts
    from lightning_modules.checkpoints import CheckpointError

    ckpt = Path(args.ckpt) if args.ckpt else last_run_dir(args.runs, args.exp) / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"error: checkpoint {ckpt} does not exist")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        system = load_audio_lm(ckpt, device)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    cfg = config_from_container(system.hparams["config"])
    overlap = float(cfg.sample.window_overlap if args.overlap is None else args.overlap)
    end_tokens = int(cfg.sample.window_end_tokens if args.end_tokens is None else args.end_tokens)
    limit = system.decoder.max_tokens
    try:
        check_window_end_tokens(limit, end_tokens)
    except ValueError:
        raise SystemExit(f"error: --end-tokens={end_tokens} must be in [0, model.max_tokens - 2 = {limit - 2}]") from None
    pretransform = load_pretransform_for(cfg).to(device).eval()
    check_pretransform(system, pretransform)
    seconds = args.seconds if args.seconds is not None else 3 * limit / pretransform.tokens_per_second
    num_tokens = num_tokens_for(seconds, pretransform)
    shifts = window_shifts(num_tokens, limit, overlap, window_end_tokens=end_tokens)
    if not shifts:
        raise SystemExit(f"error: --seconds={seconds:g} fits the context (model.max_tokens={limit}): no window shift to measure")
    captions = test_captions(cfg, args.captions)
    print(f"[seam] {len(captions)} captions, {seconds:g} s = {num_tokens} tokens, {len(shifts)} window shifts "
          f"(overlap {overlap:g}, model.max_tokens={limit}, window_end_tokens={end_tokens})")
    start = time.perf_counter()
    with torch.no_grad():
        kwargs = {**_sampling_kwargs(cfg, system, args.seed), "window_overlap": overlap, "window_end_tokens": end_tokens}
        tokens = system.generate_tokens(captions, num_tokens, progress=True, **kwargs)
        log_mel = pretransform.decode_mel(tokens).transpose(1, 2)  # (B, 4N, n_mels)
    result = {
        "checkpoint": str(ckpt.resolve()), "seconds": seconds, "window_overlap": overlap,
        "window_end_tokens": end_tokens, "shifts": shifts,
        "captions": captions, "seed": args.seed, "sampler": cfg.sample.sampler, "steps": int(cfg.sample.steps),
        "cfg_scale": float(cfg.sample.cfg_scale), "generate_s": round(time.perf_counter() - start, 1),
        **measure_seam(tokens.float(), log_mel.float(), shifts, pretransform.downsample),
    }
    for key in ("tokens", "tokens_control", "log_mel", "log_mel_control"):
        row = result[key]
        print(f"[seam] {key:16s} jump {row['at_boundary']:.3f} vs {row['elsewhere']:.3f} elsewhere = {row['ratio']:.2f}×, "
              f"above the clip's 95th percentile at {100 * row['exceed_p95']:.0f}%")
    out = Path(args.out) if args.out else ckpt.parent.parent / "seam" / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result, indent=2)
    print(f"[seam] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
