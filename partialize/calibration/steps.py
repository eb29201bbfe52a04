"""The calibration steps after channel choice, each on unlabelled images with the original as target:

1. BN statistics: every BatchNorm's running mean and variance re-estimated on the converted model
   (the channels a partial operator hands to something cheap now carry other values); or, matched
   (``match_bn_statistics``), statistics that normalise each BN's new input to the mean and spread
   the original's BN gives its own input on the same images, so a BN whose input the conversion did
   not change keeps exactly what it had.
2. Closed-form refit: each BatchNorm that reads a converted layer gets the per-channel affine that
   best reproduces (least squares) the original model's output of that BN from what it now receives.
3. Block-wise distillation: each block holding converted layers (the parent module of each; in an
   ``nn.Sequential`` model a converted child with the children after it) is trained, in forward
   order, to reproduce the original block's output from the input it gets in the converted model
   (MSE relative to the target's energy; Adam; its BNs normalise with the batch's statistics and
   keep estimating them, or, after matched statistics, with those).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import in_mode
from ..inference import find_conv_bn_pairs


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 64, only: set[str] | None = None) -> int:
    """In place: re-estimate every BatchNorm's running statistics (``only``: those with these names) on
    ``images`` (cumulative average, the rest of the model in eval mode); returns how many BNs were updated."""
    bns = [m for n, m in _bns(model).items() if only is None or n in only]
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


def _bns(model: nn.Module) -> dict[str, nn.Module]:
    bn = nn.modules.batchnorm._BatchNorm
    return {n: m for n, m in model.named_modules() if isinstance(m, bn) and m.track_running_stats}


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of a BN input over batch and space, in float64."""
    v = x.detach().double().transpose(0, 1).flatten(1)
    return v.mean(1), v.var(1, unbiased=False)


@torch.no_grad()
def match_bn_statistics(model: nn.Module, reference: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """In place: each BN of ``model`` that has a counterpart in ``reference`` (same name and width)
    gets the running statistics that normalise its input to the same mean and spread as the
    counterpart normalises its own input. Per batch, with the counterpart's input statistics (mu_r,
    var_r) and running ones (mean_r, var_ref), and this BN's input statistics (mu, var): variance
    var_ref * q and mean mu - sqrt(q) * (mu_r - mean_r), q = (var + eps) / (var_r + eps), used to
    normalise the batch (as re-estimation normalises with batch statistics, so every BN below sees
    its final input in one pass) and averaged over the batches. Where the calibration images match
    the data the original was trained on (mean_r = mu_r, var_ref = var_r) this is re-estimation; where
    they do not (another domain, few images), a BN whose input the conversion left alone keeps the
    original's statistics. BNs without a counterpart (inside an operator, or narrowed by one) are
    re-estimated as :func:`recalibrate_bn` does, in the same pass. Returns how many BNs were updated."""
    mine, ref = _bns(model), _bns(reference)
    paired = [n for n, m in mine.items() if n in ref and ref[n].num_features == m.num_features]
    if not mine:
        return 0
    seen: dict[str, list] = {n: [] for n in paired}  # the reference's input statistics, in call order
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in paired}

    def record(n):
        return lambda _m, args: seen[n].append(_batch_stats(args[0]))

    def normalise(n):
        def hook(bn, args, _out):
            x = args[0]
            if not seen[n]:
                return None  # the reference did not call this BN here: eval output as it is
            (mu, var), (mu_r, var_r) = _batch_stats(x), seen[n].pop(0)
            q = (var + bn.eps) / (var_r + bn.eps)
            mean = mu - q.sqrt() * (mu_r - ref[n].running_mean.double())
            v = ref[n].running_var.double() * q
            acc = sums[n]
            acc[0], acc[1], acc[2] = acc[0] + mean, acc[1] + v, acc[2] + 1
            return F.batch_norm(x, mean.to(x.dtype), v.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

        return hook

    alone = [m for n, m in mine.items() if n not in seen]
    saved = [(m.momentum, m.training) for m in alone]
    hooks = [ref[n].register_forward_pre_hook(record(n)) for n in paired]
    hooks += [mine[n].register_forward_hook(normalise(n)) for n in paired]
    try:
        with in_mode(model), in_mode(reference):
            for m in alone:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average: every batch weighs the same
                m.train()
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size]
                if x.shape[0] > 1:
                    reference(x)
                    model(x)
                    for v in seen.values():
                        v.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, _training) in zip(alone, saved):
            m.momentum = momentum
    for n, (s_mean, s_var, k) in sums.items():
        if k:
            mine[n].running_mean.copy_((s_mean / k).to(mine[n].running_mean.dtype))
            mine[n].running_var.copy_((s_var / k).to(mine[n].running_var.dtype))
    return len(mine)


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
    """The blocks to distil: the parent module of each converted layer, outermost only, in definition
    order. A top-level layer (a child of the model itself, as in a plain ``nn.Sequential``) is its own
    block: its parent would be the whole model."""
    parents = {n.rpartition(".")[0] if "." in n else n for n in layers}
    order = [n for n, _ in model.named_modules() if n in parents]
    return [b for b in order if not any(b.startswith(o + ".") for o in order if o != b)]


