"""Where data meets model: the stages `make train`, `make cache` and `make generate` run.

Stages of the ``audio_lm`` task (each reusable on its own):

1. :func:`manifest_sources` — the synthetic corpus is generated (or reused), or the
   configured manifests are read;
2. :func:`load_or_train_pretransform` — pretrained AudioLDM VAE, or a VAE exported by a
   ``mel_vae`` run, trained first when missing;
3. :func:`ensure_latent_cache` — every clip encoded once into the latent cache (resumable);
4. :func:`train_audio_lm` — the language model on the cache, samples at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.audio_datamodule import AudioCapsDataModule
from datamodules.latent_cache import LatentCache, LatentCacheWriter, LatentDataModule
from datamodules.manifest import ManifestSource, parse_manifest_sources, read_manifest
from datamodules.synthetic import generate_corpus
from experiments import ranks
from datamodules.atomic import remove_stale_temporaries, write_text_atomic
from experiments.config import ConfigError, last_run_dir, make_run_dir
from lightning_modules.audio_lm import AudioLMSystem, window_keep, window_limit
from lightning_modules.callbacks import AudioSamplesCallback, StepProgressBar, TimeBudget
from lightning_modules.checkpoints import (
    CheckpointError,
    PreemptionCheckpoint,
    RawKeepingEMA,
    SafeCheckpointIO,
    load_checkpoint,
    verify_checkpoint_file,
)
from lightning_modules.mel_vae import MelVAESystem, spectrogram_picture
from lightning_modules.parts.pretransform import MelVAEPretransform
from lightning_modules.parts.streaming import StreamingDecoder
from lightning_modules.parts.text_conditioning import SENTENCEPIECE_MODEL_TYPES, train_sentencepiece


TIME_BUDGET_MIN_WARMUP = 20  # warmup steps a time budget needs to time the steps in
TRUNCATED_CAPTIONS_WARNING = 0.01  # share of training captions cut at text.max_len above which training warns


def log(stage: str, message: str) -> None:
    """Progress line on global rank zero (the other ranks of a launch stay quiet)."""
    if ranks.global_rank_before_fit() == 0:
        print(f"[{stage}] {message}", flush=True)


def container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def set_threads(cfg: DictConfig) -> None:
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(int(cfg.trainer.num_threads))


# ---------------------------------------------------------------------------- data


def manifest_sources(cfg: DictConfig) -> list[ManifestSource]:
    """The manifests an experiment reads; generates the synthetic corpus when asked to."""
    if cfg.data.source == "synthetic":
        corpus = cfg.corpus
        start = time.perf_counter()
        path = generate_corpus(
            corpus.dir,
            seed=corpus.seed,
            clip_seconds=corpus.clip_seconds,
            sample_rate=corpus.sample_rate,
            num_train=corpus.num_train,
            num_val=corpus.num_val,
            num_test=corpus.num_test,
            num_test_novel=corpus.num_test_novel,
            progress=True,
        )
        log("corpus", f"synthetic corpus ready at {path} ({time.perf_counter() - start:.1f} s)")
        return [ManifestSource(path=str(path), weight=1.0)]
    if cfg.data.source == "manifest":
        if not cfg.data.manifests:
            raise ValueError("data.source is 'manifest' but data.manifests is empty: list at least one manifest")
        return parse_manifest_sources(container(cfg.data.manifests), allow_absolute_paths=bool(cfg.data.allow_absolute_paths))
    raise ValueError(f"data.source must be 'synthetic' or 'manifest', got {cfg.data.source!r}")


def audio_datamodule(
    cfg: DictConfig, sources: list[ManifestSource], batch_size: int | None = None, clip_seconds: float | None = None
) -> AudioCapsDataModule:
    data = cfg.data
    return AudioCapsDataModule(
        manifests=sources,
        sample_rate=data.sample_rate,
        clip_seconds=clip_seconds or data.clip_seconds,
        batch_size=batch_size or data.batch_size,
        num_workers=data.num_workers,
        seed=cfg.seed,
        train_split=data.train_split,
        val_split=data.val_split,
        test_split=data.test_split,
        normalize=data.normalize,
    )


# ---------------------------------------------------------------------------- trainer


def resolve_precision(precision: str) -> str:
    """``auto``: bf16-mixed on CUDA, 32-true on CPU (measured on this project's CPUs without AMX:
    a bf16 matmul ran at 0.3 GFLOP/s against 84 GFLOP/s in fp32)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


SHARDED_STRATEGIES = ("fsdp", "deepspeed")


def check_distributed_settings(cfg: DictConfig) -> None:
    """Refuse, before any work, settings Lightning cannot run together."""
    strategy = str(cfg.trainer.strategy)
    if cfg.optim.ema_decay > 0 and strategy.startswith(SHARDED_STRATEGIES):
        raise ConfigError(
            f"trainer.strategy={strategy} shards the weights, and Lightning's EMA (WeightAveraging) cannot average "
            "sharded weights: set optim.ema_decay=0 (no EMA) or use trainer.strategy=ddp"
        )
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0: no EMA), got {cfg.optim.ema_decay}")


