"""Streaming decode: chunks concatenate to the one-shot decode (exactly within the decoder's
receptive field, within a measured tolerance through the real VAE), arrive when their
lookahead is complete, and the streamed tokens are the one-shot tokens."""

import pytest
import torch
import torch.nn.functional as F

from experiments import pipeline
from experiments.config import load_config
from lightning_modules.audio_lm import AudioLMSystem
from lightning_modules.parts.pretransform import MelVAEPretransform
from lightning_modules.parts.streaming import StreamingDecoder
from lightning_modules.parts.text_conditioning import train_sentencepiece

HOP = 5  # samples per token of the local test decoder


def local_decoder(reach: int):
    """tokens (B, n, D) -> wave (B, n * HOP): every sample depends on the tokens within
    ``reach`` of its own (a 1-D convolution over tokens, zero-padded at both ends)."""
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(HOP, 3, 2 * reach + 1, generator=gen)  # (out = HOP samples, in = D, taps)

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        out = F.conv1d(tokens.transpose(1, 2), kernel, padding=reach)  # (B, HOP, n)
        return out.transpose(1, 2).reshape(tokens.shape[0], -1)

    return decode


def stream(decoder: StreamingDecoder, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Push ``tokens (B, N, D)`` one by one -> (concatenated wave, token count at each chunk)."""
    chunks, arrivals = [], []
    for i in range(tokens.shape[1]):
        chunk = decoder.push(tokens[:, i])
        if chunk is not None:
            chunks.append(chunk)
            arrivals.append(i + 1)
    rest = decoder.flush()
    if rest is not None:
        chunks.append(rest)
    return torch.cat(chunks, dim=1), arrivals


@pytest.mark.parametrize("crossfade", [0, 2])
def test_streamed_equals_one_shot_within_the_receptive_field(crossfade):
    tokens = torch.randn(2, 37, 3)  # not a multiple of the chunk
    decode = local_decoder(reach=3)
    lookahead = 3 + crossfade  # the reach, and the overlap decoded from the lookahead
    wave, arrivals = stream(StreamingDecoder(decode, HOP, chunk_tokens=8, left_tokens=3, lookahead_tokens=lookahead,
                                             crossfade_tokens=crossfade), tokens)
    assert wave.shape == (2, 37 * HOP)
    torch.testing.assert_close(wave, decode(tokens), atol=1e-5, rtol=1e-5)
    assert arrivals == [8 * k + lookahead for k in range(1, 5) if 8 * k + lookahead <= 37]  # once the lookahead exists


def test_too_little_context_is_visible():
    """The test above can fail: with less lookahead than the decoder's reach the chunk edges differ."""
    tokens = torch.randn(1, 30, 3)
    decode = local_decoder(reach=3)
    wave, _ = stream(StreamingDecoder(decode, HOP, chunk_tokens=8, left_tokens=3, lookahead_tokens=1,
                                      crossfade_tokens=0), tokens)
    assert (wave - decode(tokens)).abs().max() > 1e-2


def test_short_streams_and_bad_settings():
    decode = local_decoder(reach=1)
    wave, arrivals = stream(StreamingDecoder(decode, HOP, chunk_tokens=8, lookahead_tokens=4), torch.randn(1, 5, 3))
    assert arrivals == [] and wave.shape == (1, 5 * HOP)  # everything comes with flush
    assert StreamingDecoder(decode, HOP).flush() is None
    with pytest.raises(ValueError, match="crossfade_tokens=3"):
        StreamingDecoder(decode, HOP, lookahead_tokens=2, crossfade_tokens=3)
    with pytest.raises(ValueError, match="chunk_tokens ≥ 1"):
        StreamingDecoder(decode, HOP, chunk_tokens=0)


def test_streaming_through_the_real_vae_is_within_tolerance():
    """Through the demo's mel-VAE (GroupNorm and middle-block attention see the whole
    input, so a window cannot be exact) with the base config's streaming settings: the
    streamed log-mel is within 0.1 of one-shot on average (measured on the trained demo
    VAE: 0.053 mean, 0.91 max, against a log-mel std of 1.35)."""
    cfg = load_config("demo", [])
    torch.manual_seed(0)
    pretransform = MelVAEPretransform.from_scratch(pipeline.mel_kwargs(cfg), pipeline.vae_kwargs(cfg)).eval()
    tokens = torch.randn(2, 60, pretransform.token_dim)
    sample = cfg.sample

    def decode_mel(t: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, n * 4 * n_mels): mel frames as "samples"
        with torch.no_grad():
            return pretransform.decode_mel(t, normalized=False).transpose(1, 2).reshape(t.shape[0], -1)

    frames_per_token = pretransform.downsampling_ratio // pretransform.mel.hop_length
    decoder = StreamingDecoder(
        decode_mel, frames_per_token * pretransform.mel.n_mels, sample.stream_chunk_tokens, sample.stream_left_tokens,
        sample.stream_lookahead_tokens, crossfade_tokens=0,
    )
    streamed, _ = stream(decoder, tokens)
    one_shot = decode_mel(tokens)
    error = (streamed - one_shot).abs()
    assert error.mean() < 0.1, f"mean |log-mel error| {error.mean():.3f}"
    assert error.mean() < 0.15 * one_shot.std()  # random VAE: 0.10 of the std; trained demo VAE: 0.04


def tiny_system(cfg) -> AudioLMSystem:
    captions = ["a high pitched beep pulsing", "low hum fading away", "white noise hiss"] * 4
    import tempfile

    sp = train_sentencepiece(captions, tempfile.mkdtemp() + "/spm", 40)
    return AudioLMSystem(dict(cfg), sp_model_path=str(sp)).eval()


def test_stream_fn_yields_the_one_shot_tokens_in_chunks():
    """The pipeline's stream: the same tokens as render (one sampling loop, same seed); its
    chunks concatenate to the one-shot wave's length; a prompt's resynthesis streams first."""
    from omegaconf import OmegaConf

    cfg = load_config("demo", ["model.width=32", "model.depth=2", "model.heads=2", "model.head.width=32",
                               "model.head.depth=1", "text.width=16", "text.depth=1", "text.heads=2",
                               "sample.steps=2", "vocoder.griffin_lim_iters=2"])
    torch.manual_seed(0)
    pretransform = MelVAEPretransform.from_scratch(pipeline.mel_kwargs(cfg), pipeline.vae_kwargs(cfg), pipeline.vocoder_kwargs(cfg)).eval()
    system = tiny_system(OmegaConf.to_container(cfg, resolve=True))
    captions = ["a high pitched beep pulsing", "white noise hiss"]
    kwargs = pipeline._sampling_kwargs(cfg, system, 7)
    one_shot = system.generate_tokens(captions, 20, **kwargs)
    streamed = torch.stack(list(system.iter_tokens(captions, 20, **pipeline._sampling_kwargs(cfg, system, 7))), dim=1)
    torch.testing.assert_close(streamed, one_shot)

    chunks = list(pipeline.stream_fn(cfg, pretransform, 0.8, 7)(system, captions))
    rendered = pipeline.render_fn(cfg, pretransform, 0.8, 7)(system, captions)
    assert len(chunks) == 3  # 20 tokens in chunks of 8 (+ flush)
    assert torch.cat(chunks, dim=1).shape == rendered.shape

    prompt = torch.randn(2, 12, system.token_dim)
    chunks = list(pipeline.stream_fn(cfg, pretransform, 0.4, 7)(system, captions, prompt))
    assert sum(c.shape[-1] for c in chunks) == (12 + 10) * pretransform.downsampling_ratio
