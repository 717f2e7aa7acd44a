"""Official checkpoint formats -> our backbones (quirks 15/16): key mapping, strictness, resolution.

Every file is written here in the official layout (prefixes, wrappers, extra non-backbone entries) from random
tensors; loading must reproduce exactly those tensors, and wrong / broken / absent files must raise a
`CheckpointError` that names the file (and, when absent, where to download it).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from m3dm.errors import CheckpointError
from m3dm.features.point_transformer import PointTransformer
from m3dm.features.vit import RGBBackbone, create_vit
from m3dm.features.weight_files import (
    DINO_VITB8_URL,
    POINT_BERT_URL,
    POINT_MAE_URL,
    find_hf_cache_file,
    resolve_rgb_checkpoint,
)
from m3dm.features.weights import (
    build_point_backbone,
    build_rgb_backbone,
    default_checkpoint_available,
    load_rgb_weights,
    load_strict,
    read_checkpoint,
    read_uff_checkpoint,
)

G, K = 32, 16
TINY_VIT = {"depth": 2, "img_size": 32}


def random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            out[key] = torch.randn(value.shape, generator=gen)
        else:
            out[key] = torch.randint(0, 1000, value.shape, generator=gen, dtype=value.dtype)
    return out


def assert_loaded(module: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(source)
    for key, value in source.items():
        assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def point_sources() -> dict[str, dict[str, torch.Tensor]]:
    return {variant: random_like(PointTransformer(variant, G, K).state_dict(), seed)
            for seed, variant in enumerate(("Point_MAE", "Point_Bert"))}


@pytest.fixture(scope="module")
def pointmae_file(tmp_path_factory, point_sources) -> Path:
    """Point-MAE `pretrain.pth` layout: DDP `module.` prefix, MAE_encoder + decoder entries, training state."""
    source = point_sources["Point_MAE"]
    base = {f"module.MAE_encoder.{k}": v for k, v in source.items()}
    base.update({
        "module.mask_token": torch.zeros(1, 1, 384),
        "module.decoder_pos_embed.0.weight": torch.randn(128, 3),
        "module.MAE_decoder.blocks.0.norm1.weight": torch.randn(384),
        "module.MAE_decoder.norm.weight": torch.randn(384),
        "module.increase_dim.0.weight": torch.randn(96, 384, 1),
    })
    path = tmp_path_factory.mktemp("pointmae") / "pretrain.pth"
    # Point-MAE's pretraining never validates: its metrics keep the plain 0.0 they start with
    torch.save({"base_model": base, "optimizer": {"state": {}}, "epoch": 299, "metrics": {"acc": 0.0},
                "best_metrics": {"acc": 0.0}}, path)
    return path


def pointbert_checkpoint(source: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> dict:
    """Point-BERT layout: transformer_q (+ cls_head, lm_head, mask_token), a momentum copy, the dVAE."""
    base = {f"module.transformer_q.{k}": v for k, v in source.items() if k not in drop}
    # the momentum copy differs from the query encoder in every value (one more), as cheaply as that can be made
    base.update({f"module.transformer_k.{k}": v + 1 for k, v in source.items()})
    base.update({
        "module.transformer_q.cls_head.0.weight": torch.randn(256, 384),
        "module.transformer_q.cls_head.2.bias": torch.randn(256),
        "module.transformer_q.lm_head.weight": torch.randn(8192, 384),
        "module.transformer_q.mask_token": torch.randn(1, 1, 384),
        "module.dvae.encoder.first_conv.0.weight": torch.randn(128, 3, 1),
        "module.dvae.codebook": torch.randn(8192, 256),
        "module.queue": torch.randn(256, 16384),
    })
    # Point-BERT's validation stores its SVM accuracy as a NumPy float64
    return {"base_model": base, "optimizer": {}, "epoch": 300, "metrics": {"acc": np.float64(0.875)},
            "best_metrics": {"acc": np.float64(0.9)}}


@pytest.fixture(scope="module")
def pointbert_file(tmp_path_factory, point_sources) -> Path:
    path = tmp_path_factory.mktemp("pointbert") / "Point-BERT.pth"
    torch.save(pointbert_checkpoint(point_sources["Point_Bert"]), path)
    return path


def truncated_copy(path: Path, target: Path) -> Path:
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


# --------------------------------------------------------------------------------------------- point


def test_pointmae_official_layout_loads_exactly(pointmae_file, point_sources):
    model = build_point_backbone("Point_MAE", path=pointmae_file, num_group=G, group_size=K)
    assert_loaded(model, point_sources["Point_MAE"])
    assert model.training and model.checkpoint_path == pointmae_file


def test_pointmae_without_module_prefix_or_with_base_model_prefix(tmp_path, point_sources):
    source = point_sources["Point_MAE"]
    for prefix in ("MAE_encoder.", "base_model."):
        path = tmp_path / f"{prefix}pth"
        torch.save({"base_model": {prefix + k: v for k, v in source.items()}}, path)
        assert_loaded(build_point_backbone("Point_MAE", path=path, num_group=G, group_size=K), source)


def test_pointbert_official_layout_loads_query_encoder(pointbert_file, point_sources):
    model = build_point_backbone("Point_Bert", path=pointbert_file, num_group=G, group_size=K)
    assert_loaded(model, point_sources["Point_Bert"])


def test_pointbert_without_cls_pos_is_rejected(tmp_path, point_sources):
    path = tmp_path / "no_cls_pos.pth"
    torch.save(pointbert_checkpoint(point_sources["Point_Bert"], drop=("cls_pos",)), path)
    with pytest.raises(CheckpointError) as info:
        build_point_backbone("Point_Bert", path=path, num_group=G, group_size=K)
    assert str(path) in str(info.value) and "cls_pos" in str(info.value) and "1 missing" in str(info.value)


@pytest.mark.parametrize("variant, wrong_file", [("Point_MAE", "pointbert_file"), ("Point_Bert", "pointmae_file")])
def test_point_checkpoint_of_the_other_kind_is_rejected(request, variant, wrong_file):
    path = request.getfixturevalue(wrong_file)
    with pytest.raises(CheckpointError) as info:
        build_point_backbone(variant, path=path, num_group=G, group_size=K)
    message = str(info.value)
    assert str(path) in message and "missing keys" in message


def test_truncated_point_checkpoint_is_rejected(tmp_path, pointmae_file):
    path = truncated_copy(pointmae_file, tmp_path / "pointmae_pretrain.pth")
    with pytest.raises(CheckpointError, match=r"pointmae_pretrain.pth"):
        build_point_backbone("Point_MAE", path=path, num_group=G, group_size=K)


def test_point_checkpoint_without_base_model_is_rejected(tmp_path, point_sources):
    path = tmp_path / "plain.pth"
    torch.save(point_sources["Point_MAE"], path)
    with pytest.raises(CheckpointError, match="base_model"):
        build_point_backbone("Point_MAE", path=path, num_group=G, group_size=K)


def test_point_default_path_is_used(tmp_path, pointmae_file, point_sources):
    # a second name for the module's file (a hard link: the same bytes, not another 88 MB written)
    (tmp_path / "pointmae_pretrain.pth").hardlink_to(pointmae_file)
    model = build_point_backbone("Point_MAE", checkpoint_dir=tmp_path, num_group=G, group_size=K)
    assert model.checkpoint_path == tmp_path / "pointmae_pretrain.pth"
    assert_loaded(model, point_sources["Point_MAE"])


@pytest.mark.parametrize("variant, file_name, url", [("Point_MAE", "pointmae_pretrain.pth", POINT_MAE_URL),
                                                     ("Point_Bert", "Point-BERT.pth", POINT_BERT_URL)])
def test_missing_point_checkpoint_names_download_and_target(tmp_path, variant, file_name, url):
    with pytest.raises(CheckpointError) as info:
        build_point_backbone(variant, checkpoint_dir=tmp_path, num_group=G, group_size=K)
    assert url in str(info.value) and str(tmp_path / file_name) in str(info.value)
    assert "--random_init" in str(info.value) and "random_init=True" not in str(info.value)


def test_missing_rgb_checkpoint_names_the_random_init_flag(tmp_path):
    with pytest.raises(CheckpointError) as info:
        resolve_rgb_checkpoint("vit_base_patch8_224_dino", hf_cache=False, checkpoint_dir=tmp_path)
    assert "--random_init" in str(info.value) and "random_init=True" not in str(info.value)


def test_missing_explicit_point_path_is_an_error_even_with_random_init(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.pth"):
        build_point_backbone("Point_MAE", path=tmp_path / "nope.pth", random_init=True, num_group=G, group_size=K)


def test_point_random_init_warns_loudly(tmp_path, caplog):
    model = build_point_backbone("Point_MAE", random_init=True, checkpoint_dir=tmp_path, num_group=G, group_size=K)
    assert isinstance(model, PointTransformer) and model.checkpoint_path is None
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "RANDOM WEIGHTS: point backbone 'Point_MAE'" in record.getMessage()
    assert str(tmp_path / "pointmae_pretrain.pth") in record.getMessage()
    caplog.clear()
    build_point_backbone("Point_MAE", random_init=True, checkpoint_dir=tmp_path, num_group=G, group_size=K,
                         quiet=True)
    assert caplog.records == []


def test_default_checkpoint_available(tmp_path):
    assert not default_checkpoint_available("xyz", "Point_MAE", checkpoint_dir=tmp_path)
    assert not default_checkpoint_available("rgb", "vit_base_patch8_224_dino", hf_cache=False, checkpoint_dir=tmp_path)
    (tmp_path / "pointmae_pretrain.pth").write_bytes(b"x")
    (tmp_path / "dino_vitbase8_pretrain.pth").write_bytes(b"x")
    assert default_checkpoint_available("xyz", "Point_MAE", checkpoint_dir=tmp_path)
    assert not default_checkpoint_available("xyz", "Point_Bert", checkpoint_dir=tmp_path)
    assert default_checkpoint_available("rgb", "vit_base_patch8_224_dino", hf_cache=False, checkpoint_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- RGB


@pytest.fixture(scope="module")
def vit_source() -> dict[str, torch.Tensor]:
    return random_like(create_vit("vit_tiny_patch16_224", **TINY_VIT).state_dict(), seed=10)


def test_dino_plain_release_loads_exactly(tmp_path, vit_source):
    path = tmp_path / "dino_plain.pth"
    torch.save(vit_source, path)
    backbone = build_rgb_backbone("vit_tiny_patch16_224", path=path, hf_cache=False, **TINY_VIT)
    assert_loaded(backbone.vit, vit_source)
    assert backbone.checkpoint_path == path


def test_dino_training_checkpoint_takes_teacher_backbone(tmp_path, vit_source, capsys):
    student = random_like(vit_source, seed=11)
    head = {"head.mlp.0.weight": torch.randn(64, 192), "head.last_layer.weight_g": torch.randn(1000, 1)}
    checkpoint = {
        "teacher": {**{f"backbone.{k}": v for k, v in vit_source.items()}, **head},
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "optimizer": {}, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 1000)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    backbone = build_rgb_backbone("vit_tiny_patch16_224", path=path, hf_cache=False, **TINY_VIT)
    assert_loaded(backbone.vit, vit_source)
    vit = create_vit("vit_tiny_patch16_224", **TINY_VIT)
    load_rgb_weights(vit, path, dino_network="student")
    assert_loaded(vit, student)


def test_timm_safetensors_and_bin_ignore_classifier(tmp_path, vit_source):
    with_head = {**vit_source, "head.weight": torch.randn(1000, 192), "head.bias": torch.randn(1000)}
    st_path = tmp_path / "model.safetensors"
    save_file(with_head, str(st_path))
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": with_head}, bin_path)
    for path in (st_path, bin_path):
        backbone = build_rgb_backbone("vit_tiny_patch16_224", path=path, hf_cache=False, **TINY_VIT)
        assert_loaded(backbone.vit, vit_source)


def test_vit_of_another_size_is_rejected(tmp_path, vit_source):
    path = tmp_path / "vit_tiny.pth"
    torch.save(vit_source, path)
    with pytest.raises(CheckpointError) as info:
        build_rgb_backbone("vit_small_patch16_224", path=path, hf_cache=False, **TINY_VIT)
    assert str(path) in str(info.value) and "wrong shape" in str(info.value)


def test_vit_with_fewer_blocks_is_rejected(tmp_path, vit_source):
    path = tmp_path / "vit_tiny_2blocks.pth"
    torch.save(vit_source, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        build_rgb_backbone("vit_tiny_patch16_224", path=path, hf_cache=False, depth=3, img_size=32)


def test_corrupt_rgb_files_are_rejected(tmp_path, vit_source):
    st_path = tmp_path / "model.safetensors"
    save_file(vit_source, str(st_path))
    broken_st = truncated_copy(st_path, tmp_path / "broken.safetensors")
    pth_path = tmp_path / "dino.pth"
    torch.save(vit_source, pth_path)
    broken_pth = truncated_copy(pth_path, tmp_path / "broken_dino.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (broken_st, broken_pth, garbage):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint file .*{path.name}"):
            read_checkpoint(path)


def test_reader_refuses_urls_absent_files_and_npz_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match=r"--resume https://example.org/c.pth: nothing is downloaded"):
        read_checkpoint("https://example.org/c.pth", kind="--resume")
    with pytest.raises(CheckpointError, match=r"UFF checkpoint file .*absent.pth does not exist\. Train one"):
        read_checkpoint(tmp_path / "absent.pth", kind="UFF checkpoint", missing_hint="Train one.")
    (tmp_path / "jax.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"jax.npz: JAX .npz checkpoints are not supported"):
        read_checkpoint(tmp_path / "jax.npz")


def as_pickled_by_numpy_1(path: Path, target: Path) -> Path:
    """A copy of the torch file ``path`` at ``target`` with NumPy scalars named as NumPy 1 pickles them
    (`numpy.core`, not `numpy._core`): the official files were written before NumPy 2."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            copy.writestr(info, data)
    return target


