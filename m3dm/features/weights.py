"""Reading the official backbone checkpoints and loading them strictly (spec §5.3, quirks 15 and 16).

Formats (each reader returns a flat state dict in our module's names):

* Point-MAE `pretrain.pth`: `ckpt['base_model']`; every `module.` removed; keys starting with `MAE_encoder`
  lose `MAE_encoder.`, keys starting with `base_model` lose `base_model.`, others are kept as they are (the
  reference mapping). Decoder keys (`MAE_decoder.*`, `mask_token`, `increase_dim.*`, ...) thus never match
  a backbone name and are ignored by `load_strict`.
* Point-BERT `Point-BERT.pth`: `ckpt['base_model']`; `module.` removed; only `transformer_q.*` (except
  `transformer_q.cls_head*`, prefix stripped) and `base_model.*` (prefix stripped) are kept, so
  `transformer_k.*`, `dvae.*`, `queue` etc. are dropped. `cls_pos` must be present (quirk 16).
* DINO releases: a plain backbone state dict (`dino_vitbase8_pretrain.pth`), or a full training checkpoint
  with `teacher` / `student` entries and `module.` / `backbone.` prefixes (teacher by default); DINO's
  projection `head.*` is dropped.
* timm state dicts: `.safetensors` (Hugging Face `model.safetensors`), `.bin` / `.pth` (optionally wrapped in
  `model` / `state_dict`). The classifier `head.*` and `fc_norm.*` are ignored when our model has none.

Unlike the reference (`strict=False`, silent random weights on a wrong file), `load_strict` raises a
`CheckpointError` naming the file and the missing / wrong-shape keys; checkpoint keys that are not part of
the backbone are ignored. Files are loaded on the CPU (`map_location='cpu'`), with `weights_only=True` first
and a full unpickle only if that is refused (official training checkpoints pickle argparse namespaces).

Weight resolution (`build_rgb_backbone`, `build_point_backbone`): explicit path -> default file under
`checkpoints/` -> offline Hugging Face cache (RGB only, never downloads) -> `CheckpointError` telling which
file to download and where to put it, or, with `random_init=True`, random weights and a loud warning.
"""

from __future__ import annotations

from m3dm.errors import CheckpointError  # noqa: F401 (re-exported)

import pickle
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from m3dm.features.point_transformer import VARIANT_ENCODER_DIMS, PointTransformer
from m3dm.features.vit import DEFAULT_RGB_BACKBONE, RGBBackbone, timm_model_name

CHECKPOINT_DIR = Path("checkpoints")

DINO_VITB8_FILE = "dino_vitbase8_pretrain.pth"
DINO_VITS8_FILE = "dino_deitsmall8_pretrain.pth"
POINT_MAE_FILE = "pointmae_pretrain.pth"
POINT_BERT_FILE = "Point-BERT.pth"

DINO_VITB8_PATH = CHECKPOINT_DIR / DINO_VITB8_FILE
DINO_VITS8_PATH = CHECKPOINT_DIR / DINO_VITS8_FILE
POINT_MAE_PATH = CHECKPOINT_DIR / POINT_MAE_FILE
POINT_BERT_PATH = CHECKPOINT_DIR / POINT_BERT_FILE

DINO_VITB8_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
DINO_VITS8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
POINT_MAE_URL = "https://github.com/Pang-Yatian/Point-MAE/releases/download/main/pretrain.pth"
# "Point-BERT" row of the Pretrained Models table in the Point-BERT README (github.com/lulutang0608/Point-BERT).
POINT_BERT_URL = "https://cloud.tsinghua.edu.cn/f/202b29805eea45d7be92/?dl=1"

# timm name -> (default file name under the checkpoint directory, official download URL).
RGB_DEFAULT_FILES = {
    "vit_base_patch8_224.dino": (DINO_VITB8_FILE, DINO_VITB8_URL),
    "vit_small_patch8_224.dino": (DINO_VITS8_FILE, DINO_VITS8_URL),
}
POINT_DEFAULT_FILES = {
    "Point_MAE": (POINT_MAE_FILE, POINT_MAE_URL),
    "Point_Bert": (POINT_BERT_FILE, POINT_BERT_URL),
}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RGB_OPTIONAL_PREFIXES = ("head.", "fc_norm.")
LISTED_KEYS = 10


