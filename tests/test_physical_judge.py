"""The physical judge reads the corpus synthesiser's own clips right, per attribute and
for every source and pattern, deterministically; it refuses audio at another rate."""

import collections

import numpy as np
import pytest

from datamodules.synthetic import LABEL_VALUES, SPLIT_CODES, sample_labels, synthesize_clip
from lightning_modules.physical_judge import judge_clip

KEYS = list(LABEL_VALUES)


def fresh_clips(split: str, count: int, seed: int = 123):
    """Clips drawn exactly as the corpus draws them, with a seed the corpus never uses."""
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        labels = sample_labels(split, 0.25, rng)
        yield labels, synthesize_clip(labels, 2.0, 16000, rng)


@pytest.mark.parametrize("split", ["train", "test_novel"])
def test_the_judge_reads_fresh_clips_right(split):
    correct, by_value = collections.Counter(), collections.defaultdict(list)
    clips = list(fresh_clips(split, 120))
    for labels, wave in clips:
        judged = judge_clip(wave, 16000)
        assert set(judged) == set(KEYS) and all(judged[k] in LABEL_VALUES[k] for k in KEYS)
        for key in KEYS:
            correct[key] += judged[key] == labels[key]
        correct["all"] += judged == labels
        for key in ("source", "pattern"):
            by_value[labels[key]].append(judged[key] == labels[key])
    accuracy = {k: v / len(clips) for k, v in correct.items()}
    assert accuracy["all"] >= 0.95, accuracy
    assert min(accuracy[k] for k in KEYS) >= 0.95, accuracy
    for value, hits in by_value.items():  # no source or pattern is the judge's blind spot
        assert np.mean(hits) >= 0.85, (value, np.mean(hits), len(hits))


def test_the_judge_is_deterministic_and_checks_its_input():
    labels, wave = next(fresh_clips("train", 1))
    assert judge_clip(wave, 16000) == judge_clip(wave.copy(), 16000)
    with pytest.raises(ValueError, match="16000 Hz"):
        judge_clip(wave, 44100)
    silent = judge_clip(np.zeros(32000, dtype=np.float32), 16000)  # no crash on silence
    assert set(silent) == set(KEYS)