def test_reader_loads_the_official_objects_with_the_weights_only_loader(tmp_path, monkeypatch, pointbert_file):
    """Ours (a dict of args), the reference's UFF and DINO files (an argparse namespace) and Point-BERT's (NumPy
    float64 accuracies, pickled by NumPy 1 or 2) load, each with the weights-only unpickler alone."""
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k["weights_only"]) or real_load(*a, **k))
    torch.save({"model": {"w": torch.ones(2)}, "args": {"rgb_dim": 4}}, tmp_path / "ours.pth")
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, dist_url="env://")},
               tmp_path / "reference.pth")
    numpy_1 = as_pickled_by_numpy_1(pointbert_file, tmp_path / "Point-BERT.pth")
    pickled = torch.serialization.get_unsafe_globals_in_checkpoint(numpy_1)
    assert sorted(pickled) == ["numpy.core.multiarray.scalar", "numpy.dtype"]
    assert read_checkpoint(tmp_path / "ours.pth")["args"] == {"rgb_dim": 4}
    assert read_checkpoint(tmp_path / "reference.pth")["args"].dist_url == "env://"
    for path in (pointbert_file, numpy_1):
        metrics = read_checkpoint(path)["best_metrics"]
        assert isinstance(metrics["acc"], np.float64) and metrics["acc"] == 0.9
    assert calls == [True] * 4


