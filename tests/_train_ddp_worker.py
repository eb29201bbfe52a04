"""Run by tests/test_train.py under `torchrun --nproc-per-node 2` (gloo).

``_train_ddp_worker.py OUT``: a few DDP steps through the API, then each rank writes its final
weights to OUT/rank{R}.pt.
``_train_ddp_worker.py cli OUT ARGS...``: runs `partialize ARGS...` (the real CLI command) and
records, per rank, the sample indices its train loader drew in epoch 0 and its final weights, to
OUT/cli_rank{R}.pt. Only the recording wraps the trainer; the CLI builds loaders and model itself.
"""

import importlib
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import partialize
from partialize.train import finetune
from partialize.train.data import digits_tensors, make_train_loader


def api_run(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    model = partialize.apply(net, ratio=0.5, input_size=8)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.distributed.init_process_group("gloo")
    xt, yt, _, _ = digits_tensors(size=8)
    loader = make_train_loader(TensorDataset(xt[:128], yt[:128]), batch_size=16, seed=0)
    finetune(model, loader, None, epochs=2, lr=1e-2, out_dir=os.path.join(out, "run"), progress=False, log=None)
    rank = torch.distributed.get_rank()
    torch.save({"final": model.state_dict(), "init": init, "world": torch.distributed.get_world_size(),
                "steps": len(loader)}, os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    torch.distributed.destroy_process_group()


def cli_run(out: str, args: list[str]) -> None:
    from partialize.cli import main

    torch.set_num_threads(1)
    ft = importlib.import_module("partialize.train.runner")  # where the CLI's runs call finetune() from
    real = ft.finetune
    seen: dict = {}

    def recording_finetune(model, train_loader, *a, **k):
        sampler = train_loader.sampler
        sampler.set_epoch(0)
        seen["indices"] = list(sampler)
        seen["dataset_size"] = len(train_loader.dataset)
        seen["world"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        r = real(model, train_loader, *a, **k)
        seen["final"] = {k2: v.detach().cpu().clone() for k2, v in model.state_dict().items()}
        return r

    ft.finetune = recording_finetune
    try:
        main(args, standalone_mode=False)
    finally:
        ft.finetune = real
        rank = int(os.environ["RANK"])
        torch.save(seen, os.path.join(out, f"cli_rank{rank}.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        cli_run(sys.argv[2], sys.argv[3:])
    else:
        api_run(sys.argv[1])
