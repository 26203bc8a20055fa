"""Latent cache format: round trip, resume, fingerprint refusal, train-only stats, DataModule."""

import json

import pytest
import torch

from datamodules.latent_cache import (
    CacheMismatchError,
    LatentCache,
    LatentCacheWriter,
    LatentDataModule,
    LatentDataset,
)

D = 6
FINGERPRINT = {"vae": "abc123", "data": "d1", "token_dim": D}


def fake_clips(n: int = 7) -> list[dict]:
    """Clips with known moments; split: 5 train, 1 val, 1 test; lengths 3..9 tokens."""
    generator = torch.Generator().manual_seed(0)
    clips = []
    for i in range(n):
        length = 3 + i
        clips.append(dict(
            clip_id=f"clip{i}",
            mean=torch.randn(length + 2, D, generator=generator) + i,  # 2 padded rows
            std=torch.rand(length + 2, D, generator=generator) * 0.1 + 0.01,
            token_mask=torch.arange(length + 2) < length,
            captions=[f"caption {i} a", f"caption {i} b"],
            labels=[f"label{i}"],
            split="train" if i < 5 else ("val" if i == 5 else "test"),
        ))
    return clips


def write_cache(cache_dir, clips, shard_size=3, fingerprint=FINGERPRINT, dtype="float32") -> LatentCacheWriter:
    writer = LatentCacheWriter(cache_dir, fingerprint, shard_size=shard_size, dtype=dtype)
    todo = set(writer.pending([c["clip_id"] for c in clips]))
    for clip in clips:
        if clip["clip_id"] in todo:
            writer.add(**clip)
    writer.finalize()
    return writer


def test_round_trip_and_train_only_stats(tmp_path):
    clips = fake_clips()
    write_cache(tmp_path, clips)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    assert index["complete"] and index["token_dim"] == D

    cache = LatentCache(tmp_path, expected_fingerprint=FINGERPRINT)
    assert cache.splits == ["test", "train", "val"]
    records = {r["id"]: r for split in cache.splits for r in cache.records(split)}
    for clip in clips:
        length = int(clip["token_mask"].sum())
        torch.testing.assert_close(records[clip["clip_id"]]["mean"], clip["mean"][:length])
        torch.testing.assert_close(records[clip["clip_id"]]["std"], clip["std"][:length])
        assert records[clip["clip_id"]]["captions"] == clip["captions"]

    train = [c for c in clips if c["split"] == "train"]
    means = torch.cat([c["mean"][c["token_mask"]] for c in train]).double()
    variances = torch.cat([c["std"][c["token_mask"]] for c in train]).double().pow(2)
    expected_std = (means.var(dim=0, unbiased=False) + variances.mean(dim=0)).sqrt()
    torch.testing.assert_close(cache.mean.double(), means.mean(dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.std.double(), expected_std, atol=1e-5, rtol=0)
    assert cache.stats["n_clips"] == 5  # val and test clips excluded


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    clips = fake_clips()
    write_cache(tmp_path / "full", clips, dtype="float16")

    writer = LatentCacheWriter(tmp_path / "resumed", FINGERPRINT, shard_size=3, dtype="float16")
    for clip in clips[:5]:  # "crash" after 5 clips: one shard written, 2 clips lost in the buffer
        writer.add(**clip)
    del writer
    with pytest.raises(RuntimeError, match="incomplete"):
        LatentCache(tmp_path / "resumed")
    resumed = LatentCacheWriter(tmp_path / "resumed", FINGERPRINT, shard_size=3, dtype="float16")
    assert resumed.pending([c["clip_id"] for c in clips]) == [f"clip{i}" for i in range(3, 7)]
    write_cache(tmp_path / "resumed", clips, dtype="float16")

    full, again = LatentCache(tmp_path / "full"), LatentCache(tmp_path / "resumed")
    assert full.stats["mean"] == again.stats["mean"] and full.stats["std"] == again.stats["std"]
    for split in full.splits:
        for a, b in zip(full.records(split), again.records(split), strict=True):
            assert a["id"] == b["id"] and a["captions"] == b["captions"] and a["labels"] == b["labels"]
            assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])
            assert a["mean"].dtype == torch.float16


