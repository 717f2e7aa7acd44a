import shutil

import pytest

from m3dm.data.layout import available_classes, discover_samples
from m3dm.data.synthetic import MVTEC_DEFECTS
from m3dm.errors import DataError


def test_discovery_sorted_and_paired(raw_mvtec):
    test = discover_samples(raw_mvtec, "gadget", "test")
    assert [s.defect for s in test] == sorted(["good", *MVTEC_DEFECTS])
    for s in test:
        assert s.rgb_path.stem == s.xyz_path.stem == s.stem
        assert (s.gt_path is None) == (s.defect == "good")
        assert s.label == (s.defect != "good")
    train = discover_samples(raw_mvtec, "gadget", "train")
    assert [s.stem for s in train] == ["000", "001", "002"] and all(s.label == 0 for s in train)
    assert available_classes(raw_mvtec) == ["gadget"]


@pytest.fixture
def copy_of(raw_mvtec, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(raw_mvtec, root)
    return root


def test_missing_xyz_is_named(copy_of):
    (copy_of / "gadget/train/good/xyz/001.tiff").unlink()
    with pytest.raises(DataError, match=r"(?s)train/good.*xyz/ lacks 1 file.*001"):
        discover_samples(copy_of, "gadget", "train")


def test_pairs_by_stem_not_position(copy_of):
    # same counts but different names: a positional zip would silently pair 001.png with 009.tiff
    xyz = copy_of / "gadget/train/good/xyz"
    (xyz / "001.tiff").rename(xyz / "009.tiff")
    with pytest.raises(DataError) as info:
        discover_samples(copy_of, "gadget", "train")
    assert "001" in str(info.value) and "009" in str(info.value)


def test_extra_rgb_and_missing_gt(copy_of):
    shutil.copy(copy_of / "gadget/test/dent/rgb/000.png", copy_of / "gadget/test/dent/rgb/007.png")
    with pytest.raises(DataError, match=r"(?s)test/dent.*007"):
        discover_samples(copy_of, "gadget", "test")
    (copy_of / "gadget/test/dent/rgb/007.png").unlink()
    (copy_of / "gadget/test/color/gt/000.png").unlink()
    with pytest.raises(DataError, match=r"(?s)test/color.*gt/ lacks"):
        discover_samples(copy_of, "gadget", "test")


def test_empty_or_missing_split(tmp_path):
    (tmp_path / "ds/empty_class/train/good/rgb").mkdir(parents=True)
    with pytest.raises(DataError, match="no samples found"):
        discover_samples(tmp_path / "ds", "empty_class", "train")
    with pytest.raises(DataError, match="folder not found"):
        discover_samples(tmp_path / "ds", "absent", "test")


def test_real_subset_layout(real_mvtec_subset):
    test = discover_samples(real_mvtec_subset, "cable_gland", "test")
    assert [s.defect for s in test] == ["bent", "cut", "good", "hole", "thread"]
    assert len(discover_samples(real_mvtec_subset, "cable_gland", "train")) == 3
    assert len(discover_samples(real_mvtec_subset, "cable_gland", "validation")) == 1


def test_every_pairing_problem_of_a_split_at_once_and_extra_gt_named_as_such(copy_of):
    test = copy_of / "gadget/test"
    shutil.copy(test / "dent/gt/000.png", test / "dent/gt/007.png")  # a mask of no sample
    (test / "bump/xyz/000.tiff").unlink()
    with pytest.raises(DataError) as info:
        discover_samples(copy_of, "gadget", "test")
    message = str(info.value)
    assert f"{test}/bump: xyz/ lacks 1 file(s) present elsewhere: 000" in message
    assert f"{test}/dent: gt/ has 1 extra file(s) with no rgb/ or xyz/ file: 007" in message
    assert "rgb/ lacks" not in message and "xyz/ lacks 1 file(s) present elsewhere: 007" not in message


def test_defect_folders_without_gt_give_samples_without_masks(copy_of):
    shutil.rmtree(copy_of / "gadget/test/dent/gt")
    test = discover_samples(copy_of, "gadget", "test")
    dent = [s for s in test if s.defect == "dent"]
    assert len(dent) == 1 and dent[0].gt_path is None and dent[0].label == 1
    assert all(s.gt_path is not None for s in test if s.label and s.defect != "dent")
