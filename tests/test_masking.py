"""Tests for lightning_modules/parts/masking.py (MNTP mask ratios and decoder inputs)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm

from lightning_modules.parts.masking import (
    MAR_TRUNCNORM,
    MIXTURE_HIGH_TRUNCNORM,
    MIXTURE_LOW_TRUNCNORM,
    MaskedInputs,
    MaskRatioSampler,
    TruncatedNormal,
    make_mntp_inputs,
    ntp_inputs,
)

MODES = ("drop", "zero", "gaussian")
FIELDS = ("tokens", "position_ids", "token_mask", "target_ids", "target_mask", "target_tokens")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(lengths, n=None, d=3, seed=0):
    """Random tokens (B, N, D) with right-padded mask of the given lengths; padding is junk."""
    n = max(lengths) if n is None else n
    g = _gen(seed)
    tokens = torch.randn(len(lengths), n, d, generator=g) + 5.0
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return tokens, mask


def _assert_same(a: MaskedInputs, b: MaskedInputs):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert torch.equal(x, y), f


def _scipy_tn(params):
    mean, std, lo, hi = params
    return truncnorm((lo - mean) / std, (hi - mean) / std, loc=mean, scale=std)


# ----------------------------------------------------------------------------- NTP


def test_ntp_inputs_plain_layout():
    tokens, mask = _batch([6, 4, 0, 1], d=2)
    out = ntp_inputs(tokens, mask)
    b, n = mask.shape
    assert out.tokens.shape == (b, n, 2) and out.target_tokens.shape == (b, n + 1, 2)
    assert out.position_ids.dtype == torch.long and out.target_ids.dtype == torch.long
    assert torch.equal(out.position_ids, torch.arange(n).expand(b, n))
    assert torch.equal(out.target_ids, torch.arange(n + 1).expand(b, n + 1))
    assert torch.equal(out.token_mask, mask)
    n_b = mask.sum(1)
    assert torch.equal(out.target_mask, torch.arange(n + 1)[None] < n_b[:, None])
    assert torch.equal(out.tokens, tokens * mask[..., None])
    ext = torch.cat([tokens, torch.zeros(b, 1, 2)], 1)
    assert torch.equal(out.target_tokens, ext * out.target_mask[..., None])


def test_ntp_inputs_without_mask_and_trimmed_padding():
    tokens, _ = _batch([5, 5])
    out = ntp_inputs(tokens)
    assert out.token_mask.all() and out.target_mask[:, :-1].all() and not out.target_mask[:, -1].any()
    # columns that are padding in every sample are removed (M = max n_b)
    tokens, mask = _batch([3, 2], n=7)
    out = ntp_inputs(tokens, mask)
    assert out.tokens.shape[1] == 3 and torch.equal(out.target_ids[0], torch.arange(4))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("predict_skipped", [True, False])
def test_zero_ratio_equals_ntp(mode, predict_skipped):
    tokens, mask = _batch([7, 3, 7, 0, 5])
    ref = ntp_inputs(tokens, mask)
    zeros = torch.zeros(len(mask))
    _assert_same(make_mntp_inputs(tokens, mask, zeros, mode, predict_skipped, generator=_gen(1)), ref)
    _assert_same(make_mntp_inputs(tokens, mask, zeros, mode, predict_skipped), ref)  # no generator needed
    _assert_same(make_mntp_inputs(tokens, mask, 0.0, mode, predict_skipped), ref)


# ----------------------------------------------------------------------------- drop mode


def _check_drop_sample(out, tokens, n_b, r_b, bi, predict_skipped):
    """All invariants of one sample of drop-mode output."""
    m = int(out.token_mask[bi].sum())
    assert m == n_b - int(torch.round(torch.tensor(n_b, dtype=torch.float64) * r_b))
    assert torch.equal(out.token_mask[bi], torch.arange(out.token_mask.shape[1]) < m)  # left-packed
    k = out.position_ids[bi, :m]
    assert (k[1:] > k[:-1]).all() and (k >= 0).all() and (k < n_b).all()  # increasing, never padding
    assert torch.equal(out.tokens[bi, :m], tokens[bi, k])
    assert (out.tokens[bi, m:] == 0).all()
    bounds = [-1] + k.tolist() + [n_b - 1]  # k_0 ... k_{m+1}
    tid, tmask = out.target_ids[bi], out.target_mask[bi]
    for s in range(tid.shape[0]):
        if s > m:
            assert not tmask[s]
            continue
        lo, hi = bounds[s], bounds[s + 1]
        assert bool(tmask[s]) == (hi > lo)
        if tmask[s]:
            assert lo < tid[s] <= hi
            if not predict_skipped:
                assert tid[s] == lo + 1
            assert torch.equal(out.target_tokens[bi, s], tokens[bi, tid[s]])
        else:
            assert (out.target_tokens[bi, s] == 0).all()
        assert 0 <= tid[s] <= tokens.shape[1]


@pytest.mark.parametrize("predict_skipped", [True, False])
def test_drop_invariants_random(predict_skipped):
    g = _gen(123)
    lengths_pool = [[9, 4, 1, 0, 9], [12, 12, 3], [1], [6, 2, 5, 6]]
    for trial in range(40):
        lengths = lengths_pool[trial % len(lengths_pool)]
        tokens, mask = _batch(lengths, n=max(max(lengths), 1) + trial % 2, seed=trial)
        ratios = torch.rand(len(lengths), generator=g)
        ratios[0] = [0.0, 1.0, 0.5, 0.95][trial % 4]
        out = make_mntp_inputs(tokens, mask, ratios, "drop", predict_skipped, generator=g)
        b = len(lengths)
        m_max = out.tokens.shape[1]
        assert out.position_ids.shape == out.token_mask.shape == (b, m_max)
        assert out.target_ids.shape == out.target_mask.shape == (b, m_max + 1)
        assert out.target_tokens.shape == (b, m_max + 1, tokens.shape[2])
        assert m_max == int(out.token_mask.sum(1).max())
        for bi, n_b in enumerate(lengths):
            _check_drop_sample(out, tokens, n_b, float(ratios[bi]), bi, predict_skipped)


def test_kept_count_uses_round():
    tokens, mask = _batch([10, 10, 10, 7, 3])
    ratios = torch.tensor([0.25, 0.35, 0.04, 0.5, 1.0])
    out = make_mntp_inputs(tokens, mask, ratios, generator=_gen(0))
    expected = mask.sum(1) - torch.round(mask.sum(1).double() * ratios.double()).long()
    assert torch.equal(out.token_mask.sum(1), expected)
    assert out.tokens.shape[1] == int(expected.max())


def test_all_dropped_only_bos_predicts():
    tokens, mask = _batch([5, 3])
    out = make_mntp_inputs(tokens, mask, torch.ones(2), generator=_gen(0))
    assert out.tokens.shape == (2, 0, 3) and out.target_ids.shape == (2, 1)
    assert out.target_mask.all() and (out.target_ids[:, 0] < mask.sum(1)).all()


def test_skipped_targets_cover_interval_uniformly():
    # many copies of one 10-token sample in one call; condition on k_1 = 3: BOS target ~ U{0..3}
    reps = 4000
    tokens, mask = _batch([10] * reps)
    out = make_mntp_inputs(tokens, mask, torch.full((reps,), 0.5), generator=_gen(5))
    sel = out.position_ids[:, 0] == 3
    counts = torch.bincount(out.target_ids[sel, 0], minlength=10).double()
    assert counts[4:].sum() == 0 and sel.sum() > 100
    assert torch.allclose(counts[:4] / counts.sum(), torch.full((4,), 0.25, dtype=torch.float64), atol=0.06)


def test_drop_positions_uniform():
    reps = 2000
    tokens, mask = _batch([8] * reps)
    out = make_mntp_inputs(tokens, mask, torch.full((reps,), 0.5), generator=_gen(11))
    kept = torch.bincount(out.position_ids.flatten(), minlength=8).double() / reps
    assert out.token_mask.all()  # every sample keeps exactly 4 -> no padding
    assert torch.allclose(kept, torch.full((8,), 0.5, dtype=torch.float64), atol=0.04)


# ----------------------------------------------------------------------------- zero / gaussian


@pytest.mark.parametrize("mode", ["zero", "gaussian"])
def test_corrupt_modes_keep_layout(mode):
    tokens, mask = _batch([10, 6, 0])
    ratios = torch.tensor([0.5, 0.34, 0.9])
    out = make_mntp_inputs(tokens, mask, ratios, mode, generator=_gen(2))
    ref = ntp_inputs(tokens, mask)
    for f in ("position_ids", "token_mask", "target_ids", "target_mask", "target_tokens"):
        assert torch.equal(getattr(out, f), getattr(ref, f)), f
    changed = (out.tokens != ref.tokens).any(-1)
    assert torch.equal(changed.sum(1), torch.round(mask.sum(1).double() * ratios.double()).long())
    assert not (changed & ~mask).any()
    if mode == "zero":
        assert (out.tokens[changed] == 0).all()
    else:
        noise = out.tokens[changed]
        assert (noise.abs() < 5).all() and not (noise == 0).any()  # tokens are ~N(5,1), noise ~N(0,1)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", MODES)
def test_determinism(mode):
    tokens, mask = _batch([9, 5, 7])
    sampler = MaskRatioSampler("mixture")
    outs = []
    for _ in range(2):
        g = _gen(42)
        r = sampler.sample(3, g)
        outs.append((r, make_mntp_inputs(tokens, mask, r, mode, generator=g)))
    assert torch.equal(outs[0][0], outs[1][0])
    _assert_same(outs[0][1], outs[1][1])
    g = _gen(43)
    other = make_mntp_inputs(tokens, mask, torch.full((3,), 0.5), mode, generator=g)
    same = make_mntp_inputs(tokens, mask, torch.full((3,), 0.5), mode, generator=_gen(43))
    _assert_same(other, same)


def test_no_global_rng_dependence():
    tokens, mask = _batch([9, 5])
    torch.manual_seed(0)
    a = make_mntp_inputs(tokens, mask, torch.full((2,), 0.5), generator=_gen(7))
    torch.manual_seed(1)
    b = make_mntp_inputs(tokens, mask, torch.full((2,), 0.5), generator=_gen(7))
    _assert_same(a, b)


# ----------------------------------------------------------------------------- samplers


N_SAMPLES = 40_000


def test_truncated_normal_matches_scipy():
    for params in [MAR_TRUNCNORM, MIXTURE_LOW_TRUNCNORM, (0.3, 0.1, 0.2, 0.9), (0.0, 0.05, 0.3, 0.5)]:
        tn = TruncatedNormal(*params)
        u = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
        ref = _scipy_tn(params).ppf(u.numpy())
        np.testing.assert_allclose(tn.icdf(u).numpy(), ref, atol=1e-6)


def test_sampler_mar():
    s = MaskRatioSampler("mar", max_ratio=1.0)
    r = s.sample(N_SAMPLES, _gen(0))
    assert r.dtype == torch.float32 and r.shape == (N_SAMPLES,)
    assert r.min() >= 0.7 and r.max() <= 1.0
    ref = _scipy_tn(MAR_TRUNCNORM)
    assert abs(r.double().mean().item() - ref.mean()) < 0.005
    assert abs(r.double().std().item() - ref.std()) < 0.005


def test_sampler_max_ratio_truncates():
    r = MaskRatioSampler("mar").sample(N_SAMPLES, _gen(1))  # default max_ratio 0.95
    assert r.min() >= 0.7 and r.max() <= 0.95
    ref = _scipy_tn((1.0, 0.25, 0.7, 0.95))
    assert abs(r.double().mean().item() - ref.mean()) < 0.005
    assert (r > 0.949).float().mean() < 0.01  # truncation, not clamping (no point mass)


def test_sampler_mixture_defaults():
    s = MaskRatioSampler("mixture", max_ratio=1.0)
    assert s.high_weight == 0.25
    r = s.sample(N_SAMPLES, _gen(2)).double()
    assert r.min() >= 0.0 and r.max() <= 1.0
    high = r[r >= 0.6]  # components are disjoint: low on [0, 0.5], high on [0.7, 1]
    low = r[r < 0.6]
    assert ((r > 0.5) & (r < 0.7)).sum() == 0
    assert abs(len(high) / N_SAMPLES - 0.25) < 0.01
    for part, params in [(high, MIXTURE_HIGH_TRUNCNORM), (low, MIXTURE_LOW_TRUNCNORM)]:
        ref = _scipy_tn(params)
        assert abs(part.mean().item() - ref.mean()) < 0.006
        assert abs(part.std().item() - ref.std()) < 0.006


def test_sampler_mixture_custom():
    s = MaskRatioSampler("mixture", high_weight=0.6, high=(0.8, 0.1, 0.6, 0.9), low=[0.1, 0.1, 0.0, 0.3])
    r = s.sample(N_SAMPLES, _gen(3)).double()
    assert abs((r > 0.45).double().mean().item() - 0.6) < 0.01
    assert abs(r[r > 0.45].mean().item() - _scipy_tn((0.8, 0.1, 0.6, 0.9)).mean()) < 0.005


def test_sampler_uniform_and_none():
    r = MaskRatioSampler("uniform", uniform=(0.2, 0.6)).sample(N_SAMPLES, _gen(4)).double()
    assert r.min() >= 0.2 and r.max() <= 0.6
    assert abs(r.mean().item() - 0.4) < 0.005 and abs(r.std().item() - 0.4 / math.sqrt(12)) < 0.005
    r = MaskRatioSampler("uniform").sample(N_SAMPLES, _gen(4))
    assert r.max() <= 0.95
    z = MaskRatioSampler("none").sample(5)
    assert z.dtype == torch.float32 and torch.equal(z, torch.zeros(5))


def test_sampler_determinism():
    for kind in ("mixture", "mar", "uniform"):
        s = MaskRatioSampler(kind)
        assert torch.equal(s.sample(64, _gen(9)), s.sample(64, _gen(9)))
        assert not torch.equal(s.sample(64, _gen(9)), s.sample(64, _gen(10)))


# ----------------------------------------------------------------------------- errors


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="unknown mask-ratio sampler kind"):
        MaskRatioSampler("beta")
    with pytest.raises(ValueError, match="max_ratio"):
        MaskRatioSampler(max_ratio=1.5)
    with pytest.raises(ValueError, match="high_weight"):
        MaskRatioSampler(high_weight=-0.1)
    with pytest.raises(ValueError, match="mean, std, low, high"):
        MaskRatioSampler(high=(0.9, 0.1))
    with pytest.raises(ValueError, match="std"):
        MaskRatioSampler(low=(0.0, 0.0, 0.0, 0.5))
    with pytest.raises(ValueError, match="uniform"):
        MaskRatioSampler("uniform", uniform=(0.7, 0.2))
    with pytest.raises(ValueError, match="max_ratio"):
        MaskRatioSampler("mar", max_ratio=0.5)
    with pytest.raises(ValueError, match="torch.Generator"):
        MaskRatioSampler("mar").sample(4)
    with pytest.raises(ValueError, match="batch_size"):
        MaskRatioSampler("mar").sample(-1, _gen(0))


def test_bad_input_arguments():
    tokens, mask = _batch([4, 2])
    r = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="unknown mask mode"):
        make_mntp_inputs(tokens, mask, r, mode="mask", generator=_gen(0))
    with pytest.raises(ValueError, match=r"ratios must lie in \[0, 1\]"):
        make_mntp_inputs(tokens, mask, torch.tensor([0.5, 1.2]), generator=_gen(0))
    with pytest.raises(ValueError, match=r"ratios must lie in \[0, 1\]"):
        make_mntp_inputs(tokens, mask, torch.tensor([float("nan"), 0.1]), generator=_gen(0))
    with pytest.raises(ValueError, match="ratios must have shape"):
        make_mntp_inputs(tokens, mask, torch.full((3,), 0.5), generator=_gen(0))
    with pytest.raises(ValueError, match="token_mask shape"):
        make_mntp_inputs(tokens, mask[:, :-1], r, generator=_gen(0))
    with pytest.raises(ValueError, match="bool"):
        make_mntp_inputs(tokens, mask.long(), r, generator=_gen(0))
    with pytest.raises(ValueError, match="right-padded"):
        make_mntp_inputs(tokens, mask.flip(1), r, generator=_gen(0))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        make_mntp_inputs(tokens[..., 0], mask, r, generator=_gen(0))
    with pytest.raises(ValueError, match="torch.Generator"):
        make_mntp_inputs(tokens, mask, r)
    with pytest.raises(ValueError, match="torch.Generator"):
        make_mntp_inputs(tokens, mask, r, generator=0)
