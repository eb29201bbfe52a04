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


# --- blocks that are x + a chain of their layers, and two torchvision blocks -----------------------


def _maxvit_mbconv():
    from torchvision.models.maxvit import MBConv

    return MBConv(32, 32, 4.0, 0.25, 1, nn.GELU, nn.BatchNorm2d, 0.0)


def _timm_block(model: str, layer: str):
    def build():
        torch.manual_seed(0)
        return timm.create_model(model).get_submodule(layer)

    return build


# class -> (builder, first mixer, second mixer, other layers reading the hidden units)
RESIDUAL = {
    "swiftformer.ConvEncoder": (_timm_block("swiftformer_xs", "stages.0.blocks.0"), "pwconv1", "pwconv2"),
    # main(pre_norm(x)) + shortcut(x), pre_norm and shortcut nn.Identity
    "efficientvit_mit.ResidualBlock": (
        _timm_block("efficientvit_b0", "stages.1.blocks.1"),
        "main.inverted_conv.conv",
        "main.point_conv.conv",
    ),
    "iformer.Residual": (_timm_block("iformer_s", "stages.0.blocks.0.mixer"), "module.1.c", "module.3.c"),
    # BN first; the SE's squeeze reads the kept hidden units only, so its input columns >= h are zeroed too
    "maxvit.MBConv": (_maxvit_mbconv, "layers.conv_a.0", "layers.conv_c", "layers.squeeze_excitation.fc1"),
}


@pytest.mark.parametrize("name", sorted(RESIDUAL))
def test_residual_chain_equals_input_plus_the_masked_branch(name):
    """Kept channels: x + the original branch with the dropped inputs and hidden units zeroed (read off
    the original block as ref(x') - x'); the other channels: x itself. Faithful at ratio 1."""
    build, fc1, fc2, *also = RESIDUAL[name]
    module = nondegenerate_(build().eval())
    c = module.get_submodule(fc1).in_channels
    x = torch.randn(2, c, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = PartialMLP.from_module(module, ratio=1.0, hidden_ratio=1.0).eval()
        assert rel_err(whole(x), module(x)) < 1e-5
        op = PartialMLP.from_module(module).eval()
        assert op.residual and op.channel_dim == 1
        n, h = op.dim_part, module.get_submodule(fc1).out_channels // 2
        ref = copy.deepcopy(module).eval()
        ref.get_submodule(fc1).weight[:, n:] = 0
        for layer in (fc2, *also):
            ref.get_submodule(layer).weight[:, h:] = 0
        xm = x.clone()
        xm[:, n:] = 0
        branch = (ref(xm) - xm)[:, :n]
        got = op(x)
        assert rel_err(got[:, :n], x[:, :n] + branch) < 1e-5
        assert torch.equal(got[:, n:], x[:, n:])
        assert rel_err(op.deploy()(x), got) < 1e-5
        assert rel_err(got, module(x)) > 0.01


def test_shufflenet_unit_runs_branch2_on_half_of_its_half():
    """stride-1 ShuffleNetV2 unit: x1 and the untouched x2 channels pass through, branch2's first
    layers see the kept x2 channels only; checked against the original branch with the dropped inputs
    and hidden units zeroed, then torchvision's own channel shuffle."""
    import torchvision
    from torchvision.models.shufflenetv2 import channel_shuffle

    unit = nondegenerate_(torchvision.models.shufflenet_v2_x0_5().stage2[1].eval())
    x = torch.randn(2, 48, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(PartialMLP.from_module(unit, ratio=1.0, hidden_ratio=1.0).eval()(x), unit(x)) < 1e-6
        op = PartialMLP.from_module(unit).eval()
        n, h = op.dim_part, 12  # 24 channels in x2: 12 kept, 12 of its 24 hidden units
        assert n == 12
        ref = copy.deepcopy(unit.branch2)
        ref[0].weight[:, n:] = 0
        ref[5].weight[:, h:] = 0
        x1, x2 = x.chunk(2, dim=1)
        x2m = x2.clone()
        x2m[:, n:] = 0
        want = channel_shuffle(torch.cat((x1, ref(x2m)[:, :n], x2[:, n:]), dim=1), 2)
        assert rel_err(op(x), want) < 1e-5
        assert rel_err(op.deploy()(x), op(x)) < 1e-5
    strided = torchvision.models.shufflenet_v2_x0_5().stage2[0]
    with pytest.raises(OperatorError, match="strided ShuffleNet unit"):
        PartialMLP.from_module(strided)


def test_a_residual_chain_with_anything_else_is_refused():
    class Scaled(nn.Module):  # x + 0.5 * f(x): an operation after the chain
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Conv2d(8, 16, 1), nn.GELU(), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return x + 0.5 * self.fc2(self.act(self.fc1(x)))

    class Twice(Scaled):  # the input read again inside the branch
        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x))) * x

    class Plain(Scaled):
        def forward(self, x):
            return self.fc2(self.act(self.fc1(x))) + x

    for cls in (Scaled, Twice):
        with pytest.raises(OperatorError, match="does not know how to slice"):
            PartialMLP.from_module(cls())
    op = PartialMLP.from_module(Plain())
    x = torch.randn(1, 8, 4, 4)
    assert op.residual and torch.equal(op(x)[:, 4:], x[:, 4:])


