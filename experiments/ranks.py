"""Data preparation once per launch: global rank zero prepares, the other ranks wait and read.

A multi-process launch starts in one of two ways, and both are Lightning's:

- **Lightning launches the processes** (``trainer.devices=8`` on one node, or one command per
  node with ``NODE_RANK``): the first process runs the script alone until ``trainer.fit``,
  then Lightning starts the other local ranks by re-running the same command with
  ``LOCAL_RANK`` set. Rank zero stores what it prepared (run directory, cache, VAE, ...) as
  JSON in an environment variable before fit; the re-run ranks inherit it and skip the
  preparation.
- **An external launcher starts every rank at once** (``torchrun``, SLURM ``srun``, other
  nodes of a Lightning multi-node launch): ranks other than zero find no such variable and
  wait for rank zero's record file ``<run.root>/.launch/<launch id>-<stage>.json`` (written
  atomically once everything is on disk; the launch id comes from the launcher's
  environment, so a file of an earlier launch is never taken for this one).

Rank numbers are read from the same environment variables Lightning's cluster
environments read (``RANK`` from torchrun, ``SLURM_PROCID``, ``NODE_RANK`` +
``LOCAL_RANK``), before any Trainer exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from datamodules.atomic import write_text_atomic

PREPARED_ENV_PREFIX = "AUDIOLM_PREPARED_"
LAUNCH_DIR = ".launch"
POLL_S = 2.0
# A record file older than this process (minus clock skew between nodes) belongs to an
# earlier launch with the same id (torchrun without --rdzv-id, the same port) and is ignored.
STALE_SLACK_S = 120.0
PROCESS_START = time.time()


class PreparationTimeout(RuntimeError):
    """Rank zero did not publish its preparation in time."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def global_rank_before_fit() -> int:
    """This process' global rank as the launcher set it (0 for a plain single process).

    torchrun sets ``RANK``; SLURM ``SLURM_PROCID`` (when SLURM runs one task per device);
    a Lightning launch ``NODE_RANK`` and, for the re-run local ranks, ``LOCAL_RANK``. A
    process with ``NODE_RANK > 0`` is not global zero even when its local rank is 0.
    """
    for name in ("RANK", "SLURM_PROCID"):
        rank = _env_int(name)
        if rank is not None and (name != "SLURM_PROCID" or _slurm_manages_tasks()):
            return rank
    node, local = _env_int("NODE_RANK") or _env_int("GROUP_RANK") or 0, _env_int("LOCAL_RANK") or 0
    return 0 if node == 0 and local == 0 else max(1, node * 1_000 + local)  # only "zero or not" matters here


def _slurm_manages_tasks() -> bool:
    """SLURM started several tasks (``srun``), not an interactive shell holding one."""
    return (_env_int("SLURM_NTASKS") or 1) > 1


def launch_id() -> str | None:
    """An id shared by every rank of one external launch, new for the next; None when the
    processes are started by Lightning from this one (no file rendezvous needed)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") is not None or env.get("RANK") is not None:
        parts = ["torchrun", env.get("TORCHELASTIC_RUN_ID", ""), env.get("TORCHELASTIC_RESTART_COUNT", "0"),
                 env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    elif env.get("SLURM_JOB_ID") and _slurm_manages_tasks():
        parts = ["slurm", env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", ""), env.get("SLURM_RESTART_COUNT", "0")]
    elif (_env_int("NODE_RANK") or 0) > 0 or (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        parts = ["nodes", env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    else:
        return None
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))[:120]


def config_digest(config: dict[str, Any]) -> str:
    """Short digest of a resolved config: ranks must prepare for the same experiment."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_rank_spawned_by_lightning() -> bool:
    """Is this process a local rank (``LOCAL_RANK`` >= 1) that Lightning's launcher started?

    Only those may take rank zero's record from the environment — and only from their
    parent process: a later, independent launch (a second ``make train`` from a notebook or
    a script that trained before) inherits the variable too, and must prepare anew.
    """
    return (_env_int("LOCAL_RANK") or 0) >= 1


def prepare_once(
    stage: str, run_root: str | Path, config: dict[str, Any], prepare: Callable[[], dict[str, Any]], timeout_s: float
) -> dict[str, Any]:
    """Run ``prepare`` on global rank zero only; return its JSON-able record on every rank.

    Args:
        stage: names the preparation (``audio_lm``, ``mel_vae``): one record per stage.
        run_root: ``run.root``; external launches rendezvous in ``<run_root>/.launch/``.
        config: the resolved config; a rank waiting for a record of another config fails.
        prepare: does the work (generate data, train/load the VAE, encode the cache, make
            the run directory) and returns what the other ranks need to open it read-only.
        timeout_s: how long a non-zero rank waits for rank zero.
    """
    env_name = PREPARED_ENV_PREFIX + stage.upper()
    digest = config_digest(config)
    inherited = os.environ.get(env_name)
    if inherited is not None and is_rank_spawned_by_lightning():  # a local rank Lightning re-ran after rank zero prepared
        record = json.loads(inherited)
        if record.get("config_digest") == digest and record.get("prepared_by_pid") == os.getppid():
            return record
    ident = launch_id()
    path = Path(run_root) / LAUNCH_DIR / f"{ident}-{stage}.json" if ident else None
    if global_rank_before_fit() == 0:
        record = dict(prepare(), config_digest=digest, launch_id=ident, prepared_by_pid=os.getpid())
        os.environ[env_name] = json.dumps(record)
        if path is not None:
            write_text_atomic(path, json.dumps(record, indent=1))
        return record
    if path is None:
        raise RuntimeError(f"rank {global_rank_before_fit()} has no launch id to wait for rank zero's {stage} preparation")
    return _wait_for_record(path, digest, timeout_s)


def _wait_for_record(path: Path, digest: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    print(f"[rank {global_rank_before_fit()}] waiting for global rank zero to prepare the data ({path})", flush=True)
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_mtime >= PROCESS_START - STALE_SLACK_S:
            record = json.loads(path.read_text())
            if record.get("config_digest") == digest:
                return record
            raise RuntimeError(
                f"{path}: global rank zero prepared another configuration; every rank must get the same "
                "experiment and overrides"
            )
        time.sleep(POLL_S)
    raise PreparationTimeout(
        f"global rank zero did not finish preparing the data within trainer.prepare_timeout_s={timeout_s:g} s "
        f"(no {path}); see rank zero's log, or prepare first with `make cache` and launch again"
    )
