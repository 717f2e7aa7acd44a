"""Where a backbone's weight file is found: an explicit path, the default file under ``checkpoints/``, the offline
Hugging Face cache (RGB only, never downloads), else an error naming the file to download and where to put it.

With ``random_init`` a missing default file means random weights, announced by a loud warning (``quiet``
silences it, for benchmarks). Reading and loading the file found is ``m3dm.features.weights``'s part.
"""

from __future__ import annotations

import logging
from pathlib import Path

from timm.models import get_pretrained_cfg

from m3dm.errors import CheckpointError
from m3dm.features.vit import DEFAULT_RGB_BACKBONE, timm_model_name

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path("checkpoints")

DINO_VITB8_FILE = "dino_vitbase8_pretrain.pth"
DINO_VITS8_FILE = "dino_deitsmall8_pretrain.pth"
POINT_MAE_FILE = "pointmae_pretrain.pth"
POINT_BERT_FILE = "Point-BERT.pth"

DINO_VITB8_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
DINO_VITS8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
POINT_MAE_URL = "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth"
# "Point-BERT" row of the Pretrained Models table in the Point-BERT README (github.com/lulutang0608/Point-BERT).
POINT_BERT_URL = "https://cloud.tsinghua.edu.cn/f/202b29805eea45d7be92/?dl=1"
# BTF's RGB backbone: timm's default ImageNet weights of wide_resnet50_2 (racm_in1k), timm's release file
WIDE_RESNET_FILE = "wide_resnet50_racm-8234f177.pth"
WIDE_RESNET_URL = ("https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
                   "wide_resnet50_racm-8234f177.pth")

# timm name -> (default file name under the checkpoint directory, official download URL).
RGB_DEFAULT_FILES = {
    "vit_base_patch8_224.dino": (DINO_VITB8_FILE, DINO_VITB8_URL),
    "vit_small_patch8_224.dino": (DINO_VITS8_FILE, DINO_VITS8_URL),
    "wide_resnet50_2": (WIDE_RESNET_FILE, WIDE_RESNET_URL),
}
POINT_DEFAULT_FILES = {
    "Point_MAE": (POINT_MAE_FILE, POINT_MAE_URL),
    "Point_Bert": (POINT_BERT_FILE, POINT_BERT_URL),
}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hf_weights_location(timm_name: str) -> tuple[str, tuple[str, ...]] | None:
    """(Hugging Face repository id, candidate weight file names) from timm's pretrained config, or None."""
    try:
        cfg = get_pretrained_cfg(timm_model_name(timm_name))
    except Exception:  # unknown name or tag
        return None
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if cfg is None or not repo_id:
        return None
    if repo_id.endswith("/"):
        repo_id += f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    filename = getattr(cfg, "hf_hub_filename", None)
    return repo_id, (filename,) if filename else HF_WEIGHT_FILES


def find_hf_cache_file(timm_name: str, cache_dir: str | Path | None = None) -> Path | None:
    """Weights of a timm model already in the Hugging Face cache (offline lookup only), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: without it, no cache lookup
    except ImportError:
        return None
    location = _hf_weights_location(timm_name)
    if location is None:
        return None
    repo_id, filenames = location
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def warn_random_weights(what: str, detail: str) -> None:
    """A loud warning banner: a backbone runs with random weights."""
    bar = "!" * 88
    log.warning(f"\n{bar}\n!!! RANDOM WEIGHTS: {what} is randomly initialised.\n!!! {detail}\n"
                f"!!! Its features are meaningless and no result is comparable to M3DM.\n{bar}\n")


def default_rgb_file(name: str) -> tuple[str, str | None]:
    """(default file name under the checkpoint directory, download URL or None) for an RGB backbone."""
    timm_name = timm_model_name(name)
    if timm_name in RGB_DEFAULT_FILES:
        return RGB_DEFAULT_FILES[timm_name]
    location = _hf_weights_location(timm_name)
    url = None if location is None else f"https://huggingface.co/{location[0]}/resolve/main/{location[1][0]}"
    suffix = ".bin" if url is not None and url.endswith(".bin") else ".safetensors"
    return f"{timm_name}{suffix}", url


def resolve_rgb_checkpoint(name: str = DEFAULT_RGB_BACKBONE, path: str | Path | None = None,
                           random_init: bool = False, hf_cache: bool | str | Path = True,
                           checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False) -> Path | None:
    """Weights file for an RGB backbone, or None (random weights, announced loudly unless `quiet`) when
    nothing is found and `random_init` is set. An explicit `path` must exist. `hf_cache`: True for the default
    Hugging Face cache, a cache directory, or False to skip it."""
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"RGB checkpoint file {path} does not exist")
        return Path(path)
    file_name, url = default_rgb_file(name)
    default = Path(checkpoint_dir) / file_name
    if default.is_file():
        return default
    timm_name = timm_model_name(name)
    looked = [str(default)]
    if hf_cache is not False:
        cached = find_hf_cache_file(timm_name, None if hf_cache is True else hf_cache)
        if cached is not None:
            return cached
        looked.append(f"the Hugging Face cache (timm model {timm_name})")
    if random_init:
        if not quiet:
            warn_random_weights(f"RGB backbone {name!r}", f"No weights found (looked in: {'; '.join(looked)}).")
        return None
    source = f"Download {url}\n  and save it as {default}" if url else \
        f"No known download for {timm_name!r}: put a timm state dict at {default}"
    raise CheckpointError(f"no weights found for RGB backbone {name!r} (timm {timm_name!r}); looked in: "
                          f"{'; '.join(looked)}.\n  {source}\n  (or pass the file path explicitly, or "
                          "--random_init to run with RANDOM weights).")


def resolve_point_checkpoint(name: str = "Point_MAE", path: str | Path | None = None, random_init: bool = False,
                             checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False) -> Path | None:
    """Weights file for a point backbone, or None (random weights, announced loudly unless `quiet`) when
    nothing is found and `random_init` is set. An explicit `path` must exist."""
    if name not in POINT_DEFAULT_FILES:
        raise ValueError(f"unknown point backbone {name!r}; expected one of {sorted(POINT_DEFAULT_FILES)}")
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(f"point checkpoint file {path} does not exist")
        return Path(path)
    file_name, url = POINT_DEFAULT_FILES[name]
    default = Path(checkpoint_dir) / file_name
    if default.is_file():
        return default
    if random_init:
        if not quiet:
            warn_random_weights(f"point backbone {name!r}", f"No weights found at {default}.")
        return None
    raise CheckpointError(f"no weights found for point backbone {name!r}: {default} does not exist.\n"
                          f"  Download {url}\n  and save it as {default}\n  (or pass the file path "
                          "explicitly, or --random_init to run with RANDOM weights).")
