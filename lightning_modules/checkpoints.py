"""Checkpoints that are written atomically and loaded without executing code.

- :func:`load_checkpoint` is the one way the project reads a ``.ckpt`` / ``.pt`` file it
  did not just write: the zip's CRC-32 of every record is verified first (a truncated or
  bit-flipped file is refused, naming it, before anything is loaded), then the file is
  unpickled with ``torch.load(weights_only=True)``, which builds only tensors, primitive
  containers and the types in :data:`CHECKPOINT_SAFE_GLOBALS`. A pickle that asks for any
  other global — a code payload — is refused with :class:`CheckpointError`.
- :class:`SafeCheckpointIO` is Lightning's checkpoint IO with both rules: saves go through
  :func:`datamodules.atomic.atomic_path` (fsync + rename), loads through
  :func:`load_checkpoint` — resuming a run uses it too.
- :class:`PreemptionCheckpoint` writes ``last.ckpt`` when the job is told to stop
  (SIGTERM: SLURM preemption, ``kill``, a cluster scheduler; Ctrl-C), at the end of the
  optimizer step in progress, before Lightning exits.
- :class:`RawKeepingEMA` is Lightning's EMA whose checkpoints hold the raw weights even
  when written after training ends.
"""

from __future__ import annotations

import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.atomic import atomic_path

# Globals a checkpoint may reference beyond what ``weights_only=True`` always allows
# (tensors, storages, dtypes, OrderedDict and the builtin containers and scalars). Our
# Lightning checkpoints — weights, EMA weights, AdamW state, LambdaLR state, loop
# progress, callback states, the config as plain dicts, torch RNG state — need none.
# Add a type here only if it is data, never a callable.
CHECKPOINT_SAFE_GLOBALS: tuple[Any, ...] = ()


