"""Experiment configuration: one commented base config, one overrides file per experiment.

``experiments/base.yaml`` holds every key with a comment. ``experiments/<name>.yaml``
holds only the keys that experiment changes (optionally ``extends: <other experiment>``
to start from another experiment's overrides). Command-line ``key=value`` overrides come
last. Any key that is not in the base config, or a value whose type does not match the
base value's type, fails at once with an error naming the key.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.atomic import write_text_atomic

EXPERIMENTS_DIR = Path(__file__).resolve().parent
BASE_CONFIG = EXPERIMENTS_DIR / "base.yaml"
EXTENDS_KEY = "extends"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the source."""


def list_experiments() -> list[str]:
    """Names of the experiments in ``experiments/`` (every ``*.yaml`` except ``base``)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if p.stem != "base")


def experiment_path(name: str) -> Path:
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if name == "base" or not path.is_file():
        raise ConfigError(
            f"unknown experiment {name!r}; experiments that exist: {', '.join(list_experiments())}"
        )
    return path


def _type_name(value: Any) -> str:
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    return type(value).__name__


def _compatible(base_value: Any, new_value: Any) -> bool:
    """True when ``new_value`` may replace ``base_value`` (same kind; int may become float)."""
    if base_value is None:  # keys documented as optional (null by default) accept anything
        return True
    if new_value is None:
        return False
    if base_value == "auto":  # "auto" defaults (trainer.devices) also take a number or a list (device ids)
        return isinstance(new_value, (str, ListConfig, list, tuple)) or (
            isinstance(new_value, int) and not isinstance(new_value, bool)
        )
    if isinstance(base_value, bool) or isinstance(new_value, bool):
        return isinstance(base_value, bool) and isinstance(new_value, bool)
    if isinstance(base_value, float):
        return isinstance(new_value, (int, float))
    if isinstance(base_value, int):
        return isinstance(new_value, int)
    if isinstance(base_value, str):
        return isinstance(new_value, str)
    if isinstance(base_value, (ListConfig, list)):
        return isinstance(new_value, (ListConfig, list, tuple))
    if isinstance(base_value, (DictConfig, dict)):
        return isinstance(new_value, (DictConfig, dict))
    return type(base_value) is type(new_value)


def _check_against_base(base: DictConfig, overrides: DictConfig, source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for any key of ``overrides`` missing from ``base`` or of the wrong type."""
    for key in overrides.keys():
        full_key = f"{prefix}{key}"
        if key not in base:
            siblings = ", ".join(str(k) for k in base.keys())
            raise ConfigError(f"{source}: unknown key {full_key!r} (keys at this level: {siblings})")
        base_node, new_node = base._get_node(key), overrides._get_node(key)
        if isinstance(base_node, DictConfig) and isinstance(new_node, DictConfig):
            _check_against_base(base_node, new_node, source, prefix=f"{full_key}.")
            continue
        base_value = base_node if isinstance(base_node, (DictConfig, ListConfig)) else base_node._value()
        new_value = new_node if isinstance(new_node, (DictConfig, ListConfig)) else new_node._value()
        if not _compatible(base_value, new_value):
            raise ConfigError(
                f"{source}: key {full_key!r} expects {_type_name(base_value)} "
                f"(base value {base_value!r}) but got {_type_name(new_value)} {new_value!r}"
            )


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors: name the file
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return cfg


def _experiment_chain(name: str) -> list[tuple[str, DictConfig]]:
    """Override files from the root of the ``extends`` chain down to ``name``."""
    chain: list[tuple[str, DictConfig]] = []
    seen: set[str] = set()
    current: str | None = name
    while current is not None:
        if current in seen:
            raise ConfigError(f"experiment {name!r}: 'extends' cycle through {current!r}")
        seen.add(current)
        path = experiment_path(current)
        cfg = _load_yaml(path)
        parent = cfg.pop(EXTENDS_KEY, None)
        chain.append((str(path), cfg))
        current = parent
    return list(reversed(chain))


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """Parse ``key=value`` strings (values are YAML: ``3``, ``0.5``, ``true``, ``[1,2]``, ``null``)."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as err:
        raise ConfigError(f"cannot parse command-line overrides {items}: {err}") from err


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Base config + experiment overrides (+ its ``extends`` chain) + command-line overrides.

    Returns a struct-mode config (reading or writing an unknown key raises) with
    ``experiment`` set to ``name``.
    """
    base = _load_yaml(BASE_CONFIG)
    cfg = base.copy()
    for source, layer in _experiment_chain(name):
        _check_against_base(base, layer, source)
        cfg = OmegaConf.merge(cfg, layer)
    cli = parse_overrides(overrides)
    _check_against_base(base, cli, "command line")
    cfg = OmegaConf.merge(cfg, cli)
    cfg.experiment = name
    OmegaConf.set_struct(cfg, True)
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:
        raise ConfigError(f"experiment {name!r}: cannot resolve interpolations: {err}") from err
    return cfg


def config_from_argv(argv: Sequence[str], default: str = "demo") -> DictConfig:
    """``[EXP] [key=value ...]`` from a command line → the config; exits with status 2 and
    the error on stderr when the experiment or a key is wrong (the entry points' contract)."""
    args = list(argv)
    name = args.pop(0) if args and "=" not in args[0] else default
    try:
        return load_config(name, args)
    except ConfigError as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_container(container: dict) -> DictConfig:
    """Rebuild a struct-mode config from a plain dict (as stored in a checkpoint).

    Keys added to ``base.yaml`` after the checkpoint was written take their base value
    (new keys default to the behaviour that existed before them); every key the
    checkpoint stores keeps its stored value.
    """
    cfg = OmegaConf.merge(_load_yaml(BASE_CONFIG), OmegaConf.create(container))
    OmegaConf.set_struct(cfg, True)
    return cfg


# ----------------------------------------------------------------------------- run dirs


def point_last(link: Path, target: Path) -> None:
    """Atomically make ``link`` a symlink to ``target`` (a sibling folder, stored relative)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def make_run_dir(cfg: DictConfig) -> Path:
    """Create ``<run.root>/<experiment>/<timestamp>/``, save the resolved config there and
    point ``<run.root>/<experiment>/last`` at it."""
    exp_dir = Path(cfg.run.root) / cfg.experiment
    exp_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = exp_dir / stamp
    suffix = 1
    while run_dir.exists():
        run_dir = exp_dir / f"{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))
    point_last(exp_dir / "last", run_dir)
    return run_dir


def last_run_dir(root: str | Path, experiment: str) -> Path:
    """The folder ``<root>/<experiment>/last`` points to; a clear error when there is none."""
    link = Path(root) / experiment / "last"
    if not link.exists():
        raise FileNotFoundError(
            f"no finished run of experiment {experiment!r}: {link} does not exist "
            f"(run `make train EXP={experiment}` first)"
        )
    return link.resolve()
