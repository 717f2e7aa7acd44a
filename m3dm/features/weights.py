"""Every weight file of the project read by one reader and loaded by one strict loader, and the backbone builders.

Formats (docs/original.md, "Point backbone"; quirks 15, 16 and 24); each is turned into a flat state dict in our
module's names:

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
* `fusion_pretrain.py` checkpoints (the UFF block, and `--resume`): `{'model', 'optimizer', 'epoch', 'scaler',
  'args'}`, of which only the `model` state dict is required; the reference's files pickle `args` as an
  argparse namespace, ours store a plain dict with `rgb_dim`.

Unlike the reference (`strict=False`, silent random weights on a wrong file), `load_strict` raises a
`CheckpointError` naming the file and the missing / wrong-shape keys (and, where the checkpoint must hold
nothing else, as for the UFF block, the unexpected ones). Files are loaded on the CPU by torch's weights-only
unpickler, which builds tensors and plain values only, with exactly the few other objects the official files
hold allowed (`OFFICIAL_CHECKPOINT_GLOBALS`); a file that pickles anything else could run code when loaded and
is refused, naming the file and the object. Nothing is downloaded at run time: a URL is refused.

The architectures (`RGBBackbone`, `PointTransformer`) never read files: `build_rgb_backbone` and
`build_point_backbone` find the file (`m3dm.features.weight_files`), create the module, load it strictly and
record the file in the module's `checkpoint_path` (None for random weights).
"""

from __future__ import annotations

import argparse
import importlib
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m3dm.errors import CheckpointError
from m3dm.features.point_transformer import VARIANT_ENCODER_DIMS, PointTransformer
from m3dm.features.resnet import WIDE_RESNET, WideResNetFeatures
from m3dm.features.vit import DEFAULT_RGB_BACKBONE, RGBBackbone
from m3dm.features.weight_files import CHECKPOINT_DIR, resolve_point_checkpoint, resolve_rgb_checkpoint

RGB_OPTIONAL_PREFIXES = ("head.", "fc_norm.")
LISTED_KEYS = 10


# ----------------------------------------------------------------------------------------------- reading


def _numpy_scalar_reconstructor() -> Callable:
    try:
        return importlib.import_module("numpy._core.multiarray").scalar  # NumPy 2
    except ImportError:  # NumPy 1
        return importlib.import_module("numpy.core.multiarray").scalar


_SCALAR = _numpy_scalar_reconstructor()

# The objects other than tensors and plain values (numbers, strings, lists, tuples, dicts) that the official
# checkpoints pickle, and nothing more:
# * `args`, an argparse.Namespace of numbers and strings: fusion_pretrain.py's checkpoints (the UFF block, saved by
#   MAE's `misc.save_model`) and DINO's training checkpoints;
# * Point-BERT's `metrics` / `best_metrics`, whose `acc` is the SVM accuracy as a NumPy float64: a float64 dtype
#   and the scalar built from it (the module is `numpy.core` in files pickled by NumPy 1, `numpy._core` by NumPy 2).
# DINO's released backbone, Point-MAE's `pretrain.pth` (its `metrics` hold a plain 0.0) and timm files hold tensors
# and plain values only.
OFFICIAL_CHECKPOINT_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    type(np.dtype(np.float64)),
    (_SCALAR, "numpy.core.multiarray.scalar"),
    (_SCALAR, "numpy._core.multiarray.scalar"),
]


