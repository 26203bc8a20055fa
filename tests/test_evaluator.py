"""The synthetic-corpus attribute evaluator: shapes, label encoding, storage, a training
step, and (slow) `make evaluator` reaching its accuracy bar."""

import json

import numpy as np
import pytest
import torch

from datamodules.synthetic import LABEL_VALUES, sample_labels, synthesize_clip
from lightning_modules.evaluator import AttributeEvaluator, EvaluatorSystem, attribute_accuracy, splice_sequences
from lightning_modules.physical_judge import judge_clip

TINY = dict(channels=(4, 8), embed_dim=16)


def _batch(n: int, seconds: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = [sample_labels("train", 0.5, rng) for _ in range(n)]
    waves = np.stack([synthesize_clip(lab, seconds, 16000, rng) for lab in labels])
    wave = torch.from_numpy(waves)
    return {"wave": wave, "wave_mask": torch.ones_like(wave, dtype=torch.bool), "labels": labels}


def test_evaluator_outputs_one_head_per_attribute():
    model = AttributeEvaluator(LABEL_VALUES, **TINY).eval()
    embedding, logits = model(torch.randn(3, 16000) * 0.1)
    assert embedding.shape == (3, 16)
    assert list(logits) == list(LABEL_VALUES)
    for name, values in LABEL_VALUES.items():
        assert logits[name].shape == (3, len(values))
    out = model.predict(torch.randn(2, 24000) * 0.1)  # any length
    assert out["predicted"].shape == (2, len(LABEL_VALUES))


def test_encode_labels_and_errors():
    model = AttributeEvaluator(LABEL_VALUES, **TINY)
    labels = {"structure": "sequence", "source": "tone", "pitch": "high", "pattern": "steady",
              "source2": "noise", "pitch2": "none", "pattern2": "fade_out"}
    encoded = model.encode_labels([labels])
    assert encoded.tolist() == [[LABEL_VALUES[k].index(v) for k, v in labels.items()]]
    with pytest.raises(ValueError, match="pitch='purple' is not one of"):
        model.encode_labels([{**labels, "pitch": "purple"}])
    with pytest.raises(ValueError, match="have no 'pattern2'"):
        model.encode_labels([{k: v for k, v in labels.items() if k != "pattern2"}])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = AttributeEvaluator(LABEL_VALUES, **TINY).eval()
    path = tmp_path / "evaluator.pt"
    model.save(path, extra={"accuracy": {"val": {"source": 1.0}}})
    loaded = AttributeEvaluator.load(path)
    wave = torch.randn(2, 16000) * 0.1
    assert torch.equal(loaded(wave)[0], model(wave)[0])
    assert loaded.extra["accuracy"]["val"]["source"] == 1.0
    with pytest.raises(FileNotFoundError, match="make evaluator"):
        AttributeEvaluator.load(tmp_path / "missing.pt")


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    system = EvaluatorSystem(LABEL_VALUES, channels=(8, 8), embed_dim=32, lr=3e-3, max_steps=30)
    batch = _batch(8)
    optimizer = torch.optim.AdamW(system.parameters(), lr=3e-3)
    targets = system.model.encode_labels(batch["labels"])
    first = None
    for _ in range(25):
        loss, _ = system._loss(batch["wave"], targets)
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * first  # overfits one batch
    accuracy = attribute_accuracy(system.model, [batch])
    assert set(accuracy) == set(LABEL_VALUES) | {"all_correct", "clips"} and accuracy["clips"] == 8


def test_splice_sequences_makes_gapless_sequences_labelled_with_both_events():
    torch.manual_seed(0)
    batch = _batch(32, seconds=2.0, seed=3)
    wave, labels = batch["wave"], batch["labels"]
    before = wave.clone()
    same_wave, same_labels = splice_sequences(wave, labels, share=0.0)
    assert same_wave is wave and same_labels == labels
    spliced, new_labels = splice_sequences(wave, labels, share=1.0)
    assert torch.equal(wave, before) and new_labels is not labels  # inputs untouched
    half, fade = 16000, 160
    changed = 0
    for i, (old, new) in enumerate(zip(labels, new_labels)):
        if old["structure"] == "sequence" or new["structure"] == "single":
            assert new == old and torch.equal(spliced[i], wave[i])  # real sequences (and unpaired singles) kept
            continue
        changed += 1
        assert (new["source"], new["pitch"], new["pattern"]) == (old["source"], old["pitch"], old["pattern"])
        assert torch.equal(spliced[i, : half - fade], wave[i, : half - fade])
        partner = [j for j in range(len(labels)) if torch.equal(spliced[i, half + fade:], wave[j, half + fade:]) and j != i]
        assert len(partner) == 1 and labels[partner[0]]["structure"] == "single"
        assert (new["source2"], new["pitch2"], new["pattern2"]) == tuple(labels[partner[0]][k] for k in ("source", "pitch", "pattern"))
        assert (new["source2"], new["pitch2"], new["pattern2"]) != (new["source"], new["pitch"], new["pattern"])
        assert new["pattern"] != "fade_out" and new["pattern2"] != "fade_in"  # the halves that stay fades
    assert changed >= 6
    # The labels describe the audio: the physical judge (no training) hears the two events.
    judged = [judge_clip(spliced[i].numpy()) == new_labels[i] for i in range(len(labels))
              if labels[i]["structure"] == "single" and new_labels[i]["structure"] == "sequence"]
    assert np.mean(judged) >= 0.9, judged


@pytest.mark.slow
def test_make_evaluator_reaches_the_accuracy_bar(tmp_path):
    """`make evaluator` on a smaller corpus: ≥ 95 % per attribute on held-out real clips, novel combinations included."""
    from experiments.config import load_config
    from experiments.pipeline import run_task

    cfg = load_config("evaluator", [
        f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data", "corpus.num_train=800", "corpus.num_val=64",
        "corpus.num_test=64", "corpus.num_test_novel=64", "eval.evaluator.max_steps=400", "eval.evaluator.val_every_steps=400",
        "trainer.num_threads=1",
    ])
    run_dir = run_task(cfg)
    report = json.loads((run_dir / "evaluator.json").read_text())
    assert report["meets_min_accuracy"]
    for split in ("val", "test", "test_novel"):
        for name in LABEL_VALUES:
            assert report["accuracy"][split][name] >= 0.95, (split, name, report["accuracy"][split])
    assert AttributeEvaluator.load(run_dir / "evaluator.pt").attributes == list(LABEL_VALUES)
