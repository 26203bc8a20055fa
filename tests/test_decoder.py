"""CausalDecoder: causality via gradients, KV cache == full forward, position/target ids,
parameter counts of the paper sizes (on the meta device)."""
import pytest
import torch

from lightning_modules.parts.decoder import (
    CausalDecoder, RotaryEmbedding, apply_rotary, count_parameters, decay_parameter_groups,
)
from lightning_modules.parts.diffusion_head import DiffusionHead

TOKEN_DIM, WIDTH, L = 6, 32, 5


def tiny(target_embedding="output", **kw):
    torch.manual_seed(0)
    return CausalDecoder(TOKEN_DIM, WIDTH, depth=2, heads=4, max_prefix_len=L, max_tokens=12,
                         target_embedding=target_embedding, **kw).eval()


def padded_prefix(B=3):
    prefix = torch.randn(B, L, WIDTH)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False  # different valid lengths in one batch
    if B > 2:
        mask[2, 1:] = False
    return prefix, mask


@pytest.mark.parametrize("mode,rope", [("output", False), ("input", False), ("none", False), ("output", True)])
def test_causality_through_gradients(mode, rope):
    dec = tiny(mode, rope=rope)
    B, M = 3, 7
    prefix, pmask = padded_prefix(B)
    prefix.requires_grad_(True)
    tokens = torch.randn(B, M, TOKEN_DIM, requires_grad=True)
    z = dec(prefix, pmask, tokens)  # (B, M+1, W)
    assert z.shape == (B, M + 1, WIDTH)
    w = torch.randn(WIDTH)  # not z.sum(): the sum of a LayerNorm output has zero gradient
    for j in range(M + 1):  # z[:, j] has seen BOS + tokens 0..j-1
        gt, gp = torch.autograd.grad((z[:, j] * w).sum(), (tokens, prefix), retain_graph=True)
        norms = gt.abs().sum(dim=(0, 2))  # (M,)
        assert torch.all(norms[j:] == 0), f"output {j} depends on tokens >= {j}"
        assert torch.all(norms[:j] > 0), f"output {j} ignores earlier tokens"
        assert torch.all(gp[~pmask] == 0), "prefix padding leaks into outputs"
        assert torch.all(gp[pmask].abs().sum(-1) > 0)


