"""Evaluation metrics: closed forms, reduction in pieces, pairing by id, and the
VGGish / PANNs CNN14 loaders with official-layout state dicts."""

import math

import numpy as np
import pytest
import torch

from lightning_modules.metrics import (
    AttributeAccuracy,
    ClapScore,
    FrechetDistance,
    InceptionScore,
    PairedKLDivergence,
    frechet_distance,
)
from lightning_modules.parts.audio_classifiers import (
    Cnn14,
    VGGish,
    VGGishFrontEnd,
    WeightsError,
    load_clap,
    load_panns_cnn14,
    load_vggish,
    panns_official_state_dict,
    vggish_mel_matrix,
)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription on shared CPUs (40x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- Fréchet


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariance_commuting_closed_form():
    """Covariances sharing eigenvectors: the trace term is Σ (√a − √b)² over eigenvalues."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = rng.uniform(0.2, 2.0, 5), rng.uniform(0.2, 2.0, 5)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(5), q @ np.diag(a) @ q.T, np.zeros(5), q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_metric_matches_samples_and_population():
    torch.manual_seed(0)
    n, d = 20000, 4
    std1, std2 = torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([1.5, 0.5, 1.0, 0.2])
    shift = torch.tensor([1.0, 0.0, -1.0, 0.5])
    real = torch.randn(n, d) * std1
    fake = torch.randn(n, d) * std2 + shift
    metric = FrechetDistance(d)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    value = float(metric.compute())
    population = float(shift.pow(2).sum() + (std1 - std2).pow(2).sum())
    assert value == pytest.approx(population, rel=0.05)
    # Same as numpy's mean / np.cov on the same samples.
    r, f = real.double().numpy(), fake.double().numpy()
    direct = frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))
    assert value == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_singular_covariances_are_handled():
    """Fewer samples than dimensions: singular covariances must still give a finite value."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 32)), rng.standard_normal((6, 32)) + 0.5
    value = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert math.isfinite(value) and value > 0


def _split_updates(metric_factory, pieces, update):
    """One metric updated with everything vs. several metrics updated in pieces and merged
    (what DDP's state reduction does)."""
    whole = metric_factory()
    for piece in pieces:
        update(whole, piece)
    parts = []
    for piece in pieces:
        m = metric_factory()
        update(m, piece)
        parts.append(m)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge_state(other)
    return whole, merged


def test_frechet_distance_reduces_in_pieces():
    torch.manual_seed(1)
    pieces = [(torch.randn(7, 3), torch.randn(5, 3) + 1), (torch.randn(9, 3), torch.randn(11, 3) * 2)]

    def update(m, piece):
        m.update(piece[0], real=True)
        m.update(piece[1], real=False)

    whole, merged = _split_updates(lambda: FrechetDistance(3), pieces, update)
    assert float(merged.compute()) == pytest.approx(float(whole.compute()), rel=1e-10)


def test_frechet_distance_needs_two_embeddings_and_right_width():
    metric = FrechetDistance(3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        metric.update(torch.randn(4, 2), real=True)
    metric.update(torch.randn(1, 3), real=True)
    metric.update(torch.randn(5, 3), real=False)
    with pytest.raises(ValueError, match="at least 2 real"):
        metric.compute()


# ----------------------------------------------------------------------------- KL


def _reference_kl(ref, gen, mode):
    """audioldm_eval's formula written out with numpy."""
    if mode == "softmax":
        p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
        q = np.exp(gen) / np.exp(gen).sum(1, keepdims=True)
    else:
        p, q = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-gen))
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q + 1e-6)), axis=1)))


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_paired_kl_pairs_by_id_not_by_order(mode):
    rng = np.random.default_rng(3)
    ref, gen = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    ids = ["a", "b", "c", "d", "e"]
    order = [3, 0, 4, 1, 2]
    metric = PairedKLDivergence(mode)
    metric.update(ids, torch.tensor(ref), real=True)
    metric.update([ids[i] for i in order], torch.tensor(gen[order]), real=False)  # shuffled generated set
    assert float(metric.compute()) == pytest.approx(_reference_kl(ref, gen, mode), rel=1e-9)
    per_clip = metric.per_clip()
    assert set(per_clip) == set(ids)


