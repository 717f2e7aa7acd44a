"""Every numeric flag of main.py has a bound, and a value outside it is refused before anything runs, with one
line naming the flag, the value and the valid range."""

import tracemalloc

import pytest

import main as main_module
from m3dm.app.cli import build_parser
from m3dm.config import settings_from_flags

VALID = ["--method_name", "DINO", "--memory_bank", "single"]  # a combination that passes every other rule


def refusal(argv: list[str]) -> str:
    settings = settings_from_flags(build_parser().parse_args(VALID + argv))
    with pytest.raises(ValueError) as error:
        settings.validate()
    return str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--num_group", "0"], "--num_group 0 is out of range: use an integer from 1 to 8192 (the point transformer's "
                           "memory grows with num_group squared)"),
    (["--num_group", "100000"], "--num_group 100000 is out of range: use an integer from 1 to 8192 (the point "
                                "transformer's memory grows with num_group squared)"),
    (["--group_size", "0"], "--group_size 0 is out of range: use an integer from 2 to 1024 (a group holds at most "
                            "the 224x224 points of a cloud, and num_group x group_size is at most 1048576)"),
    (["--group_size", "1"], "--group_size 1 is out of range: use an integer from 2 to 1024"),
    (["--num_group", "2048", "--group_size", "1024"], "--group_size 1024 is out of range: use an integer from 2 "
                                                      "to 512"),
    (["--num_group", "1", "--group_size", "60000"], "--group_size 60000 is out of range: use an integer from 2 to "
                                                    "50176"),
    (["--batch_size", "0"], "--batch_size 0 is out of range: use an integer of at least 1"),
    (["--num_workers", "-1"], "--num_workers -1 is out of range: use an integer of at least 0"),
    (["--max_sample", "-1"], "--max_sample -1 is out of range: use an integer of at least 0"),
    (["--f_coreset", "0"], "--f_coreset 0.0 is out of range: use a value in (0, 1]"),
    (["--f_coreset", "1.5"], "--f_coreset 1.5 is out of range: use a value in (0, 1]"),
    (["--coreset_eps", "1"], "--coreset_eps 1.0 is out of range: use a value in (0, 1)"),
    (["--coreset_shards", "0"], "--coreset_shards 0 is out of range: use an integer of at least 1"),
    (["--bank_rows_per_sample", "0"], "--bank_rows_per_sample 0 is out of range: use an integer of at least 1"),
    (["--ocsvm_nu", "nan"], "--ocsvm_nu nan is out of range: use a value in (0, 1]"),
    (["--ocsvm_maxiter", "0"], "--ocsvm_maxiter 0 is out of range: use an integer of at least 1"),
    (["--far", "1"], "--far 1.0 is out of range: use a value in [0, 1)"),
    (["--pixel_far", "-0.1"], "--pixel_far -0.1 is out of range: use a value in [0, 1)"),
    (["--seed", "-1"], "--seed -1 is out of range: use an integer from 0 to 4294967295 (a NumPy seed)"),
    (["--random_state", "4294967296"], "--random_state 4294967296 is out of range: use an integer from 0 to "
                                       "4294967295"),
    (["--rgb_s_lambda", "-1"], "--rgb_s_lambda -1.0 is out of range: use a finite value >= 0"),
    (["--xyz_smap_lambda", "inf"], "--xyz_smap_lambda inf is out of range: use a finite value >= 0"),
])
def test_numeric_flags_out_of_range_are_refused_with_the_range(argv, message):
    assert refusal(argv).startswith(message)
    assert "\n" not in refusal(argv)


@pytest.mark.parametrize("argv", [
    ["--num_group", "1", "--group_size", "2"], ["--num_group", "8192", "--group_size", "128"],
    ["--num_group", "1024", "--group_size", "1024"], ["--seed", "4294967295"], ["--f_coreset", "1"],
    ["--ocsvm_nu", "1"], ["--far", "0"], ["--max_sample", "0"], ["--rgb_s_lambda", "0"],
    ["--bank_rows_per_sample", "1", "--bank_search", "hnsw"],
])
def test_values_at_the_ends_of_the_ranges_are_accepted(argv):
    settings_from_flags(build_parser().parse_args(VALID + argv)).validate()


@pytest.mark.parametrize("flag, value", [("--bank_search", "faiss"), ("--bank_rows_per_sample", "100")])
def test_the_bank_options_are_refused_for_methods_without_banks(flag, value):
    settings = settings_from_flags(build_parser().parse_args(["--method_name", "CFM", flag, value]))
    with pytest.raises(ValueError, match=f"^{flag} applies to the memory-bank methods"):
        settings.validate()


def test_main_refuses_a_huge_num_group_before_allocating_anything(capsys, tmp_path):
    tracemalloc.start()
    with pytest.raises(SystemExit) as exit_status:
        main_module.main([*VALID, "--num_group", "100000", "--dataset_path", str(tmp_path),
                          "--output_dir", str(tmp_path / "out")])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert exit_status.value.code == 2
    assert peak < 50e6  # no backbone, no grouping: the many GB of such a grouping never start
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": error: --num_group 100000 is out of range: use an integer from 1 to 8192 (the "
                       "point transformer's memory grows with num_group squared)")
    assert not (tmp_path / "out").exists()


def test_a_cloud_with_fewer_valid_points_than_a_group_is_named():
    """The data-dependent half of the --group_size bound: a group is that many nearest points of one cloud."""
    import torch

    from m3dm.config import BackboneSettings
    from m3dm.errors import DataError
    from m3dm.features.extractor import build_extractor

    extractor = build_extractor(BackboneSettings(num_group=4, group_size=64, random_init=True), needs_rgb=False,
                                needs_xyz=True, device="cpu", seed=0, clamp_pfa=False)
    pc = torch.zeros(1, 3, 224, 224)
    pc[0, :, :5, :10] = torch.rand(3, 5, 10) + 0.1  # 50 valid points
    with pytest.raises(DataError) as error:
        extractor(None, pc, names=["gadget/test/good/000"])
    assert str(error.value) == ("gadget/test/good/000: the point cloud has 50 valid points, fewer than the 64 of one "
                                "group (lower --group_size)")
