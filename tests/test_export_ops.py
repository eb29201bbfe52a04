"""Every deployed operator form under every exporter: the TorchScript-based ONNX exporter
(``dynamo=False``, still what many deployment pipelines use), the dynamo ONNX exporter,
``torch.jit.trace`` and ``torch.jit.script``. Each must reproduce the eager deployed model or refuse
with a clear error; a file that computes something else is the one outcome not allowed.

The models are small real ones with a non-degenerate init, converted by a one-rule recipe per
operator, so the operators sit next to BNs they fold, residual adds and whatever else surrounds them
in practice.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from _helpers import nondegenerate_, rel_err, tiny_timm, tiny_tv_swin

import partialize
from partialize.errors import PartializeError
from partialize.ops import list_operators

TOL = 1e-4


def _rule(select: dict, variant: str, strict: bool = True, **extra) -> dict:
    return {"version": 1, "strict": strict, "rules": [{"select": select, "variant": variant, **extra}]}


CONV3 = {"type": "Conv2d", "kernel": 3, "stride": 1, "groups": "dense"}
# operator -> (model builder, input size, recipe); several cases for operators with several forms
CASES = {
    "pconv": [
        ("resnet18", 32, _rule(CONV3, "pconv")),
        ("tv_regnet", 32, _rule({"type": "Conv2d", "kernel": 3, "groups": "grouped"}, "pconv", strict=False)),
    ],
    "patconv": [
        ("resnet18", 32, _rule(CONV3, "patconv", params={"attn": "ch"})),
        ("resnet18", 32, _rule({**CONV3, "stage": 3}, "patconv", params={"attn": "sf"})),
    ],
    "dpconv": [
        ("resnet18", 32, _rule(CONV3, "dpconv")),
        ("resnet18", 32, _rule(CONV3, "dpconv", params={"attn": "ch"})),
    ],
    "ada_pconv": [("resnet18", 32, _rule(CONV3, "ada_pconv"))],
    "pat_sp": [("resnet50", 32, _rule({"name": "layer1.0.conv3"}, "pat_sp"))],
    "partial_mlp": [
        ("mobilenetv2_050", 32, _rule({"type": "InvertedResidual"}, "partial_mlp", strict=False)),
        ("vit", 32, _rule({"type": "Mlp"}, "partial_mlp")),
        ("tv_convnext", 32, _rule({"type": "CNBlock"}, "partial_mlp")),
        ("tv_efficientnet_b0", 32, _rule({"type": "MBConv"}, "partial_mlp", strict=False)),
    ],
    "partial_attention": [
        ("vit", 32, _rule({"type": "Attention"}, "partial_attention", ratio=0.5)),
        ("tv_vit", 32, _rule({"type": "MultiheadAttention"}, "partial_attention", ratio=0.5)),
        ("swin", 56, _rule({"type": "WindowAttention"}, "partial_attention", ratio=0.5)),
        ("tv_swin_v2", 32, _rule({"type": "ShiftedWindowAttentionV2"}, "partial_attention", ratio=0.5)),
        ("beit", 32, _rule({"type": "Attention"}, "partial_attention", ratio=0.5)),
    ],
    "single_head_attention": [("vit", 32, _rule({"type": "Attention"}, "single_head_attention", ratio=0.25))],
    "partial_kernel": [  # the strided 3x3s (with BN folded in) and DenseNet's 3x3s that change the width
        ("resnet18", 32, _rule({"type": "Conv2d", "kernel": 3, "stride": 2}, "partial_kernel")),
        (
            "tv_densenet",
            32,
            _rule({"type": "Conv2d", "kernel": 3, "keeps_shape": False}, "partial_kernel", strict=False),
        ),
        # grouped: ResNeSt's radix-2 split-attention 3x3s (64 -> 128 in 2 groups)
        ("resnest14d", 32, _rule({"type": "Conv2d", "kernel": 3, "groups": "grouped"}, "partial_kernel")),
    ],
    "partial_residual": [
        ("resnet50", 32, _rule({"type": "Bottleneck"}, "partial_residual", ratio=0.5)),
        ("resnet18", 32, _rule({"type": "BasicBlock"}, "partial_residual", ratio=0.5)),
    ],
}


def _build(name: str):
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    if name == "tv_vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
        )
    if name in ("swin", "beit"):
        return tiny_timm(name)
    if name == "tv_swin_v2":
        return tiny_tv_swin(v2=True)
    if name == "tv_convnext":
        return torchvision.models.convnext_tiny()
    if name == "tv_efficientnet_b0":
        return torchvision.models.efficientnet_b0()
    if name == "tv_densenet":
        return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16)
    if name == "tv_regnet":
        return torchvision.models.regnet_x_400mf()
    return timm.create_model(name)


def _flat_cases():
    out = []
    for variant, cases in CASES.items():
        for i, (model, size, recipe) in enumerate(cases):
            out.append(pytest.param(variant, model, size, recipe, id=f"{variant}-{model}-{i}"))
    return out


def test_every_registered_operator_has_an_export_case():
    assert set(list_operators()) <= set(CASES)


_deployed_cache: dict = {}


def _deployed(variant, model, size, recipe):
    key = (variant, model, size, str(recipe))
    if key not in _deployed_cache:
        base = nondegenerate_(_build(model).eval())
        converted = partialize.apply(base, recipe, input_size=size)
        assert any(e.variant == variant for e in converted._partialize_plan.converted), "nothing converted"
        _deployed_cache[key] = partialize.deploy(converted)
    return _deployed_cache[key]


def _inputs(size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=g)
    other = torch.randn(3, 3, size, size, generator=g) * torch.tensor([0.1, 1.0, 4.0]).reshape(3, 1, 1, 1)
    return x, other


def _ort(model_bytes: bytes, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0])


def _check_or_refused(fn, net, *inputs):
    """Run ``fn`` (an export of ``net`` returning a callable); it must match eager on every input (the
    one it was exported on and others: another batch size, other values, other routing) or raise
    partialize's clear error."""
    try:
        run = fn()
    except PartializeError:
        return "refused"
    for x in inputs:
        with torch.no_grad():
            want = net(x)
            got = run(x)
        err = rel_err(got, want)
        assert err <= TOL, f"exported model differs from the deployed one on a {tuple(x.shape)} input: {err:.3g}"
    return "equal"


