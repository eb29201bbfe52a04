"""Run by tests/test_train.py under `torchrun --nproc-per-node 2` (gloo): a few DDP steps, then
each rank writes its final weights to OUT/rank{R}.pt."""

import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import partialize
from partialize.train import finetune
from partialize.train.data import digits_tensors, make_train_loader

out = sys.argv[1]
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