def describe_batch(trainer: L.Trainer, batch_size: int) -> str:
    """The effective-batch arithmetic of a launch, e.g. ``8 devices × 64 clips × 4 accumulated = 2048 clips``."""
    devices, accumulate = trainer.world_size, trainer.accumulate_grad_batches
    return (
        f"{devices} device{'s' if devices > 1 else ''} × {batch_size} clips × {accumulate} accumulated "
        f"= {devices * batch_size * accumulate} clips per optimizer step"
    )


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    max_steps: int,
    val_every_steps: int,
    callbacks: list[L.Callback],
    ckpt_every_steps: int | None = None,
    single_device: bool = False,
) -> L.Trainer:
    """A Lightning Trainer writing TensorBoard logs and checkpoints into ``run_dir``.

    Distributed training takes ``trainer.devices`` / ``strategy`` / ``num_nodes`` as they
    are (Lightning detects torchrun and SLURM); ``single_device`` pins one device (a VAE
    trained on the way, inside rank zero's preparation). The datamodules shard the training
    data themselves (every rank reads its part of each optimizer step,
    :class:`~datamodules.audio_datamodule.SeededClipSampler`), so Lightning's
    distributed-sampler replacement is off.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    # Our samplers continue an interrupted epoch from Lightning's restored loop progress
    # (datamodules.audio_datamodule.resume_sampler), so this warning does not apply.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    trainer_cfg = cfg.trainer
    step_interval = ckpt_every_steps or val_every_steps
    checkpoint = ModelCheckpoint(  # step checkpoints (the newest trainer.keep_checkpoints are kept) and last.ckpt
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=step_interval,
        save_top_k=-1 if ckpt_every_steps else 1,
        save_last=True,
        enable_version_counter=False,  # last.ckpt is one file, also written by the preemption callback
    )
    # SIGTERM / Ctrl-C → last.ckpt; and last.ckpt every trainer.ckpt_every_minutes
    safety = PreemptionCheckpoint(run_dir / "checkpoints", every_minutes=float(trainer_cfg.get("ckpt_every_minutes", 0) or 0),
                                  step_interval=step_interval)
    keep = int(trainer_cfg.get("keep_checkpoints", -1)) if ckpt_every_steps else -1
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=max_steps,
        accelerator=trainer_cfg.accelerator,
        devices=1 if single_device else trainer_cfg.devices,
        strategy="auto" if single_device else trainer_cfg.strategy,
        num_nodes=1 if single_device else trainer_cfg.num_nodes,
        use_distributed_sampler=False,
        precision=resolve_precision(trainer_cfg.precision),
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip,
        val_check_interval=val_every_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer_cfg.limit_val_batches,
        log_every_n_steps=trainer_cfg.log_every_steps,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False),
        # The bar refreshes at the logging interval: its loss readout is a host sync.
        callbacks=[*callbacks, checkpoint, safety, LearningRateMonitor(logging_interval="step"),
                   StepProgressBar(refresh_rate=max(1, int(trainer_cfg.log_every_steps)))],
        plugins=[SafeCheckpointIO(keep_step_checkpoints=keep)],
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def resolve_resume(cfg: DictConfig) -> str | None:
    """``trainer.resume``: null, a checkpoint path, or ``last`` (this experiment's newest run).

    Refused before any work: a missing, truncated or corrupt file, and one already at
    ``trainer.max_steps`` (the run would train nothing and become ``last`` without weights).
    """
    resume = cfg.trainer.resume
    if resume is None:
        return None
    if resume == "last":
        path = last_run_dir(cfg.run.root, cfg.experiment) / "checkpoints" / "last.ckpt"
    else:
        path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume: checkpoint {path} does not exist")
    try:  # verifies every record first: a truncated / corrupt file is refused before any work
        state = load_checkpoint(path, mmap=True)  # mmap: the weights are not read
    except CheckpointError as error:
        raise ConfigError(f"trainer.resume: {error}") from None
    step = int(state.get("global_step", 0))
    if 0 < int(cfg.trainer.max_steps) <= step:
        raise ConfigError(
            f"trainer.resume: checkpoint {path} is at step {step} and trainer.max_steps={cfg.trainer.max_steps}: "
            f"nothing is left to train — raise trainer.max_steps to continue the run"
        )
    for stale in remove_stale_temporaries(path.parent):  # the interrupted run's half-written saves
        log("lm", f"removed {stale.name}, a save interrupted when {path.parent.parent.name} was stopped")
    return str(path)


# ---------------------------------------------------------------------------- VAE


def mel_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return container(cfg.mel)


def vae_kwargs(cfg: DictConfig) -> dict[str, Any]:
    vae = cfg.vae
    return dict(
        latent_channels=vae.latent_channels,
        block_out_channels=list(vae.block_out_channels),
        layers_per_block=vae.layers_per_block,
        norm_num_groups=vae.norm_num_groups,
        mid_block_add_attention=vae.mid_block_attention,
    )


def vocoder_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The ``vocoder:`` section as ``build_vocoder`` reads it (kind, griffin_lim_iters, pretrained_dir)."""
    return container(cfg.vocoder)


def sources_record(sources: list[ManifestSource]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(source) for source in sources]


def train_mel_vae(cfg: DictConfig, experiment: str | None = None, single_device: bool = False) -> Path:
    """Train the mel-VAE and export the pretransform to ``<run_dir>/pretransform``.

    Under DDP, global rank zero prepares the data and the run directory (the other ranks
    wait, :mod:`experiments.ranks`) and exports the pretransform after training.
    ``single_device``: train in this process only (a VAE trained inside rank zero's
    preparation of an LM run).
    """
    set_threads(cfg)
    if experiment is not None:
        OmegaConf.set_struct(cfg, False)
        cfg = cfg.copy()
        cfg.experiment = experiment
        OmegaConf.set_struct(cfg, True)

    def prepare() -> dict[str, Any]:
        sources = manifest_sources(cfg)
        run_dir = make_run_dir(cfg)
        log("vae", f"run directory: {run_dir}")
        return {"sources": sources_record(sources), "run_dir": str(run_dir)}

    if single_device:
        record = prepare()
    else:
        record = ranks.prepare_once("mel_vae", cfg.run.root, container(cfg), prepare, cfg.trainer.prepare_timeout_s)
    run_dir = Path(record["run_dir"])
    sources = [ManifestSource(**source) for source in record["sources"]]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = audio_datamodule(cfg, sources, clip_seconds=cfg.vae_train.clip_seconds)
    system = MelVAESystem(
        mel=mel_kwargs(cfg),
        vae=vae_kwargs(cfg),
        lr=cfg.vae_train.lr,
        kl_weight=cfg.vae_train.kl_weight,
        recon_loss=cfg.vae_train.recon_loss,
        griffin_lim_iters=cfg.vocoder.griffin_lim_iters,
    )
    trainer = build_trainer(
        cfg, run_dir, cfg.vae_train.max_steps, cfg.vae_train.val_every_steps, callbacks=[], single_device=single_device
    )
    log("vae", describe_batch(trainer, cfg.data.batch_size))
    start = time.perf_counter()
    trainer.fit(system, datamodule=datamodule)
    log("vae", f"trained {trainer.global_step} steps in {time.perf_counter() - start:.0f} s")
    if not trainer.is_global_zero:
        return run_dir
    export_dir = run_dir / "pretransform"
    stats_data = audio_datamodule(cfg, sources, clip_seconds=cfg.vae_train.clip_seconds)  # all clips, not a rank's shard
    stats_data.setup("fit")
    system.export_pretransform(
        export_dir,
        stats_batches=stats_data.train_dataloader(),
        vocoder_cfg={"kind": "griffin_lim", "griffin_lim_iters": cfg.vocoder.griffin_lim_iters},
        max_batches=cfg.vae_train.stats_batches,
    )
    log("vae", f"pretransform exported to {export_dir}")
    return run_dir


def load_or_train_pretransform(cfg: DictConfig) -> MelVAEPretransform:
    """Pretrained AudioLDM weights (``vae.pretrained_dir``), else the VAE exported at
    ``vae.dir`` — trained first (as experiment ``vae.experiment``) when missing and
    ``vae.train_if_missing`` is set."""
    vae = cfg.vae
    if vae.pretrained_dir:
        log("vae", f"loading pretrained VAE from {vae.pretrained_dir}")
        voc = cfg.vocoder
        vocoder_dir = voc.pretrained_dir if voc.kind == "hifigan" else None
        return MelVAEPretransform.from_pretrained(
            vae.pretrained_dir, vocoder_dir=vocoder_dir, mel_cfg=mel_kwargs(cfg), vocoder_cfg=vocoder_kwargs(cfg)
        )
    directory = Path(vae.dir)
    if not (directory / "pretransform.json").is_file():
        if not vae.train_if_missing:
            raise FileNotFoundError(
                f"vae.dir {directory} holds no trained pretransform; train one with `make train EXP={vae.experiment}`, "
                "set vae.train_if_missing=true, or set vae.pretrained_dir"
            )
        log("vae", f"no trained VAE at {directory}: training it first (experiment {vae.experiment}, on one device)")
        vae_cfg = cfg.copy()
        OmegaConf.set_struct(vae_cfg, False)
        vae_cfg.task = "mel_vae"
        train_mel_vae(vae_cfg, experiment=vae.experiment, single_device=True)
    directory = directory.resolve()  # pin the run that `last` points to now
    log("vae", f"loading pretransform from {directory}")
    OmegaConf.set_struct(cfg, False)
    cfg.vae.dir = str(directory)  # saved with the LM, so a newer VAE run cannot silently replace it
    OmegaConf.set_struct(cfg, True)
    return MelVAEPretransform.load(directory, vocoder_cfg=vocoder_kwargs(cfg))


# ---------------------------------------------------------------------------- latent cache


def cache_dir_for(cfg: DictConfig, fingerprint: dict[str, Any]) -> Path:
    if cfg.cache.dir:
        return Path(cfg.cache.dir)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.run.data_root) / "cache" / digest


