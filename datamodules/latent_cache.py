"""The latent cache: pre-encoded VAE posteriors on disk, and the DataModule that reads them.

No model code here: the caller encodes audio with the pretransform and feeds the
writer (``experiments/`` owns that loop). Layout of ``cache_dir``::

    index.json        format version, fingerprint (what built the cache), dtype, token_dim,
                      finished shards with their clip ids, ``complete`` flag
    shard_00000.pt    torch.save dict of lists, one entry per clip:
                        ids [str], mean [(N_i, D)], std [(N_i, D)] (dtype float16|float32),
                        captions [[str]], labels [any JSON-like], split [str],
                        source [int] (which manifest of the mixture; absent in older caches: 0)
                      N_i = valid tokens of the clip (padding is never stored)
    stats.json        per-token-dim mean/std ``(D,)`` over the valid tokens of the
                      ``stats_split`` (train) clips only, written by ``finalize()``

Every file is written to a temporary name and ``os.replace``-d, shard first, then the
index, so an interrupted run leaves a consistent cache; the clips still buffered in
memory are simply encoded again on resume. Stats are those of posterior *samples*:
``mean_d = E[μ_d]``, ``std_d = sqrt(Var[μ_d] + E[σ_d²])``.

Caller side (sketch of ``experiments/cache.py``)::

    writer = LatentCacheWriter(cache_dir, fingerprint={"vae": pretransform.fingerprint(), "data": data_hash},
                               shard_size=256, dtype="float16")
    todo = set(writer.pending([clip.id for clip in clips]))
    for batch in audio_loader_over(todo):                       # datamodules: wave, wave_mask, captions, ids, labels, split
        mean, std, token_mask = pretransform.encode_moments(batch["wave"], batch["wave_mask"])
        for i, clip_id in enumerate(batch["ids"]):
            writer.add(clip_id, mean[i], std[i], token_mask[i], batch["captions"][i], batch["labels"][i], batch["split"][i])
    writer.finalize()                                           # last shard + stats.json

Reading: ``LatentDataModule(cache_dir, batch_size, ...)`` -> batches with
``tokens (B, N, D)`` float32 normalised, ``token_mask (B, N)``, ``captions``, ``ids``, ``labels``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic import torch_save_atomic, write_json_atomic
from datamodules.audio_datamodule import SeededClipSampler, resume_sampler, train_shard_of

CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
STATS_NAME = "stats.json"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CacheMismatchError(ValueError):
    """The cache on disk was built with something else than what the caller expects."""


def describe_fingerprint_difference(cached: dict | str, expected: dict | str) -> str:
    """Human-readable difference between two fingerprints (dicts are compared key by key)."""
    if isinstance(cached, dict) and isinstance(expected, dict):
        lines = []
        for key in sorted(set(cached) | set(expected), key=str):
            if cached.get(key, "<absent>") != expected.get(key, "<absent>"):
                lines.append(f"{key}: cache has {cached.get(key, '<absent>')!r}, expected {expected.get(key, '<absent>')!r}")
        return "; ".join(lines)
    return f"cache has {cached!r}, expected {expected!r}"


def _check_fingerprint(cache_dir: Path, cached: dict | str, expected: dict | str) -> None:
    if cached != expected:
        raise CacheMismatchError(
            f"latent cache {cache_dir} was built with a different VAE/config ({describe_fingerprint_difference(cached, expected)}). "
            f"Delete {cache_dir} or point cache.dir at a new folder to rebuild it."
        )


def _load_index(cache_dir: Path) -> dict:
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX_NAME} in {cache_dir}: not a latent cache (build it with the cache step)")
    index = json.loads(path.read_text())
    if index.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path}: cache format_version {index.get('format_version')}, this code reads {CACHE_FORMAT_VERSION}; rebuild the cache"
        )
    return index


def _json_roundtrip(value: Any) -> Any:
    """Normalise tuples etc. so a fingerprint compares equal to its JSON-loaded self."""
    return json.loads(json.dumps(value))


class LatentCacheWriter:
    """Appends encoded clips to ``cache_dir`` in shards of ``shard_size``; resumable.

    Args:
        cache_dir: created if absent; if it holds a cache, that cache is resumed.
        fingerprint: identifies the VAE + data + config (e.g. ``{"vae": pretransform.fingerprint(), ...}``).
            A cache with another fingerprint or dtype is refused (:class:`CacheMismatchError`).
        shard_size: clips per shard file.
        dtype: ``"float16"`` or ``"float32"`` for mean/std.
        stats_split: the split whose clips define ``stats.json``.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: dict | str, shard_size: int = 256, dtype: str = "float16", stats_split: str = "train") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.cache_dir = Path(cache_dir)
        self.shard_size = shard_size
        self.dtype = dtype
        self.fingerprint = _json_roundtrip(fingerprint)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if (self.cache_dir / INDEX_NAME).is_file():
            self.index = _load_index(self.cache_dir)
            _check_fingerprint(self.cache_dir, self.index["fingerprint"], self.fingerprint)
            if self.index["dtype"] != dtype or self.index["stats_split"] != stats_split:
                raise CacheMismatchError(
                    f"latent cache {self.cache_dir} has dtype {self.index['dtype']!r} / stats_split {self.index['stats_split']!r}, "
                    f"asked for {dtype!r} / {stats_split!r}. Delete {self.cache_dir} or use a new cache.dir to rebuild it."
                )
        else:
            self.index = dict(
                format_version=CACHE_FORMAT_VERSION, fingerprint=self.fingerprint, dtype=dtype, stats_split=stats_split,
                token_dim=None, shards=[], complete=False,
            )
            self._write_index()
        self._finished_ids = {clip_id for shard in self.index["shards"] for clip_id in shard["ids"]}
        self._buffer: list[dict] = []

    # ----------------------------------------------------------------- public
    def pending(self, all_clip_ids: Iterable[str]) -> list[str]:
        """The ids (in the given order) not yet in a finished shard."""
        return [clip_id for clip_id in all_clip_ids if clip_id not in self._finished_ids]

    @property
    def num_finished(self) -> int:
        return len(self._finished_ids)

    def add(
        self, clip_id: str, mean: torch.Tensor, std: torch.Tensor, token_mask: torch.Tensor | None, captions: Sequence[str],
        labels: Any = None, split: str = "train", source: int = 0,
    ) -> None:
        """Buffer one clip; writes a shard when ``shard_size`` clips are buffered.

        Args:
            mean, std: ``(N, D)`` un-normalised posterior moments.
            token_mask: ``(N,)`` bool, valid tokens first then padding (None: all valid).
                Only the valid prefix is stored.
            captions: one or more captions; labels: JSON-like (list of str, dict, None).
            source: index of the clip's manifest in the training mixture (its sampling weight).
        """
        clip_id = str(clip_id)
        if clip_id in self._finished_ids or any(record["id"] == clip_id for record in self._buffer):
            raise ValueError(f"clip {clip_id!r} is already in the cache {self.cache_dir}; use writer.pending(ids) to skip it")
        if mean.dim() != 2 or mean.shape != std.shape:
            raise ValueError(f"clip {clip_id!r}: mean/std must both be (N, D), got {tuple(mean.shape)} / {tuple(std.shape)}")
        length = mean.shape[0]
        if token_mask is not None:
            token_mask = token_mask.bool().cpu()
            length = int(token_mask.sum())
            if not bool(token_mask[:length].all()):
                raise ValueError(f"clip {clip_id!r}: token_mask must be valid tokens followed by padding")
        if length == 0:
            raise ValueError(f"clip {clip_id!r} has no valid tokens")
        token_dim = int(mean.shape[1])
        if self.index["token_dim"] is None:
            self.index["token_dim"] = token_dim
        elif self.index["token_dim"] != token_dim:
            raise CacheMismatchError(f"clip {clip_id!r}: token_dim {token_dim}, cache {self.cache_dir} holds {self.index['token_dim']}")
        if isinstance(captions, str):
            captions = [captions]
        dtype = _DTYPES[self.dtype]
        self._buffer.append(dict(
            id=clip_id, mean=mean[:length].detach().to("cpu", dtype).clone(), std=std[:length].detach().to("cpu", dtype).clone(),
            captions=[str(c) for c in captions], labels=_json_roundtrip(labels), split=str(split), source=int(source),
        ))
        self.index["complete"] = False
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered clips as a shard, then the index (both atomically)."""
        if not self._buffer:
            return
        name = f"shard_{len(self.index['shards']):05d}.pt"
        torch_save_atomic(self.cache_dir / name, {key: [record[key] for record in self._buffer] for key in ("id", "mean", "std", "captions", "labels", "split", "source")})
        ids = [record["id"] for record in self._buffer]
        splits: dict[str, int] = {}
        for record in self._buffer:
            splits[record["split"]] = splits.get(record["split"], 0) + 1
        self.index["shards"].append(dict(file=name, ids=ids, splits=splits))
        self._write_index()
        self._finished_ids.update(ids)
        self._buffer = []

    def refresh_metadata(self, metadata: dict[str, tuple[Sequence[str], Any]]) -> int:
        """Bring the captions and labels stored with finished clips up to date with their
        manifest, without encoding again: a manifest whose captions were edited (or a corpus
        regenerated with other captions) leaves the latents valid and the text stale.

        Args:
            metadata: clip id -> (captions, labels) as the manifest has them now; clips
                absent from it are left as they are.

        Returns:
            The number of clips whose captions or labels changed (their shards rewritten atomically).
        """
        changed = 0
        for shard in self.index["shards"]:
            if not any(clip_id in metadata for clip_id in shard["ids"]):
                continue
            path = self.cache_dir / shard["file"]
            data = torch.load(path, weights_only=True)
            dirty = 0
            for i, clip_id in enumerate(data["id"]):
                if clip_id not in metadata:
                    continue
                captions, labels = [str(c) for c in metadata[clip_id][0]], _json_roundtrip(metadata[clip_id][1])
                if data["captions"][i] != captions or data["labels"][i] != labels:
                    data["captions"][i], data["labels"][i] = captions, labels
                    dirty += 1
            if dirty:
                torch_save_atomic(path, data)
                changed += dirty
        return changed

    def finalize(self) -> dict:
        """Flush, compute ``stats.json`` from the ``stats_split`` clips, mark the cache complete.

        Returns the stats dict. Raises ``ValueError`` if no clip of ``stats_split`` exists.
        """
        self.flush()
        stats = self._compute_stats()
        write_json_atomic(self.cache_dir / STATS_NAME, stats, indent=1)
        self.index["complete"] = True
        self._write_index()
        return stats

    def __enter__(self) -> "LatentCacheWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.flush()  # buffered clips are complete: keep them for the resume

    # ----------------------------------------------------------------- internals
    def _write_index(self) -> None:
        write_json_atomic(self.cache_dir / INDEX_NAME, self.index, indent=1)

    def _compute_stats(self) -> dict:
        split = self.index["stats_split"]
        token_dim = self.index["token_dim"]
        total = total_sq = total_var = None
        n_tokens = n_clips = 0
        for shard in self.index["shards"]:
            if not shard["splits"].get(split):
                continue
            data = torch.load(self.cache_dir / shard["file"], weights_only=True)
            for mean, std, clip_split in zip(data["mean"], data["std"], data["split"]):
                if clip_split != split:
                    continue
                mean, std = mean.double(), std.double()
                if total is None:
                    total, total_sq, total_var = (torch.zeros(token_dim, dtype=torch.float64) for _ in range(3))
                total += mean.sum(0)
                total_sq += mean.pow(2).sum(0)
                total_var += std.pow(2).sum(0)
                n_tokens += mean.shape[0]
                n_clips += 1
        if n_clips == 0:
            raise ValueError(f"latent cache {self.cache_dir}: no clips of split {split!r}; stats need the training clips")
        mu = total / n_tokens
        var = (total_sq / n_tokens - mu.pow(2)).clamp(min=0) + total_var / n_tokens
        return dict(split=split, n_clips=n_clips, n_tokens=n_tokens, mean=mu.tolist(), std=var.clamp(min=1e-12).sqrt().tolist(),
                    fingerprint=self.fingerprint)


class LatentCache:
    """Read-only view of a finished cache; opens all shards on first use.

    The shards are memory-mapped (``torch.load(mmap=True)``): the latents stay in the OS
    page cache, shared by every rank and DataLoader worker on a node, instead of one private
    copy per process (2 × clips × tokens × D × bytes: AudioCaps + WavCaps ≈ 90M tokens × 128
    as fp16 mean + std ≈ 46 GB — per rank without the mapping).

    Args:
        expected_fingerprint: if given, a cache built with another one is refused.
        mmap: memory-map the shards (False: read them into private memory).
    """

    def __init__(self, cache_dir: str | Path, expected_fingerprint: dict | str | None = None, mmap: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.mmap = mmap
        self.index = _load_index(self.cache_dir)
        if expected_fingerprint is not None:
            _check_fingerprint(self.cache_dir, self.index["fingerprint"], _json_roundtrip(expected_fingerprint))
        if not self.index.get("complete") or not (self.cache_dir / STATS_NAME).is_file():
            raise RuntimeError(
                f"latent cache {self.cache_dir} is incomplete ({len(self.index['shards'])} shards written, no finalize): "
                "run the cache step again; it resumes where it stopped"
            )
        stats = json.loads((self.cache_dir / STATS_NAME).read_text())
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32)  # (D,)
        self.std = torch.tensor(stats["std"], dtype=torch.float32)  # (D,)
        self.stats = stats
        self._records: dict[str, list[dict]] | None = None

    @property
    def fingerprint(self) -> dict | str:
        return self.index["fingerprint"]

    @property
    def token_dim(self) -> int:
        return int(self.index["token_dim"])

    @property
    def splits(self) -> list[str]:
        return sorted({split for shard in self.index["shards"] for split in shard["splits"]})

    def records(self, split: str) -> list[dict]:
        """Clips of ``split`` in cache order: dicts with id, mean, std, captions, labels, split."""
        if self._records is None:
            grouped: dict[str, list[dict]] = {}
            for shard in self.index["shards"]:
                path = self.cache_dir / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"latent cache shard missing: {path} (listed in {self.cache_dir / INDEX_NAME}); rebuild the cache")
                data = torch.load(path, weights_only=True, mmap=self.mmap)
                for i, clip_id in enumerate(data["id"]):
                    record = {key: data[key][i] for key in ("mean", "std", "captions", "labels", "split")}
                    record["id"] = clip_id
                    record["source"] = int(data["source"][i]) if "source" in data else 0
                    grouped.setdefault(record["split"], []).append(record)
            self._records = grouped
        if split not in self._records:
            raise KeyError(f"latent cache {self.cache_dir} has no clips of split {split!r}; it has {self.splits}")
        return self._records[split]

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw latent tokens ``(..., D)`` -> normalised with the train stats."""
        return (tokens - self.mean) / self.std

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(..., D)`` -> raw latents (then ``pretransform.decode(raw, normalized=False)``)."""
        return tokens * self.std.to(tokens.device) + self.mean.to(tokens.device)


class LatentDataset(Dataset):
    """One clip of a cache split per item, MAR-style: re-sampled from (mean, std) at each access.

    Args:
        split: cache split name.
        sample_posterior: draw ``mean + std * ε`` (else the mean).
        train: random crop + random caption (else crop from the start + first caption,
            deterministic per index). Defaults to ``split == "train"``.
        max_tokens: crop longer clips to this, pad shorter ones (``token_mask`` False);
            None: no crop/pad (the collate pads to the longest clip).
        window_start_share: train only: the share of items whose window begins 1 to n // 2
            tokens after the crop's start (n: the crop's length; the rest is padding) — what a
            long-form window refill shows the decoder: position 0 in the middle of a sound.
            0: every window starts at the crop's start (and nothing extra is drawn).
        word_dropout: train only: each word of the drawn caption is left out with this
            probability (at least one word stays; :func:`drop_words`). 0: captions as written
            (and nothing extra is drawn).

    Item: ``tokens (N, D)`` float32 normalised, ``token_mask (N,)`` bool, ``caption`` str,
    ``id`` str, ``labels``, ``mid_start`` bool (the window begins late, ``window_start_share``).
    """

    def __init__(self, cache: LatentCache, split: str, sample_posterior: bool = True, seed: int = 0, max_tokens: int | None = None,
                 train: bool | None = None, window_start_share: float = 0.0, word_dropout: float = 0.0) -> None:
        if not 0.0 <= window_start_share <= 1.0:
            raise ValueError(f"window_start_share must be in [0, 1], got {window_start_share}")
        if not 0.0 <= word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {word_dropout}")
        self.cache = cache
        self.split = split
        # grouped by manifest (stable): a weighted sampler's clip k of source s is then
        # record sum(counts[:s]) + k
        self.records = sorted(cache.records(split), key=lambda r: r["source"])
        self.source_counts = [sum(1 for r in self.records if r["source"] == s)
                              for s in range(max((r["source"] for r in self.records), default=0) + 1)]
        self.sample_posterior = sample_posterior
        self.seed = seed
        self.max_tokens = max_tokens
        self.train = split == "train" if train is None else train
        self.window_start_share = window_start_share
        self.word_dropout = word_dropout

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index (eval: the same draw every time), or ``(index, item_seed)`` from
        :class:`SeededClipSampler` (train: crop, posterior noise and caption follow the seed,
        so a resumed run draws exactly what an uninterrupted one would)."""
        if isinstance(key, tuple):
            index, item_seed = key
        elif self.train:
            raise TypeError("a training LatentDataset needs (index, item_seed) keys from SeededClipSampler")
        else:
            index, item_seed = key, self.seed * 1_000_003 + key
        record = self.records[index]
        rng = torch.Generator(device="cpu").manual_seed(int(item_seed) % (2**63))  # data pipeline: host
        mean, std = record["mean"].float(), record["std"].float()  # (N, D)
        length = mean.shape[0]
        start = 0
        if self.max_tokens is not None and length > self.max_tokens:
            if self.train:
                start = int(torch.randint(0, length - self.max_tokens + 1, (1,), generator=rng))
            mean, std = mean[start : start + self.max_tokens], std[start : start + self.max_tokens]
        mid_start = False
        if self.train and self.window_start_share > 0 and mean.shape[0] >= 2:
            if float(torch.rand((), generator=rng)) < self.window_start_share:
                late = int(torch.randint(1, mean.shape[0] // 2 + 1, (1,), generator=rng))
                mean, std, mid_start = mean[late:], std[late:], True
        tokens = mean + std * torch.randn(mean.shape, generator=rng) if self.sample_posterior else mean
        tokens = self.cache.normalize(tokens)
        token_mask = torch.ones(tokens.shape[0], dtype=torch.bool)
        if self.max_tokens is not None and tokens.shape[0] < self.max_tokens:
            pad = self.max_tokens - tokens.shape[0]
            tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
            token_mask = torch.cat([token_mask, token_mask.new_zeros(pad)])
        captions = record["captions"]
        caption = captions[int(torch.randint(0, len(captions), (1,), generator=rng))] if self.train else captions[0]
        if self.train and self.word_dropout > 0:
            caption = drop_words(caption, self.word_dropout, rng)
        return dict(tokens=tokens, token_mask=token_mask, caption=caption, id=record["id"], labels=record["labels"],
                    mid_start=mid_start)


def drop_words(caption: str, probability: float, generator: torch.Generator) -> str:
    """``caption`` with each whitespace-separated word left out with ``probability`` (at
    least one word stays: when all would go, one of them at random is kept). Word dropout
    shows the model partial captions — "a low buzz", "... slowly dying out" — so that each
    word has to carry its own meaning, whatever the others say."""
    words = caption.split()
    if not words:
        return caption
    keep = torch.rand(len(words), generator=generator) >= probability
    if not bool(keep.any()):
        keep[int(torch.randint(0, len(words), (1,), generator=generator))] = True
    return " ".join(word for word, kept in zip(words, keep.tolist()) if kept)


def collate_latents(items: list[dict]) -> dict:
    """Items -> ``tokens (B, N, D)``, ``token_mask (B, N)`` (padded to the longest), ``lengths``
    (list of B ints: valid tokens per clip — a list, so it stays on the host when the batch
    moves to an accelerator and the training step can plan shapes without a sync),
    ``captions``, ``ids``, ``labels``, ``mid_start (B,)`` bool (windows begun mid-clip)."""
    longest = max(item["tokens"].shape[0] for item in items)
    token_dim = items[0]["tokens"].shape[1]
    tokens = torch.zeros(len(items), longest, token_dim)
    token_mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, item in enumerate(items):
        n = item["tokens"].shape[0]
        tokens[row, :n] = item["tokens"]
        token_mask[row, :n] = item["token_mask"]
    return dict(
        tokens=tokens, token_mask=token_mask, lengths=[int(item["token_mask"].sum()) for item in items],
        captions=[item["caption"] for item in items],
        ids=[item["id"] for item in items], labels=[item["labels"] for item in items],
        mid_start=torch.tensor([bool(item.get("mid_start", False)) for item in items]),
    )


class LatentDataModule(L.LightningDataModule):
    """Batches of cached latents for the LM.

    Args:
        cache_dir: a finished cache.
        splits: stage -> cache split name; stages ``train``, ``val``, ``test`` (a missing
            entry or a split absent from the cache means no loader for that stage).
        max_tokens: crop/pad length (256 = 10.24 s at 25 tokens/s).
        expected_fingerprint: refuse a cache built with another VAE/config.
        sample_posterior: re-sample train tokens from the posterior (eval always uses the mean).
        source_weights: sampling weight of each manifest of the mixture (``data.manifests``
            weights); with several, training draws clips with replacement so that each
            manifest's share follows its weight, as the audio datamodule does.
        window_start_share: training windows that begin inside the clip (``LatentDataset``).
        word_dropout: training captions' word dropout (``LatentDataset``).
    """

    def __init__(
        self, cache_dir: str | Path, batch_size: int = 32, num_workers: int = 0, max_tokens: int | None = 256, seed: int = 0,
        splits: dict[str, str] | None = None, expected_fingerprint: dict | str | None = None, sample_posterior: bool = True,
        drop_last: bool = True, source_weights: Sequence[float] | None = None, window_start_share: float = 0.0,
        word_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.source_weights = list(source_weights) if source_weights else None
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_tokens = max_tokens
        self.seed = seed
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        self.expected_fingerprint = expected_fingerprint
        self.sample_posterior = sample_posterior
        self.drop_last = drop_last
        self.window_start_share = window_start_share
        self.word_dropout = word_dropout
        self.cache: LatentCache | None = None
        self.datasets: dict[str, LatentDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = LatentCache(self.cache_dir, self.expected_fingerprint)
        for stage_name, split in self.splits.items():
            if stage_name in self.datasets or split not in self.cache.splits:
                continue
            is_train = stage_name == "train"
            self.datasets[stage_name] = LatentDataset(
                self.cache, split, sample_posterior=self.sample_posterior and is_train, seed=self.seed,
                max_tokens=self.max_tokens, train=is_train, window_start_share=self.window_start_share if is_train else 0.0,
                word_dropout=self.word_dropout if is_train else 0.0,
            )

    @property
    def token_dim(self) -> int:
        if self.cache is None:
            self.setup()
        return self.cache.token_dim

    def _loader(self, stage: str) -> DataLoader:
        if self.cache is None:
            self.setup()
        if stage not in self.datasets:
            raise KeyError(
                f"no {stage!r} data: splits mapping {self.splits}, cache {self.cache_dir} has splits {self.cache.splits}"
            )
        is_train = stage == "train"
        dataset = self.datasets[stage]
        # Training order and per-item seeds come from (seed, epoch): batches do not depend on
        # num_workers, and a resumed run continues the interrupted epoch where it stopped. Under DDP each rank
        # reads its shard of every optimizer step (SeededClipSampler); validation is not
        # sharded: every rank scores the whole (small) split, so val numbers do not depend on
        # the number of devices.
        sampler = None
        if is_train:
            counts, weights = [len(dataset)], [1.0]
            if self.source_weights and len(self.source_weights) > 1:
                counts = dataset.source_counts + [0] * (len(self.source_weights) - len(dataset.source_counts))
                used = [k for k, n in enumerate(counts) if n > 0]
                counts, weights = [counts[k] for k in used], [self.source_weights[k] for k in used]
            sampler = SeededClipSampler(counts, weights, seed=self.seed, num_samples=len(dataset),
                                        shard=train_shard_of(self.trainer, self.batch_size))
            resume_sampler(sampler, self.trainer, self.batch_size)  # a resumed run continues mid-epoch
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=is_train and self.drop_last,
            num_workers=self.num_workers, collate_fn=collate_latents, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