def test_pointwise_selector_and_one_by_seven_kernels():
    """``pointwise: false`` selects Inception's 1x7 / 7x1 convs and 3x3s but no 1x1; ``auto`` turns
    the in != out ones into partial_kernel and the in == out ones into PConv."""
    import torchvision

    net = torchvision.models.inception_v3(aux_logits=False, init_weights=False).eval()
    rec = {
        "version": 1,
        "strict": False,
        "rules": [{"select": {"type": "Conv2d", "pointwise": False}, "variant": "skip"}],
    }
    plan = partialize.plan(net, rec, input_size=299)
    picked = {e.layer for e in plan.entries}
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert picked == {n for n, m in convs.items() if m.kernel_size != (1, 1)}
    assert "Mixed_6b.branch7x7_2.conv" in picked  # a 1x7
    auto = {e.layer: e.variant for e in partialize.plan(net, "auto", input_size=299).converted}
    c17 = convs["Mixed_6b.branch7x7_2.conv"]  # 128 -> 128, 1x7
    assert c17.kernel_size == (1, 7) and auto["Mixed_6b.branch7x7_2.conv"] == "pconv"
    c71 = convs["Mixed_6b.branch7x7_3.conv"]  # 128 -> 192, 7x1
    assert c71.in_channels != c71.out_channels and auto["Mixed_6b.branch7x7_3.conv"] == "partial_kernel"


def test_chains_that_only_look_like_chains_are_refused():
    """What the review found: a Sequential subclass with its own forward, a LayerNorm subclass, a
    forward that branches on self.training, a hooked child, a stateful weightless layer called twice:
    each would be cut into a different function, so each is refused (or, for the subclass, not
    flattened)."""

    class Doubling(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    class WithNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.noise, self.fc2 = nn.Conv2d(8, 16, 1), nn.Dropout(0.5), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            x = self.fc1(x)
            if self.training:
                x = self.noise(x)
            return self.fc2(x)

    class TwiceNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16, affine=False), nn.Conv2d(16, 16, 1)
            self.fc3 = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.fc3(self.bn(self.fc2(self.bn(self.fc1(x)))))

    from timm.layers import LayerNormAct

    cases = [
        _named("DoublingMlp", [Doubling(nn.Linear(8, 16), nn.GELU()), nn.Linear(16, 8)]),
        _named("NormActMlp", [nn.Linear(8, 16), LayerNormAct(16, act_layer=nn.ReLU), nn.Linear(16, 8)]),
        type("NoiseMlp", (WithNoise,), {})(),
        type("TwiceNormMlp", (TwiceNorm,), {})(),
    ]
    hooked = _named("HookedMlp", [nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)])
    hooked.layer0.register_forward_hook(lambda m, i, o: o * 3)
    cases.append(hooked)
    for block in cases:
        with pytest.raises(OperatorError):
            PartialMLP.from_module(block, ratio=1.0, hidden_ratio=1.0)


