"""``main.py``'s command line: every flag of the reference with its name and default, the new ones, and the
up-front validation of flag combinations that the reference only discovers by crashing (spec §11)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

METHODS = ("DINO", "Point_MAE", "Fusion", "DINO+Point_MAE", "DINO+Point_MAE+add", "DINO+Point_MAE+Fusion")
SINGLE_BANK_METHODS = ("DINO", "Point_MAE", "Fusion", "DINO+Point_MAE+add")
UFF_METHODS = ("Fusion", "DINO+Point_MAE+Fusion")
FEATURE_DUMP_METHODS = ("DINO+Point_MAE", "DINO+Point_MAE+add")
RGB_BACKBONES = ("vit_base_patch8_224_dino", "vit_base_patch8_224", "vit_base_patch8_224_in21k",
                 "vit_small_patch8_224_dino")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="M3DM: fit and evaluate per class (MVTec 3D-AD / Eyecandies).")
    ref = p.add_argument_group("reference flags (same names and defaults as the original main.py)")
    ref.add_argument("--method_name", default="DINO+Point_MAE+Fusion", choices=METHODS)
    ref.add_argument("--max_sample", type=int, default=400,
                     help="training-sample cap per pass; the reference uses max_sample + 1 samples")
    ref.add_argument("--memory_bank", default="multiple", choices=("single", "multiple"),
                     help="multiple: decision layer fusion (second pass + one-class SVMs)")
    ref.add_argument("--rgb_backbone_name", default="vit_base_patch8_224_dino",
                     help=f"timm ViT name; reference choices: {', '.join(RGB_BACKBONES)}")
    ref.add_argument("--xyz_backbone_name", default="Point_MAE", choices=("Point_MAE", "Point_Bert"),
                     help="point (xyz) backbone")
    ref.add_argument("--fusion_module_path", default="checkpoints/checkpoint-0.pth", help="UFF checkpoint")
    ref.add_argument("--save_feature", action="store_true", help="dump per-sample features for UFF pretraining")
    ref.add_argument("--use_uff", action="store_true", help="load the UFF block (needed by the Fusion methods)")
    ref.add_argument("--save_feature_path", default="datasets/patch_lib")
    ref.add_argument("--save_preds", action="store_true", help="save one picture per test sample")
    ref.add_argument("--group_size", type=int, default=128)
    ref.add_argument("--num_group", type=int, default=1024)
    ref.add_argument("--random_state", type=int, default=None, help="seed of the sparse random projection")
    ref.add_argument("--dataset_type", default="mvtec3d", choices=("mvtec3d", "eyecandies"))
    ref.add_argument("--dataset_path", default="datasets/mvtec3d")
    ref.add_argument("--img_size", type=int, default=224)
    for name, default in (("xyz_s", 1.0), ("xyz_smap", 1.0), ("rgb_s", 0.1), ("rgb_smap", 0.1),
                          ("fusion_s", 1.0), ("fusion_smap", 1.0)):
        ref.add_argument(f"--{name}_lambda", type=float, default=default)
    ref.add_argument("--coreset_eps", type=float, default=0.9, help="eps of the sparse random projection")
    ref.add_argument("--f_coreset", type=float, default=0.1, help="coreset fraction")
    ref.add_argument("--asy_memory_bank", type=int, default=None,
                     help="DINO+Point_MAE+Fusion: build the xyz and fusion banks from the first N samples only")
    ref.add_argument("--ocsvm_nu", type=float, default=0.5)
    ref.add_argument("--ocsvm_maxiter", type=int, default=1000)
    ref.add_argument("--rm_zero_for_project", action="store_true",
                     help="Point_MAE: drop empty patches before the coreset, then add one zero row")

    new = p.add_argument_group("added flags")
    new.add_argument("--classes", nargs="+", default=None, help="run only these classes")
    new.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    new.add_argument("--batch_size", type=int, default=1, help="samples per extraction batch")
    new.add_argument("--num_workers", type=int, default=0, help="data-loading processes")
    new.add_argument("--output_dir", default="results", help="tables, JSON, pictures and saved models")
    new.add_argument("--rgb_checkpoint", default=None, help="RGB backbone weights (default: under checkpoints/)")
    new.add_argument("--xyz_checkpoint", default=None, help="point backbone weights (default: under checkpoints/)")
    new.add_argument("--random_init", action="store_true",
                     help="run with random backbone weights when no checkpoint is found (demos and tests only)")
    new.add_argument("--backbone_eval", action="store_true",
                     help="run the point backbone in eval mode (the reference runs it in train mode: "
                          "BatchNorm batch statistics and active DropPath)")
    new.add_argument("--fix_quirks", action="store_true",
                     help="corrected behaviour instead of the reference's (see docs/quirks.md)")
    new.add_argument("--seed", type=int, default=0, help="seed set for every class, as the reference does")
    new.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                     help="bf16: bfloat16 matrix products in the backbones (faster, features within ~1 %%; "
                          "default fp32 for parity with the reference)")
    new.add_argument("--dlf_reextract", action="store_true",
                     help="pass 2 extracts the training samples again as the reference does (default: reuse the "
                          "pass-1 features; identical in eval mode, see docs/quirks.md)")
    new.add_argument("--coreset_shards", type=int, default=1, metavar="S",
                     help="faster coreset: S contiguous blocks of the bank, each with its own greedy selection "
                          "(faster; default 1 = the reference's exact selection; it lowers the localisation "
                          "metrics, see benchmarks/README.md)")
    new.add_argument("--bank_storage", default="disk", choices=("disk", "memory"),
                     help="where the training patches wait for the coreset and pass 2: a temporary file "
                          "(default; a 400-sample class needs ~16 GB there instead of in RAM) or host memory")
    new.add_argument("--spool_dir", default=None,
                     help="folder of the --bank_storage disk file (default: the system's temporary folder)")
    new.add_argument("--save_maps", action="store_true",
                     help="write every test part's 224x224 float map, image score and label to "
                          "<output_dir>/maps/<class>.npz (compare two runs pixel by pixel)")
    new.add_argument("--demo", action="store_true",
                     help="generate synthetic data if absent and run DINO+Point_MAE on it")

    saved = p.add_argument_group("saved models and pass/fail thresholds (docs/inference.md)")
    saved.add_argument("--save_model", action="store_true",
                       help="after fitting a class, set its pass/fail thresholds on good parts (validation/good) "
                            "and save it to <output_dir>/models/<class>.pt")
    saved.add_argument("--load_model", nargs="?", const="", default=None, metavar="FOLDER",
                       help="skip fitting: load <FOLDER>/<class>.pt (default FOLDER: <output_dir>/models) and "
                            "evaluate with it; the run's flags and weight files must match the model's")
    saved.add_argument("--far", type=float, default=0.01,
                       help="--save_model: fraction of good parts allowed above the image threshold")
    saved.add_argument("--pixel_far", type=float, default=0.01,
                       help="--save_model: fraction of good parts' pixels allowed above the pixel threshold")
    return p


def spool_folder(args: argparse.Namespace) -> str | None:
    """The folder of the banks' temporary file, or None to keep the training patches in memory."""
    if args.bank_storage == "memory":
        return None
    return args.spool_dir or tempfile.gettempdir()