def test_paired_kl_identical_is_zero_and_reduces_in_pieces():
    torch.manual_seed(2)
    logits = torch.randn(6, 5)
    ids = [f"clip{i}" for i in range(6)]
    metric = PairedKLDivergence("softmax")
    metric.update(ids, logits, real=True)
    metric.update(ids, logits, real=False)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-5)

    gen = torch.randn(6, 5)
    pieces = [(ids[:2], logits[:2], ids[3:], gen[3:]), (ids[2:], logits[2:], ids[:3], gen[:3])]

    def update(m, piece):
        m.update(piece[0], piece[1], real=True)
        m.update(piece[2], piece[3], real=False)

    whole, merged = _split_updates(lambda: PairedKLDivergence("softmax"), pieces, update)
    assert float(merged.compute()) == pytest.approx(float(whole.compute()), rel=1e-10)


def test_paired_kl_mismatched_or_duplicate_ids_raise_listing_them():
    metric = PairedKLDivergence()
    metric.update(["x", "y", "z"], torch.randn(3, 4), real=True)
    metric.update(["x", "y", "w"], torch.randn(3, 4), real=False)
    with pytest.raises(ValueError, match=r"reference ids without a generated clip: \['z'\].*generated ids without a reference clip: \['w'\]"):
        metric.compute()
    dup = PairedKLDivergence()
    dup.update(["x", "x"], torch.randn(2, 4), real=True)
    dup.update(["x"], torch.randn(1, 4), real=False)
    with pytest.raises(ValueError, match=r"duplicate reference ids: \['x'\]"):
        dup.compute()
    with pytest.raises(ValueError, match="no clips"):
        PairedKLDivergence().compute()


# ----------------------------------------------------------------------------- IS, CLAP, accuracy


def test_inception_score_uniform_vs_peaked():
    n, c = 100, 10
    uniform = InceptionScore(splits=5, from_logits=False)
    uniform.update(torch.full((n, c), 1.0 / c))
    assert float(uniform.compute()[0]) == pytest.approx(1.0, abs=1e-9)
    # Confident and evenly spread over classes: IS = number of classes.
    peaked = InceptionScore(splits=1, from_logits=False)
    peaked.update(torch.eye(c).repeat(n // c, 1))
    mean, std = peaked.compute()
    assert float(mean) == pytest.approx(c, rel=1e-6) and float(std) == pytest.approx(0.0, abs=1e-6)
    shuffled = InceptionScore(splits=5, from_logits=False)
    shuffled.update(torch.eye(c).repeat(n // c, 1))
    assert 6.0 < float(shuffled.compute()[0]) <= c  # 20 clips per split: most classes present
    # Confident but always the same class: IS = 1.
    collapsed = InceptionScore(splits=2)
    collapsed.update(torch.tensor([[20.0, 0.0, 0.0]]).repeat(10, 1))
    assert float(collapsed.compute()[0]) == pytest.approx(1.0, abs=1e-6)


def test_inception_score_logits_in_pieces_and_errors():
    torch.manual_seed(3)
    logits = torch.randn(40, 6) * 3
    pieces = [logits[:15], logits[15:]]
    whole, merged = _split_updates(lambda: InceptionScore(splits=4), pieces, lambda m, p: m.update(p))
    assert float(merged.compute()[0]) == pytest.approx(float(whole.compute()[0]), rel=1e-10)
    few = InceptionScore(splits=10)
    few.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="cannot be cut into 10 splits"):
        few.compute()
    bad = InceptionScore(from_logits=False)
    bad.update(torch.rand(20, 4))
    with pytest.raises(ValueError, match="probabilities"):
        bad.compute()


def test_clap_score_is_mean_cosine():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    audio = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    metric = ClapScore()
    metric.update(text[:2], audio[:2])
    metric.update(text[2:], audio[2:])
    assert float(metric.compute()) == pytest.approx((1.0 + 0.0 - 1.0) / 3)


def test_attribute_accuracy():
    metric = AttributeAccuracy(2)
    metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [1, 0]]))
    metric.update(torch.tensor([[2, 2]]), torch.tensor([[0, 2]]))
    assert metric.compute().tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3])


