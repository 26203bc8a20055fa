"""The built-in synthetic caption/audio corpus: deterministic, fast, labelled.

Every clip is made of one event ("single") or two events, one per half of the clip
("sequence": "A followed by B"). An event is a (source, pitch, pattern) triple:

    source   tone (sine), buzz (square wave: odd harmonics), noise (white hiss),
             click (impulse train, 8-12 clicks/s), sweep (log chirp 200 <-> 3000 Hz)
    pitch    tone/buzz: low ≈ 220 Hz, medium ≈ 440 Hz, high ≈ 880 Hz (±3 % jitter);
             sweep: rising / falling (its direction); noise/click: none
    pattern  steady; pulsing (on-off gate at ≈ 4 Hz, 50 % duty); fade_in (amplitude
             0 -> 1, linear); fade_out (1 -> 0)

Each clip gets a small random gain (±3 dB per event) and faint white background noise
(about -60 to -50 dBFS RMS), and `captions_per_clip` paraphrases built from several
templates and synonyms per attribute ("a high pitched beep repeating quickly",
"low buzz fading away", "a rising chirp, then a steady hiss").

Labels (all clips carry every key; see LABEL_VALUES):
    structure            "single" | "sequence"
    source/pitch/pattern the first (or only) event
    source2/pitch2/pattern2  the second event of a sequence, "none" for single clips

Splits: train / val / test use only triples outside NOVEL_COMBINATIONS; test_novel
clips are built from those held-out triples (singles: the held-out triple; sequences:
at least one held-out event), so test_novel tests compositional generalisation: every
attribute value is seen in training, those combinations never are.

Generation is deterministic: clip i of split s is drawn from a generator seeded with
(seed, s, i), so it does not depend on the other clips or on global RNG state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import chirp

from datamodules.audio_io import save_wav
from datamodules.atomic import write_text_atomic
from datamodules.manifest import ManifestEntry, read_manifest, write_manifest

CORPUS_VERSION = 1
SETTINGS_FILE = "corpus_settings.json"
MANIFEST_FILE = "manifest.jsonl"
AUDIO_FOLDER = "audio"

SOURCES = ["tone", "buzz", "noise", "click", "sweep"]
PITCHES = ["low", "medium", "high", "rising", "falling", "none"]
PATTERNS = ["steady", "pulsing", "fade_in", "fade_out"]
PITCHES_OF_SOURCE = {
    "tone": ["low", "medium", "high"],
    "buzz": ["low", "medium", "high"],
    "noise": ["none"],
    "click": ["none"],
    "sweep": ["rising", "falling"],
}
LABEL_VALUES: dict[str, list[str]] = {
    "structure": ["single", "sequence"],
    "source": SOURCES,
    "pitch": PITCHES,
    "pattern": PATTERNS,
    "source2": SOURCES + ["none"],
    "pitch2": PITCHES,
    "pattern2": PATTERNS + ["none"],
}
PITCH_HZ = {"low": 220.0, "medium": 440.0, "high": 880.0}
PITCH_JITTER = 0.03  # relative, uniform ±
SWEEP_RANGE_HZ = (200.0, 3000.0)
PULSE_RATE_HZ = 4.0  # on-off cycles per second (±10 % jitter)
CLICK_RATE_HZ = (8.0, 12.0)
EVENT_LEVEL = 0.4  # peak amplitude of an event before the random gain
CLICK_LEVEL = 0.65  # clicks are sparse: a higher peak keeps their loudness nearer the others
EVENT_GAIN_DB = 3.0  # uniform ± per event
BACKGROUND_RMS = (0.001, 0.003)

# (source, pitch, pattern) triples held out of train/val/test, used only by test_novel.
NOVEL_COMBINATIONS: list[tuple[str, str, str]] = [
    ("tone", "high", "fade_in"),
    ("buzz", "low", "pulsing"),
    ("noise", "none", "fade_out"),
    ("sweep", "rising", "pulsing"),
    ("click", "none", "fade_in"),
]
ALL_COMBINATIONS: list[tuple[str, str, str]] = [
    (source, pitch, pattern) for source in SOURCES for pitch in PITCHES_OF_SOURCE[source] for pattern in PATTERNS
]
SEEN_COMBINATIONS: list[tuple[str, str, str]] = [c for c in ALL_COMBINATIONS if c not in NOVEL_COMBINATIONS]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test_novel": 3}


def describe_corpus_vocabulary() -> dict[str, Any]:
    """Everything an evaluator needs to classify the corpus' attributes (JSON-able)."""
    return {
        "label_values": {k: list(v) for k, v in LABEL_VALUES.items()},
        "pitches_of_source": {k: list(v) for k, v in PITCHES_OF_SOURCE.items()},
        "pitch_hz": dict(PITCH_HZ),
        "pulse_rate_hz": PULSE_RATE_HZ,
        "sweep_range_hz": list(SWEEP_RANGE_HZ),
        "novel_combinations": [list(c) for c in NOVEL_COMBINATIONS],
        "seen_combinations": [list(c) for c in SEEN_COMBINATIONS],
    }


