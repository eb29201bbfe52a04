"""The training CLI on bad input and its smaller defects (issue 11 §6, §8, §11): every bad option is a
clean PartializeError before anything is written, a corrupt image is skipped with its path, finetune
trains at the plan's size, resume refuses what it cannot honour, `train` writes a partialize model
file with a batch that fits and a warm-up that ends, Ctrl-C keeps the checkpoint and exits 130."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import partialize
from partialize.cli import main
from partialize.errors import CheckpointError
from partialize.train import finetune
from partialize.train.data import digits_tensors, image_folder_loaders, make_train_loader, write_image_folder

runner = importlib.import_module("partialize.train.runner")  # the CLI's runs call finetune() from here


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """sklearn digits as an ImageFolder (8x8 PNGs, 10 classes) and a resnet18 converted at 16 px."""
    root = tmp_path_factory.mktemp("train_inputs")
    xt, yt, xv, yv = digits_tensors(size=8)
    tr = torch.cat([(yt == c).nonzero()[:6, 0] for c in range(10)])  # 6 per class
    va = torch.cat([(yv == c).nonzero()[:2, 0] for c in range(10)])  # 2 per class
    write_image_folder(str(root / "data"), xt[tr], yt[tr], "train")
    write_image_folder(str(root / "data"), xv[va], yv[va], "val")
    ckpt = root / "r18.safetensors"
    r = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "10", "--input-size", "16",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return root, ckpt


def _ft(ckpt, data, out, *extra):
    return ["finetune", str(ckpt), "--data", str(data), "--teacher", "none", "--batch-size", "16", "--epochs", "1",
            "--lr", "1e-3", "--no-amp", "--no-report", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "args, names",
    [
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--kd-temperature", "0"], "--kd-temperature"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "nan"], "--lr"),
        (["--smoothing", "1.5"], "--smoothing"),
        (["--ema", "2"], "--ema"),
        (["--workers", "-1"], "--workers"),
        (["--train-threads", "0"], "--train-threads"),
    ],
)
def test_bad_finetune_options_are_clean_errors_and_write_nothing(folder, tmp_path, args, names):
    root, ckpt = folder
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _ft(ckpt, root / "data", out) + args)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert names in r.output and "error:" in r.output
    assert not out.exists()  # refused before anything was written


def test_a_corrupt_image_is_skipped_with_its_path(folder, tmp_path):
    root, ckpt = folder
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    bad = data / "train" / "03" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    r = CliRunner().invoke(main, _ft(ckpt, data, tmp_path / "run"))
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"skipping unreadable image {str(bad)!r}" in r.output
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_images"] == 48  # 61 files, batch 16, drop_last: 3 full batches (the bad one replaced)


def test_a_corrupt_validation_image_is_left_out_not_replaced(folder, tmp_path):
    """A stand-in for an unreadable validation image would be scored twice: it is dropped, and the
    final report (run with the report on) still gets written, with a note naming the file."""
    root, ckpt = folder
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    bad = data / "val" / "03" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    args = [a for a in _ft(ckpt, data, tmp_path / "run") if a != "--no-report"] + ["--no-speed"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"skipping unreadable image {str(bad)!r}" in r.output and "left out of the validation" in r.output
    loaders = image_folder_loaders(str(data), torchvision.models.resnet18(), batch_size=16, input_size=16)
    assert sum(int(y.numel()) for _, y in loaders.val) == 20  # 21 files, one unreadable: not 21
    rep = json.loads((tmp_path / "run" / "report.json").read_text())["model"]
    assert rep["accuracy"]["images"] == 20 and rep["accuracy"]["unreadable"] == 1
    assert any("corrupt.png" in n and "1 of 21 images" in n for n in rep["notes"])


def test_finetune_trains_at_the_plans_size(folder, tmp_path, monkeypatch):
    root, ckpt = folder
    sizes = []
    real = runner.finetune

    def spy(model, train_loader, *a, **k):
        sizes.append(tuple(next(iter(train_loader))[0].shape[-2:]))
        return real(model, train_loader, *a, **k)

    monkeypatch.setattr(runner, "finetune", spy)
    r = CliRunner().invoke(main, _ft(ckpt, root / "data", tmp_path / "run"))
    assert r.exit_code == 0, r.output
    assert sizes == [(16, 16)]  # converted at 16 px (the plan), not resnet18's 224
    assert "resolution: 16x16 (the size the model was converted at" in r.output


def test_ctrl_c_keeps_the_checkpoint_and_exits_130(folder, tmp_path, monkeypatch):
    root, ckpt = folder
    real = runner.finetune

    def interrupted(*a, **k):
        def ctrl_c(rec):
            if rec["epoch"] == 1:
                raise KeyboardInterrupt

        return real(*a, **{**k, "on_epoch_end": ctrl_c})

    monkeypatch.setattr(runner, "finetune", interrupted)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _ft(ckpt, root / "data", out)[:-6] + ["--epochs", "3", "--out", str(out)])
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "(epoch 1) is kept" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output
    monkeypatch.setattr(runner, "finetune", real)
    r = CliRunner().invoke(main, _ft(ckpt, root / "data", out)[:-6] + ["--epochs", "3", "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "after epoch 1 " in r.output, r.output


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))  # fmt: skip


def test_resume_refuses_every_setting_it_cannot_honour(tmp_path):
    xt, yt, _, _ = digits_tensors(size=8)
    loader = make_train_loader(TensorDataset(xt[:64], yt[:64]), 16, 0)
    base = dict(epochs=1, lr=1e-3, label_smoothing=0.1, seed=0, progress=False, log=None, out_dir=str(tmp_path))
    finetune(_tiny(), loader, None, **base)
    teacher = _tiny()
    changed = {**base, "lr": 2e-3, "seed": 1, "label_smoothing": 0.0, "epochs": 2}
    with pytest.raises(CheckpointError) as e:
        finetune(_tiny(), loader, None, teacher=teacher, resume=True, **changed)
    msg = str(e.value)
    for part in ("--lr (lr=) 0.001 -> 0.002", "--seed (seed=) 0 -> 1", "--smoothing (label_smoothing=) 0.1 -> 0.0",
                 "--teacher/--teacher-weights (teacher=) None ->"):  # fmt: skip
        assert part in msg, msg
    with pytest.raises(CheckpointError, match="--batch-size"):  # another batch: other steps per epoch
        finetune(_tiny(), make_train_loader(TensorDataset(xt[:64], yt[:64]), 8, 0), None, resume=True, **base)
    # more epochs: allowed, the schedule recomputed and said
    said = []
    r = finetune(_tiny(), loader, None, resume=True, **{**base, "epochs": 3, "log": said.append})
    assert r.resumed_from_epoch == 1 and [h["epoch"] for h in r.history] == [1, 2, 3]
    said_it = "--epochs 1 -> 3: the warm-up + cosine schedule is recomputed for 3 epochs (12 steps)"
    assert any(said_it in s for s in said), said
    # the last step's lr on the 12-step cosine (no warm-up): 1e-3 * (1 + cos(pi * 11/12)) / 2
    assert r.history[-1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))


def test_warmup_is_capped_to_the_run():
    """`train --epochs 2` with its 5 warm-up epochs: the lr reaches its peak (half the run), then decays."""
    xt, yt, _, _ = digits_tensors(size=8)
    loader = make_train_loader(TensorDataset(xt[:64], yt[:64]), 16, 0)  # 4 steps per epoch
    said = []
    r = finetune(_tiny(), loader, None, epochs=2, lr=1e-3, warmup_epochs=5, progress=False, log=said.append)
    # warm-up min(5, 2/2) = 1 epoch = 4 steps: the last warm-up step (3) runs at lr * 4/4
    assert r.history[0]["lr"] == pytest.approx(1e-3)
    assert r.history[1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert any("capped to 1 epochs" in s for s in said)


def test_fit_batch_size_arithmetic():
    from partialize.train.memory import BACKWARD_FACTOR, BUDGET_SHARE, activation_bytes_per_image, fit_batch_size

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    per = 4 * 16 * 16 * (3 + 8)  # conv keeps its input (3 channels), ReLU its output (8), float32
    assert activation_bytes_per_image(m, 16) == per
    fixed = 4 * 4 * (8 * 3 * 9 + 8)  # weights + grads + two Adam moments
    avail = int((fixed + BACKWARD_FACTOR * per * 100) / BUDGET_SHARE) + 1  # room for exactly 100 images
    assert fit_batch_size(m, 16, 4096, avail)[0] == 64  # lowered to a power of two
    assert fit_batch_size(m, 16, 80, avail)[0] == 80  # fits as asked
    assert fit_batch_size(m, 16, 80, fixed)[0] == 0  # not one image


def test_train_writes_a_model_file_with_a_batch_that_fits(folder, tmp_path, monkeypatch):
    """`partialize train MODEL --data DIR` with a default batch that does not fit (README's partialnet_t2
    with Table 7's 4096 was OOM-killed): the largest power of two that fits is used and said; the
    result is a partialize model file that load and report read."""
    from partialize.train import memory

    root, _ = folder
    torch.manual_seed(0)
    m = partialize.base_model.build_model("resnet10t", weights="random", num_classes=10)
    per, fixed = memory.activation_bytes_per_image(m, 16), memory.fixed_training_bytes(m)
    room_for_20 = int((fixed + memory.BACKWARD_FACTOR * per * 20) / memory.BUDGET_SHARE)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": room_for_20)
    out = tmp_path / "run"
    args = ["train", "resnet10t", "--data", str(root / "data"), "--epochs", "1", "--input-size", "16",
            "--device", "cpu", "--no-report", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "batch: 16 per process, not 128 (the default)" in r.output  # the largest power of two <= 20
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_images"] == 48 and log[0]["step"] == 3  # 60 images in batches of 16, drop_last
    assert "capped to 0.5 epochs" in r.output  # the default 5 warm-up epochs in a 1-epoch run
    plan = partialize.serialization.read_plan(out / "final.safetensors")
    assert plan.model["spec"] == "resnet10t" and not plan.converted
    loaded = partialize.load(out / "final.safetensors")
    ck = torch.load(out / "last.pt", weights_only=True)["model"]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ck[k]), k
    r = CliRunner().invoke(main, ["report", str(out / "final.safetensors"), "--no-speed", "--input-size", "16"])
    assert r.exit_code == 0, r.output  # report reads it (a bare state_dict was refused)


def test_train_threads_sets_the_threads_the_fine_tune_runs_with(folder, tmp_path):
    """--train-threads sets torch's CPU threads for the run (process-wide, as the CLI's job)."""
    from partialize.train.runner import run_finetune

    root, ckpt = folder
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_finetune(str(ckpt), str(root / "data"), teacher="none", epochs=1, batch_size=16, lr=1e-3, device="cpu",
                     amp=False, report=False, out_dir=str(tmp_path / "run"), train_threads=1,
                     log=lambda _s: None)  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(prev)
