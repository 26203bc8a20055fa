"""Generate (or reuse) an experiment's synthetic corpus: ``make corpus [EXP=demo] [ARGS=...]``.

Prints where the wavs and ``manifest.jsonl`` are and the clips per split; browse them with
``notebooks/explore_corpus.ipynb``.
"""

from __future__ import annotations

import collections
import sys

from experiments.config import config_from_argv


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    if cfg.data.source != "synthetic":
        print(f"error: experiment {cfg.experiment!r} reads manifests (data.source={cfg.data.source}), not the synthetic corpus",
              file=sys.stderr)
        return 2
    from datamodules.manifest import read_manifest
    from experiments.pipeline import manifest_sources

    (source,) = manifest_sources(cfg)
    counts = collections.Counter(entry.split for entry in read_manifest(source.path))
    print(f"[corpus] {source.path}: " + ", ".join(f"{split} {n}" for split, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