# ----------------------------------------------------------------------------- VGGish / PANNs loaders


def test_vggish_mel_matrix_is_htk_with_zero_dc():
    matrix = vggish_mel_matrix()
    assert matrix.shape == (257, 64)
    assert float(matrix[0].abs().sum()) == 0.0
    assert float(matrix.max()) <= 1.0 + 1e-6  # unnormalised triangles peak at <= 1
    # HTK: 125 Hz ↔ 1127 ln(1 + 125/700); no band below 125 Hz (bin 2 = 62.5 Hz).
    assert float(matrix[:3].sum()) == 0.0


def test_vggish_front_end_patch_layout():
    front = VGGishFrontEnd()
    wave = torch.randn(2, 16000 * 2) * 0.1
    patches = front(wave)
    assert patches.shape == (2, 2, 96, 64)  # 1 + (32000 - 400) // 160 = 198 frames → 2 patches
    with pytest.raises(ValueError, match="at least 15600 samples"):
        front(torch.zeros(1, 15000))


def test_vggish_round_trip_through_loader(tmp_path, monkeypatch):
    import lightning_modules.parts.audio_classifiers as ac

    torch.manual_seed(0)
    expected_keys = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")]
    expected_keys += [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    small = lambda: VGGish(hidden=32)  # noqa: E731 — same layer names, small linear layers: a fast test
    model = small().eval()
    state = model.state_dict()
    assert sorted(state) == sorted(expected_keys)
    assert state["embeddings.0.weight"].shape == (32, 512 * 4 * 6) and state["embeddings.4.weight"].shape == (128, 32)
    path = tmp_path / "vggish-10086976.pth"
    torch.save(state, path)
    monkeypatch.setattr(ac, "VGGish", small)
    loaded = load_vggish(path)
    wave = torch.randn(1, 16000) * 0.1
    assert torch.equal(loaded.embed(wave), model.embed(wave))
    assert loaded.embed(wave).shape == (1, 128)


def test_vggish_loader_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"vggish-10086976\.pth.*eval\.vggish_path"):
        load_vggish(None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=rf"{missing}.*does not exist.*vggish-10086976\.pth"):
        load_vggish(missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match=rf"{wrong} is not a vggish-10086976\.pth checkpoint.*missing keys"):
        load_vggish(wrong)


def _small_cnn14() -> Cnn14:
    return Cnn14(classes_num=7, widths=(4, 4, 8, 8, 8, 16))


def test_cnn14_official_layout_and_round_trip(tmp_path, monkeypatch):
    import lightning_modules.parts.audio_classifiers as ac

    torch.manual_seed(0)
    full = Cnn14()
    keys = set(panns_official_state_dict(full))
    for key in ("bn0.running_mean", "conv_block1.conv1.weight", "conv_block6.bn2.num_batches_tracked", "fc1.weight",
                "fc_audioset.bias", "spectrogram_extractor.stft.conv_real.weight", "logmel_extractor.melW"):
        assert key in keys
    assert full.fc_audioset.out_features == 527 and full.fc1.in_features == 2048

    # A tiny CNN14 (same layer names) so the round trip stays fast.
    model = _small_cnn14().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "Cnn14_16k_mAP=0.438.pth"
    torch.save({"model": panns_official_state_dict(model), "iteration": 0}, path)
    monkeypatch.setattr(ac, "Cnn14", _small_cnn14)
    loaded = load_panns_cnn14(path)
    wave = torch.randn(2, 16000) * 0.1
    out, ref = loaded(wave), model(wave)
    assert out["logits"].shape == (2, 7) and out["embedding"].shape == (2, 16)
    assert torch.allclose(out["logits"], ref["logits"]) and torch.allclose(out["clipwise_output"], torch.sigmoid(ref["logits"]))