# ----------------------------------------------------------------------------- audio


def _edge_ramps(num_samples: int, sample_rate: int, ramp_seconds: float = 0.01) -> np.ndarray:
    """(num_samples,) gain with short linear ramps at both ends (no clicks at event edges)."""
    gain = np.ones(num_samples, dtype=np.float64)
    ramp = min(int(ramp_seconds * sample_rate), num_samples // 2)
    if ramp > 0:
        gain[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
        gain[num_samples - ramp :] = np.linspace(1.0, 0.0, ramp, endpoint=False)
    return gain


def render_source(source: str, pitch: str, num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One sound source with peak ≈ 1.

    Returns:
        (num_samples,) float64 waveform.
    """
    if pitch not in PITCHES_OF_SOURCE.get(source, []):
        raise ValueError(f"invalid synthetic event: source {source!r} with pitch {pitch!r}")
    t = np.arange(num_samples) / sample_rate  # (S,)
    if source in ("tone", "buzz"):
        f0 = PITCH_HZ[pitch] * (1.0 + rng.uniform(-PITCH_JITTER, PITCH_JITTER))
        phase = rng.uniform(0.0, 2 * np.pi)
        if source == "tone":
            return np.sin(2 * np.pi * f0 * t + phase)
        nyquist_guard = 0.9 * sample_rate / 2
        # square wave = sum over odd harmonics k of sin(k·θ)/k; e^{ikθ} built by repeated
        # multiplication with e^{2iθ} (much faster than one sin per harmonic)
        fundamental = np.exp(1j * (2 * np.pi * f0 * t + phase))  # (S,) complex
        step, current = fundamental * fundamental, fundamental.copy()
        wave = np.zeros(num_samples)
        for harmonic in range(1, int(nyquist_guard // f0) + 1, 2):
            wave += current.imag / harmonic
            current *= step
        return wave / np.max(np.abs(wave))
    if source == "noise":
        return np.clip(rng.standard_normal(num_samples) / 3.0, -1.0, 1.0)
    if source == "click":
        rate = rng.uniform(*CLICK_RATE_HZ)
        click_length = int(0.015 * sample_rate)
        click = rng.standard_normal(click_length) * np.exp(-np.arange(click_length) / (0.002 * sample_rate))
        click /= np.max(np.abs(click))
        wave = np.zeros(num_samples + click_length)
        start = rng.uniform(0.0, 1.0 / rate)
        for onset in np.arange(start, num_samples / sample_rate, 1.0 / rate):
            index = int(onset * sample_rate)
            wave[index : index + click_length] += click
        return wave[:num_samples]
    # sweep
    low, high = SWEEP_RANGE_HZ[0] * rng.uniform(0.9, 1.1), SWEEP_RANGE_HZ[1] * rng.uniform(0.9, 1.1)
    f_start, f_end = (low, high) if pitch == "rising" else (high, low)
    duration = max(num_samples / sample_rate, 1e-3)
    return chirp(t, f0=f_start, t1=duration, f1=f_end, method="logarithmic", phi=rng.uniform(0, 360))


def render_envelope(pattern: str, num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Amplitude envelope in [0, 1] of a temporal pattern.

    Returns:
        (num_samples,) float64.
    """
    if pattern == "steady":
        return np.ones(num_samples)
    if pattern == "pulsing":
        rate = PULSE_RATE_HZ * rng.uniform(0.9, 1.1)
        t = np.arange(num_samples) / sample_rate
        gate = (np.mod(t * rate + rng.uniform(0.0, 1.0), 1.0) < 0.5).astype(np.float64)
        smooth = max(int(0.005 * sample_rate), 1)  # 5 ms ramps on each gate edge
        return np.convolve(gate, np.ones(smooth) / smooth, mode="same")
    if pattern == "fade_in":
        return np.linspace(0.0, 1.0, num_samples)
    if pattern == "fade_out":
        return np.linspace(1.0, 0.0, num_samples)
    raise ValueError(f"unknown synthetic pattern {pattern!r}; expected one of {PATTERNS}")


def render_event(
    source: str, pitch: str, pattern: str, num_samples: int, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """One event at EVENT_LEVEL (CLICK_LEVEL) peak times a ±EVENT_GAIN_DB random gain, (num_samples,) float64."""
    level = CLICK_LEVEL if source == "click" else EVENT_LEVEL
    gain = level * 10 ** (rng.uniform(-EVENT_GAIN_DB, EVENT_GAIN_DB) / 20)
    wave = render_source(source, pitch, num_samples, sample_rate, rng)
    envelope = render_envelope(pattern, num_samples, sample_rate, rng)
    return gain * wave * envelope * _edge_ramps(num_samples, sample_rate)


def synthesize_clip(labels: dict[str, str], clip_seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """The waveform described by a clip's labels (module docstring), plus background noise.

    Returns:
        (round(clip_seconds * sample_rate),) float32 in [-1, 1].
    """
    num_samples = int(round(clip_seconds * sample_rate))
    wave = np.zeros(num_samples)
    if labels["structure"] == "single":
        wave += render_event(labels["source"], labels["pitch"], labels["pattern"], num_samples, sample_rate, rng)
    elif labels["structure"] == "sequence":
        half = num_samples // 2
        wave[:half] += render_event(labels["source"], labels["pitch"], labels["pattern"], half, sample_rate, rng)
        wave[half:] += render_event(
            labels["source2"], labels["pitch2"], labels["pattern2"], num_samples - half, sample_rate, rng
        )
    else:
        raise ValueError(f"unknown structure {labels['structure']!r}; expected 'single' or 'sequence'")
    wave += rng.uniform(*BACKGROUND_RMS) * rng.standard_normal(num_samples)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------------- captions

SOURCE_WORDS = {
    "tone": ["tone", "beep", "pure tone", "sine tone", "whistle"],
    "buzz": ["buzz", "buzzer", "buzzing sound", "square wave buzz", "harsh drone"],
    "noise": ["hiss", "white noise", "static noise", "hissing noise"],
    "click": ["clicking", "ticking", "series of clicks", "ticking sound"],
    "sweep": ["sweep", "chirp", "siren-like glide", "frequency sweep"],
}
PITCH_WORDS = {
    "low": ["low", "low pitched", "deep"],
    "medium": ["medium pitched", "mid pitched", "moderately pitched"],
    "high": ["high", "high pitched", "shrill"],
    "rising": ["rising", "upward", "ascending"],
    "falling": ["falling", "downward", "descending"],
    "none": [""],
}
PATTERN_ADJECTIVES = {
    "steady": ["steady", "continuous", "constant"],
    "pulsing": ["pulsing", "repeating", "intermittent"],
    "fade_in": ["swelling", "slowly emerging"],
    "fade_out": ["fading", "dying"],
}
PATTERN_PHRASES = {
    "steady": ["that stays steady", "held without a break", "playing continuously"],
    "pulsing": ["repeating quickly", "pulsing on and off", "beeping rapidly"],
    "fade_in": ["fading in", "getting louder", "slowly growing louder"],
    "fade_out": ["fading away", "getting quieter", "slowly dying out"],
}
SINGLE_TEMPLATES = [
    "{art} {pitch} {source} {phrase}",
    "{art} {adjective} {pitch} {source}",
    "{pitch} {source} {phrase}",
    "the sound of {art} {pitch} {source} {phrase}",
]
SEQUENCE_TEMPLATES = [
    "{first} followed by {second}",
    "{first}, then {second}",
    "first {first}, and then {second}",
    "{first} and afterwards {second}",
]
EVENT_TEMPLATES = ["{art} {pitch} {source} {phrase}", "{art} {adjective} {pitch} {source}"]


def _fill(template: str, source: str, pitch: str, pattern: str, rng: np.random.Generator) -> str:
    words = {
        "source": str(rng.choice(SOURCE_WORDS[source])),
        "pitch": str(rng.choice(PITCH_WORDS[pitch])),
        "adjective": str(rng.choice(PATTERN_ADJECTIVES[pattern])),
        "phrase": str(rng.choice(PATTERN_PHRASES[pattern])),
        "art": "{art}",
    }
    text = " ".join(template.format(**words).split())  # collapse gaps left by an empty pitch
    tokens = text.split(" ")
    for i, token in enumerate(tokens[:-1]):  # a / an by the next word's first letter
        if token == "{art}":
            tokens[i] = "an" if tokens[i + 1][0] in "aeiou" else "a"
    return " ".join(tokens)


def make_captions(labels: dict[str, str], count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct-template paraphrases describing a clip's labels."""
    if labels["structure"] == "single":
        templates = rng.permutation(len(SINGLE_TEMPLATES))
        return [
            _fill(SINGLE_TEMPLATES[templates[i % len(templates)]], labels["source"], labels["pitch"], labels["pattern"], rng)
            for i in range(count)
        ]
    templates = rng.permutation(len(SEQUENCE_TEMPLATES))
    captions = []
    for i in range(count):
        first = _fill(str(rng.choice(EVENT_TEMPLATES)), labels["source"], labels["pitch"], labels["pattern"], rng)
        second = _fill(str(rng.choice(EVENT_TEMPLATES)), labels["source2"], labels["pitch2"], labels["pattern2"], rng)
        captions.append(SEQUENCE_TEMPLATES[templates[i % len(templates)]].format(first=first, second=second))
    return captions


# ---------------------------------------------------------------------------- corpus


def sample_labels(split: str, sequence_fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """Draw a clip's labels for a split (test_novel draws from NOVEL_COMBINATIONS)."""
    novel = split == "test_novel"
    pool = NOVEL_COMBINATIONS if novel else SEEN_COMBINATIONS
    first = pool[rng.integers(len(pool))]
    if rng.random() >= sequence_fraction:
        return {
            "structure": "single", "source": first[0], "pitch": first[1], "pattern": first[2],
            "source2": "none", "pitch2": "none", "pattern2": "none",
        }
    other_pool = ALL_COMBINATIONS if novel else SEEN_COMBINATIONS
    second = first
    while second == first:
        second = other_pool[rng.integers(len(other_pool))]
    if novel and rng.random() < 0.5:  # the held-out event may come first or second
        first, second = second, first
    return {
        "structure": "sequence", "source": first[0], "pitch": first[1], "pattern": first[2],
        "source2": second[0], "pitch2": second[1], "pattern2": second[2],
    }


def event_combinations(labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """The (source, pitch, pattern) triple of each event of a clip."""
    events = [(labels["source"], labels["pitch"], labels["pattern"])]
    if labels["structure"] == "sequence":
        events.append((labels["source2"], labels["pitch2"], labels["pattern2"]))
    return events


def _corpus_settings(**kwargs: Any) -> dict[str, Any]:
    return {"corpus_version": CORPUS_VERSION, **kwargs}


def is_corpus_complete(out_dir: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """True if `out_dir` holds a finished corpus made with exactly these settings."""
    out_dir = Path(out_dir)
    settings_path, manifest_path = out_dir / SETTINGS_FILE, out_dir / MANIFEST_FILE
    if not settings_path.is_file() or not manifest_path.is_file():
        return False
    try:
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        entries = read_manifest(manifest_path)
    except (ValueError, OSError):
        return False
    expected = sum(settings[f"num_{split}"] for split in SPLIT_CODES)
    return stored == settings and len(entries) == expected and all(
        (out_dir / entry.path).is_file() for entry in entries
    )


def generate_corpus(
    out_dir: str | os.PathLike,
    seed: int = 0,
    clip_seconds: float = 2.0,
    sample_rate: int = 16000,
    num_train: int = 2000,
    num_val: int = 100,
    num_test: int = 200,
    num_test_novel: int = 200,
    sequence_fraction: float = 0.25,
    captions_per_clip: int = 3,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write the synthetic corpus: `out_dir/audio/<id>.wav` (PCM16 mono) + `out_dir/manifest.jsonl`.

    Skips the work when `out_dir` already holds a complete corpus with the same settings
    (stored in `out_dir/corpus_settings.json`). Otherwise the old manifest is removed
    first and the new one is written last, so an interrupted run is never mistaken for
    a finished one; wavs left over from other settings are deleted.

    Args:
        out_dir: corpus folder (created).
        seed: corpus seed; same seed and settings -> identical files.
        clip_seconds, sample_rate: every clip's length and rate.
        num_train, num_val, num_test, num_test_novel: clips per split.
        sequence_fraction: share of "A followed by B" clips.
        captions_per_clip: paraphrases per clip.
        force: regenerate even when a matching corpus exists.
        progress: show a tqdm progress bar.

    Returns:
        The manifest path.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test, "test_novel": num_test_novel}
    if any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"clip counts must be non-negative integers, got {counts}")
    if not 0.0 <= sequence_fraction <= 1.0:
        raise ValueError(f"sequence_fraction must be in [0, 1], got {sequence_fraction}")
    if captions_per_clip < 1 or clip_seconds <= 0 or sample_rate <= 0:
        raise ValueError("captions_per_clip, clip_seconds and sample_rate must be positive")
    settings = _corpus_settings(
        seed=seed, clip_seconds=float(clip_seconds), sample_rate=int(sample_rate),
        sequence_fraction=float(sequence_fraction), captions_per_clip=int(captions_per_clip),
        **{f"num_{split}": n for split, n in counts.items()},
    )
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE
    if not force and is_corpus_complete(out_dir, settings):
        return manifest_path

    out_dir.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # from here until the end, the corpus reads as incomplete
    audio_dir = out_dir / AUDIO_FOLDER
    audio_dir.mkdir(exist_ok=True)
    write_text_atomic(out_dir / SETTINGS_FILE, json.dumps(settings, indent=2))

    jobs = [(split, index) for split, n in counts.items() for index in range(n)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc=f"[corpus] {out_dir.name}", unit="clip", mininterval=2, dynamic_ncols=True)
    entries = []
    for split, index in jobs:
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        labels = sample_labels(split, sequence_fraction, rng)
        captions = make_captions(labels, captions_per_clip, rng)
        wave = synthesize_clip(labels, clip_seconds, sample_rate, rng)  # (S,)
        clip_id = f"{split}_{index:05d}"
        relative_path = f"{AUDIO_FOLDER}/{clip_id}.wav"
        save_wav(out_dir / relative_path, wave, sample_rate)
        entries.append(
            ManifestEntry(
                id=clip_id, path=relative_path, captions=captions, duration=wave.shape[0] / sample_rate,
                sample_rate=sample_rate, split=split, labels=labels,
            )
        )
    expected_files = {Path(entry.path).name for entry in entries}
    for stale in audio_dir.glob("*.wav"):
        if stale.name not in expected_files:
            stale.unlink()
    write_manifest(manifest_path, entries)
    return manifest_path

