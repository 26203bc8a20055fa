"""JSONL manifest: the one documented format for (audio, caption) data.

One JSON object per line, one line per clip::

    {"id": "ac_91139", "path": "audio/ac_91139.wav", "captions": ["a dog barks", ...],
     "duration": 10.0, "sample_rate": 32000, "split": "train",
     "labels": {"source": "dog"}}

Fields
    id          str, unique within the manifest.
    path        str; a relative path is resolved against the manifest file's folder.
    captions    non-empty list of non-empty str (several paraphrases allowed).
    duration    float, seconds (as probed from the file; > 0).
    sample_rate int, the file's native rate (> 0); loaders resample as needed.
    split       str, e.g. "train", "val", "test", "test_novel".
    labels      optional dict[str, str] of attribute labels (synthetic corpus, tags).

Several manifests can be mixed for training with per-source weights
(`ManifestSource` + `per_clip_sampling_weights`), for a `WeightedRandomSampler`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from datamodules.atomic import write_text_atomic

REQUIRED_FIELDS = ("id", "path", "captions", "duration", "sample_rate", "split")
OPTIONAL_FIELDS = ("labels",)


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file, line and field."""


class NoUsableClipsError(ManifestError):
    """A manifest build found no usable clip (its report says why for each one)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One clip of a manifest (see the module docstring for field meanings)."""

    id: str
    path: str
    captions: list[str]
    duration: float
    sample_rate: int
    split: str
    labels: dict[str, str] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object written on this entry's manifest line (labels omitted if empty)."""
        record = dataclasses.asdict(self)
        if not record["labels"]:
            del record["labels"]
        return record


