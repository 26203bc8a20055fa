"""Command line: build a JSONL manifest (+ a report of every excluded clip).

    python -m datamodules.build_manifest audiocaps --csv-dir D --audio-dir A --out manifest.jsonl
    python -m datamodules.build_manifest wavcaps --json FreeSound.json --audio-dir A --out fs.jsonl

Exit codes: 0 success; 2 bad arguments or metadata; 1 no usable clip.
The report is written beside the manifest as `<stem>.report.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from datamodules.audiocaps import DEFAULT_AUDIOCAPS_PATTERNS, build_audiocaps_manifest
from datamodules.manifest import BuildReport, NoUsableClipsError, report_path_for
from datamodules.wavcaps import DEFAULT_WAVCAPS_PATTERNS, audiocaps_youtube_ids, build_wavcaps_manifest


def _add_common_arguments(parser: argparse.ArgumentParser, default_patterns: Sequence[str]) -> None:
    parser.add_argument("--audio-dir", required=True, help="folder holding the downloaded audio files")
    parser.add_argument("--out", required=True, help="manifest to write (.jsonl); report goes beside it")
    parser.add_argument(
        "--pattern",
        action="append",
        dest="patterns",
        metavar="PATTERN",
        help="file-name pattern relative to --audio-dir, repeatable, tried in order "
        f"(default: {', '.join(default_patterns[:4])}, ...)",
    )
    parser.add_argument("--min-duration", type=float, default=1.0, help="shortest usable clip, seconds (default 1.0)")
    parser.add_argument(
        "--silence-peak-db", type=float, default=-60.0, help="clips with peak below this dBFS are silent (default -60)"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="processes decoding audio in parallel (default min(8, CPUs); 0: this process). Finished checks are "
        "journaled in <out stem>.checks.jsonl, so an interrupted build resumes",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datamodules.build_manifest", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True)

    audiocaps = commands.add_parser("audiocaps", help="from the official AudioCaps train/val/test CSVs")
    audiocaps.add_argument("--csv-dir", required=True, help="folder with train.csv, val.csv, test.csv")
    audiocaps.add_argument(
        "--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"],
        help="splits to include (default: all three)",
    )
    _add_common_arguments(audiocaps, DEFAULT_AUDIOCAPS_PATTERNS)

    wavcaps = commands.add_parser("wavcaps", help="from one WavCaps subset's JSON metadata")
    wavcaps.add_argument("--json", required=True, help="the subset's JSON file ({\"data\": [...]})")
    wavcaps.add_argument("--split", default="train", help="split given to every clip (default train)")
    wavcaps.add_argument("--id-prefix", default=None, help="prefix for manifest ids (default wavcaps_<json stem>_)")
    wavcaps.add_argument(
        "--exclude-audiocaps-csv", action="append", default=[], metavar="CSV",
        help="leave out clips whose YouTube id is in this AudioCaps CSV (repeatable; use test.csv and val.csv "
        "for AudioSet_SL: WavCaps holds AudioCaps evaluation clips)",
    )
    _add_common_arguments(wavcaps, DEFAULT_WAVCAPS_PATTERNS)
    return parser


def print_report(report: BuildReport) -> None:
    """Print the report summary (a rich table when rich is available)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a declared dependency
        print("\n".join(report.summary_lines()))
        return
    console = Console()
    table = Table(title=f"{report.source} -> {report.manifest_path}")
    table.add_column("outcome")
    table.add_column("clips", justify="right")
    for split, count in sorted(report.usable_per_split.items()):
        table.add_row(f"usable ({split})", str(count))
    for reason, count in report.problem_counts().items():
        table.add_row(f"excluded: {reason}", str(count))
    table.add_row("total named by metadata", str(report.num_candidates))
    if report.bad_rows:
        table.add_row("malformed metadata rows", str(len(report.bad_rows)))
    console.print(table)
    for problem in report.problems[:5]:
        detail = problem.detail if len(problem.detail) <= 100 else problem.detail[:97] + "..."
        console.print(f"  {problem.reason}: {problem.id} ({detail})", highlight=False, markup=False)
    if len(report.problems) > 5:
        console.print(f"  ... {len(report.problems) - 5} more", highlight=False)
    console.print(f"full report: {report_path_for(report.manifest_path)}", highlight=False, markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.min_duration < 0:
        parser.error(f"--min-duration must be >= 0, got {args.min_duration}")
    common = dict(
        min_duration=args.min_duration, silence_peak_db=args.silence_peak_db, progress=not args.no_progress,
        workers=args.workers
    )
    try:
        if args.dataset == "audiocaps":
            report = build_audiocaps_manifest(
                args.csv_dir, args.audio_dir, args.out,
                patterns=args.patterns or DEFAULT_AUDIOCAPS_PATTERNS, splits=args.splits, **common,
            )
        else:
            report = build_wavcaps_manifest(
                args.json, args.audio_dir, args.out,
                patterns=args.patterns or DEFAULT_WAVCAPS_PATTERNS, split=args.split, id_prefix=args.id_prefix,
                exclude_youtube_ids=audiocaps_youtube_ids(args.exclude_audiocaps_csv), **common,
            )
    except (FileNotFoundError, ValueError) as error:  # ManifestError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, NoUsableClipsError) else 2
    print_report(report)
    if not Path(args.audio_dir).resolve().is_relative_to(Path(args.out).resolve().parent):
        print(f"note: the audio lies outside {Path(args.out).resolve().parent}, so the manifest names it by absolute "
              "path; training reads such manifests with data.allow_absolute_paths=true (or put the manifest above "
              "the audio folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
