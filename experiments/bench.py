"""Throughput benchmarks, reported as ratios measured in one run: ``make bench``.

    python -m experiments.bench [EXP] [key=value ...] [--repeats N]
    make bench EXP=ntp_base ARGS="--no-train --random-pretrained runs/bench/pretrained"   # paper shapes, no downloads

Uses the experiment's model sizes (default ``demo``) with random weights and random
tokens, so it needs no trained run; an experiment with ``vae.pretrained_dir`` loads its
VAE, vocoder and text encoders from their folders (``--random-pretrained`` writes random
ones of the public checkpoints' sizes). Measures:

1. generation with the preallocated KV cache vs recomputing the full sequence per token;
2. ``diffusion_batch_mul``: one decoder pass + the head on 4 noise draws vs 4 full steps;
3. reading cached latents vs reading audio and encoding it with the VAE per batch;
4. bf16 autocast vs fp32 for the training step on this device;
5. one autocast region around the sampling loop vs entering autocast per step;
6. ``model.activation_checkpointing``: training step time and the activation bytes kept
   for backward, with vs without;
7. ``trainer.compile``: training step time with the decoder and the diffusion MLP compiled
   (``nn.Module.compile``) vs eager, and the one-off compile time (``--no-compile`` skips it);
8. generation speed for a ``--gen-seconds`` clip (10.24) at ``--gen-batches`` (1 16), CFG
   batched, the experiment's ``sample.sampler`` / ``sample.steps``: real-time factor (wall
   seconds per second of audio of one clip, < 1 is faster than real time), where the time
   goes (decoder with the KV cache, the head's reverse chain, VAE decode, vocoder — each
   timed alone on the same shapes) and the time to first audio when streaming
   (``--no-generation`` skips it).

Writes ``<run.root>/bench/<timestamp>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAPTIONS = ["a high pitched beep pulsing", "low hum fading away", "white noise hiss", "a rising sweep"] * 8


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so a wall-clock interval covers the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up; on CUDA each run
    is bracketed by synchronisations (kernels are asynchronous: without them only the launch
    is timed)."""
    device = device if device is not None else DEVICE
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_training(cfg, system, pretransform, args, captions: list[str]) -> dict[str, dict]:
    """Benchmarks 1–7 (the module docstring) on a batch of the experiment's shape."""
    device = system.device
    results: dict[str, dict] = {}
    r = args.repeats
    B, N, D = cfg.trainer.batch_size, cfg.model.max_tokens, cfg.model.token_dim
    batch = {
        "tokens": torch.randn(B, N, D, device=device),
        "token_mask": torch.ones(B, N, dtype=torch.bool, device=device),
        "lengths": [N] * B,
        "captions": (captions * (B // len(captions) + 1))[:B],
    }
    zeros = torch.zeros(B, device="cpu")  # mask ratios are host quantities

    # 1. KV cache vs full recomputation (same decoder, head replaced by a cheap projection).
    system.eval()
    num_gen = min(N, 64)
    prompts = captions[:4]
    # the next token is a fixed projection of z, standing in for the (separately measured) head
    to_token = torch.randn(cfg.model.width, D, device=device) / cfg.model.width**0.5
    with torch.no_grad():
        prefix, prefix_mask = system.encode_text(prompts)

        def cached() -> None:
            cache = system.decoder.make_cache(4, prefix.shape[1] + 1 + num_gen, device, prefix.dtype)
            z = system.decoder.prefill(prefix, prefix_mask, cache)
            for i in range(num_gen - 1):
                z = system.decoder.step(z @ to_token, position_id=i, target_id=i + 1, cache=cache)

        def recompute() -> None:
            tokens = torch.zeros(4, 0, D, device=device)
            for _ in range(num_gen):
                z = system.decoder(prefix, prefix_mask, tokens)
                tokens = torch.cat([tokens, z[:, -1:] @ to_token], dim=1)

        t_cache, t_full = timed(cached, r), timed(recompute, r)
    results["kv_cache"] = {"tokens": num_gen, "cached_s": t_cache, "recompute_s": t_full, "speedup": t_full / t_cache}

    # 2. diffusion_batch_mul: one decoder pass, head x4 vs four full steps with batch_mul 1.
    system.train()
    gen = lambda: torch.Generator(device=device).manual_seed(0)

    def step_mul() -> None:
        system.diffusion_loss(batch, zeros, gen(), 0.0)["loss"].backward()

    def step_repeat() -> None:
        mul = system.head.batch_mul
        system.head.batch_mul = 1
        try:
            for _ in range(mul):
                system.diffusion_loss(batch, zeros, gen(), 0.0)["loss"].backward()
        finally:
            system.head.batch_mul = mul

    t_mul, t_rep = timed(step_mul, r), timed(step_repeat, r)
    results["diffusion_batch_mul"] = {
        "batch_mul": system.head.batch_mul, "one_pass_s": t_mul, "repeated_s": t_rep, "speedup": t_rep / t_mul,
    }
    system.zero_grad(set_to_none=True)

    # 3. Cached latents vs encoding audio on the fly (random VAE of the experiment's size).
    seconds = N / pretransform.tokens_per_second
    wave = torch.randn(B, int(seconds * pretransform.sample_rate), device=device) * 0.1
    mean = torch.randn(B, N, D, device=device)
    std = torch.rand(B, N, D, device=device) * 0.1
    with torch.no_grad():
        t_encode = timed(lambda: pretransform.encode(wave, sample=True), r)
    t_cached = timed(lambda: mean + std * torch.randn_like(std), r)
    results["latent_cache"] = {
        "clips": B, "seconds_per_clip": seconds, "encode_s": t_encode, "cached_sample_s": t_cached,
        "train_step_s": t_mul, "step_speedup_from_cache": (t_mul + t_encode) / (t_mul + t_cached),
    }

    # 4. bf16 autocast vs fp32 training step.
    def step_bf16() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = system.diffusion_loss(batch, zeros, gen(), 0.0)["loss"]
        loss.backward()

    t_bf16 = timed(step_bf16, max(1, r // 2))
    results["bf16_autocast"] = {"fp32_step_s": t_mul, "bf16_step_s": t_bf16, "speedup": t_mul / t_bf16}
    system.zero_grad(set_to_none=True)

    # 5. One autocast region around sampling vs one per step.
    system.eval()
    z = torch.randn(8, cfg.model.width, device=device)
    steps = 20
    with torch.no_grad():

        def one_region() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                for _ in range(steps):
                    system.head.sample(z, z, cfg_scale=3.0, num_steps=2)

        def per_step() -> None:
            for _ in range(steps):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    system.head.sample(z, z, cfg_scale=3.0, num_steps=2)

        t_one, t_per = timed(one_region, r), timed(per_step, r)
    results["autocast_region"] = {"one_region_s": t_one, "per_step_s": t_per, "ratio_per_step_over_one": t_per / t_one}

    # 6. Activation checkpointing: step time, and bytes saved for backward (device-independent).
    system.train()

    def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        system.zero_grad(set_to_none=True)
        return total

    loss_fn = lambda: system.diffusion_loss(batch, zeros, gen(), 0.0)["loss"]
    plain_bytes = saved_bytes(loss_fn)
    t_plain = timed(step_mul, r)  # re-timed beside the variant: the ratio is of neighbours
    system.decoder.activation_checkpointing = True
    try:
        ckpt_bytes = saved_bytes(loss_fn)
        t_ckpt = timed(step_mul, r)
    finally:
        system.decoder.activation_checkpointing = False
    system.zero_grad(set_to_none=True)
    results["activation_checkpointing"] = {
        "plain_step_s": t_plain, "checkpointed_step_s": t_ckpt, "slowdown": t_ckpt / t_plain,
        "plain_saved_mb": plain_bytes / 2**20, "checkpointed_saved_mb": ckpt_bytes / 2**20,
        "memory_ratio": plain_bytes / max(1, ckpt_bytes),
    }

    # 7. torch.compile of the decoder and the diffusion MLP (in place: same parameters).
    if not args.no_compile:
        t_eager = timed(step_mul, r)
        start = time.perf_counter()
        system.decoder.compile(dynamic=True)
        system.head.net.compile(dynamic=True)
        step_mul()  # the first step compiles
        synchronize(device)
        t_compile_first = time.perf_counter() - start
        t_compiled = timed(step_mul, r)
        system.zero_grad(set_to_none=True)
        results["compile"] = {"eager_step_s": t_eager, "compiled_step_s": t_compiled, "speedup": t_eager / t_compiled,
                              "first_step_with_compile_s": t_compile_first}

    return results


def print_training_rows(results: dict[str, dict]) -> None:
    """The table rows of :func:`bench_training`'s results."""
    kv, mul, lc = results["kv_cache"], results["diffusion_batch_mul"], results["latent_cache"]
    bf, reg, ac = results["bf16_autocast"], results["autocast_region"], results["activation_checkpointing"]
    print(f"| KV cache, {kv['tokens']} tokens | {kv['cached_s']:.3f} s cached vs {kv['recompute_s']:.3f} s recomputed | {kv['speedup']:.1f}× faster |")
    print(f"| diffusion_batch_mul={mul['batch_mul']} | {mul['one_pass_s']:.3f} s one pass vs {mul['repeated_s']:.3f} s repeated | {mul['speedup']:.1f}× faster |")
    print(f"| latent cache | encode {lc['encode_s']:.3f} s/batch vs cached {lc['cached_sample_s']:.4f} s | train step {lc['step_speedup_from_cache']:.2f}× faster |")
    print(f"| bf16 autocast | {bf['bf16_step_s']:.3f} s vs fp32 {bf['fp32_step_s']:.3f} s | {bf['speedup']:.2f}× |")
    print(f"| autocast around sampling | one region {reg['one_region_s']:.3f} s vs per step {reg['per_step_s']:.3f} s | {reg['ratio_per_step_over_one']:.2f}× |")
    print(f"| activation checkpointing | step {ac['checkpointed_step_s']:.3f} s vs {ac['plain_step_s']:.3f} s; kept for backward {ac['checkpointed_saved_mb']:.1f} MB "
          f"vs {ac['plain_saved_mb']:.1f} MB | {ac['slowdown']:.2f}× slower, {ac['memory_ratio']:.1f}× less activation memory |")
    if "compile" in results:
        c = results["compile"]
        print(f"| torch.compile | step {c['compiled_step_s']:.3f} s vs eager {c['eager_step_s']:.3f} s (first step {c['first_step_with_compile_s']:.0f} s) "
              f"| {c['speedup']:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile benchmark (it compiles for minutes)")
    parser.add_argument("--no-generation", action="store_true", help="skip the generation-speed benchmark")
    parser.add_argument("--gen-seconds", type=float, default=10.24, help="clip length for the generation benchmark")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 16], help="batch sizes for the generation benchmark")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmarks 1–7 (generation only)")
    parser.add_argument("--random-pretrained", metavar="DIR", default=None,
                        help="write random AudioLDM VAE + HiFi-GAN, FLAN-T5-large and CLAP of the public checkpoints' "
                             "sizes into DIR (kept; reused when there) and point the experiment at them: the paper "
                             "configs' shapes without downloaded weights")
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value overrides may come anywhere, also after a list option (--gen-batches 1 16 sample.steps=25)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args, rest = parser.parse_known_args([a for a in argv if a not in overrides])
    rest = [*rest, *overrides]
    from omegaconf import OmegaConf

    from datamodules.atomic import write_text_atomic
    from experiments.config import config_from_argv

    pretrained_note = "random weights of the experiment's sizes"
    if args.random_pretrained:
        from experiments.rehearsal import write_pretrained

        directory = Path(args.random_pretrained)
        done = directory / "complete"
        if not done.is_file():
            print(f"[bench] writing full-size random pretrained folders into {directory}", flush=True)
            paths = write_pretrained(directory, CAPTIONS, size="full")
            write_text_atomic(done, json.dumps(paths))
        paths = json.loads(done.read_text())
        rest = [*rest, *(f"{key}={value}" for key, value in paths.items())]
        pretrained_note = f"random AudioLDM / FLAN-T5-large / CLAP of the real sizes from {directory}"
    cfg = config_from_argv(rest)
    name = cfg.experiment
    from experiments.pipeline import load_or_train_pretransform, mel_kwargs, set_threads, vae_kwargs, vocoder_kwargs
    from lightning_modules.parts.pretransform import MelVAEPretransform
    from lightning_modules.audio_lm import AudioLMSystem
    from lightning_modules.parts.text_conditioning import train_sentencepiece

    set_threads(cfg)
    torch.manual_seed(0)
    device = DEVICE
    out_root = Path(cfg.run.root) / "bench"
    out_root.mkdir(parents=True, exist_ok=True)
    captions = CAPTIONS
    sp = None
    if cfg.text.kind == "scratch":
        sp = str(train_sentencepiece(captions, str(out_root / "bench_spm"), 60))
    system = AudioLMSystem(OmegaConf.to_container(cfg, resolve=True), sp_model_path=sp).to(device)
    if cfg.vae.pretrained_dir:  # the loading path of training and generation
        pretransform = load_or_train_pretransform(cfg)
    else:  # a random VAE of the experiment's size
        pretransform = MelVAEPretransform.from_scratch(mel_kwargs(cfg), vae_kwargs(cfg), vocoder_kwargs(cfg))
    pretransform = pretransform.to(device).eval()
    results: dict[str, dict] = {}
    if not args.no_train:
        results.update(bench_training(cfg, system, pretransform, args, captions))
    # 8. Generation speed and its breakdown (random weights: the time does not depend on them).
    if not args.no_generation:
        results["generation"] = bench_generation(cfg, system, pretransform, captions, args.gen_seconds, args.gen_batches)

    B, N = cfg.trainer.batch_size, cfg.model.max_tokens
    header = {"experiment": name, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch": B, "tokens": N, "parameters": system.parameter_summary(), "pretrained": pretrained_note}
    print(f"[bench] {name} on {device} ({torch.get_num_threads()} threads), batch {B} × {N} tokens; {pretrained_note}")
    print("| benchmark | measurement | ratio |\n|---|---|---|")
    if not args.no_train:
        print_training_rows(results)
    for row in results.get("generation", []):
        print(f"| generation, {row['seconds']:g} s, batch {row['batch']}, {row['sampler']}-{row['steps']}, CFG {row['cfg_scale']:g} "
              f"| {row['wall_s']:.2f} s: decoder {row['decoder_s']:.2f} s, head {row['head_s']:.2f} s, VAE {row['vae_s']:.2f} s, "
              f"vocoder {row['vocoder_s']:.2f} s; first streamed audio {row['first_audio_s']:.2f} s "
              f"| RTF {row['rtf']:.3f} ({row['rtf_per_clip']:.4f} per clip) |")
    out = out_root / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    write_text_atomic(out, json.dumps({**header, "results": results}, indent=2))
    print(f"[bench] {out}")
    return 0


def once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one run of ``fn`` (synchronised on CUDA); for runs too long to repeat."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_generation(cfg, system, pretransform, captions: list[str], seconds: float, batches: list[int]) -> list[dict]:
    """Real-time factor of ``seconds`` of audio per batch size and where the time goes.

    ``wall_s`` is the one-shot path of ``make generate`` (tokens with CFG batched, VAE
    decode, vocoder); ``decoder_s`` is the same token loop (window shifts included beyond
    ``model.max_tokens``) with the head replaced by a fixed projection, ``head_s`` the head's reverse chain alone for every token, ``vae_s``
    and ``vocoder_s`` the decode of those tokens; ``first_audio_s`` the streaming path's
    time to its first chunk (``sample.stream_*``).
    """
    from experiments.pipeline import num_tokens_for, stream_fn

    device = system.device
    system.eval()
    pretransform.to(device)
    sample = cfg.sample
    num_tokens = num_tokens_for(seconds, pretransform)
    steps, sampler, scale = int(sample.steps), str(sample.sampler), float(sample.cfg_scale)
    width, D = cfg.model.width, system.token_dim
    to_token = torch.randn(width, D, device=device) / width**0.5
    rows = []
    with torch.no_grad():
        for B in batches:
            prompts = (captions * (B // len(captions) + 1))[:B]
            generator = torch.Generator(device=device).manual_seed(0)
            system.generate_tokens(prompts, 2, num_steps=steps, sampler=sampler, generator=generator)  # warm-up
            tokens: dict[str, torch.Tensor] = {}

            def generate() -> None:
                tokens["x"] = system.generate_tokens(prompts, num_tokens, cfg_scale=scale, num_steps=steps,
                                                     sampler=sampler, generator=generator)
                mel = pretransform.decode_mel(system.denormalize(tokens["x"]), normalized=False)
                pretransform.vocoder(mel)

            wall = once(generate, device)
            latents = system.denormalize(tokens["x"])

            def decoder_only() -> None:  # the same loop (CFG rows, window shifts) with a fixed projection as head
                real_sample = system.head.sample
                system.head.sample = lambda z_cond, z_uncond=None, **_: z_cond @ to_token
                try:
                    system.generate_tokens(prompts, num_tokens, cfg_scale=scale, num_steps=steps, sampler=sampler)
                finally:
                    system.head.sample = real_sample

            z = torch.randn(B, width, device=device)

            def head_only() -> None:
                for _ in range(num_tokens):
                    system.head.sample(z, z, cfg_scale=scale, num_steps=steps, sampler=sampler, generator=generator)

            mel = pretransform.decode_mel(latents, normalized=False)
            t_decoder, t_head = once(decoder_only, device), once(head_only, device)
            t_vae = once(lambda: pretransform.decode_mel(latents, normalized=False), device)
            t_vocoder = once(lambda: pretransform.vocoder(mel), device)
            stream = stream_fn(cfg, pretransform, seconds, 0)(system, prompts)
            t_first = once(lambda: next(stream), device)
            stream.close()
            rows.append({
                "seconds": seconds, "tokens": num_tokens, "batch": B, "sampler": sampler, "steps": steps, "cfg_scale": scale,
                "wall_s": wall, "decoder_s": t_decoder, "head_s": t_head, "vae_s": t_vae, "vocoder_s": t_vocoder,
                "first_audio_s": t_first, "rtf": wall / seconds, "rtf_per_clip": wall / seconds / B,
            })
    return rows


if __name__ == "__main__":
    sys.exit(main())