def _field_error(where: str, name: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: field '{name}' {problem}")


def entry_from_dict(record: Any, where: str) -> ManifestEntry:
    """Validate one decoded JSON object and build a `ManifestEntry`.

    Args:
        record: the decoded JSON value of one line.
        where: a location string for error messages, e.g. "manifest.jsonl line 3".

    Raises:
        ManifestError: naming `where` and the offending field.
    """
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise _field_error(where, name, "is missing")
    unknown = set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")

    clip_id, path, split = record["id"], record["path"], record["split"]
    for name, value in (("id", clip_id), ("path", path), ("split", split)):
        if not isinstance(value, str) or not value:
            raise _field_error(where, name, f"must be a non-empty string, got {value!r}")

    captions = record["captions"]
    if not isinstance(captions, list) or not captions:
        raise _field_error(where, "captions", f"must be a non-empty list of strings, got {captions!r}")
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            raise _field_error(where, "captions", f"contains an empty or non-string caption {caption!r}")

    duration = record["duration"]
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise _field_error(where, "duration", f"must be a positive number of seconds, got {duration!r}")

    sample_rate = record["sample_rate"]
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise _field_error(where, "sample_rate", f"must be a positive integer, got {sample_rate!r}")

    labels = record.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise _field_error(where, "labels", f"must be an object of string -> string, got {labels!r}")

    return ManifestEntry(
        id=clip_id,
        path=path,
        captions=list(captions),
        duration=float(duration),
        sample_rate=sample_rate,
        split=split,
        labels=dict(labels),
    )


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Read and validate a JSONL manifest. Blank lines are allowed and skipped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ManifestError: on bad JSON, a missing/invalid field or a duplicate id, naming the
            file, the 1-based line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    entries: list[ManifestEntry] = []
    first_line_of_id: dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{where}: invalid JSON ({error.msg})") from error
            entry = entry_from_dict(record, where)
            if entry.id in first_line_of_id:
                raise _field_error(
                    where, "id", f"duplicates id {entry.id!r} of line {first_line_of_id[entry.id]}"
                )
            first_line_of_id[entry.id] = line_number
            entries.append(entry)
    return entries


def write_manifest(path: str | os.PathLike, entries: Iterable[ManifestEntry]) -> None:
    """Validate all entries (unique ids, valid fields) then write the JSONL file atomically.

    Nothing is written if any entry is invalid: an existing manifest stays untouched.
    """
    lines = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        record = entry.to_json_dict()
        entry_from_dict(record, f"{path} entry {index}")  # same checks as reading
        if entry.id in seen:
            raise _field_error(f"{path} entry {index}", "id", f"duplicates id {entry.id!r}")
        seen.add(entry.id)
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def resolve_audio_path(manifest_path: str | os.PathLike, entry: ManifestEntry, allow_absolute: bool = False) -> Path:
    """The audio file of `entry`, relative to the manifest's folder (its dataset root).

    A relative path may not leave that folder (``../`` beyond it is refused; symlinks
    inside it, e.g. ``audio -> /mnt/audiocaps``, are followed as usual). An absolute path
    is accepted only with ``allow_absolute`` (``data.allow_absolute_paths``), so a manifest
    from elsewhere cannot point the loaders at arbitrary files.

    Raises:
        ManifestError: naming the manifest, the clip id and the path.
    """
    root = Path(manifest_path).resolve().parent
    audio_path = Path(entry.path)
    if audio_path.is_absolute() or entry.path.startswith("~"):
        if not allow_absolute:
            raise ManifestError(
                f"{manifest_path}: clip {entry.id!r} has the absolute path {entry.path!r}; manifests read audio below "
                f"their own folder ({root}) unless absolute paths are allowed: data.allow_absolute_paths=true"
            )
        return audio_path.expanduser()
    inside = Path(os.path.normpath(root / audio_path))
    if inside != root and root not in inside.parents:
        raise ManifestError(
            f"{manifest_path}: clip {entry.id!r} path {entry.path!r} leaves the manifest's folder {root}; "
            "keep audio below it (a symlink there works) or write absolute paths and set data.allow_absolute_paths=true"
        )
    return inside


def relative_audio_path(manifest_path: str | os.PathLike, audio_path: str | os.PathLike) -> str:
    """How to store `audio_path` in a manifest at `manifest_path`: relative to the manifest's
    folder when the file lies below it, else absolute."""
    manifest_dir = Path(manifest_path).resolve().parent
    audio_path = Path(audio_path).resolve()
    try:
        return audio_path.relative_to(manifest_dir).as_posix()
    except ValueError:
        return str(audio_path)


@dataclass(frozen=True)
class ManifestSource:
    """One manifest in a training mixture.

    Attributes:
        path: the JSONL manifest.
        weight: relative share of training samples drawn from this manifest (> 0),
            independent of how many clips it holds.
    """

    path: str
    weight: float = 1.0
    allow_absolute_paths: bool = False  # data.allow_absolute_paths: see resolve_audio_path

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ValueError(f"manifest source {self.path}: weight must be > 0, got {self.weight!r}")


def parse_manifest_sources(specs: Sequence[Any], allow_absolute_paths: bool = False) -> list[ManifestSource]:
    """Normalise config values to `ManifestSource`s.

    Each item may be a path string (weight 1), a (path, weight) pair, a
    {"path": ..., "weight": ...} mapping, or a `ManifestSource`.
    """
    sources = _parse_manifest_sources(specs)
    return [dataclasses.replace(s, allow_absolute_paths=allow_absolute_paths or s.allow_absolute_paths) for s in sources]


def _parse_manifest_sources(specs: Sequence[Any]) -> list[ManifestSource]:
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise ValueError("no manifests given: expected at least one manifest path")
    sources = []
    for spec in specs:
        if isinstance(spec, ManifestSource):
            sources.append(spec)
        elif isinstance(spec, (str, os.PathLike)):
            sources.append(ManifestSource(str(spec)))
        elif hasattr(spec, "keys"):
            unknown = set(spec.keys()) - {"path", "weight"}
            if "path" not in spec or unknown:
                raise ValueError(f"manifest spec {dict(spec)!r}: expected keys 'path' and optional 'weight'")
            sources.append(ManifestSource(str(spec["path"]), float(spec.get("weight", 1.0))))
        elif isinstance(spec, Sequence) and len(spec) == 2:
            sources.append(ManifestSource(str(spec[0]), float(spec[1])))
        else:
            raise ValueError(f"manifest spec {spec!r}: expected a path, (path, weight) or {{path, weight}}")
    return sources


def per_clip_sampling_weights(clip_counts: Sequence[int], source_weights: Sequence[float]) -> list[float]:
    """Per-clip weights so that each source's total is proportional to its weight.

    Args:
        clip_counts: number of clips taken from each source, (num_sources,).
        source_weights: the sources' relative weights, (num_sources,).

    Returns:
        A flat list of sum(clip_counts) weights, source by source in order; every clip of
        source k has weight source_weights[k] / clip_counts[k] (normalised to sum 1).

    Raises:
        ValueError: if a weighted source has no clips (its share could not be honoured).
    """
    if len(clip_counts) != len(source_weights):
        raise ValueError("clip_counts and source_weights must have the same length")
    total_weight = float(sum(source_weights))
    weights: list[float] = []
    for index, (count, weight) in enumerate(zip(clip_counts, source_weights)):
        if count == 0:
            raise ValueError(f"manifest source {index} has no clips for this split but weight {weight}")
        weights.extend([weight / total_weight / count] * count)
    return weights


# --------------------------------------------------------------------------------------
# Building a manifest from a dataset's metadata: validate every clip, account for all.
# --------------------------------------------------------------------------------------

PROBLEM_REASONS = ("missing", "corrupt", "too_short", "silent", "duplicate")


@dataclass
class ClipCandidate:
    """A clip named by a dataset's metadata, before its audio file is checked.

    Attributes:
        id: manifest id to use.
        split: manifest split.
        captions: the clip's captions (non-empty).
        audio_path: the file found for it, or None when no pattern matched.
        tried_paths: the paths looked for (reported when the file is missing).
        labels: optional labels to carry into the manifest.
    """

    id: str
    split: str
    captions: list[str]
    audio_path: Path | None
    tried_paths: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ClipProblem:
    """Why one candidate clip is not in the manifest (reason is one of PROBLEM_REASONS)."""

    id: str
    split: str
    reason: str
    detail: str
    path: str | None


@dataclass
class BuildReport:
    """Accounts for every clip the metadata named: usable ones + problems == candidates.

    `bad_rows` lists metadata rows that could not even form a candidate (e.g. an empty
    caption or a missing id), each as {"where": ..., "detail": ...}.
    """

    source: str
    manifest_path: str
    settings: dict[str, Any]
    num_candidates: int = 0
    num_usable: int = 0
    usable_per_split: dict[str, int] = field(default_factory=dict)
    problems: list[ClipProblem] = field(default_factory=list)
    bad_rows: list[dict[str, str]] = field(default_factory=list)

    def problem_counts(self) -> dict[str, int]:
        counts = {reason: 0 for reason in PROBLEM_REASONS}
        for problem in self.problems:
            counts[problem.reason] += 1
        return counts

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "manifest_path": self.manifest_path,
            "settings": self.settings,
            "num_candidates": self.num_candidates,
            "num_usable": self.num_usable,
            "usable_per_split": self.usable_per_split,
            "problem_counts": self.problem_counts(),
            "problems": [dataclasses.asdict(problem) for problem in self.problems],
            "num_bad_rows": len(self.bad_rows),
            "bad_rows": self.bad_rows,
        }

    def summary_lines(self) -> list[str]:
        """A short human-readable summary (a few lines)."""
        lines = [
            f"{self.source}: {self.num_usable} of {self.num_candidates} clips usable -> {self.manifest_path}",
            "usable per split: " + ", ".join(f"{k}={v}" for k, v in sorted(self.usable_per_split.items())),
            "excluded: " + ", ".join(f"{k}={v}" for k, v in self.problem_counts().items()),
        ]
        if self.bad_rows:
            lines.append(f"metadata rows skipped as malformed: {len(self.bad_rows)} (listed in the report)")
        return lines


