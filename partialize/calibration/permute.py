"""Importance-aware channel choice: which channels keep the expensive operator, decided on calibration
images, realised by permuting the *original* model's channels consistently through every coupled
layer (Torch-Pruning's DependencyGraph gives the groups), so that the permutation alone leaves the
function unchanged (checked; a group it cannot permute exactly is left as it is). Converting the
permuted original then puts the most important channels where the partial operators compute.

Importance of input channel c of a converted conv L: E[x_c^2] * ||W_L[:, c]||^2 (the energy a
channel carries into L times how much L uses it), summed over the converted convs that read the same
coupled group, each layer's scores normalised to sum 1.

Residual streams (groups coupled through an add) keep their order: every block of a stage reads and
writes them, so one order cannot put the right channels first for all, and ordering them by what the
blocks read was measured to lower accuracy (docs/calibration.md). The channels inside a block (a
ResNet block's conv1 output, conv2 input) are ordered.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._modes import in_mode

_PERMUTABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _is_out(handler) -> bool:
    return "out" in getattr(handler, "__name__", str(handler))


def _apply(module: nn.Module, out: bool, index: list[int], perm: torch.Tensor) -> bool:
    """Reorder ``module``'s channels at positions ``index`` by ``perm`` (over the group's channels);
    False when the module is of a kind this does not know how to permute."""
    if not isinstance(module, _PERMUTABLE) and any(True for _ in module.parameters(recurse=False)):
        return False
    if isinstance(module, nn.GroupNorm):
        return False  # a permutation would move channels between groups
    idx = torch.as_tensor(index)
    group = perm.numel()
    if idx.numel() % group:
        return False
    blocks = idx.reshape(group, -1)  # a flattened feature map: each channel owns a block of positions
    src = blocks[perm].reshape(-1)
    with torch.no_grad():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            depthwise = isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            if depthwise and module.groups != module.in_channels:
                return False
            if out or depthwise:
                module.weight[idx] = module.weight[src].clone()
                if module.bias is not None:
                    module.bias[idx] = module.bias[src].clone()
            else:
                module.weight[:, idx] = module.weight[:, src].clone()
        else:  # norms: every per-channel tensor
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() >= int(idx.max()) + 1:
                    t[idx] = t[src].clone()
    return True


def _grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise: its input channels are tied to their groups."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels


@torch.no_grad()
def _input_scores(model: nn.Module, layers: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per converted conv: E[x_c^2] * ||W[:, c]||^2 over its input channels, normalised to sum 1."""
    energy: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        m = model.get_submodule(name)

        def hook(_m, args, _out, name=name):
            x = args[0].detach().float()
            e = x.square().mean(dim=[d for d in range(x.dim()) if d != 1])
            energy[name] = energy.get(name, 0) + e

        hooks.append(m.register_forward_hook(hook))
    try:
        with in_mode(model):
            for i in range(0, images.shape[0], 64):
                model(images[i : i + 64])
    finally:
        for h in hooks:
            h.remove()
    scores = {}
    for name, e in energy.items():
        m = model.get_submodule(name)
        w = m.weight.detach().float()
        depthwise = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        keep = 0 if depthwise else 1  # a depthwise conv's input channel c is its weight row c
        s = e * w.square().sum(dim=[d for d in range(w.dim()) if d != keep])
        scores[name] = s / s.sum().clamp_min(1e-12)
    return scores


def permute_by_importance(
    original: nn.Module, layers: list[str], images: torch.Tensor, tol: float = 1e-4
) -> tuple[nn.Module, list[str]]:
    """A copy of ``original`` whose coupled channel groups feeding the convs ``layers`` are ordered by
    importance (most important first), and notes on what was left alone. The copy computes the same
    function (max relative output difference <= ``tol`` on the images, else nothing is permuted)."""
    import torch_pruning as tp

    notes: list[str] = []
    # torch-pruning traces the dependency graph through autograd: a frozen original's copy would show
    # no layer (every group "not in the dependency graph"), so the copy is made trainable
    model = copy.deepcopy(original).eval().requires_grad_(True)
    convs = [n for n in layers if isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))]
    for n in [n for n in convs if _grouped(model.get_submodule(n))]:
        g = model.get_submodule(n).groups
        notes.append(f"channel choice skipped for {n}: a grouped conv (groups={g}) takes no permutation across groups")
        convs.remove(n)
    if not convs:
        return model, notes or ["channel choice: no converted conv to order channels for"]
    example = images[:1]
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as e:  # a model torch-pruning cannot trace: keep the natural order
        return model, [f"channel choice skipped: torch-pruning could not build the dependency graph ({e})"]
    scores = _input_scores(model, convs, images[:256])
    done: set[frozenset] = set()
    for name in convs:
        m = model.get_submodule(name)
        if name not in scores:
            continue
        channels = scores[name].numel()
        try:
            group = graph.get_pruning_group(m, tp.prune_conv_in_channels if isinstance(m, nn.Conv2d)
                                            else tp.prune_linear_in_channels, idxs=list(range(channels)))  # fmt: skip
        except Exception as e:
            notes.append(f"channel choice skipped for {name}: {type(e).__name__}: {e}")
            continue
        if any("AddBackward" in dep.target.name for dep, _ in group):
            continue  # a residual stream: every block reads and writes it, and one order cannot suit them all
        members = [(dep.target.module, _is_out(dep.handler), list(idxs)) for dep, idxs in group]
        key = frozenset((id(mod), out) for mod, out, _ in members)
        if key in done:  # the same coupled group, reached from another converted conv that reads it
            continue
        done.add(key)
        total = torch.zeros(channels)
        readers = []
        for n in convs:  # every converted conv that reads this group, through its own channel positions
            idx = next((i for mod, out, i in members if mod is model.get_submodule(n) and not out), None)
            if idx is not None and len(idx) == channels:
                total += scores[n][torch.as_tensor(idx)]
                readers.append(n)
        perm = torch.argsort(total, descending=True)
        snapshot = copy.deepcopy(model.state_dict())
        if not all(_apply(mod, out, idx, perm) for mod, out, idx in members):
            model.load_state_dict(snapshot)
            notes.append(
                f"channel choice skipped for the group read by {', '.join(readers)}: a layer in it cannot be permuted"
            )
    with torch.no_grad(), in_mode(original):
        want, got = original(images[:16]), model(images[:16])
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= tol:
        return copy.deepcopy(original).eval(), [f"channel choice undone: the permuted model differed by {err:.2e}"]
    return model, notes
