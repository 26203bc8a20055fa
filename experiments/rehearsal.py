"""A stand-in for a user's machine: AudioCaps-shaped data and tiny random pretrained weights
in the real directory layouts, so the paper recipe (``ntp_base`` / ``masked_base`` /
``masked_large``) can run end to end without AudioCaps or downloaded checkpoints.

    python -m experiments.rehearsal --root /tmp/rehearsal        # writes the tree, prints the make line

Layout written under ``root`` (what the paper configs point at, relative to the repo)::

    data/audiocaps/csv/{train,val,test}.csv   AudioCaps columns audiocap_id,youtube_id,start_time,caption
                                              (1 caption per train clip, 5 per val/test clip)
    data/audiocaps/audio/<youtube_id>_<start_time>.wav   16 kHz mono clips (synthetic-corpus sounds)
    data/audiocaps/manifest.jsonl             built by datamodules.audiocaps.build_audiocaps_manifest
    pretrained/audioldm/{model_index.json, vae/, vocoder/}   diffusers AutoencoderKL + transformers SpeechT5HifiGan
    pretrained/flan-t5-large/                 transformers T5EncoderModel + T5Tokenizer files
    pretrained/clap-htsat-unfused/            transformers ClapModel + tokenizer files

The weights are random and tiny (the recipe's *shapes* come from the config: the VAE
always makes 8 × 16 = 128 values per token at 25 tokens/s); the audio comes from the
synthetic corpus' generator with AudioCaps-style captions. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

AUDIOCAPS_SPLIT_CAPTIONS = {"train": 1, "val": 5, "test": 5}
SAMPLE_RATE = 16000


def write_audiocaps_like(
    root: str | Path, clips: dict[str, int], seconds: float = 10.0, seed: int = 0
) -> Path:
    """AudioCaps CSVs + wavs + the manifest built from them by the real builder.

    Args:
        root: ``<root>/data/audiocaps/`` is written.
        clips: clips per split, e.g. ``{"train": 64, "val": 8, "test": 8}``.
        seconds: clip length (AudioCaps: 10 s).

    Returns:
        the manifest path.
    """
    import soundfile as sf

    from datamodules.audiocaps import build_audiocaps_manifest
    from datamodules.synthetic import make_captions, sample_labels, synthesize_clip

    base = Path(root) / "data" / "audiocaps"
    (base / "csv").mkdir(parents=True, exist_ok=True)
    (base / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    audiocap_id = 0
    for split, count in clips.items():
        rows = []
        for k in range(count):
            youtube_id, start = f"{split[:2]}{k:05d}xYz", str(30 * (k % 3))
            labels = sample_labels("train", 0.5, rng)
            wave = synthesize_clip(labels, seconds, SAMPLE_RATE, rng)
            sf.write(base / "audio" / f"{youtube_id}_{start}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
            for caption in make_captions(labels, AUDIOCAPS_SPLIT_CAPTIONS.get(split, 1), rng):
                audiocap_id += 1
                rows.append([audiocap_id, youtube_id, start, caption])
        with open(base / "csv" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writerows(rows)
    manifest = base / "manifest.jsonl"
    build_audiocaps_manifest(base / "csv", base / "audio", manifest, splits=tuple(clips))
    return manifest


def _captions_of(manifest: Path) -> list[str]:
    return [c for line in manifest.read_text().splitlines() if line for c in json.loads(line)["captions"]]


def write_tiny_audioldm(directory: str | Path, seed: int = 0) -> Path:
    """An AudioLDM pipeline folder: ``vae/`` (diffusers AutoencoderKL, 8 latent channels,
    64 mel bins in) and ``vocoder/`` (transformers SpeechT5HifiGan, 64 mels in, hop 160)."""
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from lightning_modules.parts.vae import build_mel_vae

    directory = Path(directory)
    torch.manual_seed(seed)
    build_mel_vae(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4).save_pretrained(
        directory / "vae"
    )
    config = SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=SAMPLE_RATE, upsample_initial_channel=16, upsample_rates=[5, 4, 4, 2],
        upsample_kernel_sizes=[10, 8, 8, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    )
    SpeechT5HifiGan(config).save_pretrained(directory / "vocoder")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "AudioLDMPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "vocoder": ["transformers", "SpeechT5HifiGan"],
    }, indent=2))
    return directory


def write_tiny_text_encoders(t5_dir: str | Path, clap_dir: str | Path, captions: Sequence[str], seed: int = 0) -> None:
    """FLAN-T5 (T5EncoderModel) and CLAP (ClapModel) folders with a sentencepiece tokenizer
    trained on ``captions`` (T5Tokenizer, saved beside both as the hub folders hold theirs)."""
    import tempfile

    import torch
    from transformers import ClapConfig, ClapModel, T5Config, T5EncoderModel, T5Tokenizer

    from lightning_modules.parts.text_conditioning import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_sentencepiece(list(captions), str(Path(tmp) / "spm"), 200)
        tokenizer = T5Tokenizer(vocab_file=str(sp_model))
        vocab = len(tokenizer)
        torch.manual_seed(seed)
        T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(t5_dir)
        tokenizer.save_pretrained(t5_dir)
        text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=37, max_position_embeddings=90, projection_dim=16)
        audio = dict(hidden_size=16, depths=[1, 1], num_attention_heads=[1, 1], window_size=4,
                     patch_embeds_hidden_size=16, projection_dim=16, spec_size=64, num_mel_bins=16,
                     patch_stride=(4, 4), patch_size=4)
        ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(clap_dir)
        tokenizer.save_pretrained(clap_dir)


def write_rehearsal(root: str | Path, clips: dict[str, int] | None = None, seconds: float = 10.0, seed: int = 0) -> dict[str, str]:
    """Everything the paper configs read, under ``root``; returns the paths by config key."""
    root = Path(root)
    manifest = write_audiocaps_like(root, clips or {"train": 64, "val": 8, "test": 8}, seconds=seconds, seed=seed)
    pretrained = root / "pretrained"
    write_tiny_audioldm(pretrained / "audioldm", seed=seed)
    write_tiny_text_encoders(pretrained / "flan-t5-large", pretrained / "clap-htsat-unfused", _captions_of(manifest), seed=seed)
    return {
        "data.manifests": str(manifest),
        "vae.pretrained_dir": str(pretrained / "audioldm"),
        "vocoder.pretrained_dir": str(pretrained / "audioldm"),
        "text.t5_dir": str(pretrained / "flan-t5-large"),
        "text.clap_dir": str(pretrained / "clap-htsat-unfused"),
    }


def rehearsal_overrides(root: str | Path, paths: dict[str, str]) -> list[str]:
    """Command-line overrides that point a paper config at a rehearsal tree."""
    root = Path(root)
    return [
        f"data.manifests=[{{path: {paths['data.manifests']}, weight: 1.0}}]",
        f"vae.pretrained_dir={paths['vae.pretrained_dir']}",
        f"vocoder.pretrained_dir={paths['vocoder.pretrained_dir']}",
        f"text.t5_dir={paths['text.t5_dir']}",
        f"text.clap_dir={paths['text.clap_dir']}",
        f"run.root={root / 'runs'}",
        f"run.data_root={root / 'data'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder to write the rehearsal tree into")
    parser.add_argument("--train", type=int, default=64, help="training clips (default 64)")
    parser.add_argument("--eval", type=int, default=8, help="val and test clips each (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10, as AudioCaps)")
    args = parser.parse_args(argv)
    paths = write_rehearsal(args.root, {"train": args.train, "val": args.eval, "test": args.eval}, seconds=args.seconds)
    overrides = " ".join(f"'{o}'" if " " in o else o for o in rehearsal_overrides(args.root, paths))
    print(f"rehearsal tree written to {args.root}\n  make train EXP=masked_base ARGS=\"{overrides}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