def cache_fingerprint(cfg: DictConfig, pretransform: MelVAEPretransform, sources: list[ManifestSource]) -> dict[str, Any]:
    """What the cached latents depend on: the VAE weights and front end, the audio and its cropping."""
    return {
        "pretransform": pretransform.fingerprint(),
        "manifests": [str(Path(s.path).resolve()) for s in sources],
        "sample_rate": cfg.data.sample_rate,
        "clip_seconds": cfg.data.clip_seconds,
        # only when set, so caches built before the option existed keep their fingerprint
        **({"normalize": cfg.data.normalize} if cfg.data.normalize != "none" else {}),
    }


@torch.no_grad()
def ensure_latent_cache(cfg: DictConfig, pretransform: MelVAEPretransform, sources: list[ManifestSource]) -> Path:
    """Encode every clip of the configured splits once (posterior mean and std); resumable.

    A finished cache with the same fingerprint is reused; an unfinished one is resumed
    (finished shards are skipped); one built with another VAE or audio settings is refused.
    """
    from tqdm.auto import tqdm

    fingerprint = cache_fingerprint(cfg, pretransform, sources)
    cache_dir = cache_dir_for(cfg, fingerprint)
    writer = LatentCacheWriter(
        cache_dir, fingerprint=fingerprint, shard_size=cfg.cache.shard_size, dtype=cfg.cache.dtype,
        stats_split=cfg.data.train_split,
    )
    if writer.index.get("complete"):
        # the fingerprint covers what the latents depend on, not the text: captions edited since come from the manifest
        splits = set(cfg.cache.splits)
        metadata = {entry.id: (entry.captions, entry.labels) for source in sources
                    for entry in read_manifest(source.path) if entry.split in splits}
        refreshed = writer.refresh_metadata(metadata)
        log("cache", f"latent cache complete at {cache_dir}"
            + (f"; captions or labels of {refreshed} clips updated from the manifest" if refreshed else ""))
        return cache_dir
    start = time.perf_counter()
    datamodule = audio_datamodule(cfg, sources, batch_size=cfg.cache.batch_size)
    pretransform.eval()
    encoded = resumed = 0
    for split in cfg.cache.splits:
        clip_ids = [clip.entry.id for clip in datamodule.clips(split)]
        pending = set(writer.pending(clip_ids))
        resumed += len(clip_ids) - len(pending)
        loader = datamodule.split_dataloader(split, exclude_ids=[i for i in clip_ids if i not in pending])
        if loader is None:
            continue
        for batch in tqdm(loader, desc=f"[cache] {split}", unit="batch", mininterval=5):
            mean, std, token_mask = pretransform.encode_moments(batch["wave"], batch["wave_mask"])
            for i, clip_id in enumerate(batch["ids"]):
                writer.add(clip_id, mean[i], std[i], token_mask[i], batch["all_captions"][i], batch["labels"][i], split,
                           source=batch["sources"][i])
            encoded += len(batch["ids"])
    writer.finalize()
    log("cache", f"encoded {encoded} clips ({resumed} already cached) into {cache_dir} in {time.perf_counter() - start:.0f} s")
    return cache_dir


