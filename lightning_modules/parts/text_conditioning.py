"""Text prefixes for the causal decoder: one interface, two implementations.

``TextConditioner`` splits work in two, as AudioCraft does:

* ``tokenize(captions) -> dict[str, Tensor]`` on the CPU (dataloader / system side, no grads);
* ``forward(tokenized) -> (prefix (B, L, D), mask (B, L) bool)`` on the model's device.

Every implementation returns a fixed length ``L = max_len`` (padded, mask True = valid) so
that a learned null prefix of shape (L, D) can replace any row for classifier-free
guidance (:func:`apply_text_dropout`).

* :class:`ScratchTextConditioner`: sentencepiece + a small bidirectional Transformer
  trained jointly; the sentencepiece model travels inside the checkpoint.
* :class:`PretrainedT5ClapConditioner`: frozen FLAN-T5 encoder token embeddings (77) and a
  frozen CLAP sentence embedding (1) -> 78 embeddings, each projected by a trainable
  Linear. The frozen models are kept out of ``parameters()`` and ``state_dict()``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.atomic import torch_save_atomic

from .decoder import Block, init_transformer_weights


class TextConditioner(nn.Module):
    """Interface. Attributes: ``out_dim`` (D), ``max_len`` (L)."""

    out_dim: int
    max_len: int

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """CPU-side tokenization of B captions -> dict of (B, ...) tensors."""
        raise NotImplementedError

    def overlong(self, captions: list[str]) -> list[bool]:
        """Per caption: is it longer than the encoder reads (and so cut by :meth:`tokenize`)?"""
        raise NotImplementedError

    def forward(self, tokenized: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prefix (B, L, D), mask (B, L) bool True = valid."""
        raise NotImplementedError


