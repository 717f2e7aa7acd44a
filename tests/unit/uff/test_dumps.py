"""UFF pretraining dumps (quirk 20): the reference's scrambled RGB rows, the aligned layout, the files'
names and contents as the pretraining dataset reads them back."""

import pytest
import torch

from m3dm.uff.dumps import FeatureDumpDataset, pretraining_features, save_pretraining_features, scrambled_rgb_rows

TOKENS = 784  # the 28 x 28 tokens of a ViT-*/8 at 224 px
ROWS = 3136  # the 56 x 56 xyz patches


def token_above(row: int) -> int:
    """The RGB token spatially under xyz patch ``row`` (2x nearest upsampling of the 28 x 28 grid to 56 x 56)."""
    y, x = divmod(row, 56)
    return (y // 2) * 28 + x // 2


def test_scrambled_rows_follow_the_reference_formula_and_are_aligned_only_eight_times():
    rgb = torch.arange(TOKENS, dtype=torch.float32)[:, None].repeat(1, 3)  # token t holds the value t
    rows = scrambled_rgb_rows(rgb, ROWS)
    assert rows.shape == (ROWS, 3)
    tokens = [int(v) for v in rows[:, 0]]
    assert tokens == [(4 * (t % TOKENS) + t // TOKENS) % TOKENS for t in range(ROWS)]
    assert torch.bincount(rows[:, 0].long()).tolist() == [4] * TOKENS  # every token four times
    assert sum(token == token_above(t) for t, token in enumerate(tokens)) == 8  # 8 of 3136 rows aligned (quirk 20)


def test_scrambled_rows_need_four_rows_per_token():
    with pytest.raises(ValueError, match="4 x 196 = 784 xyz patches, got 3136: use --fix_quirks"):
        scrambled_rgb_rows(torch.zeros(196, 8), ROWS)


def test_pretraining_features_are_xyz_then_rgb_scrambled_unless_aligned():
    g = torch.Generator().manual_seed(0)
    xyz, rgb = torch.randn(ROWS, 1152, generator=g), torch.randn(TOKENS, 16, generator=g)
    aligned_rgb = rgb[[token_above(t) for t in range(ROWS)]]
    reference = pretraining_features(xyz, rgb, aligned_rgb, aligned=False)
    fixed = pretraining_features(xyz, rgb, aligned_rgb, aligned=True)
    assert reference.shape == fixed.shape == (ROWS, 1152 + 16) and reference.is_contiguous()
    assert torch.equal(reference[:, :1152], xyz) and torch.equal(fixed[:, :1152], xyz)
    assert torch.equal(reference[:, 1152:], scrambled_rgb_rows(rgb, ROWS))
    assert torch.equal(fixed[:, 1152:], aligned_rgb)


def test_saved_dumps_carry_the_reference_names_and_read_back_as_the_dataset(tmp_path):
    folder = tmp_path / "patch_lib"
    features = [torch.randn(64, 1152 + 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    paths = [save_pretraining_features(folder, "bagel", i, f[:, :]) for i, f in enumerate(features)]
    assert [p.name for p in paths] == ["bagel0.pt", "bagel1.pt", "bagel2.pt"]
    assert sorted(p.name for p in folder.iterdir()) == ["bagel0.pt", "bagel1.pt", "bagel2.pt"]  # no temporaries
    dataset = FeatureDumpDataset(folder)
    assert len(dataset) == 3 and dataset.shape == (64, 1160) and dataset.rgb_dim == 8
    for i, f in enumerate(features):
        assert torch.equal(dataset[i], f)
