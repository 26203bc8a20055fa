"""Train an experiment: ``python -m experiments.train [EXP] [key=value ...]`` (``make train``).

What is trained depends on the experiment's ``task``:

- ``audio_lm``: the whole pipeline — data (the synthetic corpus is generated when
  ``data.source: synthetic``) → pretransform (a trained mel-VAE, trained first if missing,
  or pretrained AudioLDM weights) → latent cache → the language model (NTP or MNTP) →
  audio samples for held-out captions.
- ``mel_vae``: the mel-VAE alone; exports a pretransform directory other experiments use.
- ``evaluator``: the attribute classifier used to evaluate on the synthetic corpus.
"""

from __future__ import annotations

import sys
import time

from experiments.config import config_from_argv


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    from experiments.preflight import preflight_or_exit

    preflight_or_exit(cfg, "train")  # everything missing, listed at once, before any work

    from experiments import pipeline  # heavy imports after the config is known to be valid

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from experiments.config import ConfigError
    from lightning_modules.audio_lm import NonFiniteTrainingError
    from lightning_modules.checkpoints import CheckpointError

    start = time.perf_counter()
    try:
        run_dir = pipeline.run_task(cfg)
    except SIGTERMException:  # Lightning stopped after SIGTERM; last.ckpt was written (PreemptionCheckpoint)
        pipeline.log("train", f"{cfg.experiment} stopped by SIGTERM; continue with ARGS=\"trainer.resume=last\"")
        return 143  # 128 + SIGTERM: schedulers see a terminated job, not a finished one
    except (ConfigError, CheckpointError, NonFiniteTrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    pipeline.log("train", f"{cfg.experiment} finished in {time.perf_counter() - start:.0f} s; run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