# ---------------------------------------------------------------------------- language model


def num_tokens_for(seconds: float, pretransform: MelVAEPretransform) -> int:
    """Audio tokens generated for ``seconds`` of audio (at least one)."""
    return max(1, round(seconds * pretransform.tokens_per_second))


def check_length(cfg: DictConfig, system: AudioLMSystem, pretransform: MelVAEPretransform, seconds: float) -> str | None:
    """How ``seconds`` of audio fit the checkpoint's context: None when within
    ``model.max_tokens``, else a note on the sliding window (``cfg.sample``) that generates them."""
    tokens, limit = num_tokens_for(seconds, pretransform), system.decoder.max_tokens
    if tokens <= limit:
        return None
    overlap = float(cfg.sample.window_overlap)
    end_tokens = int(cfg.sample.window_end_tokens)
    window = window_limit(limit, tokens, end_tokens)
    keep = window_keep(window, overlap)
    tps = pretransform.tokens_per_second
    return (f"{seconds:g} s needs {tokens} tokens, beyond the checkpoint's context (model.max_tokens={limit}, "
            f"{limit / tps:g} s): generated with a sliding window of {window} tokens (sample.window_end_tokens="
            f"{end_tokens}) that keeps the newest {keep} ({keep / tps:g} s, sample.window_overlap={overlap:g}) at each shift")


PROMPT_RIGHT_CONTEXT_SECONDS = 1.0  # audio after an audio prompt read with it, so that its last token is not a clip end


@torch.no_grad()
def encode_audio_prompt(
    cfg: DictConfig, system: AudioLMSystem, pretransform: MelVAEPretransform, path: str | Path, seconds: float
) -> torch.Tensor:
    """The opening ``seconds`` of an audio file as the LM's normalised tokens (1, P, token_dim).

    The clip goes through the training data's path: decoded, mixed to mono, resampled to
    the pretransform's rate, normalised as ``data.normalize`` says, encoded to the VAE's
    posterior mean and normalised with the LM's latent statistics.

    The VAE encodes a clip's last token differently (it sees the clip's border; on the demo
    its norm is 11.1 against 7.3 elsewhere), and a continuation after such a token starts with
    a seam. So the file is read ``PROMPT_RIGHT_CONTEXT_SECONDS`` further and the prompt cut
    from that encoding; when the file ends within the prompt, its last token (the clip's end)
    is dropped: P is then one less than ``seconds`` asks (callers read P from the shape).

    Raises:
        ValueError: naming the file, when it does not decode or is shorter than two tokens.
    """
    from datamodules.audio_io import AudioDecodeError, audioldm_normalize, load_audio

    if not seconds > 0:
        raise ValueError(f"PROMPT_SECONDS / --prompt-seconds must be > 0, got {seconds:g}")
    try:
        wave = load_audio(path, target_sr=pretransform.sample_rate, max_seconds=seconds + PROMPT_RIGHT_CONTEXT_SECONDS)  # (S,)
    except AudioDecodeError as err:
        raise ValueError(f"audio prompt: {err}") from None
    count = num_tokens_for(seconds, pretransform)
    if wave.shape[0] < 2 * round(pretransform.sample_rate / pretransform.tokens_per_second):
        raise ValueError(f"audio prompt {path} holds {wave.shape[0] / pretransform.sample_rate:.3f} s, less than two tokens "
                         "(the last token of a clip is its end, and is dropped)")
    if cfg.data.normalize == "audioldm":
        wave = audioldm_normalize(wave)
    wave_t = torch.from_numpy(wave)[None].to(system.device)
    pretransform.to(system.device)
    mean, _, token_mask = pretransform.encode_moments(wave_t)
    tokens = mean[:, : min(count, int(token_mask[0].sum()) - 1)]  # never the clip's last token
    return ((tokens - system.latent_mean) / system.latent_std).float()


