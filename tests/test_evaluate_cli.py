"""`make eval` (experiments/evaluate.py): files, tables, caching, resumption, errors.

The fast tests replace the language model by a stub (the LM and the demo pipeline have
their own tests) and use a random tiny evaluator / tiny AudioSet networks, so they check
this module's plumbing — what is written where, in which format, paired how — not the
metric values. The slow test runs the real demo pipeline end to end on a shrunk config.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from experiments import evaluate as ev
from experiments.config import load_config

SECONDS = 1.0


class StubSystem:
    """Stands in for AudioLMSystem: a config, a token budget, and a device."""

    def __init__(self, config: dict) -> None:
        self.hparams = {"config": config}
        self.decoder = SimpleNamespace(max_tokens=100)
        self.device = torch.device("cpu")

    def eval(self):
        return self


def _tiny_pretransform():
    from lightning_modules.parts.pretransform import MelVAEPretransform

    return MelVAEPretransform.from_scratch(
        vae_cfg=dict(block_out_channels=[8, 8, 8], layers_per_block=1, latent_channels=8, norm_num_groups=4),
        vocoder_cfg={"type": "griffin_lim", "n_iter": 2},
    )


@pytest.fixture
def stub_lm(monkeypatch, tmp_path):
    """Patch LM loading and rendering; returns the list of render calls (captions, seed)."""
    import experiments.pipeline as pipeline
    from lightning_modules.audio_lm import AudioLMSystem

    calls = []
    ckpt = tmp_path / "runs" / "demo" / "fake" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stub")

    def load_from_checkpoint(path, map_location=None, weights_only=None):
        cfg = load_config("demo", [f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data"])
        return StubSystem(OmegaConf.to_container(cfg, resolve=True))

    def render_fn(cfg, pretransform, seconds, seed):
        def render(system, captions):
            calls.append((list(captions), seed))
            t = torch.arange(int(seconds * 16000)) / 16000
            return torch.stack([0.3 * torch.sin(2 * torch.pi * (300 + 50 * i) * t) for i in range(len(captions))])

        return render

    monkeypatch.setattr(AudioLMSystem, "load_from_checkpoint", staticmethod(load_from_checkpoint))
    monkeypatch.setattr(pipeline, "render_fn", render_fn)
    monkeypatch.setattr(pipeline, "load_pretransform_for", lambda cfg: _tiny_pretransform())
    monkeypatch.setattr(pipeline, "check_pretransform", lambda system, pretransform: None)
    return SimpleNamespace(calls=calls, ckpt=ckpt)


def _overrides(tmp_path, *extra):
    return [
        f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data", f"corpus.clip_seconds={SECONDS}",
        "corpus.num_train=4", "corpus.num_val=2", "corpus.num_test=5", "corpus.num_test_novel=3",
        "eval.batch_size=2", "eval.is_splits=2", *extra,
    ]


def _tiny_evaluator(path: Path, clip_seconds: float = SECONDS) -> Path:
    from datamodules.synthetic import LABEL_VALUES
    from lightning_modules.evaluator import AttributeEvaluator

    torch.manual_seed(0)
    extra = {"accuracy": {"val": {"all_correct": 1.0}}, "corpus": {"clip_seconds": clip_seconds}}
    AttributeEvaluator(LABEL_VALUES, channels=(4, 4), embed_dim=8).save(path, extra=extra)
    return path


def test_synthetic_eval_writes_clips_tables_and_reuses_work(tmp_path, stub_lm, capsys):
    evaluator = _tiny_evaluator(tmp_path / "evaluator.pt")
    args = ["demo", "--ckpt", str(stub_lm.ckpt), *_overrides(tmp_path, f"eval.evaluator.path={evaluator}")]
    assert ev.main(args) == 0
    err = capsys.readouterr().err  # a progress bar with its ETA for every stage that loops over clips
    for stage in ("test: reference clips", "test: generating", "VAE+vocoder resynthesis"):
        assert re.search(re.escape(stage) + r".*100%\|.*\d+/\d+ \[[\d:]+<[\d:]+", err), stage
    out = stub_lm.ckpt.parent.parent / "eval"
    results = json.loads((out / "results.json").read_text())
    assert list(results["splits"]) == ["test", "test_novel"]
    assert [results["splits"][s]["num_clips"] for s in ("test", "test_novel")] == [5, 3]
    rows = results["splits"]["test"]["rows"]
    assert list(rows) == ["model", "oracle (fresh real clips)", "VAE+vocoder resynthesis", "shuffled captions", "noise"]
    for metrics in rows.values():
        assert {"fd", "kl", "is", "acc/all", "acc/source", "kl/pattern2", "phys/all", "phys/pattern2"} <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("phys/"))
    assert rows["oracle (fresh real clips)"]["phys/all"] >= 0.8  # the physical judge reads real clips right
    # Identical files score FD 0 and KL 0 against themselves; the shuffled row has the same clips under other ids.
    for split in ("test", "test_novel"):
        ids = sorted(p.stem for p in (out / split / "reference").glob("*.wav"))
        assert ids == sorted(p.stem for p in (out / split / "generated").glob("*.wav"))
        for row in ("generated", "oracle", "resynthesis", "shuffled", "noise"):
            assert sorted(p.stem for p in (out / split / row).glob("*.wav")) == ids
        for folder in ("generated", "reference", "resynthesis"):
            info = sf.info(str(out / split / folder / f"{ids[0]}.wav"))
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, int(SECONDS * 16000), "PCM_16")
    shuffled = {p.stem: p.read_bytes() for p in (out / "test" / "shuffled").glob("*.wav")}
    reference = {p.stem: p.read_bytes() for p in (out / "test" / "reference").glob("*.wav")}
    assert sorted(shuffled.values()) == sorted(reference.values())
    assert all(shuffled[i] != reference[i] for i in reference)  # a derangement
    # First caption of each clip, batches of 2 seeded seed + batch index.
    manifest = [json.loads(line) for line in (tmp_path / "data" / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    first = {m["id"]: m["captions"][0] for m in manifest}
    assert stub_lm.calls[0] == ([first["test_00000"], first["test_00001"]], 0)
    assert [seed for _, seed in stub_lm.calls] == [0, 1, 2, 0, 1]
    table = (out / "results.md").read_text()
    assert "## test (5 clips)" in table and "| noise |" in table and "acc pattern2" in table and "phys pattern2" in table

    # Second run: generation resumes (nothing re-rendered), reference embeddings come from the cache.
    cache_files = sorted((tmp_path / "data" / "eval_cache").glob("*.pt"))
    assert len(cache_files) == 2
    assert ev.main(args) == 0
    assert len(stub_lm.calls) == 5
    assert sorted((tmp_path / "data" / "eval_cache").glob("*.pt")) == cache_files
    again = json.loads((out / "results.json").read_text())
    assert again["splits"]["test"]["rows"]["model"]["fd"] == pytest.approx(rows["model"]["fd"])

    # Changed generation settings: the generated folder is cleared and regenerated.
    assert ev.main(args + ["sample.steps=7", "eval.max_clips=2", "eval.reference_rows=false"]) == 0
    assert len(stub_lm.calls) == 7
    assert sorted(p.stem for p in (out / "test" / "generated").glob("*.wav")) == ["test_00000", "test_00001"]
    assert list(json.loads((out / "results.json").read_text())["splits"]["test"]["rows"]) == ["model"]


def test_missing_evaluator_and_checkpoint_errors(tmp_path, stub_lm, capsys):
    args = ["demo", "--ckpt", str(stub_lm.ckpt), *_overrides(tmp_path, f"eval.evaluator.path={tmp_path}/none.pt")]
    assert ev.main(args) == 1
    assert "run `make evaluator` first" in capsys.readouterr().err
    assert not stub_lm.calls  # fails before generating anything
    # An evaluator trained on clips of another length would read fades at the wrong times: refused.
    other = _tiny_evaluator(tmp_path / "evaluator_4s.pt", clip_seconds=4.0)
    assert ev.main(["demo", "--ckpt", str(stub_lm.ckpt), *_overrides(tmp_path, f"eval.evaluator.path={other}")]) == 1
    err = capsys.readouterr().err
    assert "trained on 4 s clips" in err and f"has {SECONDS:g} s clips (corpus.clip_seconds)" in err
    assert not stub_lm.calls
    assert ev.main(["demo", f"run.root={tmp_path}/nowhere"]) == 2
    assert "no finished run of experiment 'demo'" in capsys.readouterr().err
    assert ev.main(["demo", "eval.no_such_key=1"]) == 2


def test_audioset_protocol_on_a_manifest(tmp_path, stub_lm, monkeypatch):
    """data.source=manifest: FAD/FD/KL/IS with (tiny) VGGish and CNN14; the paper's baselines in the table."""
    import lightning_modules.parts.audio_classifiers as ac
    from datamodules.synthetic import generate_corpus

    manifest = generate_corpus(tmp_path / "ac", clip_seconds=SECONDS, num_train=2, num_val=0, num_test=4, num_test_novel=0)
    for name in ("vggish.pth", "cnn14.pth"):
        (tmp_path / name).write_bytes(b"x")
    torch.manual_seed(0)
    vggish, cnn14 = ac.VGGish(hidden=16).eval(), ac.Cnn14(classes_num=5, widths=(4, 4, 4, 4, 4, 8)).eval()
    monkeypatch.setattr(ac, "load_vggish", lambda path: vggish)
    monkeypatch.setattr(ac, "load_panns_cnn14", lambda path: cnn14)
    args = ["demo", "--ckpt", str(stub_lm.ckpt), *_overrides(
        tmp_path, "data.source=manifest", f"data.manifests=[{{path: {manifest}}}]", f"data.clip_seconds={SECONDS}",
        f"eval.vggish_path={tmp_path}/vggish.pth", f"eval.panns_path={tmp_path}/cnn14.pth", "eval.metrics=[fad,fd,kl,is]",
        "eval.reference_rows=false",
    )]
    assert ev.main(args) == 0
    out = stub_lm.ckpt.parent.parent / "eval"
    results = json.loads((out / "results.json").read_text())
    assert list(results["splits"]) == ["test"] and results["suite"] == "audioldm"
    model = results["splits"]["test"]["rows"]["model"]
    assert {"fad", "fd", "kl", "kl_sigmoid", "is", "is_splits"} <= set(model)
    table = (out / "results.md").read_text()
    assert "AudioGen Base | 285M | 3.130 | 2.090" in table and "FAD ↓" in table