def validate(args: argparse.Namespace) -> None:
    """Raise ValueError with what to use instead, for every combination the reference cannot run."""
    m = args.method_name
    if m in ("DINO", "Point_MAE", "Fusion") and args.memory_bank != "single":
        raise ValueError(f"--method_name {m} has a single memory bank and no decision layer fusion: "
                         f"use --memory_bank single")
    if m == "DINO+Point_MAE+add" and args.memory_bank != "single":
        raise ValueError("--method_name DINO+Point_MAE+add adds the two scores and ignores decision layer "
                         "fusion: use --memory_bank single (or DINO+Point_MAE for decision layer fusion)")
    if m in ("DINO+Point_MAE", "DINO+Point_MAE+Fusion") and args.memory_bank != "multiple":
        raise ValueError(f"--method_name {m} fuses its banks with the decision layer: use --memory_bank multiple "
                         f"(or DINO+Point_MAE+add for a plain sum with --memory_bank single)")
    if m in UFF_METHODS and not args.use_uff:
        raise ValueError(f"--method_name {m} needs the UFF fusion block: add --use_uff and "
                         f"--fusion_module_path <checkpoint> (train one with fusion_pretrain.py)")
    if args.save_feature and m not in FEATURE_DUMP_METHODS:
        raise ValueError(f"--save_feature dumps UFF pretraining features, which only {' and '.join(FEATURE_DUMP_METHODS)}"
                         f" produce: use --method_name DINO+Point_MAE --memory_bank multiple --save_feature")
    if args.asy_memory_bank is not None and m != "DINO+Point_MAE+Fusion":
        raise ValueError("--asy_memory_bank only applies to --method_name DINO+Point_MAE+Fusion")
    if args.asy_memory_bank is not None and args.asy_memory_bank < 1:
        raise ValueError("--asy_memory_bank must be at least 1 (the xyz and fusion banks need a sample)")
    if args.rm_zero_for_project and m != "Point_MAE":
        raise ValueError("--rm_zero_for_project only applies to --method_name Point_MAE")
    if args.use_uff and "small" in args.rgb_backbone_name:
        raise ValueError("the UFF block expects 768-d RGB features: use a ViT-B backbone with --use_uff")
    if args.img_size != 224:
        raise ValueError("--img_size must be 224: the reference's RGB, mask and score-map sizes are fixed at 224")
    if not 0 < args.f_coreset <= 1:
        raise ValueError("--f_coreset must be in (0, 1]")
    if args.coreset_shards < 1:
        raise ValueError("--coreset_shards must be at least 1 (1: the reference's exact selection)")
    if args.batch_size < 1 or args.max_sample < 0:
        raise ValueError("--batch_size must be >= 1 and --max_sample >= 0")
    if args.save_model and args.load_model is not None:
        raise ValueError("--save_model fits and saves, --load_model skips fitting: use one of them")
    if args.load_model is not None and args.save_feature:
        raise ValueError("--save_feature dumps features while fitting, which --load_model skips: drop one")
    if not (0 <= args.far < 1 and 0 <= args.pixel_far < 1):
        raise ValueError("--far and --pixel_far are fractions of good parts / pixels: use values in [0, 1)")


