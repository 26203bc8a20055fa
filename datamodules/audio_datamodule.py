"""Waveform + caption batches from one or more JSONL manifests.

Batches (see `collate_clips`):
    wave          (B, S) float32, S = round(clip_seconds * sample_rate), mono
    wave_mask     (B, S) bool, True where the samples are real audio (False = zero padding)
    captions      list[str]: one caption per clip — a random one for training, the first
                  one for val/test/predict
    all_captions  list[list[str]]: every caption of each clip
    ids           list[str]
    labels        list[dict[str, str]]

Randomness (training crop offset and caption choice) never touches global RNG state: the
training sampler (`SeededClipSampler`, in the main process) draws, from a generator seeded
with (seed, epoch), the clip order and one 63-bit seed per item; the dataset seeds its
crop/caption generator with that item seed. Batches are therefore identical for any
`num_workers` and reproducible from (seed, epoch); no per-worker state is needed.

Decoding errors propagate (naming the file); a clip is never skipped or substituted.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.audio_io import WAVE_NORMALIZATIONS, audioldm_normalize, load_audio, probe_audio
from datamodules.manifest import (
    ManifestEntry,
    ManifestSource,
    parse_manifest_sources,
    per_clip_sampling_weights,
    read_manifest,
    resolve_audio_path,
)


@dataclass(frozen=True)
class ResolvedClip:
    """A manifest entry with its audio path resolved, and which source it came from."""

    entry: ManifestEntry
    audio_path: Path
    source_index: int


class ClipDataset(Dataset):
    """Fixed-length mono clips with captions.

    Training mode: keys are (index, item_seed) pairs from `SeededClipSampler`; the crop
    offset is uniform over the file and the caption is drawn at random, both from
    `np.random.default_rng(item_seed)`. Eval mode: keys are plain indices; the crop starts
    at 0 and the first caption is used. Clips shorter than `clip_samples` are zero-padded
    and their mask marks the padding. `normalize="audioldm"`: AudioLDM's mean removal and
    peak-0.5 scaling of the cropped clip before padding (`audio_io.audioldm_normalize`).
    """

    def __init__(self, clips: Sequence[ResolvedClip], sample_rate: int, clip_samples: int, train: bool,
                 normalize: str = "none"):
        if normalize not in WAVE_NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {WAVE_NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self.clips = list(clips)
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(clip_samples)
        self.train = train

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if self.train:
            if not isinstance(key, tuple):
                raise TypeError("a training ClipDataset needs (index, item_seed) keys from SeededClipSampler")
            index, item_seed = key
            rng: np.random.Generator | None = np.random.default_rng(item_seed)
        else:
            index, rng = (key[0] if isinstance(key, tuple) else key), None
        clip = self.clips[index]
        duration, _, _ = probe_audio(clip.audio_path)
        available = int(np.floor(duration * self.sample_rate))  # samples at the target rate
        offset = 0
        if rng is not None and available > self.clip_samples:
            offset = int(rng.integers(0, available - self.clip_samples + 1))
        wave = load_audio(
            clip.audio_path,
            self.sample_rate,
            mono=True,
            offset_seconds=offset / self.sample_rate,
            max_seconds=self.clip_samples / self.sample_rate,
        )[: self.clip_samples]  # (<= S,)
        if self.normalize == "audioldm":
            wave = audioldm_normalize(wave)
        length = wave.shape[0]
        padded = np.zeros(self.clip_samples, dtype=np.float32)  # (S,)
        padded[:length] = wave
        mask = np.zeros(self.clip_samples, dtype=bool)  # (S,)
        mask[:length] = True
        captions = clip.entry.captions
        caption = captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
        return {
            "wave": padded,
            "wave_mask": mask,
            "caption": caption,
            "all_captions": list(captions),
            "id": clip.entry.id,
            "labels": dict(clip.entry.labels),
            "source": clip.source_index,
        }


def collate_clips(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack `ClipDataset` items into a batch (module docstring lists the keys and shapes)."""
    return {
        "wave": torch.from_numpy(np.stack([item["wave"] for item in items])),  # (B, S) float32
        "wave_mask": torch.from_numpy(np.stack([item["wave_mask"] for item in items])),  # (B, S) bool
        "captions": [item["caption"] for item in items],
        "all_captions": [item["all_captions"] for item in items],
        "ids": [item["id"] for item in items],
        "labels": [item["labels"] for item in items],
        "sources": [item["source"] for item in items],  # index of each clip's manifest in the mixture
    }


