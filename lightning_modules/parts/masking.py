"""Masked next-token prediction (MNTP): mask-ratio sampling and decoder-input construction.

Background (see ``DESIGN.md``, "Masked next-token prediction"): during training a
per-sample mask ratio ``r`` is drawn, ``round(n * r)`` of the ``n`` valid audio tokens
are removed from (mode ``"drop"``) or corrupted in (modes ``"zero"`` / ``"gaussian"``)
the decoder input, and each remaining input position predicts a later token of the
*original* sequence, announced to the decoder by a target position embedding.

Decoder contract produced here (all indices are 0-based original token indices)::

    decoder input:  [prefix] [BOS] x_{k_1} ... x_{k_m}        k_1 < ... < k_m kept
    slot 0 (BOS, k_0 := -1) and slot j (input token j, orig. index k_j), j = 1..m,
    predict x_t with t drawn uniformly from (k_j, k_{j+1}],   k_{m+1} := n - 1.

A slot whose interval is empty (only possible for the last real slot, when
``k_m = n - 1``, or for an empty sample) is invalid (``target_mask`` False).
With nothing masked this reduces exactly to plain next-token prediction:
``position_ids = arange(N)``, ``target_ids = arange(N + 1)``, last slot invalid.

Conventions shared by every output of :func:`make_mntp_inputs`:

* Output length ``M`` is the largest number of input tokens of any sample in the batch
  (kept tokens for ``"drop"``, all valid tokens otherwise). For the usual collate that
  right-pads to the longest sample this is ``N`` in modes ``"zero"``/``"gaussian"`` and
  for plain NTP; columns that are padding in *every* sample are removed. This makes
  ratio-0 outputs identical across all modes.
* Padding input slots carry ``tokens = 0`` and ``position_ids = slot index`` (always a
  legal index ``< N``), ``token_mask`` False.
* Invalid target slots carry ``target_ids = (position id of the slot's input) + 1``
  (i.e. the plain next-token index; ``<= N``) and ``target_tokens = 0``.
* Randomness comes only from the explicit ``torch.Generator``; a generator is required
  only when something random actually has to be drawn.
* Shapes are decided on the host, never by reading device tensors: the per-sample mask
  counts ``round(n_b * r_b)`` come from host-side ratios and lengths, so with ``lengths``
  given (the latent collate supplies them) a call issues no host–device synchronisation
  (no ``.item()``, no ``bool(tensor)``, no boolean indexing) and ``M`` is known up front.
  Which positions are dropped, the skipped-target offsets and any noise are drawn on
  the tokens' device from ``generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MAR_TRUNCNORM",
    "MIXTURE_HIGH_TRUNCNORM",
    "MIXTURE_LOW_TRUNCNORM",
    "MASK_MODES",
    "SAMPLER_KINDS",
    "MaskRatioSampler",
    "MaskedInputs",
    "TruncatedNormal",
    "make_mntp_inputs",
    "ntp_inputs",
]

SAMPLER_KINDS = ("mixture", "mar", "uniform", "none")
MASK_MODES = ("drop", "zero", "gaussian")

# (mean, std, low, high) of truncated normals.
MAR_TRUNCNORM = (1.0, 0.25, 0.7, 1.0)
"""MAR's mask-ratio distribution (Li et al. 2024): N(1.0, 0.25^2) truncated to [0.7, 1]."""
MIXTURE_HIGH_TRUNCNORM = MAR_TRUNCNORM
"""Our default high-ratio component of the mixture (the paper gives no parameters)."""
MIXTURE_LOW_TRUNCNORM = (0.0, 0.25, 0.0, 0.5)
"""Our default low-ratio component: N(0, 0.25^2) truncated to [0, 0.5] (mean ~0.18)."""


# --------------------------------------------------------------------------- sampling


def _check_generator(generator: torch.Generator | None, what: str) -> torch.Generator:
    """Return ``generator`` or raise: randomness must come from an explicit generator."""
    if generator is None:
        raise ValueError(f"{what} needs randomness: pass an explicit torch.Generator")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


