"""Preparation once per launch (experiments/ranks.py): who prepares, who waits, what a
waiting rank accepts."""

from __future__ import annotations

import json
import os
import time

import pytest

from experiments import ranks
from experiments.config import ConfigError, load_config

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID",
               "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith(ranks.PREPARED_ENV_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(ranks, "POLL_S", 0.01)
    return monkeypatch


def counting_prepare(calls):
    def prepare():
        calls.append(1)
        return {"run_dir": "runs/x"}
    return prepare


@pytest.mark.parametrize("variables,rank", [
    ({}, 0), ({"RANK": "3"}, 3), ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 1),
    ({"LOCAL_RANK": "0", "NODE_RANK": "2"}, 1), ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, 0),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, 5), ({"SLURM_PROCID": "5", "SLURM_NTASKS": "1"}, 0),
])
def test_global_rank_is_read_from_the_launchers_environment(env, variables, rank):
    for name, value in variables.items():
        env.setenv(name, value)
    assert (ranks.global_rank_before_fit() == 0) == (rank == 0)


def test_single_process_prepares_and_publishes_for_lightnings_rerun_ranks(env, tmp_path):
    calls = []
    record = ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5)
    assert calls == [1] and record["run_dir"] == "runs/x"
    assert not (tmp_path / ranks.LAUNCH_DIR).exists()  # no external launch: no rendezvous file
    # A later, independent run from the same process (a notebook training twice) prepares anew.
    assert ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5)["run_dir"] == "runs/x"
    assert calls == [1, 1]
    record = json.loads(os.environ[ranks.PREPARED_ENV_PREFIX + "AUDIO_LM"])
    env.setenv("LOCAL_RANK", "1")  # a local rank Lightning started, as a child of rank zero, inherits the record
    env.setattr(os, "getppid", lambda: record["prepared_by_pid"])
    assert ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5) == record
    assert calls == [1, 1]
    env.setattr(os, "getppid", lambda: record["prepared_by_pid"] + 1)  # a launch by another process
    env.setenv("LOCAL_RANK", "0")
    ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5)
    assert calls == [1, 1, 1]


def test_external_launch_rank_one_waits_for_rank_zeros_file(env, tmp_path):
    env.setenv("TORCHELASTIC_RUN_ID", "job7")
    env.setenv("MASTER_PORT", "29500")
    env.setenv("RANK", "0")
    calls = []
    record = ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5)
    (path,) = (tmp_path / ranks.LAUNCH_DIR).glob("*-audio_lm.json")
    assert json.loads(path.read_text())["run_dir"] == "runs/x"
    env.delenv(ranks.PREPARED_ENV_PREFIX + "AUDIO_LM")  # another process: nothing inherited
    env.setenv("RANK", "1")
    assert ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare(calls), 5) == record
    assert calls == [1]
    with pytest.raises(RuntimeError, match="prepared another configuration"):
        ranks.prepare_once("audio_lm", tmp_path, {"a": 2}, counting_prepare(calls), 5)


def test_a_stale_record_of_an_earlier_launch_is_not_taken(env, tmp_path):
    env.setenv("TORCHELASTIC_RUN_ID", "none")
    env.setenv("RANK", "1")
    path = tmp_path / ranks.LAUNCH_DIR / f"{ranks.launch_id()}-audio_lm.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"run_dir": "old", "config_digest": ranks.config_digest({"a": 1})}))
    old = time.time() - 3600
    os.utime(path, (old, old))
    with pytest.raises(ranks.PreparationTimeout, match="trainer.prepare_timeout_s=0.1"):
        ranks.prepare_once("audio_lm", tmp_path, {"a": 1}, counting_prepare([]), 0.1)


def test_sharded_strategy_with_ema_is_refused_before_any_work():
    from experiments import pipeline

    with pytest.raises(ConfigError, match="optim.ema_decay=0"):
        pipeline.check_distributed_settings(load_config("masked_base", ["trainer.strategy=fsdp"]))
    pipeline.check_distributed_settings(load_config("masked_base", ["trainer.strategy=fsdp", "optim.ema_decay=0"]))
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        pipeline.check_distributed_settings(load_config("demo", ["optim.ema_decay=1.5"]))
