"""UFF fusion block, its contrastive loss on one process and across DDP processes, and the
strict checkpoint loader (quirk 24)."""

import argparse
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from m3dm.errors import CheckpointError
from m3dm.uff.block import FeatureFusionBlock, load_fusion_block
from m3dm.uff.loss import contrastive_loss, gather_rows

C = 24  # a small RGB width keeps these tests fast; the block is built for any width


def sample_batch(batch: int, patches: int, rgb_dim: int = C, seed: int = 0):
    """Random inputs with empty xyz patches (all zero) and patches with a single zero entry (also dropped)."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, patches, 1152, generator=g)
    rgb = torch.randn(batch, patches, rgb_dim, generator=g)
    for b in range(batch):
        xyz[b, : 2 + 3 * b] = 0.0  # a different number of empty patches per sample
        xyz[b, -1, 7] = 0.0
    return xyz, rgb


def loop_loss(block: FeatureFusionBlock, xyz: torch.Tensor, rgb: torch.Tensor) -> float:
    """The reference loss written out row by row in float64: CE of each kept RGB query against all kept keys."""
    T = block.temperature
    with torch.no_grad():
        xyz_part = F.linear(F.gelu(F.linear(F.layer_norm(xyz, (1152,), block.xyz_norm.weight, block.xyz_norm.bias),
                                            block.xyz_mlp.fc1.weight, block.xyz_mlp.fc1.bias)),
                            block.xyz_mlp.fc2.weight, block.xyz_mlp.fc2.bias)
        rgb_part = F.linear(F.gelu(F.linear(F.layer_norm(rgb, (rgb.shape[-1],), block.rgb_norm.weight,
                                                         block.rgb_norm.bias),
                                            block.rgb_mlp.fc1.weight, block.rgb_mlp.fc1.bias)),
                            block.rgb_mlp.fc2.weight, block.rgb_mlp.fc2.bias)
        queries, keys = [], []
        for b in range(xyz.shape[0]):
            for p in range(xyz.shape[1]):
                if all(float(v) != 0.0 for v in xyz[b, p]):
                    queries.append(block.rgb_head(rgb_part[b, p]).double())
                    keys.append(block.xyz_head(xyz_part[b, p]).double())
    queries = [q / q.norm() for q in queries]
    keys = [k / k.norm() for k in keys]
    total = 0.0
    for i, q in enumerate(queries):
        scores = [float(q @ k) / T for k in keys]
        total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    return total / len(queries) * 2 * T


def test_block_has_the_reference_parameters():
    block = FeatureFusionBlock(1152, 768, mlp_ratio=4)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "xyz_norm.weight": (1152,), "xyz_norm.bias": (1152,),
        "xyz_mlp.fc1.weight": (4608, 1152), "xyz_mlp.fc1.bias": (4608,),
        "xyz_mlp.fc2.weight": (1152, 4608), "xyz_mlp.fc2.bias": (1152,),
        "rgb_norm.weight": (768,), "rgb_norm.bias": (768,),
        "rgb_mlp.fc1.weight": (3072, 768), "rgb_mlp.fc1.bias": (3072,),
        "rgb_mlp.fc2.weight": (768, 3072), "rgb_mlp.fc2.bias": (768,),
        "rgb_head.weight": (256, 768), "rgb_head.bias": (256,),
        "xyz_head.weight": (256, 1152), "xyz_head.bias": (256,),
    }
    assert block.temperature == 1.0


@pytest.mark.parametrize("train", [True, False])
def test_block_mlps_are_linear_exact_gelu_linear_bit_for_bit(train):
    """timm's Mlp in place of the former own class (fc2(GELU(fc1(x))), dropout 0): the same values exactly, and
    the same initial weights from the same seed as two Linear layers built in that order."""
    torch.manual_seed(6)
    block = FeatureFusionBlock(rgb_dim=C).train(train)
    torch.manual_seed(6)  # the block's first random layers: its xyz MLP's (a LayerNorm draws nothing)
    fc1, fc2 = torch.nn.Linear(1152, 4608), torch.nn.Linear(4608, 1152)
    assert torch.equal(block.xyz_mlp.fc1.weight, fc1.weight) and torch.equal(block.xyz_mlp.fc2.bias, fc2.bias)
    xyz, rgb = sample_batch(2, 5)
    with torch.no_grad():
        for mlp, x in ((block.xyz_mlp, xyz), (block.rgb_mlp, rgb)):
            assert torch.equal(mlp(x), F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight,
                                                mlp.fc2.bias))


def test_without_a_process_group_the_gather_is_the_identity_and_the_loss_a_mean():
    rows = torch.randn(5, 8)
    gathered, offset, total = gather_rows(rows)
    assert gathered is rows and (offset, total) == (0, 5)
    q, k = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    expected = F.cross_entropy(q @ k.T / 0.5, torch.arange(5)) * 2 * 0.5
    torch.testing.assert_close(contrastive_loss(q, k, temperature=0.5), expected, rtol=1e-6, atol=0)


def test_feature_fusion_is_norm_then_mlp_per_modality_xyz_first():
    torch.manual_seed(0)
    block = FeatureFusionBlock(rgb_dim=C)
    xyz, rgb = sample_batch(2, 5)
    fused = block.feature_fusion(xyz, rgb)
    assert fused.shape == (2, 5, 1152 + C)
    for b in range(2):
        for p in range(5):
            x = F.layer_norm(xyz[b, p], (1152,), block.xyz_norm.weight, block.xyz_norm.bias)
            x = block.xyz_mlp.fc2.weight @ F.gelu(block.xyz_mlp.fc1.weight @ x + block.xyz_mlp.fc1.bias) \
                + block.xyz_mlp.fc2.bias
            r = F.layer_norm(rgb[b, p], (C,), block.rgb_norm.weight, block.rgb_norm.bias)
            r = block.rgb_mlp.fc2.weight @ F.gelu(block.rgb_mlp.fc1.weight @ r + block.rgb_mlp.fc1.bias) \
                + block.rgb_mlp.fc2.bias
            torch.testing.assert_close(fused[b, p], torch.cat([x, r]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_loss_equals_row_by_row_cross_entropy_times_two_t(temperature):
    torch.manual_seed(0)
    block = FeatureFusionBlock(rgb_dim=C, temperature=temperature)
    xyz, rgb = sample_batch(3, 10)
    kept = sum(1 for b in range(3) for p in range(10) if (xyz[b, p] != 0).all())
    assert kept == 7 + 4 + 1
    loss = block(xyz, rgb)
    assert loss.ndim == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(loop_loss(block, xyz, rgb), rel=1e-5)


def _ddp_worker(rank: int, world: int, init_file: str, data: dict, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(FeatureFusionBlock(rgb_dim=C))
    start, stop = data["splits"][rank]
    loss = model(data["xyz"][start:stop], data["rgb"][start:stop])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(),
                    "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_processes_give_the_single_process_loss_and_gradients(tmp_path):
    """Uneven shares (1 and 2 samples, different numbers of kept patches): the DDP-averaged gradients and the
    mean of the per-process losses equal the loss and gradients of the whole batch on one process."""
    xyz, rgb = sample_batch(3, 40, seed=3)
    data = {"xyz": xyz, "rgb": rgb, "splits": [(0, 1), (1, 3)]}
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), data, str(tmp_path / "out.pt")), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "out.pt", weights_only=True)

    torch.manual_seed(0)
    block = FeatureFusionBlock(rgb_dim=C)
    loss = block(xyz, rgb)
    loss.backward()
    assert float(distributed["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(loop_loss(block, xyz, rgb), rel=1e-5)
    for name, param in block.named_parameters():
        torch.testing.assert_close(distributed["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------- loader

def save_checkpoint(path, model_state, **extra) -> None:
    torch.save({"model": model_state, "optimizer": {}, "epoch": 0, **extra}, path)


def test_loader_restores_the_weights_strictly(tmp_path):
    torch.manual_seed(4)
    trained = FeatureFusionBlock(rgb_dim=C)
    save_checkpoint(tmp_path / "uff.pth", trained.state_dict(), args={"rgb_dim": C})
    block = load_fusion_block(tmp_path / "uff.pth", rgb_dim=C)
    assert not block.training
    for name, value in trained.state_dict().items():
        assert torch.equal(block.state_dict()[name], value)


def test_loader_refuses_a_wrong_file_naming_the_missing_keys(tmp_path):
    block_state = FeatureFusionBlock(rgb_dim=C).state_dict()  # one random block (11 M values) for the three files
    state = {k: v for k, v in block_state.items() if not k.startswith("xyz_head")}
    state["proj.weight"] = torch.zeros(3)
    save_checkpoint(tmp_path / "wrong.pth", state)
    with pytest.raises(CheckpointError, match=r"wrong.pth does not fit a UFF fusion block for RGB width 24") as error:
        load_fusion_block(tmp_path / "wrong.pth", rgb_dim=C)
    assert "2 missing keys: xyz_head.weight, xyz_head.bias" in str(error.value)
    assert "1 unexpected keys: proj.weight" in str(error.value)
    state = {**block_state, "proj.weight": torch.zeros(3)}
    save_checkpoint(tmp_path / "extra.pth", state)  # every key right, one more: refused too (strict)
    with pytest.raises(CheckpointError, match=r"extra.pth does not fit.*\n  1 unexpected keys: proj.weight$"):
        load_fusion_block(tmp_path / "extra.pth", rgb_dim=C)

    torch.save(block_state, tmp_path / "bare.pth")  # no {'model': ...}
    with pytest.raises(CheckpointError, match=r"bare.pth is not a checkpoint of the fusion_pretrain.py .* no 'model'"):
        load_fusion_block(tmp_path / "bare.pth", rgb_dim=C)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read UFF checkpoint file .*junk.pth"):
        load_fusion_block(tmp_path / "junk.pth", rgb_dim=C)
    with pytest.raises(CheckpointError, match=r"absent.pth does not exist. Train one with fusion_pretrain.py"):
        load_fusion_block(tmp_path / "absent.pth", rgb_dim=C)


@pytest.mark.parametrize("args", ["dict", "namespace", None])
def test_loader_refuses_another_rgb_width(tmp_path, args):
    """Width from the checkpoint's args when there (ours: a dict; the reference's: a pickled argparse namespace,
    which the weights-only loader is allowed to build), else from the RGB LayerNorm."""
    extra = {"args": {"dict": {"rgb_dim": 32}, "namespace": argparse.Namespace(rgb_dim=32, lr=0.1)}[args]} if args \
        else {}
    save_checkpoint(tmp_path / "uff.pth", FeatureFusionBlock(rgb_dim=32).state_dict(), **extra)
    with pytest.raises(CheckpointError, match=r"width 32.*gives 24"):
        load_fusion_block(tmp_path / "uff.pth", rgb_dim=C)
    assert load_fusion_block(tmp_path / "uff.pth", rgb_dim=32).rgb_dim == 32


def test_large_logits_are_made_block_by_block_with_the_same_loss_and_gradients(monkeypatch):
    """Past MAX_LOGIT_ELEMENTS (many processes' keys) the loss is made one block of query rows at a time and
    recomputed in the backward pass: the same loss and gradients as the logits made at once, to float rounding."""
    from m3dm.uff import loss as loss_module

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(97, 16, generator=generator)
    k = torch.randn(97, 16, generator=generator)

    def loss_and_grads():
        queries, keys = q.clone().requires_grad_(), k.clone().requires_grad_()
        value = contrastive_loss(queries, keys, temperature=0.7)
        value.backward()
        return value.detach(), queries.grad, keys.grad

    at_once = loss_and_grads()
    monkeypatch.setattr(loss_module, "MAX_LOGIT_ELEMENTS", 100)
    monkeypatch.setattr(loss_module, "LOGIT_BLOCK_ELEMENTS", 10 * 97)  # blocks of 10 query rows, the last of 7
    blocks = loss_and_grads()
    for a, b in zip(at_once, blocks):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)  # float32 sums taken in another order
