"""How large a training batch fits in memory: autograd's saved tensors per image, counted on one
small forward, against the memory this process can still use (CUDA: free device memory; CPU:
MemAvailable, bounded by a cgroup limit)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .._modes import in_mode
from .checkpoint import rng_preserved

#: share of the available memory a training step may plan to use, and the allowance on top of
#: the saved activations for the backward pass's transient gradients
BUDGET_SHARE = 0.6
BACKWARD_FACTOR = 1.5


def activation_bytes_per_image(model: nn.Module, input_size: int, device: str | torch.device = "cpu") -> int:
    """Bytes autograd keeps for the backward pass per image in train mode: every tensor saved by the
    forward, each storage counted once, parameters excluded. Measured on a batch of 2 (BatchNorm
    needs more than one sample); the model (BN statistics, random streams) is left as it was."""
    device = torch.device(device)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            saved[st.data_ptr()] = st.nbytes()
        return t

    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    x = torch.zeros(2, 3, input_size, input_size, device=device)
    try:
        with in_mode(model, True), rng_preserved(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return max(1, sum(saved.values()) // 2)


def fixed_training_bytes(model: nn.Module) -> int:
    """Weights, gradients and AdamW's two moments: four copies of the trainable parameters (plus the
    frozen ones once)."""
    train = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return 4 * train + frozen


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory this process can still allocate: free CUDA memory, or on CPU MemAvailable, bounded by
    the cgroup's limit minus its usage when the process runs in a container."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            with open(usage_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            avail = min(avail, int(raw) - used)
        break
    return max(0, int(avail))


def fit_batch_size(
    model: nn.Module, input_size: int, wanted: int, available: int, device: str | torch.device = "cpu"
) -> tuple[int, dict]:
    """The largest batch <= ``wanted`` whose estimated training step, ``fixed + BACKWARD_FACTOR *
    batch * per_image``, stays within ``BUDGET_SHARE * available`` (a power of two when it had to be
    lowered), and the numbers behind it. 0 when not even one image fits."""
    per_image = activation_bytes_per_image(model, input_size, device)
    fixed = fixed_training_bytes(model)
    budget = BUDGET_SHARE * available - fixed
    most = int(budget // (BACKWARD_FACTOR * per_image)) if budget > 0 else 0
    if most >= wanted:
        batch = wanted
    elif most >= 1:
        batch = 1 << (most.bit_length() - 1)
    else:
        batch = 0
    info = {"per_image_bytes": per_image, "fixed_bytes": fixed, "available_bytes": available, "fits": most}
    return batch, info


def describe(info: dict) -> str:
    """One line with the estimate's numbers, for the CLI output."""
    mb = 1 << 20
    return (
        f"about {info['per_image_bytes'] / mb:.1f} MB of activations per image and {info['fixed_bytes'] / mb:.0f} MB "
        f"of weights/gradients/optimizer state, {info['available_bytes'] / mb:.0f} MB available "
        f"(planning for {BUDGET_SHARE:.0%} of it)"
    )
