"""`partialize finetune` killed with SIGKILL mid-run and resumed in a new process ends with exactly the
weights of an uninterrupted run: real ImageFolder (sklearn digits as PNGs), timm's default train
augmentation (random resized crop + flip, drawing from Python's global random), separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from partialize.cli import main
from partialize.train.data import digits_tensors, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    xt, yt, xv, yv = digits_tensors(size=8)
    write_image_folder(str(root / "data"), xt[:160], yt[:160], "train")
    write_image_folder(str(root / "data"), xv[:40], yv[:40], "val")
    ckpt = root / "r18.safetensors"
    r = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "10", "--input-size", "16",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return root, ckpt


def _cmd(ckpt, data, out, *extra):
    return [sys.executable, "-m", "partialize.cli", "finetune", str(ckpt), "--data", str(data), "--teacher", "none",
            "--batch-size", "16", "--epochs", str(EPOCHS), "--lr", "2e-3", "--warmup-epochs", "1", "--seed", "3",
            "--device", "cpu", "--no-amp", "--no-report", "--out", str(out), *extra]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the venv imports this checkout (editable install)


def _epochs_logged(out) -> int:
    try:
        with open(out / "log.jsonl") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


@pytest.mark.slow  # three fresh processes, about 40 s on a shared 2-core machine
@pytest.mark.filterwarnings("ignore")
def test_sigkill_then_resume_is_bit_exact(converted):
    root, ckpt = converted
    data = root / "data"
    full = subprocess.run(_cmd(ckpt, data, root / "a"), env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]

    b = root / "b"
    p = subprocess.Popen(_cmd(ckpt, data, b), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _epochs_logged(b) < 1 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)  # during epoch 2 (or later): no clean shutdown of any kind
    assert p.wait() == -signal.SIGKILL
    killed_after = _epochs_logged(b)
    assert 1 <= killed_after < EPOCHS

    res = subprocess.run(_cmd(ckpt, data, b, "--resume"), env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"after epoch {killed_after} " in res.stdout, res.stdout

    wa, wb = load_file(root / "a" / "final.safetensors"), load_file(b / "final.safetensors")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    la = [json.loads(line)["train_loss"] for line in open(root / "a" / "log.jsonl")]
    lb = [json.loads(line)["train_loss"] for line in open(b / "log.jsonl")]
    assert la == lb and len(la) == EPOCHS
