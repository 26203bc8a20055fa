"""A stand-in for a user's machine: AudioCaps-shaped data and tiny random pretrained weights
in the real directory layouts, so the paper recipe (``ntp_base`` / ``masked_base`` /
``masked_large``) can run end to end without AudioCaps or downloaded checkpoints.

    python -m experiments.rehearsal --root /tmp/rehearsal        # writes the tree, prints the make line

Layout written under ``root`` (what the paper configs point at, relative to the repo)::

    data/audiocaps/csv/{train,val,test}.csv   AudioCaps columns audiocap_id,youtube_id,start_time,caption
                                              (1 caption per train clip, 5 per val/test clip)
    data/audiocaps/audio/<youtube_id>_<start_time>.{wav,flac}   synthetic-corpus sounds as users'
                                              downloads come: 44.1 kHz stereo, 16/22.05/32 kHz mono,
                                              plus a few bad files (corrupt, silent, too short,
                                              one clip never downloaded) the manifest builder reports
    data/audiocaps/manifest.jsonl             built by datamodules.audiocaps.build_audiocaps_manifest
    pretrained/audioldm/{model_index.json, vae/, vocoder/}   diffusers AutoencoderKL + transformers SpeechT5HifiGan
    pretrained/flan-t5-large/                 transformers T5EncoderModel + T5Tokenizer (spiece.model)
    pretrained/clap-htsat-unfused/            transformers ClapModel + ClapProcessor (Roberta BPE tokenizer,
                                              preprocessor_config.json)
    pretrained/eval/vggish-10086976.pth       torchvggish's state dict (FAD)
    pretrained/eval/Cnn14_16k_mAP=0.438.pth   PANNs' {"model": ...} checkpoint with torchlibrosa's front-end keys

The weights are random and tiny (the recipe's *shapes* come from the config: the VAE
always makes 8 × 16 = 128 values per token at 25 tokens/s), or random at the public
checkpoints' sizes with ``pretrained_size="full"`` (``--full-size``); the audio comes from the
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
# (sample rate, channels, format) cycled over the clips: downloads come in every shape
AUDIO_FORMATS = [(44100, 2, "wav"), (16000, 1, "wav"), (22050, 1, "flac"), (32000, 2, "wav")]
BAD_CLIPS = ("corrupt", "silent", "too_short", "not_downloaded")  # appended to the train split


def write_audiocaps_like(
    root: str | Path, clips: dict[str, int], seconds: float = 10.0, seed: int = 0, with_bad_files: bool = True
) -> Path:
    """AudioCaps CSVs + wavs + the manifest built from them by the real builder.

    Args:
        root: ``<root>/data/audiocaps/`` is written.
        clips: good clips per split, e.g. ``{"train": 64, "val": 8, "test": 8}``.
        seconds: clip length (AudioCaps: 10 s).
        with_bad_files: also write :data:`BAD_CLIPS` into train (the builder leaves them out).

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
        bad = BAD_CLIPS if split == "train" and with_bad_files else ()
        for k in range(count + len(bad)):
            youtube_id, start = f"{split[:2]}{k:05d}xYz", str(30 * (k % 3))
            labels = sample_labels("train", 0.5, rng)
            rate, channels, fmt = AUDIO_FORMATS[k % len(AUDIO_FORMATS)]
            wave = synthesize_clip(labels, seconds, rate, rng)
            kind = bad[k - count] if k >= count else None
            path = base / "audio" / f"{youtube_id}_{start}.{fmt}"
            if kind == "corrupt":
                path.write_bytes(b"RIFF\x00\x00garbage, not audio")
            elif kind != "not_downloaded":
                if kind == "silent":
                    wave = np.zeros_like(wave)
                elif kind == "too_short":
                    wave = wave[: rate // 4]
                data = np.stack([wave, 0.8 * wave], axis=1) if channels == 2 else wave
                sf.write(path, data, rate, format=fmt.upper(), subtype="PCM_16")
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


# The public checkpoints' architectures, for ``size="full"`` (random weights of the real size:
# what `make bench ARGS=--random-pretrained` times). AudioLDM's VAE and HiFi-GAN
# (cvssp/audioldm-s-full-v2: vae/ and vocoder/ config.json; the HiFi-GAN is AudioLDM's
# HIFIGAN_16K_64), FLAN-T5-large's encoder, CLAP HTSAT-unfused (transformers' ClapConfig defaults).
AUDIOLDM_VAE_CONFIG = dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=8, norm_num_groups=32)
AUDIOLDM_HIFIGAN_CONFIG = dict(
    model_in_dim=64, sampling_rate=SAMPLE_RATE, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
    upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], normalize_before=False,
)
FLAN_T5_LARGE_CONFIG = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False)
PRETRAINED_SIZES = ("tiny", "full")


