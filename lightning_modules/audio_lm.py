"""The audio language model system: AudioNTP and AudioMNTP in one LightningModule.

It owns three plain ``nn.Module`` parts and wires them together:

- ``text``: a :class:`TextConditioner` turning captions into a prefix (B, L, D);
- ``decoder``: the :class:`CausalDecoder` over ``[prefix][BOS][tokens]`` with a KV cache;
- ``head``: the per-token :class:`DiffusionHead` modelling p(x_t | z).

Training reads batches of *normalised* VAE-latent tokens (from the latent cache):
``tokens`` (B, N, token_dim), ``token_mask`` (B, N) bool, ``captions`` list[str].
Masked next-token prediction (MNTP) is the same step with a mask ratio r > 0 drawn per
sample (``mntp.*`` keys); r = 0 is plain next-token prediction (NTP), through the same code.

The system never reads audio, never calls the VAE and never calls ``.cuda()``; decoding
tokens to audio is the pretransform's job (see ``experiments/generate.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.parts.decoder import CausalDecoder, count_parameters, decay_parameter_groups
from lightning_modules.parts.diffusion_head import DiffusionHead
from lightning_modules.parts.masking import MaskRatioSampler, make_mntp_inputs
from lightning_modules.parts.text_conditioning import apply_text_dropout, build_text_conditioner

NUM_TIMESTEP_BUCKETS = 10  # loss is also logged per tenth of the diffusion timestep range


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many consecutive optimizer steps with NaN/Inf gradients."""


def step_seeds(seed: int, step: int, shard: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for one micro-batch: (host, device).

    ``shard`` names the micro-batch within the optimizer step across all processes
    (``global_rank * accumulate_grad_batches + micro-batch index``), so every micro-batch of
    a step draws different noise, and a run on W processes draws exactly what one process
    accumulating W micro-batches draws. Hashed with numpy's SeedSequence (no collisions
    between nearby (step, shard) pairs, unlike a linear mix).
    """
    state = np.random.SeedSequence([int(seed), int(step), int(shard)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


def gather_rows(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The first ``counts[b]`` slots of each row: x (B, S, ...) -> (sum(counts), ...).

    ``counts`` (B,) is a host tensor, so the index is built on the CPU and copied without
    a synchronisation — boolean indexing would read a mask back from the device.
    """
    b, slots = x.shape[:2]
    counts = counts.to("cpu", torch.long)
    starts = torch.repeat_interleave(torch.arange(b, device="cpu") * slots, counts)  # (K,)
    within = torch.arange(int(counts.sum()), device="cpu") - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rows = (starts + within).to(x.device, non_blocking=True)
    return x.flatten(0, 1).index_select(0, rows)
CFG_SCHEDULES = ("constant", "unguided_first", "linear")