def test_missing_audioset_weights_fail_before_generation(tmp_path, stub_lm, capsys):
    from datamodules.synthetic import generate_corpus

    manifest = generate_corpus(tmp_path / "ac", clip_seconds=SECONDS, num_train=2, num_val=0, num_test=2, num_test_novel=0)
    args = ["demo", "--ckpt", str(stub_lm.ckpt), *_overrides(
        tmp_path, "data.source=manifest", f"data.manifests=[{{path: {manifest}}}]", f"eval.panns_path={tmp_path}/missing.pth",
    )]
    assert ev.main(args) == 2  # the preflight: every missing weight listed at once, nothing generated
    err = capsys.readouterr().err
    assert "vggish-10086976.pth" in err and "eval.vggish_path" in err
    assert f"{tmp_path}/missing.pth does not exist" in err and "eval.panns_path" in err and "eval.clap_dir" in err
    assert "Traceback" not in err
    assert not stub_lm.calls


def test_write_clip_trims_pads_and_clips(tmp_path):
    ev.write_clip(tmp_path / "a.wav", np.full(100, 2.0, np.float32), 160)
    ev.write_clip(tmp_path / "b.wav", torch.zeros(500), 160)
    ev.write_clip(tmp_path / "c.wav", np.ones(32000, np.float32) * 0.5, 16000, sample_rate=32000)  # resampled
    a, sr = sf.read(tmp_path / "a.wav")
    assert sr == 16000 and a.shape == (160,) and a[:100].max() == pytest.approx(1.0, abs=1e-4) and a[100:].max() == 0
    assert sf.info(str(tmp_path / "b.wav")).frames == 160
    assert sf.info(str(tmp_path / "c.wav")).frames == 16000


