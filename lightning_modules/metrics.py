"""Text-to-audio evaluation metrics as ``torchmetrics.Metric`` subclasses.

Every metric keeps its state in tensors registered with ``add_state``, so under DDP the
states of all ranks are reduced (summed or concatenated) before ``compute`` — the numbers
do not depend on how clips were split across devices or batches.

- :class:`FrechetDistance` — Fréchet distance between Gaussians fitted to embeddings of a
  real and a generated set (FAD on VGGish, FD on PANNs CNN14 or the synthetic evaluator).
- :class:`PairedKLDivergence` — KL(reference ‖ generated) of classifier outputs, paired by
  clip id, as AudioLDM's ``audioldm_eval`` computes it (softmax and sigmoid variants).
- :class:`InceptionScore` — exp(E_x KL(p(y|x) ‖ p(y))) over generated clips, with splits.
- :class:`ClapScore` — mean cosine of paired text and audio embeddings.
- :class:`AttributeAccuracy` — per-attribute accuracy of a multi-head classifier.

and the plain functions :func:`frechet_distance` on (mean, covariance) pairs and
:func:`boundary_jumps` (how much a sequence changes across given boundaries: seams).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

KL_EPS = 1e-6  # audioldm_eval's EPS inside log(q + EPS)


# ----------------------------------------------------------------------------- Fréchet


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

        d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)

    As in the standard implementations (pytorch-fid, frechet_audio_distance): the matrix
    square root is ``scipy.linalg.sqrtm``; when it is not finite (a near-singular product,
    e.g. fewer clips than embedding dimensions) ``eps`` is added to both diagonals and it is
    recomputed; a small imaginary part from round-off is dropped, a large one (> 1e-3 on
    the diagonal) raises.

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D).
        eps: diagonal offset used only when the first square root is not finite.

    Returns:
        The distance (a Python float, >= 0 up to round-off).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"frechet_distance: shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: the square root of sigma1·sigma2 has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too ill-conditioned (too few clips?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FrechetDistance(Metric):
    """Fréchet distance between embeddings of a real and a generated set.

    States are running sums in float64 (``sum`` (D,), ``outer`` (D, D), ``count``) for each
    set, reduced by summation across processes, so memory does not grow with the number of
    clips. ``compute`` forms the unbiased covariance (divisor n − 1, like ``np.cov``) and
    calls :func:`frechet_distance`.

    Args:
        num_features: embedding size D (128 for VGGish, 2048 for CNN14).
        eps: see :func:`frechet_distance`.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, num_features: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = int(num_features)
        self.eps = eps
        for prefix in ("real", "fake"):
            self.add_state(f"{prefix}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{prefix}_outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{prefix}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, embeddings: torch.Tensor, real: bool) -> None:
        """Add embeddings (N, D) to the real (``real=True``) or generated set."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.num_features:
            raise ValueError(f"embeddings must be (N, {self.num_features}), got {tuple(embeddings.shape)}")
        x = embeddings.detach().to(torch.float64)
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_sum", getattr(self, f"{prefix}_sum") + x.sum(0))
        setattr(self, f"{prefix}_outer", getattr(self, f"{prefix}_outer") + x.T @ x)
        setattr(self, f"{prefix}_count", getattr(self, f"{prefix}_count") + x.shape[0])

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D) of one set, float64 numpy."""
        prefix = "real" if real else "fake"
        n = float(getattr(self, f"{prefix}_count"))
        if n < 2:
            raise ValueError(f"FrechetDistance needs at least 2 {'real' if real else 'generated'} embeddings, got {n:g}")
        total = getattr(self, f"{prefix}_sum").cpu().numpy()
        outer = getattr(self, f"{prefix}_outer").cpu().numpy()
        mu = total / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def compute(self) -> torch.Tensor:
        mu_real, sigma_real = self.statistics(real=True)
        mu_fake, sigma_fake = self.statistics(real=False)
        return torch.tensor(frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake, self.eps), dtype=torch.float64)


# ----------------------------------------------------------------------------- paired KL


def id_key(clip_id: str) -> int:
    """A clip id as a signed 64-bit integer (sha256 prefix), so ids can live in tensor states."""
    return int.from_bytes(hashlib.sha256(clip_id.encode("utf-8")).digest()[:8], "little", signed=True)