def _sampling_kwargs(cfg: DictConfig, system: AudioLMSystem, generator_seed: int,
                     cfg_scale: float | None = None) -> dict[str, Any]:
    """``generate_tokens`` / ``iter_tokens`` keyword arguments from ``cfg.sample`` and a seed
    (``cfg_scale``: instead of ``sample.cfg_scale``)."""
    sample = cfg.sample
    return dict(
        cfg_scale=sample.cfg_scale if cfg_scale is None else cfg_scale, temperature=sample.temperature, num_steps=sample.steps, sampler=sample.sampler,
        cfg_schedule=sample.cfg_schedule, cfg_rescale=sample.cfg_rescale,
        window_overlap=sample.window_overlap, window_end_tokens=sample.window_end_tokens,
        generator=torch.Generator(device=system.device).manual_seed(generator_seed),
    )


def _autocast(cfg: DictConfig, system: AudioLMSystem):
    """The sampling loop's autocast region (bf16 when ``trainer.precision`` says so)."""
    use_bf16 = resolve_precision(cfg.trainer.precision).startswith("bf16")
    return torch.autocast(device_type=system.device.type, dtype=torch.bfloat16, enabled=use_bf16)


def render_fn(cfg: DictConfig, pretransform: MelVAEPretransform, seconds: float, generator_seed: int,
              progress: bool = False):
    """``render(system, captions) -> waves (B, S)``: generate tokens, denormalise, decode to
    audio (``progress``: a bar over each batch's tokens)."""

    def render(system: AudioLMSystem, captions: list[str] | None, prompt_tokens: torch.Tensor | None = None,
               cfg_scale: float | None = None) -> torch.Tensor:
        """-> waves (B, S); with ``prompt_tokens`` (B, P, D) the wave holds the prompt's
        resynthesis followed by ``seconds`` of continuation (captions None: unconditional);
        ``cfg_scale`` replaces ``sample.cfg_scale``."""
        num_tokens = num_tokens_for(seconds, pretransform)
        # One autocast region around the whole sampling loop (entering it per step re-casts weights).
        with _autocast(cfg, system):
            tokens = system.generate_tokens(
                captions, num_tokens, prompt_tokens=prompt_tokens,
                **_sampling_kwargs(cfg, system, generator_seed, cfg_scale=cfg_scale), progress=progress,
            )
        latents = system.denormalize(tokens.float())
        pretransform.to(system.device)
        return pretransform.decode(latents, normalized=False).float().cpu()

    return render


def log_mel_picture_fn(pretransform: MelVAEPretransform):
    """``picture(wave (S,)) -> image (C, F, T)``: the wave's log-mel through the pretransform's
    front end, as :func:`spectrogram_picture` draws it (for TensorBoard)."""

    def picture(wave: torch.Tensor) -> torch.Tensor:
        device = next(pretransform.mel.buffers()).device
        return spectrogram_picture(pretransform.mel(wave[None].to(device).float())[0])

    return picture


def streaming_decoder(cfg: DictConfig, system: AudioLMSystem, pretransform: MelVAEPretransform) -> StreamingDecoder:
    """A :class:`StreamingDecoder` over normalised tokens with the ``sample.stream_*`` settings."""
    sample = cfg.sample
    pretransform.to(system.device)

    def decode(tokens: torch.Tensor) -> torch.Tensor:  # (B, n, D) normalised -> (B, n * hop) on the CPU
        return pretransform.decode(system.denormalize(tokens.float()), normalized=False).float().cpu()

    return StreamingDecoder(
        decode, pretransform.downsampling_ratio, chunk_tokens=sample.stream_chunk_tokens,
        left_tokens=sample.stream_left_tokens, lookahead_tokens=sample.stream_lookahead_tokens,
        crossfade_tokens=sample.stream_crossfade_tokens,
    )