def test_different_fingerprint_is_refused(tmp_path):
    write_cache(tmp_path, fake_clips())
    other = dict(FINGERPRINT, vae="zzz999")
    with pytest.raises(CacheMismatchError, match=r"vae: cache has 'abc123', expected 'zzz999'.*Delete"):
        LatentCacheWriter(tmp_path, other)
    with pytest.raises(CacheMismatchError, match="different VAE"):
        LatentCache(tmp_path, expected_fingerprint=other)
    with pytest.raises(CacheMismatchError, match="dtype"):
        LatentCacheWriter(tmp_path, FINGERPRINT, dtype="float16")
    with pytest.raises(ValueError, match="already in the cache"):
        LatentCacheWriter(tmp_path, FINGERPRINT, dtype="float32").add(**fake_clips()[0])


def test_stats_need_train_clips(tmp_path):
    clip = dict(fake_clips()[0], split="val")
    writer = LatentCacheWriter(tmp_path, FINGERPRINT)
    writer.add(**clip)
    with pytest.raises(ValueError, match="no clips of split 'train'"):
        writer.finalize()


def test_dataset_sampling_crop_pad_and_captions(tmp_path):
    clips = fake_clips()
    write_cache(tmp_path, clips)
    cache = LatentCache(tmp_path)
    train = LatentDataset(cache, "train", sample_posterior=True, seed=0, max_tokens=5)
    item = train[(4, 11)]  # clip4: 7 tokens -> random crop of 5; item seed 11
    assert item["tokens"].shape == (5, D) and item["tokens"].dtype == torch.float32 and item["token_mask"].all()
    assert item["caption"] in clips[4]["captions"]
    assert not torch.equal(train[(4, 11)]["tokens"], train[(4, 12)]["tokens"])  # re-sampled with each item seed
    assert torch.equal(train[(4, 11)]["tokens"], item["tokens"])  # and reproducible from it
    with pytest.raises(TypeError, match="SeededClipSampler"):
        train[4]
    short = train[(0, 0)]  # clip0: 3 tokens -> padded to 5
    assert short["token_mask"].tolist() == [True, True, True, False, False]
    assert (short["tokens"][3:] == 0).all()

    val = LatentDataset(cache, "val", sample_posterior=False, max_tokens=4)
    first, second = val[0], val[0]
    assert torch.equal(first["tokens"], second["tokens"]) and first["caption"] == clips[5]["captions"][0]
    expected = cache.normalize(clips[5]["mean"][:4])
    torch.testing.assert_close(first["tokens"], expected)


def test_window_start_share_begins_windows_inside_the_clip_as_a_long_form_refill_does(tmp_path):
    """A late-starting window is the clip's own tokens from offset 1..n//2 on, then padding;
    share 0 draws nothing extra (the same items as before the option existed); eval never."""
    clips = fake_clips()
    write_cache(tmp_path, clips)
    cache = LatentCache(tmp_path)
    plain = LatentDataset(cache, "train", sample_posterior=False, max_tokens=9)
    late = LatentDataset(cache, "train", sample_posterior=False, max_tokens=9, window_start_share=1.0)
    half = LatentDataset(cache, "train", sample_posterior=False, max_tokens=9, window_start_share=0.5)
    assert torch.equal(LatentDataset(cache, "train", sample_posterior=False, max_tokens=9, window_start_share=0.0)[(4, 3)]["tokens"],
                       plain[(4, 3)]["tokens"])
    full = cache.normalize(clips[4]["mean"][:7])  # clip4: 7 tokens, padded to 9
    offsets, late_count = set(), 0
    for item_seed in range(40):
        item = late[(4, item_seed)]
        n = int(item["token_mask"].sum())
        offset = 7 - n
        assert 1 <= offset <= 3 and item["token_mask"].tolist() == [True] * n + [False] * (9 - n)
        torch.testing.assert_close(item["tokens"][:n], full[offset:])
        offsets.add(offset)
        late_count += int(half[(4, item_seed)]["token_mask"].sum()) < 7
    assert offsets == {1, 2, 3}
    assert 8 <= late_count <= 32  # about half of 40
    val = LatentDataset(cache, "val", sample_posterior=False, max_tokens=9, train=False, window_start_share=1.0)
    assert int(val[0]["token_mask"].sum()) == 8
    with pytest.raises(ValueError, match="window_start_share"):
        LatentDataset(cache, "train", window_start_share=1.5)


