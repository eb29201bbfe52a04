"""partial_mlp on timm's model-specific MLP classes, read as a chain of their layers from an fx trace
(``partial_blocks.traced_chain``): one case per class, each a layer of the real (small) timm model.

Oracle, by an independent route: the original layer with its first mixer's input columns >= n and its
second mixer's input columns >= h zeroed (the dropped channels and hidden units) computes, on the
first n output channels, what the cut layer computes; the cut layer outputs exactly 0 on the others
(the residual around it carries them). Also: faithful at ratio 1, deploy == eval, MACs against an
independent count, and what is refused."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from _helpers import function_macs, nondegenerate_, rel_err
from torch import nn

import partialize
from partialize.engine._calls import capture_calls
from partialize.errors import OperatorError
from partialize.ops import PartialMLP

# class -> (model, layer, first mixer, second mixer, input size); TinyViT's leading LayerNorm (None here)
# is cut with its layer: it normalises over the kept channels, re-derived by formula below
CASES = {
    "inception_next.ConvMlp": ("inception_next_atto", "stages.0.blocks.0.mlp", "fc1", "fc2", 64),
    "fastvit.ConvMlp": ("fastvit_t8", "stages.0.blocks.0.mlp", "fc1", "fc2", 64),  # depthwise 7x7 + BN first
    "efficientformer.ConvMlpWithNorm": ("efficientformer_l1", "stages.0.blocks.0.mlp", "fc1", "fc2", 224),
    "efficientformer_v2.ConvMlpWithNorm": (
        "efficientformerv2_s0",
        "stages.0.blocks.0.mlp",
        "fc1.conv",
        "fc2.conv",
        224,
    ),  # a depthwise 3x3 between
    "efficientvit_msra.ConvMlp": ("efficientvit_m0", "stages.0.blocks.0.ffn0.m", "pw1.conv", "pw2.conv", 64),
    "shvit.FFN": ("shvit_s1", "stages.0.blocks.0.ffn.m", "pw1.c", "pw2.c", 64),
    "swiftformer.Mlp": ("swiftformer_xs", "stages.0.blocks.2.linear", "fc1", "fc2", 64),  # BatchNorm first
    "repvit.RepVitMlp": ("repvit_m1", "stages.0.blocks.0.channel_mixer", "conv1.c", "conv2.c", 64),
    "tiny_vit.NormMlp": ("tiny_vit_5m_224", "stages.1.blocks.0.mlp", None, None, 224),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model_name, layer, fc1, fc2, size = CASES[request.param]
    torch.manual_seed(0)
    model = nondegenerate_(timm.create_model(model_name).eval())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    module = model.get_submodule(layer)
    assert f"{type(module).__module__}.{type(module).__qualname__}" == f"timm.models.{request.param}"
    (args, kwargs), *_ = capture_calls(model, x, [layer])[layer]
    return request.param, module, fc1, fc2, args, kwargs


def test_faithful_at_ratio_one_and_deploy_equal(case):
    _, module, _, _, args, kwargs = case
    op = PartialMLP.from_module(module, ratio=1.0, hidden_ratio=1.0).eval()
    with torch.no_grad():
        assert rel_err(op(*args, **kwargs), module(*args, **kwargs)) < 1e-5
        cut = PartialMLP.from_module(module).eval()
        assert rel_err(cut.deploy()(*args, **kwargs), cut(*args, **kwargs)) < 1e-5


def test_cut_equals_the_original_with_the_dropped_parts_zeroed(case):
    name, module, fc1, fc2, args, kwargs = case
    op = PartialMLP.from_module(module).eval()
    if fc1 is None:  # TinyViT NormMlp: LayerNorm over the n kept channels, fc1 to h units, GELU, fc2
        n, h, x = op.dim_part, module.fc1.out_features // 2, args[0]
        with torch.no_grad():
            t = F.layer_norm(x[..., :n], (n,), module.norm.weight[:n], module.norm.bias[:n], module.norm.eps)
            t = F.gelu(F.linear(t, module.fc1.weight[:h, :n], module.fc1.bias[:h]))
            want = F.linear(t, module.fc2.weight[:n, :h], module.fc2.bias[:n])
            got = op(*args, **kwargs)
        assert rel_err(got[..., :n], want) < 1e-5 and torch.count_nonzero(got[..., n:]) == 0
        return
    n, ch = op.dim_part, op.channel_dim
    first = module.get_submodule(fc1)
    h = int(first.out_channels if isinstance(first, nn.Conv2d) else first.out_features) // 2
    ref = copy.deepcopy(module).eval()
    with torch.no_grad():
        ref.get_submodule(fc1).weight[:, n:] = 0
        ref.get_submodule(fc2).weight[:, h:] = 0
        x = args[0].clone()
        x.narrow(ch, n, x.shape[ch] - n).zero_()  # a leading depthwise conv / BN must not see them either
        want = ref(x).narrow(ch, 0, n)
        got = op(*args, **kwargs)
    assert rel_err(got.narrow(ch, 0, n), want) < 1e-5
    assert torch.count_nonzero(got.narrow(ch, n, got.shape[ch] - n)) == 0
    assert rel_err(got, module(*args, **kwargs)) > 0.05  # really cut


def test_macs_equal_an_independent_count(case):
    _, module, _, _, args, kwargs = case
    op = PartialMLP.from_module(module).eval()
    with torch.no_grad():
        macs, _ = op.macs(*args, **kwargs)
        full = function_macs(module, args, kwargs)
    assert macs == function_macs(op.deploy(), args, kwargs)
    assert macs < 0.4 * full  # half the channels and half the hidden units: about a quarter


def test_not_a_chain_or_not_named_an_mlp_is_refused():
    class Gated(nn.Module):  # an operation between the calls: not a chain
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.fc1(x) * torch.sigmoid(x.mean(-1, keepdim=True)))

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    GatedMlp = type("GatedMlpLike", (Gated,), {})
    ChainMlp = type("ChainMlp", (Chain,), {})
    with pytest.raises(OperatorError, match="does not know how to slice"):
        PartialMLP.from_module(GatedMlp())
    with pytest.raises(OperatorError, match="does not know how to slice"):
        PartialMLP.from_module(Chain())  # a chain, but not named an MLP: it may not sit in a residual
    op = PartialMLP.from_module(ChainMlp())
    assert (op.dim, op.dim_part, op.layers[0].out_features) == (8, 4, 8)


def test_auto_converts_them_and_exports():
    """A whole EfficientFormer-V2 converted by ``auto`` (ConvMlpWithNorm in every stage) deploys equal
    to eval and exports through the TorchScript-based ONNX exporter equal to eager."""
    import io
    import warnings

    import numpy as np
    import onnxruntime as ort

    model = nondegenerate_(timm.create_model("efficientformerv2_s0").eval())
    net = partialize.apply(model, "auto", input_size=224)
    kinds = {e.variant for e in net._partialize_plan.converted}
    assert "partial_mlp" in kinds
    deployed = partialize.deploy(net)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = net.eval()(x)
        assert rel_err(deployed(x), want) < 1e-4
        f = io.BytesIO()
        torch.onnx.export(deployed, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.numpy().astype(np.float32)})[0])
    assert rel_err(got, want) < 1e-4
