"""UFF pretraining: torchrun / torch.distributed.launch with 2 CPU processes (gloo) against one
process, resume, the reference's lr schedule and optimiser, clear errors for bad feature folders, and the end
to end: main.py dumps -> 2-process pretraining -> main.py DINO+Point_MAE+Fusion with the checkpoint."""

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import main as main_module
from m3dm.app.pretrain import build_parser, main, settings_from_argv, train
from m3dm.data.synthetic import write_mvtec3d
from m3dm.errors import CheckpointError, FeatureDumpError
from m3dm.preprocess.mvtec3d import preprocess_dataset
from m3dm.runtime import Processes
from m3dm.uff.block import FeatureFusionBlock, load_fusion_block
from m3dm.uff.dumps import FeatureDumpDataset
from m3dm.uff.pretrain import PretrainSettings, TrainingRun

ROOT = Path(__file__).resolve().parents[2]  # the repository: fusion_pretrain.py is run from there
C = 48  # RGB width of the synthetic dumps (768 for ViT-B; the block follows the dumps)
COMMON = ["--device", "cpu", "--num_workers", "0", "--seed", "0"]


def write_dumps(folder: Path, files: int, rows: int = 64, rgb_dim: int = C, seed: int = 0) -> Path:
    """Dumps whose xyz and RGB rows share a latent code (so there is something to learn); the first eighth of
    the rows of every file are empty xyz patches."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    to_xyz, to_rgb = torch.randn(16, 1152, generator=g), torch.randn(16, rgb_dim, generator=g)
    for i in range(files):
        latent = torch.randn(rows, 16, generator=g)
        xyz = latent @ to_xyz + 0.5 * torch.randn(rows, 1152, generator=g)
        xyz[: rows // 8] = 0.0
        rgb = latent @ to_rgb + 0.5 * torch.randn(rows, rgb_dim, generator=g)
        torch.save(torch.cat([xyz, rgb], dim=1), folder / f"gadget{i}.pt")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", *launcher, "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "fusion_pretrain.py", *argv]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # args are a plain dict


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> Path:
    return write_dumps(tmp_path_factory.mktemp("dumps") / "patch_lib", files=16)


TRAIN = ["--epochs", "3", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def two_processes(dumps, tmp_path_factory) -> Path:
    """torchrun, 2 processes x 2 samples: a global batch of 4, 4 steps per epoch."""
    out = tmp_path_factory.mktemp("torchrun")
    launch(["torch.distributed.run"], ["--data_path", str(dumps), "--output_dir", str(out), "--batch_size", "2",
                                       *TRAIN, *COMMON])
    return out


@pytest.fixture(scope="module")
def one_process(dumps, tmp_path_factory) -> Path:
    """The same global batches in one plain process (no launcher)."""
    out = tmp_path_factory.mktemp("single")
    assert train(["--data_path", str(dumps), "--output_dir", str(out), "--batch_size", "4", *TRAIN, *COMMON]) \
        == out / "checkpoint-2.pth"
    return out


@pytest.mark.slow
def test_torchrun_two_processes_train_and_rank_zero_writes_one_series(two_processes):
    assert sorted(p.name for p in two_processes.iterdir()) == \
        ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "log.txt"]
    log = read_log(two_processes)
    assert [line["epoch"] for line in log] == [0, 1, 2]  # one line per epoch: only rank 0 writes
    losses = [line["train_loss"] for line in log]
    assert losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 0.3, losses
    checkpoint = load(two_processes / "checkpoint-2.pth")
    assert set(checkpoint) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["world_size"] == 2
    assert checkpoint["args"]["rgb_dim"] == C and checkpoint["model"]["rgb_norm.weight"].shape == (C,)
    # every flag, and what the run derived from them, its processes and the dumps
    assert set(checkpoint["args"]) == {f.name for f in fields(PretrainSettings)} | {"rgb_dim", "xyz_dim", "patches"}
    assert (checkpoint["args"]["lr"], checkpoint["args"]["weight_decay"], checkpoint["args"]["patches"]) == \
        (1e-3, 0.01, 64)
    block = load_fusion_block(two_processes / "checkpoint-2.pth", rgb_dim=C)
    assert torch.equal(block.xyz_head.weight, checkpoint["model"]["xyz_head.weight"])


@pytest.mark.slow
def test_two_processes_give_the_single_process_losses_and_weights(two_processes, one_process):
    """Same global batches (the sampler's order does not depend on the number of processes), same initial
    weights: the step-1 loss, every epoch's loss and the trained weights agree."""
    two, one = read_log(two_processes), read_log(one_process)
    assert two[0]["train_first_step_loss"] == pytest.approx(one[0]["train_first_step_loss"], rel=1e-6)
    # the first loss is that of an untrained block on 4 x 56 kept patches: about 2 ln(224)
    assert one[0]["train_first_step_loss"] == pytest.approx(2 * math.log(4 * 56), rel=0.05)
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_lr"] == pytest.approx(b["train_lr"], rel=1e-9)
    two_state, one_state = load(two_processes / "checkpoint-2.pth"), load(one_process / "checkpoint-2.pth")
    for name, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][name], value, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_same_optimizer_state(dumps, one_process, tmp_path):
    argv = ["--data_path", str(dumps), "--output_dir", str(tmp_path), "--batch_size", "4", *TRAIN, *COMMON]
    assert train([*argv, "--resume", str(one_process / "checkpoint-1.pth")]) == tmp_path / "checkpoint-2.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2.pth", "log.txt"]
    assert [line["epoch"] for line in read_log(tmp_path)] == [2]
    assert load(tmp_path / "checkpoint-2.pth")["args"]["start_epoch"] == 2
    resumed, uninterrupted = load(tmp_path / "checkpoint-2.pth"), load(one_process / "checkpoint-2.pth")
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    states = resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"]
    assert states[0].keys() == states[1].keys() and len(states[0]) == 16
    for index, state in states[1].items():
        assert float(state["step"]) == 12  # 3 epochs x 4 steps: the moments were carried over, not restarted
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[0][index][key], state[key]), (index, key)
    assert resumed["optimizer"]["param_groups"] == uninterrupted["optimizer"]["param_groups"]


