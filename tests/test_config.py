"""Experiment configs: merging, strictness, type checks, run directories, the train CLI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config import (
    BASE_CONFIG,
    ConfigError,
    last_run_dir,
    list_experiments,
    load_config,
    make_run_dir,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_experiment_loads_and_only_overrides_base_keys():
    names = list_experiments()
    assert {"demo", "vae_demo", "ntp_base", "ntp_large", "masked_base", "masked_large"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.experiment == name


def test_experiment_overrides_and_cli_overrides_merge_in_order():
    base = OmegaConf.load(BASE_CONFIG)
    demo_file = OmegaConf.load(BASE_CONFIG.parent / "demo.yaml")
    demo = load_config("demo")
    assert demo.model.width == demo_file.model.width != base.model.width
    assert demo.model.heads == demo_file.model.heads
    assert demo.optim.betas == base.optim.betas  # untouched keys keep base values
    cli = load_config("demo", ["model.width=128", "optim.lr=0.5", "mntp.ratio.kind=none"])
    assert cli.model.width == 128 and cli.optim.lr == 0.5 and cli.mntp.ratio.kind == "none"


def test_extends_chain():
    large = load_config("masked_large")
    assert large.model.depth == 32 and large.mntp.ratio.kind == "mixture"  # ntp_large + mixture
    assert large.text.kind == "pretrained"  # from ntp_base, two levels up


def test_interpolations_follow_overrides(tmp_path):
    cfg = load_config("demo", [f"run.root={tmp_path}"])
    assert cfg.vae.dir == f"{tmp_path}/vae_demo/last/pretransform"


def test_unknown_experiment_lists_the_existing_ones():
    with pytest.raises(ConfigError) as err:
        load_config("nope")
    assert "nope" in str(err.value) and "demo" in str(err.value) and "ntp_base" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.widht=3", "model.widht"),
        ("trainer.max_step=3", "trainer.max_step"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_misspelled_key_fails_naming_it(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("demo", [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.width=wide", "model.width"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
        ("mntp.predict_skipped=3", "mntp.predict_skipped"),
        ("optim.betas=0.9", "optim.betas"),
        ("trainer.devices=1.5", "trainer.devices"),
        ("trainer.devices=true", "trainer.devices"),
    ],
)
def test_wrongly_typed_value_fails_naming_it(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("demo", [override])


def test_int_is_accepted_for_float_keys_and_null_for_optional_keys():
    cfg = load_config("demo", ["optim.lr=1", "vae.pretrained_dir=some/dir"])
    assert cfg.optim.lr == 1 and cfg.vae.pretrained_dir == "some/dir"


def test_auto_keys_take_numbers_and_device_lists():
    """`make train EXP=masked_base ARGS="trainer.devices=8"` — the README's multi-GPU line."""
    assert load_config("masked_base", ["trainer.devices=8"]).trainer.devices == 8
    assert list(load_config("demo", ["trainer.devices=[0,2]"]).trainer.devices) == [0, 2]
    assert load_config("demo", ["trainer.devices=auto"]).trainer.devices == "auto"


def test_struct_mode_rejects_unknown_attribute_access():
    cfg = load_config("demo")
    with pytest.raises(Exception):
        _ = cfg.model.no_such_key


def test_bad_key_in_an_experiment_file_names_the_file(tmp_path, monkeypatch):
    import experiments.config as config

    (tmp_path / "base.yaml").write_text(BASE_CONFIG.read_text())
    (tmp_path / "broken.yaml").write_text("model:\n  widht: 3\n")
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path)
    monkeypatch.setattr(config, "BASE_CONFIG", tmp_path / "base.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*model\.widht"):
        config.load_config("broken")


def test_base_config_has_a_comment_on_every_key():
    """Every key line of base.yaml carries a comment, on the line or on the line above."""
    lines = BASE_CONFIG.read_text().splitlines()
    missing = [
        line.strip()
        for i, line in enumerate(lines)
        if re.match(r"^\s*[A-Za-z_][A-Za-z0-9_]*:", line)
        and "#" not in line
        and not lines[i - 1].strip().startswith("#")
    ]
    assert not missing, f"keys without a comment in base.yaml: {missing}"


def test_run_dir_saves_config_and_points_last(tmp_path):
    cfg = load_config("demo", [f"run.root={tmp_path}"])
    first = make_run_dir(cfg)
    second = make_run_dir(cfg)
    assert first != second and first.parent == second.parent == tmp_path / "demo"
    assert last_run_dir(tmp_path, "demo") == second.resolve()
    saved = OmegaConf.load(second / "config.yaml")
    assert saved.model.width == cfg.model.width != OmegaConf.load(BASE_CONFIG).model.width
    assert saved.experiment == "demo"


def test_last_run_dir_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make train EXP=demo"):
        last_run_dir(tmp_path, "demo")


def _run_train_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_train_cli_unknown_experiment_fails_at_once():
    result = _run_train_cli("nope")
    assert result.returncode == 2
    assert "unknown experiment 'nope'" in result.stderr and "demo" in result.stderr


def test_train_cli_misspelled_key_fails_at_once():
    result = _run_train_cli("demo", "optim.lrr=1")
    assert result.returncode == 2 and "optim.lrr" in result.stderr


def test_checkpoint_config_gains_keys_added_to_base_later_and_keeps_stored_values():
    """A checkpoint's stored config predates newer base keys: those take their base value
    (defined so the old behaviour is kept) and every stored value wins over base."""
    from omegaconf import OmegaConf

    from experiments.config import config_from_container

    stored = OmegaConf.to_container(load_config("demo"), resolve=True)
    del stored["sample"]["cfg_schedule"]
    stored["sample"]["cfg_scale"] = 7.0
    cfg = config_from_container(stored)
    assert cfg.sample.cfg_schedule == "constant" and cfg.sample.cfg_scale == 7.0
    assert cfg.model.token_dim == stored["model"]["token_dim"]
    with pytest.raises(Exception):
        cfg.sample.cfg_schedul = "linear"  # still struct mode


def test_minimum_versions_file_pins_every_lower_bound_of_setup_cfg():
    """`make test-min` tests exactly the lower bounds users are promised."""
    import configparser
    import re

    repo = Path(__file__).resolve().parents[1]
    parser = configparser.ConfigParser()
    parser.read(repo / "setup.cfg")
    bounds = {}
    for line in parser["options"]["install_requires"].split("\n") + parser["options.extras_require"]["pretrained"].split("\n"):
        if line.strip():
            name, version = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)>=([0-9.]+)\s*", line).groups()
            bounds[name.lower()] = version
    pins = dict(line.split("==") for line in (repo / ".ci" / "min-versions.txt").read_text().split("\n")
                if line and not line.startswith("#"))
    from packaging.version import Version

    assert {k.lower(): Version(v) for k, v in pins.items()} == {k: Version(v) for k, v in bounds.items()}