def _block_data(
    model, reference, block: tuple[nn.Module, nn.Module], images, batch_size, max_bytes: float = 2e9
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs of ``block[0]`` (a module of ``model``) and the outputs of ``block[1]`` (the module of
    ``reference`` that ends the same block), on ``images`` (the first ones, up to ``max_bytes`` of
    cached activations); None when the block is not called with one tensor."""
    ins, outs, ok = [], [], [True]

    def take_in(_m, args, kwargs, _out):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            ok[0] = False
        else:
            ins.append(args[0].detach().clone())

    def take_out(_m, _a, out):
        outs.append(_first(out).detach().clone())  # a later in-place op (ReLU) must not change it

    h1 = block[0].register_forward_hook(take_in, with_kwargs=True)
    h2 = block[1].register_forward_hook(take_out)
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
    blocks = _trainable_blocks(model, reference, layers)
    for bi, (block, (module, first, last)) in enumerate(blocks.items()):
        pair = _block_data(model, reference, (first, last), images, 64)
        if pair is None:
            result[block] = {"skipped": "not called with one tensor (or other shapes): not distilled"}
            continue
        x, y = pair
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


def _trainable_blocks(model: nn.Module, reference: nn.Module, layers: list[str]) -> dict[str, tuple]:
    """label -> (the module to train, the module of ``model`` whose input it takes, the module of
    ``reference`` whose output it must give). Each block of :func:`blocks_of`, except in an
    ``nn.Sequential`` model, where a top-level converted layer starts a segment that runs up to the next
    child holding converted layers: a layer distilled alone could not compensate for the channels an
    operator passes on untouched, the layers after it can."""
    blocks = {b: (model.get_submodule(b), model.get_submodule(b), reference.get_submodule(b))
              for b in blocks_of(model, layers)}  # fmt: skip
    if not isinstance(model, nn.Sequential) or not isinstance(reference, nn.Sequential):
        return blocks
    names = [n for n, _ in model.named_children()]
    holds = [any(n == layer or layer.startswith(n + ".") for layer in layers) for n in names]
    out = {}
    for b, entry in blocks.items():
        i = names.index(b) if b in layers and b in names else None  # a converted child of the model
        j = None if i is None else next((k for k in range(i + 1, len(names)) if holds[k]), len(names))
        if i is None or j - i == 1:
            out[b] = entry
        else:
            out[f"{b}..{names[j - 1]}"] = (nn.Sequential(*[model[k] for k in range(i, j)]), model[i], reference[j - 1])
    return out


@torch.no_grad()
def _rel(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    err = ref = 0.0
    for i in range(0, x.shape[0], 64):
        out = _first(module(x[i : i + 64]))
        err += float((out - y[i : i + 64]).square().sum())
        ref += float(y[i : i + 64].square().sum())
    return (err / max(ref, 1e-12)) ** 0.5
