"""The synthetic-corpus evaluator: a small log-mel CNN that reads a clip's attributes.

On the built-in synthetic corpus the AudioSet networks of the AudioLDM protocol (VGGish,
PANNs) are neither available offline nor meaningful, so generated audio is judged by a
classifier trained on the corpus itself. It plays PANNs' role: its embedding gives a
Fréchet distance, its class probabilities give KL, IS and attribute accuracy.

Which attributes: every key of the corpus' label vocabulary (``LABEL_VALUES`` in
``datamodules/synthetic.py``), one softmax head each:

    structure                  single | sequence
    source, pitch, pattern     the first event of an "A followed by B" clip, or the only event
    source2, pitch2, pattern2  the second event of a sequence; "none" for single clips

so a sequence clip is right only if both events are heard in the right order. The heads
share one embedding that keeps coarse time order: after the conv stack the feature map is
average-pooled to a fixed ``time_cells × freq_cells`` grid (8 × 8: a quarter second per
time cell for the corpus' 2 s clips), flattened and projected to ``embed_dim``. Fades, the order of
events and pitch all depend on *where* energy is, which global pooling would lose.

Architecture (PANNs-like, tiny):

    wave (B, S) ─MelFrontEnd─► log-mel (B, 64, T) ─BN over mel bins─► (B, 1, T, 64)
      ─avgpool 2× in time (50 frames/s is plenty for these attributes; halves the cost)
      ─[conv3×3 → BN → ReLU → avgpool 2×2] × len(channels)─► (B, C, T/16, 8)
      ─adaptive avg pool─► (B, C, 8, 8) ─flatten─► Linear ─► ReLU ─► embedding (B, E)
      ─one Linear per attribute─► logits (B, K_a)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.atomic import torch_save_atomic
from datamodules.synthetic import event_combinations
from lightning_modules.parts.mel import MelFrontEnd

EVALUATOR_FORMAT_VERSION = 1


class AttributeEvaluator(nn.Module):
    """Log-mel CNN with one classification head per attribute.

    Args:
        label_values: attribute name → its class names, in a fixed order (the corpus'
            ``LABEL_VALUES``); class index = position in the list.
        mel_cfg: :class:`MelFrontEnd` arguments (AudioLDM's 64-bin log-mel by default).
        channels: conv widths, one 2×2-pooled block each.
        embed_dim: embedding size E (the FD features).
        time_cells, freq_cells: the pooled grid the embedding is read from.
    """

    def __init__(
        self,
        label_values: Mapping[str, Sequence[str]],
        mel_cfg: Mapping[str, Any] | None = None,
        channels: Sequence[int] = (16, 32, 64),
        embed_dim: int = 128,
        time_cells: int = 8,
        freq_cells: int = 8,
    ) -> None:
        super().__init__()
        self.label_values = {str(k): [str(v) for v in values] for k, values in label_values.items()}
        self.attributes = list(self.label_values)
        self.mel = MelFrontEnd(**dict(mel_cfg or {}))
        self.bn0 = nn.BatchNorm2d(self.mel.n_mels)
        blocks: list[nn.Module] = [nn.AvgPool2d((2, 1))]
        in_channels = 1
        for width in channels:
            blocks += [
                nn.Conv2d(in_channels, int(width), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(width)),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            in_channels = int(width)
        self.convs = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d((time_cells, freq_cells))
        self.embed = nn.Linear(in_channels * time_cells * freq_cells, embed_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(embed_dim, len(values)) for name, values in self.label_values.items()})
        self.config = dict(
            label_values=self.label_values, mel_cfg=self.mel.config, channels=[int(c) for c in channels],
            embed_dim=int(embed_dim), time_cells=int(time_cells), freq_cells=int(freq_cells),
        )

    @property
    def embed_dim(self) -> int:
        return self.embed.out_features

    @property
    def class_counts(self) -> list[int]:
        return [len(self.label_values[name]) for name in self.attributes]

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """wave (B, S) in [-1, 1] at the mel rate → (embedding (B, E), {attribute: logits (B, K_a)})."""
        x = self.mel(wave).transpose(1, 2).unsqueeze(1)  # (B, 1, T, n_mels)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel bin
        x = self.pool(self.convs(x))  # (B, C, time_cells, freq_cells)
        embedding = F.relu(self.embed(x.flatten(1)))  # (B, E)
        return embedding, {name: head(embedding) for name, head in self.heads.items()}

    def encode_labels(self, labels: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """Label dicts → class indices (B, A) in ``self.attributes`` order.

        Raises:
            ValueError: a clip lacks an attribute or has a value outside the vocabulary.
        """
        rows = []
        for i, clip in enumerate(labels):
            row = []
            for name in self.attributes:
                if name not in clip:
                    raise ValueError(f"clip {i}: labels {dict(clip)} have no {name!r} (the evaluator classifies {self.attributes})")
                try:
                    row.append(self.label_values[name].index(clip[name]))
                except ValueError:
                    raise ValueError(
                        f"clip {i}: {name}={clip[name]!r} is not one of {self.label_values[name]}"
                    ) from None
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    @torch.no_grad()
    def predict(self, wave: torch.Tensor) -> dict[str, Any]:
        """Eval-mode outputs: ``embedding`` (B, E), ``logits`` {attr: (B, K_a)}, ``predicted`` (B, A)."""
        embedding, logits = self(wave)
        predicted = torch.stack([logits[name].argmax(dim=1) for name in self.attributes], dim=1)
        return {"embedding": embedding, "logits": logits, "predicted": predicted}

    # ------------------------------------------------------------------ storage

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
        """Weights + constructor config (+ ``extra`` metadata) in one file, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": EVALUATOR_FORMAT_VERSION,
            "config": self.config,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "extra": json.loads(json.dumps(dict(extra or {}))),
        }
        torch_save_atomic(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> "AttributeEvaluator":
        """An evaluator saved by :meth:`save`, in eval mode (strict key check)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no trained evaluator at {path}: train it with `make evaluator` (or set eval.evaluator.path)"
            )
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format_version") != EVALUATOR_FORMAT_VERSION:
            raise ValueError(f"{path}: evaluator format {payload.get('format_version')} != {EVALUATOR_FORMAT_VERSION}")
        model = cls(**payload["config"])
        model.load_state_dict(payload["state_dict"], strict=True)
        model.extra = payload.get("extra", {})
        return model.eval()


SPLICE_CROSSFADE_S = 0.01  # the spliced halves meet through a 10 ms linear crossfade (no click)


def splice_sequences(
    wave: torch.Tensor, labels: Sequence[Mapping[str, str]], share: float, sample_rate: int = 16000
) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Gapless "A followed by B" clips made from single-event clips, as generated audio has them.

    The corpus' sequences are two events rendered apart, each with its own onset and
    offset ramps at the midpoint; a generated clip that changes halfway (a pulse that stops,
    a buzz that turns to hiss) has no such seam, and an evaluator trained only on real
    sequences calls it one event. Here a ``share`` of the batch's single clips are replaced
    by their own first half followed by the second half of another single clip of a
    different (source, pitch, pattern), labelled the sequence of the two events. Half of a
    steady, pulsing or swept event is still one; a fade keeps its name only in the half
    that reaches silence, so a fade-out clip never gives the first half and a fade-in clip
    never the second (those clips stay as they are).

    wave: (B, S) clips; labels: B label dicts (``datamodules.synthetic.LABEL_VALUES`` keys).
    Returns new (B, S) waves and label dicts; the inputs are not modified. The partner and
    the clips changed are drawn from torch's global generator (seeded per run).
    """
    originals, labels = list(labels), [dict(l) for l in labels]
    singles = [i for i, l in enumerate(originals) if l["structure"] == "single"]
    seconds = [j for j in singles if originals[j]["pattern"] != "fade_in"]  # clips that may give a second half
    if share <= 0 or not seconds:
        return wave, labels
    half, fade = wave.shape[1] // 2, max(1, int(SPLICE_CROSSFADE_S * sample_rate))
    ramp = torch.linspace(0.0, 1.0, 2 * fade, device=wave.device, dtype=wave.dtype)
    chosen, draws = torch.rand(len(singles)) < share, torch.rand(len(singles))
    out = wave.clone()
    for k, i in enumerate(singles):
        first = originals[i]
        partners = [j for j in seconds if event_combinations(originals[j]) != event_combinations(first)]
        if not chosen[k] or first["pattern"] == "fade_out" or not partners:
            continue
        j = partners[min(int(draws[k] * len(partners)), len(partners) - 1)]
        second = originals[j]
        out[i, half + fade:] = wave[j, half + fade:]
        out[i, half - fade:half + fade] = wave[i, half - fade:half + fade] * (1 - ramp) + wave[j, half - fade:half + fade] * ramp
        labels[i] = {"structure": "sequence", "source": first["source"], "pitch": first["pitch"], "pattern": first["pattern"],
                     "source2": second["source"], "pitch2": second["pitch"], "pattern2": second["pattern"]}
    return out, labels


class EvaluatorSystem(L.LightningModule):
    """Trains :class:`AttributeEvaluator` on audio batches of the synthetic corpus.

    Batches come from ``AudioCapsDataModule``: ``wave`` (B, S), ``wave_mask`` (B, S),
    ``labels`` list[dict]. Loss: the sum over attributes of the cross-entropy. Training
    applies a random gain of ±``gain_db`` per clip (level is not an attribute) and turns a
    ``splice_share`` of the single clips into gapless sequences (:func:`splice_sequences`).
    Validation logs ``val/acc/<attribute>`` and ``val/acc_min`` (the worst attribute).
    """

    def __init__(
        self,
        label_values: Mapping[str, Sequence[str]],
        mel_cfg: Mapping[str, Any] | None = None,
        channels: Sequence[int] = (16, 32, 64),
        embed_dim: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_steps: int = 400,
        gain_db: float = 6.0,
        splice_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AttributeEvaluator(label_values, mel_cfg, channels, embed_dim)
        self._val_correct: torch.Tensor | None = None
        self._val_count = 0

    def _loss(self, wave: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and predictions (B, A)."""
        _, logits = self.model(wave)
        losses = [F.cross_entropy(logits[name], targets[:, a]) for a, name in enumerate(self.model.attributes)]
        predicted = torch.stack([logits[name].argmax(1) for name in self.model.attributes], dim=1)
        return torch.stack(losses).sum(), predicted

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        wave = batch["wave"] * batch["wave_mask"].to(batch["wave"].dtype)
        wave, labels = splice_sequences(wave, batch["labels"], self.hparams.splice_share, self.model.mel.sample_rate)
        gain_db = (torch.rand(wave.shape[0], 1, device=wave.device) * 2 - 1) * self.hparams.gain_db
        wave = (wave * 10 ** (gain_db / 20)).clamp(-1, 1)
        targets = self.model.encode_labels(labels).to(wave.device)
        loss, predicted = self._loss(wave, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=wave.shape[0])
        self.log("train/acc", (predicted == targets).float().mean(), batch_size=wave.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros(len(self.model.attributes), device=self.device)
        self._val_count = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        wave = batch["wave"] * batch["wave_mask"].to(batch["wave"].dtype)
        targets = self.model.encode_labels(batch["labels"]).to(wave.device)
        loss, predicted = self._loss(wave, targets)
        self.log("val/loss", loss, batch_size=wave.shape[0])
        self._val_correct += (predicted == targets).float().sum(0)
        self._val_count += wave.shape[0]

    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        accuracy = self._val_correct / self._val_count
        for name, value in zip(self.model.attributes, accuracy):
            self.log(f"val/acc/{name}", value)
        self.log("val/acc_min", accuracy.min(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=max(int(self.hparams.max_steps), 2), pct_start=0.15
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def attribute_accuracy(model: AttributeEvaluator, batches) -> dict[str, Any]:
    """Accuracy per attribute (and all-correct) over eval batches (dicts with wave, wave_mask, labels)."""
    model.eval()
    correct = torch.zeros(len(model.attributes) + 1)
    count = 0
    for batch in batches:
        wave = batch["wave"] * batch["wave_mask"].to(batch["wave"].dtype)
        device = next(model.parameters()).device
        predicted = model.predict(wave.to(device))["predicted"].cpu()
        hits = (predicted == model.encode_labels(batch["labels"])).float()
        correct += torch.cat([hits.sum(0), hits.prod(1).sum().reshape(1)])
        count += wave.shape[0]
    if count == 0:
        raise ValueError("attribute_accuracy: no clips")
    accuracy = (correct / count).tolist()
    result = {name: accuracy[a] for a, name in enumerate(model.attributes)}
    result["all_correct"] = accuracy[-1]
    result["clips"] = count
    return result