@pytest.mark.parametrize("variant,model,size,recipe", _flat_cases())
def test_torchscript_onnx_exporter(variant, model, size, recipe):
    net = _deployed(variant, model, size, recipe)
    x, other = _inputs(size)

    def export():
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (x,),
                f,
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        data = f.getvalue()
        return lambda inp: _ort(data, inp)

    assert _check_or_refused(export, net, x, other) == "equal"


@pytest.mark.parametrize("variant,model,size,recipe", _flat_cases())
def test_jit_trace(variant, model, size, recipe):
    net = _deployed(variant, model, size, recipe)
    x, other = _inputs(size)

    def export():
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, (x,), check_trace=False)
        return lambda inp: traced(inp)

    assert _check_or_refused(export, net, x, other) == "equal"


@pytest.mark.parametrize("variant,model,size,recipe", _flat_cases())
def test_jit_script_reproduces_or_refuses_clearly(variant, model, size, recipe):
    net = _deployed(variant, model, size, recipe)
    x, other = _inputs(size)

    def export():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(net)
        return lambda inp: scripted(inp)

    try:
        outcome = _check_or_refused(export, net, x, other)
    except Exception as e:  # an opaque TorchScript compile error is not a clear refusal
        pytest.fail(f"torch.jit.script failed without partialize's clear error: {type(e).__name__}: {e}"[:500])
    assert outcome in ("equal", "refused")


@pytest.mark.slow
@pytest.mark.parametrize("variant,model,size,recipe", _flat_cases())
def test_dynamo_onnx_exporter(variant, model, size, recipe, tmp_path):
    net = _deployed(variant, model, size, recipe)
    x, other = _inputs(size)

    def export():
        path = tmp_path / "m.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                net,
                (x,),
                dynamo=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            )
            prog.save(str(path))
        data = path.read_bytes()
        return lambda inp: _ort(data, inp)

    assert _check_or_refused(export, net, x, other) == "equal"


def test_deployed_torchvision_resnet18_under_the_torchscript_onnx_exporter():
    """The report of issue 11 §3, as a user wrote it: 99% wrong before, equal now."""
    model = nondegenerate_(torchvision.models.resnet18().eval())
    net = partialize.deploy(partialize.apply(model, input_size=64))
    x = torch.randn(1, 3, 64, 64)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), f, dynamo=False)
    with torch.no_grad():
        assert rel_err(_ort(f.getvalue(), x), net(x)) <= TOL