@dataclass(frozen=True)
class TruncatedNormal:
    """Normal ``N(mean, std^2)`` truncated to ``[low, high]``, sampled by inverse CDF.

    Sampling is a deterministic function of uniforms drawn from a ``torch.Generator``,
    so results are reproducible from the generator's seed alone.
    """

    mean: float
    std: float
    low: float
    high: float

    def __post_init__(self) -> None:
        vals = (self.mean, self.std, self.low, self.high)
        if not all(math.isfinite(float(v)) for v in vals):
            raise ValueError(f"TruncatedNormal parameters must be finite, got {vals}")
        if self.std <= 0:
            raise ValueError(f"TruncatedNormal std must be > 0, got {self.std}")
        if not self.low < self.high:
            raise ValueError(f"TruncatedNormal needs low < high, got [{self.low}, {self.high}]")

    @classmethod
    def from_params(cls, params: Sequence[float], name: str = "params") -> TruncatedNormal:
        """Build from a ``(mean, std, low, high)`` sequence (config friendly)."""
        if isinstance(params, TruncatedNormal):
            return params
        if len(params) != 4:
            raise ValueError(f"{name} must be (mean, std, low, high), got {params!r}")
        return cls(*(float(p) for p in params))

    def clipped(self, max_value: float) -> TruncatedNormal:
        """The same normal truncated additionally to ``<= max_value`` (renormalised)."""
        if max_value <= self.low:
            raise ValueError(
                f"max_ratio {max_value} leaves nothing of the support [{self.low}, {self.high}]"
            )
        return TruncatedNormal(self.mean, self.std, self.low, min(self.high, max_value))

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF. ``u``: (...) uniforms in [0, 1) -> (...) float64 samples in [low, high]."""
        u = u.to(torch.float64)
        a = (self.low - self.mean) / self.std
        b = (self.high - self.mean) / self.std
        # Work in the left tail, where ndtr is accurate: reflect if the window is right of 0.
        # (u -> 1 - u keeps the inverse CDF increasing in u.)
        sign = 1.0
        if a > 0:
            a, b, sign, u = -b, -a, -1.0, 1.0 - u
        fa = torch.special.ndtr(torch.tensor(a, dtype=torch.float64, device=u.device))
        fb = torch.special.ndtr(torch.tensor(b, dtype=torch.float64, device=u.device))
        z = torch.special.ndtri(fa + u * (fb - fa))
        return (self.mean + sign * self.std * z).clamp(self.low, self.high)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` samples -> (n,) float64 on the generator's device."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        return self.icdf(u)


class MaskRatioSampler:
    """Draws one mask ratio ``r in [0, max_ratio]`` per sample.

    Kinds:

    * ``"mixture"`` (AudioMNTP): with probability ``high_weight`` draw from ``high``,
      otherwise from ``low`` (both truncated normals ``(mean, std, low, high)``).
      The paper names the two components (one on high ratios, a truncated normal on low
      ratios; high ratios alone hurt because at inference all previous tokens are
      present) but not their parameters. **Our defaults** (:data:`MIXTURE_HIGH_TRUNCNORM`,
      :data:`MIXTURE_LOW_TRUNCNORM`): high = MAR's N(1, 0.25) on [0.7, 1];
      low = N(0, 0.25) on [0, 0.5]; ``high_weight = 0.25`` so most training steps look
      like inference (few tokens missing) while a quarter exercise heavy dropping.
    * ``"mar"``: MAR's N(1.0, 0.25) truncated to [0.7, 1.0].
    * ``"uniform"``: U[uniform[0], uniform[1]].
    * ``"none"``: r = 0 (plain next-token prediction).

    ``max_ratio`` caps every distribution by *truncation* (the density is renormalised on
    ``[.., max_ratio]``; there is no point mass at the cap). The default 0.95 keeps at
    least one token of any sample with n >= 20 tokens. Use ``max_ratio=1.0`` for the
    untruncated distributions.
    """

    def __init__(
        self,
        kind: str = "mixture",
        *,
        max_ratio: float = 0.95,
        high_weight: float = 0.25,
        high: Sequence[float] = MIXTURE_HIGH_TRUNCNORM,
        low: Sequence[float] = MIXTURE_LOW_TRUNCNORM,
        uniform: Sequence[float] = (0.0, 1.0),
    ) -> None:
        if kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown mask-ratio sampler kind {kind!r}; expected one of {SAMPLER_KINDS}")
        if not 0.0 < max_ratio <= 1.0:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
        if not 0.0 <= high_weight <= 1.0:
            raise ValueError(f"high_weight must be in [0, 1], got {high_weight}")
        self.kind = kind
        self.max_ratio = float(max_ratio)
        self.high_weight = float(high_weight)
        self.high: TruncatedNormal | None = None
        self.low: TruncatedNormal | None = None
        self.uniform: tuple[float, float] | None = None
        if kind == "mixture":
            self.high = self._component(high, "high")
            self.low = self._component(low, "low")
        elif kind == "mar":
            self.high = self._component(MAR_TRUNCNORM, "mar")
        elif kind == "uniform":
            self.uniform = self._uniform_bounds(uniform)

    def _component(self, params: Sequence[float], name: str) -> TruncatedNormal:
        """Validate a ``(mean, std, low, high)`` component and apply the ``max_ratio`` cap."""
        comp = TruncatedNormal.from_params(params, name)
        if comp.low < 0.0 or comp.high > 1.0:
            raise ValueError(f"{name} component support [{comp.low}, {comp.high}] must lie in [0, 1]")
        return comp.clipped(self.max_ratio)

    def _uniform_bounds(self, bounds: Sequence[float]) -> tuple[float, float]:
        """Validate ``(low, high)`` for the uniform kind and apply the ``max_ratio`` cap."""
        if len(bounds) != 2:
            raise ValueError(f"uniform must be (low, high), got {bounds!r}")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"uniform bounds must satisfy 0 <= low <= high <= 1, got ({lo}, {hi})")
        if lo > self.max_ratio:
            raise ValueError(f"uniform low {lo} exceeds max_ratio {self.max_ratio}")
        return lo, min(hi, self.max_ratio)

    def __repr__(self) -> str:
        parts = [repr(self.kind), f"max_ratio={self.max_ratio}"]
        if self.kind == "mixture":
            parts += [f"high_weight={self.high_weight}", f"high={self.high}", f"low={self.low}"]
        elif self.kind == "mar":
            parts.append(f"dist={self.high}")
        elif self.kind == "uniform":
            parts.append(f"uniform={self.uniform}")
        return f"MaskRatioSampler({', '.join(parts)})"

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ratios -> (batch_size,) float32 in [0, max_ratio].

        Drawn on ``generator.device`` (CPU for ``"none"``), then moved to ``device`` if given.
        ``generator`` may be omitted only for kind ``"none"``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        if self.kind == "none":
            r = torch.zeros(batch_size, dtype=torch.float64, device="cpu")
        else:
            g = _check_generator(generator, f"MaskRatioSampler({self.kind!r}).sample")
            r = self._sample_random(batch_size, g)
        r = r.to(torch.float32)
        return r if device is None else r.to(device)

    def _sample_random(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        """(batch_size,) float64 ratios for the random kinds."""
        if self.kind == "mar":
            return self.high.sample(batch_size, g)
        if self.kind == "uniform":
            lo, hi = self.uniform
            u = torch.rand(batch_size, generator=g, dtype=torch.float64, device=g.device)
            return lo + (hi - lo) * u
        # mixture: component choice first, then one uniform per sample for the icdf.
        is_high = torch.rand(batch_size, generator=g, dtype=torch.float64, device=g.device) < self.high_weight
        u = torch.rand(batch_size, generator=g, dtype=torch.float64, device=g.device)
        return torch.where(is_high, self.high.icdf(u), self.low.icdf(u))


# --------------------------------------------------------------------------- inputs


@dataclass
class MaskedInputs:
    """Decoder inputs and targets for (masked) next-token prediction.

    B = batch, M = number of input audio tokens after masking, D = token dim.
    Slot 0 of the targets belongs to BOS, slot j + 1 to input token j.

    Attributes:
        tokens: (B, M, D) input tokens (zeros at padding).
        position_ids: (B, M) long, original index of each input token (slot index at padding).
        token_mask: (B, M) bool, True for real input tokens.
        target_ids: (B, M + 1) long, original index each output slot must predict.
        target_mask: (B, M + 1) bool, True where the slot has a target.
        target_tokens: (B, M + 1, D) original tokens at ``target_ids`` (zeros where invalid).
        slot_counts: (B,) long on the CPU, host-known upper bound of the valid target slots
            of each sample: slots ``0 .. slot_counts[b] - 1`` are the only ones that can be
            valid (at most one of them, the last, is not). Lets a caller gather the target
            rows without reading ``target_mask`` back to the host.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    token_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_tokens: torch.Tensor
    slot_counts: torch.Tensor