# ------------------------------------------------------------------------------------------------ running

def _classes(args) -> list[str]:
    from m3dm.constants import CLASSES_BY_DATASET
    from m3dm.data import available_classes

    if args.classes:
        return list(args.classes)
    present = set(available_classes(args.dataset_path))
    reference = [c for c in CLASSES_BY_DATASET[args.dataset_type] if c in present]
    return reference or sorted(present)


def build_extractor(args, detector_needs: tuple[bool, bool], device: str):
    """Backbones from local checkpoint files (or random weights with --random_init)."""
    from m3dm.features.extractor import FeatureExtractor
    from m3dm.features.weights import build_point_backbone, build_rgb_backbone

    needs_rgb, needs_xyz = detector_needs
    rgb = point = None
    if needs_rgb:
        rgb = build_rgb_backbone(args.rgb_backbone_name, args.rgb_checkpoint, random_init=args.random_init).eval()
    if needs_xyz:
        point = build_point_backbone(args.xyz_backbone_name, args.xyz_checkpoint, random_init=args.random_init,
                                     num_group=args.num_group, group_size=args.group_size)
        point.train(not args.backbone_eval)  # the reference never calls .eval() (spec §5.4)
    return FeatureExtractor(rgb, point, img_size=args.img_size, device=device, seed=args.seed,
                            clamp_pfa=args.fix_quirks, precision=args.precision)


def save_prediction_pictures(result, class_name: str, output_dir: Path) -> Path:
    """One PNG per test sample: RGB | GT | heatmap overlay, with the image score (``--save_preds``)."""
    import numpy as np
    from PIL import Image

    from m3dm.constants import RGB_SIZE
    from m3dm.data.io import read_rgb
    from m3dm.evaluation.pictures import prediction_panel, save_panel

    folder = output_dir / "pred_maps" / class_name
    vmin, vmax = float(result.maps.min()), float(result.maps.max())
    for name, path, score_map, mask, score in zip(result.names, result.rgb_paths, result.maps, result.masks,
                                                  result.image_scores):
        _, _, defect, stem = name.split("/")
        rgb = np.asarray(read_rgb(path).convert("RGB").resize((RGB_SIZE, RGB_SIZE), Image.BICUBIC))
        panel = prediction_panel(rgb, mask if mask.any() else None, score_map, float(score), vmin, vmax,
                                 title=name)
        save_panel(folder / defect / f"{stem}.png", panel)
    return folder


def save_score_maps(result, class_name: str, output_dir: Path) -> Path:
    """``--save_maps``: names, labels, image scores and ``(N, 224, 224)`` float32 maps of one class, compressed."""
    import io

    import numpy as np

    from m3dm.data.io import atomic_path

    path = output_dir / "maps" / f"{class_name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, names=np.asarray(result.names), labels=result.labels,
                        image_scores=result.image_scores, maps=result.maps.astype(np.float32))
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return path


