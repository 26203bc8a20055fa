"""Causal Transformer decoder over continuous audio tokens, with a visible KV cache.

Sequence layout (one row of the batch)::

    [p_0 ... p_{L-1}] [BOS] [x_{k_1} ... x_{k_m}]
     prefix (text)     pos 0  audio tokens, position id = k_j + 1

``z`` is read at BOS and at every audio token: ``z[:, 0]`` (after BOS) predicts the
target token ``target_ids[:, 0]``, ``z[:, j + 1]`` (after input token j) predicts
``target_ids[:, j + 1]``. For plain next-token prediction (NTP) the caller passes
``position_ids = arange(M)`` and ``target_ids = arange(M + 1)``; for masked next-token
prediction (MNTP) the kept tokens keep their original indices ``k_j`` and the targets are
later tokens, told to the model by a learned *target position embedding*.

Where the target embedding enters (``target_embedding``):

* ``"output"`` (default): ``z = ln_f(h) + target_pos(t)``, added *after* the final
  LayerNorm, so it enters only the output path (the conditioning of the diffusion head)
  and never the residual stream that later tokens attend to.
* ``"input"``: ``target_pos(t)`` is added to the input embedding of the same position
  (BOS or token j). Causal, because it carries no content of any other token.
* ``"none"``: no target embedding (plain NTP).

Positions: learned absolute embeddings (prefix slot i, BOS, audio token k -> ``audio_pos``)
always; with ``rope=True`` also rotary embeddings on queries and keys, at the *sequence
time* of each slot: prefix slot i -> i, BOS -> L, audio token with original index k ->
L + 1 + k (so MNTP's dropped tokens leave true gaps, and generation uses the same times).
Attention scores then depend on how far apart two tokens are, which makes a rhythm (a
4 Hz pulse is "the same as 6 tokens ago") one pattern instead of one per absolute position.

Generation uses :class:`KVCache`: preallocated per-layer ``k, v`` of shape
``(B, H, max_len, hd)`` plus a key-validity mask that keeps the prefix padding masked.
Keys are cached after rotation.
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

TARGET_EMBEDDINGS = ("output", "input", "none")


# ----------------------------------------------------------------------------- rotary positions


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), "rotate half" layout.

    ``forward(times)`` with times (B, T) long -> (cos, sin), each (B, 1, T, hd) float32,
    to be used by :func:`apply_rotary` on (B, H, T, hd) queries and keys.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = times.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x (B, H, T, hd) rotated by rope = (cos, sin) each (B, 1, T, hd); None -> x unchanged."""
    if rope is None:
        return x
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)  # residual projection (scaled init)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, W) -> q, k, v each (B, H, T, hd)."""
        B, T, W = x.shape
        q, k, v = self.qkv(x).split(W, dim=-1)  # 3 x (B, T, W)
        q = q.view(B, T, self.heads, W // self.heads).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.heads, W // self.heads).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.heads, W // self.heads).transpose(1, 2)  # (B, H, T, hd)
        return q, k, v

    def attend(self, q, k, v, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, Tq, hd), k/v (B, H, Tk, hd), attn_mask bool (B, 1, Tq, Tk) True=attend
        -> (B, Tq, W)."""
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, Tq, hd)
        B, H, Tq, hd = y.shape
        y = y.transpose(1, 2).reshape(B, Tq, H * hd)  # (B, Tq, W)
        return self.resid_drop(self.proj(y))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, W), attn_mask bool (B, 1, T, T) True=attend, rope (cos, sin) or None -> (B, T, W)."""
        q, k, v = self.qkv_heads(x)
        return self.attend(apply_rotary(q, rope), apply_rotary(k, rope), v, attn_mask)


class MLP(nn.Module):
    """Linear -> GELU -> Linear (-> dropout)."""

    def __init__(self, width: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)  # residual projection (scaled init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)); x + mlp(ln(x)).

    The mask decides causal (decoder) vs bidirectional (text encoder) attention.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, W), attn_mask bool (B, 1, T, T), rope (cos, sin) or None -> (B, T, W)."""
        x = x + self.attn(self.ln_1(x), attn_mask, rope)
        x = x + self.mlp(self.ln_2(x))
        return x

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             pos: int, key_valid: torch.Tensor,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One new position with a preallocated cache.

        Args:
            x: (B, 1, W) the new position's residual stream.
            k_cache, v_cache: (B, H, max_len, hd); slot ``pos`` is written here.
            pos: index of the new position in the cache.
            key_valid: (B, pos + 1) bool, which cached keys may be attended.
            rope: (cos, sin) each (B, 1, 1, hd) at the new position's time, or None.
        Returns:
            (B, 1, W)
        """
        q, k, v = self.attn.qkv_heads(self.ln_1(x))  # (B, H, 1, hd) each
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        k_cache[:, :, pos:pos + 1] = k
        v_cache[:, :, pos:pos + 1] = v
        mask = key_valid[:, None, None, :]  # (B, 1, 1, pos+1)
        x = x + self.attn.attend(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1], mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def init_transformer_weights(module: nn.Module, depth: int, std: float = 0.02) -> None:
    """GPT-2 style init: Linear/Embedding ~ N(0, std), biases 0, LayerNorm (1, 0);
    residual projections (``attn.proj``, ``mlp.proj``) ~ N(0, std / sqrt(2 * depth))."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * depth) if name.endswith(("attn.proj", "mlp.proj")) else std
            nn.init.normal_(m.weight, mean=0.0, std=s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated key/value cache for :class:`CausalDecoder` generation.

    Attributes:
        k, v: lists (one per layer) of (B, H, max_len, hd) tensors, filled in place.
        key_valid: (B, max_len) bool, False for prefix padding (and unfilled slots).
        length: number of filled positions (prefix + BOS + generated tokens).
    """

    def __init__(self, num_layers: int, batch_size: int, heads: int, head_dim: int,
                 max_len: int, device=None, dtype=None):
        shape = (batch_size, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self.prefix_len = 0  # L, set by prefill (rotary times of later tokens start at L + 1)

    def reset(self) -> None:
        """Reuse the buffers for a new batch (contents are overwritten on fill)."""
        self.key_valid.zero_()
        self.length = 0

    def __repr__(self) -> str:
        B, H, T, hd = self.k[0].shape if self.k else (0, 0, self.max_len, 0)
        return f"KVCache(layers={len(self.k)}, B={B}, H={H}, max_len={T}, hd={hd}, length={self.length})"


# ----------------------------------------------------------------------------- decoder


class CausalDecoder(nn.Module):
    """Pre-LN causal Transformer over [prefix][BOS][audio tokens] (see module docstring).

    Args:
        token_dim: size of one continuous audio token (e.g. 128 = 8 ch x 16 freq).
        width: model width W (also the prefix width).
        depth: number of blocks.
        heads: attention heads (head dim = width / heads).
        mlp_ratio: MLP hidden size / width.
        max_prefix_len: longest text prefix L (78 for T5 + CLAP).
        max_tokens: longest audio sequence (256 for 10.24 s).
        dropout: attention / residual dropout.
        target_embedding: "output" | "input" | "none" (see module docstring).
        rope: also rotary position embeddings in attention (see module docstring).
        mid_start_bos: also learn a second BOS vector for a window that begins in the middle
            of a clip (``mid_start`` in :meth:`forward` and :meth:`prefill`): training windows
            that start late, and the window a long-form refill starts.
    """

    def __init__(self, token_dim: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 max_prefix_len: int = 78, max_tokens: int = 256, dropout: float = 0.0,
                 target_embedding: str = "output", rope: bool = False, mid_start_bos: bool = False):
        super().__init__()
        if target_embedding not in TARGET_EMBEDDINGS:
            raise ValueError(f"target_embedding must be one of {TARGET_EMBEDDINGS}, got {target_embedding!r}")
        self.token_dim, self.width, self.depth, self.heads = token_dim, width, depth, heads
        self.max_prefix_len, self.max_tokens = max_prefix_len, max_tokens
        self.target_embedding = target_embedding

        self.token_proj = nn.Linear(token_dim, width)
        self.bos = nn.Parameter(torch.zeros(width))
        self.mid_bos = nn.Parameter(torch.zeros(width)) if mid_start_bos else None
        self.prefix_pos = nn.Embedding(max_prefix_len, width)
        self.audio_pos = nn.Embedding(max_tokens + 1, width)  # position id 0 = BOS, i+1 = token i
        # target token index t in [0, max_tokens]; t = max_tokens only marks the invalid slot after the last token
        self.target_pos = nn.Embedding(max_tokens + 1, width) if target_embedding != "none" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, dropout) for _ in range(depth)])
        # Training only: recompute each block's activations in the backward pass instead of
        # keeping them (memory for compute; see `make bench`). Generation is unaffected.
        self.activation_checkpointing = False
        self.ln_f = nn.LayerNorm(width)
        self.rope = RotaryEmbedding(width // heads) if rope else None

        init_transformer_weights(self, depth)
        nn.init.normal_(self.bos, std=0.02)
        if self.mid_bos is not None:  # drawn last: the other weights are those of a decoder without it
            nn.init.normal_(self.mid_bos, std=0.02)

    # -------------------------------------------------------------- embeddings

    def _embed_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (B, L, W) -> (B, L, W) with prefix position embeddings added."""
        L = prefix.shape[1]
        if L > self.max_prefix_len:
            raise ValueError(f"prefix length {L} > max_prefix_len {self.max_prefix_len}")
        if prefix.shape[-1] != self.width:
            raise ValueError(f"prefix width {prefix.shape[-1]} != decoder width {self.width}")
        return prefix + self.prefix_pos.weight[:L]

    def _embed_bos(self, batch_size: int, target_ids: torch.Tensor | None, mid_start: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, 1, W): BOS (the mid-start BOS on rows where ``mid_start`` (B,) is True) +
        audio_pos[0] (+ target_pos in "input" mode)."""
        bos = self.bos.expand(batch_size, self.width)  # (B, W)
        if mid_start is not None:
            if self.mid_bos is None:
                raise ValueError("mid_start given, but this decoder has no mid-start BOS (model.mid_start_bos=false)")
            bos = torch.where(mid_start.view(batch_size, 1), self.mid_bos, bos)
        x = (bos + self.audio_pos.weight[0]).unsqueeze(1)  # (B, 1, W)
        if self.target_embedding == "input":
            x = x + self.target_pos(target_ids)  # target_ids (B, 1)
        return x

    def _embed_tokens(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                      target_ids: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, M, token_dim), position_ids (B, M) 0-based, target_ids (B, M) -> (B, M, W)."""
        x = self.token_proj(tokens) + self.audio_pos(position_ids + 1)  # (B, M, W)
        if self.target_embedding == "input":
            x = x + self.target_pos(target_ids)
        return x

    def _output(self, h: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """h (B, T, W) residual stream at the output positions -> z (B, T, W)."""
        z = self.ln_f(h)
        if self.target_embedding == "output":
            z = z + self.target_pos(target_ids)  # after the final LN: output path only
        return z

    def _rope(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """times (B, T) long sequence times (module docstring) -> (cos, sin) or None without rope."""
        return self.rope(times) if self.rope is not None else None

    # -------------------------------------------------------------- training forward

    def forward(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, tokens: torch.Tensor,
                position_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, mid_start: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence (teacher-forced) pass.

        Args:
            prefix: (B, L, W) text prefix, already projected to width W.
            prefix_mask: (B, L) bool, True = valid.
            tokens: (B, M, token_dim) kept input tokens (M may be 0).
            position_ids: (B, M) long, original 0-based index k_j of each input token
                (default ``arange(M)``). Entries at padded tokens are ignored.
            target_ids: (B, M + 1) long, index of the token each output predicts
                (default ``arange(M + 1)``); must be < max_tokens at valid positions.
                Entries at padded tokens are ignored.
            token_mask: (B, M) bool, True = valid (default all valid).
            mid_start: (B,) bool, True where the window begins in the middle of a clip (the
                mid-start BOS; needs ``mid_start_bos``); None: the plain BOS everywhere.
        Returns:
            z: (B, M + 1, W); z[:, 0] is the output at BOS, z[:, j + 1] at input token j.
        """
        B, L, _ = prefix.shape
        M = tokens.shape[1]
        device = prefix.device
        if M > self.max_tokens:
            raise ValueError(f"{M} input tokens > max_tokens {self.max_tokens}")
        if position_ids is None:
            position_ids = torch.arange(M, device=device).expand(B, M)
        if target_ids is None:
            target_ids = torch.arange(M + 1, device=device).expand(B, M + 1)
        if target_ids.shape != (B, M + 1):
            raise ValueError(f"target_ids must be (B, M+1) = {(B, M + 1)}, got {tuple(target_ids.shape)}")
        if token_mask is None:
            token_mask = torch.ones(B, M, dtype=torch.bool, device=device)
        # padded entries may hold anything (e.g. -1): make them valid indices
        position_ids = position_ids.masked_fill(~token_mask, 0)
        out_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), token_mask.bool()], dim=1)  # (B, M+1)
        target_ids = target_ids.masked_fill(~out_valid, 0)

        x = torch.cat([
            self._embed_prefix(prefix),                                     # (B, L, W)
            self._embed_bos(B, target_ids[:, :1], mid_start),               # (B, 1, W)
            self._embed_tokens(tokens, position_ids, target_ids[:, 1:]),    # (B, M, W)
        ], dim=1)  # (B, S = L + 1 + M, W)
        x = self.drop(x)

        key_valid = torch.cat([prefix_mask.bool(), out_valid], dim=1)  # (B, S)
        attn_mask = self.attention_mask(key_valid)  # (B, 1, S, S)
        times = torch.cat([torch.arange(L + 1, device=device).expand(B, L + 1), L + 1 + position_ids], dim=1)  # (B, S)
        rope = self._rope(times)  # (B, 1, S, hd) each, or None
        checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, rope, use_reentrant=False)
            else:
                x = block(x, attn_mask, rope)
        return self._output(x[:, L:], target_ids)  # (B, M + 1, W)

    @staticmethod
    def attention_mask(key_valid: torch.Tensor) -> torch.Tensor:
        """key_valid (B, S) bool -> attn_mask (B, 1, S, S) bool, True = may attend.

        Causal AND key-valid; the diagonal is always allowed so that padded query rows
        never see an all-False row (SDPA would return NaN). Padded positions are never
        attended by valid ones, so their values cannot leak into the outputs.
        """
        S = key_valid.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=key_valid.device).tril()  # (S, S)
        eye = torch.eye(S, dtype=torch.bool, device=key_valid.device)
        return ((causal & key_valid[:, None, :]) | eye)[:, None]  # (B, 1, S, S)

    # -------------------------------------------------------------- generation

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """Preallocate a cache for prefix + BOS + up to ``max_len - L - 1`` tokens.

        ``max_len`` counts every position: L (prefix) + 1 (BOS) + generated tokens.
        device/dtype default to those of the decoder's parameters; under bf16 autocast pass
        ``dtype=torch.bfloat16`` to halve the cache memory.
        """
        p = self.token_proj.weight
        return KVCache(self.depth, batch_size, self.heads, self.width // self.heads, max_len,
                       device=device if device is not None else p.device,
                       dtype=dtype if dtype is not None else p.dtype)

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, cache: KVCache,
                target_id: int = 0, mid_start: bool = False) -> torch.Tensor:
        """Run prefix + BOS into an empty cache.

        Args:
            prefix: (B, L, W); prefix_mask: (B, L) bool True = valid.
            cache: from :meth:`make_cache` (it is reset here).
            target_id: target token index predicted at BOS (0 for generation).
            mid_start: the window begins in the middle of a clip (a long-form refill): the
                mid-start BOS on every row (needs ``mid_start_bos``).
        Returns:
            z_bos: (B, W), the output at BOS (predicts token ``target_id``).
        """
        B, L, _ = prefix.shape
        if L + 1 > cache.max_len:
            raise ValueError(f"cache max_len {cache.max_len} < prefix + BOS = {L + 1}")
        cache.reset()
        tid = torch.full((B, 1), target_id, dtype=torch.long, device=prefix.device)
        mid = torch.full((B,), True, device=prefix.device) if mid_start else None
        x = torch.cat([self._embed_prefix(prefix), self._embed_bos(B, tid, mid)], dim=1)  # (B, L+1, W)
        key_valid = torch.cat([prefix_mask.bool(), torch.ones_like(prefix_mask[:, :1], dtype=torch.bool)], 1)
        attn_mask = self.attention_mask(key_valid)  # (B, 1, L+1, L+1)
        S = L + 1
        rope = self._rope(torch.arange(S, device=prefix.device).expand(B, S))
        cache.prefix_len = L
        for block, kc, vc in zip(self.blocks, cache.k, cache.v):
            q, k, v = block.attn.qkv_heads(block.ln_1(x))  # (B, H, S, hd)
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            kc[:, :, :S] = k
            vc[:, :, :S] = v
            x = x + block.attn.attend(q, k, v, attn_mask)
            x = x + block.mlp(block.ln_2(x))
        cache.key_valid[:, :S] = key_valid
        cache.length = S
        return self._output(x[:, -1:], tid)[:, 0]  # (B, W)

    @torch.no_grad()
    def step(self, token: torch.Tensor, position_id: int | torch.Tensor, target_id: int | torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Append one token to the cache and return its output.

        Args:
            token: (B, token_dim) the input token (original index ``position_id``).
            position_id: 0-based index of ``token`` (int or (B,) long).
            target_id: index of the token the output predicts (int or (B,) long);
                for NTP generation ``position_id + 1``.
            cache: a cache after :meth:`prefill`.
        Returns:
            z: (B, W)
        """
        B = token.shape[0]
        pos = cache.length
        if pos >= cache.max_len:
            raise RuntimeError(f"KV cache full (max_len {cache.max_len})")
        pid = torch.as_tensor(position_id, device=token.device).long().expand(B)[:, None]  # (B, 1)
        tid = torch.as_tensor(target_id, device=token.device).long().expand(B)[:, None]    # (B, 1)
        x = self._embed_tokens(token[:, None], pid, tid)  # (B, 1, W)
        cache.key_valid[:, pos] = True
        key_valid = cache.key_valid[:, :pos + 1]  # (B, pos+1)
        rope = self._rope(cache.prefix_len + 1 + pid)  # time of the token: L + 1 + position id
        for block, kc, vc in zip(self.blocks, cache.k, cache.v):
            x = block.step(x, kc, vc, pos, key_valid, rope)
        cache.length = pos + 1
        return self._output(x, tid)[:, 0]  # (B, W)


# ----------------------------------------------------------------------------- helpers


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def decay_parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups, nanoGPT rule: decay every trainable parameter with
    ``p.dim() >= 2`` (Linear weights and embedding tables), no decay for 1-D ones
    (biases, LayerNorm gains, the BOS vector). Frozen parameters are left out.

    Returns:
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