def _validate_tokens(tokens: torch.Tensor, token_mask: torch.Tensor | None, check_padding: bool = True) -> torch.Tensor:
    """Check shapes/dtypes; return a (B, N) bool mask (all True if ``token_mask`` is None).

    ``check_padding`` also verifies right padding, which reads the mask back to the host.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be a (B, N, D) tensor, got shape {getattr(tokens, 'shape', None)}")
    if not tokens.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {tokens.dtype}")
    b, n, _ = tokens.shape
    if token_mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if token_mask.shape != (b, n):
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match tokens (B, N) = {(b, n)}")
    if token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be bool, got {token_mask.dtype}")
    if token_mask.device != tokens.device:
        raise ValueError(f"token_mask is on {token_mask.device} but tokens are on {tokens.device}")
    if check_padding and n > 1 and bool((token_mask[:, 1:] & ~token_mask[:, :-1]).any()):
        raise ValueError("token_mask must be right-padded (True...True False...False per sample)")
    return token_mask


def _validate_ratios(ratios: torch.Tensor | float, batch_size: int) -> torch.Tensor:
    """Return (B,) float64 ratios in [0, 1] on the host; a python number is broadcast.

    Ratios decide shapes, so they are host quantities (a ratio tensor on an accelerator is
    copied back, which synchronises; :class:`MaskRatioSampler` draws them on the host).
    """
    if not isinstance(ratios, torch.Tensor):
        ratios = torch.full((batch_size,), float(ratios), dtype=torch.float64, device="cpu")
    if ratios.shape != (batch_size,):
        raise ValueError(f"ratios must have shape (B,) = ({batch_size},), got {tuple(ratios.shape)}")
    ratios = ratios.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(ratios).all()) or bool(((ratios < 0) | (ratios > 1)).any()):
        raise ValueError(f"ratios must lie in [0, 1], got min {ratios.min().item()} max {ratios.max().item()}")
    return ratios


def _choose_masked(valid: torch.Tensor, n_mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pick ``n_mask[b]`` valid positions uniformly at random per sample.

    valid: (B, N) bool, n_mask: (B,) long on valid's device (<= valid count) -> (B, N) bool
    chosen positions. Random keys per position; the ``n_mask[b]`` smallest keys among valid
    positions win. The caller skips the call when nothing is masked (a host-side decision).
    """
    g = _check_generator(generator, "masking tokens")
    keys = torch.rand(valid.shape, generator=g, device=valid.device, dtype=torch.float32)
    keys = keys.masked_fill(~valid, 2.0)  # padding sorts last, never chosen
    rank = torch.argsort(torch.argsort(keys, dim=1, stable=True), dim=1, stable=True)
    return rank < n_mask[:, None]


