"""Scan: every candidate node of a model (convs, MLP-like blocks, attention-like blocks) and, for every
registered operator, what it would do there: the layer's MACs before and after, or why it refuses.

A dry run for all operators at once. It reuses the planner's pieces (discovery, the captured call
arguments, ``build_op`` and ``layer_cost``), each operator at its own default parameters, every layer
on its own (no block claims its children, as a plan's would).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..ops.registry import get_operator, is_partial_layer, is_partial_op, list_operators
from ._calls import capture_calls, shared_parameters, tensor_owners
from .discover import Discovery, LayerInfo, discover
from .planner import _partial_ancestor, try_operator
from .tracer import example_input_for, is_attention_block, is_mlp_block

SCAN_FORMAT = "partialize.scan"
SCAN_VERSION = 1
KINDS = ("conv", "mlp", "attention")

# blocks that mix channels through an expansion (or reduction) and back, beyond the tracer's MLP leaves:
# inverted residuals / MBConv and residual bottleneck / basic blocks (partial_mlp, partial_residual)
_MLP_LIKE = (
    "InvertedResidual",
    "MBConv",
    "FusedMBConv",
    "EdgeResidual",
    "ConvMlpWithNorm",
    "GlobalResponseNormMlp",
    "Bottleneck",
    "BasicBlock",
    "ResBottleneckBlock",
    "UniversalInvertedResidual",
    "ConvEncoder",
    "NormMlp",
    "FFN",
    "GhostBottleneck",
    "RepGhostBottleneck",
    "GatedConvBlock",
    "XceptionModule",
    "LinearBottleneck",
    "DualPathBlock",
)
# MLP-like blocks whose class name is too common to go by (``Block``): by module path
_MLP_LIKE_PATHS = ("timm.models.starnet.Block", "timm.models.xception.Block")
# attention named otherwise (ConViT's GPSA / MHSA, XCiT's XCA); and classes named for attention that
# gate channels or branches, not tokens (no softmax over a q k product): not attention nodes
_ATTENTION_NAMES = ("GPSA", "MHSA", "XCA")
NOT_SELF_ATTENTION = ("SplitAttn", "SelectiveKernelAttn", "GaussianChannelAttention")


def is_attention_name(name: str) -> bool:
    """A class name that says attention: contains "attn" or "attention" (any case: ``AttentionRope``,
    ``FactorAttnConvRelPosEnc``, ``WindowAttention``), or one of the few named otherwise."""
    low = name.lower()
    return name not in NOT_SELF_ATTENTION and ("attn" in low or "attention" in low or name in _ATTENTION_NAMES)


def node_kind(module: nn.Module) -> str | None:
    """``conv``, ``mlp``, ``attention`` or None, from what the module is (the tracer's leaf tests plus
    the class-name families of MLP-like blocks and attention the operators may not take yet)."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    name = type(module).__name__
    if is_attention_block(module) or is_attention_name(name):
        return "attention"
    if is_mlp_block(module) or name in _MLP_LIKE or f"{type(module).__module__}.{name}" in _MLP_LIKE_PATHS:
        return "mlp"
    return None


def _kind(module: nn.Module, operators: list[str]) -> str | None:
    """The node's kind; a module no name test knows is still a candidate when some operator accepts it
    (a Sequential of two Linear layers, a partial conv such as FasterNet's): ``conv`` if it is already
    partial, else ``mlp`` (a block)."""
    kind = node_kind(module)
    if kind is not None or is_partial_op(module) or isinstance(module, (nn.Linear, nn.modules.batchnorm._NormBase)):
        return kind
    if any(_accepts(op, module) for op in operators):
        return "conv" if is_partial_layer(module) else "mlp"
    return None


def _accepts(variant: str, module: nn.Module) -> bool:
    try:
        return get_operator(variant).accepts(module)
    except Exception:  # an operator that trips over a module it was never meant for does not take it
        return False