@dataclass(frozen=True)
class TrainShard:
    """Which part of each epoch one process reads: ``num_replicas`` processes (ranks),
    ``accumulate`` micro-batches of ``batch_size`` per optimizer step.

    Read from a Lightning Trainer with :func:`train_shard_of`; the default is one process.
    """

    num_replicas: int = 1
    rank: int = 0
    batch_size: int = 1
    accumulate: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.num_replicas or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError(f"invalid training shard {self}")

    @property
    def step_size(self) -> int:
        """Clips per optimizer step over all processes: replicas × accumulate × batch."""
        return self.num_replicas * self.accumulate * self.batch_size


def train_shard_of(trainer, batch_size: int) -> TrainShard:
    """The shard a Trainer's process reads (one process when ``trainer`` is None)."""
    if trainer is None:
        return TrainShard(batch_size=batch_size)
    return TrainShard(
        num_replicas=int(trainer.world_size), rank=int(trainer.global_rank), batch_size=batch_size,
        accumulate=int(trainer.accumulate_grad_batches),
    )


def resume_position_of(trainer) -> tuple[int, int]:
    """(epoch, micro-batches this process has already trained in it) for a Trainer that
    restored a checkpoint; (0, 0) for a fresh fit or without a Trainer.

    Read from Lightning's restored loop progress when the train DataLoader is built (after
    the checkpoint is loaded, before the first batch is drawn), so the data position is
    part of every checkpoint without a second copy of it.
    """
    fit_loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
    if fit_loop is None:
        return 0, 0
    return int(fit_loop.epoch_progress.current.processed), int(fit_loop.epoch_loop.batch_progress.current.processed)


def resume_sampler(sampler: "SeededClipSampler", trainer, batch_size: int) -> "SeededClipSampler":
    """Make ``sampler``'s next pass continue a resumed epoch: the same (seed, epoch) order
    without the micro-batches already trained. At an epoch boundary nothing changes."""
    epoch, done = resume_position_of(trainer)
    if 0 < done * batch_size < len(sampler):
        sampler.resume(epoch, done * batch_size)
    return sampler