def test_word_dropout_shows_partial_captions_in_training_only(tmp_path):
    """Each word leaves with the given probability, order kept, never all of them; 0 leaves the
    items exactly as before the option existed; validation captions stay whole."""
    from datamodules.latent_cache import drop_words

    caption = "a low buzz slowly dying out"
    generator = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(400):
        dropped = drop_words(caption, 0.25, generator)
        words = dropped.split()
        assert words and all(w in caption.split() for w in words)
        assert [caption.split().index(w) for w in words] == sorted(caption.split().index(w) for w in words)  # order kept
        lengths.append(len(words))
    assert 4.0 < sum(lengths) / len(lengths) < 5.0  # 6 words × 0.75 = 4.5 expected
    assert all(drop_words("buzz", 0.99, generator) == "buzz" for _ in range(20))  # one word always stays

    clips = fake_clips()
    write_cache(tmp_path, clips)
    cache = LatentCache(tmp_path)
    plain = LatentDataset(cache, "train", sample_posterior=True, max_tokens=9)
    none = LatentDataset(cache, "train", sample_posterior=True, max_tokens=9, word_dropout=0.0)
    half = LatentDataset(cache, "train", sample_posterior=True, max_tokens=9, word_dropout=0.5)
    for item_seed in range(5):
        a, b, c = plain[(4, item_seed)], none[(4, item_seed)], half[(4, item_seed)]
        assert a["caption"] == b["caption"] and torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["tokens"], c["tokens"])  # the caption is drawn last: tokens unchanged
    val = LatentDataset(cache, "val", sample_posterior=False, max_tokens=9, train=False, word_dropout=0.5)
    assert val[0]["caption"] == clips[5]["captions"][0]
    with pytest.raises(ValueError, match="word_dropout"):
        LatentDataset(cache, "train", word_dropout=1.0)


def test_datamodule_batches(tmp_path):
    write_cache(tmp_path, fake_clips())
    datamodule = LatentDataModule(tmp_path, batch_size=2, max_tokens=None, seed=0, expected_fingerprint=FINGERPRINT)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["tokens"].shape[0] == 2 and batch["tokens"].shape[2] == D
    assert batch["token_mask"].shape == batch["tokens"].shape[:2]
    assert len(batch["captions"]) == len(batch["ids"]) == len(batch["labels"]) == 2
    val_batch = next(iter(datamodule.val_dataloader()))
    assert val_batch["ids"] == ["clip5"] and val_batch["token_mask"].sum() == 8
    with pytest.raises(KeyError, match="no 'test'"):
        LatentDataModule(tmp_path, splits={"train": "train"}).test_dataloader()


def test_pretransform_feeds_the_cache_and_decodes_back(tmp_path):
    """The caller-side loop of the module docstring, with a tiny random pretransform."""
    from lightning_modules.parts.pretransform import MelVAEPretransform

    torch.manual_seed(0)
    tiny = dict(block_out_channels=(4, 8, 8), layers_per_block=1, latent_channels=8, norm_num_groups=4)
    pretransform = MelVAEPretransform.from_scratch({}, tiny, dict(griffin_lim_iters=1)).eval()
    wave = torch.randn(3, 3200) * 0.1
    wave_mask = torch.ones(3, 3200, dtype=torch.bool)
    wave_mask[2, 1280:] = False
    fingerprint = {"vae": pretransform.fingerprint()}
    writer = LatentCacheWriter(tmp_path, fingerprint, shard_size=2)
    with torch.no_grad():
        mean, std, token_mask = pretransform.encode_moments(wave, wave_mask)
    for i, split in enumerate(["train", "train", "val"]):
        writer.add(f"c{i}", mean[i], std[i], token_mask[i], [f"clip {i}"], None, split)
    writer.finalize()

    cache = LatentCache(tmp_path, expected_fingerprint=fingerprint)
    assert [r["mean"].shape for r in cache.records("val")] == [(2, pretransform.token_dim)]
    item = LatentDataset(cache, "val", sample_posterior=False)[0]
    with torch.no_grad():
        audio = pretransform.decode(cache.denormalize(item["tokens"][None]), normalized=False)
    assert audio.shape == (1, 2 * pretransform.downsampling_ratio)
    other = MelVAEPretransform.from_scratch({}, tiny, dict(griffin_lim_iters=1))
    with pytest.raises(CacheMismatchError):
        LatentCache(tmp_path, expected_fingerprint={"vae": other.fingerprint()})


