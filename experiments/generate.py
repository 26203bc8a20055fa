"""Generate audio from text with a trained language model (``make generate``).

    python -m experiments.generate [--ckpt CKPT] --prompt "a dog barks" [--seconds 10 --cfg 3
        --steps 100 --temperature 1 --seed 0 --out DIR]
    python -m experiments.generate --prompts prompts.txt      # one prompt per line
    python -m experiments.generate --audio-prompt clip.wav [--prompt-seconds 1] [--prompt "..."]

Without ``--ckpt`` the newest ``demo`` run's last checkpoint is used. Writes one wav per
prompt plus ``samples.json`` (file, caption and every generation setting).

Continuation (``--audio-prompt``, ``make generate AUDIO_PROMPT=clip.wav``): the clip's
opening ``--prompt-seconds`` are encoded with the pretransform and run through the KV cache
after the text prefix; the model continues for ``--seconds``. Each wav holds the prompt
(its VAE resynthesis) followed by the continuation. Without a caption it continues
unconditionally.

Streaming (``--stream``, ``make generate STREAM=1``): audio is decoded in chunks of
``sample.stream_chunk_tokens`` tokens while the rest is still being sampled (the same
tokens as without it); the time to the first chunk is printed and recorded. ``--pcm
PATH`` (``-``: stdout) also writes the chunks as they come, 16-bit mono PCM, e.g.
``... --pcm - | aplay -f S16_LE -r 16000``; the wav files are written at the end as always.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lightning_modules.audio_lm import CFG_SCHEDULES

    parser = argparse.ArgumentParser(prog="make generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint (default: <runs>/demo/last/checkpoints/last.ckpt)")
    parser.add_argument("--exp", default="demo", help="experiment whose newest run is used when --ckpt is not given")
    parser.add_argument("--runs", default="runs", help="runs root for the default checkpoint")
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--seconds", type=float, help="audio length (default: the checkpoint's sample.seconds)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    parser.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="guidance scale per token (default: the checkpoint's sample.cfg_schedule)")
    parser.add_argument("--cfg-rescale", type=float, help="guidance rescale in [0, 1] (default: the checkpoint's sample.cfg_rescale)")
    parser.add_argument("--steps", type=int, help="reverse diffusion steps per token")
    parser.add_argument("--temperature", type=float, help="diffusion sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--out", help="output folder (default: <run>/generated/<timestamp>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sampler", help="reverse diffusion sampler of the head (default: the checkpoint's sample.sampler)")
    parser.add_argument("--window-overlap", type=float, help="long-form: share of the window kept at a shift (default: the checkpoint's sample.window_overlap)")
    parser.add_argument("--window-end-tokens", type=int, help="long-form: the context's last positions the window never samples (default: the checkpoint's sample.window_end_tokens)")
    parser.add_argument("--audio-prompt", help="continue this audio file (its opening --prompt-seconds)")
    parser.add_argument("--prompt-seconds", type=float, default=1.0, help="how much of --audio-prompt to continue from (default 1)")
    parser.add_argument("--stream", action="store_true", help="decode audio in chunks while tokens are sampled; report time to first audio")
    parser.add_argument("--pcm", help="with --stream: also write the chunks as they come as 16-bit mono PCM to this file (-: stdout)")
    return parser.parse_args(argv)


def check_settings(args: argparse.Namespace) -> None:
    """Refuse out-of-range generation settings before any checkpoint is loaded."""
    from lightning_modules.parts.diffusion_head import SAMPLERS

    rules = [
        ("--seconds / SECONDS", args.seconds, lambda v: v > 0, "must be > 0"),
        ("--cfg / CFG", args.cfg, lambda v: v >= 0, "must be >= 0 (1: no guidance)"),
        ("--cfg-rescale / CFG_RESCALE", args.cfg_rescale, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("--steps / STEPS", args.steps, lambda v: v >= 1, "must be >= 1"),
        ("--temperature / TEMPERATURE", args.temperature, lambda v: v > 0, "must be > 0"),
        ("--batch-size", args.batch_size, lambda v: v >= 1, "must be >= 1"),
        ("--prompt-seconds / PROMPT_SECONDS", args.prompt_seconds, lambda v: v > 0, "must be > 0"),
        ("--window-overlap", args.window_overlap, lambda v: 0 < v < 1, "must be in (0, 1)"),
        ("--window-end-tokens", args.window_end_tokens, lambda v: v >= 0, "must be >= 0"),
    ]
    for name, value, ok, rule in rules:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise SystemExit(f"error: {name}={value:g} {rule}")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise SystemExit(f"error: --sampler / SAMPLER={args.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if args.pcm is not None and not args.stream:
        raise SystemExit("error: --pcm writes streamed chunks; add --stream")
    if args.audio_prompt is not None and not Path(args.audio_prompt).is_file():
        raise SystemExit(f"error: --audio-prompt / AUDIO_PROMPT file {args.audio_prompt} does not exist")


def read_prompts(args: argparse.Namespace) -> list[str | None]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"error: --prompts file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise SystemExit(f"error: --prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        file_prompts = [line.strip() for line in lines if line.strip()]  # blank lines separate nothing
        if not file_prompts:
            raise SystemExit(f"error: --prompts file {path} holds no prompt (every line is blank)")
        prompts += file_prompts
    if not prompts and not args.prompt:
        if args.audio_prompt is not None:
            return [None]  # continue the audio prompt without a caption
        raise SystemExit("error: give --prompt \"...\" (PROMPT=) or --prompts file.txt (PROMPTS=)")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise SystemExit(f"error: prompt {i + 1} is empty or whitespace; give a caption such as \"a dog barks\"")
    return [prompt.strip() for prompt in prompts]


def warn_overlong(system, prompts: list[str]) -> None:
    """Prompts longer than the text encoder reads are cut; say which, once each."""
    for prompt, cut in zip(prompts, system.text.overlong(prompts)):
        if cut:
            print(f"warning: prompt {prompt[:60]!r}… is longer than the text encoder reads; "
                  "it is truncated", file=sys.stderr)


def open_pcm(path: str | None):
    """The binary stream ``--pcm`` writes to (``-``: stdout), or None."""
    if path is None:
        return None
    return sys.stdout.buffer if path == "-" else open(path, "wb")


def write_pcm(stream, wave: torch.Tensor) -> None:
    """``wave (S,)`` float in [-1, 1] -> 16-bit little-endian PCM, flushed at once (a player is waiting)."""
    stream.write((wave.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy().astype("<i2").tobytes())
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_settings(args)
    console = sys.stderr if args.pcm == "-" else sys.stdout  # stdout carries the PCM stream then
    prompts = read_prompts(args)
    from experiments.config import config_from_container, last_run_dir
    from experiments.pipeline import (
        check_length, check_pretransform, encode_audio_prompt, load_audio_lm, load_pretransform_for, num_tokens_for, render_fn,
        stream_fn,
    )
    from lightning_modules.audio_lm import check_window_end_tokens, window_shifts
    from lightning_modules.parts.diffusion_head import check_temperature
    from lightning_modules.callbacks import write_samples
    from lightning_modules.checkpoints import CheckpointError

    ckpt = Path(args.ckpt) if args.ckpt else last_run_dir(args.runs, args.exp) / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"error: checkpoint {ckpt} does not exist")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    try:
        system = load_audio_lm(ckpt, device)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if prompts != [None]:
        warn_overlong(system, prompts)
    cfg = config_from_container(system.hparams["config"])
    sample = cfg.sample
    if args.seconds is not None:
        sample.seconds = args.seconds
    if args.cfg is not None:
        sample.cfg_scale = args.cfg
    if args.cfg_schedule is not None:
        sample.cfg_schedule = args.cfg_schedule
    if args.cfg_rescale is not None:
        sample.cfg_rescale = args.cfg_rescale
    if args.steps is not None:
        sample.steps = args.steps
    if args.temperature is not None:
        sample.temperature = args.temperature
    if args.sampler is not None:
        sample.sampler = args.sampler
    if args.window_overlap is not None:
        sample.window_overlap = args.window_overlap
    if args.window_end_tokens is not None:
        sample.window_end_tokens = args.window_end_tokens
    try:  # before the VAE is loaded and anything is sampled
        check_temperature(str(sample.sampler), float(sample.temperature), system.head.ddim_eta)
        check_window_end_tokens(system.decoder.max_tokens, int(sample.window_end_tokens))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    pretransform = load_pretransform_for(cfg).to(device).eval()
    check_pretransform(system, pretransform)
    prompt_tokens, prompt_seconds = None, 0.0
    if args.audio_prompt is not None:
        try:
            prompt_tokens = encode_audio_prompt(cfg, system, pretransform, args.audio_prompt, args.prompt_seconds)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        prompt_seconds = prompt_tokens.shape[1] / pretransform.tokens_per_second
    note = check_length(cfg, system, pretransform, sample.seconds + prompt_seconds)
    if note:
        print(f"[generate] {note}", file=console)
    if prompt_tokens is not None and prompt_tokens.shape[1] >= system.decoder.max_tokens:
        raise SystemExit(f"error: --prompt-seconds: the audio prompt ({prompt_seconds:g} s) fills the model's whole "
                         f"context (model.max_tokens={system.decoder.max_tokens}); give a shorter one")

    out_dir = Path(args.out) if args.out else ckpt.parent.parent / "generated" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = {
        "checkpoint": str(ckpt.resolve()),
        "seconds": sample.seconds,
        "cfg_scale": sample.cfg_scale,
        "cfg_schedule": sample.cfg_schedule,
        "cfg_rescale": sample.cfg_rescale,
        "steps": sample.steps,
        "temperature": sample.temperature,
        "sampler": sample.sampler,
        "seed": args.seed,
        "sample_rate": pretransform.sample_rate,
        **({"audio_prompt": str(Path(args.audio_prompt).resolve()), "prompt_seconds": round(prompt_seconds, 4),
            "prompt_tokens": int(prompt_tokens.shape[1]), "unconditional": prompts == [None],
            "layout": "each wav: the prompt's VAE resynthesis, then the continuation"}
           if prompt_tokens is not None else {}),
    }
    num_prompt = 0 if prompt_tokens is None else int(prompt_tokens.shape[1])
    shifts = window_shifts(num_tokens_for(sample.seconds, pretransform), system.decoder.max_tokens,
                           float(sample.window_overlap), num_prompt, int(sample.window_end_tokens))
    if shifts:  # where in each wav the long-form window shifted: listen there for a seam
        tps = pretransform.tokens_per_second
        settings["window_shift_seconds"] = [round((num_prompt + i) / tps, 3) for i in shifts]
        settings["window_overlap"], settings["window_end_tokens"] = float(sample.window_overlap), int(sample.window_end_tokens)
    if args.stream:
        settings["stream"] = {key: int(sample[f"stream_{key}"]) for key in ("chunk_tokens", "left_tokens", "lookahead_tokens", "crossfade_tokens")}
    pcm = open_pcm(args.pcm)
    start = time.perf_counter()
    waves, first_audio = [], []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        history = prompt_tokens.expand(len(batch), -1, -1) if prompt_tokens is not None else None
        captions_or_none = None if batch == [None] else batch
        if not args.stream:
            waves.append(render_fn(cfg, pretransform, sample.seconds, args.seed + i, progress=True)(system, captions_or_none, history))
            continue
        batch_start, chunks = time.perf_counter(), []
        for chunk in stream_fn(cfg, pretransform, sample.seconds, args.seed + i)(system, captions_or_none, history):
            if not chunks:
                first_audio.append(time.perf_counter() - batch_start)
                print(f"[generate] first audio of batch {i // args.batch_size + 1} after {first_audio[-1]:.2f} s "
                      f"({chunk.shape[-1] / pretransform.sample_rate:g} s of it)", file=console)
            chunks.append(chunk)
            if pcm is not None:  # the batch's first clip: clips interleaved chunk by chunk would be noise
                write_pcm(pcm, chunk[0])
        waves.append(torch.cat(chunks, dim=1))
    if pcm is not None and pcm is not sys.stdout.buffer:
        pcm.close()
    if first_audio:
        settings["first_audio_seconds"] = [round(t, 3) for t in first_audio]
    elapsed = time.perf_counter() - start
    settings["wall_seconds"] = round(elapsed, 2)
    captions = ["" if p is None else p for p in prompts]
    paths = write_samples(out_dir, torch.cat(waves), captions, pretransform.sample_rate, settings)
    what = f"{prompt_seconds:g} s of {args.audio_prompt} + " if prompt_tokens is not None else ""
    print(f"[generate] {len(paths)} clips of {what}{sample.seconds:g} s in {elapsed:.1f} s → {out_dir}", file=console)
    for path, prompt in zip(paths, prompts):
        print(f"  {path.name}: {prompt if prompt is not None else '(unconditional continuation)'}", file=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