def _kl_terms(ref_logits: torch.Tensor, gen_logits: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """Per-clip KL(ref ‖ gen) (N,), audioldm_eval's formula (see :class:`PairedKLDivergence`)."""
    if mode == "softmax":
        p, q = ref_logits.softmax(dim=1), gen_logits.softmax(dim=1)
    elif mode == "sigmoid":
        p, q = ref_logits.sigmoid(), gen_logits.sigmoid()
    else:
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    # F.kl_div(input=log q, target=p) = p · (log p − log q), with 0 · log 0 = 0.
    return F.kl_div((q + eps).log(), p, reduction="none").sum(dim=1)


class PairedKLDivergence(Metric):
    """KL(reference ‖ generated) of classifier outputs, paired by clip id, averaged over clips.

    This is ``audioldm_eval.metrics.kl.calculate_kl`` (the AudioLDM / AudioGen protocol),
    fed with classifier *logits* (for PANNs CNN14: the 527 AudioSet logits)::

        softmax:  KL = mean_i  Σ_c p_ic (log p_ic − log(q_ic + 1e-6)),  p = softmax(ref_i), q = softmax(gen_i)
        sigmoid:  KL = mean_i  Σ_c p_ic (log p_ic − log(q_ic + 1e-6)),  p = sigmoid(ref_i), q = sigmoid(gen_i)

    The sigmoid variant treats every class as its own "probability" and sums only the
    p·log(p/q) term of each class — it is *not* the Bernoulli KL (no (1−p) log((1−p)/(1−q))
    term) and the p_ic need not sum to 1; it is reproduced as is so numbers stay comparable.
    The softmax variant is the "KL" column of AudioLDM/AudioGen papers.

    Pairing: generated clip ``i`` is compared with the reference clip of the same id. The
    two id sets must be equal and free of duplicates, otherwise ``compute`` raises a
    ``ValueError`` listing the offending ids (a clip is never silently dropped). Ids are
    stored as 64-bit hashes (:func:`id_key`) so the states reduce across processes; the
    names of ids seen on this process are kept for error messages.

    Args:
        mode: ``"softmax"`` or ``"sigmoid"``.
        eps: added to q inside the log (audioldm_eval: 1e-6).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, mode: str = "softmax", eps: float = KL_EPS, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("softmax", "sigmoid"):
            raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
        self.mode = mode
        self.eps = eps
        self._names: dict[int, str] = {}
        for prefix in ("real", "fake"):
            self.add_state(f"{prefix}_keys", [], dist_reduce_fx="cat")
            self.add_state(f"{prefix}_logits", [], dist_reduce_fx="cat")

    def update(self, ids: Sequence[str], logits: torch.Tensor, real: bool) -> None:
        """Add reference (``real=True``) or generated clips: ``ids`` (N,) and ``logits`` (N, C)."""
        if logits.dim() != 2 or logits.shape[0] != len(ids):
            raise ValueError(f"logits must be (N, C) with N = len(ids) = {len(ids)}, got {tuple(logits.shape)}")
        keys = [id_key(str(i)) for i in ids]
        self._names.update(zip(keys, map(str, ids)))
        prefix = "real" if real else "fake"
        getattr(self, f"{prefix}_keys").append(torch.tensor(keys, dtype=torch.int64, device=self.device))
        getattr(self, f"{prefix}_logits").append(logits.detach().to(torch.float64))

    def reset(self) -> None:
        super().reset()
        self._names = {}

    def _name(self, key: int) -> str:
        return self._names.get(key, f"<id hash {key}>")

    def _gather(self, prefix: str) -> tuple[list[int], torch.Tensor]:
        keys, logits = getattr(self, f"{prefix}_keys"), getattr(self, f"{prefix}_logits")
        if isinstance(keys, list) and not keys:
            return [], torch.zeros(0, 0, dtype=torch.float64)
        return dim_zero_cat(keys).tolist(), dim_zero_cat(logits)

    def paired(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Ids (sorted) with reference and generated logits in the same order, each (N, C).

        Raises:
            ValueError: duplicate ids in either set, or ids present in only one of them.
        """
        real_keys, real_logits = self._gather("real")
        fake_keys, fake_logits = self._gather("fake")
        problems = []
        for label, keys in (("reference", real_keys), ("generated", fake_keys)):
            seen: set[int] = set()
            duplicates = sorted({self._name(k) for k in keys if k in seen or seen.add(k)})
            if duplicates:
                problems.append(f"duplicate {label} ids: {duplicates[:20]}")
        only_real = sorted(self._name(k) for k in set(real_keys) - set(fake_keys))
        only_fake = sorted(self._name(k) for k in set(fake_keys) - set(real_keys))
        if only_real:
            problems.append(f"{len(only_real)} reference ids without a generated clip: {only_real[:20]}")
        if only_fake:
            problems.append(f"{len(only_fake)} generated ids without a reference clip: {only_fake[:20]}")
        if problems:
            raise ValueError("PairedKLDivergence: clips do not pair by id; " + "; ".join(problems))
        if not real_keys:
            raise ValueError("PairedKLDivergence: no clips were added")
        order = sorted(range(len(real_keys)), key=lambda i: self._name(real_keys[i]))
        fake_index = {k: i for i, k in enumerate(fake_keys)}
        real_idx = torch.tensor(order)
        fake_idx = torch.tensor([fake_index[real_keys[i]] for i in order])
        names = [self._name(real_keys[i]) for i in order]
        return names, real_logits[real_idx], fake_logits[fake_idx]

    def per_clip(self) -> dict[str, float]:
        """KL of every pair, by id."""
        names, ref, gen = self.paired()
        return dict(zip(names, _kl_terms(ref, gen, self.mode, self.eps).tolist()))

    def compute(self) -> torch.Tensor:
        _, ref, gen = self.paired()
        return _kl_terms(ref, gen, self.mode, self.eps).mean()


# ----------------------------------------------------------------------------- IS


class InceptionScore(Metric):
    """Inception score of generated clips: exp(E_x KL(p(y|x) ‖ p(y))), mean and std over splits.

    As torch-fidelity's ``isc`` (used by audioldm_eval with 10 splits, shuffled with seed
    2020): the clips are put in a canonical order (sorted by a fixed random projection of
    their log-probabilities, so the result does not depend on how clips were spread over
    processes or batches), permuted with ``shuffle_seed`` (None: no permutation), cut into
    ``splits`` contiguous chunks ``[k·N/splits, (k+1)·N/splits)``; in each chunk the
    marginal p(y) is the chunk's mean of p(y|x); the score of a chunk is
    exp(mean_x Σ_y p(y|x) (log p(y|x) − log p(y))).

    Args:
        splits: number of chunks (``N >= splits`` is required).
        from_logits: inputs are logits (softmax is applied, AudioLDM's PANNs convention) or
            already probabilities (rows summing to 1).
        shuffle_seed: seed of the permutation before splitting; None keeps the canonical order
            (which groups similar clips: only sensible with ``splits=1``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, splits: int = 10, from_logits: bool = True, shuffle_seed: int | None = 2020, **kwargs) -> None:
        super().__init__(**kwargs)
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.splits = int(splits)
        self.from_logits = from_logits
        self.shuffle_seed = shuffle_seed
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor) -> None:
        """Add generated clips' class logits or probabilities, (N, C)."""
        if values.dim() != 2:
            raise ValueError(f"values must be (N, C), got {tuple(values.shape)}")
        self.values.append(values.detach().to(torch.float64))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean, std) of the per-split scores (std with divisor N, like numpy)."""
        if isinstance(self.values, list) and not self.values:
            raise ValueError("InceptionScore: no clips were added")
        values = dim_zero_cat(self.values)
        n = values.shape[0]
        if n < self.splits:
            raise ValueError(f"InceptionScore: {n} clips cannot be cut into {self.splits} splits")
        if self.from_logits:
            log_p = values.log_softmax(dim=1)
        else:
            if (values < 0).any() or not torch.allclose(values.sum(1), torch.ones(n, dtype=values.dtype), atol=1e-4):
                raise ValueError("InceptionScore(from_logits=False): rows must be probabilities summing to 1")
            log_p = values.clamp(min=1e-30).log()
        generator = torch.Generator(device="cpu").manual_seed(0)  # on the host: the same order on every device
        projection = torch.randn(log_p.shape[1], generator=generator, dtype=torch.float64).to(log_p.device)
        log_p = log_p[torch.argsort(log_p @ projection, stable=True)]  # canonical order
        if self.shuffle_seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(self.shuffle_seed))
            log_p = log_p[torch.randperm(n, generator=generator).to(log_p.device)]
        p = log_p.exp()
        scores = []
        for k in range(self.splits):
            chunk_p, chunk_log_p = p[k * n // self.splits : (k + 1) * n // self.splits], log_p[k * n // self.splits : (k + 1) * n // self.splits]
            log_marginal = chunk_p.mean(dim=0, keepdim=True).clamp(min=1e-30).log()
            kl = (chunk_p * (chunk_log_p - log_marginal)).sum(dim=1).mean()
            scores.append(kl.exp())
        scores = torch.stack(scores)
        return scores.mean(), scores.std(unbiased=False)


# ----------------------------------------------------------------------------- CLAP, accuracy


class ClapScore(Metric):
    """Mean cosine similarity of paired text and audio embeddings (the CLAP score).

    ``update(text_embeddings (N, D), audio_embeddings (N, D))`` — row i of each belongs to
    the same clip (its caption and its generated audio). Embeddings are L2-normalised here,
    so un-normalised projections may be passed.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, text_embeddings: torch.Tensor, audio_embeddings: torch.Tensor) -> None:
        if text_embeddings.shape != audio_embeddings.shape or text_embeddings.dim() != 2:
            raise ValueError(
                f"text and audio embeddings must both be (N, D), got {tuple(text_embeddings.shape)} "
                f"and {tuple(audio_embeddings.shape)}"
            )
        cos = F.cosine_similarity(text_embeddings.detach().double(), audio_embeddings.detach().double(), dim=1)
        self.total = self.total + cos.sum()
        self.count = self.count + cos.shape[0]

    def compute(self) -> torch.Tensor:
        if float(self.count) == 0:
            raise ValueError("ClapScore: no clips were added")
        return self.total / self.count


