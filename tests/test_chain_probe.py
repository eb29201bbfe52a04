"""``ops._chain_probe.record_forward``, and the LeafTracer's parameter lookup.

The probe: which children a block's forward calls, in order, recorded without torch.fx. Oracle:
torch.fx's own trace of the same block with every child a leaf, on every module with children of
real timm and torchvision models: wherever fx sees a plain chain (calls of children, optionally
added to the input), the probe records the same calls; wherever fx sees any other operation, the
probe records nothing. The lookup: fx's own ``Tracer.getattr`` gives the same graph."""

from __future__ import annotations

import operator

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn

from partialize.engine._shape_only import restored
from partialize.engine.tracer import LeafTracer
from partialize.ops._chain_probe import record_forward


class _AllLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _fx_calls(block: nn.Module):
    """fx's calls of children and additions, in order; None when fx sees anything else."""
    try:
        graph = _AllLeaves().trace(block)
    except Exception:
        return None
    if sum(n.op == "placeholder" for n in graph.nodes) != 1:
        return None
    out = []
    for n in graph.nodes:
        if n.op == "call_module":
            if type(block.get_submodule(n.target)) is nn.Identity and len(n.args) == 1:
                continue
            if any(isinstance(a, (list, tuple)) for a in n.args):
                return None  # a list of values into a child: the probe stops there, and it is no chain
            out.append(n.target)
        elif n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add):
            out.append("+")
        elif n.op not in ("placeholder", "output"):
            return None
    return tuple(out)


def _probe_calls(block: nn.Module):
    run = record_forward(block, training=False)
    if run is None:
        return None
    return tuple(r[1] if r[0] == "call_module" else "+" for r in run[0])


MODELS = {
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050"),
    "mixnet": lambda: timm.create_model("mixnet_s"),
    "efficientformerv2": lambda: timm.create_model("efficientformerv2_s0"),
    "fastvit": lambda: timm.create_model("fastvit_t8"),
    "swiftformer": lambda: timm.create_model("swiftformer_xs"),
    "starnet": lambda: timm.create_model("starnet_s1"),
    "ghostnet": lambda: timm.create_model("ghostnet_050"),
    "tv_efficientnet": lambda: torchvision.models.efficientnet_b0(),
    "tv_convnext": lambda: torchvision.models.convnext_tiny(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_probe_records_what_fx_traces(name):
    model = MODELS[name]().eval()
    checked = chains = 0
    for qual, block in model.named_modules():
        if not any(True for _ in block.children()):
            continue
        want, got = _fx_calls(block), _probe_calls(block)
        assert got == want, f"{qual} ({type(block).__name__}): fx {want}, probe {got}"
        checked += 1
        chains += want is not None
    assert checked > 10 and chains > 3  # both kinds of answer were compared


def test_the_probe_puts_the_children_back_and_keeps_the_mode():
    block = timm.create_model("mobilenetv3_small_050").blocks[1][0].train()
    children = dict(block._modules)
    assert record_forward(block, training=False) is not None
    assert dict(block._modules) == children and all(a is b for a, b in zip(block._modules.values(), children.values()))
    assert block.training


class _FxDefaultGetattr(LeafTracer):
    getattr = fx.Tracer.getattr  # fx's own parameter lookup: the oracle


@pytest.mark.parametrize("name", ["mobilenetv5_300m", "convit_tiny", "levit_128s"])
def test_the_leaf_tracers_parameter_lookup_gives_fxs_graph(name):
    """LeafTracer finds a read parameter's name from a table instead of fx's search of all of them."""
    model = timm.create_model(name).eval()
    graphs = []
    for tracer in (LeafTracer(), _FxDefaultGetattr()):
        with restored(model):  # LeViT caches its biases in a forward: each trace from a clean model
            graphs.append(tracer.trace(model))
    assert fx.GraphModule(model, graphs[0]).code == fx.GraphModule(model, graphs[1]).code
    assert any(n.op == "get_attr" for n in graphs[0].nodes)  # parameters are read in the traced code