# ----------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Any:
    """Load a `.safetensors` / torch file on the CPU; any failure -> `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".npz":
        raise CheckpointError(f"{path}: JAX .npz checkpoints are not supported; use the timm conversion "
                              "(model.safetensors of the corresponding timm/<model> Hugging Face repository)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Refused by the weights-only unpickler (e.g. a pickled argparse.Namespace): official files.
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, bad header, pickle garbage, ...
        raise CheckpointError(f"cannot read checkpoint file {path} (corrupt or truncated?): "
                              f"{type(error).__name__}: {error}") from error


def _state_dict_entry(checkpoint: Any, key: str, path: Path, kind: str) -> dict[str, Any]:
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(key), Mapping):
        found = sorted(checkpoint)[:LISTED_KEYS] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not an official {kind} checkpoint: no {key!r} entry (found {found})")
    return dict(checkpoint[key])


def point_mae_state_dict(path: str | Path) -> dict[str, Any]:
    """Official Point-MAE pretraining checkpoint -> our `PointTransformer` names (reference mapping)."""
    path = Path(path)
    base = _state_dict_entry(read_checkpoint(path), "base_model", path, "Point-MAE")
    mapped = {}
    for key, value in base.items():
        key = key.replace("module.", "")
        for prefix in ("MAE_encoder.", "base_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        mapped[key] = value
    return mapped


def point_bert_state_dict(path: str | Path) -> dict[str, Any]:
    """Official Point-BERT pretraining checkpoint -> our names: `transformer_q.*` without `cls_head*`."""
    path = Path(path)
    base = _state_dict_entry(read_checkpoint(path), "base_model", path, "Point-BERT")
    mapped = {}
    for key, value in base.items():
        key = key.replace("module.", "")
        if key.startswith("transformer_q.") and not key.startswith("transformer_q.cls_head"):
            mapped[key[len("transformer_q."):]] = value
        elif key.startswith("base_model."):
            mapped[key[len("base_model."):]] = value
    return mapped


def _strip_prefix_everywhere(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def rgb_state_dict(path: str | Path, dino_network: str = "teacher") -> dict[str, Any]:
    """DINO release / DINO training checkpoint / timm state dict -> timm ViT names (head keys kept)."""
    path = Path(path)
    state = read_checkpoint(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    if "teacher" in state or "student" in state:
        state = _state_dict_entry(state, dino_network, path, f"DINO ({dino_network})")
    else:
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    state = _strip_prefix_everywhere(state, "module.")
    if any(key.startswith("backbone.") for key in state):  # DINO training checkpoint: backbone + head
        state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    return dict(state)


# ----------------------------------------------------------------------------------------------- loading


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f", ... (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, Any], path: str | Path,
                ignore_prefixes: Iterable[str] = ()) -> list[str]:
    """Copy `state_dict` into `module`; every module key must be present with the right shape.

    Module keys under `ignore_prefixes` may be absent, BatchNorm `num_batches_tracked` counters too.
    Checkpoint keys the module does not have are ignored and returned. Otherwise a `CheckpointError` names
    the file, the counts and the first keys of each kind (missing / wrong shape / unexpected).
    """
    ignore = tuple(ignore_prefixes)
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict and not key.startswith(ignore)
               and not key.endswith("num_batches_tracked")]
    wrong_shape = []
    for key, target in expected.items():
        if key in state_dict:
            value = state_dict[key]
            if not isinstance(value, Tensor):
                wrong_shape.append(f"{key}: file has {type(value).__name__}, model {tuple(target.shape)}")
            elif value.shape != target.shape:
                wrong_shape.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
    unexpected = [key for key in state_dict if key not in expected and not key.startswith(ignore)]
    if missing or wrong_shape:
        lines = [f"checkpoint {path} does not fit {type(module).__name__}"
                 f" ({len(expected)} keys expected):"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_listed(missing)}")
            if len(missing) + len(wrong_shape) == len(expected):
                lines.append("  no backbone key matched: wrong kind of checkpoint for this backbone?")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} keys with the wrong shape (another architecture?): "
                         f"{_listed(wrong_shape)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_listed(unexpected)}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({key: state_dict[key] for key in expected if key in state_dict}, strict=False)
    return unexpected


def load_rgb_weights(vit: nn.Module, path: str | Path, dino_network: str = "teacher") -> list[str]:
    """Load any supported RGB checkpoint into a timm ViT; returns the ignored checkpoint keys."""
    state = rgb_state_dict(path, dino_network)
    model_keys = vit.state_dict().keys()
    optional = tuple(prefix for prefix in RGB_OPTIONAL_PREFIXES
                     if not any(key.startswith(prefix) for key in model_keys))
    return load_strict(vit, state, path, ignore_prefixes=optional)


def load_point_weights(model: PointTransformer, path: str | Path) -> list[str]:
    """Load the official Point-MAE or Point-BERT checkpoint matching `model.variant`."""
    reader = point_mae_state_dict if model.variant == "Point_MAE" else point_bert_state_dict
    return load_strict(model, reader(path), path)


# -------------------------------------------------------------------------------------------- resolution


def _hf_weights_location(timm_name: str) -> tuple[str, tuple[str, ...]] | None:
    """(Hugging Face repository id, candidate weight file names) from timm's pretrained config, or None."""
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(timm_model_name(timm_name))
    except Exception:  # unknown name or tag
        return None
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        return None
    if repo_id.endswith("/"):
        repo_id += f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    filename = getattr(cfg, "hf_hub_filename", None)
    return repo_id, (filename,) if filename else HF_WEIGHT_FILES