@pytest.mark.slow
def test_torch_distributed_launch_passes_local_rank_and_trains(dumps, two_processes, tmp_path):
    launch(["torch.distributed.launch"], ["--data_path", str(dumps), "--output_dir", str(tmp_path),
                                          "--batch_size", "2", "--epochs", "1", "--lr", "1e-3", *COMMON])
    (line,) = read_log(tmp_path)  # epoch 0 has the same warm-up whatever --epochs: same as torchrun's
    assert line["train_loss"] == pytest.approx(read_log(two_processes)[0]["train_loss"], rel=1e-6)
    for flag in ("--local_rank", "--local-rank"):
        assert build_parser().parse_args([f"{flag}=1"]).local_rank == 1


def test_lr_schedule_accumulation_and_optimizer_follow_the_reference(tmp_path):
    """6 files, batch 2, accum 2: 3 steps per epoch, one optimiser step (the last half window is dropped);
    lr = blr x 4 / 256, set at steps 0 and 2 only; --weight_decay honoured when given."""
    data = write_dumps(tmp_path / "dumps", files=6, rows=16)
    train(["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--accum_iter",
           "2", "--epochs", "2", "--blr", "0.002", "--weight_decay", "0.05", *COMMON])
    peak = 0.002 * 4 / 256
    cosine = lambda x: peak * 0.5 * (1 + math.cos(math.pi * (x - 1)))
    expected_lrs = [[0.0, 0.0, peak * (2 / 3)], [cosine(1.0), cosine(1.0), cosine(1 + 2 / 3)]]
    for line, lrs in zip(read_log(tmp_path / "out"), expected_lrs):
        assert line["train_lr"] == pytest.approx(sum(lrs) / 3, rel=1e-9) and line["train_steps"] == 3
    for epoch in (0, 1):
        checkpoint = load(tmp_path / "out" / f"checkpoint-{epoch}.pth")
        assert checkpoint["args"]["lr"] == pytest.approx(peak)
        (group,) = checkpoint["optimizer"]["param_groups"]
        assert group["weight_decay"] == 0.05 and tuple(group["betas"]) == (0.9, 0.95)
        assert all(float(s["step"]) == epoch + 1 for s in checkpoint["optimizer"]["state"].values())


def test_a_run_derives_its_values_and_leaves_its_settings_alone(dumps):
    args = settings_from_argv(["--data_path", str(dumps), "--batch_size", "4", "--accum_iter", "2"])
    flags = asdict(args)
    run = TrainingRun.plan(args, Processes(rank=1, world=2), torch.device("cpu"), FeatureDumpDataset(dumps))
    assert asdict(args) == flags and args.lr is None and args.weight_decay is None
    assert run.effective_batch == 16 and run.schedule.lr == 0.002 * 16 / 256 and run.weight_decay == 0.01
    record = run.checkpoint_args(args, start_epoch=1)
    assert record == {**flags, "device": "cpu", "lr": run.schedule.lr, "weight_decay": 0.01, "start_epoch": 1,
                      "world_size": 2, "rgb_dim": C, "xyz_dim": 1152, "patches": 64}


def test_default_weight_decay_is_the_reference_effective_one(tmp_path):
    # a run of its own, one short epoch: one_process trains 3 epochs on 16 files for the comparisons of the slow tier
    data = write_dumps(tmp_path / "dumps", files=4, rows=16)
    train(["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--epochs", "1",
           *COMMON])
    (group,) = load(tmp_path / "out" / "checkpoint-0.pth")["optimizer"]["param_groups"]
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.9, 0.95)