def checks_path_for(manifest_path: str | os.PathLike) -> Path:
    """The journal of finished audio checks beside a manifest: ``<stem>.checks.jsonl``."""
    path = Path(manifest_path)
    return path.with_name(f"{path.stem}.checks.jsonl")


def _check_one(args: tuple[str, float, float]) -> tuple[str, tuple[str | None, str, float, int]]:
    from datamodules.audio_io import check_audio_file  # local: keep manifest.py import-light

    path, min_duration, silence_peak_db = args
    return path, check_audio_file(path, min_duration=min_duration, silence_peak_db=silence_peak_db)


def check_audio_files(
    paths: Sequence[str | os.PathLike], *, min_duration: float, silence_peak_db: float, workers: int = 0,
    progress: bool = False, journal: str | os.PathLike | None = None, desc: str = "checking clips",
) -> dict[str, tuple[str | None, str, float, int]]:
    """``check_audio_file`` of every distinct path: ``{path: (reason, detail, duration, sample_rate)}``.

    Args:
        workers: processes decoding in parallel (0: this process).
        journal: a JSONL file each result is appended to as it finishes; results already
            in it are reused when the file's size, modification time and the thresholds are
            unchanged, so an interrupted check (WavCaps: 400k files) resumes. Delete it to
            check everything again.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    thresholds = [min_duration, silence_peak_db]
    results: dict[str, tuple[str | None, str, float, int]] = {}

    def stamp(path: str) -> list[int]:
        try:
            info = os.stat(path)
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return [-1, -1]

    if journal is not None and Path(journal).is_file():
        for line in Path(journal).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if row.get("path") in unique and row.get("stamp") == stamp(row["path"]) and row.get("thresholds") == thresholds:
                results[row["path"]] = tuple(row["result"])  # type: ignore[assignment]
    todo = [p for p in unique if p not in results]
    if journal is not None and todo:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
    handle = open(journal, "a") if journal is not None and todo else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(unique), initial=len(unique) - len(todo), desc=desc, unit="clip", mininterval=2)
    try:
        jobs = [(p, min_duration, silence_peak_db) for p in todo]
        if workers > 0 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                finished = pool.map(_check_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
                for path, result in finished:
                    _record(results, handle, bar, path, result, stamp(path), thresholds)
        else:
            for job in jobs:
                path, result = _check_one(job)
                _record(results, handle, bar, path, result, stamp(path), thresholds)
    finally:
        if handle is not None:
            handle.close()
        if bar is not None:
            bar.close()
    return results


def _record(results, handle, bar, path, result, file_stamp, thresholds) -> None:
    results[path] = result
    if handle is not None:
        handle.write(json.dumps({"path": path, "stamp": file_stamp, "thresholds": thresholds, "result": list(result)}) + "\n")
        handle.flush()
    if bar is not None:
        bar.update(1)


def report_path_for(manifest_path: str | os.PathLike) -> Path:
    """Where the build report of a manifest goes: `<manifest stem>.report.json` beside it."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.stem + ".report.json")