class SeededClipSampler(Sampler):
    """Training order + per-item seeds, from a generator seeded with (seed, epoch).

    One source: a permutation of all clips per epoch. Several sources: `num_samples`
    draws with replacement, clip k having weight `per_clip_sampling_weights` (each
    source's share proportional to its weight). Yields (index, item_seed) pairs.

    Several processes / gradient accumulation (``shard``): every process draws the same
    global (seed, epoch) order, cut into optimizer steps of ``shard.step_size`` clips;
    in each step, rank r reads micro-batches ``r·K … r·K + K - 1`` (K = accumulate) and
    the incomplete last step is dropped. The clips of an optimizer step and their seeds
    are therefore the same for any split of it into processes and micro-batches — a
    2-process run reads what one process with ``accumulate=2`` reads. With one process
    and no accumulation every draw is yielded (the DataLoader's ``drop_last`` decides).

    Lightning calls `set_epoch` before each epoch; without it the epoch advances by one
    per pass.
    """

    def __init__(
        self,
        clip_counts: Sequence[int],
        source_weights: Sequence[float],
        seed: int,
        num_samples: int | None = None,
        shard: TrainShard | None = None,
    ):
        self.clip_counts = list(clip_counts)
        self.total_clips = sum(self.clip_counts)
        self.weighted = len(self.clip_counts) > 1
        self.probabilities = (
            np.asarray(per_clip_sampling_weights(self.clip_counts, source_weights)) if self.weighted else None
        )
        self.num_samples = int(num_samples) if num_samples is not None else self.total_clips
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if not self.weighted and self.num_samples != self.total_clips:
            raise ValueError("samples_per_epoch can only be changed when mixing several manifests")
        self.shard = shard or TrainShard()
        self.sharded = self.shard.num_replicas * self.shard.accumulate > 1
        if self.sharded and self.num_samples < self.shard.step_size:
            s = self.shard
            raise ValueError(
                f"an epoch of {self.num_samples} training clips is shorter than one optimizer step of "
                f"{s.num_replicas} processes × {s.accumulate} accumulated batches × {s.batch_size} clips = {s.step_size}; "
                "lower the batch size, the accumulation or the number of devices"
            )
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """The next pass is epoch ``epoch`` without its first ``skip`` draws (of this shard):
        continuing an epoch interrupted after ``skip`` clips."""
        if not 0 <= skip <= len(self):
            raise ValueError(f"cannot skip {skip} of an epoch of {len(self)} clips")
        self.epoch, self._skip = int(epoch), int(skip)

    def __len__(self) -> int:
        if not self.sharded:
            return self.num_samples
        s = self.shard
        return self.num_samples // s.step_size * s.accumulate * s.batch_size

    def _global_order(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        if self.weighted:
            order = rng.choice(self.total_clips, size=self.num_samples, replace=True, p=self.probabilities)
        else:
            order = rng.permutation(self.total_clips)
        item_seeds = rng.integers(0, 2**63 - 1, size=self.num_samples, dtype=np.int64)
        return order, item_seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, item_seeds = self._global_order()
        if self.sharded:
            s = self.shard
            steps = self.num_samples // s.step_size
            per_rank = s.accumulate * s.batch_size  # consecutive clips of one rank in each step
            picked = (
                np.arange(steps)[:, None] * s.step_size + s.rank * per_rank + np.arange(per_rank)[None, :]
            ).reshape(-1)
            order, item_seeds = order[picked], item_seeds[picked]
        skip, self._skip = self._skip, 0
        return iter(zip(order[skip:].tolist(), item_seeds[skip:].tolist()))


class AudioCapsDataModule(L.LightningDataModule):
    """Audio + captions from any JSONL manifest(s): AudioCaps, WavCaps, yours, the synthetic corpus.

    Args:
        manifests: paths, (path, weight) pairs, {path, weight} dicts or `ManifestSource`s.
            Training mixes their `train_split` clips by weight; eval splits are simply
            concatenated.
        sample_rate: output rate in Hz (audio is decoded, mixed to mono, resampled).
        clip_seconds: output length; longer files are cropped (random offset for
            training, start for eval), shorter ones zero-padded (see `wave_mask`).
        batch_size: clips per batch.
        num_workers: DataLoader worker processes (batches do not depend on it).
        seed: seeds the training order, crops and caption choice.
        train_split, val_split, test_split: manifest split names; val_split None
            disables validation.
        predict_split: split of `predict_dataloader` (default: test_split).
        samples_per_epoch: training draws per epoch when mixing manifests (default: the
            number of training clips).
        drop_last: drop the last incomplete training batch.
        normalize: "none" | "audioldm" (AudioLDM's mean removal + peak 0.5 per clip, see ClipDataset).
    """

    def __init__(
        self,
        manifests: Sequence[Any] | str | os.PathLike,
        sample_rate: int = 16000,
        clip_seconds: float = 10.24,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        predict_split: str | None = None,
        samples_per_epoch: int | None = None,
        drop_last: bool = True,
        normalize: str = "none",
    ):
        super().__init__()
        if sample_rate <= 0 or clip_seconds <= 0 or batch_size <= 0 or num_workers < 0:
            raise ValueError(
                "data: sample_rate, clip_seconds and batch_size must be positive and num_workers >= 0, got "
                f"{sample_rate}, {clip_seconds}, {batch_size}, {num_workers}"
            )
        self.sources: list[ManifestSource] = parse_manifest_sources(manifests)
        self.sample_rate = int(sample_rate)
        self.clip_seconds = float(clip_seconds)
        self.clip_samples = int(round(self.clip_seconds * self.sample_rate))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.predict_split = predict_split or test_split
        self.samples_per_epoch = samples_per_epoch
        self.drop_last = drop_last
        self.normalize = normalize
        self._entries: list[list[ManifestEntry]] | None = None
        self._clips_by_split: dict[str, list[ResolvedClip]] = {}

    # ------------------------------------------------------------------ manifests

    def _source_entries(self) -> list[list[ManifestEntry]]:
        if self._entries is None:
            self._entries = [read_manifest(source.path) for source in self.sources]
        return self._entries

    def clips(self, split: str) -> list[ResolvedClip]:
        """Every clip of `split` across the manifests, in manifest order.

        Raises:
            FileNotFoundError: if any of the split's audio files is missing (lists them).
            ValueError: if two manifests share a clip id within the split.
        """
        if split in self._clips_by_split:
            return self._clips_by_split[split]
        clips: list[ResolvedClip] = []
        for source_index, (source, entries) in enumerate(zip(self.sources, self._source_entries())):
            for entry in entries:
                if entry.split == split:
                    clips.append(ResolvedClip(entry, resolve_audio_path(source.path, entry, source.allow_absolute_paths), source_index))
        missing = [f"{self.sources[c.source_index].path}: {c.entry.id} -> {c.audio_path}" for c in clips if not c.audio_path.is_file()]
        if missing:
            shown = "\n  ".join(missing[:5])
            raise FileNotFoundError(f"{len(missing)} audio file(s) of split {split!r} not found, e.g.\n  {shown}")
        first_source: dict[str, int] = {}
        for clip in clips:
            previous = first_source.setdefault(clip.entry.id, clip.source_index)
            if previous != clip.source_index:
                raise ValueError(
                    f"clip id {clip.entry.id!r} of split {split!r} appears in both {self.sources[previous].path} "
                    f"and {self.sources[clip.source_index].path}"
                )
        self._clips_by_split[split] = clips
        return clips

    def _require_clips(self, split: str) -> list[ResolvedClip]:
        clips = self.clips(split)
        if not clips:
            names = ", ".join(source.path for source in self.sources)
            raise ValueError(f"no clips with split {split!r} in manifest(s) {names}")
        return clips

    def setup(self, stage: str | None = None) -> None:
        """Read the manifests and check the files of the splits `stage` needs."""
        if stage in (None, "fit"):
            self._require_clips(self.train_split)
        if stage in (None, "fit", "validate") and self.val_split is not None:
            self._require_clips(self.val_split)
        if stage in (None, "test"):
            self._require_clips(self.test_split)
        if stage == "predict":
            self._require_clips(self.predict_split)

    # ---------------------------------------------------------------- dataloaders

    def _eval_loader(self, clips: list[ResolvedClip]) -> DataLoader:
        dataset = ClipDataset(clips, self.sample_rate, self.clip_samples, train=False, normalize=self.normalize)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
        )

    def train_dataloader(self) -> DataLoader:
        clips = self._require_clips(self.train_split)
        clip_counts = [sum(1 for c in clips if c.source_index == k) for k in range(len(self.sources))]
        used = [k for k, count in enumerate(clip_counts) if count > 0]
        for k in range(len(self.sources)):
            if k not in used:  # e.g. an eval-only manifest listed beside the training ones
                warnings.warn(
                    f"manifest {self.sources[k].path} has no clips with split {self.train_split!r}; "
                    "it takes no part in training"
                )
        sampler = SeededClipSampler(
            [clip_counts[k] for k in used],
            [self.sources[k].weight for k in used],
            seed=self.seed,
            num_samples=self.samples_per_epoch,
            shard=train_shard_of(self.trainer, self.batch_size),
        )
        resume_sampler(sampler, self.trainer, self.batch_size)
        dataset = ClipDataset(clips, self.sample_rate, self.clip_samples, train=True, normalize=self.normalize)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_split is None:
            return []
        return self._eval_loader(self._require_clips(self.val_split))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require_clips(self.test_split))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require_clips(self.predict_split))

    def split_dataloader(self, split: str, exclude_ids: Iterable[str] = ()) -> DataLoader | None:
        """An eval-mode loader (start crop, first caption, manifest order) over any split.

        Args:
            split: e.g. "test_novel".
            exclude_ids: clip ids to leave out (e.g. ones already processed).

        Returns:
            None when the split has no clips left after the exclusion.
        """
        excluded = set(exclude_ids)
        clips = [clip for clip in self.clips(split) if clip.entry.id not in excluded]
        return self._eval_loader(clips) if clips else None