def test_cnn14_loader_errors(tmp_path, monkeypatch):
    import lightning_modules.parts.audio_classifiers as ac

    with pytest.raises(WeightsError, match=r"Cnn14_16k_mAP=0\.438\.pth.*eval\.panns_path"):
        load_panns_cnn14(tmp_path / "missing.pth")
    no_model = tmp_path / "plain.pth"
    torch.save({"fc1.weight": torch.zeros(1)}, no_model)
    with pytest.raises(WeightsError, match=rf"{no_model} has no 'model' entry"):
        load_panns_cnn14(no_model)
    monkeypatch.setattr(ac, "Cnn14", _small_cnn14)
    state = panns_official_state_dict(_small_cnn14())
    state["logmel_extractor.melW"] = torch.rand_like(state["logmel_extractor.melW"])  # e.g. the 32 kHz model
    other = tmp_path / "other.pth"
    torch.save({"model": state}, other)
    with pytest.raises(WeightsError, match="mel filterbank"):
        load_panns_cnn14(other)
    state = panns_official_state_dict(_small_cnn14())
    del state["fc1.bias"]
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    with pytest.raises(WeightsError, match=r"missing keys \['fc1.bias'\]"):
        load_panns_cnn14(broken)


def test_clap_loader_errors(tmp_path):
    with pytest.raises(WeightsError, match="eval.clap_dir"):
        load_clap(None)
    with pytest.raises(WeightsError, match=rf"{tmp_path} holds no config.json"):
        load_clap(tmp_path)


def _tiny_clap_dir(directory):
    """A randomly initialised, tiny transformers CLAP model + processor saved like a real one."""
    from experiments.rehearsal import write_clap

    write_clap(directory)
    return directory


def test_clap_embedder_from_a_local_dir(tmp_path):
    clap = load_clap(_tiny_clap_dir(tmp_path / "clap"))
    text = clap.text(["a dog", "a"])
    audio = clap.audio(torch.randn(2, 16000) * 0.1, sample_rate=16000)  # resampled to 48 kHz inside
    assert text.shape == audio.shape == (2, 8)
    assert torch.allclose(text.norm(dim=1), torch.ones(2), atol=1e-5)
    score = ClapScore()
    score.update(text, audio)
    assert -1.0 <= float(score.compute()) <= 1.0


def test_frechet_distance_matches_frechet_audio_distance_package_if_installed():
    """Optional cross-check; the package is not installed in the project venv (it pins numpy<2)."""
    fad = pytest.importorskip("frechet_audio_distance.fad")
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) * 1.3 + 0.2
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    theirs = fad.FrechetAudioDistance.calculate_frechet_distance(None, *args)
    assert frechet_distance(*args) == pytest.approx(float(theirs), rel=1e-9)


def test_vggish_front_end_matches_torchvggish_if_installed():
    """Optional cross-check of the log-mel patches against torchvggish's numpy front end."""
    vggish_input = pytest.importorskip("torchvggish.vggish_input")
    wave = np.random.default_rng(5).standard_normal(16000 * 3).astype(np.float32) * 0.1
    theirs = np.asarray(vggish_input.waveform_to_examples(wave, 16000, return_tensor=False))
    ours = VGGishFrontEnd()(torch.from_numpy(wave)[None])[0].numpy()
    assert ours.shape == theirs.shape
    assert np.allclose(ours, theirs, atol=1e-4)


def test_boundary_jumps_finds_a_seam_and_not_one_that_is_not_there():
    from lightning_modules.metrics import boundary_jumps

    walk = torch.randn(8, 120, 16, generator=torch.Generator().manual_seed(0)).cumsum(dim=1) * 0.1  # (B, T, F) smooth
    shifts = [50, 62, 74, 86, 98, 110]
    none = boundary_jumps(walk, shifts)
    assert 0.8 < none["ratio"] < 1.2 and none["exceed_p95"] < 0.2  # boundaries like any other step
    seamed = walk.clone()
    for t in shifts:  # a jump of 3 typical steps added at every boundary
        seamed[:, t:] += 0.3 * torch.randn(8, 1, 16, generator=torch.Generator().manual_seed(t))
    seam = boundary_jumps(seamed, shifts)
    assert seam["ratio"] > 2 and seam["exceed_p95"] > 0.9
    assert seam["elsewhere"] == pytest.approx(none["elsewhere"])
    with pytest.raises(ValueError, match="boundaries must be"):
        boundary_jumps(walk, [0])
    with pytest.raises(ValueError, match="frames must be"):
        boundary_jumps(walk[0], shifts)
