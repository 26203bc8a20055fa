"""``make gpu-check``: the paper recipe at the paper's shapes on one GPU, in minutes.

    python -m experiments.gpu_check [--steps 300] [--batch 128] [--root DIR] [key=value ...]
    python -m experiments.gpu_check --smoke       # tiny shapes on the CPU (what CI runs)

1. writes a rehearsal tree (``experiments.rehearsal``): AudioCaps-shaped 10.24 s clips and
   random AudioLDM / FLAN-T5-large / CLAP directories in their real layouts and sizes
   (tiny with ``--smoke``);
2. trains ``masked_base`` through the real pipeline (cache → text embeddings → LM) at the
   paper's shapes — decoder 24 × 768, 256 tokens × 128 values, diffusion MLP 3 × 1024,
   ``batch_mul`` 4 — in bf16-mixed for ``--steps`` steps;
3. generates one 10.24 s clip with the KV cache and decodes it.

Prints (and writes to ``<root>/gpu_check.json``, and to ``$OUT`` when set): step time,
audio tokens/s, achieved TFLOP/s against the GPU's bf16 dense peak (matmul FLOPs of the
decoder, attention and head, forward + backward = 3 × forward), peak memory, and the
generation real-time factor. Exit code 2 when no GPU is visible (unless ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def step_flops(system, batch_size: int, prefix_len: int, num_tokens: int) -> float:
    """Matmul FLOPs of one training step (forward + backward ≈ 3 × forward).

    Decoder: 2 FLOPs per weight per position over S = prefix + BOS + tokens positions, plus
    attention scores and values (2 × 2 × S² × width per layer); head: 2 per weight per
    draw, ``batch_mul`` draws per target. Embedding tables are not matmuls and are left out.
    """
    decoder = system.decoder
    dec_weights = sum(p.numel() for n, p in decoder.named_parameters() if p.dim() == 2 and "pos" not in n)
    head_weights = sum(p.numel() for p in system.head.parameters() if p.dim() == 2)
    seq = prefix_len + 1 + num_tokens
    forward = batch_size * (
        2 * dec_weights * seq + 4 * decoder.depth * seq * seq * decoder.width
        + 2 * head_weights * (num_tokens + 1) * system.head.batch_mul
    )
    return 3.0 * forward


class StepTimer(L.Callback):
    """Wall time of training steps after ``warmup`` steps (synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.steps = 0
        self.elapsed = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is not None:
            self._sync(pl_module)
            self.elapsed = time.perf_counter() - self.start
            self.steps = trainer.global_step - self.warmup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, default=128, help="clips per step (default 128)")
    parser.add_argument("--clips", type=int, default=512, help="training clips to generate (default 512)")
    parser.add_argument("--root", default=None, help="where the rehearsal tree and runs go (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args, overrides = parser.parse_known_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU (none is visible); --smoke runs it on the CPU with tiny shapes",
              file=sys.stderr)
        return 2

    from experiments import pipeline
    from experiments.config import load_config
    from experiments.rehearsal import rehearsal_overrides, write_rehearsal

    root = Path(args.root or tempfile.mkdtemp(prefix="gpu_check_"))
    seconds = 2.0 if args.smoke else 10.24
    clips = {"train": 16 if args.smoke else args.clips, "val": 4 if args.smoke else 16, "test": 4}
    start = time.perf_counter()
    # on the GPU the VAE, HiFi-GAN and text encoders have the public checkpoints' sizes (random
    # weights), so the generation real-time factor is the recipe's; the smoke run keeps them tiny
    paths = write_rehearsal(root, clips, seconds=seconds, pretrained_size="tiny" if args.smoke else "full")
    print(f"[gpu-check] rehearsal tree in {root} ({time.perf_counter() - start:.0f} s)", flush=True)
    steps = 4 if args.smoke else args.steps
    batch = 4 if args.smoke else args.batch
    shapes = [] if not args.smoke else [
        "model.width=32", "model.depth=2", "model.heads=2", "model.head.width=32", "model.head.depth=1",
        "model.max_tokens=50", "data.clip_seconds=2.0", "trainer.accelerator=cpu", "trainer.precision=32-true",
    ]
    cfg = load_config("masked_base", [
        *rehearsal_overrides(root, paths), *shapes,
        f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", "trainer.devices=1",
        f"trainer.val_every_steps={steps}", f"trainer.ckpt_every_steps={steps}", "trainer.log_every_steps=50",
        "trainer.num_workers=4" if not args.smoke else "trainer.num_workers=0", "data.num_workers=0",
        f"optim.warmup_steps={max(1, steps // 10)}", "sample.num_captions=0", "trainer.limit_val_batches=1",
        *overrides,
    ])
    warmup = 1 if args.smoke else min(20, steps // 4)
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = pipeline.train_audio_lm(cfg, extra_callbacks=[timer])

    # Generation: one clip of sample.seconds (10.24 s) with the KV cache, decoded to audio.
    system = pipeline.load_audio_lm(run_dir / "checkpoints" / "last.ckpt")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    system = system.to(device).eval()
    pretransform = pipeline.load_pretransform_for(system.cfg).to(device)
    gen_seconds = 1.0 if args.smoke else float(cfg.sample.seconds)
    render = pipeline.render_fn(system.cfg, pretransform, gen_seconds, generator_seed=0)
    render(system, ["a dog barks"])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    wave = render(system, ["a dog barks while birds chirp"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gen_s = time.perf_counter() - start

    tokens = int(cfg.model.max_tokens)
    step_s = timer.elapsed / max(1, timer.steps)
    flops = step_flops(system, batch, system.text.max_len, tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak(name)
    report = {
        "device": name, "torch": torch.__version__, "steps_timed": timer.steps, "batch": batch, "tokens": tokens,
        "parameters": system.parameter_summary(), "step_s": step_s,
        "audio_tokens_per_s": batch * tokens / step_s if step_s else None,
        "achieved_tflops": flops / step_s / 1e12 if step_s else None,
        "bf16_peak_tflops": peak,
        "mfu": (flops / step_s / 1e12 / peak) if (step_s and peak) else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "generation": {"seconds": gen_seconds, "wall_s": gen_s, "real_time_factor": gen_s / gen_seconds,
                       "samples": int(wave.shape[-1]), "finite": bool(torch.isfinite(wave).all())},
        "run_dir": str(run_dir),
    }
    text = json.dumps(report, indent=2)
    (root / "gpu_check.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    print(f"[gpu-check] {name}: step {step_s:.3f} s over {timer.steps} steps (batch {batch} × {tokens} tokens)")
    if step_s:
        print(f"[gpu-check] {report['audio_tokens_per_s']:.0f} audio tokens/s, {report['achieved_tflops']:.1f} TFLOP/s"
              + (f" = {100 * report['mfu']:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""))
    if report["peak_memory_gib"] is not None:
        print(f"[gpu-check] peak memory {report['peak_memory_gib']:.1f} GiB")
    print(f"[gpu-check] generation: {gen_seconds:g} s of audio in {gen_s:.2f} s (real-time factor {gen_s / gen_seconds:.3f})")
    print(f"[gpu-check] report: {root / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
