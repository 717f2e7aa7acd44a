"""End to end on synthetic data: every method, reproducibility, pass-2 reuse, flag validation and outputs.

Small configuration (a tiny timm ViT, 64 groups of 32 points, random weights) so the whole file runs in about a
minute on two cores.
"""

import json
from pathlib import Path

import pytest
import torch

import main as main_module
from m3dm.app.cli import build_parser, validate
from m3dm.uff.block import FeatureFusionBlock
from m3dm.preprocess.mvtec3d import preprocess_dataset
from m3dm.data.synthetic import write_mvtec3d

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    raw = write_mvtec3d(tmp_path_factory.mktemp("pipeline") / "raw", classes=("gadget",), size=96, n_train=5,
                        n_val=1, n_test_good=3, n_test_defect=2, progress=False)
    return preprocess_dataset(raw, workers=1).output


@pytest.fixture(scope="module")
def uff_checkpoint(tmp_path_factory) -> Path:
    """A random-weight UFF block in the reference's checkpoint format; RGB width of the tiny ViT is 192."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("uff") / "checkpoint-0.pth"
    torch.save({"model": FeatureFusionBlock(rgb_dim=192).state_dict(), "epoch": 0}, path)
    return path


def run_main(dataset: Path, out: Path, *extra: str) -> dict:
    argv = ["--dataset_path", str(dataset), "--output_dir", str(out), *SMALL, *extra]
    assert main_module.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method, bank", [("DINO", "single"), ("Point_MAE", "single"),
                                          ("DINO+Point_MAE", "multiple"), ("DINO+Point_MAE+add", "single")])
def test_methods_without_uff(dataset, tmp_path, method, bank):
    record = run_main(dataset, tmp_path, "--method_name", method, "--memory_bank", bank)
    metrics = record["per_class"]["gadget"]
    assert set(metrics) >= {"image_rocauc", "pixel_rocauc", "au_pro", "au_pro_0.01"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_rocauc", "pixel_rocauc", "au_pro"))
    for name in ("image_rocauc_results.md", "pixel_rocauc_results.md", "au_pro_results.md"):
        table = (tmp_path / name).read_text()
        assert "Gadget" in table and "Mean" in table and "nan" not in table.lower()


@pytest.mark.parametrize("method, bank", [("Fusion", "single"), ("DINO+Point_MAE+Fusion", "multiple")])
def test_fusion_methods_with_uff_checkpoint(dataset, tmp_path, uff_checkpoint, method, bank):
    record = run_main(dataset, tmp_path, "--method_name", method, "--memory_bank", bank, "--use_uff",
                      "--fusion_module_path", str(uff_checkpoint))
    assert 0.0 <= record["per_class"]["gadget"]["pixel_rocauc"] <= 1.0


def test_defects_are_localised_and_runs_reproducible(dataset, tmp_path):
    first = run_main(dataset, tmp_path / "a", "--method_name", "DINO+Point_MAE", "--save_preds")
    # the first run spools the training patches to disk (default), the second keeps them in memory
    second = run_main(dataset, tmp_path / "b", "--method_name", "DINO+Point_MAE", "--bank_storage", "memory")
    assert first["per_class"] == second["per_class"]
    # random backbone weights, yet the geometric and colour defects stand out
    assert first["per_class"]["gadget"]["pixel_rocauc"] > 0.75
    pictures = sorted((tmp_path / "a" / "pred_maps" / "gadget").rglob("*.png"))
    assert len(pictures) == 3 + 2 * 4  # one per test sample
    assert {p.parent.name for p in pictures} == {"good", "dent", "bump", "color", "combined"}


def test_pass2_reuse_equals_reextraction_in_eval_mode(dataset, tmp_path):
    reused = run_main(dataset, tmp_path / "a", "--method_name", "DINO+Point_MAE", "--backbone_eval")
    again = run_main(dataset, tmp_path / "b", "--method_name", "DINO+Point_MAE", "--backbone_eval",
                     "--dlf_reextract")
    assert reused["per_class"] == again["per_class"]


def test_fix_quirks_runs(dataset, tmp_path, uff_checkpoint):
    record = run_main(dataset, tmp_path, "--method_name", "DINO+Point_MAE+Fusion", "--use_uff",
                      "--fusion_module_path", str(uff_checkpoint), "--fix_quirks")
    assert 0.0 <= record["per_class"]["gadget"]["image_rocauc"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--method_name", "DINO+Point_MAE+Fusion"], "--use_uff"),
    (["--method_name", "DINO", "--memory_bank", "multiple"], "--memory_bank single"),
    (["--method_name", "DINO+Point_MAE", "--memory_bank", "single"], "DINO+Point_MAE+add"),
    (["--method_name", "DINO", "--memory_bank", "single", "--save_feature"], "--method_name DINO+Point_MAE"),
    (["--method_name", "Point_MAE", "--memory_bank", "single", "--asy_memory_bank", "3"], "DINO+Point_MAE+Fusion"),
    (["--method_name", "DINO", "--memory_bank", "single", "--img_size", "256"], "224"),
    (["--method_name", "DINO", "--memory_bank", "single", "--coreset_shards", "0"], "at least 1"),
])
def test_invalid_flag_combinations_are_refused(argv, message):
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        validate(args)


def test_missing_uff_checkpoint_is_a_clear_error(dataset, tmp_path, capsys):
    argv = ["--dataset_path", str(dataset), "--output_dir", str(tmp_path), *SMALL, "--method_name", "Fusion",
            "--memory_bank", "single", "--use_uff", "--fusion_module_path", str(tmp_path / "nothing.pth")]
    assert main_module.main(argv) == 2
    message = capsys.readouterr().err
    assert "nothing.pth" in message and "not found" in message and "Traceback" not in message


def test_missing_dataset_class_is_a_clear_error(dataset, tmp_path, capsys):
    argv = ["--dataset_path", str(dataset), "--output_dir", str(tmp_path), *SMALL, "--method_name", "DINO",
            "--memory_bank", "single", "--classes", "no_such_class"]
    assert main_module.main(argv) == 2
    assert "no_such_class" in capsys.readouterr().err


def test_save_feature_dumps_reference_layout_and_aligned_layout(dataset, tmp_path):
    """One (3136, 1152 + C) tensor per training sample; RGB rows scrambled as the reference (quirk 20) by default,
    spatially aligned (2x nearest of the 28 x 28 token map) with --fix_quirks. ViT-S/8 gives the real 28 grid."""
    dumps = {}
    for fix in (False, True):
        folder = tmp_path / f"patch_lib_{fix}"
        run_main(dataset, tmp_path / f"out_{fix}", "--method_name", "DINO+Point_MAE", "--save_feature",
                 "--save_feature_path", str(folder), "--max_sample", "2", "--rgb_backbone_name",
                 "vit_small_patch8_224", *(["--fix_quirks"] if fix else []))
        files = sorted(folder.glob("*.pt"))
        assert [f.name for f in files] == [f"gadget{i}.pt" for i in range(2 if fix else 3)]  # max_sample + 1
        dumps[fix] = torch.load(files[0], weights_only=True)
        assert dumps[fix].shape == (56 * 56, 1152 + 384) and dumps[fix].dtype == torch.float32
    aligned = dumps[True][:, 1152:].reshape(56, 56, 384)
    assert torch.equal(aligned[0::2, 0::2], aligned[1::2, 1::2])  # each token fills a 2 x 2 block
    tokens = aligned[0::2, 0::2].reshape(784, 384)
    t = torch.arange(3136)
    assert torch.equal(dumps[False][:, 1152:], tokens[(4 * (t % 784) + t // 784) % 784])


def test_asymmetric_memory_bank_and_zero_row_options(dataset, tmp_path, uff_checkpoint):
    """--asy_memory_bank keeps xyz and fusion banks to the first samples; --rm_zero_for_project drops empty
    patches of the Point_MAE bank. Both run end to end and change the numbers."""
    full = run_main(dataset, tmp_path / "full", "--method_name", "DINO+Point_MAE+Fusion", "--use_uff",
                    "--fusion_module_path", str(uff_checkpoint))
    asy = run_main(dataset, tmp_path / "asy", "--method_name", "DINO+Point_MAE+Fusion", "--use_uff",
                   "--fusion_module_path", str(uff_checkpoint), "--asy_memory_bank", "2")
    assert asy["per_class"] != full["per_class"]
    plain = run_main(dataset, tmp_path / "plain", "--method_name", "Point_MAE", "--memory_bank", "single")
    no_zero = run_main(dataset, tmp_path / "no_zero", "--method_name", "Point_MAE", "--memory_bank", "single",
                       "--rm_zero_for_project")
    assert no_zero["per_class"] != plain["per_class"]


def test_sharded_coreset_option_runs(dataset, tmp_path):
    record = run_main(dataset, tmp_path, "--method_name", "DINO+Point_MAE", "--coreset_shards", "3",
                      "--spool_dir", str(tmp_path / "spool"))
    assert record["per_class"]["gadget"]["pixel_rocauc"] > 0.75
    assert list((tmp_path / "spool").iterdir()) == []  # the spool file is anonymous and gone