MEMORY_PROBE = """
import sys, torch
from datamodules.latent_cache import LatentCache

def anonymous_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1])

cache = LatentCache(sys.argv[1], mmap=sys.argv[2] == "1")
before = anonymous_kib()
records = cache.records("train")
total = sum(float(r["mean"].float().sum() + r["std"].float().sum()) for r in records)  # touch every value
print(anonymous_kib() - before)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_shards_are_memory_mapped_not_copied_into_each_process(tmp_path):
    """A rank's private (anonymous) memory does not grow with the cache: the shards are
    file-backed pages shared through the page cache. Reading them without the mapping does
    grow it by the cache's size — the measurement can tell the two apart."""
    import subprocess
    import sys
    from pathlib import Path

    g = torch.Generator().manual_seed(0)
    writer = LatentCacheWriter(tmp_path, fingerprint=FINGERPRINT, shard_size=16, dtype="float32")
    for k in range(64):
        mean = torch.randn(500, 128, generator=g)
        writer.add(f"c{k}", mean, mean.abs(), None, ["a caption"], None, "train")
    writer.finalize()
    data_kib = 64 * 500 * 128 * 4 * 2 // 1024  # 32 MB of mean + std
    repo = Path(__file__).resolve().parents[1]
    grown = {}
    for mmap in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), mmap], cwd=repo,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        grown[mmap] = int(out.stdout.split()[-1])
    assert grown["0"] > 0.8 * data_kib, grown  # a private copy
    assert grown["1"] < 0.25 * data_kib, grown  # mapped: stays in the shared page cache


def test_manifest_weights_reach_lm_training_through_the_cache(tmp_path):
    """The cache remembers each clip's manifest; training draws follow data.manifests weights
    (3 clips weighted 3 vs 9 clips weighted 1 → a 75 % share), not the clip counts."""
    from datamodules.latent_cache import LatentDataModule

    g = torch.Generator().manual_seed(0)
    writer = LatentCacheWriter(tmp_path, fingerprint=FINGERPRINT, shard_size=4, dtype="float32")
    for k in range(12):
        mean = torch.randn(6, 4, generator=g)
        writer.add(f"c{k}", mean, mean.abs(), None, ["cap"], None, "train", source=0 if k % 4 == 0 else 1)
    writer.finalize()
    datamodule = LatentDataModule(tmp_path, batch_size=2, max_tokens=6, splits={"train": "train"},
                                  source_weights=[3.0, 1.0])
    loader = datamodule.train_dataloader()
    dataset, sampler = loader.dataset, loader.sampler
    assert dataset.source_counts == [3, 9] and len(sampler) == 12
    draws = [dataset.records[index]["source"] for _ in range(500) for index, _ in sampler]
    assert draws.count(0) / len(draws) == pytest.approx(0.75, abs=0.02)
    unweighted = LatentDataModule(tmp_path, batch_size=2, max_tokens=6, splits={"train": "train"}).train_dataloader()
    assert sorted(i for i, _ in unweighted.sampler) == list(range(12))  # one manifest: a permutation, as before


def test_bad_window_start_settings_are_refused_before_any_work(tmp_path):
    from experiments import pipeline
    from experiments.config import ConfigError, load_config

    cfg = load_config("demo", ["model.window_start_share=1.5", f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data"])
    with pytest.raises(ConfigError, match="model.window_start_share must be in"):
        pipeline.train_audio_lm(cfg)
    cfg = load_config("demo", ["model.mid_start_bos=true", f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data"])
    with pytest.raises(ConfigError, match="model.mid_start_bos=true needs model.window_start_share > 0"):
        pipeline.train_audio_lm(cfg)
    cfg = load_config("demo", ["text.word_dropout=1.0", f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data"])
    with pytest.raises(ConfigError, match="text.word_dropout must be in"):
        pipeline.train_audio_lm(cfg)
    assert not any(tmp_path.iterdir())  # nothing prepared, nothing written
