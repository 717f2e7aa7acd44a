"""BTF's RGB features against timm's wide_resnet50_2 called directly, and its weight files (official layouts)."""

import pytest
import timm
import torch

from m3dm.errors import CheckpointError
from m3dm.features.weight_files import WIDE_RESNET_FILE, WIDE_RESNET_URL
from m3dm.features.weights import build_wide_resnet


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A randomly initialised timm wide_resnet50_2 (classifier included) saved as timm's release file is laid
    out: a plain state dict."""
    torch.manual_seed(5)
    model = timm.create_model("wide_resnet50_2", pretrained=False)
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(model.state_dict(), folder / WIDE_RESNET_FILE)
    return folder / WIDE_RESNET_FILE, model


@pytest.mark.slow
def test_features_are_timms_layers_2_and_3_pooled_to_the_grid(official_file):
    path, full = official_file
    ours = build_wide_resnet(checkpoint_dir=path.parent, hf_cache=False).eval()
    assert ours.checkpoint_path == path
    direct = timm.create_model("wide_resnet50_2", pretrained=False, features_only=True, out_indices=(2, 3))
    direct.load_state_dict({k: v for k, v in full.state_dict().items() if k in direct.state_dict()})
    direct.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer2, layer3 = direct(images)
        pool = torch.nn.AvgPool2d(3, stride=1)
        resize = torch.nn.AdaptiveAvgPool2d((28, 28))
        expected = torch.cat([resize(pool(layer2)), resize(pool(layer3))], dim=1)
        got = ours(images)
    assert layer2.shape[1:] == (512, 28, 28) and layer3.shape[1:] == (1024, 14, 14)
    assert got.shape == (2, 1536, 28, 28) and ours.feature_dim == 1536
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_missing_file_names_what_to_download_and_where(tmp_path):
    with pytest.raises(CheckpointError) as error:
        build_wide_resnet(checkpoint_dir=tmp_path, hf_cache=False)
    message = str(error.value)
    assert WIDE_RESNET_URL in message and str(tmp_path / WIDE_RESNET_FILE) in message


def test_random_init_without_a_file(tmp_path):
    model = build_wide_resnet(checkpoint_dir=tmp_path, hf_cache=False, random_init=True, quiet=True)
    assert model.checkpoint_path is None


def test_wrong_file_is_refused(tmp_path):
    path = tmp_path / "not_a_resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"not_a_resnet\.pth"):
        build_wide_resnet(path)