def _named(name: str, layers: list[nn.Module]) -> nn.Module:
    """A module of class ``name`` whose forward calls ``layers`` in order (layer0, layer1, ...)."""

    def forward(self, x):
        for i in range(len(layers)):
            x = getattr(self, f"layer{i}")(x)
        return x

    block = type(name, (nn.Module,), {"forward": forward})()
    for i, m in enumerate(layers):
        setattr(block, f"layer{i}", m)
    return block


def _pvt_mlp():
    from timm.models.pvt_v2 import MlpWithDepthwiseConv

    torch.manual_seed(0)
    return nondegenerate_(MlpWithDepthwiseConv(16, 64, extra_relu=True), scale=0.2).eval()


def test_pvt_v2_mlp_takes_its_feat_size_and_equals_the_zeroed_original():
    """PVT v2's MlpWithDepthwiseConv(x, feat_size): cut as a copy of its class. Oracle: the original with
    fc1's input columns >= 8 and fc2's columns >= 32 zeroed (the dwconv's bias makes the dropped hidden
    units non-zero, so fc2's columns, not fc1's rows, remove them), on the first 8 outputs; 0 on the rest."""
    block, x = _pvt_mlp(), torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    whole = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
    half = PartialMLP.from_module(block, ratio=0.5).eval()
    oracle = copy.deepcopy(block)
    with torch.no_grad():
        oracle.fc1.weight[:, 8:] = 0
        oracle.fc2.weight[:, 32:] = 0
        full = oracle(x, (3, 4))
        want = torch.cat((full[..., :8], torch.zeros_like(full[..., 8:])), dim=-1)
        assert rel_err(whole(x, (3, 4)), block(x, (3, 4))) <= 1e-6
        assert rel_err(half(x, (3, 4)), want) <= 1e-6
        assert rel_err(half.deploy()(x, (3, 4)), want) <= 1e-6
    macs, _ = half.macs(x, (3, 4))
    assert macs == 2 * 12 * (8 * 32 + 32 * 9 + 32 * 8)  # fc1 8 -> 32, 3x3 depthwise on 32, fc2 32 -> 8


def test_pvt_v2_converts_with_auto_and_exports():
    import io
    import warnings

    import onnxruntime as ort

    torch.manual_seed(0)
    model = nondegenerate_(timm.create_model("pvt_v2_b0", num_classes=10, depths=(1, 1, 1, 1)).eval())
    net = partialize.apply(model, "auto", input_size=64)
    plan = net._partialize_plan
    assert sum(e.variant == "partial_mlp" for e in plan.converted) == 4
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    dep = partialize.deploy(net)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert rel_err(dep(x), net.eval()(x)) <= 1e-4
        f = io.BytesIO()
        torch.onnx.export(dep, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
        want = dep(x)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    assert rel_err(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want) <= 1e-4


def test_grouped_conv_is_cut_to_whole_groups_only():
    """Output group j of a grouped conv reads only input group j, so its first k groups are exact."""
    from partialize.ops._utils import slice_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 24, 3, padding=1, groups=3)  # 4 inputs and 8 outputs per group
    x = torch.randn(2, 12, 5, 5)
    cut = slice_conv(conv, (0, 16), (0, 8))
    assert cut.groups == 2 and cut.weight.shape == (16, 4, 3, 3)
    with torch.no_grad():
        assert rel_err(cut(x[:, :8]), conv(x)[:, :16]) <= 1e-6
    for out_range, in_range in (((0, 12), (0, 8)), ((0, 16), (0, 4)), ((0, 8), (0, 6))):
        with pytest.raises(OperatorError, match="whole groups"):
            slice_conv(conv, out_range, in_range)


def test_group_norms_are_cut_to_whole_groups_or_normalise_the_kept_channels():
    from timm.layers import GroupNorm1

    from partialize.ops.partial_blocks import _slice_layer

    torch.manual_seed(0)
    x = torch.randn(2, 12, 4, 4)
    gn = nondegenerate_(nn.GroupNorm(3, 12), scale=0.3)
    with torch.no_grad():
        assert rel_err(_slice_layer(gn, 8, 8, "t")(x[:, :8]), gn(x)[:, :8]) <= 1e-6  # 2 of 3 groups
        with pytest.raises(OperatorError, match="cannot be cut to 6 channels"):
            _slice_layer(gn, 6, 6, "t")
        one = nondegenerate_(GroupNorm1(12), scale=0.3)
        kept = x[:, :6]
        mean = kept.mean(dim=(1, 2, 3), keepdim=True)
        var = kept.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        want = (kept - mean) / torch.sqrt(var + one.eps) * one.weight[:6, None, None] + one.bias[:6, None, None]
        assert rel_err(_slice_layer(one, 6, 6, "t")(kept), want) <= 1e-5


