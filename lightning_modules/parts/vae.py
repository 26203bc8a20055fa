"""The mel-VAE: a diffusers ``AutoencoderKL`` over log-mel "images".

Input layout follows AudioLDM: ``(B, 1, T_frames, n_mels)``. Three down blocks
(``ch_mult [1, 2, 4]``) downsample twice, so 4x in time and frequency:
``(B, 1, 1024, 64) -> latent (B, 8, 256, 16)``.

Two constructors:
- :func:`build_mel_vae` — from scratch (tiny defaults for the CPU demo; AudioLDM's sizes
  are in :data:`AUDIOLDM_VAE_CONFIG`);
- :func:`load_mel_vae` — from a local diffusers-format directory (the directory itself,
  or an AudioLDM pipeline layout with a ``vae/`` subfolder), with strict key checking.

Latent normalisation statistics are not stored in the diffusers config; they live next
to the VAE, in the pretransform (``lightning_modules/parts/pretransform.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import AutoencoderKL

# AudioLDM(-S/-L) KL autoencoder as published in diffusers format (vae/config.json).
AUDIOLDM_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512),
    layers_per_block=2,
    latent_channels=8,
    norm_num_groups=32,
)

# Small default for the CPU demo; same downsampling (4x) and latent size as AudioLDM.
DEMO_VAE_CONFIG = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=32,
)

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def build_mel_vae(
    block_out_channels: tuple[int, ...] = DEMO_VAE_CONFIG["block_out_channels"],
    layers_per_block: int = DEMO_VAE_CONFIG["layers_per_block"],
    latent_channels: int = DEMO_VAE_CONFIG["latent_channels"],
    norm_num_groups: int = DEMO_VAE_CONFIG["norm_num_groups"],
    mid_block_add_attention: bool = True,
) -> AutoencoderKL:
    """A randomly initialised mono-channel ``AutoencoderKL``.

    ``len(block_out_channels)`` blocks give ``2 ** (len - 1)`` downsampling in time and
    frequency; use 3 blocks for the 4x the token contract assumes. Every entry of
    ``block_out_channels`` must be divisible by ``norm_num_groups``.
    """
    block_out_channels = tuple(int(c) for c in block_out_channels)
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {block_out_channels}: {bad} not divisible by norm_num_groups={norm_num_groups}")
    n_blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_block_add_attention,
    )


def vae_downsampling_factor(vae: AutoencoderKL) -> int:
    """Downsampling in each of time and frequency: ``2 ** (n_blocks - 1)``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_component_dir(directory: str | Path, subfolder: str, config_name: str = "config.json") -> Path:
    """``directory`` if it holds ``config_name``, else ``directory/subfolder`` if that does.

    Raises:
        FileNotFoundError: naming the paths looked at.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{subfolder} directory not found: {directory}")
    for candidate in (directory, directory / subfolder):
        if (candidate / config_name).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {config_name} in {directory} or {directory / subfolder}: expected a diffusers/transformers-format "
        f"{subfolder} directory (config.json + weights), e.g. the '{subfolder}/' folder of an AudioLDM pipeline"
    )


def raise_on_key_mismatch(info: dict, what: str, directory: Path) -> None:
    """Fail loudly on missing / unexpected / mismatched keys from ``output_loading_info``."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or []))
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} total)" if len(keys) > 20 else "")
            problems.append(f"{kind}: {shown}")
    errors = info.get("error_msgs") or []
    if errors:
        problems.append("errors: " + "; ".join(str(e) for e in errors))
    if problems:
        raise RuntimeError(f"{what} weights in {directory} do not match the model config:\n  " + "\n  ".join(problems))


def load_pretrained_strict(model_cls, directory: str | Path, subfolder: str, weight_files: tuple[str, ...],
                           what: str, logger_name: str):
    """``model_cls.from_pretrained`` from a local folder (or its ``subfolder``), refusing
    missing weight files and any missing, unexpected or mismatched key.

    Returns ``(model, folder)``. Raises ``FileNotFoundError`` / ``RuntimeError`` naming the folder.
    """
    folder = resolve_component_dir(directory, subfolder)
    if not any((folder / name).is_file() for name in weight_files):
        raise FileNotFoundError(f"no {what} weight file ({' or '.join(weight_files)}) in {folder}")
    library_logger = logging.getLogger(logger_name)
    previous_level = library_logger.level
    library_logger.setLevel(logging.ERROR)  # we raise on key problems ourselves
    try:
        model, info = model_cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise RuntimeError(f"could not load the {what} from {folder}: {error}") from error
    finally:
        library_logger.setLevel(previous_level)
    raise_on_key_mismatch(info, what, folder)
    return model, folder


def load_mel_vae(directory: str | Path) -> AutoencoderKL:
    """Load a diffusers-format ``AutoencoderKL`` from a local directory, strictly.

    Args:
        directory: a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
            (or ``.bin``), or a pipeline folder holding them under ``vae/``.
    Raises:
        FileNotFoundError: directory / config.json / weight file absent.
        RuntimeError: missing, unexpected or shape-mismatched keys.
    """
    vae, vae_dir = load_pretrained_strict(AutoencoderKL, directory, "vae", _WEIGHT_FILES, "VAE", "diffusers")
    if vae.config.in_channels != 1 or vae.config.out_channels != 1:
        raise ValueError(
            f"{vae_dir / 'config.json'}: a mel-VAE needs in_channels=out_channels=1, "
            f"got {vae.config.in_channels}/{vae.config.out_channels}"
        )
    return vae.eval()
