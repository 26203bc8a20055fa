"""Parity with the reference evaluation code, audioldm_eval 0.0.3 (the AudioLDM protocol):
its PANNs ``Cnn14`` network and its FD / KL / IS formulas, on the same random weights and
embeddings; and with torchvggish (the VGGish port the FAD packages load) for FAD. Nothing downloads: the reference network loads a weights file we write in the
official layout, and the reference modules are imported without the package's
``__init__`` (which needs torchaudio, not installable beside the CPU torch here).

``audioldm_eval`` is installed with ``--no-deps`` by ``make setup`` (its declared
dependencies include torchaudio and ssr-eval); the tests skip where it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from lightning_modules.metrics import InceptionScore, PairedKLDivergence, frechet_distance
from lightning_modules.parts import audio_classifiers as ac


@pytest.fixture
def reference(monkeypatch):
    """``import_module(name)`` for audioldm_eval submodules, bypassing its top-level ``__init__``."""
    spec = importlib.util.find_spec("audioldm_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("audioldm_eval is not installed (make setup installs it with --no-deps)")
    pytest.importorskip("torchlibrosa")
    root = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("audioldm_eval")
    package.__path__ = [root]
    monkeypatch.setitem(sys.modules, "audioldm_eval", package)
    for name in [n for n in sys.modules if n.startswith("audioldm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module


def test_cnn14_equals_audioldm_evals_on_the_same_weights(reference, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ours = ac.Cnn14().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the comparison covers them
        for module in ours.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": ac.panns_official_state_dict(ours)}, tmp_path / "ckpt" / ac.PANNS_FILE)
    monkeypatch.chdir(tmp_path)  # the reference loads ckpt/Cnn14_16k_mAP=0.438.pth from the working dir
    models = reference("audioldm_eval.feature_extractors.panns.models")
    theirs = models.Cnn14(features_list=["2048", "logits"], sample_rate=16000, window_size=512, hop_size=160,
                          mel_bins=64, fmin=50, fmax=8000, classes_num=527).eval()
    loaded = ac.load_panns_cnn14(tmp_path / "ckpt" / ac.PANNS_FILE)  # our loader reads the same file
    wave = 0.1 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = loaded(wave), theirs(wave)
    embedding_diff = float((a["embedding"] - b["2048"]).abs().max())
    logits_diff = float((a["logits"] - b["logits"]).abs().max())
    assert float(b["2048"].abs().max()) > 1e-3  # not a comparison of zeros
    assert embedding_diff < 1e-6 and logits_diff < 1e-6, (embedding_diff, logits_diff)  # measured 4.1e-8, 3.0e-8


def test_fd_kl_is_formulas_equal_audioldm_evals(reference):
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.standard_normal((40, 16)))
    fake = torch.from_numpy(rng.standard_normal((40, 16)) * 1.2 + 0.3)
    fid = reference("audioldm_eval.metrics.fid")
    theirs_fd = fid.calculate_fid({"2048": fake}, {"2048": real}, "2048")["frechet_distance"]
    ours_fd = frechet_distance(fake.numpy().mean(0), np.cov(fake.numpy(), rowvar=False),
                               real.numpy().mean(0), np.cov(real.numpy(), rowvar=False))
    assert ours_fd == pytest.approx(theirs_fd, rel=1e-9)

    names = [f"clip{i}.wav" for i in range(40)]
    kl = reference("audioldm_eval.metrics.kl")
    theirs_kl, _, _ = kl.calculate_kl({"logits": fake.float(), "file_path_": names},
                                      {"logits": real.float(), "file_path_": names}, "logits")
    for mode, key in (("softmax", "kullback_leibler_divergence_softmax"), ("sigmoid", "kullback_leibler_divergence_sigmoid")):
        metric = PairedKLDivergence(mode=mode)
        metric.update([n[:-4] for n in names], real.float(), real=True)
        metric.update([n[:-4] for n in names], fake.float(), real=False)
        assert float(metric.compute()) == pytest.approx(theirs_kl[key], rel=1e-5), mode

    isc = reference("audioldm_eval.metrics.isc")
    theirs_is = isc.calculate_isc({"logits": fake}, "logits", rng_seed=2020, samples_shuffle=False, splits=1)
    metric = InceptionScore(splits=1, shuffle_seed=None)
    metric.update(fake)
    mean, _ = metric.compute()
    assert float(mean) == pytest.approx(theirs_is["inception_score_mean"], rel=1e-9)


def test_vggish_network_equals_torchvggish_on_the_same_weights(tmp_path):
    """The network FAD uses (torchvggish's port, as the FAD packages load it) on our
    official-layout weights file: same 128-d embeddings of the same log-mel patches."""
    reference = pytest.importorskip("torchvggish.torchvggish")
    torch.manual_seed(0)
    torch.save(ac.VGGish().state_dict(), tmp_path / ac.VGGISH_FILE)
    ours = ac.load_vggish(tmp_path / ac.VGGISH_FILE)
    theirs = reference._vgg(postprocess=False).eval()  # vggish() minus the download
    theirs.load_state_dict(torch.load(tmp_path / ac.VGGISH_FILE, weights_only=True))
    wave = 0.1 * torch.randn(1, 16000 * 3, generator=torch.Generator().manual_seed(2))
    patches = ours.front_end(wave).reshape(-1, 1, 96, 64)
    with torch.no_grad():
        a, b = ours(patches, activation=True), theirs(patches)
    assert float(b.abs().max()) > 0
    assert float((a - b).abs().max()) < 1e-6
