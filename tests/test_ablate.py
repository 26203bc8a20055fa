"""`make ablate` (experiments/ablate.py): seeds, both judges, mean ± spread, budget checks."""

import json
import math

import pytest

from experiments import ablate
from experiments.pipeline import run_task
from experiments.config import load_config
from tests.test_pipeline import tiny_overrides


def test_mean_and_spread_is_the_sample_standard_deviation():
    assert ablate.mean_and_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert ablate.mean_and_spread([0.5]) == (0.5, 0.0)
    mean, spread = ablate.mean_and_spread([None, float("nan")])
    assert math.isnan(mean) and math.isnan(spread)


def test_the_table_says_when_the_comparison_is_not_equal_time():
    def entry(name, seconds):
        return {"experiment": name, "variant": name, "seeds": [0, 1], "val_loss": (0.1, 0.01), "lm_seconds": (seconds, 1.0),
                "steps": (3000.0, 10.0)}

    equal = ablate.format_table([entry("a", 100.0), entry("b", 105.0)], "# t", with_eval=False)
    unequal = ablate.format_table([entry("a", 100.0), entry("b", 130.0)], "# t", with_eval=False)
    assert "max/min − 1 = 5.0%" in equal and "not an equal-time" not in equal
    assert "max/min − 1 = 30.0%" in unequal and "not an equal-time" in unequal
    assert "| a | a | 0,1 | 0.1000 ± 0.0100 | 100 ± 1 | 3000 ± 10 |" in equal


def test_bad_arguments_fail_before_any_training(tmp_path, capsys):
    common = tiny_overrides(tmp_path)
    assert ablate.main(["--experiments", "demo_ntp", "demo", "--seeds", "0", "0", *common]) == 2
    assert "repeats a seed" in capsys.readouterr().err
    assert ablate.main(["--experiments", "demo_ntp", "demo", *common, "trainer.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err
    assert ablate.main(["--experiments", "demo_ntp", "demo", *common, "--eval"]) == 2
    assert "make evaluator" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "demo").exists()


def test_ablate_runs_every_experiment_per_seed_and_scores_both_judges(tmp_path, capsys):
    common = tiny_overrides(tmp_path)
    run_task(load_config("evaluator", [*common, "eval.evaluator.max_steps=3", "eval.evaluator.val_every_steps=3",
                                       "eval.evaluator.min_accuracy=0.0"]))
    evaluation = ["eval.max_clips=2", "eval.batch_size=2", "eval.is_splits=1", "sample.steps=2"]
    assert ablate.main(["--experiments", "demo_ntp", "demo", "--seeds", "0", "1", "--eval", *common, *evaluation]) == 0
    report = sorted((tmp_path / "runs" / "ablate").glob("*.json"))
    assert len(report) == 1
    data = json.loads(report[0].read_text())
    max_steps = int(next(o for o in common if o.startswith("trainer.max_steps=")).split("=")[1])
    runs = {(r["experiment"], r["seed"]): r for r in data["runs"]}
    # seed by seed, every experiment at each: a drift in machine speed falls on all alike
    assert [(r["experiment"], r["seed"]) for r in data["runs"]] == [("demo_ntp", 0), ("demo", 0), ("demo_ntp", 1), ("demo", 1)]
    assert len({r["run"] for r in data["runs"]}) == 4
    # the seed reaches training: the same experiment ends elsewhere with another seed
    assert runs[("demo", 0)]["val_loss"] != runs[("demo", 1)]["val_loss"]
    for run in data["runs"]:
        for split in ("test", "test_novel"):
            for key in ("acc/all", "phys/all", "fd", "kl"):
                assert run[f"{split} {key}"] is not None and math.isfinite(run[f"{split} {key}"])
        assert run["steps"] == max_steps  # the steps each run took reach the table
    for entry in data["summary"]:
        values = [runs[(entry["experiment"], s)]["val_loss"] for s in (0, 1)]
        assert entry["val_loss"][0] == pytest.approx(sum(values) / 2)
    table = report[0].with_suffix(".md").read_text()
    assert "| demo_ntp | NTP input_noise=1 | 0,1 |" in table and "| demo | MNTP ratio=mixture" in table
    assert "test_novel all ✓ physical %" in table and "LM wall-clock per run" in table
    assert table in capsys.readouterr().out
