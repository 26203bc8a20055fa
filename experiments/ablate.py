"""NTP vs MNTP (and the paper's ablations) on the synthetic corpus: ``make ablate``.

    python -m experiments.ablate [--experiments demo_ntp demo ablate_zero_mask ...]
                                 [--eval] [key=value ...]

Every experiment runs with the same budget and seed (the command-line overrides apply to
all); the corpus, the VAE and the latent cache are shared. Prints and writes
``<run.root>/ablate/<timestamp>.md`` with the validation diffusion loss on next-token
targets (captions kept, fixed noise; comparable across NTP and MNTP) and, with ``--eval``
and a trained evaluator (``make evaluator``), the quality metrics of ``make eval``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

DEFAULT_EXPERIMENTS = ["demo_ntp", "demo"]


def describe(cfg) -> str:
    m = cfg.mntp
    if m.ratio.kind == "none":
        return "NTP"
    return f"MNTP ratio={m.ratio.kind} mode={m.mode} skipped={m.predict_skipped} target_emb={m.target_embedding}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=DEFAULT_EXPERIMENTS, help="experiments to compare")
    parser.add_argument("--eval", action="store_true", help="also run `make eval` on each (needs `make evaluator`)")
    args, overrides = parser.parse_known_args(argv)
    from datamodules.atomic import write_text_atomic
    from experiments.config import ConfigError, load_config

    try:
        configs = [load_config(name, overrides) for name in args.experiments]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    budgets = {(c.trainer.max_steps, c.trainer.batch_size, c.seed) for c in configs}
    if len(budgets) != 1:
        print(f"error: the experiments differ in (max_steps, batch_size, seed): {budgets}", file=sys.stderr)
        return 2

    from experiments import pipeline

    rows = []
    for cfg in configs:
        run_dir = pipeline.run_task(cfg)
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {
            "experiment": cfg.experiment,
            "variant": describe(cfg),
            "val_loss": summary["final_metrics"].get("val/loss"),
            "train_loss": summary["final_metrics"].get("train/loss"),
            "lm_seconds": summary["timings_s"]["lm"],
            "run": str(run_dir),
        }
        if args.eval:
            from experiments.evaluate import evaluate

            results = evaluate(cfg, run_dir / "checkpoints" / "last.ckpt")
            for split, split_result in results["splits"].items():
                model = split_result["rows"]["model"]
                for key in ("fd", "kl", "is", "acc/all"):
                    row[f"{split} {key}"] = model.get(key)
        rows.append(row)

    columns = [k for k in rows[0] if k not in ("run",)]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [
        f"# NTP vs MNTP ablation ({dt.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Same budget for all: max_steps={configs[0].trainer.max_steps}, batch_size={configs[0].trainer.batch_size}, "
        f"seed={configs[0].seed}. val_loss: diffusion loss on next-token targets of the val split (captions kept, fixed noise).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    out = Path(configs[0].run.root) / "ablate" / f"{dt.datetime.now():%Y%m%d-%H%M%S}.md"
    write_text_atomic(out, table)
    print(table)
    print(f"[ablate] table written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
