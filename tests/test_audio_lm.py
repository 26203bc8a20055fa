"""The audio LM system: (M)NTP training step, generation through the KV cache, checkpoints.

The config is the real ``demo`` experiment shrunk to a few thousand parameters.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.config import load_config
from lightning_modules.audio_lm import AudioLMSystem, build_decoder, build_head, window_shifts
from lightning_modules.parts.decoder import count_parameters
from lightning_modules.parts.masking import make_mntp_inputs
from lightning_modules.parts.text_conditioning import train_sentencepiece

CAPTIONS = [
    "a high pitched beep pulsing",
    "low hum fading away",
    "white noise hiss",
    "a clicking sound followed by a rising sweep",
    "medium tone steady",
    "a buzzing square wave fading in",
] * 4
TINY = [
    "model.width=32",
    "model.depth=2",
    "model.heads=2",
    "model.max_tokens=12",
    "model.token_dim=8",
    "model.head.width=32",
    "model.head.depth=1",
    "model.head.batch_mul=2",
    "text.width=16",
    "text.depth=1",
    "text.heads=2",
    "text.max_len=10",
    "text.vocab_size=40",
    "sample.steps=5",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return str(train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("spm") / "spm"), 40))


def make_system(sp_model: str, *overrides: str) -> AudioLMSystem:
    torch.manual_seed(0)
    cfg = load_config("demo", [*TINY, *overrides])
    return AudioLMSystem(OmegaConf.to_container(cfg, resolve=True), sp_model_path=sp_model)


def record_head_sample_kwarg(monkeypatch, system: AudioLMSystem, key: str) -> list:
    """Spy on ``system.head.sample``: the returned list gets ``kwargs.get(key)`` of every call."""
    seen = []
    original = system.head.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get(key))
        return original(*args, **kwargs)

    monkeypatch.setattr(system.head, "sample", spy)
    return seen


def make_batch(batch_size=4, num_tokens=12, token_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, num_tokens, token_dim, generator=g)
    lengths = torch.tensor([num_tokens, num_tokens - 3, num_tokens, 5][:batch_size])
    token_mask = torch.arange(num_tokens)[None] < lengths[:, None]
    tokens = tokens * token_mask[..., None]
    return {"tokens": tokens, "token_mask": token_mask, "captions": CAPTIONS[:batch_size]}


def test_training_windows_marked_mid_start_train_the_mid_start_bos(sp_model):
    """``mid_start`` of a latent batch reaches the decoder: marked rows use (and train) the
    second BOS; without ``model.mid_start_bos`` the flag is ignored (one BOS)."""
    system = make_system(sp_model, "model.window_start_share=0.5", "model.mid_start_bos=true")
    with torch.no_grad():  # the head's zero-initialised output layers would pass no gradient to the decoder
        for p in system.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    batch = make_batch()
    losses = {}
    for marks in ([False] * 4, [True, False, True, False]):
        system.zero_grad()
        loss = system.diffusion_loss({**batch, "mid_start": torch.tensor(marks)}, torch.zeros(4),
                                     torch.Generator().manual_seed(0), p_uncond=0.0)["loss"]
        loss.backward()
        losses[any(marks)] = float(loss)
        grad = system.decoder.mid_bos.grad
        assert (grad is not None and grad.abs().sum() > 0) == any(marks)
    assert losses[True] != losses[False]
    plain = make_system(sp_model)
    assert plain.decoder.mid_bos is None
    args = (torch.zeros(4), torch.Generator().manual_seed(0))
    assert float(plain.diffusion_loss({**batch, "mid_start": torch.ones(4, dtype=torch.bool)}, *args, p_uncond=0.0)["loss"]) == \
        float(plain.diffusion_loss(batch, torch.zeros(4), torch.Generator().manual_seed(0), p_uncond=0.0)["loss"])


def test_ntp_step_equals_mntp_step_with_zero_ratio(sp_model, monkeypatch):
    batch = make_batch()
    ntp = make_system(sp_model, "mntp.ratio.kind=none")
    mntp = make_system(sp_model, "mntp.ratio.kind=mixture", "mntp.mode=drop")
    mntp.load_state_dict(ntp.state_dict())
    monkeypatch.setattr(mntp.ratio_sampler, "sample", lambda batch_size, generator: torch.zeros(batch_size))
    losses, grads = [], []
    for system in (ntp, mntp):
        torch.manual_seed(1)
        loss = system.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_mntp_changes_the_step(sp_model):
    """A non-zero ratio really drops tokens: the loss differs from the NTP loss."""
    batch = make_batch()
    system = make_system(sp_model, "mntp.ratio.kind=uniform", "mntp.ratio.uniform=[0.5,0.5]")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    masked = system.diffusion_loss(batch, torch.full((4,), 0.5), g, p_uncond=0.0)["loss"]
    torch.manual_seed(1)
    plain = system.diffusion_loss(batch, torch.zeros(4), torch.Generator().manual_seed(0), p_uncond=0.0)["loss"]
    assert not torch.allclose(masked, plain)


def test_next_token_flag_separates_plain_next_token_draws_from_skipped_targets(sp_model):
    """``next_token`` (logged as train/loss_next_token vs train/loss_skipped_target) is True
    exactly where a draw's target follows its slot's own input token: everywhere under NTP,
    and under MNTP only there — recomputed here from the masked inputs themselves."""
    system = make_system(sp_model, "mntp.mode=drop")
    batch = make_batch()
    plain = system.diffusion_loss(batch, torch.zeros(4), torch.Generator().manual_seed(0), p_uncond=0.0)
    assert plain["next_token"][plain["weight"] > 0].all()
    out = system.diffusion_loss(batch, torch.full((4,), 0.6), torch.Generator().manual_seed(0), p_uncond=0.0)
    generator = torch.Generator().manual_seed(0)
    torch.rand(4, generator=generator)  # diffusion_loss draws its text dropout first
    inputs = make_mntp_inputs(batch["tokens"], batch["token_mask"], torch.full((4,), 0.6), mode="drop",
                              predict_skipped=system.cfg.mntp.predict_skipped, generator=generator)
    expected = []
    for b in range(4):  # slot 0 sits before token 0 (k = -1), slot j + 1 at input j's original index
        positions = [-1] + inputs.position_ids[b].tolist()
        count = int(inputs.slot_counts[b])
        expected += [int(inputs.target_ids[b, j]) == positions[j] + 1 for j in range(count)]
    real = out["weight"] > 0
    assert out["next_token"].tolist() == expected * system.head.batch_mul  # draw r of row i at r * K + i
    assert (~out["next_token"][real]).any() and out["next_token"][real].any()  # both kinds occur at ratio 0.6


def test_no_kept_position_sees_a_later_or_dropped_token(sp_model):
    """Through gradients: the output at kept position j (original index k_j) depends on no
    original token with index > k_j, dropped or kept."""
    system = make_system(sp_model, "mntp.target_embedding=input")
    batch = make_batch()
    tokens = batch["tokens"].clone().requires_grad_(True)
    inputs = make_mntp_inputs(
        tokens, batch["token_mask"], torch.full((4,), 0.4), mode="drop", generator=torch.Generator().manual_seed(3)
    )
    prefix, prefix_mask = system.encode_text(batch["captions"])
    z = system.decoder(prefix, prefix_mask, inputs.tokens, inputs.position_ids, inputs.target_ids, inputs.token_mask)
    probe = torch.randn(z.shape[-1])  # z.sum() would be constant: each z row leaves a LayerNorm
    for b in range(4):
        for slot in range(1, inputs.tokens.shape[1] + 1):
            if not inputs.token_mask[b, slot - 1]:
                continue
            k = int(inputs.position_ids[b, slot - 1])
            (grad,) = torch.autograd.grad((z[b, slot] * probe).sum(), tokens, retain_graph=True)
            later = grad[b, k + 1 :].abs().sum()
            assert later == 0, f"sample {b} slot {slot} (k={k}) sees a token after it"
            assert grad[b, k].abs().sum() > 0  # and it does see its own token


def test_training_loss_falls_when_overfitting_a_batch(sp_model):
    system = make_system(sp_model, "optim.lr=0.003")
    batch = make_batch()
    optimizer = torch.optim.AdamW(system.parameters(), lr=3e-3)
    losses = []
    for step in range(120):  # a few fixed noise draws, so the loss can go down
        loss = system.diffusion_loss(batch, torch.zeros(4), torch.Generator().manual_seed(step % 4), p_uncond=0.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def _naive_generate(system: AudioLMSystem, captions, num_tokens, sample_fn, history=None):
    """Recompute the full forward at every step (no cache), after an optional forced
    ``history`` (B, P, D); captions None: the null prefix."""
    if captions is None:
        prefix, prefix_mask = system.null_text(history.shape[0])
    else:
        prefix, prefix_mask = system.encode_text(captions)
    tokens = history if history is not None else torch.zeros(len(captions), 0, system.token_dim)
    for i in range(num_tokens):
        z = system.decoder(prefix, prefix_mask, tokens)  # plain NTP ids
        x = sample_fn(z[:, -1])
        tokens = torch.cat([tokens, x[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("target_embedding", ["output", "input", "none"])
def test_kv_cache_generation_equals_full_recomputation(sp_model, monkeypatch, target_embedding):
    system = make_system(sp_model, f"mntp.target_embedding={target_embedding}").eval()
    proj = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    sample_fn = lambda z: torch.tanh(z @ proj)  # a deterministic stand-in for the diffusion sampler
    monkeypatch.setattr(system.head, "sample", lambda z_cond, z_uncond=None, **kw: sample_fn(z_cond))
    captions = CAPTIONS[:3]
    with torch.no_grad():
        cached = system.generate_tokens(captions, 10, cfg_scale=1.0)
        naive = _naive_generate(system, captions, 10, sample_fn)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("captions", [CAPTIONS[:3], None], ids=["captioned", "unconditional"])
def test_continuation_keeps_the_prompt_and_equals_generation_after_forced_history(sp_model, monkeypatch, captions):
    system = make_system(sp_model).eval()
    proj = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    sample_fn = lambda z: torch.tanh(z @ proj)  # deterministic stand-in for the diffusion sampler
    monkeypatch.setattr(system.head, "sample", lambda z_cond, z_uncond=None, **kw: sample_fn(z_cond))
    prompt = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        continued = system.generate_tokens(captions, 6, cfg_scale=1.0, prompt_tokens=prompt)
        naive = _naive_generate(system, captions, 6, sample_fn, history=prompt)
    assert continued.shape == (3, 10, 8)
    assert torch.equal(continued[:, :4], prompt)  # the prompt comes back unchanged
    torch.testing.assert_close(continued, naive, atol=1e-4, rtol=1e-4)
    unprompted = system.generate_tokens(captions or [""] * 3, 6, cfg_scale=1.0)
    assert not torch.allclose(continued[:, 4:], unprompted, atol=1e-3)  # the history is used


def _naive_sliding_generate(system: AudioLMSystem, captions, num_tokens, sample_fn, keep, mid_start_after_cut=False,
                            end_tokens=0):
    """Full recomputation over a window that, once it holds model.max_tokens - ``end_tokens``
    tokens, is cut to its newest ``keep`` (renumbered from position 0; ``mid_start_after_cut``:
    a cut window starts with the mid-start BOS)."""
    prefix, prefix_mask = system.encode_text(captions)
    window = torch.zeros(len(captions), 0, system.token_dim)
    out, cut = [], None
    for _ in range(num_tokens):
        x = sample_fn(system.decoder(prefix, prefix_mask, window, mid_start=cut)[:, -1])
        out.append(x)
        window = torch.cat([window, x[:, None]], dim=1)
        if window.shape[1] == system.decoder.max_tokens - end_tokens:
            window = window[:, -keep:]
            cut = torch.ones(len(captions), dtype=torch.bool) if mid_start_after_cut else None
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mid_start_bos, end_tokens", [(False, 0), (True, 0), (False, 1), (False, 3)],
                         ids=["one_bos", "mid_start_bos", "end_tokens_1", "end_tokens_3"])
def test_long_form_sliding_window_equals_full_context_within_it_and_recomputation_beyond(sp_model, monkeypatch, mid_start_bos, end_tokens):
    """Within the context nothing changes (``window_end_tokens`` included); beyond it the
    window of max_tokens - end_tokens positions equals full recomputation over a window cut
    to its newest tokens."""
    overrides = ["model.window_start_share=0.5", "model.mid_start_bos=true"] if mid_start_bos else []
    system = make_system(sp_model, *overrides).eval()  # model.max_tokens=12
    proj = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    sample_fn = lambda z: torch.tanh(z @ proj)  # noqa: E731 — deterministic stand-in for the diffusion sampler
    monkeypatch.setattr(system.head, "sample", lambda z_cond, z_uncond=None, **kw: sample_fn(z_cond))
    captions = CAPTIONS[:2]
    keep = round(0.5 * (12 - end_tokens))
    with torch.no_grad():
        within = system.generate_tokens(captions, 12, cfg_scale=1.0, window_end_tokens=0)
        within_end = system.generate_tokens(captions, 12, cfg_scale=1.0, window_end_tokens=end_tokens)
        long = system.generate_tokens(captions, 30, cfg_scale=1.0, window_overlap=0.5, window_end_tokens=end_tokens)
        naive = _naive_sliding_generate(system, captions, 30, sample_fn, keep=keep, mid_start_after_cut=mid_start_bos,
                                        end_tokens=end_tokens)
    assert long.shape == (2, 30, 8)
    torch.testing.assert_close(within_end, within, atol=0, rtol=0)  # a clip that fits uses the whole context
    window = 12 - end_tokens
    torch.testing.assert_close(long[:, :window], within[:, :window], atol=1e-5, rtol=1e-5)  # within the window: full context
    torch.testing.assert_close(long, naive, atol=1e-4, rtol=1e-4)
    if end_tokens:  # the window does shift earlier: the end positions are never sampled
        assert not torch.allclose(long[:, window:12], within[:, window:12], atol=1e-3)
    if mid_start_bos:  # the refilled windows do start with the mid-start BOS
        with torch.no_grad():
            one_bos = _naive_sliding_generate(system, captions, 30, sample_fn, keep=keep)
        assert not torch.allclose(long[:, 12:], one_bos[:, 12:], atol=1e-3)
    with pytest.raises(ValueError, match="window_overlap must be in \\(0, 1\\)"):
        system.generate_tokens(captions, 3, window_overlap=1.0)
    with pytest.raises(ValueError, match="sample.window_end_tokens must be in \\[0, model.max_tokens - 2 = 10\\], got 11"):
        system.generate_tokens(captions, 3, window_end_tokens=11)


def test_window_shifts_are_where_the_sampling_loop_refills_the_cache(sp_model, monkeypatch):
    """`window_shifts` (recorded by `make generate` as the seconds to listen at) names the
    tokens sampled right after each refill of the KV cache, with and without a prompt."""
    system = make_system(sp_model).eval()  # model.max_tokens=12
    monkeypatch.setattr(system.head, "sample", lambda z_cond, z_uncond=None, **kw: torch.tanh(z_cond[:, :8]))
    produced, refills = [], []
    real_prefill = system.decoder.prefill

    def spy(*args, **kwargs):
        refills.append(len(produced))  # tokens yielded before this (re)fill
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(system.decoder, "prefill", spy)
    with torch.no_grad():
        for overlap, num_prompt, end in [(0.5, 0, 0), (0.75, 0, 0), (0.5, 4, 0), (0.9, 11, 0), (0.5, 0, 2), (0.75, 11, 2)]:
            produced.clear(), refills.clear()
            prompt = torch.randn(2, num_prompt, 8) if num_prompt else None
            produced.extend(system.iter_tokens(CAPTIONS[:2], 30, cfg_scale=1.0, window_overlap=overlap, prompt_tokens=prompt,
                                               window_end_tokens=end))
            assert len(produced) == 30 and refills[0] == 0
            shifts = window_shifts(30, 12, overlap, num_prompt, end)
            assert refills[1:] == [i for i in shifts if i > 0], (overlap, num_prompt, end)
            assert (shifts[:1] == [0]) == (num_prompt >= 12 - end)  # a prompt that fills the window: refilled at once
    assert window_shifts(30, 12, 0.5) == [12, 18, 24] and window_shifts(12, 12, 0.5) == []
    assert window_shifts(30, 12, 0.5, window_end_tokens=2) == [10, 15, 20, 25]  # window 10, keep 5
    assert window_shifts(12, 12, 0.5, window_end_tokens=2) == []  # fits the context: no window


def test_continuation_with_guidance_and_bad_prompts(sp_model):
    system = make_system(sp_model).eval()  # model.max_tokens=12
    prompt = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    out = system.generate_tokens(CAPTIONS[:2], 7, cfg_scale=3.0, prompt_tokens=prompt,
                                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12, 8) and torch.equal(out[:, :5], prompt) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="the audio prompt has 12 tokens; the model's context is model.max_tokens=12"):
        system.generate_tokens(CAPTIONS[:2], 8, prompt_tokens=torch.randn(2, 12, 8))
    with pytest.raises(ValueError, match="prompt_tokens must be \\(2, P, 8\\)"):
        system.generate_tokens(CAPTIONS[:2], 2, prompt_tokens=prompt[:, :, :4])
    with pytest.raises(ValueError, match="needs prompt_tokens"):
        system.generate_tokens(None, 2)


def test_generation_is_seeded_and_guidance_batches_rows(sp_model):
    system = make_system(sp_model).eval()
    captions = CAPTIONS[:2]
    a = system.generate_tokens(captions, 6, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    b = system.generate_tokens(captions, 6, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    c = system.generate_tokens(captions, 6, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 6, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    long = system.generate_tokens(captions, 13, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert long.shape == (2, 13, 8) and torch.isfinite(long).all()  # beyond max_tokens=12: sliding window
    with pytest.raises(ValueError, match="window_overlap"):
        system.generate_tokens(captions, 13, window_overlap=1.0)


def test_checkpoint_round_trip_keeps_tokenizer_and_stats(sp_model, tmp_path):
    import lightning as L

    system = make_system(sp_model)
    system.set_latent_stats(torch.arange(8.0), torch.full((8,), 2.0))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(system)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    Path(sp_model).rename(Path(sp_model).with_suffix(".moved"))  # the tokenizer file is gone
    try:
        loaded = AudioLMSystem.load_from_checkpoint(ckpt, map_location="cpu")
    finally:
        Path(sp_model).with_suffix(".moved").rename(sp_model)
    assert loaded.text.tokenize(["a high beep"])["input_ids"].equal(system.text.tokenize(["a high beep"])["input_ids"])
    assert torch.equal(loaded.latent_mean, torch.arange(8.0))
    for (n1, p1), (n2, p2) in zip(system.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and (not torch.is_tensor(p1) or torch.equal(p1, p2)), n1


# FLAN-T5-large hidden size and CLAP's projection size: the two trainable prefix projections.
T5_LARGE_DIM, CLAP_DIM, PREFIX_LEN = 1024, 512, 78


@pytest.mark.parametrize(
    "experiment, paper",
    [("ntp_base", 193e6), ("masked_base", 193e6), ("ntp_large", 462e6), ("masked_large", 462e6)],
)
def test_paper_sizes_within_three_percent(experiment, paper):
    """The real experiment configs, built on the meta device (no memory, no weights)."""
    cfg = load_config(experiment)
    width = cfg.model.width
    with torch.device("meta"):
        decoder = build_decoder(cfg, max_prefix_len=PREFIX_LEN)
        head = build_head(cfg)
    text_projections = (T5_LARGE_DIM + 1) * width + (CLAP_DIM + 1) * width
    null_prefix = PREFIX_LEN * width
    total = count_parameters(decoder) + count_parameters(head) + text_projections + null_prefix
    print(f"{experiment}: {total / 1e6:.1f}M trainable (paper {paper / 1e6:.0f}M)")
    assert abs(total - paper) / paper < 0.03, total


def test_generation_follows_the_caption(sp_model):
    """Three captions, each with its own constant token vector: after a short training run,
    guided generation reproduces each caption's vector (the text path really conditions)."""
    system = make_system(sp_model, "mntp.ratio.kind=none")
    captions = ["a high pitched beep pulsing", "low hum fading away", "white noise hiss"]
    means = torch.tensor([[1.5] * 8, [-1.5] * 8, [0.0] * 4 + [1.5] * 4])
    optimizer = torch.optim.AdamW(system.parameters(), lr=3e-3)
    for step in range(300):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 3, (24,), generator=g)
        tokens = means[idx][:, None, :].expand(24, 6, 8) + 0.1 * torch.randn(24, 6, 8, generator=g)
        batch = {"tokens": tokens, "token_mask": torch.ones(24, 6, dtype=torch.bool), "captions": [captions[i] for i in idx]}
        loss = system.diffusion_loss(batch, torch.zeros(24), g, p_uncond=0.1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    system.eval()
    out = system.generate_tokens(captions, 6, cfg_scale=3.0, num_steps=20, generator=torch.Generator().manual_seed(0))
    per_caption = out.mean(dim=1)  # (3, 8)
    assert (per_caption - means).abs().max() < 0.5, per_caption
    # the validation diagnostic sees it: wrong captions make the first token much harder
    batch = {"tokens": means[:, None, :].expand(3, 6, 8).clone(), "token_mask": torch.ones(3, 6, dtype=torch.bool),
             "captions": captions}
    usage = system.caption_usage(batch, seed=0)
    assert usage["caption_gain"] > 0.5, usage
    untrained = make_system(sp_model, "mntp.ratio.kind=none").eval()
    assert abs(float(untrained.caption_usage(batch, seed=0)["caption_gain"])) < 0.05


def test_mntp_model_generates_through_the_ntp_path(sp_model):
    """Inference is plain NTP for both: same weights, same seed → identical tokens, whatever
    the training-time masking settings."""
    ntp = make_system(sp_model, "mntp.ratio.kind=none").eval()
    mntp = make_system(sp_model, "mntp.ratio.kind=mixture", "mntp.mode=drop", "mntp.predict_skipped=true").eval()
    mntp.load_state_dict(ntp.state_dict())
    a = ntp.generate_tokens(CAPTIONS[:2], 5, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = mntp.generate_tokens(CAPTIONS[:2], 5, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_configs_stored_before_the_head_options_existed_still_build():
    """Checkpoints store their config; one written before ``min_snr_gamma`` / ``prediction``
    existed builds the head the paper's way (plain ε-MSE), not with the demo's newer defaults."""
    stored = OmegaConf.to_container(load_config("demo", TINY), resolve=True)
    for key in ("min_snr_gamma", "prediction"):
        del stored["model"]["head"][key]
    head = build_head(OmegaConf.create(stored))
    assert head.prediction == "eps" and head.min_snr_gamma is None
    assert build_head(load_config("demo", TINY)).prediction == "v"


def test_sampler_choice_reaches_the_head(sp_model, monkeypatch):
    """``sample.sampler`` given at generation time (make generate / make eval overrides) is
    the sampler that runs — not silently the one stored in the checkpoint."""
    from experiments.pipeline import render_fn

    system = make_system(sp_model, "sample.sampler=ddpm").eval()
    seen = record_head_sample_kwarg(monkeypatch, system, "sampler")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ddpm = system.generate_tokens(CAPTIONS[:2], 3, generator=g())
    ddim = system.generate_tokens(CAPTIONS[:2], 3, generator=g(), sampler="ddim")
    assert seen[:3] == [None] * 3 and seen[3:6] == ["ddim"] * 3 and not torch.equal(ddpm, ddim)

    class FakePretransform:  # render_fn only needs these
        tokens_per_second = 2.0

        def to(self, device):
            return self

        def decode(self, latents, normalized):
            return latents.flatten(1)

    cfg = load_config("demo", [*TINY, "sample.sampler=ddim"])
    seen.clear()
    render_fn(cfg, FakePretransform(), seconds=1.5, generator_seed=0)(system, CAPTIONS[:2])
    assert seen == ["ddim"] * 3


def test_input_noise_reaches_the_decoder_inputs_only(sp_model, monkeypatch):
    """``model.input_noise``: the decoder sees noisy input tokens (each sample its own noise
    level, at most input_noise, padding untouched) while the head's targets stay the clean
    tokens; validation (caption_usage) and input_noise 0 see the clean inputs."""
    system = make_system(sp_model, "model.input_noise=0.5")
    batch = make_batch()
    seen = {}
    decoder_forward, head_loss = system.decoder.forward, system.head.loss

    def decoder_spy(prefix, prefix_mask, tokens, position_ids, target_ids, token_mask, **kwargs):
        seen["inputs"] = tokens.detach().clone()
        return decoder_forward(prefix, prefix_mask, tokens, position_ids, target_ids, token_mask, **kwargs)

    def head_spy(targets, z, weight=None, generator=None):
        seen["targets"] = targets.detach().clone()[weight > 0]  # rows of weight 0 pad shapes, not targets
        return head_loss(targets, z, weight=weight, generator=generator)

    monkeypatch.setattr(system.decoder, "forward", decoder_spy)
    monkeypatch.setattr(system.head, "loss", head_spy)
    monkeypatch.setattr(system.ratio_sampler, "sample", lambda batch_size, generator: torch.zeros(batch_size))
    clean = batch["tokens"]
    valid = batch["token_mask"]

    system.training_step(batch, 0)
    noise = seen["inputs"] - clean
    per_sample_std = torch.stack([noise[b][valid[b]].std() for b in range(4)])
    assert (per_sample_std > 0).all() and (per_sample_std < 0.5 * 1.2).all()
    assert per_sample_std.max() / per_sample_std.min() > 1.2  # levels differ between samples
    assert torch.equal(noise[~valid], torch.zeros_like(noise[~valid]))  # padding stays zero
    # NTP: slot j predicts token j — the targets are every valid clean token, in order
    assert torch.equal(seen["targets"], torch.cat([clean[b][valid[b]] for b in range(4)]))

    system.caption_usage(batch, seed=0)
    assert torch.equal(seen["inputs"], clean)
    quiet = make_system(sp_model, "model.input_noise=0.0")
    monkeypatch.setattr(quiet.decoder, "forward", decoder_spy)
    monkeypatch.setattr(quiet.ratio_sampler, "sample", lambda batch_size, generator: torch.zeros(batch_size))
    quiet.training_step(batch, 0)
    assert torch.equal(seen["inputs"], clean)


def test_linear_cfg_schedule_guides_the_first_token_not_at_all_then_ramps(sp_model, monkeypatch):
    """``sample.cfg_schedule=linear``: token i of N is guided with 1 + (s - 1) i / N, so the
    first token (no audio history, where guidance overshoots most) is the unguided sample;
    "unguided_first" does that for the first token only; "constant" keeps s everywhere; a
    misspelled schedule fails naming the key."""
    from lightning_modules.audio_lm import guidance_scales

    assert guidance_scales(5.0, "constant", 4) == [5.0] * 4
    assert guidance_scales(5.0, "linear", 4) == [1.0, 2.0, 3.0, 4.0]
    assert guidance_scales(5.0, "unguided_first", 4) == [1.0, 5.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="sample.cfg_schedule"):
        guidance_scales(5.0, "cosine", 4)

    system = make_system(sp_model).eval()
    with torch.no_grad():  # the head's zero-initialised output would make guidance a no-op
        for p in system.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seen = record_head_sample_kwarg(monkeypatch, system, "cfg_scale")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        linear = system.generate_tokens(CAPTIONS[:2], 4, cfg_scale=5.0, cfg_schedule="linear", generator=g())
        unguided = system.generate_tokens(CAPTIONS[:2], 1, cfg_scale=1.0, generator=g())
        constant = system.generate_tokens(CAPTIONS[:2], 4, cfg_scale=5.0, generator=g())
        first = system.generate_tokens(CAPTIONS[:2], 4, cfg_scale=5.0, cfg_schedule="unguided_first", generator=g())
    assert seen == [1.0, 2.0, 3.0, 4.0, 1.0] + [5.0] * 4 + [1.0, 5.0, 5.0, 5.0]
    torch.testing.assert_close(first[:, 0], unguided[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear[:, 0], unguided[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(linear[:, 0], constant[:, 0], atol=1e-3)


def test_cfg_rescale_reaches_the_head_and_bad_values_fail(sp_model, monkeypatch):
    system = make_system(sp_model, "sample.cfg_rescale=0.7").eval()
    seen = record_head_sample_kwarg(monkeypatch, system, "cfg_rescale")
    system.generate_tokens(CAPTIONS[:2], 2, cfg_scale=3.0)
    system.generate_tokens(CAPTIONS[:2], 1, cfg_scale=3.0, cfg_rescale=0.0)
    assert seen == [0.7, 0.7, 0.0]
    with pytest.raises(ValueError, match="sample.cfg_rescale"):
        system.generate_tokens(CAPTIONS[:2], 1, cfg_rescale=1.5)