def build_manifest_from_candidates(
    candidates: Sequence[ClipCandidate],
    out_path: str | os.PathLike,
    *,
    source: str,
    min_duration: float,
    silence_peak_db: float,
    settings: dict[str, Any],
    bad_rows: Sequence[dict[str, str]] = (),
    progress: bool = False,
    workers: int = 0,
) -> BuildReport:
    """Check every candidate's audio, then write the manifest and its report atomically.

    The audio checks (:func:`check_audio_files`) run in ``workers`` processes and are
    journaled beside the manifest, so an interrupted build resumes where it stopped.

    Each candidate ends either in the manifest or in `report.problems` with a reason:
    missing (no file matched), corrupt (does not decode), too_short, silent, or duplicate
    (an id seen before). The report goes to `report_path_for(out_path)`; the manifest is
    written last and only when every check finished, so an error mid-way leaves no
    partial manifest (an existing one stays untouched).

    Raises:
        NoUsableClipsError: if no candidate is usable (the report is still written).
    """
    out_path = Path(out_path)
    report = BuildReport(source=source, manifest_path=str(out_path), settings=dict(settings))
    report.bad_rows = list(bad_rows)
    report.num_candidates = len(candidates)
    entries: list[ManifestEntry] = []
    seen_ids: set[str] = set()
    checked = check_audio_files(
        [c.audio_path for c in candidates if c.audio_path is not None], min_duration=min_duration,
        silence_peak_db=silence_peak_db, workers=workers, progress=progress, journal=checks_path_for(out_path),
        desc=f"checking {source} clips",
    )
    iterator: Iterable[ClipCandidate] = candidates
    for candidate in iterator:
        path_text = str(candidate.audio_path) if candidate.audio_path is not None else None
        if candidate.id in seen_ids:
            report.problems.append(
                ClipProblem(candidate.id, candidate.split, "duplicate", "id already used by an earlier clip", path_text)
            )
            continue
        seen_ids.add(candidate.id)
        if candidate.audio_path is None:
            detail = "no file found; tried " + ", ".join(candidate.tried_paths)
            report.problems.append(ClipProblem(candidate.id, candidate.split, "missing", detail, None))
            continue
        reason, detail, duration, sample_rate = checked[str(candidate.audio_path)]
        if reason is not None:
            report.problems.append(ClipProblem(candidate.id, candidate.split, reason, detail, path_text))
            continue
        entries.append(
            ManifestEntry(
                id=candidate.id,
                path=relative_audio_path(out_path, candidate.audio_path),
                captions=list(candidate.captions),
                duration=round(duration, 6),
                sample_rate=sample_rate,
                split=candidate.split,
                labels=dict(candidate.labels),
            )
        )
        report.usable_per_split[candidate.split] = report.usable_per_split.get(candidate.split, 0) + 1
    report.num_usable = len(entries)
    assert report.num_usable + len(report.problems) == report.num_candidates

    write_text_atomic(report_path_for(out_path), json.dumps(report.to_json_dict(), indent=2, ensure_ascii=False))
    if not entries:
        raise NoUsableClipsError(
            f"no usable clips for {out_path} ({report.num_candidates} candidates); "
            f"see {report_path_for(out_path)}"
        )
    write_manifest(out_path, entries)
    return report