class RunsCode:
    """Unpickling it creates the file `target`: what a crafted checkpoint could do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class PlainObject:
    pass


@pytest.mark.parametrize("writer", ["protocol 2", "protocol 4", "legacy format", "plain pickle"])
def test_reader_refuses_a_pickle_that_runs_code_naming_file_and_global(tmp_path, writer, capfd):
    target = tmp_path / "ran"
    checkpoint = {"model": {"w": torch.ones(2)}, "args": RunsCode(target)}
    path = tmp_path / "crafted.pth"
    if writer == "plain pickle":
        path.write_bytes(pickle.dumps(checkpoint, protocol=4))
    else:
        torch.save(checkpoint, path, pickle_protocol=4 if writer == "protocol 4" else 2,
                   _use_new_zipfile_serialization=writer != "legacy format")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, kind="UFF checkpoint")
    assert str(info.value) == (f"UFF checkpoint file {path} is refused: it pickles {os.system.__module__}.system, "
                               f"which is not a tensor or a plain value and could run code when loaded")
    assert not target.exists()
    assert capfd.readouterr().err == ""  # no warning of torch's either


def test_reader_refuses_any_other_class(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": {}, "args": PlainObject()}, path)
    with pytest.raises(CheckpointError, match=rf"object.pth is refused: it pickles {__name__}.PlainObject, which"):
        read_checkpoint(path)


def test_uff_reader_needs_a_model_state_dict(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "uff.pth")
    assert read_uff_checkpoint(tmp_path / "uff.pth")["epoch"] == 3
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth is not a checkpoint of the fusion_pretrain.py .*no "
                                              r"'model' state dict \(found \['state_dict'\]\)"):
        read_uff_checkpoint(tmp_path / "other.pth")


def fake_hf_cache(cache_dir: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """Minimal Hugging Face hub cache layout: refs/main -> snapshots/<commit>/<file>."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / filename))
    return snapshot / filename


