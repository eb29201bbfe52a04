"""The operator contract, checked for every registered operator (and a user's, registered here) on
every module class it accepts in small instances of real timm / torchvision models:

- faithfulness: at its faithful setting (``faithful_params`` on ``faithful_original(m) or m``) the
  converted layer equals the original on the layer's own call arguments (RoPE, masks and keyword
  arguments included), within 1e-5;
- ``deploy()`` equals ``reference()`` within 1e-5;
- ``macs()`` equals an independent count of the inference form (the Python-level conv, linear,
  matmul and ``scaled_dot_product_attention`` calls by formula, not partialize.macs);
- converted by a one-layer recipe: save/load is bit-exact, and the deployed model under
  ``torch.jit.trace`` and the TorchScript-based ONNX exporter equals eager.

Every model gets a non-degenerate init (random BN statistics, every parameter perturbed: zero
position-bias tables, layer scales and heads would hide a dropped part). An operator that accepts a
class and does not reproduce it fails here, whoever wrote it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from _helpers import function_macs, nondegenerate_, rel_err, tiny_timm, tiny_tv_swin
from timm.layers import GatedMlp, GluMlp, SwiGLU
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock
from torch import nn

import partialize
from partialize.engine._calls import capture_calls
from partialize.errors import OperatorError
from partialize.ops import PartialOperator, get_operator, list_operators, register_operator, unregister_operator
from partialize.ops.pconv import dirac_outside


class UserHalfConv(PartialOperator):
    """A user's operator, written against the documented contract only: a 3x3 conv on the first half
    of the channels, identity on the rest (what docs/architecture.md walks through)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.dim, self.half = conv.in_channels, conv.in_channels // 2
        self.conv = nn.Conv2d(self.half, self.half, 3, 1, 1, bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight[: self.half, : self.half])
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias[: self.half])

    @classmethod
    def from_module(cls, original, ratio=None, **params):
        ok = type(original) is nn.Conv2d and original.kernel_size == (3, 3) and original.groups == 1
        if not (ok and original.stride == (1, 1) and original.padding == (1, 1)):
            raise OperatorError("user_halfconv converts dense stride-1 3x3 convs with padding 1")
        if original.in_channels != original.out_channels or original.in_channels < 2:
            raise OperatorError("user_halfconv needs in_channels == out_channels >= 2")
        return cls(original)

    @classmethod
    def faithful_original(cls, module):
        return dirac_outside(module, module.in_channels // 2) if type(module) is nn.Conv2d else None

    def forward(self, x):
        return torch.cat((self.conv(x[:, : self.half]), x[:, self.half :]), dim=1)


USER = "test_user_halfconv"


@pytest.fixture(scope="module", autouse=True)
def _user_operator():
    register_operator(USER)(UserHalfConv)
    yield
    unregister_operator(USER)


def _tiny_tv_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )


def _tiny_mixer(**kw):
    """timm MlpMixer as gmixer_12_224 / gmlp_ti16_224 configure it, two blocks at 32 x 32."""
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64, **kw)


# small instances of real models: attention / MLP / conv families the operators accept (the classes of
# ops/sliced_attention.py all have their own checks in tests/test_sliced_attention.py)
MODELS = {
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "vit_qknorm": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, qk_norm=True, depth=2),
        32,
    ),
    "eva02_tiny": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2), 28),
    "vit_relpos": (lambda: timm.create_model("vit_relpos_small_patch16_224", img_size=32, depth=2), 32),
    "caformer_s18": (lambda: timm.create_model("caformer_s18"), 64),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), img_size=112), 112),
    "swinv2": (lambda: tiny_timm("swinv2"), 64),
    "beit": (lambda: tiny_timm("beit"), 32),
    "tv_swin": (tiny_tv_swin, 32),
    "tv_swin_v2": (lambda: tiny_tv_swin(v2=True), 32),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), 32),
    "mobilenetv2": (lambda: timm.create_model("mobilenetv2_050"), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 32),
    "resnet18": (lambda: timm.create_model("resnet18"), 32),
    "resnet50": (lambda: timm.create_model("resnet50"), 32),
    "tv_mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(), 32),
    "tv_resnet18": (lambda: torchvision.models.resnet18(), 32),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), 32),  # MBConv with SE
    "tv_mnasnet": (lambda: torchvision.models.mnasnet0_5(), 32),
    "tv_convnext": (lambda: torchvision.models.convnext_tiny(), 32),  # CNBlock: the MLP is not a module
    "tv_efficientnet_v2": (  # FusedMBConv: two stages of the real ones, then MBConv
        lambda: torchvision.models.efficientnet_v2_s(stochastic_depth_prob=0.1),
        32,
    ),
    "tv_vit": (_tiny_tv_vit, 32),
    "vit_swiglu": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, mlp_layer=SwiGLU, scale_mlp_norm=True
        ),
        32,
    ),
    "gmixer": (lambda: _tiny_mixer(mlp_ratio=(1.0, 4.0), mlp_layer=GluMlp, act_layer=nn.SiLU), 32),  # GLU MLPs
    "gmlp": (lambda: _tiny_mixer(mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp), 32),
}
OPERATORS = sorted(set(list_operators()) | {USER})
PER_CLASS = 2  # layers checked per (model, operator, class)