@pytest.mark.slow
def test_make_eval_end_to_end_on_a_shrunk_demo(tmp_path):
    """The real pipeline: tiny corpus → VAE → cache → LM → `make evaluator` → `make eval`."""
    from experiments.pipeline import run_task

    common = [f"run.root={tmp_path}/runs", f"run.data_root={tmp_path}/data", "corpus.num_train=64", "corpus.num_val=8",
              "corpus.num_test=8", "corpus.num_test_novel=8", "corpus.clip_seconds=2.0", "data.clip_seconds=2.0",
              "trainer.num_threads=1", "trainer.precision=32-true"]
    run_task(load_config("demo", common + [
        "vae_train.max_steps=20", "vae_train.val_every_steps=20", "trainer.max_steps=10", "trainer.val_every_steps=10",
        "trainer.ckpt_every_steps=10", "trainer.batch_size=8", "model.width=64", "model.depth=1", "model.heads=2",
        "model.max_tokens=50", "model.head.width=32", "model.head.depth=1", "text.width=32", "text.depth=1",
        "text.vocab_size=64", "sample.steps=2", "sample.seconds=2.0", "sample.num_captions=1", "optim.warmup_steps=2",
    ]))
    run_task(load_config("evaluator", common + ["eval.evaluator.max_steps=5", "eval.evaluator.val_every_steps=5",
                                                "eval.evaluator.min_accuracy=0.0"]))
    assert ev.main(["demo", *common, "eval.max_clips=4", "eval.batch_size=4", "eval.is_splits=2", "sample.steps=2"]) == 0
    out = tmp_path / "runs" / "demo" / "last" / "eval"
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == {"test", "test_novel"}
    assert results["splits"]["test"]["num_clips"] == 4
    assert "| model |" in (out / "results.md").read_text()