def read_checkpoint(path: str | Path, kind: str = "checkpoint", missing_hint: str = "") -> Any:
    """Load a `.safetensors` / torch file on the CPU; any failure -> `CheckpointError` naming the file.

    `kind` names the file in the messages (e.g. "UFF checkpoint"), `missing_hint` says how to get a missing one.
    A torch file that pickles any object beyond `OFFICIAL_CHECKPOINT_GLOBALS` is refused (it could run code).
    """
    if str(path).startswith(("http://", "https://")):  # the reference downloads; this project never does
        raise CheckpointError(f"{kind} {path}: nothing is downloaded at run time; download the file yourself and "
                              f"pass its local path")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file {path} does not exist" + (f". {missing_hint}" if missing_hint else ""))
    if path.suffix == ".npz":
        raise CheckpointError(f"{path}: JAX .npz checkpoints are not supported; use the timm conversion "
                              "(model.safetensors of the corresponding timm/<model> Hugging Face repository)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(OFFICIAL_CHECKPOINT_GLOBALS), warnings.catch_warnings():
            # torch warns on stderr about pickle protocols above 2 before it refuses or reads the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad header, pickle garbage, a refused object
        refused = refused_object(error, path) if isinstance(error, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(f"{kind} file {path} is refused: it pickles {refused}, which is not a tensor or a "
                                  f"plain value and could run code when loaded") from error
        raise CheckpointError(f"cannot read {kind} file {path} (corrupt or truncated?): "
                              f"{type(error).__name__}: {_essential_line(error)}") from error


# What torch's weights-only unpickler says when it refuses an object, with the object's name in group 1.
_REFUSAL_PATTERNS = (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+) whose module",
                     r"but got <class '([^']+)'>")


def refused_object(error: pickle.UnpicklingError, path: str | Path) -> str | None:
    """The object that torch's weights-only unpickler refused to load from `path` (e.g. "posix.system"), from its
    message or, where that names none (a pickle protocol the unpickler does not read), from the globals the file's
    pickles name; None when neither names one (a damaged file)."""
    for pattern in _REFUSAL_PATTERNS:
        found = re.search(pattern, str(error))
        if found:
            return found.group(1)
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
               for g in OFFICIAL_CHECKPOINT_GLOBALS}
    names = [name for name in _pickled_globals(Path(path)) if name not in allowed
             and not name.startswith(("torch.", "collections.OrderedDict", "_codecs."))]
    return ", ".join(dict.fromkeys(names)) or None


def _essential_line(error: Exception) -> str:
    """The line of an error's message that says what went wrong (torch's loaders add paragraphs of advice)."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("Check the documentation")]
    return lines[-1] if lines else ""


def _pickled_globals(path: Path) -> list[str]:
    """The `module.name` of every global a torch file's pickles refer to, read without unpickling anything (in a
    damaged file, those before the damage)."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:  # the legacy format and plain pickle files: pickles one after the other (then raw storage bytes)
            data = path.read_bytes()
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            _add_globals_of_one_pickle(stream, names)
    except Exception:  # damaged or not a pickle: the names read so far are all there is
        pass
    return names


def _add_globals_of_one_pickle(stream: io.BytesIO, names: list[str]) -> None:
    strings: list[str] = []  # the strings pushed so far: STACK_GLOBAL takes its module and name from the last two
    memo: dict[int, str] = {}  # memo index -> the string stored there
    memo_size, top = 0, None  # top: the string the previous instruction pushed, if it pushed one
    for opcode, raw_argument, _ in pickletools.genops(stream):
        argument: Any = raw_argument  # its type depends on the opcode
        pushed = None
        if opcode.name == "GLOBAL":
            names.append(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(argument, str) and "UNICODE" in opcode.name:
            pushed = argument
        elif opcode.name in ("BINGET", "LONG_BINGET"):
            pushed = memo.get(argument)
        elif opcode.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            index = memo_size if opcode.name == "MEMOIZE" else argument
            memo_size = max(memo_size, index + 1)
            if top is not None:
                memo[index] = top
            continue  # the stack is unchanged: `top` still holds
        if pushed is not None:
            strings.append(pushed)
        top = pushed


def _state_dict_entry(checkpoint: Any, key: str, path: Path, kind: str) -> dict[str, Any]:
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(key), Mapping):
        found = sorted(checkpoint)[:LISTED_KEYS] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a checkpoint of the {kind} format: no {key!r} state dict "
                              f"(found {found})")
    return dict(checkpoint[key])


def _renamed_base_model(path: str | Path, kind: str, rename: Callable[[str], str | None]) -> dict[str, Any]:
    """`ckpt['base_model']` of an official point checkpoint, `module.` removed, keys renamed (None: dropped)."""
    path = Path(path)
    base = _state_dict_entry(read_checkpoint(path), "base_model", path, f"official {kind}")
    mapped = {}
    for key, value in base.items():
        name = rename(key.replace("module.", ""))
        if name is not None:
            mapped[name] = value
    return mapped


