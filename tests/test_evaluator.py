"""The synthetic-corpus attribute evaluator: shapes, label encoding, storage, a training
step, and (slow) `make evaluator` reaching its accuracy bar."""

import json

import numpy as np
import pytest
import torch

from datamodules.synthetic import LABEL_VALUES, sample_labels, synthesize_clip
from lightning_modules.evaluator import AttributeEvaluator, EvaluatorSystem, attribute_accuracy

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
