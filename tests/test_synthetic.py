"""The synthetic corpus: determinism, caching, and labels that truly describe the audio."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.audio_io import load_audio
from datamodules.manifest import read_manifest, resolve_audio_path
from datamodules.synthetic import (
    LABEL_VALUES,
    NOVEL_COMBINATIONS,
    PITCH_HZ,
    PITCH_WORDS,
    PITCHES_OF_SOURCE,
    SEEN_COMBINATIONS,
    SETTINGS_FILE,
    describe_corpus_vocabulary,
    event_combinations,
    generate_corpus,
    synthesize_clip,
)

SR = 16000
SMALL = dict(num_train=90, num_val=6, num_test=6, num_test_novel=24)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus: (manifest path, {id: entry})."""
    manifest_path = generate_corpus(tmp_path_factory.mktemp("synthetic"), seed=3, **SMALL)
    return manifest_path, {entry.id: entry for entry in read_manifest(manifest_path)}


def _load(manifest_path, entry) -> np.ndarray:
    return load_audio(resolve_audio_path(manifest_path, entry), SR)


def _dominant_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * SR / len(wave))


def _frame_rms(wave: np.ndarray, frame: int = 160) -> np.ndarray:
    """(frames,) RMS per 10 ms frame."""
    frames = wave[: len(wave) // frame * frame].reshape(-1, frame)
    return np.sqrt((frames**2).mean(axis=1))


def _single(labels, source=None, pitch=None, pattern=None) -> bool:
    return labels["structure"] == "single" and all(
        want is None or labels[key] == want for key, want in (("source", source), ("pitch", pitch), ("pattern", pattern))
    )


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    settings = dict(num_train=6, num_val=2, num_test=2, num_test_novel=2, clip_seconds=1.0)
    first = generate_corpus(tmp_path / "a", seed=7, **settings)
    second = generate_corpus(tmp_path / "b", seed=7, **settings)
    other = generate_corpus(tmp_path / "c", seed=8, **settings)
    assert first.read_bytes() == second.read_bytes()
    files = sorted(p.name for p in (first.parent / "audio").iterdir())
    assert len(files) == 12
    for name in files:
        assert (first.parent / "audio" / name).read_bytes() == (second.parent / "audio" / name).read_bytes()
    assert (other.parent / "audio" / files[0]).read_bytes() != (first.parent / "audio" / files[0]).read_bytes()


def test_generation_is_skipped_when_complete_and_redone_when_settings_change_or_interrupted(tmp_path):
    settings = dict(num_train=3, num_val=1, num_test=1, num_test_novel=1, clip_seconds=0.5)
    manifest_path = generate_corpus(tmp_path, **settings)
    wav = tmp_path / "audio" / "train_00000.wav"
    wav.write_bytes(b"sentinel")  # would be overwritten by a regeneration
    generate_corpus(tmp_path, **settings)
    assert wav.read_bytes() == b"sentinel"

    manifest_path.unlink()  # as if a run was interrupted before writing the manifest
    generate_corpus(tmp_path, **settings)
    assert wav.read_bytes() != b"sentinel" and manifest_path.is_file()

    generate_corpus(tmp_path, **{**settings, "num_train": 2})  # fewer clips: stale file removed
    assert not (tmp_path / "audio" / "train_00002.wav").exists()
    assert len(read_manifest(manifest_path)) == 5
    assert '"num_train": 2' in (tmp_path / SETTINGS_FILE).read_text()


def test_manifest_fields_labels_and_captions(corpus):
    manifest_path, entries = corpus
    assert len(entries) == sum(SMALL.values())
    for entry in entries.values():
        assert set(entry.labels) == set(LABEL_VALUES)
        for key, value in entry.labels.items():
            assert value in LABEL_VALUES[key], (entry.id, key, value)
        for source, pitch, _ in event_combinations(entry.labels):
            assert pitch in PITCHES_OF_SOURCE[source]
        assert len(entry.captions) == 3 and len(set(entry.captions)) >= 2
        assert entry.sample_rate == SR and entry.duration == pytest.approx(2.0)
        if entry.labels["structure"] == "single" and entry.labels["pitch"] in ("low", "high"):
            synonyms = [w for w in PITCH_WORDS[entry.labels["pitch"]] if w]
            assert all(any(word in caption for word in synonyms) for caption in entry.captions), entry.captions
        if entry.labels["structure"] == "sequence":
            assert entry.labels["source2"] != "none"
    assert {e.labels["structure"] for e in entries.values()} == {"single", "sequence"}


def test_test_novel_combinations_never_occur_outside_test_novel(corpus):
    _, entries = corpus
    assert set(NOVEL_COMBINATIONS).isdisjoint(SEEN_COMBINATIONS)
    for entry in entries.values():
        combos = event_combinations(entry.labels)
        if entry.split == "test_novel":
            assert any(c in NOVEL_COMBINATIONS for c in combos), entry.labels
        else:
            assert not any(c in NOVEL_COMBINATIONS for c in combos), entry.labels
    vocabulary = describe_corpus_vocabulary()
    assert [tuple(c) for c in vocabulary["novel_combinations"]] == NOVEL_COMBINATIONS
    # every attribute value of a held-out triple is still seen in training, in other combinations
    for source, pitch, pattern in NOVEL_COMBINATIONS:
        assert any(c[0] == source for c in SEEN_COMBINATIONS)
        assert any(c[1] == pitch for c in SEEN_COMBINATIONS)
        assert any(c[2] == pattern for c in SEEN_COMBINATIONS)


@pytest.mark.parametrize("source", ["tone", "buzz"])
@pytest.mark.parametrize("pitch", ["low", "medium", "high"])
def test_pitch_label_sets_the_dominant_frequency(source, pitch):
    labels = {"structure": "single", "source": source, "pitch": pitch, "pattern": "steady",
              "source2": "none", "pitch2": "none", "pattern2": "none"}
    wave = synthesize_clip(labels, 2.0, SR, np.random.default_rng(0))
    assert _dominant_hz(wave) == pytest.approx(PITCH_HZ[pitch], rel=0.05)


def test_corpus_files_match_their_pitch_labels(corpus):
    manifest_path, entries = corpus
    checked = 0
    for entry in entries.values():
        if _single(entry.labels) and entry.labels["source"] in ("tone", "buzz") and entry.labels["pattern"] == "steady":
            dominant = _dominant_hz(_load(manifest_path, entry))
            assert dominant == pytest.approx(PITCH_HZ[entry.labels["pitch"]], rel=0.05), entry.labels
            checked += 1
    assert checked >= 2


def test_pulsing_envelope_oscillates_at_about_4_hz_and_steady_does_not(corpus):
    manifest_path, entries = corpus
    pulsing = [e for e in entries.values() if _single(e.labels, pattern="pulsing") and e.labels["source"] != "click"]
    steady = [e for e in entries.values() if _single(e.labels, source="tone", pattern="steady")]
    assert pulsing and steady
    for entry in pulsing:
        envelope = _frame_rms(_load(manifest_path, entry))  # 100 frames / s
        spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
        rate = np.argmax(spectrum) * 100.0 / len(envelope)
        assert 3.0 <= rate <= 5.0, (entry.id, rate)
        assert envelope.min() < 0.1 * envelope.max()  # really goes off
    for entry in steady:
        envelope = _frame_rms(_load(manifest_path, entry))[10:-10]  # skip the 10 ms edge ramps
        assert envelope.std() / envelope.mean() < 0.1, entry.id


def test_fades_and_sweep_direction(corpus):
    manifest_path, entries = corpus
    checked = {"fade_out": 0, "fade_in": 0, "sweep": 0}
    for entry in entries.values():
        if not _single(entry.labels):
            continue
        wave = _load(manifest_path, entry)
        quarter = len(wave) // 4
        first, last = np.mean(wave[:quarter] ** 2), np.mean(wave[-quarter:] ** 2)
        if entry.labels["pattern"] == "fade_out":
            assert first > 5 * last, entry.id
            checked["fade_out"] += 1
        if entry.labels["pattern"] == "fade_in":
            assert last > 5 * first, entry.id
            checked["fade_in"] += 1
        if entry.labels["source"] == "sweep" and entry.labels["pattern"] == "steady":
            start, end = _dominant_hz(wave[:quarter]), _dominant_hz(wave[-quarter:])
            assert (start < end) == (entry.labels["pitch"] == "rising"), (entry.id, start, end)
            checked["sweep"] += 1
    assert checked["fade_out"] and checked["fade_in"]


def test_sequence_halves_differ(corpus):
    manifest_path, entries = corpus
    sequences = [e for e in entries.values() if e.labels["structure"] == "sequence"
                 and (e.labels["source"], e.labels["pitch"]) != (e.labels["source2"], e.labels["pitch2"])]
    assert sequences
    for entry in sequences:
        wave = _load(manifest_path, entry)
        half = len(wave) // 2
        spectra = [np.abs(np.fft.rfft(part))[: half // 4] for part in (wave[:half], wave[half:])]  # 0-4 kHz
        cosine = spectra[0] @ spectra[1] / (np.linalg.norm(spectra[0]) * np.linalg.norm(spectra[1]))
        assert cosine < 0.8, (entry.id, entry.labels, cosine)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_sweep_label_sets_its_direction(direction):
    labels = {"structure": "single", "source": "sweep", "pitch": direction, "pattern": "steady",
              "source2": "none", "pitch2": "none", "pattern2": "none"}
    wave = synthesize_clip(labels, 2.0, SR, np.random.default_rng(1))
    quarter = len(wave) // 4
    start, end = _dominant_hz(wave[:quarter]), _dominant_hz(wave[-quarter:])
    assert (end > 2 * start) if direction == "rising" else (start > 2 * end)