def _point_mae_name(key: str) -> str:
    for prefix in ("MAE_encoder.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _point_bert_name(key: str) -> str | None:
    if key.startswith("transformer_q.") and not key.startswith("transformer_q.cls_head"):
        return key[len("transformer_q."):]
    if key.startswith("base_model."):
        return key[len("base_model."):]
    return None


def point_mae_state_dict(path: str | Path) -> dict[str, Any]:
    """Official Point-MAE pretraining checkpoint -> our `PointTransformer` names (reference mapping)."""
    return _renamed_base_model(path, "Point-MAE", _point_mae_name)


def point_bert_state_dict(path: str | Path) -> dict[str, Any]:
    """Official Point-BERT pretraining checkpoint -> our names: `transformer_q.*` without `cls_head*`."""
    return _renamed_base_model(path, "Point-BERT", _point_bert_name)


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


def read_uff_checkpoint(path: str | Path, kind: str = "UFF checkpoint", missing_hint: str = "") -> dict[str, Any]:
    """A `fusion_pretrain.py` checkpoint as a dict whose `model` entry is a state dict (the other entries as
    stored); an unreadable file or one without `model` is a `CheckpointError` naming it."""
    checkpoint = read_checkpoint(path, kind, missing_hint)
    _state_dict_entry(checkpoint, "model", Path(path), f"fusion_pretrain.py ({kind})")
    return dict(checkpoint)


def uff_checkpoint_rgb_dim(checkpoint: Mapping[str, Any]) -> int | None:
    """The RGB width a UFF checkpoint was trained for: `args['rgb_dim']` (ours) or the RGB LayerNorm's size."""
    args = checkpoint.get("args")
    width = args.get("rgb_dim") if isinstance(args, Mapping) else getattr(args, "rgb_dim", None)
    if width is None and "rgb_norm.weight" in checkpoint["model"]:
        width = checkpoint["model"]["rgb_norm.weight"].shape[0]
    return None if width is None else int(width)


# ----------------------------------------------------------------------------------------------- loading


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f", ... (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, Any], path: str | Path,
                ignore_prefixes: Iterable[str] = (), *, allow_unexpected: bool = True,
                description: str | None = None) -> list[str]:
    """Copy `state_dict` into `module`; every module key must be present with the right shape.

    Module keys under `ignore_prefixes` may be absent, BatchNorm `num_batches_tracked` counters too.
    Checkpoint keys the module does not have are returned, or, without `allow_unexpected`, an error.
    Otherwise a `CheckpointError` names the file, what it should hold (`description`, default the module's
    class), the counts and the first keys of each kind (missing / wrong shape / unexpected).
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
    if missing or wrong_shape or (unexpected and not allow_unexpected):
        lines = [f"checkpoint {path} does not fit {description or type(module).__name__}"
                 f" ({len(expected)} keys expected):"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_listed(missing)}")
            if len(missing) + len(wrong_shape) == len(expected):
                lines.append("  no key of the model matched: wrong kind of checkpoint for this model?")
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


# --------------------------------------------------------------------------------------------- building


def build_rgb_backbone(name: str = DEFAULT_RGB_BACKBONE, path: str | Path | None = None,
                       random_init: bool = False, hf_cache: bool | str | Path = True,
                       checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False,
                       **timm_kwargs: Any) -> RGBBackbone:
    """RGB backbone with weights from `path` -> default file -> HF cache (see `resolve_rgb_checkpoint`), or
    random ones with `random_init`; extra keyword arguments go to `timm.create_model` (e.g. `depth=2`)."""
    source = resolve_rgb_checkpoint(name, path, random_init=random_init, hf_cache=hf_cache,
                                    checkpoint_dir=checkpoint_dir, quiet=quiet)
    backbone = RGBBackbone(name, **timm_kwargs)
    if source is not None:
        load_rgb_weights(backbone.vit, source)
    backbone.checkpoint_path = source
    return backbone


def build_wide_resnet(path: str | Path | None = None, random_init: bool = False, hf_cache: bool | str | Path = True,
                      checkpoint_dir: str | Path = CHECKPOINT_DIR, quiet: bool = False, grid: int = 28,
                      aligned: bool = False) -> WideResNetFeatures:
    """BTF's wide-ResNet-50-2 (layers 2+3) with weights from `path` -> `checkpoints/wide_resnet50_racm-8234f177.pth`
    -> the offline HF cache, or random ones with `random_init`. A timm or torchvision ResNet state dict (same key
    names) loads; layer4 and fc, which the features do not use, are ignored."""
    source = resolve_rgb_checkpoint(WIDE_RESNET, path, random_init=random_init, hf_cache=hf_cache,
                                    checkpoint_dir=checkpoint_dir, quiet=quiet)
    model = WideResNetFeatures(grid=grid, aligned=aligned)
    if source is not None:
        load_strict(model.body, rgb_state_dict(source), source, description="wide_resnet50_2 (timm / torchvision)")
    model.checkpoint_path = source
    return model


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
