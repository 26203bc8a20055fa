"""Streaming decode: tokens in as they are sampled, waveform chunks out.

The VAE decoder and the vocoder are not causal (convolutions look both ways; the VAE's
GroupNorm and middle-block attention see the whole clip), so a chunk of audio is decoded
from a *window* of tokens around it: ``left_tokens`` already emitted tokens before it and
``lookahead_tokens`` after it, which delays each chunk by that many tokens. Neighbouring
chunks overlap by ``crossfade_tokens`` and are blended with a linear ramp, so the phase of
a vocoder that does not see the whole clip (Griffin-Lim) cannot click at a chunk seam.

When ``left_tokens`` and ``lookahead_tokens - crossfade_tokens`` cover the receptive field
of ``decode`` the streamed waveform equals the one-shot decode exactly (tested with a local
decoder); through the real VAE the error is the change in
its global statistics between a window and the whole clip — measured, and bounded in
``tests/test_streaming.py``.
"""

from __future__ import annotations

from typing import Callable

import torch


class StreamingDecoder:
    """Accumulate tokens ``(B, D)`` one at a time; emit waveform chunks ``(B, S_i)`` that
    concatenate to ``(B, N * samples_per_token)``, the length of the one-shot decode.

    Args:
        decode: tokens ``(B, n, D)`` -> waveform ``(B, n * samples_per_token)`` (e.g. the
            pretransform's decode).
        samples_per_token: audio samples per token (the pretransform's downsampling ratio).
        chunk_tokens: tokens of audio per emitted chunk (the first chunk waits for
            ``chunk_tokens + lookahead_tokens`` tokens).
        left_tokens: already emitted tokens decoded again before each chunk, as context.
        lookahead_tokens: tokens after the chunk that must exist before it is decoded.
        crossfade_tokens: overlap between neighbouring chunks (≤ lookahead_tokens).
    """

    def __init__(
        self,
        decode: Callable[[torch.Tensor], torch.Tensor],
        samples_per_token: int,
        chunk_tokens: int = 8,
        left_tokens: int = 32,
        lookahead_tokens: int = 4,
        crossfade_tokens: int = 1,
    ) -> None:
        if chunk_tokens < 1 or left_tokens < 0 or lookahead_tokens < 0 or samples_per_token < 1:
            raise ValueError(
                f"streaming needs chunk_tokens ≥ 1, left_tokens ≥ 0, lookahead_tokens ≥ 0, samples_per_token ≥ 1; got "
                f"{chunk_tokens}, {left_tokens}, {lookahead_tokens}, {samples_per_token}"
            )
        if not 0 <= crossfade_tokens <= min(lookahead_tokens, chunk_tokens):
            raise ValueError(
                f"crossfade_tokens={crossfade_tokens} must be in [0, min(lookahead_tokens={lookahead_tokens}, "
                f"chunk_tokens={chunk_tokens})]: the overlap is decoded from the lookahead"
            )
        self.decode = decode
        self.samples_per_token = samples_per_token
        self.chunk_tokens, self.left_tokens, self.lookahead_tokens = chunk_tokens, left_tokens, lookahead_tokens
        self.crossfade = crossfade_tokens * samples_per_token  # samples
        self.tokens: list[torch.Tensor] = []  # (B, D) each
        self.emitted = 0  # tokens whose audio has been emitted
        self.tail: torch.Tensor | None = None  # (B, crossfade) decoded just past the last chunk, blended into the next

    def push(self, token: torch.Tensor) -> torch.Tensor | None:
        """Add one token ``(B, D)``; return the next chunk ``(B, chunk_tokens * samples_per_token)``
        when its lookahead is complete, else None."""
        self.tokens.append(token)
        if len(self.tokens) - self.emitted >= self.chunk_tokens + self.lookahead_tokens:
            return self._emit(self.emitted + self.chunk_tokens)
        return None

    def flush(self) -> torch.Tensor | None:
        """The rest of the audio ``(B, S)`` after the last token (None when nothing is left)."""
        if self.emitted >= len(self.tokens):
            return None
        return self._emit(len(self.tokens))

    def _emit(self, end: int) -> torch.Tensor:
        """Decode the window around tokens [emitted, end) and return their samples."""
        hop = self.samples_per_token
        start = max(0, self.emitted - self.left_tokens)
        window = torch.stack(self.tokens[start:], dim=1)  # (B, n, D): left context, chunk, lookahead
        wave = self.decode(window)  # (B, n * hop)
        offset = (self.emitted - start) * hop
        chunk = wave[:, offset : offset + (end - self.emitted) * hop].clone()
        if self.tail is not None:
            width = min(self.tail.shape[-1], chunk.shape[-1])
            ramp = torch.linspace(0.0, 1.0, width + 2, device=chunk.device, dtype=chunk.dtype)[1:-1]  # (width,)
            chunk[:, :width] = self.tail[:, :width].to(chunk) * (1.0 - ramp) + chunk[:, :width] * ramp
        tail_at = offset + (end - self.emitted) * hop
        self.tail = wave[:, tail_at : tail_at + self.crossfade] if self.crossfade and end < len(self.tokens) else None
        self.emitted = end
        return chunk