def stream_fn(cfg: DictConfig, pretransform: MelVAEPretransform, seconds: float, generator_seed: int):
    """``stream(system, captions, prompt_tokens) -> iterator of wave chunks (B, S_i)`` on the CPU.

    The same tokens as :func:`render_fn` with the same seed (one sampling loop,
    :meth:`AudioLMSystem.iter_tokens`), decoded in chunks while the rest is sampled; the
    chunks concatenate to the one-shot wave's length. With ``prompt_tokens`` the prompt's
    resynthesis streams first.
    """

    def stream(
        system: AudioLMSystem, captions: list[str] | None, prompt_tokens: torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        decoder = streaming_decoder(cfg, system, pretransform)
        for j in range(0 if prompt_tokens is None else prompt_tokens.shape[1]):
            chunk = decoder.push(prompt_tokens[:, j].to(system.device).float())
            if chunk is not None:
                yield chunk
        tokens = system.iter_tokens(
            captions, num_tokens_for(seconds, pretransform), prompt_tokens=prompt_tokens,
            **_sampling_kwargs(cfg, system, generator_seed),
        )
        while True:
            with _autocast(cfg, system):  # around each token only: the consumer's code runs outside it
                token = next(tokens, None)
            if token is None:
                break
            chunk = decoder.push(token)
            if chunk is not None:
                yield chunk
        rest = decoder.flush()
        if rest is not None:
            yield rest

    return stream


def cache_captions(cache: LatentCache, split: str, first_only: bool = False) -> list[str]:
    """Captions of a cache split (all of them, or each clip's first); [] when the split is absent."""
    if split not in cache.splits:
        return []
    records = cache.records(split)
    return [r["captions"][0] for r in records] if first_only else [c for r in records for c in r["captions"]]


def held_out_captions(cache: LatentCache, cfg: DictConfig, count: int) -> list[str]:
    """Up to ``count`` first captions of held-out splits (test, test_novel, val), alternating."""
    pools = [cache_captions(cache, split, first_only=True) for split in (cfg.data.test_split, "test_novel", cfg.data.val_split)]
    pools = [p for p in pools if p]
    captions: list[str] = []
    index = 0
    while len(captions) < count and any(index < len(p) for p in pools):
        for pool in pools:
            if index < len(pool) and len(captions) < count:
                captions.append(pool[index])
        index += 1
    return captions


def prepare_tokenizer(cfg: DictConfig, cache: LatentCache, run_dir: Path) -> str | None:
    """``text.kind: scratch``: train the sentencepiece model on the cache's training captions
    (into ``<run_dir>/text/``); returns its path (None for pretrained text encoders)."""
    if cfg.text.kind != "scratch":
        return None
    captions = cache_captions(cache, cfg.data.train_split)
    path = str(train_sentencepiece(captions, str(run_dir / "text" / "spm"), cfg.text.vocab_size, cfg.text.tokenizer))
    import sentencepiece as spm

    lengths = [len(ids) + 1 for ids in spm.SentencePieceProcessor(model_file=path).encode(captions)]  # + eos
    cut = sum(n > cfg.text.max_len for n in lengths) / len(lengths)
    log("text", f"sentencepiece tokenizer ({cfg.text.tokenizer}, {spm.SentencePieceProcessor(model_file=path).get_piece_size()} "
        f"pieces) trained on {len(captions)} captions: {sum(lengths) / len(lengths):.1f} tokens per caption, "
        f"{cut:.1%} longer than text.max_len={cfg.text.max_len}")
    if cut > TRUNCATED_CAPTIONS_WARNING:
        warnings.warn(f"{cut:.1%} of the training captions are cut at text.max_len={cfg.text.max_len} tokens (longest "
                      f"{max(lengths)}): the model never reads their ends. Raise text.max_len, or try text.tokenizer=bpe "
                      "(whole-word pieces) on a small corpus.", stacklevel=2)
    return path


def build_audio_lm(
    cfg: DictConfig, cache: LatentCache, sp_model_path: str | None, pretransform_fingerprint: str
) -> AudioLMSystem:
    """A fresh system with the cache's latent statistics (and the tokenizer of
    :func:`prepare_tokenizer` when text.kind is scratch), optionally initialised from a checkpoint."""
    system = AudioLMSystem(container(cfg), sp_model_path=sp_model_path, pretransform_fingerprint=pretransform_fingerprint)
    system.set_latent_stats(cache.mean, cache.std)
    if cfg.model.init_from:
        try:
            state = load_checkpoint(cfg.model.init_from)["state_dict"]
        except CheckpointError as error:
            raise ConfigError(f"model.init_from: {error}") from None
        missing, unexpected = system.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"model.init_from {cfg.model.init_from}: missing keys {missing}, unexpected keys {unexpected}"
            )
        log("model", f"initialised weights from {cfg.model.init_from}")
    return system


def prepare_audio_lm(cfg: DictConfig, loaded: dict[str, Any]) -> dict[str, Any]:
    """Global rank zero's preparation: corpus → pretransform (trained first when missing) →
    latent cache → run directory → tokenizer. Returns what every rank needs to open them
    read-only; the pretransform it loaded is left in ``loaded``."""
    resume = resolve_resume(cfg)  # first: a wrong path fails before any work, and before the new run becomes `last`
    timings: dict[str, float] = {}
    start = time.perf_counter()
    sources = manifest_sources(cfg)
    timings["corpus"] = time.perf_counter() - start

    start = time.perf_counter()
    pretransform = load_or_train_pretransform(cfg)  # pins cfg.vae.dir to the run it loads
    if pretransform.token_dim != cfg.model.token_dim:
        raise ValueError(
            f"model.token_dim={cfg.model.token_dim} but the pretransform makes tokens of {pretransform.token_dim} values"
        )
    timings["vae"] = time.perf_counter() - start

    start = time.perf_counter()
    cache_dir = ensure_latent_cache(cfg, pretransform, sources)
    timings["cache"] = time.perf_counter() - start

    run_dir = make_run_dir(cfg)
    log("lm", f"run directory: {run_dir}")
    cache = LatentCache(cache_dir, expected_fingerprint=cache_fingerprint(cfg, pretransform, sources))
    loaded["pretransform"] = pretransform
    return {
        "sources": sources_record(sources), "vae_dir": cfg.vae.dir, "cache_dir": str(cache_dir),
        "run_dir": str(run_dir), "sp_model_path": prepare_tokenizer(cfg, cache, run_dir), "resume": resume,
        "text_embeddings": ensure_text_embeddings(cfg, cache), "timings_s": timings,
    }


