"""Text conditioners: scratch sentencepiece encoder (checkpoint carries the tokenizer) and
the frozen T5 + CLAP loader, exercised on tiny random models saved to tmp dirs."""
import copy
import io
import re

import pytest
import torch

from lightning_modules.parts.text_conditioning import (
    PretrainedT5ClapConditioner, ScratchTextConditioner, apply_text_dropout, train_sentencepiece)

CAPTIONS = [f"a {a} {b} {c}" for a in ("dog", "cat", "car", "bird", "crowd", "train")
            for b in ("barks", "meows loudly", "passes by", "sings")
            for c in ("in the rain", "at night")]  # 48 captions


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("sp") / "sp"), vocab_size=5000)


def test_scratch_shapes_and_masks(sp_path):
    enc = ScratchTextConditioner(sp_path, width=32, depth=2, heads=4, max_len=12, out_dim=24).eval()
    tok = enc.tokenize(["a dog barks in the rain", "", "a train " * 20])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert ids.shape == (3, 12) and mask.dtype == torch.bool
    assert mask[1].sum() == 1  # empty caption -> eos only
    assert mask[2].all()  # truncated to max_len
    assert torch.equal(mask, ids != 0)
    prefix, m = enc(tok)
    assert prefix.shape == (3, 12, 24) and torch.equal(m, mask) and torch.isfinite(prefix).all()
    # padding does not change valid outputs
    alone, _ = enc(enc.tokenize(["a dog barks in the rain"]))
    n = int(mask[0].sum())
    torch.testing.assert_close(prefix[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_scratch_checkpoint_restores_tokenizer(sp_path):
    enc = ScratchTextConditioner(sp_path, width=32, depth=1, heads=4, max_len=10, out_dim=16)
    buf = io.BytesIO()
    torch.save(enc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain tensors only
    restored = ScratchTextConditioner(None, width=32, depth=1, heads=4, max_len=10, out_dim=16,
                                      vocab_size=enc.vocab_size)
    restored.load_state_dict(state)
    caps = ["a cat sings at night", "a crowd passes by"]
    assert torch.equal(restored.tokenize(caps)["input_ids"], enc.tokenize(caps)["input_ids"])
    torch.testing.assert_close(restored.eval()(restored.tokenize(caps))[0], enc.eval()(enc.tokenize(caps))[0])
    with pytest.raises(FileNotFoundError, match="sentencepiece"):
        ScratchTextConditioner("/nonexistent/sp.model")


def test_apply_text_dropout():
    prefix, mask = torch.randn(3, 4, 5), torch.tensor([[1, 1, 0, 0]] * 3).bool()
    null = torch.randn(4, 5)
    p, m = apply_text_dropout(prefix, mask, null, torch.tensor([False, True, False]))
    assert torch.equal(p[1], null) and m[1].all()
    assert torch.equal(p[0], prefix[0]) and torch.equal(m[0], mask[0])


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory, sp_path):
    from transformers import ClapConfig, ClapModel, T5Config, T5EncoderModel, T5Tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    tok = T5Tokenizer(vocab_file=sp_path)  # a local stand-in tokenizer, nothing downloaded
    vocab = len(tok)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=90, projection_dim=12)
    audio = dict(hidden_size=16, depths=[1, 1], num_attention_heads=[1, 1], window_size=4,
                 patch_embeds_hidden_size=16, projection_dim=12, spec_size=64, num_mel_bins=16,
                 patch_stride=(4, 4), patch_size=4)
    clap = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=12))
    clap.save_pretrained(root / "clap")
    tok.save_pretrained(root / "clap")
    return str(root / "t5"), str(root / "clap"), clap.eval()


def test_pretrained_t5_clap(pretrained_dirs):
    t5_dir, clap_dir, clap_ref = pretrained_dirs
    cond = PretrainedT5ClapConditioner(t5_dir, clap_dir, out_dim=24)
    assert cond.max_len == 78 and cond.out_dim == 24
    tok = cond.tokenize(["a dog barks in the rain", "a car"])
    prefix, mask = cond(tok)
    assert prefix.shape == (2, 78, 24) and mask.shape == (2, 78)
    assert mask[:, 0].all() and mask[0].sum() > mask[1].sum()
    # CLAP slot == ClapModel.get_text_features (normalised) through the projection
    ref = clap_ref.get_text_features(input_ids=tok["clap_input_ids"], attention_mask=tok["clap_attention_mask"].long())
    ref = ref if torch.is_tensor(ref) else ref.pooler_output  # transformers 4 returns the tensor, 5 an output
    torch.testing.assert_close(prefix[:, 0], cond.clap_proj(ref), atol=1e-5, rtol=1e-5)
    # only the projections are trainable / checkpointed
    keys = set(cond.state_dict())
    assert keys == {"t5_proj.weight", "t5_proj.bias", "clap_proj.weight", "clap_proj.bias"}
    assert sum(p.numel() for p in cond.parameters()) == sum(
        p.numel() for m in (cond.t5_proj, cond.clap_proj) for p in m.parameters())
    fresh = PretrainedT5ClapConditioner(t5_dir, clap_dir, out_dim=24)
    fresh.load_state_dict(cond.state_dict())  # strict: no frozen keys demanded
    torch.testing.assert_close(fresh(tok)[0], prefix)
    # frozen models stay in eval; an EMA-style deepcopy shares them
    cond.train()
    assert not cond._frozen["t5"].training
    assert copy.deepcopy(cond)._frozen["t5"] is cond._frozen["t5"]


