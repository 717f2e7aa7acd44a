"""The dataset check (m3dm.data.check, ``python -m m3dm.data check``): every kind of problem, injected into copies
of a small synthetic tree, is reported in one pass with its file, and the exit status says whether the tree can
be used."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from m3dm.app.cli import main as m3dm_main
from m3dm.app.dataset_check import main as check_main
from m3dm.data.check import check_dataset, require_usable_dataset
from m3dm.data.io import BORDER_BAND
from m3dm.data.synthetic import MVTEC_DEFECTS
from m3dm.errors import DataError


@pytest.fixture
def tree(raw_mvtec, tmp_path):
    """The raw synthetic tree with every cloud's border emptied, as the preprocessing leaves it (the background
    plane removed): a tree the check has nothing to say about."""
    root = tmp_path / "copy"
    shutil.copytree(raw_mvtec, root)
    for path in root.rglob("*.tiff"):
        cloud = tifffile.imread(path)
        cloud[:BORDER_BAND], cloud[-BORDER_BAND:], cloud[:, :BORDER_BAND], cloud[:, -BORDER_BAND:] = 0, 0, 0, 0
        write_cloud(path, cloud)
    return root


def messages(report, severity=None):
    return [str(p) for p in report.problems if severity is None or p.severity == severity]


def one(report, kind, severity):
    found = [p for p in report.problems if p.kind == kind and p.severity == severity]
    assert len(found) == 1, (kind, messages(report))
    return str(found[0])


def test_a_clean_tree_is_usable_with_counts_per_class_and_split(tree, capsys):
    report = check_dataset(tree)
    assert report.problems == [] and report.usable and report.classes == ["gadget"]
    counts = report.counts["gadget"]
    assert (counts["train"].samples, counts["validation"].samples, counts["test"].samples) == (3, 1, 5)
    assert counts["test"].by_defect == {"good": 1, **dict.fromkeys(MVTEC_DEFECTS, 1)}
    assert counts["test"].masks == counts["test"].defective == 4
    assert check_main(["check", str(tree), "-q"]) == 0
    out = capsys.readouterr().out
    assert "gadget/test: 5 sample(s) (bump 1, color 1, combined 1, dent 1, good 1); masks 4/4" in out
    assert out.rstrip().endswith("the dataset can be used")


def write_cloud(path, cloud):
    tifffile.imwrite(path, cloud, photometric="rgb")


def test_every_problem_of_the_tree_is_reported_at_once(tree, capsys):
    gadget = tree / "gadget"
    (gadget / "train/good/xyz/001.tiff").unlink()  # pairing: rgb without xyz
    shutil.copy(gadget / "test/dent/gt/000.png", gadget / "test/dent/gt/007.png")  # an extra gt file
    (gadget / "test/bump/gt/000.png").unlink()  # gt/ is there but lacks the mask
    Image.new("RGB", (50, 40)).save(gadget / "test/color/rgb/000.png")  # wrong size
    cloud = tifffile.imread(gadget / "train/good/xyz/000.tiff")
    nan_cloud = cloud.copy()
    nan_cloud[3, 4, 1] = np.nan
    nan_cloud[5, 6] = np.inf
    write_cloud(gadget / "train/good/xyz/000.tiff", nan_cloud)
    write_cloud(gadget / "train/good/xyz/002.tiff", np.zeros_like(cloud))  # empty
    sparse = np.zeros_like(cloud)
    sparse[40:45, 40:45] = cloud[40:45, 40:45]  # inside the border the preprocessing empties
    write_cloud(gadget / "validation/good/xyz/000.tiff", sparse)
    sparse_valid = int((sparse != 0).all(-1).sum())
    assert 0 < sparse_valid <= 25
    write_cloud(gadget / "test/good/xyz/000.tiff", cloud.astype(np.float64))  # a warning, not an error
    write_cloud(gadget / "test/combined/xyz/000.tiff", (cloud * 1000).astype(np.int32))

    report = check_dataset(tree)
    assert not report.usable
    assert f"{gadget}/train/good: xyz/ lacks 1 file(s) present elsewhere: 001" in messages(report, "error")
    dent = [m for m in messages(report) if "test/dent" in m]
    assert dent == [f"{gadget}/test/dent: gt/ has 1 extra file(s) with no rgb/ or xyz/ file: 007"]
    assert f"{gadget}/test/bump: gt/ lacks 1 file(s) present elsewhere: 000" in messages(report, "error")
    assert one(report, "size", "error") == (f"{gadget}/test/color/rgb/000.png: RGB image is 50x40 (WxH) but its "
                                            f"point cloud {gadget}/test/color/xyz/000.tiff is 96x96")
    assert one(report, "nonfinite", "error") == (f"{gadget}/train/good/xyz/000.tiff: 2 pixels hold NaN or infinite "
                                                 f"coordinates")
    assert one(report, "empty cloud", "error").startswith(f"{gadget}/train/good/xyz/002.tiff: the point cloud has "
                                                          f"no valid point")
    assert one(report, "sparse cloud", "warning") == (f"{gadget}/validation/good/xyz/000.tiff: nearly empty point "
                                                      f"cloud: {sparse_valid} valid points of 9216 pixels "
                                                      f"({100 * sparse_valid / 9216:.2f} %)")
    assert one(report, "dtype", "warning") == (f"{gadget}/test/good/xyz/000.tiff: coordinates are float64, "
                                               f"float32 expected (MVTec 3D-AD stores float32)")
    assert one(report, "dtype", "error") == (f"{gadget}/test/combined/xyz/000.tiff: expected float32 coordinates, "
                                             f"got dtype int32")
    assert len(report.errors) == 7 and len(report.warnings) == 2
    counts = report.counts["gadget"]
    assert counts["train"].samples == 2  # 001 is not a sample without its cloud
    assert counts["test"].by_defect["bump"] == 1 and counts["test"].masks == 3

    assert check_main(["check", str(tree), "-q"]) == 1
    out = capsys.readouterr().out
    assert "7 error(s): dtype 1, empty cloud 1, nonfinite 1, pairing 3, size 1" in out
    assert "2 warning(s): dtype 1, sparse cloud 1" in out
    assert "ERROR " + one(report, "size", "error") in out and out.rstrip().endswith("CANNOT be used as it is "
                                                                                    "(fix the errors above)")
    assert m3dm_main(["check", str(tree), "-q"]) == 1  # the console script's subcommand is the same check


def test_headers_only_checks_sizes_and_dtypes_without_reading_values(tree):
    gadget = tree / "gadget"
    cloud = tifffile.imread(gadget / "train/good/xyz/000.tiff")
    write_cloud(gadget / "train/good/xyz/000.tiff", np.full_like(cloud, np.nan))
    Image.new("L", (10, 10)).save(gadget / "test/dent/gt/000.png")
    report = check_dataset(tree, contents=False)
    assert [p.kind for p in report.errors] == ["size"]  # the NaN cloud needs the full check
    assert "test/dent/gt/000.png: mask is 10x10 (WxH)" in str(report.errors[0])
    assert sorted(p.kind for p in check_dataset(tree).errors) == ["empty cloud", "nonfinite", "size"]


def test_missing_splits_classes_without_defects_or_masks(tree, capsys):
    shutil.rmtree(tree / "gadget/validation")
    for defect in MVTEC_DEFECTS:
        shutil.rmtree(tree / "gadget/test" / defect / "gt")  # a dataset without pixel masks
    only_good = tree / "only_good"
    shutil.copytree(tree / "gadget/train", only_good / "train")
    shutil.copytree(tree / "gadget/test/good", only_good / "test/good")
    (tree / "no_test/train").mkdir(parents=True)
    shutil.copytree(tree / "gadget/train/good", tree / "no_test/train/good")
    report = check_dataset(tree)
    assert report.classes == ["gadget", "no_test", "only_good"]
    assert messages(report, "error") == [f"{tree}/no_test/test: test split not found (expected test/good/...)"]
    warnings = messages(report, "warning")
    assert messages(report, "note") == [f"{tree}/{c}/validation: no validation split: --save_model takes its "
                                        f"pass/fail threshold parts from the last 10 % of train"
                                        for c in report.classes]
    assert f"{tree}/gadget/test/dent: no gt/ folder: these parts get image-level metrics only (the class's pixel " \
           f"ROCAUC and AU-PRO are not available)" in warnings
    assert sum("no gt/ folder" in w for w in warnings) == len(MVTEC_DEFECTS)
    assert f"{tree}/only_good/test: only good test parts (1): no image or pixel metric is available (add " \
           f"defective test parts)" in warnings
    assert report.counts["gadget"]["test"].masks == 0
    # the same classes without the broken one can be used; main.py's check logs the warnings and goes on
    assert check_dataset(tree, ["gadget", "only_good"]).usable
    require_usable_dataset(tree, ["gadget", "only_good"])
    with pytest.raises(DataError, match=r"(?s)1 problem\(s\).*no_test/test: test split not found"):
        require_usable_dataset(tree, ["gadget", "no_test"])
    report = check_dataset(tree, ["absent"])
    assert messages(report) == [f"{tree}/absent: class folder not found (classes present: gadget, no_test, "
                                f"only_good)"]
    assert check_dataset(tree / "nowhere").errors[0].message == "dataset root not found"


def test_evaluating_a_saved_model_needs_no_train_split(tree):
    shutil.rmtree(tree / "gadget/train")
    assert [p.kind for p in check_dataset(tree, contents=False).errors] == ["split"]
    assert check_dataset(tree, contents=False, fitting=False).usable


def test_real_subset_is_clean_but_unpreprocessed(real_mvtec_subset):
    """Clean but for a note on three masks (MVTec 3D-AD draws some of its masks in 252..254, not 255) and its
    scans being raw: each says so, and how to preprocess them."""
    report = check_dataset(real_mvtec_subset)
    assert report.usable and {(p.severity, p.kind) for p in report.problems} == {("note", "mask values"),
                                                                                 ("warning", "unpreprocessed")}
    notes = [p for p in report.problems if p.severity == "note"]
    assert sorted(Path(p.where).parent.parent.name for p in notes) == ["cut", "hole", "thread"]
    assert len(report.warnings) == 9 and all("utils/preprocessing.py" in p.message for p in report.warnings)
    assert report.counts["cable_gland"]["test"].masks == 4


def test_unconverted_trees_say_which_converter_to_run(raw_eyecandies, tree):
    report = check_dataset(raw_eyecandies, contents=False)
    assert f"{raw_eyecandies}/CandyCane/train/data: raw Eyecandies layout (*_depth.png): convert it first with " \
           f"utils/preprocess_eyecandies.py" in messages(report, "error")
    good = tree / "gadget/train/good"
    (good / "xyz").rename(good / "depth")  # a depth-sensor tree before its conversion
    report = check_dataset(tree, contents=False)
    assert messages(report, "error") == [f"{good}: depth/ images but no xyz/ clouds: convert the tree first with "
                                         f"utils/preprocess_depth.py (docs/own_data.md)",
                                         f"{tree}/gadget/train: no samples (expected <defect>/rgb/*.png with "
                                         f"matching xyz/*.tiff)"]


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        check_main(["--help"])
    help_text = capsys.readouterr().out
    assert info.value.code == 0 and "python -m m3dm.data check datasets/mvtec3d_preprocessed" in help_text
    assert "``" not in help_text and "Exit status 0" in " ".join(help_text.split())


def test_raw_scans_are_said_to_look_unpreprocessed(raw_mvtec, tree, capsys, caplog):
    report = check_dataset(raw_mvtec)
    assert report.usable and {p.kind for p in report.problems} == {"unpreprocessed"} and len(report.problems) == 9
    assert "looks unpreprocessed: " in str(report.problems[0]) and "border holds points" in str(report.problems[0])
    assert check_main(["check", str(raw_mvtec), "-q"]) == 0
    out = capsys.readouterr().out.rstrip()
    assert out.endswith("but it looks UNPREPROCESSED (raw MVTec 3D-AD scans): python utils/preprocessing.py "
                        "<dataset root> writes a preprocessed copy (docs/original.md), then use that")
    # main.py's quick check reads one cloud per class and logs the warning before the run
    require_usable_dataset(raw_mvtec, ["gadget"])
    assert sum("looks unpreprocessed" in r.getMessage() for r in caplog.records) == 1
    assert check_dataset(tree, contents=False).problems == []
