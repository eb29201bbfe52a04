"""single_head_attention (ops/single_head.py): one head of the original on a share of the channels, a
projection over all channels.

The oracle for a partial setting is the original layer with what the new layer starts without zeroed:
the proj columns of every head but the chosen one, and the chosen head's q/k/v input columns outside
the attention channels (the projection's columns for the other channels start at zero). It shares no
code with the operator. The chosen head is checked against a layer built so that one head must win.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import timm
import torch
from _helpers import function_macs, nondegenerate_, rel_err
from torch import nn

import partialize
from partialize.errors import OperatorError
from partialize.ops import get_operator

SH = get_operator("single_head_attention")


def _vit():
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4, embed_dim=64, num_classes=10
    )
    return nondegenerate_(m.eval())


def _qknorm_vit():
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=4, embed_dim=64, num_classes=10,
        qk_norm=True,
    )  # fmt: skip
    return nondegenerate_(m.eval())


def _metaformer_attention():
    """timm MetaFormer's Attention (CAFormer's token mixer), the layer itself."""
    from timm.models.metaformer import Attention

    torch.manual_seed(0)
    return nondegenerate_(Attention(dim=64, head_dim=16).eval())


LAYERS = {
    "vit": (_vit, lambda m: m.blocks[0].attn, (2, 17, 64)),
    "vit_qk_norm": (_qknorm_vit, lambda m: m.blocks[1].attn, (2, 17, 64)),
    "metaformer": (_metaformer_attention, lambda m: m, (2, 16, 64)),
}


def masked_original(layer: nn.Module, head: int, dim_attn: int) -> nn.Module:
    m = copy.deepcopy(layer)
    h, d = m.num_heads, m.head_dim
    dim = h * d
    lo = dim - dim_attn
    with torch.no_grad():
        keep = torch.zeros(dim, dtype=torch.bool)
        keep[head * d : (head + 1) * d] = True
        m.proj.weight[:, ~keep] = 0  # only the chosen head reaches the output
        for j in range(3):  # ...and it reads the last dim_attn channels only
            m.qkv.weight[j * dim + head * d : j * dim + (head + 1) * d, :lo] = 0
    return m


@pytest.mark.parametrize("key", sorted(LAYERS))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_equals_the_masked_original(key, ratio):
    build, pick, shape = LAYERS[key]
    layer = pick(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    op = SH.from_module(layer, ratio=ratio).eval()
    assert op.dim_attn == (layer.qkv.in_features if ratio == 1 else round(ratio * layer.qkv.in_features))
    with torch.no_grad():
        want = masked_original(layer, op.head, op.dim_attn)(x)
        got = op(x)
        assert got.shape == x.shape
        assert rel_err(got, want) <= 1e-5
        assert rel_err(want, layer(x)) > 1e-2  # not vacuous: the dropped heads mattered


def test_the_head_that_adds_most_is_chosen():
    """Weight-norm importance: a head whose value and proj weights are scaled up wins; given scores win."""
    layer = copy.deepcopy(_vit().blocks[0].attn)
    d, dim = layer.head_dim, layer.qkv.in_features
    with torch.no_grad():
        for h in range(layer.num_heads):  # equal norms first, then head 2 three times larger
            layer.qkv.weight[2 * dim + h * d : 2 * dim + (h + 1) * d] = 0.1
            layer.proj.weight[:, h * d : (h + 1) * d] = 0.1
        layer.qkv.weight[2 * dim + 2 * d : 2 * dim + 3 * d] *= 3
    assert SH.from_module(layer).head == 2
    assert SH.from_module(layer, head_scores=[0.0, 5.0, 1.0, 2.0]).head == 1
    assert SH.from_module(layer, head=3).head == 3


def test_the_other_channels_train():
    """The projection's columns for the channels that skip attention start at zero and get gradients."""
    layer = _vit().blocks[0].attn
    op = SH.from_module(layer, ratio=0.25).train()
    rest = op.proj.weight[:, op.head_dim :]
    assert rest.abs().max() == 0
    op(torch.randn(2, 17, 64)).square().sum().backward()
    assert op.proj.weight.grad[:, op.head_dim :].abs().max() > 0


def test_macs_against_an_independent_count():
    layer = _vit().blocks[0].attn
    x = torch.randn(2, 17, 64)
    op = SH.from_module(layer, ratio=0.25).eval()
    macs, _ = op.macs(x)
    assert macs == function_macs(op, (x,), {})
    # by hand: qkv 16 -> 3 x 16, attention 17 x 17 x (16 + 16), proj (16 + 48) -> 64, per image
    n, da, d, dim = 17, 16, 16, 64
    assert macs == 2 * (n * da * 3 * d + n * n * 2 * d + n * (d + dim - da) * dim)
    assert macs < function_macs(layer, (x,), {})


def test_refusals_say_why():
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1), num_heads=(2, 4), embed_dim=32, img_size=56)
    with pytest.raises(OperatorError, match="timm Attention and MetaFormer Attention only"):
        SH.from_module(swin.layers[0].blocks[0].attn)
    layer = _vit().blocks[0].attn
    for bad in (0, -0.5, 1.5):
        with pytest.raises(OperatorError, match="ratio"):
            SH.from_module(layer, ratio=bad)
    with pytest.raises(OperatorError, match="head must be"):
        SH.from_module(layer, head=7)
    with pytest.raises(OperatorError, match="head_scores"):
        SH.from_module(layer, head_scores=[1.0, 2.0])
    with pytest.raises(OperatorError, match="mask"):
        SH.from_module(layer)(torch.randn(1, 17, 64), attn_mask=torch.zeros(1, 1, 17, 17))


def test_a_converted_vit_runs_deploys_saves_and_exports(tmp_path):
    import onnxruntime as ort

    model = _vit()
    recipe = {
        "version": 1,
        "rules": [{"select": {"type": "Attention"}, "variant": "single_head_attention", "ratio": 0.25}],
    }
    converted = partialize.apply(model, recipe, input_size=32)
    plan = converted._partialize_plan
    assert len(plan.converted) == 2 and plan.macs_after < plan.macs_before
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(partialize.deploy(converted)(x), converted.eval()(x)) <= 1e-5
    loaded = partialize.load(partialize.save(converted, tmp_path / "m.safetensors"), model=model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), converted(x))
    net = partialize.deploy(converted)
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})  # fmt: skip
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for inp in (x, torch.randn(3, 3, 32, 32)):
        with torch.no_grad():
            want = net(inp)
        got = torch.from_numpy(sess.run(None, {"input": inp.numpy().astype(np.float32)})[0])
        assert rel_err(got, want) <= 1e-4