def test_pretrained_cache(pretrained_dirs):
    t5_dir, clap_dir, _ = pretrained_dirs
    cond = PretrainedT5ClapConditioner(t5_dir, clap_dir, out_dim=8, cache_size=2)
    tok = cond.tokenize(["a dog", "a cat sings", "a dog"])
    p1, _ = cond(tok)
    assert len(cond._cache) == 2
    torch.testing.assert_close(p1[0], p1[2])
    cond.cache_size = 0
    torch.testing.assert_close(cond(tok)[0], p1)


def test_pretrained_missing_dirs(tmp_path, pretrained_dirs):
    t5_dir, clap_dir, _ = pretrained_dirs
    with pytest.raises(FileNotFoundError, match="t5_dir"):
        PretrainedT5ClapConditioner(str(tmp_path / "nope"), clap_dir, out_dim=8)
    with pytest.raises(FileNotFoundError, match="clap_dir"):
        PretrainedT5ClapConditioner(t5_dir, str(tmp_path), out_dim=8)  # exists, no config.json


def test_precomputed_frozen_text_equals_running_the_encoders(pretrained_dirs, tmp_path):
    """The frozen T5 + CLAP outputs read from the precomputed file give the prefix the
    encoders give (at every valid position; padding is masked out), without running them;
    captions not in the file still run them; a file of other encoders is refused."""
    from lightning_modules.parts.text_conditioning import FrozenTextEmbeddings

    t5_dir, clap_dir, _ = pretrained_dirs
    torch.manual_seed(0)
    cond = PretrainedT5ClapConditioner(t5_dir, clap_dir, out_dim=24)
    stored = ["a dog barks in the rain", "a car", "a dog barks in the rain", "wind blows"]
    path = FrozenTextEmbeddings.write(tmp_path / "text.pt", cond, stored, batch_size=2, dtype=torch.float32)
    captions = ["wind blows", "a car", "a dog barks in the rain"]
    expected, mask = cond(cond.tokenize(captions))
    cond.use_precomputed(path)
    assert len(cond.store) == 3
    calls = []
    for model in cond._frozen.values():
        model.register_forward_hook(lambda *a: calls.append(1))
    tokenized = cond.tokenize(captions)
    assert "store_rows" in tokenized
    prefix, mask_stored = cond(tokenized)
    assert calls == [] and torch.equal(mask, mask_stored)
    torch.testing.assert_close(prefix[mask], expected[mask], atol=1e-6, rtol=1e-6)
    assert "store_rows" not in cond.tokenize(["a new prompt", "a car"])  # not stored: the encoders run
    cond(cond.tokenize(["a new prompt", "a car"]))
    assert calls
    assert copy.deepcopy(cond).store is cond.store  # the EMA copy shares the mapping
    other = PretrainedT5ClapConditioner(t5_dir, clap_dir, out_dim=24, t5_max_len=20)
    with pytest.raises(ValueError, match="other encoders"):
        other.use_precomputed(path)


def test_bpe_keeps_the_demo_corpus_words_whole(tmp_path):
    """On the synthetic corpus' few words, sentencepiece's unigram trainer stops at a near-
    character vocabulary; text.tokenizer=bpe keeps every word one piece (and so the caption
    within text.max_len), while an unseen word still tokenizes (characters, no unk)."""
    import numpy as np
    import sentencepiece as spm

    from datamodules.synthetic import make_captions, sample_labels

    rng = np.random.default_rng(0)
    captions = [c for _ in range(600) for c in make_captions(sample_labels("train", 0.25, rng), 3, rng)]
    lengths = {}
    for kind in ("unigram", "bpe"):
        sp = spm.SentencePieceProcessor(model_file=train_sentencepiece(captions, str(tmp_path / kind), 1000, kind))
        lengths[kind] = np.mean([len(ids) for ids in sp.encode(captions)])
        if kind == "bpe":
            for caption in captions[:200]:  # one piece per word and per punctuation mark
                assert len(sp.encode(caption)) == len(re.findall(r"\w+|[,-]", caption)), caption
            assert sp.unk_id() not in sp.encode("a wobbly thud")
    words_per_caption = np.mean([len(c.split()) for c in captions])
    assert lengths["bpe"] < 1.2 * words_per_caption < lengths["unigram"]
    with pytest.raises(ValueError, match="text.tokenizer"):
        train_sentencepiece(captions, str(tmp_path / "typo"), 1000, "bpee")
