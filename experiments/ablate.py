"""NTP vs MNTP (and the paper's ablations) on the synthetic corpus, over seeds: ``make ablate``.

    python -m experiments.ablate [--experiments demo_ntp demo ablate_zero_mask ...]
                                 [--seeds 0 1 2] [--eval] [key=value ...]

Every experiment runs once per seed (``seed`` — data order, masks, initialisation — and
``eval.seed``, the generation seed) with the same step budget and batch; the command-line
overrides apply to all; the corpus, the VAE and the latent cache are shared. Runs go seed by
seed (every experiment at seed 0, then at seed 1, ...), so a drift in the machine's speed
during the ablation falls on all variants alike. Each variant trains the same
architecture, so a step costs about the same in all of them; the table
reports each variant's measured LM wall-clock and flags a spread over 10 % (then the
comparison is equal-steps, not equal-time — say so when quoting it).

Reported per variant, mean ± sample standard deviation over seeds:

- ``val_loss``: diffusion loss on next-token targets of the val split (captions kept, fixed
  noise; comparable across NTP and MNTP);
- with ``--eval`` (needs ``make evaluator``): for test and test_novel, the all-attributes
  accuracy by both judges — the learned attribute evaluator and the physical judge
  (signal measurements) — FD and KL, as ``make eval`` computes them (model row only).

Writes ``<run.root>/ablate/<timestamp>.md`` (the table) and ``.json`` (every run's numbers
and its run directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

DEFAULT_EXPERIMENTS = ["demo_ntp", "demo"]
DEFAULT_SEEDS = [0, 1, 2]
EVAL_SPLITS = ["test", "test_novel"]
# (results key of the model row, column label) for every eval split
EVAL_METRICS = [("acc/all", "all ✓ learned"), ("phys/all", "all ✓ physical"), ("fd", "FD"), ("kl", "KL")]
WALL_CLOCK_TOLERANCE = 0.10  # relative spread of mean LM seconds above which the table says equal-steps only


def describe(cfg) -> str:
    m = cfg.mntp
    objective = "NTP" if m.ratio.kind == "none" else \
        f"MNTP ratio={m.ratio.kind} mode={m.mode} skipped={m.predict_skipped} target_emb={m.target_embedding}"
    return f"{objective} input_noise={float(cfg.model.input_noise):g}"


def budget_text(cfg) -> str:
    """The shared training budget in words: a wall-clock budget (the steps it allowed are in
    the table) or a fixed step count."""
    minutes = float(cfg.trainer.time_budget_minutes)
    if minutes > 0:
        return f"time_budget_minutes={minutes:g} per run (at most max_steps={cfg.trainer.max_steps})"
    return f"max_steps={cfg.trainer.max_steps}"


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of finite ``values``."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def run_one(cfg, with_eval: bool) -> dict[str, Any]:
    """Train ``cfg`` (and evaluate its last checkpoint): the run's numbers, flat."""
    from experiments import pipeline

    run_dir = pipeline.run_task(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    row: dict[str, Any] = {
        "experiment": cfg.experiment, "seed": int(cfg.seed), "run": str(run_dir),
        "val_loss": summary["final_metrics"].get("val/loss"), "lm_seconds": summary["timings_s"]["lm"],
        "steps": summary.get("steps"),
    }
    if with_eval:
        from experiments.evaluate import evaluate

        results = evaluate(cfg, run_dir / "checkpoints" / "last.ckpt")
        for split in EVAL_SPLITS:
            model = results["splits"].get(split, {}).get("rows", {}).get("model", {})
            for key, _ in EVAL_METRICS:
                row[f"{split} {key}"] = model.get(key)
    return row


def summarise(rows: list[dict[str, Any]], variants: dict[str, str], with_eval: bool) -> list[dict[str, Any]]:
    """One entry per experiment: ``{"experiment", "variant", "seeds", <metric>: (mean, spread)}``."""
    metrics = ["val_loss", "lm_seconds", "steps"] + ([f"{s} {k}" for s in EVAL_SPLITS for k, _ in EVAL_METRICS] if with_eval else [])
    table = []
    for experiment, variant in variants.items():
        runs = [r for r in rows if r["experiment"] == experiment]
        entry: dict[str, Any] = {"experiment": experiment, "variant": variant, "seeds": [r["seed"] for r in runs]}
        for metric in metrics:
            entry[metric] = mean_and_spread([r.get(metric) for r in runs])
        table.append(entry)
    return table


def format_table(summary: list[dict[str, Any]], header: str, with_eval: bool) -> str:
    columns = [("val_loss", "val loss", 4), ("lm_seconds", "LM s", 0), ("steps", "steps", 0)]
    if with_eval:
        for split in EVAL_SPLITS:
            for key, label in EVAL_METRICS:
                percent = key.endswith("/all")
                columns.append((f"{split} {key}", f"{split} {label}" + (" %" if percent else ""), 0 if key == "fd" else 1))

    def cell(entry: dict[str, Any], key: str, digits: int) -> str:
        mean, spread = entry[key]
        scale = 100.0 if key.endswith("/all") else 1.0
        return "n/a" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"

    lines = [header, "", "| experiment | variant | seeds | " + " | ".join(c[1] for c in columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for entry in summary:
        seeds = ",".join(str(s) for s in entry["seeds"])
        lines.append(f"| {entry['experiment']} | {entry['variant']} | {seeds} | "
                     + " | ".join(cell(entry, key, digits) for key, _, digits in columns) + " |")
    times = [entry["lm_seconds"][0] for entry in summary]
    spread = (max(times) - min(times)) / max(min(times), 1e-9)
    per_variant = ", ".join(f"{entry['experiment']} {t:.0f} s" for entry, t in zip(summary, times))
    lines += ["", f"LM wall-clock per run (mean over seeds): {per_variant}; max/min − 1 = {spread * 100:.1f}%."]
    if spread > WALL_CLOCK_TOLERANCE:
        lines.append(f"**The variants' wall-clock differs by more than {WALL_CLOCK_TOLERANCE:.0%}: this is an equal-steps "
                     "comparison, not an equal-time one.**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=DEFAULT_EXPERIMENTS, help="experiments to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="training (and generation) seeds, one run each")
    parser.add_argument("--eval", action="store_true", help="also run `make eval` on each run (needs `make evaluator`)")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value, wherever they stand
    args = parser.parse_args([a for a in argv if a not in overrides])
    from datamodules.atomic import write_text_atomic
    from experiments.config import ConfigError, load_config

    if len(set(args.seeds)) != len(args.seeds):
        print(f"error: --seeds repeats a seed: {args.seeds}", file=sys.stderr)
        return 2
    try:  # every config first: a typo fails before any training
        configs = {(name, seed): load_config(name, [*overrides, f"seed={seed}", f"eval.seed={seed}", "eval.reference_rows=false"])
                   for seed in args.seeds for name in args.experiments}  # seed-major: a drift in machine speed hits every variant alike
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    budgets = {(c.trainer.max_steps, c.trainer.time_budget_minutes, c.trainer.batch_size, c.trainer.accumulate_grad_batches)
               for c in configs.values()}
    if len(budgets) != 1:
        print("error: the experiments differ in (max_steps, time_budget_minutes, batch_size, accumulate_grad_batches): "
              f"{budgets}", file=sys.stderr)
        return 2
    first = next(iter(configs.values()))
    if args.eval:
        evaluator = Path(first.eval.evaluator.path)
        if not evaluator.is_file():
            print(f"error: --eval needs a trained evaluator at {evaluator}: run `make evaluator` first", file=sys.stderr)
            return 2

    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(first.run.root) / "ablate" / stamp
    rows: list[dict[str, Any]] = []
    for (name, seed), cfg in configs.items():
        print(f"[ablate] {name} seed {seed} ({len(rows) + 1}/{len(configs)})", flush=True)
        rows.append(run_one(cfg, args.eval))
        write_text_atomic(out.with_suffix(".json"), json.dumps({"runs": rows}, indent=2))  # each finished run kept

    variants = {name: describe(configs[(name, args.seeds[0])]) for name in args.experiments}
    summary = summarise(rows, variants, args.eval)
    header = (f"# NTP vs MNTP ablation ({dt.datetime.now():%Y-%m-%d %H:%M})\n\n"
              f"Same budget for all: {budget_text(first)}, batch_size={first.trainer.batch_size}; "
              f"seeds {args.seeds}; mean ± sample std over seeds. val loss: diffusion loss on next-token targets of the "
              f"val split (captions kept, fixed noise)."
              + (f" Eval: model row of `make eval` (test, test_novel), all-attributes accuracy by the learned evaluator "
                 f"and by the physical judge, FD and KL." if args.eval else ""))
    table = format_table(summary, header, args.eval)
    write_text_atomic(out.with_suffix(".md"), table)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"runs": rows, "summary": summary}, indent=2))
    print(table)
    print(f"[ablate] table written to {out.with_suffix('.md')} (every run: {out.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