def _qual(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _faithful_pair(cls, module):
    """(representable original, operator at its faithful setting), or None when ``cls`` refuses it."""
    try:
        with torch.random.fork_rng(devices=[]):
            ref = cls.faithful_original(module) or module
            op = cls.from_module(ref, **(cls.faithful_params or {}))
    except Exception:  # refused, for whatever reason: not accepted
        return None
    return ref.eval(), op.eval()


@pytest.fixture(scope="module")
def sweep() -> dict:
    """(model, operator) -> list of (class, layer, representable original, operator, calls), once."""
    out = {}
    for key, (build, size) in MODELS.items():
        torch.manual_seed(0)
        model = nondegenerate_(build().eval())
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        modules = dict(model.named_modules())
        for name in OPERATORS:
            cls, found, seen = get_operator(name), [], {}
            for layer, m in modules.items():
                if not layer or seen.get(_qual(m), 0) >= PER_CLASS:
                    continue
                pair = _faithful_pair(cls, m)
                if pair is not None:
                    seen[_qual(m)] = seen.get(_qual(m), 0) + 1
                    found.append((_qual(m), layer, *pair))
            calls = capture_calls(model, x, [f[1] for f in found])
            out[(key, name)] = [(*f, calls[f[1]]) for f in found]
        out[(key, None)] = (model, size)
    return out


def _cases(sweep, name):
    return [c for (key, op), cases in sweep.items() if op == name for c in cases]


@pytest.mark.parametrize("name", OPERATORS)
def test_faithful_at_its_setting(sweep, name):
    bad = {}
    for cls, layer, ref, op, calls in _cases(sweep, name):
        for args, kwargs in calls:
            with torch.no_grad():
                err = rel_err(_first(op(*args, **kwargs)), _first(ref(*args, **kwargs)))
            if not err <= 1e-5:
                bad[(cls, layer)] = err
    assert not bad, f"{name} converts layers it does not reproduce: {bad}"


@pytest.mark.parametrize("name", OPERATORS)
def test_deploy_equals_reference(sweep, name):
    bad = {}
    for cls, layer, _, op, calls in _cases(sweep, name):
        deployed, reference = op.deploy(), op.reference()
        for args, kwargs in calls:
            with torch.no_grad():
                err = rel_err(_first(deployed(*args, **kwargs)), _first(reference(*args, **kwargs)))
            if not err <= 1e-5:
                bad[(cls, layer)] = err
    assert not bad, f"{name}: deploy() differs from reference(): {bad}"


@pytest.mark.parametrize("name", OPERATORS)
def test_macs_equal_an_independent_count(sweep, name):
    cls = get_operator(name)
    bad = {}
    for qual, layer, _, op, calls in _cases(sweep, name):
        args, kwargs = calls[0]
        with torch.no_grad():
            macs, basis = op.macs(*args, **kwargs)
        want = function_macs(op.deploy(), args, kwargs)
        ok = macs >= want if cls.data_dependent else macs == want  # a data-dependent operator quotes a bound
        if not ok:
            bad[(qual, layer)] = (macs, want, basis)
    assert not bad, f"{name}: macs() vs the independent count: {bad}"


def _converted(sweep, name):
    """The first model with a layer ``name`` accepts, converted there by a one-layer recipe."""
    for (key, op), cases in sweep.items():
        if op == name and cases:
            model, size = sweep[(key, None)]
            recipe = {"version": 1, "rules": [{"select": {"name": cases[0][1]}, "variant": name}]}
            converted = partialize.apply(model, recipe, input_size=size)
            if converted._partialize_plan.converted:
                return converted, size
    pytest.fail(f"{name} converts no layer of the sweep's models")


@pytest.mark.parametrize("name", OPERATORS)
def test_save_load_is_bit_exact(sweep, name, tmp_path):
    converted, size = _converted(sweep, name)
    path = partialize.save(converted, tmp_path / "m.safetensors")
    loaded = partialize.load(path, model=_unconverted(sweep, name))  # the base model it was converted from
    a, b = converted.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), loaded.eval()(x))


