"""AudioCapsDataModule: decoding, resampling, cropping, padding, captions, determinism, mixing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.audio_datamodule import AudioCapsDataModule, ClipDataset, SeededClipSampler
from datamodules.audio_io import AudioDecodeError
from datamodules.manifest import ManifestEntry, write_manifest

SR = 16000


def _tone(seconds: float, freq: float, sr: int) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _entry(clip_id, path, seconds, sr, split, captions=None, labels=None) -> ManifestEntry:
    return ManifestEntry(
        id=clip_id, path=path, captions=captions or [f"{clip_id} caption {k}" for k in range(3)],
        duration=seconds, sample_rate=sr, split=split, labels=labels or {"name": clip_id},
    )


@pytest.fixture()
def data_dir(tmp_path):
    """A manifest with: a 44.1 kHz stereo 1 kHz tone, a short clip, a long ramp clip; val/test/test_novel clips."""
    audio = tmp_path / "audio"
    audio.mkdir()
    stereo = np.stack([_tone(1.0, 1000.0, 44100), _tone(1.0, 1000.0, 44100)], axis=1)  # (samples, 2)
    sf.write(str(audio / "stereo.wav"), stereo, 44100, subtype="FLOAT")
    sf.write(str(audio / "short.wav"), _tone(0.5, 440.0, SR), SR, subtype="FLOAT")
    ramp = np.linspace(-0.9, 0.9, 3 * SR).astype(np.float32)  # sample value encodes its position
    sf.write(str(audio / "long.wav"), ramp, SR, subtype="FLOAT")
    for name in ("val", "test", "novel"):
        sf.write(str(audio / f"{name}.wav"), _tone(2.0, 300.0, SR), SR, subtype="PCM_16")
    entries = [
        _entry("stereo", "audio/stereo.wav", 1.0, 44100, "train"),
        _entry("short", "audio/short.wav", 0.5, SR, "train"),
        _entry("long", "audio/long.wav", 3.0, SR, "train"),
        _entry("val", "audio/val.wav", 2.0, SR, "val"),
        _entry("test", "audio/test.wav", 2.0, SR, "test"),
        _entry("novel", "audio/novel.wav", 2.0, SR, "test_novel"),
    ]
    write_manifest(tmp_path / "manifest.jsonl", entries)
    return tmp_path


def _datamodule(data_dir, **overrides) -> AudioCapsDataModule:
    args = dict(manifests=[str(data_dir / "manifest.jsonl")], clip_seconds=1.0, batch_size=3, seed=0)
    args.update(overrides)
    datamodule = AudioCapsDataModule(**args)
    datamodule.setup("fit")
    return datamodule


def _train_batches(datamodule, epochs: int) -> list[dict]:
    loader = datamodule.train_dataloader()
    batches = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        batches.extend(loader)
    return batches


def test_batch_shapes_and_types(data_dir):
    batch = next(iter(_datamodule(data_dir).train_dataloader()))
    assert batch["wave"].shape == (3, SR) and batch["wave"].dtype == torch.float32
    assert batch["wave_mask"].shape == (3, SR) and batch["wave_mask"].dtype == torch.bool
    assert sorted(batch["ids"]) == ["long", "short", "stereo"]
    assert len(batch["captions"]) == 3 and all(isinstance(c, str) for c in batch["captions"])
    assert [labels["name"] for labels in batch["labels"]] == batch["ids"]
    assert all(len(captions) == 3 for captions in batch["all_captions"])


def test_stereo_44k_is_resampled_to_16k_mono_keeping_frequency(data_dir):
    datamodule = _datamodule(data_dir)
    dataset = ClipDataset(datamodule.clips("train"), SR, SR, train=False)
    item = dataset[0]  # the 44.1 kHz stereo 1 kHz tone, exactly 1 s long
    assert item["id"] == "stereo" and item["wave"].shape == (SR,) and item["wave_mask"].all()
    spectrum = np.abs(np.fft.rfft(item["wave"]))
    assert np.argmax(spectrum) * SR / SR == pytest.approx(1000.0, abs=2.0)
    assert np.sqrt(np.mean(item["wave"][100:-100] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_short_clip_is_zero_padded_and_masked(data_dir):
    datamodule = _datamodule(data_dir)
    item = ClipDataset(datamodule.clips("train"), SR, SR, train=False)[1]
    assert item["id"] == "short"
    assert item["wave_mask"].sum() == SR // 2 and item["wave_mask"][: SR // 2].all()
    assert np.all(item["wave"][SR // 2 :] == 0.0) and np.abs(item["wave"][: SR // 2]).max() > 0.4


def test_train_crops_at_random_offsets_and_eval_from_the_start(data_dir):
    datamodule = _datamodule(data_dir)
    long_starts = set()
    for batch in _train_batches(datamodule, epochs=4):
        for wave, clip_id in zip(batch["wave"], batch["ids"]):
            if clip_id == "long":
                assert wave.shape == (SR,)
                long_starts.add(round(float(wave[0]), 3))
    assert len(long_starts) == 4  # a new offset every epoch
    clips = datamodule.clips("train")
    eval_wave = ClipDataset(clips, SR, SR, train=False)[2]["wave"]
    assert eval_wave[0] == pytest.approx(-0.9, abs=1e-4)


def test_random_caption_for_training_and_first_caption_for_eval(data_dir):
    datamodule = _datamodule(data_dir)
    seen = Counter()
    for batch in _train_batches(datamodule, epochs=8):
        seen.update(zip(batch["ids"], batch["captions"]))
    assert len({caption for clip_id, caption in seen if clip_id == "stereo"}) >= 2
    for _ in range(2):
        val = next(iter(datamodule.val_dataloader()))
        assert val["captions"] == ["val caption 0"] and val["ids"] == ["val"]
    test = next(iter(datamodule.test_dataloader()))
    assert test["captions"] == ["test caption 0"]


def test_training_batches_are_deterministic_from_seed_and_independent_of_workers(data_dir):
    torch.manual_seed(123)
    np.random.seed(123)
    first = _train_batches(_datamodule(data_dir, seed=5), epochs=2)
    torch.manual_seed(999)  # global RNG state must not matter
    np.random.seed(999)
    again = _train_batches(_datamodule(data_dir, seed=5, num_workers=1), epochs=2)
    other = _train_batches(_datamodule(data_dir, seed=6), epochs=2)
    for a, b in zip(first, again):
        assert a["ids"] == b["ids"] and a["captions"] == b["captions"]
        assert torch.equal(a["wave"], b["wave"]) and torch.equal(a["wave_mask"], b["wave_mask"])
    assert any(a["ids"] != c["ids"] or not torch.equal(a["wave"], c["wave"]) for a, c in zip(first, other))


def test_split_dataloader_any_split_with_exclusions(data_dir):
    datamodule = AudioCapsDataModule([str(data_dir / "manifest.jsonl")], clip_seconds=1.0, batch_size=4)
    batch = next(iter(datamodule.split_dataloader("test_novel")))
    assert batch["ids"] == ["novel"] and batch["wave"].shape == (1, SR)
    assert datamodule.split_dataloader("test_novel", exclude_ids=["novel"]) is None
    assert datamodule.split_dataloader("no_such_split") is None
    train = datamodule.split_dataloader("train", exclude_ids=["short"])
    assert [i for b in train for i in b["ids"]] == ["stereo", "long"]  # manifest order, eval mode


def test_decode_error_names_the_file_and_missing_files_fail_setup(data_dir):
    (data_dir / "audio" / "long.wav").write_bytes(b"\x00garbage" * 100)
    datamodule = _datamodule(data_dir)
    with pytest.raises(AudioDecodeError, match="long.wav"):
        for _ in datamodule.train_dataloader():
            pass
    (data_dir / "audio" / "val.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)split 'val'.*audio/val.wav"):
        _datamodule(data_dir)
    with pytest.raises(ValueError, match="no clips with split 'nope'"):
        _datamodule(data_dir, train_split="nope", val_split=None)


def test_weighted_mixture_of_manifests(data_dir, tmp_path):
    second = tmp_path / "second"
    (second / "audio").mkdir(parents=True)
    entries = []
    for k in range(6):
        sf.write(str(second / "audio" / f"b{k}.wav"), _tone(1.0, 200.0, SR), SR)
        entries.append(_entry(f"b{k}", f"audio/b{k}.wav", 1.0, SR, "train"))
    write_manifest(second / "manifest.jsonl", entries)
    datamodule = _datamodule(
        data_dir,
        manifests=[(str(data_dir / "manifest.jsonl"), 1.0), {"path": str(second / "manifest.jsonl"), "weight": 3.0}],
        samples_per_epoch=12,
    )
    loader = datamodule.train_dataloader()
    assert len(loader.sampler) == 12 and sum(len(b["ids"]) for b in loader) == 12
    # the sampler alone (no audio decoding): shares follow the weights, not the clip counts
    sampler = SeededClipSampler([3, 6], [1.0, 3.0], seed=0, num_samples=8000)
    from_first = sum(index < 3 for index, _ in sampler)
    assert from_first / 8000 == pytest.approx(0.25, abs=0.02)
    first_epoch, second_epoch = list(sampler), list(sampler)  # the epoch advances per pass
    assert first_epoch != second_epoch
    sampler.set_epoch(0)
    assert list(sampler)[:50] == list(SeededClipSampler([3, 6], [1.0, 3.0], seed=0, num_samples=8000))[:50]


@pytest.mark.parametrize("counts,weights", [([23], [1.0]), ([7, 16], [1.0, 2.0])])
def test_sharded_sampler_splits_each_optimizer_step_the_same_way(counts, weights):
    """Any split of an optimizer step into processes × accumulated micro-batches reads the
    same clips with the same seeds, in the same order of micro-batches, as one process."""
    from datamodules.audio_datamodule import TrainShard

    batch, num = 2, 23
    single = list(SeededClipSampler(counts, weights, seed=3, num_samples=num))
    for replicas, accumulate in [(1, 2), (2, 1), (2, 2), (4, 1)]:
        step = replicas * accumulate * batch
        per_rank = [
            list(SeededClipSampler(counts, weights, seed=3, num_samples=num,
                                   shard=TrainShard(replicas, rank, batch, accumulate)))
            for rank in range(replicas)
        ]
        assert all(len(p) == num // step * accumulate * batch for p in per_rank)
        # interleave: step s = rank 0's K micro-batches, then rank 1's, ...
        merged = [item for s in range(num // step) for p in per_rank
                  for item in p[s * accumulate * batch:(s + 1) * accumulate * batch]]
        assert merged == single[: num // step * step], (replicas, accumulate)
        # ranks never read the same draw
        assert not set(map(tuple, per_rank[0])) & {tuple(x) for p in per_rank[1:] for x in p}


def test_sharded_sampler_refuses_an_epoch_shorter_than_one_step():
    from datamodules.audio_datamodule import TrainShard

    with pytest.raises(ValueError, match="shorter than one optimizer step of 4 processes"):
        SeededClipSampler([10], [1.0], seed=0, shard=TrainShard(4, 0, 2, 2))
    with pytest.raises(ValueError, match="invalid training shard"):
        TrainShard(2, 2, 1, 1)


def _audioldm_reference(waveform: np.ndarray, segment_length: int) -> np.ndarray:
    """AudioLDM's read_wav_file after resampling, channel 0 given (audioldm/audio/tools.py):
    normalize_wav, pad_wav, then peak-normalise to 0.5 again."""
    waveform = waveform - np.mean(waveform)
    waveform = waveform / (np.max(np.abs(waveform)) + 1e-8) * 0.5
    padded = np.zeros(segment_length)
    padded[: len(waveform)] = waveform[:segment_length]
    padded = padded / np.max(np.abs(padded))
    return 0.5 * padded


def test_audioldm_normalisation_equals_its_preprocessing(data_dir):
    from datamodules.audio_io import audioldm_normalize

    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(np.arange(12000) / 7.0) + 0.1 + 0.05 * rng.standard_normal(12000)).astype(np.float32)
    ours = np.zeros(16000, np.float32)
    ours[:12000] = audioldm_normalize(wave)
    assert abs(ours - _audioldm_reference(wave.astype(np.float64), 16000)).max() < 1e-6
    assert np.array_equal(audioldm_normalize(np.zeros(100, np.float32)), np.zeros(100, np.float32))  # silence stays silent
    # through the datamodule: every clip's real samples have mean 0 and peak 0.5, padding stays 0
    batch = next(iter(_datamodule(data_dir, normalize="audioldm").val_dataloader()))
    for wave_row, mask in zip(batch["wave"].numpy(), batch["wave_mask"].numpy()):
        assert abs(np.abs(wave_row[mask]).max() - 0.5) < 1e-6 and abs(wave_row[mask].mean()) < 1e-6
        assert not wave_row[~mask].any()
    with pytest.raises(ValueError, match="normalize must be one of"):
        _datamodule(data_dir, normalize="loud").val_dataloader()
