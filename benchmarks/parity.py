"""Record every method's per-sample image scores and 224x224 maps, and compare two recordings bit for bit.

    python benchmarks/parity.py --label before                    # record (data and weights made once)
    python benchmarks/parity.py --label after --compare before    # record again and compare

A refactor must keep every number: this runs ``main.py`` (a subprocess per run, so it works whatever the package
layout) on one fixed synthetic dataset with fixed random weights in the official file formats (a timm ViT state
dict, Point-MAE's ``base_model``/``MAE_encoder.*`` layout, a ``fusion_pretrain.py`` UFF checkpoint, a
torchvision wide-ResNet-50-2 for BTF), for M3DM's six methods, the three BTF methods and CFM, one ``--fix_quirks``
run and the options that pick other code paths (``--rm_zero_for_project``, ``--asy_memory_bank``,
``--coreset_shards``, ``--bank_storage memory``). The dataset and the weight files are
written once under ``--work`` and reused by every later recording, so two recordings differ only by the code.
Each run writes ``--save_maps`` files; ``--compare`` reports, per run, whether scores and maps are bit-identical
and otherwise the largest differences. Exit status 1 when a comparison finds a difference.

Outputs live under ``results/`` (git-ignored). ``--preset medium`` uses a larger configuration (ViT-B/16 at 224 px,
256 groups of 64 points, 128 px scenes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("gadget", "widget")
PRESETS = {
    "small": {"rgb": "vit_tiny_patch16_224", "rgb_dim": 192, "num_group": 64, "group_size": 32, "size": 96,
              "n_train": 6},
    "medium": {"rgb": "vit_base_patch16_224", "rgb_dim": 768, "num_group": 256, "group_size": 64,
               "size": 128, "n_train": 8},
}
UFF = ["--use_uff"]
RUNS = {
    "DINO": ["--method_name", "DINO", "--memory_bank", "single"],
    "Point_MAE": ["--method_name", "Point_MAE", "--memory_bank", "single"],
    "Fusion": ["--method_name", "Fusion", "--memory_bank", "single", *UFF],
    "DINO+Point_MAE": ["--method_name", "DINO+Point_MAE", "--memory_bank", "multiple"],
    "DINO+Point_MAE+add": ["--method_name", "DINO+Point_MAE+add", "--memory_bank", "single"],
    "DINO+Point_MAE+Fusion": ["--method_name", "DINO+Point_MAE+Fusion", "--memory_bank", "multiple", *UFF],
    "DINO+Point_MAE+Fusion--fix_quirks": ["--method_name", "DINO+Point_MAE+Fusion", "--memory_bank", "multiple",
                                          *UFF, "--fix_quirks"],
    "Point_MAE--rm_zero_for_project": ["--method_name", "Point_MAE", "--memory_bank", "single",
                                       "--rm_zero_for_project"],
    "DINO+Point_MAE+Fusion--asy_memory_bank": ["--method_name", "DINO+Point_MAE+Fusion", "--memory_bank",
                                               "multiple", *UFF, "--asy_memory_bank", "3"],
    "DINO+Point_MAE--coreset_shards": ["--method_name", "DINO+Point_MAE", "--memory_bank", "multiple",
                                       "--coreset_shards", "3", "--bank_storage", "memory"],
    "BTF_RGB": ["--method_name", "BTF_RGB", "--memory_bank", "single"],
    "BTF_FPFH": ["--method_name", "BTF_FPFH", "--memory_bank", "single"],
    "BTF_RGB+FPFH": ["--method_name", "BTF_RGB+FPFH", "--memory_bank", "single"],
    "CFM": ["--method_name", "CFM", "--cfm_epochs", "2", "--cfm_batch_size", "2"],
}


def make_dataset(folder: Path, preset: dict) -> Path:
    """Raw synthetic MVTec 3D-AD, preprocessed by ``utils/preprocessing.py`` (written once)."""
    prepared = folder / "mvtec3d_preprocessed"
    if prepared.is_dir():
        return prepared
    raw = folder / "mvtec3d"
    subprocess.run([sys.executable, "-m", "m3dm.data.synthetic", str(raw), "--size", str(preset["size"]),
                    "--classes", *CLASSES, "--train", str(preset["n_train"]), "--validation", "1", "--test_good", "2",
                    "--test_defect", "1", "--seed", "7"],
                   check=True, cwd=ROOT)
    subprocess.run([sys.executable, "utils/preprocessing.py", str(raw), "--output_root", str(prepared),
                    "--workers", "2"], check=True, cwd=ROOT)
    return prepared


def _linear(generator: torch.Generator, out_dim: int, in_dim: int, prefix: str) -> dict:
    return {f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=generator) * in_dim ** -0.5,
            f"{prefix}.bias": torch.randn(out_dim, generator=generator) * 0.02}


def _norm(generator: torch.Generator, dim: int, prefix: str) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=generator),
            f"{prefix}.bias": 0.1 * torch.randn(dim, generator=generator)}


def uff_state(rgb_dim: int, seed: int, xyz_dim: int = 1152, head: int = 256) -> dict:
    """A random UFF fusion block state dict (the reference's key names), built without the package's classes."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, dim in (("xyz", xyz_dim), ("rgb", rgb_dim)):
        state |= _norm(g, dim, f"{name}_norm")
        state |= _linear(g, 4 * dim, dim, f"{name}_mlp.fc1") | _linear(g, dim, 4 * dim, f"{name}_mlp.fc2")
    return state | _linear(g, head, rgb_dim, "rgb_head") | _linear(g, head, xyz_dim, "xyz_head")


def make_weights(folder: Path, preset: dict) -> dict[str, Path]:
    """Random weight files in the official formats (written once; later recordings reuse the same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"rgb": folder / "rgb.pth", "xyz": folder / "pointmae_pretrain.pth", "uff": folder / "uff.pth",
             "resnet": folder / "wide_resnet50_2.pth"}
    if all(path.is_file() for path in files.values()):
        return files
    import timm

    from m3dm.features.vit import timm_model_name  # only needed when the files are first written

    torch.manual_seed(11)
    vit = timm.create_model(timm_model_name(preset["rgb"]), pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), files["rgb"])  # the DINO release format: a plain backbone state dict
    point = _point_mae_module(preset)
    torch.save({"base_model": {f"module.MAE_encoder.{k}": v for k, v in point.items()}}, files["xyz"])
    torch.save({"model": uff_state(preset["rgb_dim"], seed=13), "epoch": 0}, files["uff"])
    torch.manual_seed(14)  # BTF's wide-ResNet-50-2 in the torchvision / timm layout
    torch.save(timm.create_model("wide_resnet50_2", pretrained=False).state_dict(), files["resnet"])
    return files


def _point_mae_module(preset: dict) -> dict:
    from m3dm.features.point_transformer import PointTransformer

    torch.manual_seed(12)
    model = PointTransformer("Point_MAE", num_group=preset["num_group"], group_size=preset["group_size"])
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def record(label: str, work: Path, preset_name: str, runs: list[str]) -> Path:
    preset = PRESETS[preset_name]
    data = make_dataset(work / "data", preset)
    weights = make_weights(work / "weights", preset)
    out = work / label
    common = ["--dataset_path", str(data), "--rgb_backbone_name", preset["rgb"], "--num_group",
              str(preset["num_group"]), "--group_size", str(preset["group_size"]), "--device", "cpu",
              "--batch_size", "2", "--xyz_checkpoint",
              str(weights["xyz"]), "--fusion_module_path", str(weights["uff"]), "--save_maps"]
    timings = {}
    for name in runs:
        start = time.perf_counter()
        rgb = weights["resnet"] if name.startswith("BTF") else weights["rgb"]  # BTF's RGB backbone is a ResNet
        subprocess.run([sys.executable, "main.py", *common, "--rgb_checkpoint", str(rgb), *RUNS[name],
                        "--output_dir", str(out / name)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"recorded {name} in {timings[name]} s", flush=True)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return out


def compare(a: Path, b: Path, runs: list[str]) -> bool:
    """Print one line per run and class; True when every score and map is bit-identical."""
    identical = True
    for name in runs:
        for path_a in sorted((a / name / "maps").glob("*.npz")):
            old, new = np.load(path_a), np.load(b / name / "maps" / path_a.name)
            same_names = list(old["names"]) == list(new["names"])
            scores_same = np.array_equal(old["image_scores"], new["image_scores"])
            maps_same = np.array_equal(old["maps"], new["maps"])
            ok = same_names and scores_same and maps_same
            identical &= ok
            detail = "bit-identical" if ok else (
                f"DIFFERENT: names {'same' if same_names else 'differ'}, max |score diff| "
                f"{np.abs(old['image_scores'] - new['image_scores']).max():.3g}, max |map diff| "
                f"{np.abs(old['maps'] - new['maps']).max():.3g}")
            print(f"{name:42s} {path_a.stem:8s} {len(old['names'])} samples: {detail}")
    return identical


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="name of this recording (a folder under --work)")
    p.add_argument("--compare", default=None, help="label of an earlier recording to compare with")
    p.add_argument("--work", default="results/parity", help="data, weights and recordings")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    work = (ROOT / args.work / args.preset).resolve()
    out = record(args.label, work, args.preset, args.runs)
    if args.compare is None:
        return 0
    return 0 if compare(work / args.compare, out, args.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