def _blocked(name: str, module: nn.Module, modules: dict, discovery: Discovery, owners: dict) -> str | None:
    """Why no operator may replace this node whatever it is (the planner's reasons), or None."""
    if is_partial_op(module):
        return "already a partialize operator"
    owner = _partial_ancestor(name, modules)
    if owner is not None:
        return f"inside {owner}, which is already a partial operator"
    return shared_parameters(name, module, discovery, owners)


def _operator_result(module: nn.Module, variant: str, calls, name: str) -> dict:
    """What ``variant`` at its default parameters does to this layer (plain data)."""
    op, cost, reason = try_operator(module, variant, None, {}, calls, where=f"layer {name!r}")
    if reason is not None:
        return {"converts": False, "reason": reason}
    before, after, basis = cost
    ratio = getattr(op, "ratio", None)
    return {
        "converts": True,
        "ratio": round(float(ratio), 6) if isinstance(ratio, (int, float)) else ratio,
        "macs_before": before,
        "macs_after": after,
        "macs_ratio": round(after / before, 6) if before else None,
        "basis": basis,
        "new": op.extra_repr().replace("\n", " ") or type(op).__name__,
    }


def _node(info: LayerInfo, kind: str, blocked: str | None) -> dict:
    return {
        "name": info.name,
        "kind": kind,
        "type": info.type,
        "type_path": info.type_path,
        "original": info.describe(),
        "found": info.found,
        "in_shape": list(info.in_shape) if info.in_shape else None,
        "out_shape": list(info.out_shape) if info.out_shape else None,
        "params": info.params,
        "macs": info.macs,
        "calls": info.calls,
        "blocked": blocked,
        "operators": {},
    }


def _summary(nodes: list[dict], operators: list[str]) -> dict:
    """Per kind: how many nodes, their MACs, how many some operator converts, and by which."""
    out = {}
    for kind in KINDS:
        mine = [n for n in nodes if n["kind"] == kind]
        by_op = {op: sum(n["operators"][op]["converts"] for n in mine) for op in operators}
        out[kind] = {
            "nodes": len(mine),
            "macs": sum(n["macs"] for n in mine),
            "convertible": sum(any(r["converts"] for r in n["operators"].values()) for n in mine),
            "by_operator": {op: c for op, c in by_op.items() if c},
        }
    return out


def scan_model(
    model: nn.Module,
    *,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
    kinds: tuple[str, ...] = KINDS,
    name: str | None = None,
) -> dict:
    """Every candidate node of ``model`` of the given ``kinds`` (definition order) with, for every
    registered operator, its result on that node; plain data, JSON-ready (``format``/``version``)."""
    t0 = time.perf_counter()
    x = example_input if example_input is not None else example_input_for(model, input_size)
    discovery = discover(model, x)
    modules = dict(model.named_modules())
    operators = list_operators()
    found = [(n, _kind(modules[n], operators)) for n in modules if n in discovery.layers]
    found = [(n, k) for n, k in found if k in kinds]
    runs_on = discovery.shadow or (model, x)  # the meta copy when shapes only (engine/_shape_only.py)
    calls = capture_calls(*runs_on, [n for n, _ in found])
    owners = tensor_owners(model)
    nodes = []
    for n, kind in found:
        node = _node(discovery.layers[n], kind, _blocked(n, modules[n], modules, discovery, owners))
        for op in operators:
            blocked = {"converts": False, "reason": node["blocked"]}
            node["operators"][op] = blocked if node["blocked"] else _operator_result(modules[n], op, calls[n], n)
        nodes.append(node)
    return {
        "format": SCAN_FORMAT,
        "version": SCAN_VERSION,
        "model": name or type(model).__name__,
        "input_shape": list(discovery.input_shape),
        "macs": discovery.macs,
        "params": sum(p.numel() for p in model.parameters()),
        "traced": discovery.traced,
        "kinds": list(kinds),
        "operators": operators,
        "nodes": nodes,
        "summary": _summary(nodes, operators),
        "seconds": round(time.perf_counter() - t0, 3),
    }
