"""Atomic file writes: the one helper every file the project writes goes through.

A file is written to a temporary name in its own folder, flushed to disk (``fsync``), and
renamed over the final name (``os.replace``, atomic on POSIX and Windows); the folder is
then synced so the rename itself survives a power loss. A reader therefore sees either
the old file or the complete new one — never a half-written wav, manifest, cache shard,
checkpoint or results file — and an interrupted write leaves no temporary file behind
(the temporary is removed on any exception, KeyboardInterrupt included).

``atomic_path`` is the primitive (for writers that want a path: soundfile, ``torch.save``,
Lightning's checkpoint IO); ``write_text_atomic``, ``write_json_atomic`` and
``torch_save_atomic`` are its three common uses; ``atomic_directory`` does the same for a
folder written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # every temporary name holds it: ``.<name>.tmp-<random>``


def _current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary the mode a plain ``open``/``mkdir`` would have (0666/0777 less the
    umask): ``mkstemp``/``mkdtemp`` create 0600/0700, which would leave every corpus file,
    cache shard, checkpoint and wav readable by its owner only."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. folders on Windows, some network file systems
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is synced and renamed to
    ``path`` (parents created). On an exception the temporary is removed and ``path`` is
    left as it was.

    Example::

        with atomic_path("clip.wav") as tmp:
            soundfile.write(tmp, wave, 16000, format="WAV")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _plain_mode(tmp)
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        _fsync_path(path.parent, directory=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that writers killed mid-write (SIGKILL, power loss) left in
    ``folder``; returns them. Only for folders no live process is writing to."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_MARK}*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_kwargs: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (``dump_kwargs`` go to ``json.dumps``;
    default ``indent=2``)."""
    write_text_atomic(path, json.dumps(payload, **{"indent": 2, **dump_kwargs}))


def torch_save_atomic(path: str | os.PathLike, payload: Any) -> None:
    """``torch.save(payload)`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on a clean exit it replaces ``path``
    (an existing folder is moved aside first and removed after the swap). On an exception
    the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}"))
    old = None
    try:
        yield tmp
        _plain_mode(tmp, directory=True)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_path(file)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