def run(args) -> dict:
    """Fit and evaluate every class; print and write the tables and the JSON record.

    Under ``torchrun --nproc_per_node=N`` each process takes every N-th class and process 0 gathers the results
    into the same tables (m3dm.app.processes).
    """
    from m3dm.app import processes as parallel
    from m3dm.uff.block import load_fusion_block
    from m3dm.detection.detector import Detector, DetectorConfig
    from m3dm.detection.persistence import MODELS_DIR, describe_run
    from m3dm.evaluation.tables import METRIC_TABLES, markdown_table, write_results
    from m3dm.app.run import StageTimer, seed_everything

    workers = parallel.start()
    device = parallel.device_for(args.device, workers)
    output_dir = Path(args.output_dir)
    config = DetectorConfig.from_args(args)
    classes = _classes(args)
    seed_everything(args.seed)
    probe = Detector(config, fusion_block=object() if args.use_uff else None)
    extractor = build_extractor(args, (probe.needs_rgb, probe.needs_xyz), device)
    fusion_block = None
    if args.use_uff:
        fusion_block = load_fusion_block(args.fusion_module_path, device,
                                         rgb_dim=extractor.rgb_backbone.feature_dim)
    timer = StageTimer()
    setup = describe_run(args, extractor, fusion_block) if args.save_model or args.load_model is not None else None
    models_dir = output_dir / MODELS_DIR if not args.load_model else Path(args.load_model)
    mine = {}
    for class_name in workers.share(classes):
        mine[class_name] = _run_class(args, class_name, config, extractor, fusion_block, device, timer, setup,
                                      models_dir, output_dir)
    gathered = parallel.gather((mine, dict(timer.seconds)), workers)
    parallel.finish(workers)
    if not workers.is_main:
        return {}
    per_class = {c: results[c] for c in classes for results, _ in gathered if c in results}
    seconds = {}
    for _, timings in gathered:
        for stage, value in timings.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
    for metric in METRIC_TABLES:
        print(f"\n{METRIC_TABLES[metric]}\n{markdown_table(args.method_name, per_class, metric)}")
    record_config = dict(vars(args), device_used=device, processes=workers.world)
    paths = write_results(output_dir, args.method_name, per_class, record_config, seconds)
    timer.seconds.clear()
    timer.seconds.update(seconds)
    print(f"\n{timer.report()}" + (f" summed over {workers.world} processes" if workers.world > 1 else ""))
    print(f"results written to {output_dir.resolve()} ({', '.join(p.name for p in paths.values())})")
    return per_class


def _run_class(args, class_name, config, extractor, fusion_block, device, timer, setup, models_dir,
               output_dir) -> dict:
    """Fit (or load), optionally save, evaluate one class; returns its metrics."""
    from m3dm.detection.detector import sample_cap
    from m3dm.detection.persistence import load_into_runner, model_path, save_runner_model
    from m3dm.evaluation.tables import class_line
    from m3dm.app.run import ClassRunner, seed_everything
    from m3dm.detection.thresholds import choose_threshold_samples

    seed_everything(args.seed)
    extractor.generator.manual_seed(args.seed)
    good_parts = None
    if args.save_model:
        good_parts = choose_threshold_samples(args.dataset_path, class_name,
                                              sample_cap(args.max_sample, args.fix_quirks))
    runner = ClassRunner(config, extractor, args.dataset_path, class_name, img_size=args.img_size,
                         batch_size=args.batch_size, num_workers=args.num_workers,
                         max_sample=args.max_sample, fusion_block=fusion_block, device=device, timer=timer,
                         reextract_pass2=args.dlf_reextract,
                         save_feature_path=args.save_feature_path if args.save_feature else None,
                         train_limit=None if good_parts is None else good_parts.train_limit,
                         spool_dir=spool_folder(args))
    if args.load_model is not None:
        with timer("load model"):
            load_into_runner(runner, model_path(models_dir, class_name), setup, fusion_block, device)
    else:
        runner.fit()
    if args.save_model:
        with timer("thresholds and saving"):
            path, thresholds = save_runner_model(runner, model_path(models_dir, class_name), setup, good_parts,
                                                 args.far, args.pixel_far, device=device)
        print(f"  model saved: {path} (thresholds from {thresholds.source}: image {thresholds.image:.6g}, "
              f"pixel {thresholds.pixel:.6g})")
    result = runner.evaluate()
    print(class_line(class_name, args.method_name, result.metrics), flush=True)
    if args.save_maps:
        print(f"  maps: {save_score_maps(result, class_name, output_dir)}")
    if args.save_preds:
        with timer("pictures"):
            folder = save_prediction_pictures(result, class_name, output_dir)
        print(f"  prediction pictures: {folder}")
    return result.metrics