def text_device(cfg: DictConfig) -> torch.device:
    """Where rank zero runs frozen encoders while preparing: the first GPU unless told CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")


@torch.no_grad()
def ensure_text_embeddings(cfg: DictConfig, cache: LatentCache) -> str | None:
    """``text.kind: pretrained`` with ``text.precompute``: the frozen T5 + CLAP outputs of
    every caption in the cache, computed once into ``<cache dir>/text_<encoders>.pt``
    (reused when it exists). Returns its path, or None when nothing is precomputed."""
    from lightning_modules.parts.text_conditioning import (
        FrozenTextEmbeddings,
        build_text_conditioner,
        frozen_encoder_fingerprint,
    )

    if cfg.text.kind != "pretrained" or not cfg.text.precompute:
        return None
    fingerprint = frozen_encoder_fingerprint(cfg.text.t5_dir, cfg.text.clap_dir, cfg.text.t5_max_tokens)
    path = cache.cache_dir / f"text_{fingerprint}.pt"
    if path.is_file():  # decided before the encoders are loaded
        log("text", f"frozen text embeddings ready at {path}")
        return str(path)
    conditioner = build_text_conditioner(cfg.text, out_dim=8).to(text_device(cfg))
    captions = [c for split in cache.splits for c in cache_captions(cache, split)]
    start = time.perf_counter()
    FrozenTextEmbeddings.write(path, conditioner, captions, batch_size=cfg.cache.batch_size,
                               dtype=getattr(torch, cfg.cache.dtype), progress=True)
    log("text", f"frozen T5 + CLAP run once over {len(set(captions))} captions into {path} "
        f"({time.perf_counter() - start:.0f} s)")
    return str(path)


def train_audio_lm(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> Path:
    """The whole pipeline: data → pretransform → latent cache → language model → samples.

    ``extra_callbacks`` join the Trainer's (``make gpu-check`` measures throughput with one).

    Multi-process launches: global rank zero prepares everything up to the run directory
    (:func:`prepare_audio_lm`), the other ranks wait for it and open the results read-only;
    every rank then trains on its shard of each optimizer step, and only rank zero writes
    logs, checkpoints, samples and ``summary.json``.
    """
    started = time.time()  # trainer.time_budget_minutes counts from here: corpus, VAE, cache and LM
    check_distributed_settings(cfg)
    budget_minutes = float(cfg.trainer.time_budget_minutes)
    if budget_minutes < 0 or (budget_minutes > 0 and int(cfg.optim.warmup_steps) < TIME_BUDGET_MIN_WARMUP):
        raise ConfigError(f"trainer.time_budget_minutes={budget_minutes:g} needs a value ≥ 0 and, when set, optim.warmup_steps ≥ "
                          f"{TIME_BUDGET_MIN_WARMUP} (the step count is decided at the warmup's end), got {cfg.optim.warmup_steps}")
    scales = [cfg.sample.cfg_scale, *[s for s in cfg.sample.extra_cfg_scales if s != cfg.sample.cfg_scale]]
    if any(float(scale) < 0 for scale in scales):
        raise ConfigError(f"sample.cfg_scale and sample.extra_cfg_scales must be ≥ 0, got {scales}")
    if cfg.text.kind == "scratch" and cfg.text.tokenizer not in SENTENCEPIECE_MODEL_TYPES:
        raise ConfigError(f"text.tokenizer must be one of {SENTENCEPIECE_MODEL_TYPES}, got {cfg.text.tokenizer!r}")
    if not 0 <= cfg.text.word_dropout < 1:
        raise ConfigError(f"text.word_dropout must be in [0, 1) (a probability per caption word), got {cfg.text.word_dropout}")
    if not 0 <= cfg.model.window_start_share <= 1:
        raise ConfigError(f"model.window_start_share must be in [0, 1] (a share of training windows), got {cfg.model.window_start_share}")
    if cfg.model.mid_start_bos and cfg.model.window_start_share == 0:
        raise ConfigError("model.mid_start_bos=true needs model.window_start_share > 0: with no window begun mid-clip "
                          "in training, the mid-start BOS that every long-form refill uses would stay untrained")
    set_threads(cfg)
    loaded: dict[str, Any] = {}
    record = ranks.prepare_once(
        "audio_lm", cfg.run.root, container(cfg), lambda: prepare_audio_lm(cfg, loaded), cfg.trainer.prepare_timeout_s
    )
    sources = [ManifestSource(**source) for source in record["sources"]]
    OmegaConf.set_struct(cfg, False)
    cfg.vae.dir = record["vae_dir"]  # the VAE run rank zero pinned
    OmegaConf.set_struct(cfg, True)
    pretransform = loaded.get("pretransform") or load_pretransform_for(cfg)
    run_dir, cache_dir = Path(record["run_dir"]), Path(record["cache_dir"])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fingerprint = cache_fingerprint(cfg, pretransform, sources)
    cache = LatentCache(cache_dir, expected_fingerprint=fingerprint)
    datamodule = LatentDataModule(
        cache_dir,
        batch_size=cfg.trainer.batch_size,
        num_workers=cfg.trainer.num_workers,
        max_tokens=cfg.model.max_tokens,
        seed=cfg.seed,
        splits={"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split},
        expected_fingerprint=fingerprint,
        source_weights=[source.weight for source in sources],  # data.manifests weights reach LM training
        window_start_share=cfg.model.window_start_share,
        word_dropout=cfg.text.word_dropout,
    )
    system = build_audio_lm(cfg, cache, record["sp_model_path"], pretransform.fingerprint())
    if record.get("text_embeddings"):
        system.text.use_precomputed(record["text_embeddings"])
    if cfg.trainer.compile:  # in place: parameter names (and so checkpoints) are unchanged
        system.decoder.compile(dynamic=True)
        system.head.net.compile(dynamic=True)
    counts = system.parameter_summary()
    log("model", "trainable parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))

    captions = held_out_captions(cache, cfg, cfg.sample.num_captions)
    samples = AudioSamplesCallback(
        captions,
        render_fn(cfg, pretransform, cfg.sample.seconds, cfg.seed),
        sample_rate=pretransform.sample_rate,
        out_dir=run_dir / "samples",
        every_n_steps=cfg.sample.every_steps,
        settings=container(cfg.sample),
        cfg_scales=scales,
        picture=log_mel_picture_fn(pretransform),
    )
    callbacks: list[L.Callback] = [samples, *extra_callbacks]
    if budget_minutes > 0:
        warmup = int(cfg.optim.warmup_steps)
        callbacks.append(TimeBudget(deadline=started + 60 * budget_minutes, calibrate_steps=warmup, start_step=warmup // 5))
    if cfg.optim.ema_decay > 0:  # EMA first: the samples callback then sees the averaged weights
        callbacks.insert(0, RawKeepingEMA(
            decay=cfg.optim.ema_decay, update_starting_at_step=cfg.optim.ema_start_step, use_buffers=True
        ))
    trainer = build_trainer(
        cfg,
        run_dir,
        cfg.trainer.max_steps,
        cfg.trainer.val_every_steps,
        callbacks=callbacks,
        ckpt_every_steps=cfg.trainer.ckpt_every_steps,
    )
    log("lm", describe_batch(trainer, cfg.trainer.batch_size))
    start = time.perf_counter()
    trainer.fit(system, datamodule=datamodule, ckpt_path=record["resume"], weights_only=True)
    timings = dict(record["timings_s"], lm=time.perf_counter() - start)
    if not trainer.is_global_zero:
        return run_dir
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {"timings_s": timings, "final_metrics": metrics, "samples": str(run_dir / "samples"),
               "world_size": trainer.world_size, "steps": int(trainer.global_step)}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    log_final_hparams(trainer, cfg, metrics, timings)
    log("lm", "stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    log("lm", "final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "/" in k and "by_t" not in k))
    log("lm", f"samples with their captions: {run_dir / 'samples'}")
    return run_dir


def log_final_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, float], timings: dict[str, float]) -> None:
    """TensorBoard's HParams tab: the resolved config (flattened keys) with the run's final
    metrics as ``final/<metric>`` (validation and training metrics, stage times)."""
    if trainer.logger is None:
        return
    final = {f"final/{k}": v for k, v in metrics.items() if "/" in k and "by_t" not in k and not k.startswith("lr-")}
    final.update({f"final/time_s/{k}": float(v) for k, v in timings.items()})
    trainer.logger.log_hyperparams(container(cfg), final)
    trainer.logger.save()


def run_task(cfg: DictConfig) -> Path:
    """Dispatch on ``cfg.task``."""
    if cfg.task == "audio_lm":
        return train_audio_lm(cfg)
    if cfg.task == "mel_vae":
        return train_mel_vae(cfg)
    if cfg.task == "evaluator":
        from experiments.evaluator import train_evaluator

        return train_evaluator(cfg)
    raise ValueError(f"task must be audio_lm, mel_vae or evaluator, got {cfg.task!r}")


def load_pretransform_for(cfg: DictConfig) -> MelVAEPretransform:
    """The pretransform a trained LM's config names (never trains one)."""
    OmegaConf.set_struct(cfg, False)
    cfg = cfg.copy()
    cfg.vae.train_if_missing = False
    return load_or_train_pretransform(cfg)


def load_audio_lm(ckpt: str | Path, device: torch.device | str = "cpu") -> AudioLMSystem:
    """A trained LM from its checkpoint, in eval mode: the file is verified first and loaded
    without executing code (:mod:`lightning_modules.checkpoints`); a missing, truncated,
    corrupt or code-carrying file raises :class:`CheckpointError` naming it."""
    verify_checkpoint_file(ckpt)
    try:
        system = AudioLMSystem.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"checkpoint {ckpt} holds objects outside the allow-list; refusing to load it") from error
    return system.eval()


def check_pretransform(system: AudioLMSystem, pretransform: MelVAEPretransform) -> None:
    """Refuse to decode with a VAE other than the one the LM was trained on."""
    expected = system.hparams.get("pretransform_fingerprint")
    if expected and expected != pretransform.fingerprint():
        raise ValueError(
            f"the checkpoint was trained on latents of VAE {expected}, but the configured VAE is "
            f"{pretransform.fingerprint()} (vae.dir={system.cfg.vae.dir}, vae.pretrained_dir={system.cfg.vae.pretrained_dir})"
        )