def guidance_scales(cfg_scale: float, schedule: str, num_tokens: int) -> list[float]:
    """The classifier-free guidance scale of each of ``num_tokens`` generated tokens.

    "constant": ``cfg_scale`` everywhere. "unguided_first": the first token conditional
    only (scale 1), the rest ``cfg_scale``. "linear" (MAR's schedule): token i is guided with
    1 + (cfg_scale - 1) i / num_tokens. The first token has no audio history, so its
    conditional and unconditional predictions differ most and guidance pushes it furthest
    off the data (on the demo: a burst twice as loud as the rest in 73% of samples at cfg 5).
    """
    if schedule == "constant":
        return [cfg_scale] * num_tokens
    if schedule == "unguided_first":
        return [1.0] + [cfg_scale] * (num_tokens - 1) if num_tokens > 0 else []
    if schedule == "linear":
        return [1.0 + (cfg_scale - 1.0) * i / num_tokens for i in range(num_tokens)]
    raise ValueError(f"sample.cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def check_window_end_tokens(max_tokens: int, window_end_tokens: int) -> None:
    """Refuse a ``sample.window_end_tokens`` that leaves a window under two positions."""
    if not 0 <= window_end_tokens <= max_tokens - 2:
        raise ValueError(f"sample.window_end_tokens must be in [0, model.max_tokens - 2 = {max_tokens - 2}], got {window_end_tokens}")


def window_limit(max_tokens: int, total_tokens: int, window_end_tokens: int) -> int:
    """The positions a generation of ``total_tokens`` (prompt + new) may use: the whole
    context when it fits, else (long-form) the context less its last ``window_end_tokens``
    positions. In training those hold the clip's end: the VAE's clip-edge token (it sees the
    clip's border: on the demo the last token's norm is 11.1 against 7.3 elsewhere) and, on
    AudioCaps, the zero padding of a 10 s clip to the 10.24 s context. A window that shifts
    before reaching them never writes a clip end into the middle of the sequence (the seam).
    """
    check_window_end_tokens(max_tokens, window_end_tokens)
    return max_tokens if total_tokens <= max_tokens else max_tokens - window_end_tokens


def window_keep(window: int, window_overlap: float) -> int:
    """Tokens the long-form sliding window keeps at each shift: ``window_overlap`` of the
    window (:func:`window_limit`), at least one and at most ``window - 1``."""
    return max(1, min(window - 1, int(round(window_overlap * window))))


def window_shifts(num_tokens: int, max_tokens: int, window_overlap: float, num_prompt: int = 0,
                  window_end_tokens: int = 0) -> list[int]:
    """Indices among ``num_tokens`` generated tokens of those sampled right after the window
    shifted (the KV cache refilled with the newest :func:`window_keep` tokens): where a
    seam could be heard (0: a prompt that fills the window alone). Empty when prompt + tokens
    fit the context. Mirrors the loop of
    :meth:`AudioLMSystem.iter_tokens`: the first shift comes when the window
    (:func:`window_limit`) is full, then one every ``window - keep`` tokens."""
    window = window_limit(max_tokens, num_prompt + num_tokens, window_end_tokens)
    keep, position, shifts = window_keep(window, window_overlap), num_prompt, []
    if num_prompt >= window:  # the loop starts from the prompt's newest `keep` tokens
        shifts, position = [0], keep
    for i in range(1, num_tokens):
        if position + 1 < window:
            position += 1
        else:
            shifts.append(i)
            position = keep
    return shifts


def cosine_progress(step: int, warmup: int, total: int, anchor: tuple[int, float] | None = None) -> float:
    """Progress in [0, 1] through the cosine part of the LR schedule at optimizer ``step``.

    Without ``anchor``: ``(step - warmup) / (total - warmup)``. With ``anchor = (s, p_s)``
    (``total`` was changed at step ``s``, where the progress was ``p_s``): from ``s`` on, the
    rest of the schedule is spread over the steps left, ``p_s + (1 - p_s)(step - s)/(total - s)``,
    so the learning rate stays continuous and still anneals fully at ``total``.
    """
    if anchor is not None and step >= anchor[0]:
        start, done = anchor
        return min(1.0, done + (1.0 - done) * (step - start) / max(1, total - start))
    return min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))


def build_decoder(cfg: DictConfig, max_prefix_len: int) -> CausalDecoder:
    """The causal decoder an experiment config describes (``model.*``, ``mntp.target_embedding``)."""
    model = cfg.model
    return CausalDecoder(
        token_dim=model.token_dim,
        width=model.width,
        depth=model.depth,
        heads=model.heads,
        mlp_ratio=model.mlp_ratio,
        max_prefix_len=max_prefix_len,
        max_tokens=model.max_tokens,
        dropout=model.dropout,
        target_embedding=cfg.mntp.target_embedding,
        rope=model.rope,
        mid_start_bos=bool(model.get("mid_start_bos", False)),  # absent from older checkpoints
    )


def build_head(cfg: DictConfig) -> DiffusionHead:
    """The diffusion head an experiment config describes (``model.head.*``, ``sample.*``)."""
    model = cfg.model
    return DiffusionHead(
        token_dim=model.token_dim,
        cond_dim=model.width,
        width=model.head.width,
        depth=model.head.depth,
        num_train_steps=model.head.num_train_steps,
        schedule=model.head.schedule,
        batch_mul=model.head.batch_mul,
        sampler=cfg.sample.sampler,
        num_sample_steps=cfg.sample.steps,
        clip_x0=model.head.clip_x0,
        min_snr_gamma=model.head.get("min_snr_gamma"),  # absent from checkpoints made before the option
        prediction=model.head.get("prediction", "eps"),  # likewise
    )