def test_hf_cache_lookup_and_use(tmp_path, vit_source):
    cache = tmp_path / "hub"
    cache.mkdir()
    assert find_hf_cache_file("vit_tiny_patch16_224.augreg_in21k_ft_in1k", cache) is None
    stored = fake_hf_cache(cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors",
                           {**vit_source, "head.weight": torch.randn(1000, 192), "head.bias": torch.randn(1000)})
    assert find_hf_cache_file("vit_tiny_patch16_224.augreg_in21k_ft_in1k", cache) == stored
    assert find_hf_cache_file("vit_tiny_patch16_224", cache) == stored  # default tag
    assert find_hf_cache_file("vit_small_patch16_224", cache) is None
    backbone = build_rgb_backbone("vit_tiny_patch16_224", checkpoint_dir=tmp_path / "none", hf_cache=cache,
                                  **TINY_VIT)
    assert backbone.checkpoint_path == stored
    assert_loaded(backbone.vit, vit_source)


def test_rgb_default_path_resolution(tmp_path):
    target = tmp_path / "dino_vitbase8_pretrain.pth"
    target.write_bytes(b"placeholder")
    assert resolve_rgb_checkpoint("vit_base_patch8_224_dino", checkpoint_dir=tmp_path, hf_cache=False) == target
    small = tmp_path / "dino_deitsmall8_pretrain.pth"
    small.write_bytes(b"placeholder")
    assert resolve_rgb_checkpoint("vit_small_patch8_224_dino", checkpoint_dir=tmp_path, hf_cache=False) == small