def test_cpubone_residual_blocks_with_group_norm_pad_and_grouped_convs_convert():
    """CPUBone's ResidualBlocks: an MLP after a one-group norm, and FusedMBConv (zero pad, a grouped
    2x2 expansion, a 1x1 projection) with an identity shortcut. The FusedMBConv cut equals the original
    with its projection's columns of the second expansion group zeroed (the first group reads only the
    kept inputs); the MLP's norm reads the kept channels (checked above), so it is checked at ratio 1."""
    torch.manual_seed(0)
    model = nondegenerate_(timm.create_model("cpubone_t0", num_classes=10).eval())
    blocks = {n: b for n, b in model.named_modules() if type(b).__name__ == "ResidualBlock" and b.shortcut is not None}
    fused = next(b for b in blocks.values() if type(b.main).__name__ == "FusedMBConv")
    mlp = next(b for b in blocks.values() if isinstance(b.main, nn.Sequential) and len(b.main) == 5)
    for block, x in ((fused, torch.randn(2, 96, 8, 8)), (mlp, torch.randn(2, 96, 8, 8))):
        op = PartialMLP.from_module(block, ratio=0.5).eval()
        whole = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
        with torch.no_grad():
            assert rel_err(whole(x), block(x)) <= 1e-5
            y = op(x)
            assert torch.equal(y[:, 48:], x[:, 48:])  # the residual carries the other half
            if block is fused:
                oracle = copy.deepcopy(block)
                oracle.main.point_conv.conv.weight[:, 192:] = 0
                assert rel_err(y[:, :48], oracle(x)[:, :48]) <= 1e-5
            assert rel_err(op.deploy()(x), y) <= 1e-5
    net = partialize.apply(model, "auto", input_size=128)
    assert net._partialize_plan.macs_after < 0.7 * net._partialize_plan.macs_before
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert rel_err(partialize.deploy(net)(x), net.eval()(x)) <= 1e-4


def test_xception_block_with_three_pointwise_convs_equals_the_masked_original():
    """legacy Xception's identity-skip Block: x + rep(x), rep = 3 x (ReLU, depthwise 3x3 + pointwise
    1x1, BN). Every pointwise conv is cut (32 -> 16 -> 16 -> 16 at 1/2); oracle: the original with the
    first pointwise conv's columns >= 16 and the others' columns >= 16 zeroed, on the first 16 outputs."""
    from timm.models.xception import Block

    torch.manual_seed(0)
    block = nondegenerate_(Block(32, 32, reps=3), scale=0.2).eval()
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(1))
    op = PartialMLP.from_module(block, ratio=0.5).eval()
    whole = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
    oracle = copy.deepcopy(block)
    with torch.no_grad():
        for i in (1, 4, 7):
            oracle.rep[i].pointwise.weight[:, 16:] = 0
        want = torch.cat((oracle(x.clone())[:, :16], x[:, 16:]), dim=1)
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5
        assert rel_err(whole(x), block(x.clone())) <= 1e-5
    macs, _ = op.macs(x[:1])
    assert macs == 36 * 3 * (16 * 9 + 16 * 16)  # per pixel: three depthwise 3x3 on 16, three 16 -> 16


def test_xception_models_convert_with_auto():
    torch.manual_seed(0)
    for name in ("legacy_xception", "xception41"):
        model = nondegenerate_(timm.create_model(name, num_classes=10).eval())
        net = partialize.apply(model, "auto", input_size=96)
        plan = net._partialize_plan
        assert sum(e.variant == "partial_mlp" for e in plan.converted) == 8  # the middle flow
        x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert rel_err(partialize.deploy(net)(x), net.eval()(x)) <= 1e-4