# -------------------------------------------------------------------------------------------------- errors

def test_missing_empty_and_junk_folders_are_clear_errors(tmp_path):
    with pytest.raises(FeatureDumpError, match=r"absent.*not found"):
        FeatureDumpDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureDumpError, match=r"empty.*no .pt feature files"):
        FeatureDumpDataset(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    torch.save(torch.zeros(4, 1200), junk / "features.pth")
    with pytest.raises(FeatureDumpError, match=r"junk.*no .pt feature files"):
        FeatureDumpDataset(junk)
    (junk / "broken.pt").write_bytes(b"not a tensor")
    with pytest.raises(FeatureDumpError, match=r"broken.pt: not a readable feature tensor"):
        FeatureDumpDataset(junk)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(64, 1152), r"expected a \(patches, 1152 \+ C\)"),  # no RGB part
    ({"features": torch.zeros(64, 1152 + C)}, r"expected a \(patches, 1152 \+ C\).*got dict"),
    (torch.zeros(32, 1152 + C), r"shape \(32, 1200\) differs from \(64, 1200\)"),  # other row count
    (torch.zeros(64, 1152 + 2 * C), r"shape \(64, 1248\) differs from \(64, 1200\)"),  # other backbone
])
def test_inconsistent_dumps_name_the_file(tmp_path, bad, message):
    folder = write_dumps(tmp_path / "dumps", files=2)
    torch.save(bad, folder / "gadget9.pt")
    with pytest.raises(FeatureDumpError, match=f"gadget9.pt: {message}"):
        FeatureDumpDataset(folder)


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"), *COMMON]) == 2
    assert "error: feature folder" in capsys.readouterr().err and not (tmp_path / "out").exists()
    data = write_dumps(tmp_path / "dumps", files=3, rows=8)
    assert main(["--data_path", str(data), "--batch_size", "4", *COMMON]) == 2
    assert "3 feature files are fewer than one batch" in capsys.readouterr().err
    torch.save({"model": FeatureFusionBlock(rgb_dim=C + 8).state_dict(), "optimizer": {}, "epoch": 0},
               tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"(?s)other.pth does not fit a UFF fusion block for RGB width 48.*"
                                              r"7 keys with the wrong shape.*rgb_head.weight: file \(256, 56\)"):
        train(["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "1",
               "--resume", str(tmp_path / "other.pth"), *COMMON])
    assert main(["--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--batch_size", "1",
                 "--resume", "https://example.org/checkpoint-1.pth", *COMMON]) == 2
    assert "--resume https://example.org/checkpoint-1.pth: nothing is downloaded" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- end to end

SMALL = ["--rgb_backbone_name", "vit_tiny_patch16_224", "--num_group", "64", "--group_size", "32",
         "--random_init", "--device", "cpu", "--batch_size", "2"]  # as tests/test_pipeline.py


@pytest.mark.slow
def test_dump_pretrain_with_torchrun_then_detect_with_the_checkpoint(tmp_path):
    raw = write_mvtec3d(tmp_path / "raw", classes=("gadget",), size=96, n_train=4, n_val=1, n_test_good=1,
                        n_test_defect=1, progress=False)
    dataset = preprocess_dataset(raw, tmp_path / "mvtec3d", workers=1).output
    run_main = lambda out, *extra: main_module.main(
        ["--dataset_path", str(dataset), "--output_dir", str(tmp_path / out), *SMALL, *extra])

    # the tiny ViT's 14 x 14 tokens only allow the aligned dump: (3136, 1152 + 192) per training sample
    assert run_main("dump", "--method_name", "DINO+Point_MAE", "--save_feature", "--save_feature_path",
                    str(tmp_path / "patch_lib"), "--fix_quirks") == 0
    assert FeatureDumpDataset(tmp_path / "patch_lib").shape == (3136, 1152 + 192)
    assert len(list((tmp_path / "patch_lib").glob("*.pt"))) == 4

    launch(["torch.distributed.run"], ["--data_path", str(tmp_path / "patch_lib"), "--output_dir",
                                       str(tmp_path / "uff"), "--batch_size", "1", "--epochs", "1", *COMMON])
    checkpoint = tmp_path / "uff" / "checkpoint-0.pth"
    assert load(checkpoint)["args"]["rgb_dim"] == 192 and math.isfinite(read_log(tmp_path / "uff")[0]["train_loss"])

    assert run_main("detect", "--method_name", "DINO+Point_MAE+Fusion", "--memory_bank", "multiple", "--use_uff",
                    "--fusion_module_path", str(checkpoint)) == 0
    metrics = json.loads((tmp_path / "detect" / "results.json").read_text())["per_class"]["gadget"]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_rocauc", "pixel_rocauc", "au_pro"))
