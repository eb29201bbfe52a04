"""`partialize convert` -> `partialize finetune` -> `--resume`, end to end through the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import partialize
from partialize.cli import main
from partialize.ops import PConv


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
    r = runner.invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "2", "--input-size", "32",
                             "--no-speed", "--out", str(ckpt)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--teacher", "none", "--batch-size", "4",
            "--input-size", "32", "--out", str(out), "--lr", "1e-3", "--warmup-epochs", "0", "--no-amp"]
    r = runner.invoke(main, args + ["--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1]
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    # resuming with a different schedule is refused (the cosine decay depends on --epochs)
    r = runner.invoke(main, args + ["--epochs", "2", "--resume"])
    assert r.exit_code == 2 and "resume with the same settings" in r.output
    # resuming a finished run with the same settings trains nothing more and keeps the log
    r = runner.invoke(main, args + ["--epochs", "1", "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1]
    assert {"train_loss", "val_top1", "lr", "time_s"} <= set(log[0])
    model = partialize.load(out / "final.safetensors")
    assert isinstance(model.layer1[0].conv1, PConv)