def _pack_left(keep: torch.Tensor) -> torch.Tensor:
    """Stable left-packing of kept positions.

    keep: (B, N) bool -> order (B, N) long: kept indices first, in original order.
    """
    return torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices


def _input_slots(
    tokens: torch.Tensor, order: torch.Tensor, n_in: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the input sequence.

    tokens: (B, N, D), order: (B, N) original index per slot, n_in: (B,) real slots (on the
    tokens' device), m = max n_in (host int) -> tokens (B, M, D), position_ids (B, M),
    token_mask (B, M) with M = m.
    """
    b, _, d = tokens.shape
    slot = torch.arange(m, device=tokens.device).expand(b, m)
    mask = slot < n_in[:, None]
    idx = order[:, :m]
    position_ids = torch.where(mask, idx, slot)
    gathered = torch.gather(tokens, 1, idx[..., None].expand(b, m, d))
    gathered = gathered * mask[..., None].to(tokens.dtype)
    return gathered, position_ids, mask


def _targets(
    position_ids: torch.Tensor,
    n_in: torch.Tensor,
    n_valid: torch.Tensor,
    draw_offsets: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target index per output slot.

    position_ids: (B, M) original index k_j of input token j (padding: slot index),
    n_in: (B,) real input tokens m, n_valid: (B,) original valid length n
    -> target_ids (B, M+1) long, target_mask (B, M+1) bool.

    Slot s has k_s (k_0 = -1) and upper end k_{s+1} (k_{m+1} = n - 1); valid iff s <= m
    and k_s < k_{s+1}. Target = k_s + 1 + floor(u * (k_{s+1} - k_s)) with u ~ U[0, 1)
    if ``draw_offsets`` (predict_skipped and something was dropped: a host-side decision)
    else k_s + 1; invalid slots get k_s + 1.
    """
    b, m = position_ids.shape
    dev = position_ids.device
    bos = torch.full((b, 1), -1, dtype=torch.long, device=dev)
    cur = torch.cat([bos, position_ids], dim=1)  # (B, M+1) k_s
    slot = torch.arange(m + 1, device=dev).expand(b, m + 1)
    nxt_in = torch.cat([position_ids, torch.zeros_like(bos)], dim=1)
    nxt = torch.where(slot < n_in[:, None], nxt_in, (n_valid - 1)[:, None])  # k_{s+1}
    width = nxt - cur
    valid = (slot <= n_in[:, None]) & (width > 0)
    offset = torch.zeros_like(cur)
    if draw_offsets:
        g = _check_generator(generator, "predict_skipped target sampling")
        u = torch.rand((b, m + 1), generator=g, device=dev, dtype=torch.float64)
        offset = torch.floor(u * width.clamp(min=1)).long()
        offset = torch.minimum(offset, width.clamp(min=1) - 1)
        offset = torch.where(valid, offset, torch.zeros_like(offset))
    return cur + 1 + offset, valid


def _gather_targets(tokens: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), target_ids/mask (B, S) -> (B, S, D) original tokens, zeros where invalid."""
    b, n, d = tokens.shape
    s = target_ids.shape[1]
    if n == 0:
        return tokens.new_zeros(b, s, d)
    idx = target_ids.clamp(0, n - 1)
    out = torch.gather(tokens, 1, idx[..., None].expand(b, s, d))
    return out * target_mask[..., None].to(tokens.dtype)


def make_mntp_inputs(
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None,
    ratios: torch.Tensor | float,
    mode: str = "drop",
    predict_skipped: bool = True,
    generator: torch.Generator | None = None,
    lengths: torch.Tensor | Sequence[int] | None = None,
) -> MaskedInputs:
    """Build decoder inputs/targets for masked next-token prediction.

    Args:
        tokens: (B, N, D) original audio tokens (float).
        token_mask: (B, N) bool, right-padded validity (None: all valid). n_b = row sum.
        ratios: (B,) mask ratios in [0, 1] on the host (or a python float for all samples);
            sample b masks ``round(n_b * r_b)`` valid tokens (torch.round: half to even).
        mode: ``"drop"`` removes the chosen tokens and packs the kept ones to the left
            (M = max kept count); ``"zero"`` / ``"gaussian"`` keep the length and replace
            them by zeros / N(0, 1) noise, with plain next-token targets (nothing skipped).
        predict_skipped: ``"drop"`` only. True: slot j predicts t ~ U(k_j, k_{j+1}].
            False: slot j predicts t = k_j + 1 (the immediate next original token, which
            is predicted whether or not it was dropped from the input; it always lies in
            the interval, so validity is the same as with True).
        generator: source of all randomness, on the tokens' device; required whenever
            something is masked (or skipped targets must be drawn).
        lengths: (B,) valid-token counts n_b on the host, which the caller vouches match a
            right-padded ``token_mask``. Given, the call issues no host–device sync; None:
            counted from ``token_mask`` (one sync) and the right padding checked.

    Returns:
        :class:`MaskedInputs`. With all ratios 0 every mode returns exactly
        :func:`ntp_inputs` (no randomness used).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    valid = _validate_tokens(tokens, token_mask, check_padding=lengths is None)
    b, n, _ = tokens.shape
    device = tokens.device
    r = _validate_ratios(ratios, b)
    if generator is not None and generator.device.type != device.type and device.type != "meta":  # meta has no generators
        raise ValueError(f"generator is on {generator.device} but tokens are on {device}")

    # Host side: counts decide every shape.
    if lengths is None:
        n_valid_host = valid.sum(dim=1).cpu()
    else:
        n_valid_host = torch.as_tensor(lengths, dtype=torch.long, device="cpu")
        if n_valid_host.shape != (b,) or bool(((n_valid_host < 0) | (n_valid_host > n)).any()):
            raise ValueError(f"lengths must be (B,) = ({b},) counts in [0, {n}], got {n_valid_host.tolist()}")
    n_mask_host = torch.round(n_valid_host.to(torch.float64) * r).long().clamp(max=n_valid_host)
    any_masked = bool((n_mask_host > 0).any())
    n_in_host = n_valid_host - n_mask_host if mode == "drop" else n_valid_host
    m = int(n_in_host.max()) if b > 0 else 0

    n_valid = n_valid_host.to(device, non_blocking=True)
    n_in = n_in_host.to(device, non_blocking=True)
    chosen = _choose_masked(valid, n_mask_host.to(device, non_blocking=True), generator) if any_masked else torch.zeros_like(valid)

    if mode == "drop":
        order = _pack_left(valid & ~chosen)
        src = tokens
    else:
        order = _pack_left(valid)  # identity order: valid mask is a prefix
        src = _corrupt(tokens, chosen, mode, generator) if any_masked else tokens
    inp, position_ids, in_mask = _input_slots(src, order, n_in, m)
    target_ids, target_mask = _targets(
        position_ids, n_in, n_valid, predict_skipped and mode == "drop" and any_masked, generator
    )
    target_tokens = _gather_targets(tokens, target_ids, target_mask)
    return MaskedInputs(inp, position_ids, in_mask, target_ids, target_mask, target_tokens, slot_counts=n_in_host + 1)


def _corrupt(
    tokens: torch.Tensor, chosen: torch.Tensor, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Replace chosen positions: tokens (B, N, D), chosen (B, N) bool -> (B, N, D)."""
    if mode == "zero":
        fill = torch.zeros_like(tokens)
    else:
        g = _check_generator(generator, "gaussian masking")
        fill = torch.randn(tokens.shape, generator=g, device=tokens.device, dtype=torch.float32)
        fill = fill.to(tokens.dtype)
    return torch.where(chosen[..., None], fill, tokens)


def ntp_inputs(
    tokens: torch.Tensor, token_mask: torch.Tensor | None = None, lengths: torch.Tensor | Sequence[int] | None = None
) -> MaskedInputs:
    """Plain next-token-prediction inputs: :func:`make_mntp_inputs` with ratio 0.

    tokens (B, N, D), token_mask (B, N) bool right-padded (None: all valid) ->
    position_ids = arange(M), target_ids = arange(M + 1), target_mask[b, s] = s < n_b,
    where M = max n_b (= N unless some columns are padding in every sample).
    """
    return make_mntp_inputs(tokens, token_mask, 0.0, mode="drop", lengths=lengths)
