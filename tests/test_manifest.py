"""Manifest format, audio I/O helpers and the AudioCaps / WavCaps manifest builders."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules import manifest as manifest_module
from datamodules.audio_io import AudioDecodeError, load_audio, probe_audio, save_wav
from datamodules.audiocaps import build_audiocaps_manifest
from datamodules.build_manifest import main as build_manifest_main
from datamodules.manifest import (
    checks_path_for,
    ManifestEntry,
    ManifestError,
    ManifestSource,
    NoUsableClipsError,
    parse_manifest_sources,
    per_clip_sampling_weights,
    read_manifest,
    report_path_for,
    resolve_audio_path,
    write_manifest,
)
from datamodules.wavcaps import build_wavcaps_manifest

SR = 16000


def _entry(clip_id: str = "a", **overrides) -> ManifestEntry:
    fields = dict(
        id=clip_id, path=f"audio/{clip_id}.wav", captions=["a dog barks", "barking"], duration=2.5,
        sample_rate=SR, split="train", labels={"source": "dog"},
    )
    fields.update(overrides)
    return ManifestEntry(**fields)


def _tone(seconds: float, freq: float = 440.0, amplitude: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------- manifest format


def test_manifest_round_trip_and_relative_paths(tmp_path):
    entries = [_entry("a"), _entry("b", captions=["one"], labels={}, split="test", path="/abs/b.wav")]
    path = tmp_path / "sub" / "m.jsonl"
    write_manifest(path, entries)
    assert read_manifest(path) == entries
    assert "labels" not in path.read_text().splitlines()[1]  # empty labels omitted
    assert resolve_audio_path(path, entries[0]) == (tmp_path / "sub" / "audio" / "a.wav").resolve()
    assert resolve_audio_path(path, entries[1], allow_absolute=True) == Path("/abs/b.wav")
    with pytest.raises(ManifestError, match="absolute path '/abs/b.wav'"):
        resolve_audio_path(path, entries[1])  # only where data.allow_absolute_paths says so


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("captions"), "captions"),
        (lambda r: r.update(captions=[]), "captions"),
        (lambda r: r.update(captions=["ok", ""]), "captions"),
        (lambda r: r.update(duration=-1.0), "duration"),
        (lambda r: r.update(sample_rate=16000.5), "sample_rate"),
        (lambda r: r.update(id=""), "id"),
        (lambda r: r.update(labels={"a": 1}), "labels"),
        (lambda r: r.pop("split"), "split"),
    ],
)
def test_read_manifest_errors_name_file_line_and_field(tmp_path, mutate, field):
    good = _entry("a").to_json_dict()
    bad = _entry("b").to_json_dict()
    mutate(bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and f"'{field}'" in message


def test_read_manifest_rejects_duplicate_ids_and_bad_json(tmp_path):
    path = tmp_path / "m.jsonl"
    record = json.dumps(_entry("a").to_json_dict())
    path.write_text(record + "\n" + record + "\n")
    with pytest.raises(ManifestError, match=r"line 2: field 'id' duplicates id 'a' of line 1"):
        read_manifest(path)
    path.write_text(record + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"line 2: invalid JSON"):
        read_manifest(path)


def test_write_manifest_is_atomic_on_invalid_entry(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [_entry("old")])
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="entry 1"):
        write_manifest(path, [_entry("a"), _entry("b", captions=[])])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp file left behind


def test_sampling_weights_give_each_source_its_share():
    weights = np.asarray(per_clip_sampling_weights([2, 6], [3.0, 1.0]))
    assert weights.shape == (8,)
    assert weights[:2].sum() == pytest.approx(0.75) and weights[2:].sum() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no clips"):
        per_clip_sampling_weights([0, 3], [1.0, 1.0])


def test_parse_manifest_sources_accepts_config_forms():
    sources = parse_manifest_sources(["a.jsonl", ("b.jsonl", 2), {"path": "c.jsonl", "weight": 0.5}])
    assert sources == [ManifestSource("a.jsonl", 1.0), ManifestSource("b.jsonl", 2.0), ManifestSource("c.jsonl", 0.5)]
    with pytest.raises(ValueError, match="weight must be > 0"):
        parse_manifest_sources([("a.jsonl", 0)])
    with pytest.raises(ValueError, match="no manifests"):
        parse_manifest_sources([])


# ------------------------------------------------------------------------- audio I/O


def test_save_wav_probe_and_decode_errors(tmp_path):
    path = tmp_path / "x.wav"
    save_wav(path, _tone(0.5), SR)
    assert sf.info(str(path)).subtype == "PCM_16"
    assert probe_audio(path) == (0.5, SR, 1)
    assert np.abs(load_audio(path, SR) - _tone(0.5)).max() < 1e-3
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(AudioDecodeError, match="garbage.wav"):
        load_audio(garbage, SR)
    with pytest.raises(AudioDecodeError, match="nope.wav"):
        probe_audio(tmp_path / "nope.wav")


# ---------------------------------------------------------------- AudioCaps builder


def _write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        writer.writerows(rows)


@pytest.fixture()
def audiocaps_dir(tmp_path):
    """CSVs for train/val/test + an audio folder holding good, corrupt, silent, short files."""
    csv_dir, audio_dir = tmp_path / "csv", tmp_path / "audio"
    csv_dir.mkdir()
    (audio_dir / "test").mkdir(parents=True)
    _write_csv(csv_dir / "train.csv", [
        ("1", "good1", "30", "a man speaks"),
        ("2", "missing1", "10", "rain falls"),
        ("3", "corrupt1", "0", "a car passes"),
        ("4", "silent1", "5", "nothing happens"),
        ("5", "short1", "7", "a click"),
        ("6", "badrow", "20", ""),  # empty caption: a malformed row, not a clip
    ])
    _write_csv(csv_dir / "val.csv", [("7", "flac1", "40", "birds sing")])
    _write_csv(csv_dir / "test.csv", [(str(10 + k), "multi", "0", f"caption {k}") for k in range(5)])
    sf.write(str(audio_dir / "good1_30.wav"), _tone(2.0), SR, subtype="PCM_16")
    (audio_dir / "corrupt1_0.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(str(audio_dir / "silent1_5.wav"), np.zeros(SR * 2, np.float32), SR, subtype="PCM_16")
    sf.write(str(audio_dir / "short1_7.wav"), _tone(0.3), SR, subtype="PCM_16")
    sf.write(str(audio_dir / "Yflac1.flac"), _tone(1.5, 300.0, sr=44100), 44100)
    sf.write(str(audio_dir / "test" / "multi.wav"), _tone(3.0), SR, subtype="PCM_16")
    return csv_dir, audio_dir


def test_audiocaps_builder_reports_every_clip_with_its_reason(audiocaps_dir, tmp_path):
    csv_dir, audio_dir = audiocaps_dir
    out = tmp_path / "out" / "audiocaps.jsonl"
    report = build_audiocaps_manifest(csv_dir, audio_dir, out, min_duration=1.0)

    entries = {e.id: e for e in read_manifest(out)}
    assert set(entries) == {"good1_30", "flac1_40", "multi_0"}
    assert entries["multi_0"].captions == [f"caption {k}" for k in range(5)]  # grouped, CSV order
    assert entries["multi_0"].split == "test" and entries["flac1_40"].sample_rate == 44100
    assert entries["good1_30"].duration == pytest.approx(2.0)
    # the audio lies outside the manifest's folder, so it is named by absolute path, read only when allowed
    assert resolve_audio_path(out, entries["good1_30"], allow_absolute=True) == (audio_dir / "good1_30.wav").resolve()

    reasons = {p.id: p.reason for p in report.problems}
    assert reasons == {"missing1_10": "missing", "corrupt1_0": "corrupt", "silent1_5": "silent", "short1_7": "too_short"}
    assert report.num_candidates == 7 == report.num_usable + len(report.problems)
    assert report.usable_per_split == {"train": 1, "val": 1, "test": 1}

    saved = json.loads(report_path_for(out).read_text())
    assert saved["problem_counts"] == {"missing": 1, "corrupt": 1, "too_short": 1, "silent": 1, "duplicate": 0}
    missing = next(p for p in saved["problems"] if p["reason"] == "missing")
    assert "missing1_10.wav" in missing["detail"]  # says where it looked
    assert saved["num_bad_rows"] == 1 and "line 7" in saved["bad_rows"][0]["where"]
    assert "empty caption" in saved["bad_rows"][0]["detail"]


def test_audiocaps_builder_custom_pattern_and_min_duration(audiocaps_dir, tmp_path):
    csv_dir, audio_dir = audiocaps_dir
    out = tmp_path / "m.jsonl"
    report = build_audiocaps_manifest(
        csv_dir, audio_dir, out, patterns=["{youtube_id}_{start_time}.wav"], min_duration=0.1, splits=["train"]
    )
    assert {e.id for e in read_manifest(out)} == {"good1_30", "short1_7"}
    assert report.num_candidates == 5


def test_builder_leaves_no_partial_manifest_when_interrupted(audiocaps_dir, tmp_path, monkeypatch):
    csv_dir, audio_dir = audiocaps_dir
    out = tmp_path / "m.jsonl"
    out.write_text("previous manifest\n")
    from datamodules import audio_io

    calls = []
    real_check = audio_io.check_audio_file

    def failing_check(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-way
        return real_check(*args, **kwargs)

    monkeypatch.setattr(audio_io, "check_audio_file", failing_check)
    with pytest.raises(KeyboardInterrupt):
        build_audiocaps_manifest(csv_dir, audio_dir, out)
    assert out.read_text() == "previous manifest\n"
    assert not report_path_for(out).exists()
    # only the journal of finished checks is left, so the next build resumes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", "csv", "m.checks.jsonl", "m.jsonl"]
    assert len(checks_path_for(out).read_text().splitlines()) == 1

    calls.clear()
    monkeypatch.setattr(audio_io, "check_audio_file", lambda *a, **k: (calls.append(a[0]), real_check(*a, **k))[1])
    resumed = build_audiocaps_manifest(csv_dir, audio_dir, out)
    first_checked = json.loads(checks_path_for(out).read_text().splitlines()[0])["path"]
    assert first_checked not in map(str, calls) and len(calls) == len(set(map(str, calls)))  # nothing checked twice
    fresh = build_audiocaps_manifest(csv_dir, audio_dir, tmp_path / "fresh" / "m.jsonl", workers=2)  # in 2 processes
    assert [e.id for e in read_manifest(out)] == [e.id for e in read_manifest(tmp_path / "fresh" / "m.jsonl")]
    assert resumed.num_usable == fresh.num_usable


def test_audiocaps_builder_bad_inputs(audiocaps_dir, tmp_path):
    csv_dir, audio_dir = audiocaps_dir
    (csv_dir / "val.csv").write_text("ytid,caption\nx,y\n")
    with pytest.raises(ManifestError, match=r"val\.csv: missing column"):
        build_audiocaps_manifest(csv_dir, audio_dir, tmp_path / "m.jsonl")
    empty_audio = tmp_path / "empty"
    empty_audio.mkdir()
    with pytest.raises(NoUsableClipsError):
        build_audiocaps_manifest(csv_dir, empty_audio, tmp_path / "m.jsonl", splits=["train"])
    assert json.loads(report_path_for(tmp_path / "m.jsonl").read_text())["problem_counts"]["missing"] == 5
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_builds_and_fails_clearly(audiocaps_dir, tmp_path, capsys):
    csv_dir, audio_dir = audiocaps_dir
    out = tmp_path / "cli.jsonl"
    code = build_manifest_main(
        ["audiocaps", "--csv-dir", str(csv_dir), "--audio-dir", str(audio_dir), "--out", str(out), "--no-progress"]
    )
    assert code == 0 and len(read_manifest(out)) == 3
    assert "missing" in capsys.readouterr().out
    # again, with the progress bar: it starts at the clips the check journal already holds (all 6 here)
    assert build_manifest_main(["audiocaps", "--csv-dir", str(csv_dir), "--audio-dir", str(audio_dir), "--out", str(out)]) == 0
    assert re.search(r"checking audiocaps clips: 100%\|.*\| 6/6 \[[\d:]+<", capsys.readouterr().err)
    code = build_manifest_main(
        ["audiocaps", "--csv-dir", str(tmp_path / "nope"), "--audio-dir", str(audio_dir), "--out", str(out)]
    )
    assert code == 2 and "csv folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        build_manifest_main(["audiocaps", "--audio-dir", str(audio_dir)])  # --csv-dir, --out missing
    assert exit_info.value.code != 0


# ------------------------------------------------------------------ WavCaps builder


def test_wavcaps_builder(tmp_path):
    audio_dir = tmp_path / "wavcaps"
    audio_dir.mkdir()
    sf.write(str(audio_dir / "1001.flac"), _tone(2.0), 32000)
    sf.write(str(audio_dir / "Yabc.flac"), _tone(1.2), SR)
    sf.write(str(audio_dir / "quiet.flac"), _tone(2.0, amplitude=1e-4), SR)
    metadata = {"data": [
        {"id": 1001, "caption": "wind blows", "duration": 2.0},
        {"id": "Yabc.wav", "caption": "a bell rings", "audio": "wav_path/Yabc.wav"},
        {"id": "quiet", "caption": "very faint hum"},
        {"id": "gone", "caption": "a missing clip"},
        {"id": "nocap", "caption": ""},
    ]}
    json_path = tmp_path / "FreeSound.json"
    json_path.write_text(json.dumps(metadata))
    out = tmp_path / "fs.jsonl"
    report = build_wavcaps_manifest(json_path, audio_dir, out)
    entries = {e.id: e for e in read_manifest(out)}
    assert set(entries) == {"wavcaps_FreeSound_1001", "wavcaps_FreeSound_Yabc"}
    assert entries["wavcaps_FreeSound_1001"].captions == ["wind blows"]
    assert entries["wavcaps_FreeSound_1001"].sample_rate == 32000 and entries["wavcaps_FreeSound_Yabc"].split == "train"
    assert {p.id: p.reason for p in report.problems} == {
        "wavcaps_FreeSound_quiet": "silent", "wavcaps_FreeSound_gone": "missing"
    }
    assert report.bad_rows == [{"where": f"{json_path} data[4]", "detail": "field 'caption' missing or empty: ''"}]

    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"items": []}))
    assert build_manifest_main(
        ["wavcaps", "--json", str(bad_json), "--audio-dir", str(audio_dir), "--out", str(tmp_path / "b.jsonl")]
    ) == 2


def test_wavcaps_audioset_clips_of_audiocaps_test_are_left_out(tmp_path):
    """The known leak: WavCaps' AudioSet_SL holds AudioCaps evaluation clips."""
    from datamodules.wavcaps import youtube_id_of

    assert youtube_id_of("Y---1_cCGK4M.wav") == "---1_cCGK4M" and youtube_id_of("1001") == "1001"
    audio_dir = tmp_path / "as"
    audio_dir.mkdir()
    for name in ("Y---1_cCGK4M", "YkeepMe12345"):
        sf.write(str(audio_dir / f"{name}.flac"), _tone(2.0), SR)
    json_path = tmp_path / "AudioSet_SL.json"
    json_path.write_text(json.dumps({"data": [{"id": "Y---1_cCGK4M.wav", "caption": "a dog"},
                                              {"id": "YkeepMe12345.wav", "caption": "a car"}]}))
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "test.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,---1_cCGK4M,30,a dog barks\n")
    out = tmp_path / "as.jsonl"
    assert build_manifest_main(["wavcaps", "--json", str(json_path), "--audio-dir", str(audio_dir), "--out", str(out),
                                "--exclude-audiocaps-csv", str(csv_dir / "test.csv"), "--no-progress"]) == 0
    assert [e.id for e in read_manifest(out)] == ["wavcaps_AudioSet_SL_YkeepMe12345"]
    report = json.loads((tmp_path / "as.report.json").read_text())
    assert report["bad_rows"] == [{"where": "Y---1_cCGK4M.wav", "detail": "an AudioCaps evaluation clip (left out: test-set leak)"}]


def test_datamodules_never_import_models_or_experiments():
    import re

    package_dir = Path(manifest_module.__file__).parent
    forbidden = re.compile(r"^\s*(from|import)\s+(lightning_modules|experiments)\b", re.MULTILINE)
    for path in package_dir.glob("*.py"):
        assert not forbidden.search(path.read_text()), f"{path} imports a model or experiment module"
