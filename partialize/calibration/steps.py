"""The calibration steps after channel choice, each on unlabelled images with the original as target:

1. BN statistics: every BatchNorm's running mean and variance re-estimated on the converted model
   (the channels a partial operator hands to something cheap now carry other values).
2. Closed-form refit: each BatchNorm that reads a converted layer gets the per-channel affine that
   best reproduces (least squares) the original model's output of that BN from what it now receives.
3. Block-wise distillation: each block holding converted layers (the parent module of each) is
   trained, in forward order, to reproduce the original block's output from the input it gets in the
   converted model (MSE relative to the target's energy; Adam; its BN statistics frozen).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..inference import find_conv_bn_pairs


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """In place: re-estimate every BatchNorm's running statistics on ``images`` (cumulative average,
    the rest of the model in eval mode); returns how many BNs were updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            if x.shape[0] > 1:
                model(x)
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)


def _pairs_after(model: nn.Module, layers: list[str]) -> list[tuple[str, str]]:
    """(converted layer, the BN that reads only its output), for the converted layers that have one."""
    wanted = set(layers)
    return [(c, b) for c, b in find_conv_bn_pairs(model) if c in wanted]


@torch.no_grad()
def refit_bn_affine(
    model: nn.Module, reference: nn.Module, layers: list[str], images: torch.Tensor, batch_size: int = 64
) -> list[str]:
    """In place: the least-squares per-channel affine for each BN after a converted layer, so its output
    best matches the reference's output at the same BN: y_ref ~ a * u + b per channel, u the BN's input
    in ``model``. Returns the BNs refitted."""
    pairs = _pairs_after(model, layers)
    if not pairs:
        return []
    stats: dict[str, list[torch.Tensor]] = {}
    caught: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []
    for _, bn in pairs:
        hooks.append(model.get_submodule(bn).register_forward_hook(
            lambda m, a, o, bn=bn: caught.__setitem__((bn, "u"), a[0].detach().float().clone())))  # fmt: skip
        hooks.append(reference.get_submodule(bn).register_forward_hook(
            lambda m, a, o, bn=bn: caught.__setitem__((bn, "y"), o.detach().float().clone())))  # fmt: skip
    model.eval()
    reference.eval()
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            model(x)
            reference(x)
            for _, bn in pairs:
                u, y = caught[(bn, "u")], caught[(bn, "y")]
                if u.shape != y.shape:
                    continue
                dims = [0] + list(range(2, u.dim()))
                s = stats.setdefault(bn, [torch.zeros(u.shape[1]) for _ in range(5)])
                for k, v in enumerate((u.sum(dims), y.sum(dims), (u * u).sum(dims), (u * y).sum(dims))):
                    s[k] += v
                s[4] += u.numel() / u.shape[1]
    finally:
        for h in hooks:
            h.remove()
    done = []
    for bn_name, (su, sy, suu, suy, n) in stats.items():
        var = suu / n - (su / n).square()
        a = torch.where(var > 1e-8, (suy / n - su * sy / n / n) / var.clamp_min(1e-8), torch.zeros_like(var))
        b = sy / n - a * su / n
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None or bn.running_var is None:
            continue
        std = torch.sqrt(bn.running_var.float() + bn.eps)  # eval BN: w (u - mean) / std + bias = a u + b
        bn.weight.copy_((a * std).to(bn.weight.dtype))
        bn.bias.copy_((b + a * bn.running_mean.float()).to(bn.bias.dtype))
        done.append(bn_name)
    return done


def blocks_of(model: nn.Module, layers: list[str]) -> list[str]:
    """The blocks to distil: the parent module of each converted layer (the model itself for a
    top-level layer is skipped), outermost only, in definition order."""
    parents = {n.rpartition(".")[0] for n in layers if "." in n}
    order = [n for n, _ in model.named_modules() if n in parents]
    return [b for b in order if not any(b.startswith(o + ".") for o in order if o != b)]


def _block_data(
    model, reference, block: str, images, batch_size, max_bytes: float = 2e9
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs of ``block`` in ``model`` and the outputs of the same block in ``reference``, on ``images``
    (the first ones, up to ``max_bytes`` of cached activations); None when the block is not called
    with one tensor."""
    ins, outs, ok = [], [], [True]

    def take_in(_m, args, kwargs, _out):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            ok[0] = False
        else:
            ins.append(args[0].detach().clone())

    def take_out(_m, _a, out):
        outs.append(_first(out).detach().clone())  # a later in-place op (ReLU) must not change it

    h1 = model.get_submodule(block).register_forward_hook(take_in, with_kwargs=True)
    h2 = reference.get_submodule(block).register_forward_hook(take_out)
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i : i + batch_size])
                reference(images[i : i + batch_size])
                held = sum(t.numel() * t.element_size() for t in ins + outs)
                if held > max_bytes:
                    break
    finally:
        h1.remove()
        h2.remove()
    if not ok[0] or not ins or len(ins) != len(outs):
        return None
    return torch.cat(ins), torch.cat(outs)


def distil_blocks(
    model: nn.Module,
    reference: nn.Module,
    layers: list[str],
    images: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    bn_train: bool = True,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, dict]:
    """In place: train each block (``blocks_of``) to reproduce the reference block's output from the
    input the converted model gives it; returns, per block, the relative error before and after."""
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, dict] = {}
    blocks = blocks_of(model, layers)
    for bi, block in enumerate(blocks):
        pair = _block_data(model, reference, block, images, 64)
        if pair is None:
            result[block] = {"skipped": "not called with one tensor (or other shapes): not distilled"}
            continue
        x, y = pair
        module = model.get_submodule(block)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            result[block] = {"skipped": "no trainable parameters"}
            continue
        opt = torch.optim.Adam(params, lr=lr)
        scale = y.square().mean().clamp_min(1e-12)
        module.eval()
        before = _rel(module, x, y)
        start = {k: v.clone() for k, v in module.state_dict().items()}
        module.train(bn_train)  # BN normalises with the batch's statistics and keeps estimating them
        for step in range(steps):
            j = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
            loss = F.mse_loss(_first(module(x[j])), y[j]) / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(block, bi * steps + step + 1, len(blocks) * steps, float(loss.detach()))
        module.eval()
        after = _rel(module, x, y)
        if not after < before:  # never leave a block worse than it came: keep what it had
            module.load_state_dict(start)
            after = before
        result[block] = {"rel_error_before": before, "rel_error_after": after}
    model.eval()
    return result


@torch.no_grad()
def _rel(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    err = ref = 0.0
    for i in range(0, x.shape[0], 64):
        out = _first(module(x[i : i + 64]))
        err += float((out - y[i : i + 64]).square().sum())
        ref += float(y[i : i + 64].square().sum())
    return (err / max(ref, 1e-12)) ** 0.5
