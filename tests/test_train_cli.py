"""`partialize convert` -> `partialize finetune` -> `--resume`, end to end through the CLI."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import partialize
from partialize.cli import main
from partialize.ops import PConv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_folder(root, n=6, size=32):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in enumerate(((220, 40, 40), (40, 40, 220))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.mark.filterwarnings("ignore")
def test_convert_then_finetune_then_resume(tmp_path):
    data = _image_folder(tmp_path / "data")
    ckpt = tmp_path / "r18.safetensors"
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "convert",
            "torchvision:resnet18",
            "--num-classes",
            "2",
            "--input-size",
            "32",
            "--no-speed",
            "--out",
            str(ckpt),
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    args = [
        "finetune",
        str(ckpt),
        "--data",
        str(data),
        "--teacher",
        "none",
        "--batch-size",
        "4",
        "--input-size",
        "32",
        "--out",
        str(out),
        "--lr",
        "1e-3",
        "--warmup-epochs",
        "0",
        "--no-amp",
    ]
    r = runner.invoke(main, args + ["--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1]
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    assert "resolution: 32x32" in r.output
    # the same --out again without --resume: refused before anything is written (nothing replaced)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    r = runner.invoke(main, args + ["--epochs", "1"])
    assert r.exit_code == 2 and "already holds a run" in r.output and "--force" in r.output, r.output
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    # a setting the resume cannot honour is refused, naming the option, before anything is trained
    other_lr = [a if a != "1e-3" else "2e-3" for a in args]
    r = runner.invoke(main, other_lr + ["--epochs", "2", "--resume"])
    assert r.exit_code == 2 and "--lr (lr=) 0.001 -> 0.002" in r.output and "Traceback" not in r.output, r.output
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    # extending --epochs is allowed: the schedule is recomputed and the log says so
    r = runner.invoke(main, args + ["--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "--epochs 1 -> 2: the warm-up + cosine schedule is recomputed" in r.output
    # resuming a finished run with the same settings trains nothing more and keeps the log
    r = runner.invoke(main, args + ["--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    r = runner.invoke(main, args + ["--epochs", "1", "--resume"])  # fewer epochs than already trained
    assert r.exit_code == 2 and "already trained 2 epochs" in r.output
    assert {"train_loss", "val_top1", "lr", "time_s"} <= set(log[0])
    model = partialize.load(out / "final.safetensors")
    assert isinstance(model.layer1[0].conv1, PConv)
    # --force replaces the run: the old run's files go first, so no stale report or log stays
    (out / "report.md").write_text("an old run's report")
    r = runner.invoke(main, args + ["--epochs", "1", "--force", "--no-report"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert not (out / "report.md").exists()
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.slow  # two torchrun processes: ~12 s on 2 cores
def test_ddp_cli_finetune_shards_data_and_ranks_agree(tmp_path):
    """`torchrun -nproc 2 partialize finetune` (gloo): each rank trains on its own half of the
    ImageFolder (disjoint, together the whole set) and both end with identical weights."""
    data = _image_folder(tmp_path / "data")  # 12 train images, 2 classes
    ckpt = tmp_path / "r18.safetensors"
    r = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "2", "--input-size", "32",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--teacher", "none", "--batch-size", "3", "--epochs", "1",
            "--input-size", "32", "--out", str(out), "--lr", "1e-2", "--warmup-epochs", "0", "--no-amp",
            "--no-report", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the venv imports this checkout (editable install)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "tests", "_train_ddp_worker.py"), "cli", str(tmp_path), *args]  # fmt: skip
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"cli_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r0["dataset_size"] == 12
    i0, i1 = set(r0["indices"]), set(r1["indices"])
    assert len(r0["indices"]) == len(r1["indices"]) == 6  # a half each, not the full 12
    assert not i0 & i1 and i0 | i1 == set(range(12))  # disjoint and together the whole set
    assert "rank 0 of 2 trains on 6 per epoch" in res.stdout and "rank 1 of 2 trains on 6 per epoch" in res.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_images"] == 6 and log[0]["train_images_per_rank"] == [6, 6]
    assert r0["final"].keys() == r1["final"].keys()
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    trained = partialize.load(out / "final.safetensors").state_dict()  # rank 0's file = what both hold
    assert torch.equal(trained["fc.weight"], r0["final"]["fc.weight"])