def _unconverted(sweep, name):
    for (key, op), cases in sweep.items():
        if op == name and cases:
            return sweep[(key, None)][0]


def _ort(data: bytes, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0])


@pytest.mark.parametrize("name", OPERATORS)
def test_exports_equal_eager(sweep, name):
    converted, size = _converted(sweep, name)
    net = partialize.deploy(converted)
    x, other = torch.randn(2, 3, size, size), torch.randn(3, 3, size, size) * 2
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (x,), check_trace=False)
        f = io.BytesIO()
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["input"], output_names=["output"], dynamic_axes=axes)
        for inp in (x, other):
            want = net(inp)
            assert rel_err(traced(inp), want) <= 1e-4, "torch.jit.trace"
            assert rel_err(_ort(f.getvalue(), inp), want) <= 1e-4, "torch.onnx.export(dynamo=False)"


# --- what the built-in operators accept and refuse ---------------------------------------------


def _classes(sweep, name):
    return {c[0] for (key, op), cases in sweep.items() if op == name for c in cases}


def test_the_accepted_classes_are_the_ones_we_verified(sweep):
    """What each block operator converts across the sweep (a new class appearing here must be a
    deliberate, tested addition), and what it must refuse."""
    attn = _classes(sweep, "partial_attention")
    assert attn == {
        "timm.layers.attention.Attention",
        "timm.models.metaformer.Attention",
        "torch.nn.modules.activation.MultiheadAttention",
        # the layer's own forward cut to its kept heads (tests/test_sliced_attention.py)
        "timm.models.swin_transformer.WindowAttention",
        "timm.models.swin_transformer_v2.WindowAttention",
        "timm.models.beit.Attention",
        "torchvision.models.swin_transformer.ShiftedWindowAttention",
        "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
        "timm.models.eva.EvaAttention",  # RoPE passed in by the block, the same rotation for every head
        "timm.models.vision_transformer_relpos.RelPosAttention",  # its bias MLP narrowed to the kept heads
    }
    mlp = _classes(sweep, "partial_mlp")
    assert {
        "timm.layers.mlp.Mlp",
        "timm.models._efficientnet_blocks.InvertedResidual",  # with squeeze-excitation in EfficientNet
        "torchvision.models.mobilenetv3.InvertedResidual",
        "torchvision.models.vision_transformer.MLPBlock",
        "torchvision.models.efficientnet.MBConv",
        "torchvision.models.efficientnet.FusedMBConv",
        "torchvision.models.mnasnet._InvertedResidual",
        "torchvision.models.convnext.CNBlock",
    } <= mlp
    gated = {"timm.layers.mlp.SwiGLU", "timm.layers.mlp.GluMlp", "timm.layers.mlp.GatedMlp"}
    assert gated <= mlp  # split consistently across the gate and value halves (tests/test_gated_mlp.py)
    residual = _classes(sweep, "partial_residual")
    assert {"timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck"} <= residual
    assert "torch.nn.modules.conv.Conv2d" in _classes(sweep, "pconv") & _classes(sweep, USER)


def test_every_operator_says_how_it_is_checked():
    """A faithful setting is part of the contract: without one an operator cannot be verified."""
    missing = [
        n
        for n in list_operators()
        if get_operator(n).faithful_params is None
        and get_operator(n).faithful_original is PartialOperator.faithful_original
    ]
    assert not missing, f"set faithful_params or faithful_original on: {missing}"