def _check_size(size: str) -> None:
    if size not in PRETRAINED_SIZES:
        raise ValueError(f"size must be one of {PRETRAINED_SIZES}, got {size!r}")


def write_audioldm(directory: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """An AudioLDM pipeline folder: ``vae/`` (diffusers AutoencoderKL, 8 latent channels,
    64 mel bins in) and ``vocoder/`` (transformers SpeechT5HifiGan, 64 mels in, hop 160).
    ``size="full"``: AudioLDM's own architectures (:data:`AUDIOLDM_VAE_CONFIG`,
    :data:`AUDIOLDM_HIFIGAN_CONFIG`), random weights."""
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from lightning_modules.parts.vae import build_mel_vae

    _check_size(size)
    directory = Path(directory)
    torch.manual_seed(seed)
    vae = AUDIOLDM_VAE_CONFIG if size == "full" else dict(block_out_channels=(8, 16, 16), layers_per_block=1,
                                                           latent_channels=8, norm_num_groups=4)
    build_mel_vae(**vae).save_pretrained(directory / "vae")
    config = AUDIOLDM_HIFIGAN_CONFIG if size == "full" else dict(
        model_in_dim=64, sampling_rate=SAMPLE_RATE, upsample_initial_channel=16, upsample_rates=[5, 4, 4, 2],
        upsample_kernel_sizes=[10, 8, 8, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    )
    SpeechT5HifiGan(SpeechT5HifiGanConfig(**config)).save_pretrained(directory / "vocoder")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "AudioLDMPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "vocoder": ["transformers", "SpeechT5HifiGan"],
    }, indent=2))
    return directory


def write_t5(directory: str | Path, captions: Sequence[str], seed: int = 0, size: str = "tiny") -> None:
    """FLAN-T5's folder: T5EncoderModel + a T5Tokenizer (spiece.model) trained on ``captions``.
    ``size="full"``: FLAN-T5-large's encoder (:data:`FLAN_T5_LARGE_CONFIG`), random weights."""
    import tempfile

    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from lightning_modules.parts.text_conditioning import train_sentencepiece

    _check_size(size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5Tokenizer(vocab_file=str(train_sentencepiece(list(captions), str(Path(tmp) / "spm"), 200)))
        torch.manual_seed(seed)
        config = T5Config(**FLAN_T5_LARGE_CONFIG) if size == "full" else T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        T5EncoderModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)