class AttributeAccuracy(Metric):
    """Per-attribute accuracy of a multi-head classifier, plus the all-attributes-correct rate.

    ``update(predicted (N, A), target (N, A))`` with class indices per attribute.
    ``compute`` returns a (A + 1,) tensor: A per-attribute accuracies, then the fraction of
    clips with every attribute right.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_attributes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_attributes = int(num_attributes)
        self.add_state("correct", torch.zeros(num_attributes + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        if predicted.shape != target.shape or predicted.dim() != 2 or predicted.shape[1] != self.num_attributes:
            raise ValueError(
                f"predicted and target must be (N, {self.num_attributes}), got {tuple(predicted.shape)}, {tuple(target.shape)}"
            )
        hits = (predicted == target).to(torch.float64)  # (N, A)
        self.correct = self.correct + torch.cat([hits.sum(0), hits.prod(dim=1).sum().reshape(1)])
        self.count = self.count + hits.shape[0]

    def compute(self) -> torch.Tensor:
        if float(self.count) == 0:
            raise ValueError("AttributeAccuracy: no clips were added")
        return self.correct / self.count


# ----------------------------------------------------------------------------- seams


def boundary_jumps(frames: torch.Tensor, boundaries: Sequence[int]) -> dict[str, float]:
    """How much a sequence changes across ``boundaries`` against everywhere else: a seam check
    for long-form generation (the boundaries are the window shifts, ``window_shifts``).

    Args:
        frames: (B, T, F) tokens or log-mel frames.
        boundaries: indices ``t`` (``1 <= t < T``) of the frames right after a boundary.

    The jump at ``t`` is ``||frames[:, t] - frames[:, t - 1]||₂``. Returns ``at_boundary`` and
    ``elsewhere`` (mean jumps; elsewhere: every other ``t >= 1``), their ``ratio``, and
    ``exceed_p95``: the share of (clip, boundary) jumps above the 95th percentile of that
    clip's other jumps — about 0.05 when a boundary is like any other step, 1 for a seam
    that stands out every time.
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be (B, T, F), got {tuple(frames.shape)}")
    steps = frames.shape[1]
    at = sorted({int(t) for t in boundaries})
    if not at or at[0] < 1 or at[-1] >= steps:
        raise ValueError(f"boundaries must be non-empty indices in [1, {steps - 1}], got {list(boundaries)}")
    jumps = (frames[:, 1:] - frames[:, :-1]).float().norm(dim=-1)  # (B, T - 1): jump t sits at index t - 1
    is_boundary = torch.zeros(steps - 1, dtype=torch.bool, device=frames.device)
    is_boundary[torch.tensor(at, device=frames.device) - 1] = True
    if bool(is_boundary.all()):
        raise ValueError("every step is a boundary: nothing to compare with")
    at_boundary, elsewhere = jumps[:, is_boundary], jumps[:, ~is_boundary]
    p95 = torch.quantile(elsewhere, 0.95, dim=1, keepdim=True)  # (B, 1)
    mean_at, mean_else = float(at_boundary.mean()), float(elsewhere.mean())
    return {"at_boundary": mean_at, "elsewhere": mean_else, "ratio": mean_at / max(mean_else, 1e-12),
            "exceed_p95": float((at_boundary > p95).float().mean())}