class AudioLMSystem(L.LightningModule):
    """Text prefix → causal decoder → diffusion head, trained with NTP or MNTP.

    Args:
        config: the whole resolved experiment config as a plain dict (stored in every
            checkpoint via ``save_hyperparameters``); the keys used are ``text``, ``model``,
            ``mntp``, ``optim`` and ``sample``.
        sp_model_path: sentencepiece model for the from-scratch text encoder (only needed
            when the system is first built; checkpoints carry the tokenizer themselves).
        text_vocab_size: its vocabulary size (restores the text encoder when the
            sentencepiece file is gone: the checkpoint holds the tokenizer).
        pretransform_fingerprint: identity of the VAE whose latents the model is trained on;
            generation refuses to decode with another one.
    """

    def __init__(
        self,
        config: dict[str, Any],
        sp_model_path: str | None = None,
        text_vocab_size: int | None = None,
        pretransform_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = OmegaConf.create(config)
        self.cfg: DictConfig = cfg
        model = cfg.model
        self.token_dim = int(model.token_dim)
        self.text = build_text_conditioner(
            cfg.text, out_dim=model.width, sp_model_path=sp_model_path, vocab_size=text_vocab_size
        )
        if hasattr(self.text, "vocab_size"):  # lets a checkpoint rebuild the encoder without the .model file
            self.hparams["text_vocab_size"] = self.text.vocab_size
        self.decoder = build_decoder(cfg, max_prefix_len=self.text.max_len)
        self.decoder.activation_checkpointing = bool(cfg.model.get("activation_checkpointing", False))  # absent from older checkpoints
        self.head = build_head(cfg)
        # Learned "no text" prefix for classifier-free guidance: (L, D).
        self.null_prefix = nn.Parameter(torch.randn(self.text.max_len, model.width) * 0.02)
        self.ratio_sampler = MaskRatioSampler(**OmegaConf.to_container(cfg.mntp.ratio, resolve=True))
        # Statistics of the un-normalised latent tokens (from the training split of the cache),
        # kept with the model so generated tokens can be mapped back for the VAE decoder.
        self.register_buffer("latent_mean", torch.zeros(self.token_dim))
        self.register_buffer("latent_std", torch.ones(self.token_dim))
        # (step, progress) where a time budget changed trainer.max_steps after the warmup
        # (callbacks.TimeBudget sets it and keeps it in its checkpoint state); see cosine_progress
        self.schedule_anchor: tuple[int, float] | None = None

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the (token_dim,) mean and std the training tokens were normalised with."""
        if mean.shape != (self.token_dim,) or std.shape != (self.token_dim,):
            raise ValueError(f"latent stats must have shape ({self.token_dim},), got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N, token_dim) → VAE latent tokens."""
        return tokens * self.latent_std + self.latent_mean

    # ------------------------------------------------------------------ text prefix

    def encode_text(self, captions: list[str], drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → prefix (B, L, D) and mask (B, L); rows where ``drop`` (B,) is True get the null prefix."""
        tokenized = {  # tensors to the device; host-side entries (precomputed-text rows) stay
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in self.text.tokenize(captions).items()
        }
        prefix, mask = self.text(tokenized)
        if drop is not None:  # applied unconditionally: testing drop.any() would synchronise
            prefix, mask = apply_text_dropout(prefix, mask, self.null_prefix, drop.to(self.device))
        return prefix, mask

    def null_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional prefix repeated: (B, L, D) and an all-valid mask (B, L)."""
        prefix = self.null_prefix.unsqueeze(0).expand(batch_size, -1, -1)
        mask = torch.ones(batch_size, self.text.max_len, dtype=torch.bool, device=self.device)
        return prefix, mask

    # ------------------------------------------------------------------ training

    def step_generators(self, device: torch.device, batch_idx: int = 0) -> tuple[torch.Generator, torch.Generator]:
        """(host, device) generators of one training micro-batch, seeded by (seed, step, shard).

        The host generator draws only the per-sample mask ratios, which decide shapes and so
        belong on the host; everything else (dropped positions, text dropout, input noise,
        diffusion t and ε) is drawn on ``device``, where the tokens are.
        """
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        shard = self.global_rank * accumulate + batch_idx % accumulate
        host_seed, device_seed = step_seeds(int(self.cfg.seed), int(self.global_step), shard)
        return (
            torch.Generator(device="cpu").manual_seed(host_seed),
            torch.Generator(device=device).manual_seed(device_seed),
        )

    def diffusion_loss(
        self,
        batch: dict[str, Any],
        ratios: torch.Tensor,
        generator: torch.Generator,
        p_uncond: float,
        input_noise: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """The (M)NTP loss of a batch, without host–device synchronisation.

        Args:
            batch: ``tokens`` (B, N, token_dim), ``token_mask`` (B, N) bool, ``captions``
                list[str], optionally ``lengths`` (B,) host counts of valid tokens (the
                latent collate adds them; without them one sync counts the mask).
            ratios: (B,) host tensor, mask ratio per sample (zeros: plain NTP).
            generator: on the tokens' device, for token dropping, text dropout and the
                diffusion noise (t, ε): a step is a function of (seed, step, shard, batch).
            p_uncond: probability of replacing a sample's caption with the null prefix.
            input_noise: largest std of the Gaussian noise added to the decoder's *input*
                tokens (normalised units); each sample draws its std uniformly from
                [0, input_noise]. Targets stay clean, so the decoder learns to predict the
                next token from an imperfect context — the context it sees when it
                generates from its own samples. 0: no noise.

        Returns:
            dict with ``loss`` (scalar), ``per_sample`` (K,) losses of every (target, t, ε)
            draw, ``weight`` (K,) 1 for real targets and 0 for the few padding rows (at most
            one per sample) that are computed to keep shapes host-known, ``t`` (K,) their
            timesteps, ``target_ids`` (K,) the index of the token each draw predicts
            (0: the first audio token, predicted from the text alone) and ``next_token``
            (K,) bool, True where that token directly follows the slot's own input token
            (plain next-token prediction) and False for an MNTP skipped target.
        """
        tokens, token_mask = batch["tokens"], batch["token_mask"]
        batch_size = tokens.shape[0]
        device = tokens.device
        drop = torch.rand(batch_size, generator=generator, device=device) < p_uncond
        prefix, prefix_mask = self.encode_text(batch["captions"], drop)
        inputs = make_mntp_inputs(
            tokens,
            token_mask,
            ratios,
            mode=self.cfg.mntp.mode,
            predict_skipped=self.cfg.mntp.predict_skipped,
            generator=generator,
            lengths=batch.get("lengths"),
        )
        if input_noise > 0:
            sigma = torch.rand(batch_size, 1, 1, generator=generator, device=device) * input_noise  # (B, 1, 1)
            noise = torch.randn(inputs.tokens.shape, generator=generator, device=device) * sigma
            noise = noise.to(inputs.tokens.dtype) * inputs.token_mask.unsqueeze(-1)
            inputs = dataclasses.replace(inputs, tokens=inputs.tokens + noise)
        mid_start = batch.get("mid_start") if self.decoder.mid_bos is not None else None  # (B,) windows begun mid-clip
        z = self.decoder(
            prefix, prefix_mask, inputs.tokens, inputs.position_ids, inputs.target_ids, inputs.token_mask, mid_start=mid_start,
        )  # (B, M+1, W)
        counts = inputs.slot_counts  # host: rows 0..counts[b]-1 of sample b may hold a target
        weight = gather_rows(inputs.target_mask, counts).float()  # (K,)
        out = self.head.loss(
            gather_rows(inputs.target_tokens, counts).float(), gather_rows(z, counts), weight=weight, generator=generator
        )
        out["weight"] = weight.repeat(self.head.batch_mul)  # draw r of row i at r * K + i
        out["target_ids"] = gather_rows(inputs.target_ids, counts).repeat(self.head.batch_mul)
        # Slot 0 (BOS) sits before token 0; slot j + 1 at input token j's original index.
        slot_positions = torch.cat([torch.full_like(inputs.position_ids[:, :1], -1), inputs.position_ids], dim=1)
        next_token = inputs.target_ids == slot_positions + 1  # (B, M+1)
        out["next_token"] = gather_rows(next_token, counts).repeat(self.head.batch_mul)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        host_generator, generator = self.step_generators(batch["tokens"].device, batch_idx)
        ratios = self.ratio_sampler.sample(batch["tokens"].shape[0], host_generator)  # (B,) on the host
        out = self.diffusion_loss(
            batch, ratios, generator, p_uncond=float(self.cfg.text.p_uncond),
            input_noise=float(self.cfg.model.get("input_noise", 0.0)),  # absent from older checkpoints
        )
        batch_size = batch["tokens"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/mask_ratio", float(ratios.mean()), batch_size=batch_size)
        self._accumulate_train_sums(out, batch)
        return out["loss"]

    def _accumulate_train_sums(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Add a step's draws to sums on the device — per timestep bucket, next-token vs
        skipped-target draws, and the audio tokens seen — without a host sync (see
        :meth:`on_train_batch_end`, which writes the means at the logging interval)."""
        num_steps = self.head.num_train_steps
        bucket = (out["t"] * NUM_TIMESTEP_BUCKETS // num_steps).clamp_(max=NUM_TIMESTEP_BUCKETS - 1)  # (K,)
        weight = out["weight"].detach().float()
        loss = out["per_sample"].detach().float() * weight
        sums = torch.zeros(2, NUM_TIMESTEP_BUCKETS + 3, device=weight.device)  # [sum, weight] × [buckets, next, skipped, tokens]
        sums[0, :NUM_TIMESTEP_BUCKETS].index_add_(0, bucket, loss)
        sums[1, :NUM_TIMESTEP_BUCKETS].index_add_(0, bucket, weight)
        kind = NUM_TIMESTEP_BUCKETS + 1 - out["next_token"].long()  # column B: next token, B + 1: skipped
        sums[0].index_add_(0, kind, loss)
        sums[1].index_add_(0, kind, weight)
        lengths = batch.get("lengths")  # host counts from the collate; else the mask, on the device
        sums[0, -1] += sum(lengths) if isinstance(lengths, (list, tuple)) else batch["token_mask"].sum()
        self._train_sums = sums if getattr(self, "_train_sums", None) is None else self._train_sums + sums

    # ------------------------------------------------------------------ gradient guard

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the total gradient norm and skip the optimizer step when that norm is NaN
        or infinite — decided on the device, without a host synchronisation.

        The fused AdamW of :meth:`configure_optimizers` reads ``optimizer.found_inf`` (the
        mechanism ``torch.amp.GradScaler`` uses) and leaves weights, moments and its step
        count untouched where it is non-zero. Norms, clipped and skipped steps are
        accumulated on the device and written at the logging interval
        (:meth:`_flush_step_stats`), which also stops the run after ``optim.max_bad_steps``
        consecutive skipped steps. Sharded strategies (FSDP, DeepSpeed) hold only a shard of
        each gradient here, so they keep Lightning's own clipping and no guard.
        """
        raw = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the torch one
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or not getattr(raw, "defaults", {}).get("fused"):
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
            return
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()  # () on the device
        clip = float(gradient_clip_val or 0.0)
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, clip, norm, foreach=True)
        bad = ~torch.isfinite(norm)
        raw.found_inf = bad.float()  # fused AdamW: skip this update where non-zero
        stats = getattr(self, "_step_stats", None)
        if stats is None:  # [sum of finite norms, steps, clipped, skipped, current run of bad steps, longest run]
            stats = self._step_stats = torch.zeros(6, device=norm.device)
        consecutive = (stats[4] + 1) * bad
        update = torch.stack([torch.where(bad, 0.0, norm), torch.ones_like(norm), ((norm > clip) & ~bad).float() * (clip > 0),
                              bad.float(), consecutive - stats[4], torch.maximum(stats[5], consecutive) - stats[5]])
        stats.add_(update)

    def _flush_step_stats(self) -> None:
        """Write the device-side step statistics since the last write (one host sync) and
        stop the run after ``optim.max_bad_steps`` consecutive non-finite steps."""
        stats = getattr(self, "_step_stats", None)
        if stats is None:
            return
        norm_sum, steps, clipped, skipped, run, longest = stats.tolist()
        stats[[0, 1, 2, 3, 5]] = 0  # keep the current run of bad steps across writes
        self._totals = totals = getattr(self, "_totals", None) or {"clipped_steps": 0, "skipped_steps": 0}
        totals["clipped_steps"] += int(clipped)
        totals["skipped_steps"] += int(skipped)
        if self.logger is not None and steps > 0:
            metrics = {"train/clipped_steps": totals["clipped_steps"], "train/skipped_steps": totals["skipped_steps"]}
            if steps > skipped:
                metrics["train/grad_norm"] = norm_sum / (steps - skipped)
            self.logger.log_metrics(metrics, step=self.global_step)
        limit = int(self.cfg.optim.get("max_bad_steps", 0))  # absent from older checkpoints
        if limit > 0 and max(run, longest) >= limit:
            raise NonFiniteTrainingError(
                f"stopped at step {self.global_step}: {int(max(run, longest))} consecutive optimizer steps had NaN/Inf "
                f"gradients (optim.max_bad_steps={limit}); they were skipped, so the weights and the last checkpoint "
                "are those of the last good step. Lower optim.lr, check the data, or resume with trainer.resume=last."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``trainer.log_every_n_steps`` optimizer steps, averaged over the steps since
        the last write (this process's draws): the loss by timestep bucket, the next-token
        and skipped-target losses, the gradient statistics, the wall time per optimizer
        step and the audio tokens per second (all processes: × world size)."""
        trainer = self._trainer
        if trainer is None or self.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        if (batch_idx + 1) % int(trainer.accumulate_grad_batches) != 0:
            return
        self._flush_step_stats()
        sums = getattr(self, "_train_sums", None)
        if sums is None:
            return
        totals, counts = sums.tolist()  # the one host sync, at the logging interval
        self._train_sums = None
        now, step = time.perf_counter(), self.global_step
        last = getattr(self, "_last_flush", None)
        self._last_flush = (now, step)
        if self.logger is None:
            return
        metrics = {
            f"train_loss_by_t/{b * 100 // NUM_TIMESTEP_BUCKETS:02d}": totals[b] / counts[b]
            for b in range(NUM_TIMESTEP_BUCKETS) if counts[b] > 0
        }
        for name, column in (("next_token", NUM_TIMESTEP_BUCKETS), ("skipped_target", NUM_TIMESTEP_BUCKETS + 1)):
            if counts[column] > 0:
                metrics[f"train/loss_{name}"] = totals[column] / counts[column]
        if last is not None and step > last[1] and now > last[0]:
            # Wall time since the last write (that write synchronised, and so does this one).
            metrics["train/step_time_s"] = (now - last[0]) / (step - last[1])
            metrics["train/audio_tokens_per_s"] = totals[-1] * trainer.world_size / (now - last[0])
        self.logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ checkpoint extras

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the global torch RNG states (only dropout draws from them; every other
        random draw of a step comes from :meth:`step_generators`) and the skipped-step totals."""
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        self._flush_step_stats_quietly()
        checkpoint["step_totals"] = dict(getattr(self, "_totals", None) or {})

    def _flush_step_stats_quietly(self) -> None:
        try:
            self._flush_step_stats()
        except NonFiniteTrainingError:  # reported at the next logging step
            pass

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        if checkpoint.get("step_totals"):
            self._totals = dict(checkpoint["step_totals"])

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Next-token diffusion loss with the captions kept and noise drawn from a fixed seed,
        so NTP and MNTP runs are compared on the same quantity; plus :meth:`caption_usage`."""
        batch_size = batch["tokens"].shape[0]
        usage = self.caption_usage(batch, seed=int(self.cfg.seed) + batch_idx)
        self.log("val/loss", usage["out"]["loss"], prog_bar=True, batch_size=batch_size, sync_dist=True)
        self._log_val_loss_by_timestep(usage["out"], batch_size)
        for key in ("loss_shuffled", "first_token_loss", "first_token_loss_shuffled", "caption_gain"):
            if key in usage:
                self.log(f"val/{key}", usage[key], batch_size=batch_size, sync_dist=True)

    @torch.no_grad()
    def caption_usage(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """"Is the model using its captions?" — the NTP loss of a batch with its true captions
        and with the captions rolled by one (each clip gets another clip's caption), with the
        same noise draws.

        The first audio token can only be predicted from the text, so its loss with true vs
        wrong captions measures how much the text is used: ``caption_gain`` = 1 - true /
        shuffled is ≈ 0 while the text is ignored and approaches 1 when the text decides it.

        Returns:
            dict with ``out`` (the :meth:`diffusion_loss` dict of the true captions) and, for
            batches of two or more clips, ``loss_shuffled``, ``first_token_loss``,
            ``first_token_loss_shuffled`` and ``caption_gain`` (scalars).
        """
        device = batch["tokens"].device
        zeros = torch.zeros(batch["tokens"].shape[0], device="cpu")  # mask ratios live on the host
        out = self.diffusion_loss(batch, zeros, torch.Generator(device=device).manual_seed(seed), p_uncond=0.0)
        usage: dict[str, Any] = {"out": out}
        if len(batch["captions"]) < 2:
            return usage
        shuffled = dict(batch, captions=list(batch["captions"][1:]) + list(batch["captions"][:1]))
        out_shuffled = self.diffusion_loss(shuffled, zeros, torch.Generator(device=device).manual_seed(seed), p_uncond=0.0)
        first = (out["target_ids"] == 0).float() * out["weight"]  # (K,) the first-token draws
        usage["loss_shuffled"] = out_shuffled["loss"]
        usage["first_token_loss"] = (out["per_sample"] * first).sum() / first.sum().clamp_min(1)
        usage["first_token_loss_shuffled"] = (out_shuffled["per_sample"] * first).sum() / first.sum().clamp_min(1)
        usage["caption_gain"] = 1 - usage["first_token_loss"] / usage["first_token_loss_shuffled"].clamp_min(1e-12)
        return usage

    def _log_val_loss_by_timestep(self, out: dict[str, torch.Tensor], batch_size: int) -> None:
        """Validation loss per timestep bucket (validation may synchronise; training does not)."""
        bucket = (out["t"] * NUM_TIMESTEP_BUCKETS // self.head.num_train_steps).clamp_(max=NUM_TIMESTEP_BUCKETS - 1)
        weight, per_sample = out["weight"], out["per_sample"].detach().float()
        totals = torch.zeros(NUM_TIMESTEP_BUCKETS, device=weight.device).index_add_(0, bucket, per_sample * weight)
        counts = torch.zeros(NUM_TIMESTEP_BUCKETS, device=weight.device).index_add_(0, bucket, weight)
        for b, count in enumerate(counts.tolist()):
            if count > 0:
                self.log(f"val_loss_by_t/{b * 100 // NUM_TIMESTEP_BUCKETS:02d}", totals[b] / count,
                         batch_size=batch_size, sync_dist=True)

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups = decay_parameter_groups(self, optim.weight_decay)
        # Fused AdamW: one kernel per step, and it can skip a step on the device (found_inf,
        # see configure_gradient_clipping). Sharded strategies keep the foreach version.
        sharded = type(self._trainer.strategy).__name__.startswith(("FSDP", "DeepSpeed")) if self._trainer else False
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=not sharded)
        warmup = int(optim.warmup_steps)
        trainer = self.trainer

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            # read at every step: a time budget (callbacks.TimeBudget) may change it, with an anchor
            total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
            if optim.schedule == "constant" or total <= warmup:
                return 1.0
            progress = cosine_progress(step, warmup, total, self.schedule_anchor)
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_tokens(
        self,
        captions: list[str] | None,
        num_tokens: int,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        cfg_schedule: str | None = None,
        cfg_rescale: float | None = None,
        prompt_tokens: torch.Tensor | None = None,
        window_overlap: float | None = None,
        window_end_tokens: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Autoregressive sampling with the KV cache: NTP inference (target = current + 1),
        for NTP and MNTP models alike; optionally continuing an audio prompt.

        Args:
            captions: B prompts; None: unconditional (the null prefix, no guidance) —
                then ``prompt_tokens`` gives the batch size.
            num_tokens: N tokens to generate (25 per second with the AudioLDM VAE).
            cfg_scale: classifier-free guidance scale on the predicted noise (1 = none).
            temperature: scales the per-step noise of the diffusion sampler.
            num_steps: reverse diffusion steps per token.
            generator: torch generator on ``self.device`` for reproducible samples.
            sampler: "ddpm" or "ddim" (default: the checkpoint's ``sample.sampler``).
            cfg_schedule: "constant" (``cfg_scale`` for every token), "unguided_first" (the
                first token, which has no audio history, conditional only; the rest
                ``cfg_scale``) or "linear" (token i of N guided with 1 + (cfg_scale - 1) i / N,
                as in MAR); default: ``sample.cfg_schedule``.
            cfg_rescale: guidance rescale φ in [0, 1] (``DiffusionHead.predict``; default:
                ``sample.cfg_rescale``).
            prompt_tokens: (B, P, token_dim) normalised tokens of an audio prompt (audio
                continuation): they are run through the KV cache after the text prefix as
                forced history, and generation continues at position P. The guidance
                schedule runs over the N new tokens.
            window_overlap: long-form generation beyond ``model.max_tokens`` (see
                :meth:`_sampling_loop`): the fraction of the context kept at each window shift
                (default ``sample.window_overlap``).
            window_end_tokens: long-form: the context's last positions the window never
                samples (:func:`window_limit`; default ``sample.window_end_tokens``).
            progress: show a progress bar over the N tokens (with its ETA) on stderr.

        Returns:
            tokens (B, P + N, token_dim) in the normalised latent space: the prompt tokens
            unchanged, then the N generated ones (P = 0 without a prompt).
        """
        tokens = self.iter_tokens(
            captions, num_tokens, cfg_scale=cfg_scale, temperature=temperature, num_steps=num_steps,
            generator=generator, sampler=sampler, cfg_schedule=cfg_schedule, cfg_rescale=cfg_rescale,
            prompt_tokens=prompt_tokens, window_overlap=window_overlap, window_end_tokens=window_end_tokens,
        )
        if progress:
            from tqdm.auto import tqdm

            batch = len(captions) if captions is not None else len(prompt_tokens)
            tokens = tqdm(tokens, total=num_tokens, desc=f"[generate] {batch} clip{'s' * (batch != 1)}", unit="token",
                          dynamic_ncols=True)
        new = list(tokens)
        out = torch.stack(new, dim=1) if new else torch.empty(len(captions or prompt_tokens), 0, self.token_dim, device=self.device)
        if prompt_tokens is None:
            return out
        return torch.cat([prompt_tokens.to(out.device, out.dtype), out], dim=1)

    def iter_tokens(
        self,
        captions: list[str] | None,
        num_tokens: int,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        cfg_schedule: str | None = None,
        cfg_rescale: float | None = None,
        prompt_tokens: torch.Tensor | None = None,
        window_overlap: float | None = None,
        window_end_tokens: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`generate_tokens` as an iterator (the streaming API): yields each of the N
        new tokens, (B, token_dim) float32 normalised, as soon as it is sampled; the same
        arguments, and the same tokens for the same generator. Settings are checked here,
        before the first token.
        """
        sample_cfg = self.cfg.sample
        cfg_scale = float(sample_cfg.cfg_scale if cfg_scale is None else cfg_scale)
        cfg_schedule = str(sample_cfg.get("cfg_schedule", "constant") if cfg_schedule is None else cfg_schedule)
        token_scales = guidance_scales(cfg_scale, cfg_schedule, num_tokens)
        cfg_rescale = float(sample_cfg.get("cfg_rescale", 0.0) if cfg_rescale is None else cfg_rescale)
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"sample.cfg_rescale must be in [0, 1], got {cfg_rescale}")
        temperature = float(sample_cfg.temperature if temperature is None else temperature)
        window_overlap = float(sample_cfg.get("window_overlap", 0.75) if window_overlap is None else window_overlap)
        if not 0.0 < window_overlap < 1.0:
            raise ValueError(f"sample.window_overlap must be in (0, 1), got {window_overlap}")
        window_end_tokens = int(sample_cfg.get("window_end_tokens", 0) if window_end_tokens is None else window_end_tokens)
        num_prompt = 0 if prompt_tokens is None else int(prompt_tokens.shape[1])
        window = window_limit(self.decoder.max_tokens, num_prompt + num_tokens, window_end_tokens)
        return self._sampling_loop(
            captions, num_tokens, token_scales, temperature, num_steps, generator, sampler, cfg_rescale, prompt_tokens,
            window_overlap, window,
        )

    @torch.no_grad()
    def _sampling_loop(
        self,
        captions: list[str] | None,
        num_tokens: int,
        token_scales: list[float],
        temperature: float,
        num_steps: int | None,
        generator: torch.Generator | None,
        sampler: str | None,
        cfg_rescale: float,
        prompt_tokens: torch.Tensor | None,
        window_overlap: float,
        window: int,
    ) -> Iterator[torch.Tensor]:
        """The sampling loop behind :meth:`iter_tokens`: yields each new token (B, token_dim)
        float32 as soon as it is sampled. Arguments as resolved by :meth:`iter_tokens`.

        Long-form: the decoder's positions end at ``model.max_tokens``; a generation longer
        than that uses the first ``window`` of them (:func:`window_limit`). When the window
        is full, the newest ``window_overlap`` fraction of it is kept: the KV cache is
        refilled with the text prefix and those tokens at positions 0…K-1 (after the
        mid-start BOS when ``model.mid_start_bos``), and sampling continues at position K (one
        refill every ``window - K`` tokens).
        """
        limit = self.decoder.max_tokens
        keep = window_keep(window, window_overlap)
        num_prompt = 0 if prompt_tokens is None else int(prompt_tokens.shape[1])
        if num_prompt >= limit:
            raise ValueError(f"the audio prompt has {num_prompt} tokens; the model's context is model.max_tokens={limit}")
        if captions is None:
            if prompt_tokens is None:
                raise ValueError("unconditional generation (captions=None) needs prompt_tokens to continue")
            batch_size, guided = int(prompt_tokens.shape[0]), False
            prefix, prefix_mask = self.null_text(batch_size)
        else:
            batch_size, guided = len(captions), any(scale != 1.0 for scale in token_scales)
            prefix, prefix_mask = self.encode_text(captions)
        if prompt_tokens is not None and tuple(prompt_tokens.shape[::2]) != (batch_size, self.token_dim):
            raise ValueError(f"prompt_tokens must be ({batch_size}, P, {self.token_dim}), got {tuple(prompt_tokens.shape)}")
        if guided:  # conditional rows first, unconditional rows second, one batch
            null_prefix, null_mask = self.null_text(batch_size)
            prefix = torch.cat([prefix, null_prefix.to(prefix.dtype)])
            prefix_mask = torch.cat([prefix_mask, null_mask])
        cache = self.decoder.make_cache(
            prefix.shape[0], prefix.shape[1] + 1 + min(limit, num_prompt + num_tokens), self.device, prefix.dtype
        )

        def rows(x: torch.Tensor) -> torch.Tensor:  # (B, D) -> the decoder's rows
            x = x.to(self.device, prefix.dtype)
            return torch.cat([x, x]) if guided else x

        def refill(history: torch.Tensor | None, mid_start: bool = False) -> torch.Tensor:
            """Prefix + BOS + ``history`` (B, K, D) at positions 0..K-1 into the cache -> z predicting K
            (``mid_start``: a window shift; the mid-start BOS where the decoder has one)."""
            mid_start = mid_start and self.decoder.mid_bos is not None
            z = self.decoder.prefill(prefix, prefix_mask, cache, target_id=0, mid_start=mid_start)  # (rows, W)
            for j in range(0 if history is None else history.shape[1]):  # forced history
                z = self.decoder.step(rows(history[:, j]), position_id=j, target_id=j + 1, cache=cache)
            return z

        if num_prompt < window:
            z = refill(prompt_tokens)
            position = num_prompt  # the next token's position in the current window
        else:  # the prompt fills the long-form window already: start from its newest `keep` tokens
            z = refill(prompt_tokens[:, -keep:], mid_start=True)
            position = keep
        recent = collections.deque((prompt_tokens[:, j].float() for j in range(num_prompt)), maxlen=keep)  # (B, D) each, for a refill
        for i in range(num_tokens):
            z_cond, z_uncond = (z[:batch_size], z[batch_size:]) if guided else (z, None)
            x = self.head.sample(
                z_cond, z_uncond, cfg_scale=token_scales[i] if guided else 1.0, temperature=temperature,
                num_steps=num_steps, sampler=sampler, generator=generator, cfg_rescale=cfg_rescale,
            ).float()  # (B, token_dim)
            yield x
            if i + 1 == num_tokens:
                break
            recent.append(x)
            if position + 1 < window:
                z = self.decoder.step(rows(x), position_id=position, target_id=position + 1, cache=cache)
                position += 1
            else:  # the window is full: keep its newest `keep` tokens
                z = refill(torch.stack(list(recent), dim=1), mid_start=True)
                position = len(recent)

    def forward(self, captions: list[str], num_tokens: int, **kwargs) -> torch.Tensor:
        """Inference: ``generate_tokens``."""
        return self.generate_tokens(captions, num_tokens, **kwargs)

    def parameter_summary(self) -> dict[str, int]:
        """Trainable parameter counts by part (frozen pretrained encoders excluded)."""
        return {
            "text": count_parameters(self.text),
            "decoder": count_parameters(self.decoder),
            "head": count_parameters(self.head),
            "null_prefix": self.null_prefix.numel(),
            "total": count_parameters(self),
        }
