"""Encode an experiment's manifests into its latent cache: ``python -m experiments.cache EXP [key=value ...]``.

Resumable: an interrupted run continues with the shards that are not finished yet. A
cache built with another VAE or other audio settings is refused with a clear message.
"""

from __future__ import annotations

import sys

from experiments.config import config_from_argv


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    from experiments.preflight import preflight_or_exit

    preflight_or_exit(cfg, "cache")
    from experiments import pipeline

    pipeline.set_threads(cfg)
    sources = pipeline.manifest_sources(cfg)
    pretransform = pipeline.load_or_train_pretransform(cfg)
    cache_dir = pipeline.ensure_latent_cache(cfg, pretransform, sources)
    print(f"[cache] {cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
