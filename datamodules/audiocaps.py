"""Build a manifest from the official AudioCaps CSVs and a folder of downloaded clips.

AudioCaps ships `train.csv`, `val.csv`, `test.csv` with columns
`audiocap_id,youtube_id,start_time,caption`; one row per caption, several rows per clip
(1 per clip in train, 5 in val/test). A clip is the group of rows sharing
(youtube_id, start_time); its manifest id is `"{youtube_id}_{start_time}"`.

The audio is not distributed with the CSVs: users download it themselves and name the
files in various ways, so the file is looked up with a list of `str.format` patterns,
relative to the audio folder, tried in order. Pattern fields:
    {youtube_id}  e.g. "--0w1YA1Hm4"
    {start_time}  as written in the CSV, e.g. "30"
    {start_time_int} / {end_time_int}  integer seconds, end = start + 10
    {split}       "train" / "val" / "test" (for per-split subfolders)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from datamodules.manifest import (
    BuildReport,
    ClipCandidate,
    ManifestError,
    build_manifest_from_candidates,
)

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
AUDIOCAPS_SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
AUDIOCAPS_CLIP_SECONDS = 10

_STEMS = ("{youtube_id}_{start_time}", "{youtube_id}_{start_time_int}_{end_time_int}", "{youtube_id}", "Y{youtube_id}")
_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
DEFAULT_AUDIOCAPS_PATTERNS: tuple[str, ...] = tuple(
    f"{folder}{stem}.{ext}" for folder in ("", "{split}/") for stem in _STEMS for ext in _EXTENSIONS
)


@dataclass
class AudioCapsClip:
    """One AudioCaps clip: the CSV rows sharing (youtube_id, start_time)."""

    split: str
    youtube_id: str
    start_time: str
    captions: list[str] = field(default_factory=list)
    audiocap_ids: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.youtube_id}_{self.start_time}"

    def pattern_fields(self) -> dict[str, str]:
        start = int(float(self.start_time))
        return {
            "youtube_id": self.youtube_id,
            "start_time": self.start_time,
            "start_time_int": str(start),
            "end_time_int": str(start + AUDIOCAPS_CLIP_SECONDS),
            "split": self.split,
        }


def _undecodable(text: str) -> bool:
    """Does ``text`` hold bytes that were not UTF-8 (read with errors="surrogateescape")?"""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_audiocaps_csv(csv_path: str | os.PathLike, split: str) -> tuple[list[AudioCapsClip], list[dict[str, str]]]:
    """Group one AudioCaps CSV's rows into clips, keeping CSV order.

    Returns:
        (clips, bad_rows): bad_rows lists rows with an empty or path-like youtube_id, an
        unparsable start_time, an empty caption or bytes that are not UTF-8, each as
        {"where": "file line N", "detail": ...}.

    Raises:
        ManifestError: if the file lacks one of the AUDIOCAPS_COLUMNS.
    """
    csv_path = Path(csv_path)
    clips: dict[tuple[str, str], AudioCapsClip] = {}
    bad_rows: list[dict[str, str]] = []
    # Undecodable bytes survive as surrogates and make their row a bad row, not a crash.
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in AUDIOCAPS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(
                f"{csv_path}: missing column(s) {missing}; expected header {','.join(AUDIOCAPS_COLUMNS)}, "
                f"got {reader.fieldnames}"
            )
        for row in reader:
            where = f"{csv_path} line {reader.line_num}"
            youtube_id = (row["youtube_id"] or "").strip()
            start_time = (row["start_time"] or "").strip()
            caption = (row["caption"] or "").strip()
            problem = None
            if any(_undecodable(value) for value in (youtube_id, start_time, caption)):
                problem = "not UTF-8 text"
            elif not youtube_id:
                problem = "empty youtube_id"
            elif "/" in youtube_id or "\\" in youtube_id or youtube_id.startswith("."):
                problem = f"youtube_id {youtube_id!r} is not a plain name (it would leave the audio folder)"
            else:
                try:
                    float(start_time)
                except ValueError:
                    problem = f"start_time {start_time!r} is not a number"
            if problem is None and not caption:
                problem = "empty caption"
            if problem is not None:
                bad_rows.append({"where": where, "detail": problem})
                continue
            key = (youtube_id, start_time)
            clip = clips.setdefault(key, AudioCapsClip(split, youtube_id, start_time))
            clip.captions.append(caption)
            clip.audiocap_ids.append((row["audiocap_id"] or "").strip())
    return list(clips.values()), bad_rows


def find_audio_file(audio_dir: Path, patterns: Sequence[str], fields: dict[str, str]) -> tuple[Path | None, list[str]]:
    """First existing `audio_dir / pattern.format(**fields)`, and the paths tried.

    Patterns naming a field not in `fields` are skipped, and so are candidates that would
    leave `audio_dir` (a field holding ``../``).
    """
    tried: list[str] = []
    root = os.path.normpath(audio_dir)
    for pattern in patterns:
        try:
            relative = pattern.format(**fields)
        except (KeyError, IndexError):
            continue
        candidate = audio_dir / relative
        if not os.path.normpath(candidate).startswith(root + os.sep):
            continue
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate, tried
    return None, tried


def build_audiocaps_manifest(
    csv_dir: str | os.PathLike,
    audio_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    patterns: Sequence[str] = DEFAULT_AUDIOCAPS_PATTERNS,
    min_duration: float = 1.0,
    silence_peak_db: float = -60.0,
    splits: Sequence[str] = ("train", "val", "test"),
    progress: bool = False,
    workers: int = 0,
) -> BuildReport:
    """Build an AudioCaps manifest + report (see `build_manifest_from_candidates`).

    Args:
        csv_dir: folder holding `<split>.csv` for each requested split.
        audio_dir: folder the clips were downloaded into (searched with `patterns`).
        out_path: the manifest to write; the report goes beside it as `*.report.json`.
        patterns: file-name patterns (module docstring) tried in order.
        min_duration: clips shorter than this (s) are reported as too_short.
        silence_peak_db: clips whose peak is below this (dBFS) are reported as silent.
        splits: which of train/val/test to include; every one must have its CSV.

    Raises:
        FileNotFoundError: for a missing folder or CSV.
        ManifestError: for a CSV with the wrong columns, or when no clip is usable.
    """
    csv_dir, audio_dir = Path(csv_dir), Path(audio_dir)
    if not csv_dir.is_dir():
        raise FileNotFoundError(f"AudioCaps csv folder not found: {csv_dir}")
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"AudioCaps audio folder not found: {audio_dir}")
    if not patterns:
        raise ValueError("at least one file-name pattern is needed")
    unknown_splits = [s for s in splits if s not in AUDIOCAPS_SPLIT_FILES]
    if unknown_splits:
        raise ValueError(f"unknown AudioCaps split(s) {unknown_splits}; choose from {list(AUDIOCAPS_SPLIT_FILES)}")

    candidates: list[ClipCandidate] = []
    bad_rows: list[dict[str, str]] = []
    for split in splits:
        csv_path = csv_dir / AUDIOCAPS_SPLIT_FILES[split]
        if not csv_path.is_file():
            raise FileNotFoundError(f"AudioCaps {split} csv not found: {csv_path}")
        clips, split_bad_rows = read_audiocaps_csv(csv_path, split)
        bad_rows.extend(split_bad_rows)
        for clip in clips:
            audio_path, tried = find_audio_file(audio_dir, patterns, clip.pattern_fields())
            candidates.append(
                ClipCandidate(id=clip.id, split=split, captions=clip.captions, audio_path=audio_path, tried_paths=tried)
            )
    settings = {
        "csv_dir": str(csv_dir),
        "audio_dir": str(audio_dir),
        "patterns": list(patterns),
        "min_duration": min_duration,
        "silence_peak_db": silence_peak_db,
        "splits": list(splits),
    }
    return build_manifest_from_candidates(
        candidates,
        out_path,
        source="audiocaps",
        min_duration=min_duration,
        silence_peak_db=silence_peak_db,
        settings=settings,
        bad_rows=bad_rows,
        progress=progress,
        workers=workers,
    )