def apply_text_dropout(prefix: torch.Tensor, mask: torch.Tensor, null_prefix: torch.Tensor,
                       drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace dropped rows by the learned null prefix (classifier-free guidance training).

    Args:
        prefix: (B, L, D); mask: (B, L) bool.
        null_prefix: (L, D) learned; a dropped row becomes null_prefix with an all-True mask.
        drop: (B,) bool, True = drop this row's text.
    Returns:
        prefix (B, L, D), mask (B, L)
    """
    if null_prefix.shape != prefix.shape[1:]:
        raise ValueError(f"null_prefix {tuple(null_prefix.shape)} != prefix (L, D) {tuple(prefix.shape[1:])}")
    prefix = torch.where(drop[:, None, None], null_prefix.to(prefix.dtype)[None], prefix)
    mask = torch.where(drop[:, None], torch.ones_like(mask, dtype=torch.bool), mask.bool())
    return prefix, mask


# ----------------------------------------------------------------------------- from scratch


SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe", "word")


def train_sentencepiece(captions: list[str], model_prefix_path: str, vocab_size: int = 1000,
                        model_type: str = "unigram") -> str:
    """Train a sentencepiece model on captions; returns the ``.model`` path.

    Ids: 0 = pad, 1 = unk, 2 = eos (no bos). ``vocab_size`` is a soft limit
    (``hard_vocab_limit=False``): on a tiny corpus the vocabulary simply ends up smaller.
    ``model_type``: "unigram" (sentencepiece's default), "bpe" or "word". On a tiny corpus
    the unigram trainer can stop at a near-character vocabulary (the demo corpus' 82 words:
    120 pieces, 20 tokens per caption) where BPE keeps whole words (643 pieces, 9.5 tokens)
    with single characters to fall back on for unseen words.
    """
    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        raise ValueError(f"text.tokenizer must be one of {SENTENCEPIECE_MODEL_TYPES}, got {model_type!r}")
    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("train_sentencepiece needs at least one non-empty caption")
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix_path)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=model_prefix_path, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2, minloglevel=2,
    )
    return model_prefix_path + ".model"


class ScratchTextConditioner(TextConditioner):
    """Sentencepiece + bidirectional pre-LN Transformer encoder, trained with the decoder.

    Args:
        sp_model: path to a sentencepiece ``.model``, its serialized bytes, or None (then
            ``vocab_size`` is required and the tokenizer comes from ``load_state_dict``).
        width, depth, heads: encoder size.
        max_len: L, tokens per caption (eos included; longer captions are truncated).
        out_dim: D, prefix width (the decoder width).
        vocab_size: only when ``sp_model`` is None.
        dropout: encoder dropout.
    """

    def __init__(self, sp_model: str | bytes | None, width: int = 256, depth: int = 4, heads: int = 4,
                 max_len: int = 32, out_dim: int = 768, vocab_size: int | None = None, dropout: float = 0.0):
        super().__init__()
        self._sp = None
        self._sp_bytes = b""
        if sp_model is not None:
            if isinstance(sp_model, (str, os.PathLike)):
                if not os.path.isfile(sp_model):
                    raise FileNotFoundError(f"sentencepiece model not found: {sp_model}")
                with open(sp_model, "rb") as f:
                    sp_model = f.read()
            self._load_sp(sp_model)
            if vocab_size is not None and vocab_size != self._sp.get_piece_size():
                raise ValueError(f"vocab_size {vocab_size} != sentencepiece size {self._sp.get_piece_size()}")
            vocab_size = self._sp.get_piece_size()
        elif vocab_size is None:
            raise ValueError("ScratchTextConditioner: give sp_model, or vocab_size to restore from a checkpoint")
        self.vocab_size, self.max_len, self.out_dim = vocab_size, max_len, out_dim
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(max_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(width, heads, 4.0, dropout) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        init_transformer_weights(self, depth)

    def _load_sp(self, proto: bytes) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=bytes(proto))
        self._sp_bytes = bytes(proto)

    # the tokenizer lives in the checkpoint: state_dict()[prefix + "_extra_state"]
    def get_extra_state(self) -> dict:
        return {"sp_model": torch.frombuffer(bytearray(self._sp_bytes), dtype=torch.uint8).clone()}

    def set_extra_state(self, state: dict) -> None:
        proto = state["sp_model"].cpu().numpy().tobytes()
        if not proto:
            raise ValueError("checkpoint holds no sentencepiece model")
        self._load_sp(proto)
        if self._sp.get_piece_size() != self.vocab_size:
            raise ValueError(f"checkpoint tokenizer has {self._sp.get_piece_size()} pieces, "
                             f"module was built with vocab_size {self.vocab_size}")

    def overlong(self, captions: list[str]) -> list[bool]:
        """Per caption: would :meth:`tokenize` cut it (more than ``max_len - 1`` pieces)?"""
        return [len(pieces) > self.max_len - 1 for pieces in self._sp.encode(list(captions))]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """-> input_ids (B, L) long (0 = pad), attention_mask (B, L) bool. Each caption ends
        with eos, so even an empty caption has one valid position."""
        if self._sp is None:
            raise RuntimeError("no sentencepiece model loaded (construct with sp_model or load a checkpoint)")
        ids = torch.zeros(len(captions), self.max_len, dtype=torch.long, device="cpu")  # host-side work
        for i, pieces in enumerate(self._sp.encode(list(captions))):
            pieces = pieces[: self.max_len - 1] + [self._sp.eos_id()]
            ids[i, : len(pieces)] = torch.tensor(pieces, device="cpu")
        return {"input_ids": ids, "attention_mask": ids != 0}

    def forward(self, tokenized: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prefix (B, L, out_dim), mask (B, L) bool."""
        device = self.tok_emb.weight.device
        ids = tokenized["input_ids"].to(device)  # (B, L)
        mask = tokenized["attention_mask"].to(device).bool()  # (B, L)
        L = ids.shape[1]
        x = self.drop(self.tok_emb(ids) + self.pos_emb.weight[:L])  # (B, L, width)
        # bidirectional over valid keys; the diagonal keeps padded rows finite
        eye = torch.eye(L, dtype=torch.bool, device=device)
        attn_mask = (mask[:, None, :] | eye)[:, None]  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.proj(self.ln_f(x)), mask


# ----------------------------------------------------------------------------- pretrained


def _check_dir(path: str, what: str) -> None:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory not found: {path!r} (expected a local "
                                f"save_pretrained() folder; nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} directory {path!r} has no config.json")


def _load_local(model_cls, path: str, what: str):
    """(tokenizer, frozen model) from a local folder. Unused checkpoint keys (e.g. CLAP's
    audio tower) are expected and silenced; *missing* weights raise."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load {model_cls.__name__} from {what} {path!r}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        raise RuntimeError(f"{what} {path!r}: weights missing for {model_cls.__name__}: "
                           f"{sorted(info['missing_keys'])[:10]}")
    return tok, model


def frozen_encoder_fingerprint(t5_dir: str, clap_dir: str, t5_max_len: int) -> str:
    """Identifies frozen T5 + CLAP encoders by their configs, weight-file sizes and the T5
    length, read from the directories (the models are not loaded)."""
    parts: list = [t5_max_len]
    for directory in (t5_dir, clap_dir):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name == "config.json":
                parts.append(json.loads(Path(path).read_text()))
            elif name.endswith((".safetensors", ".bin")):
                parts.append([name, os.path.getsize(path)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FrozenTextEmbeddings:
    """Frozen FLAN-T5 + CLAP outputs of a fixed set of captions, computed once and
    memory-mapped from one file (shared by every rank and worker through the page cache).

    File (``torch.save``): ``captions`` [N str], ``t5`` (T, d_t5) the valid T5 token rows of
    every caption concatenated, ``offsets`` (N + 1,) long into ``t5``, ``clap`` (N, d_clap)
    normalised CLAP embeddings, ``fingerprint`` of the frozen encoders that made them.
    Padding positions are not stored: the decoder masks them out.

    Args:
        path: the file :meth:`write` wrote.
        expected_fingerprint: refuse a file made by other encoders (see
            :meth:`PretrainedT5ClapConditioner.encoder_fingerprint`).
    """

    def __init__(self, path: str | os.PathLike, expected_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        data = torch.load(self.path, weights_only=True, mmap=True)
        if expected_fingerprint is not None and data["fingerprint"] != expected_fingerprint:
            raise ValueError(
                f"{self.path} holds text embeddings of other encoders ({data['fingerprint']}, "
                f"expected {expected_fingerprint}); delete it to recompute"
            )
        self.t5, self.offsets, self.clap = data["t5"], data["offsets"], data["clap"]
        self.index = {caption: i for i, caption in enumerate(data["captions"])}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, captions: Sequence[str]) -> tuple[int, ...] | None:
        """Row of every caption, or None when one of them is not stored (then the encoders run)."""
        rows = tuple(self.index.get(c, -1) for c in captions)
        return None if -1 in rows else rows

    def gather(self, rows: Sequence[int], t5_max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> t5 (B, t5_max_len, d_t5) zero-padded, clap (B, d_clap), float32 on the host."""
        t5 = torch.zeros(len(rows), t5_max_len, self.t5.shape[1])
        for b, row in enumerate(rows):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            t5[b, : end - start] = self.t5[start:end].float()
        return t5, self.clap[list(rows)].float()

    @staticmethod
    def write(path: str | os.PathLike, conditioner: "PretrainedT5ClapConditioner", captions: Sequence[str],
              batch_size: int = 64, dtype: torch.dtype = torch.float16, progress: bool = False) -> Path:
        """Run the frozen encoders over the distinct ``captions`` once and save them
        atomically at ``path`` (on the conditioner's device)."""
        unique = list(dict.fromkeys(captions))
        t5_rows, lengths, clap = [], [], []
        batches = range(0, len(unique), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="[text] frozen T5 + CLAP", unit="batch", mininterval=5)
        for start in batches:
            tokenized = conditioner.tokenize(unique[start : start + batch_size])
            t5_h, clap_e = conditioner.frozen_embeddings(tokenized)
            valid = tokenized["t5_attention_mask"].sum(1).tolist()
            for b, n in enumerate(valid):
                t5_rows.append(t5_h[b, :n].to("cpu", dtype))
                lengths.append(n)
            clap.append(clap_e.cpu())
        offsets = torch.zeros(len(unique) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        payload = dict(captions=unique, t5=torch.cat(t5_rows), offsets=offsets, clap=torch.cat(clap),
                       fingerprint=conditioner.encoder_fingerprint())
        path = Path(path)
        torch_save_atomic(path, payload)
        return path


class PretrainedT5ClapConditioner(TextConditioner):
    """Frozen FLAN-T5 token embeddings + frozen CLAP sentence embedding -> 78-position prefix.

    Layout: position 0 = CLAP text embedding (L2-normalised, as ``ClapModel.get_text_features``),
    positions 1..77 = T5 encoder outputs (right-padded), so the mask is True on a leading run.
    Each part is projected to ``out_dim`` by its own trainable Linear; only those appear in
    ``parameters()`` and ``state_dict()``. The frozen models follow ``.to()`` / ``.half()``
    via ``_apply`` and always stay in eval mode.

    Args:
        t5_dir: local folder with a T5 (encoder) model + tokenizer (``save_pretrained``).
        clap_dir: local folder with a CLAP model (ClapModel or ClapTextModelWithProjection) + tokenizer.
        out_dim: D.
        t5_max_len: T5 tokens (77, so L = 78).
        cache_size: keep up to this many frozen embeddings (keyed by token ids) in memory;
            0 disables the cache.
    """

    def __init__(self, t5_dir: str, clap_dir: str, out_dim: int, t5_max_len: int = 77, cache_size: int = 0):
        super().__init__()
        from transformers import ClapTextModelWithProjection, T5EncoderModel

        _check_dir(t5_dir, "t5_dir")
        _check_dir(clap_dir, "clap_dir")
        t5_tok, t5 = _load_local(T5EncoderModel, t5_dir, "t5_dir")
        clap_tok, clap = _load_local(ClapTextModelWithProjection, clap_dir, "clap_dir")
        for m in (t5, clap):
            m.eval().requires_grad_(False)
        # not registered as submodules: out of parameters(), state_dict(), optimizers, DDP
        self._frozen = {"t5": t5, "clap": clap}
        self._tokenizers = {"t5": t5_tok, "clap": clap_tok}
        self.t5_max_len, self.max_len, self.out_dim = t5_max_len, t5_max_len + 1, out_dim
        self.t5_proj = nn.Linear(t5.config.d_model, out_dim)
        self.clap_proj = nn.Linear(clap.config.projection_dim, out_dim)
        for m in (self.t5_proj, self.clap_proj):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.store: FrozenTextEmbeddings | None = None
        self._dirs = (t5_dir, clap_dir)

    def encoder_fingerprint(self) -> str:
        """Identifies the frozen encoders (:func:`frozen_encoder_fingerprint`)."""
        return frozen_encoder_fingerprint(*self._dirs, self.t5_max_len)

    def use_precomputed(self, path: str | os.PathLike | None) -> None:
        """Read the frozen outputs of the captions stored at ``path`` (a
        :class:`FrozenTextEmbeddings` file of these encoders) instead of running the encoders;
        captions not in it (new prompts) still run them. None: always run them."""
        self.store = None if path is None else FrozenTextEmbeddings(path, expected_fingerprint=self.encoder_fingerprint())

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for m in self._frozen.values():
            m._apply(fn, *args, **kwargs)
        self._cache.clear()
        return self

    def overlong(self, captions: list[str]) -> list[bool]:
        """Per caption: would :meth:`tokenize` cut it (more than ``t5_max_len`` T5 tokens)?"""
        return [len(ids) > self.t5_max_len for ids in self._tokenizers["t5"](list(captions))["input_ids"]]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """-> t5_input_ids / t5_attention_mask (B, 77), clap_input_ids / clap_attention_mask (B, Lc)."""
        captions = list(captions)
        t5 = self._tokenizers["t5"](captions, padding="max_length", max_length=self.t5_max_len,
                                    truncation=True, return_tensors="pt")
        clap = self._tokenizers["clap"](captions, padding="longest", max_length=77,
                                        truncation=True, return_tensors="pt")
        return {"t5_input_ids": t5["input_ids"], "t5_attention_mask": t5["attention_mask"].bool(),
                "clap_input_ids": clap["input_ids"], "clap_attention_mask": clap["attention_mask"].bool(),
                **({"store_rows": rows} if (rows := self._store_rows(captions)) is not None else {})}

    def _store_rows(self, captions: list[str]) -> tuple[int, ...] | None:
        return self.store.lookup(captions) if self.store is not None else None

    @torch.no_grad()
    def frozen_embeddings(self, tokenized: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> t5 (B, 77, d_t5), clap (B, d_clap) float32, on the projections' device."""
        device = self.t5_proj.weight.device
        t5_ids = tokenized["t5_input_ids"].to(device)
        t5_mask = tokenized["t5_attention_mask"].to(device)
        clap_ids = tokenized["clap_input_ids"].to(device)
        clap_mask = tokenized["clap_attention_mask"].to(device)
        t5_h = self._frozen["t5"](input_ids=t5_ids, attention_mask=t5_mask.long()).last_hidden_state
        clap_e = self._frozen["clap"](input_ids=clap_ids, attention_mask=clap_mask.long()).text_embeds
        return t5_h.float(), F.normalize(clap_e.float(), dim=-1)

    def _cached_frozen(self, tokenized: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "store_rows" in tokenized and self.store is not None:  # decided on the host, in tokenize
            device = self.t5_proj.weight.device
            t5_h, clap_e = self.store.gather(tokenized["store_rows"], self.t5_max_len)
            return t5_h.to(device, non_blocking=True), clap_e.to(device, non_blocking=True)
        if self.cache_size <= 0:
            return self.frozen_embeddings(tokenized)
        B = tokenized["t5_input_ids"].shape[0]
        keys = [tokenized["t5_input_ids"][i].cpu().numpy().tobytes() + b"|"
                + tokenized["clap_input_ids"][i][tokenized["clap_attention_mask"][i]].cpu().numpy().tobytes()
                for i in range(B)]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            sub = {k: v[missing] for k, v in tokenized.items()}
            t5_h, clap_e = self.frozen_embeddings(sub)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = (t5_h[j], clap_e[j])
        t5_h = torch.stack([self._cache[k][0] for k in keys])
        clap_e = torch.stack([self._cache[k][1] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return t5_h, clap_e

    def forward(self, tokenized: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prefix (B, 78, out_dim), mask (B, 78) bool (position 0, CLAP, always valid)."""
        t5_h, clap_e = self._cached_frozen(tokenized)
        t5_mask = tokenized["t5_attention_mask"].to(t5_h.device).bool()  # (B, 77)
        dtype = self.t5_proj.weight.dtype
        prefix = torch.cat([self.clap_proj(clap_e.to(dtype))[:, None], self.t5_proj(t5_h.to(dtype))], dim=1)  # (B, 78, D)
        mask = torch.cat([torch.ones_like(t5_mask[:, :1]), t5_mask], dim=1)  # (B, 78)
        return prefix, mask

    def __deepcopy__(self, memo):
        # an EMA copy shares the frozen models and tokenizers instead of duplicating them
        memo[id(self._frozen)] = self._frozen
        memo[id(self._tokenizers)] = self._tokenizers
        memo[id(self.store)] = self.store  # memory-mapped, read-only: shared too
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen.values():
            m.eval()  # frozen models never enter train mode (dropout off)
        return self


# ----------------------------------------------------------------------------- factory


def build_text_conditioner(
    text_cfg, out_dim: int, sp_model_path: str | None = None, vocab_size: int | None = None
) -> TextConditioner:
    """The conditioner an experiment's ``text:`` config asks for.

    Args:
        text_cfg: the ``text`` section (``kind`` scratch | pretrained and its sizes/dirs).
        out_dim: prefix width D (the decoder width).
        sp_model_path: sentencepiece model (scratch); when it no longer exists (a checkpoint
            moved to another machine), ``vocab_size`` builds the module and the tokenizer is
            restored from the checkpoint's state.
        vocab_size: the sentencepiece vocabulary size actually trained (scratch).
    """
    if text_cfg.kind == "scratch":
        sp_model = sp_model_path if sp_model_path and os.path.isfile(sp_model_path) else None
        return ScratchTextConditioner(
            sp_model,
            width=text_cfg.width,
            depth=text_cfg.depth,
            heads=text_cfg.heads,
            max_len=text_cfg.max_len,
            out_dim=out_dim,
            vocab_size=None if sp_model else vocab_size,
        )
    if text_cfg.kind == "pretrained":
        for key in ("t5_dir", "clap_dir"):
            if not text_cfg[key]:
                raise ValueError(f"text.kind is 'pretrained' but text.{key} is null: point it at a local model directory")
        return PretrainedT5ClapConditioner(
            text_cfg.t5_dir, text_cfg.clap_dir, out_dim=out_dim, t5_max_len=text_cfg.t5_max_tokens
        )
    raise ValueError(f"text.kind must be 'scratch' or 'pretrained', got {text_cfg.kind!r}")