def test_token_padding_is_masked():
    dec = tiny("input")
    prefix, pmask = padded_prefix(2)
    tokens = torch.randn(2, 6, TOKEN_DIM)
    tmask = torch.ones(2, 6, dtype=torch.bool)
    tmask[0, 4:] = False
    pos = torch.arange(6).expand(2, 6).clone()
    pos[0, 4:] = -1  # padding ids are ignored
    tgt = torch.arange(7).expand(2, 7).clone()
    tgt[0, 5:] = -1
    z = dec(prefix, pmask, tokens, pos, tgt, tmask)
    z_short = dec(prefix[:1], pmask[:1], tokens[:1, :4])
    torch.testing.assert_close(z[0, :5], z_short[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(z).all()
    assert dec(prefix, pmask, tokens[:, :0]).shape == (2, 1, WIDTH)  # BOS only


@pytest.mark.parametrize("mode,rope", [("output", False), ("input", False), ("none", False),
                                       ("output", True), ("input", True)])
def test_kv_cache_matches_full_forward(mode, rope):
    dec = tiny(mode, rope=rope)
    B, M = 3, 8
    prefix, pmask = padded_prefix(B)
    tokens = torch.randn(B, M, TOKEN_DIM)
    z_full = dec(prefix, pmask, tokens)  # NTP: position_ids = arange(M), target_ids = arange(M+1)

    cache = dec.make_cache(B, L + 1 + M, device=prefix.device, dtype=torch.float32)
    assert cache.k[0].shape == (B, 4, L + 1 + M, WIDTH // 4)  # preallocated, visible
    zs = [dec.prefill(prefix, pmask, cache, target_id=0)]
    for i in range(M):
        zs.append(dec.step(tokens[:, i], position_id=i, target_id=i + 1, cache=cache))
    assert cache.length == L + 1 + M
    torch.testing.assert_close(torch.stack(zs, 1), z_full, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="full"):
        dec.step(tokens[:, 0], M, M, cache)


def test_mid_start_bos_marks_chosen_rows_and_the_cache_path_agrees():
    """A window begun mid-clip gets the second BOS: those rows change, the others are the
    plain decoder's (whose weights the extra vector leaves as they were); prefill with
    mid_start equals the full forward with every row marked."""
    plain, dec = tiny(), tiny(mid_start_bos=True)
    marked_params = dict(dec.named_parameters())
    assert set(marked_params) - dict(plain.named_parameters()).keys() == {"mid_bos"}
    assert all(torch.equal(p, marked_params[name]) for name, p in plain.named_parameters())
    B, M = 3, 6
    prefix, pmask = padded_prefix(B)
    tokens = torch.randn(B, M, TOKEN_DIM)
    marked = torch.tensor([True, False, True])
    z = dec(prefix, pmask, tokens, mid_start=marked)
    z_plain = plain(prefix, pmask, tokens)
    torch.testing.assert_close(z[1], z_plain[1])
    assert not torch.allclose(z[0], z_plain[0]) and not torch.allclose(z[2], z_plain[2])
    cache = dec.make_cache(B, L + 1 + M)
    zs = [dec.prefill(prefix, pmask, cache, target_id=0, mid_start=True)]
    zs += [dec.step(tokens[:, i], position_id=i, target_id=i + 1, cache=cache) for i in range(M)]
    z_all = dec(prefix, pmask, tokens, mid_start=torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(torch.stack(zs, 1), z_all, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no mid-start BOS"):
        plain(prefix, pmask, tokens, mid_start=marked)


@pytest.mark.parametrize("rope", [False, True])
def test_dropped_tokens_explicit_ids(rope):
    """MNTP input: kept tokens keep their original indices, targets are later tokens."""
    dec = tiny("output", rope=rope)
    B, N = 2, 10
    prefix, pmask = padded_prefix(B)
    x = torch.randn(B, N, TOKEN_DIM)
    keep = torch.tensor([0, 2, 3, 7])  # dropped 1, 4, 5, 6, 8, 9
    pos = keep.expand(B, -1)
    tgt = torch.tensor([1, 3, 4, 9, 10 - 1]).expand(B, -1)  # in (k_j, k_{j+1}]
    z = dec(prefix, pmask, x[:, keep], pos, tgt)
    assert z.shape == (B, len(keep) + 1, WIDTH) and torch.isfinite(z).all()
    # the ids matter (not silently arange) ...
    z_ntp = dec(prefix, pmask, x[:, keep])
    assert not torch.allclose(z, z_ntp)
    # ... and the cache path with the same explicit ids gives the same outputs
    cache = dec.make_cache(B, L + 1 + len(keep))
    zs = [dec.prefill(prefix, pmask, cache, target_id=int(tgt[0, 0]))]
    for j, k in enumerate(keep.tolist()):
        zs.append(dec.step(x[:, k], k, int(tgt[0, j + 1]), cache))
    torch.testing.assert_close(torch.stack(zs, 1), z, atol=1e-4, rtol=1e-4)


def test_rotary_scores_depend_only_on_the_time_difference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)

    def score(tq, tk):
        rq = apply_rotary(q, rope(torch.tensor([[tq]])))
        rk = apply_rotary(k, rope(torch.tensor([[tk]])))
        return (rq * rk).sum(-1)  # (1, 2, 1)

    torch.testing.assert_close(score(7, 3), score(24, 20), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)
    x = torch.randn(2, 3, 5, 8)  # a rotation: norms are kept
    rx = apply_rotary(x, rope(torch.arange(5).expand(2, 5)))
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


def test_rotary_times_of_dropped_tokens_matter():
    """With rope, the same kept tokens at other original indices give other outputs even
    without learned absolute embeddings: the rotary times follow the position ids."""
    dec = tiny("none", rope=True)
    with torch.no_grad():
        dec.audio_pos.weight.zero_()
    prefix, pmask = padded_prefix(2)
    x = torch.randn(2, 3, TOKEN_DIM)
    z_near = dec(prefix, pmask, x, torch.tensor([0, 1, 2]).expand(2, 3))
    z_far = dec(prefix, pmask, x, torch.tensor([0, 4, 8]).expand(2, 3))
    torch.testing.assert_close(z_near[:, :2], z_far[:, :2])  # BOS and token 0 see the same past
    assert not torch.allclose(z_near[:, 2:], z_far[:, 2:], atol=1e-4)


def test_decay_groups_and_count():
    dec = tiny()
    groups = decay_parameter_groups(dec, 0.02)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == count_parameters(dec)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    with pytest.raises(ValueError, match="target_embedding"):
        CausalDecoder(4, 8, 1, 2, target_embedding="bogus")


def paper_size_counts(depth, width, heads, head_width, head_depth, token_dim=128, text_dim=None):
    with torch.device("meta"):
        dec = CausalDecoder(token_dim, width, depth, heads, max_prefix_len=78, max_tokens=256)
        head = DiffusionHead(token_dim, width, width=head_width, depth=head_depth)
        text_proj = torch.nn.Linear(text_dim or width, width)  # e.g. T5-base 768 -> width
    return count_parameters(dec), count_parameters(head), count_parameters(text_proj)


def test_paper_parameter_counts():
    for name, args, paper in [("Base", (24, 768, 12, 1024, 3), 193e6), ("Large", (32, 1024, 16, 1280, 6), 462e6)]:
        d, h, t = paper_size_counts(*args, text_dim=768)
        total = d + h + t
        print(f"{name}: decoder {d / 1e6:.2f}M head {h / 1e6:.2f}M text-proj {t / 1e6:.2f}M "
              f"total {total / 1e6:.2f}M (paper {paper / 1e6:.0f}M)")
        assert abs(total - paper) / paper < 0.10


@pytest.mark.parametrize("rope", [False, True])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(rope):
    torch.manual_seed(0)
    dec = tiny(rope=rope)
    prefix, prefix_mask = padded_prefix()
    tokens = torch.randn(3, 5, dec.token_dim)
    results = []
    for checkpointed in (False, True):
        dec.activation_checkpointing = checkpointed
        dec.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = dec(prefix, prefix_mask, tokens)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None},
                        sum(saved)))
    (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)
    assert saved_b < saved_a  # fewer activations kept for backward
