"""Build a manifest from WavCaps JSON metadata and a folder of its audio files.

Each WavCaps subset (FreeSound, BBC_Sound_Effects, SoundBible, AudioSet_SL) ships a JSON
file `{"data": [{"id": ..., "caption": ..., "duration": ..., ...}, ...]}`; entries may
also carry "audio" or "wav_path" (the original path), and AudioSet_SL ids include the
extension ("Y---1_cCGK4M.wav"). The file is looked up with `str.format` patterns relative
to the audio folder, tried in order. Pattern fields:
    {id}        the entry's id as written
    {stem}      the id without a trailing audio extension
    {basename}  the file name of the entry's "audio"/"wav_path" field (if present)
    {subset}    the JSON file's stem, e.g. "FreeSound" (for per-subset folders)
Manifest ids are `"{id_prefix}{stem}"`; the prefix (default: "wavcaps_<subset>_") keeps
ids unique when subsets and datasets are mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from datamodules.audiocaps import find_audio_file
from datamodules.manifest import BuildReport, ClipCandidate, ManifestError, build_manifest_from_candidates

_AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
DEFAULT_WAVCAPS_PATTERNS: tuple[str, ...] = (
    "{stem}.flac",
    "{stem}.wav",
    "{id}",
    "{basename}",
    "{subset}/{stem}.flac",
    "{subset}/{stem}.wav",
    "{stem}.mp3",
)


def _stem_of(clip_id: str) -> str:
    for extension in _AUDIO_EXTENSIONS:
        if clip_id.lower().endswith(extension):
            return clip_id[: -len(extension)]
    return clip_id


def read_wavcaps_json(json_path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The usable entries of a WavCaps JSON and the malformed ones.

    Returns:
        (entries, bad_rows): entries are dicts with string "id" and non-empty "caption";
        bad_rows lists the others as {"where": "file data[i]", "detail": ...}.

    Raises:
        ManifestError: if the file is not JSON or has no "data" list.
    """
    json_path = Path(json_path)
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{json_path}: invalid JSON ({error.msg} at line {error.lineno})") from error
    except UnicodeDecodeError as error:
        raise ManifestError(f"{json_path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ManifestError(f"{json_path}: expected an object with a \"data\" list (WavCaps metadata format)")
    entries, bad_rows = [], []
    for index, item in enumerate(document["data"]):
        where = f"{json_path} data[{index}]"
        if not isinstance(item, dict):
            bad_rows.append({"where": where, "detail": "entry is not an object"})
            continue
        clip_id = item.get("id")
        caption = item.get("caption")
        if isinstance(clip_id, (int, float)) and not isinstance(clip_id, bool):
            clip_id = str(clip_id)
        if not isinstance(clip_id, str) or not clip_id.strip():
            bad_rows.append({"where": where, "detail": f"field 'id' missing or empty: {clip_id!r}"})
            continue
        if not isinstance(caption, str) or not caption.strip():
            bad_rows.append({"where": where, "detail": f"field 'caption' missing or empty: {caption!r}"})
            continue
        if "/" in clip_id or "\\" in clip_id or clip_id.strip().startswith("."):
            bad_rows.append({"where": where, "detail": f"id {clip_id!r} is not a plain name (it would leave the audio folder)"})
            continue
        entries.append({**item, "id": clip_id.strip(), "caption": caption.strip()})
    return entries, bad_rows


def youtube_id_of(wavcaps_id: str) -> str:
    """The YouTube id inside an AudioSet_SL id: ``"Y---1_cCGK4M.wav"`` -> ``"---1_cCGK4M"``."""
    stem = _stem_of(wavcaps_id)
    return stem[1:] if stem.startswith("Y") and len(stem) == 12 else stem


def audiocaps_youtube_ids(csv_paths: Sequence[str | os.PathLike]) -> set[str]:
    """The YouTube ids of the clips in AudioCaps CSVs (e.g. ``test.csv``, ``val.csv``)."""
    from datamodules.audiocaps import read_audiocaps_csv

    ids: set[str] = set()
    for path in csv_paths:
        clips, _ = read_audiocaps_csv(path, Path(path).stem)
        ids.update(clip.youtube_id for clip in clips)
    return ids


def build_wavcaps_manifest(
    json_path: str | os.PathLike,
    audio_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    patterns: Sequence[str] = DEFAULT_WAVCAPS_PATTERNS,
    split: str = "train",
    id_prefix: str | None = None,
    exclude_youtube_ids: Sequence[str] | set[str] = (),
    min_duration: float = 1.0,
    silence_peak_db: float = -60.0,
    progress: bool = False,
    workers: int = 0,
) -> BuildReport:
    """Build a WavCaps-subset manifest + report (see `build_manifest_from_candidates`).

    Args:
        json_path: the subset's metadata JSON.
        audio_dir: folder holding the subset's audio (searched with `patterns`).
        out_path: the manifest to write; the report goes beside it as `*.report.json`.
        patterns: file-name patterns (module docstring) tried in order.
        split: the split given to every clip (WavCaps is training data).
        id_prefix: prepended to each id; None -> "wavcaps_<json stem>_".
        exclude_youtube_ids: clips to leave out by YouTube id — the AudioCaps test (and val)
            clips, which WavCaps' AudioSet_SL subset also holds (the known leak; see
            :func:`audiocaps_youtube_ids`). Each one left out is listed in the report's bad rows.
        min_duration, silence_peak_db: as in `build_audiocaps_manifest`.
    """
    json_path, audio_dir = Path(json_path), Path(audio_dir)
    if not json_path.is_file():
        raise FileNotFoundError(f"WavCaps json not found: {json_path}")
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"WavCaps audio folder not found: {audio_dir}")
    if not patterns:
        raise ValueError("at least one file-name pattern is needed")
    subset = json_path.stem
    prefix = f"wavcaps_{subset}_" if id_prefix is None else id_prefix
    entries, bad_rows = read_wavcaps_json(json_path)
    excluded = set(exclude_youtube_ids)
    candidates = []
    for item in entries:
        if excluded and youtube_id_of(item["id"]) in excluded:
            bad_rows.append({"where": str(item["id"]), "detail": "an AudioCaps evaluation clip (left out: test-set leak)"})
            continue
        fields = {"id": item["id"], "stem": _stem_of(item["id"]), "subset": subset}
        original_path = item.get("audio") or item.get("wav_path")
        if isinstance(original_path, str) and original_path:
            fields["basename"] = PurePosixPath(original_path.replace("\\", "/")).name
        audio_path, tried = find_audio_file(audio_dir, patterns, fields)
        candidates.append(
            ClipCandidate(
                id=f"{prefix}{fields['stem']}",
                split=split,
                captions=[item["caption"]],
                audio_path=audio_path,
                tried_paths=tried,
            )
        )
    settings = {
        "json": str(json_path),
        "audio_dir": str(audio_dir),
        "patterns": list(patterns),
        "split": split,
        "id_prefix": prefix,
        "excluded_youtube_ids": len(excluded),
        "min_duration": min_duration,
        "silence_peak_db": silence_peak_db,
    }
    return build_manifest_from_candidates(
        candidates,
        out_path,
        source=f"wavcaps:{subset}",
        min_duration=min_duration,
        silence_peak_db=silence_peak_db,
        settings=settings,
        bad_rows=bad_rows,
        progress=progress,
        workers=workers,
    )