def write_clap(directory: str | Path, seed: int = 0, size: str = "tiny") -> None:
    """CLAP's folder as laion/clap-htsat-unfused holds it: ClapModel + ClapProcessor
    (byte-level Roberta BPE tokenizer: vocab.json + merges.txt; preprocessor_config.json).
    ``size="full"``: the HTSAT-unfused architecture (transformers' ``ClapConfig`` defaults,
    Roberta's 50265-token embedding), random weights."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer
    from transformers.models.clap.configuration_clap import ClapAudioConfig, ClapTextConfig

    _check_size(size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = [chr(c) for c in range(33, 127)] + ["Ġ"]  # printable bytes and the space marker: byte-level BPE, no merges
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *byte_chars])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    processor = ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tokenizer)
    torch.manual_seed(seed)
    if size == "full":
        config = ClapConfig()
    else:
        text = ClapTextConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, max_position_embeddings=128, projection_dim=8)
        audio = ClapAudioConfig(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], patch_embeds_hidden_size=8,
                                hidden_size=64, projection_dim=8, window_size=8)
        config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8)
    ClapModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)


def write_tiny_eval_weights(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """VGGish and PANNs CNN14 weight files in the official layouts (full size: the loaders
    check every key and shape), randomly initialised."""
    import torch

    from lightning_modules.parts import audio_classifiers as ac

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vggish, panns = directory / ac.VGGISH_FILE, directory / ac.PANNS_FILE
    torch.save(ac.VGGish().state_dict(), vggish)
    torch.save({"model": ac.panns_official_state_dict(ac.Cnn14())}, panns)
    return {"eval.vggish_path": str(vggish), "eval.panns_path": str(panns)}


def write_pretrained(directory: str | Path, captions: Sequence[str], seed: int = 0, size: str = "tiny") -> dict[str, str]:
    """``audioldm/``, ``flan-t5-large/`` and ``clap-htsat-unfused/`` under ``directory`` (random
    weights, ``size`` "tiny" or "full"); returns their paths by config key."""
    directory = Path(directory)
    write_audioldm(directory / "audioldm", seed=seed, size=size)
    write_t5(directory / "flan-t5-large", captions, seed=seed, size=size)
    write_clap(directory / "clap-htsat-unfused", seed=seed, size=size)
    return {
        "vae.pretrained_dir": str(directory / "audioldm"),
        "vocoder.pretrained_dir": str(directory / "audioldm"),
        "text.t5_dir": str(directory / "flan-t5-large"),
        "text.clap_dir": str(directory / "clap-htsat-unfused"),
        "eval.clap_dir": str(directory / "clap-htsat-unfused"),
    }


def write_rehearsal(
    root: str | Path, clips: dict[str, int] | None = None, seconds: float = 10.0, seed: int = 0, eval_weights: bool = False,
    pretrained_size: str = "tiny",
) -> dict[str, str]:
    """Everything the paper configs read, under ``root``; returns the paths by config key.

    ``eval_weights``: also the full-size VGGish and CNN14 files (≈600 MB of random weights;
    only `make eval` reads them). ``pretrained_size``: "full" writes the VAE, HiFi-GAN,
    FLAN-T5 and CLAP at the public checkpoints' sizes (≈2.5 GB), e.g. to time them."""
    root = Path(root)
    manifest = write_audiocaps_like(root, clips or {"train": 64, "val": 8, "test": 8}, seconds=seconds, seed=seed)
    pretrained = root / "pretrained"
    return {
        "data.manifests": str(manifest),
        **write_pretrained(pretrained, _captions_of(manifest), seed=seed, size=pretrained_size),
        **(write_tiny_eval_weights(pretrained / "eval", seed=seed) if eval_weights else {}),
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
        f"eval.clap_dir={paths['eval.clap_dir']}",
        *[f"{key}={paths[key]}" for key in ("eval.vggish_path", "eval.panns_path") if key in paths],
        f"run.root={root / 'runs'}",
        f"run.data_root={root / 'data'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder to write the rehearsal tree into")
    parser.add_argument("--train", type=int, default=64, help="training clips (default 64)")
    parser.add_argument("--eval", type=int, default=8, help="val and test clips each (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10, as AudioCaps)")
    parser.add_argument("--eval-weights", action="store_true", help="also random VGGish + CNN14 files (≈600 MB) for make eval")
    parser.add_argument("--full-size", action="store_true",
                        help="VAE, HiFi-GAN, FLAN-T5-large and CLAP at the public checkpoints' sizes (≈2.5 GB) instead of tiny")
    args = parser.parse_args(argv)
    paths = write_rehearsal(args.root, {"train": args.train, "val": args.eval, "test": args.eval}, seconds=args.seconds,
                            eval_weights=args.eval_weights, pretrained_size="full" if args.full_size else "tiny")
    overrides = " ".join(f"'{o}'" if " " in o else o for o in rehearsal_overrides(args.root, paths))
    print(f"rehearsal tree written to {args.root}\n  make train EXP=masked_base ARGS=\"{overrides}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