def numpy_data_globals() -> list[Any]:
    """numpy's array, dtype and scalar constructors (data, not code), under the names both
    numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) pickle them with — for weights
    files written by other projects that also pickled numpy training state (PANNs)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    names = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names += [(core.multiarray._reconstruct, f"{module}._reconstruct"), (core.multiarray.scalar, f"{module}.scalar")]
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return [*names, np.ndarray, np.dtype, *dtype_classes]


class CheckpointError(RuntimeError):
    """A checkpoint file that must not or cannot be loaded; the message names it."""


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch zip archive whose
    every record matches its CRC-32 (``torch.load`` itself does not check them). Files in
    torch's pre-1.6 (non-zip) format have no checksums and are left to ``torch.load``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK" and not zipfile.is_zipfile(path):
            return  # legacy torch serialisation
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({error}); refusing to load it — "
            "resume from an earlier checkpoint in the same folder"
        ) from error
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (record {bad} fails its CRC check); refusing to load it — "
            "resume from an earlier checkpoint in the same folder"
        )


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False, extra_safe_globals: Sequence[Any] = ()
) -> Any:
    """Verify and load a checkpoint without executing code (see the module docstring).

    ``extra_safe_globals`` widens the allow-list for one load (e.g. :func:`numpy_data_globals`
    for third-party weights files); entries are objects or ``(object, "pickled.name")``.
    """
    path = Path(path)
    verify_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals([*CHECKPOINT_SAFE_GLOBALS, *extra_safe_globals]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line] or str(error).splitlines()[:1]
        raise CheckpointError(
            f"checkpoint {path} asks to build objects outside the allow-list "
            f"(lightning_modules/checkpoints.py CHECKPOINT_SAFE_GLOBALS), which could execute code; "
            f"refusing to load it ({lines[0] if lines else 'unpickling refused'})"
        ) from error
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} could not be read: {error}") from error


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves (a crash mid-save leaves the previous file intact and no partial file)
    and code-free, verified loads (Lightning resumes through :meth:`load_checkpoint`).

    ``keep_step_checkpoints`` >= 0: after writing a ``step*.ckpt``, delete all but the newest
    that many of its siblings (names carry the zero-padded step: name order is step order);
    ``last.ckpt`` is never pruned. -1 keeps all.
    """

    def __init__(self, keep_step_checkpoints: int = -1) -> None:
        super().__init__()
        self.keep = int(keep_step_checkpoints)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        path = Path(path)
        if self.keep >= 0 and path.name.startswith("step"):
            steps = sorted(path.parent.glob("step*.ckpt"))
            for old in steps[: max(0, len(steps) - self.keep)]:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or Ctrl-C: write ``<dirpath>/last.ckpt`` before Lightning exits; every
    ``every_minutes`` of training, refresh it (what a SIGKILL or power loss can cost); and
    after the final step when the step-checkpoint interval does not reach it.

    Lightning's signal connector records SIGTERM (``trainer.received_sigterm``; in
    multi-process runs rank zero's flag is broadcast before every batch) and raises
    ``SIGTERMException`` after the batch in progress; :meth:`on_exception` then saves on
    every rank. In the middle of gradient accumulation the flag is held back until the
    step's remaining micro-batches have run (at most ``accumulate_grad_batches - 1``), so
    the checkpoint is always at an optimizer-step boundary — the only place a run can
    continue exactly. Ctrl-C interrupts mid-batch; the weights, optimizer and counters saved
    are then those of the last completed step.

    Under SLURM, Lightning's requeue handling (``SLURMEnvironment(auto_requeue=True)``,
    SIGUSR1 via ``#SBATCH --signal=SIGUSR1@90``) applies as well; the requeued job
    continues with ``trainer.resume=last``.

    The timed save is decided at logging steps only (``trainer.log_every_n_steps``), by rank
    zero's clock, broadcast to every rank — so all ranks save together and no step pays
    for a collective it does not need.
    """

    def __init__(self, dirpath: str | os.PathLike, every_minutes: float = 0.0, step_interval: int = 0) -> None:
        """``step_interval``: the ModelCheckpoint's ``every_n_train_steps``. When
        ``trainer.max_steps`` is not a multiple of it, the final step would be in no
        checkpoint; this callback then writes last.ckpt after it (0: never)."""
        self.dirpath = Path(dirpath)
        self.every_s = float(every_minutes) * 60.0
        self.step_interval = int(step_interval)
        self._held_back = False
        self._last_save = time.monotonic()

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        connector = trainer._signal_connector  # where Lightning keeps `trainer.received_sigterm`
        at_step_boundary = (batch_idx + 1) % int(trainer.accumulate_grad_batches) == 0
        if connector.received_sigterm and not at_step_boundary:
            connector.received_sigterm, self._held_back = False, True
        elif self._held_back and at_step_boundary:
            connector.received_sigterm, self._held_back = True, False
        final = at_step_boundary and 0 < trainer.max_steps <= trainer.global_step
        if final and self.step_interval > 0 and trainer.global_step % self.step_interval != 0:
            trainer.save_checkpoint(self.path)
            return
        if self.every_s > 0 and at_step_boundary and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            due = trainer.strategy.broadcast(time.monotonic() - self._last_save >= self.every_s, src=0)
            if due:
                trainer.save_checkpoint(self.path)
                self._last_save = time.monotonic()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            reason = "SIGTERM" if isinstance(exception, SIGTERMException) else "interrupted"
            print(f"[lm] {reason}: wrote {self.path} at step {trainer.global_step}; "
                  "continue with ARGS=\"trainer.resume=last\"", flush=True)


class RawKeepingEMA(EMAWeightAveraging):
    """Lightning's :class:`EMAWeightAveraging`, except that a checkpoint written after
    training ends still holds the raw (optimised) weights as ``current_model_state``.

    Lightning's callback *copies* the averaged weights into the model in ``on_train_end``;
    a save after that — ModelCheckpoint's ``save_last`` on train end, which runs whenever no
    ``last.ckpt`` was written during the fit (a resumed run whose steps miss the
    checkpoint interval, a resume of a finished run) — then stored the averages as the raw
    weights too, and a run continued from that file resumed from the EMA, not from where
    the optimizer was. Here ``on_train_end`` *swaps* the two sets instead: the model holds
    the averages (as before: samples, evaluation and ``state_dict`` see the EMA) and the
    averaged-model copy holds the raw weights, which later checkpoints store.
    """

    _swapped_at_end = False  # set by on_train_end, reset by each fit's on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped_at_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._average_model is not None
        self._swap_models(pl_module)
        self._swapped_at_end = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None or not self._swapped_at_end:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # checkpoint["state_dict"] is the model's: the averages. The raw weights are in the copy.
        held = self._average_model.state_dict()
        checkpoint["current_model_state"] = {name[7:]: value for name, value in held.items() if name.startswith("module.")}
        checkpoint["averaging_state"] = {name: value for name, value in held.items() if not name.startswith("module.")}