def find_hf_cache_file(timm_name: str, cache_dir: str | Path | None = None) -> Path | None:
    """Weights of a timm model already in the Hugging Face cache (offline lookup only), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
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
    """Loud stderr banner: a backbone runs with random weights."""
    bar = "!" * 88
    print(f"\n{bar}\n!!! RANDOM WEIGHTS: {what} is randomly initialised.\n!!! {detail}\n"
          f"!!! Its features are meaningless and no result is comparable to M3DM.\n{bar}\n",
          file=sys.stderr, flush=True)


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
    nothing is found and `random_init` is set. An explicit `path` must exist."""
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
                          "random_init=True to run with RANDOM weights).")


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
                          "explicitly, or random_init=True to run with RANDOM weights).")


def build_rgb_backbone(name: str = DEFAULT_RGB_BACKBONE, path: str | Path | None = None,
                       random_init: bool = False, hf_cache: bool | str | Path = True,
                       checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False,
                       **timm_kwargs: Any) -> RGBBackbone:
    """RGB backbone with weights from `path` -> default file -> HF cache (see `resolve_rgb_checkpoint`)."""
    return RGBBackbone(name, checkpoint=path, random_init=random_init, hf_cache=hf_cache,
                       checkpoint_dir=checkpoint_dir, quiet=quiet, **timm_kwargs)


def build_point_backbone(name: str = "Point_MAE", path: str | Path | None = None, random_init: bool = False,
                         num_group: int = 1024, group_size: int = 128,
                         checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False) -> PointTransformer:
    """Point transformer (training mode, like the reference) with official weights or, if allowed, random."""
    if name not in VARIANT_ENCODER_DIMS:
        raise ValueError(f"unknown point backbone {name!r}; expected one of {sorted(VARIANT_ENCODER_DIMS)}")
    source = resolve_point_checkpoint(name, path, random_init=random_init, checkpoint_dir=checkpoint_dir,
                                      quiet=quiet)
    model = PointTransformer(name, num_group=num_group, group_size=group_size)
    if source is not None:
        load_point_weights(model, source)
    model.checkpoint_path = source
    return model


def default_checkpoint_available(kind: str, name: str, hf_cache: bool | str | Path = True,
                                 checkpoint_dir: str | Path = CHECKPOINT_DIR) -> bool:
    """Whether `build_*_backbone(name)` would find weights without an explicit path (`kind`: "rgb" or
    "xyz"/"point")."""
    try:
        if kind == "rgb":
            return resolve_rgb_checkpoint(name, hf_cache=hf_cache, checkpoint_dir=checkpoint_dir) is not None
        if kind in ("xyz", "point"):
            return resolve_point_checkpoint(name, checkpoint_dir=checkpoint_dir) is not None
    except CheckpointError:
        return False
    raise ValueError(f"unknown backbone kind {kind!r}; expected 'rgb' or 'xyz'")