def test_missing_dino_checkpoint_names_download_and_target(tmp_path):
    with pytest.raises(CheckpointError) as info:
        build_rgb_backbone("vit_base_patch8_224_dino", checkpoint_dir=tmp_path, hf_cache=tmp_path)
    message = str(info.value)
    assert DINO_VITB8_URL in message and str(tmp_path / "dino_vitbase8_pretrain.pth") in message


def test_missing_supervised_vit_points_to_timm_weights(tmp_path):
    with pytest.raises(CheckpointError) as info:
        resolve_rgb_checkpoint("vit_base_patch8_224", checkpoint_dir=tmp_path, hf_cache=tmp_path)
    message = str(info.value)
    assert "huggingface.co/timm/vit_base_patch8_224.augreg_in21k_ft_in1k" in message
    assert str(tmp_path / "vit_base_patch8_224.augreg_in21k_ft_in1k.safetensors") in message


# ------------------------------------------------------------------------------------------ load_strict


def test_load_strict_reports_counts_and_ignores_extra_keys(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    good = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4), "1.weight": torch.ones(4),
            "1.bias": torch.zeros(4), "extra.weight": torch.ones(1)}
    assert load_strict(module, good, "file.pth") == ["extra.weight"]
    assert torch.equal(module[0].weight, torch.ones(4, 3))
    bad = {"0.weight": torch.ones(5, 3), "1.weight": torch.ones(4), "extra.weight": torch.ones(1)}
    with pytest.raises(CheckpointError) as info:
        load_strict(module, bad, "some/file.pth")
    message = str(info.value)
    assert "some/file.pth" in message
    assert "2 missing keys: 0.bias, 1.bias" in message
    assert "1 keys with the wrong shape" in message and "0.weight" in message
    assert "1 unexpected keys: extra.weight" in message
    assert load_strict(module, {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)}, "f",
                       ignore_prefixes=("1.",)) == []


def test_load_strict_without_allow_unexpected_refuses_extra_keys(tmp_path):
    module = torch.nn.Linear(3, 4)
    before = module.weight.detach().clone()
    state = {"weight": torch.ones(4, 3), "bias": torch.zeros(4), "extra.weight": torch.ones(1)}
    with pytest.raises(CheckpointError) as info:
        load_strict(module, state, "uff.pth", allow_unexpected=False, description="a block for width 3")
    message = str(info.value)
    assert "checkpoint uff.pth does not fit a block for width 3 (2 keys expected)" in message
    assert "1 unexpected keys: extra.weight" in message and "missing" not in message
    assert torch.equal(module.weight, before)  # nothing was loaded
    del state["extra.weight"]
    assert load_strict(module, state, "uff.pth", allow_unexpected=False) == []
    assert torch.equal(module.weight, torch.ones(4, 3))


# ------------------------------------------------------------------------------------ pure architectures


def test_architectures_read_no_file_and_the_builders_record_the_source(tmp_path, vit_source):
    """RGBBackbone and PointTransformer take no weight-file argument and import no weight reader; the builders
    record the file they loaded (None for random weights)."""
    import ast
    import inspect

    import m3dm.features.point_transformer
    import m3dm.features.vit

    for module in (m3dm.features.vit, m3dm.features.point_transformer):
        imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(module)))
                    if isinstance(node, ast.ImportFrom)}
        assert not {"m3dm.features.weights", "m3dm.features.weight_files"} & imported, module.__name__
    assert RGBBackbone("vit_tiny_patch16_224", **TINY_VIT).checkpoint_path is None
    with pytest.raises(TypeError):
        RGBBackbone("vit_tiny_patch16_224", checkpoint=tmp_path / "x.pth", **TINY_VIT)
    assert PointTransformer("Point_MAE", G, K).checkpoint_path is None
    assert build_rgb_backbone("vit_tiny_patch16_224", random_init=True, hf_cache=False, checkpoint_dir=tmp_path,
                              quiet=True, **TINY_VIT).checkpoint_path is None
