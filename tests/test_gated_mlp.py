"""partial_mlp on timm's gated MLPs (GluMlp / SwiGLUPacked, SwiGLU, GatedMlp with gMLP's
SpatialGatingUnit): the same hidden units are kept in the gate and the value half.

Checked on small real timm modules after a non-degenerate init: at the keep-everything setting the
converted layer is the original; at ratio 1/2 it equals the original with the dropped input channels,
hidden units and output channels zeroed (the definition of a partial MLP: the first n channels in and
out, the first h hidden units); MACs and parameters against counts written here; deploy == eval in
real models that use them."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from _helpers import nondegenerate_, rel_err
from timm.layers import GatedMlp, GluMlp, SwiGLU, SwiGLUPacked
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock, SpatialGatingUnit
from torch import nn

import partialize
from partialize.errors import OperatorError
from partialize.ops import PartialMLP

TOKENS = (2, 5, 16)  # (batch, tokens, channels)
SGU = partial(SpatialGatingUnit, seq_len=TOKENS[1])
SGU_NO_NORM = partial(SpatialGatingUnit, seq_len=TOKENS[1], norm_layer=nn.Identity)

# (block, input shape); every block has dropout (carried as in eval) and no norm over the hidden units
PLAIN = {
    "swiglu": (lambda: SwiGLU(16, 24, drop=0.1), TOKENS),
    "swiglu_nobias": (lambda: SwiGLU(16, 24, bias=False), TOKENS),
    "glu_gate_last": (lambda: GluMlp(16, 48, drop=0.1), TOKENS),
    "swiglu_packed": (lambda: SwiGLUPacked(16, 48, drop=0.1), TOKENS),
    "glu_conv": (lambda: GluMlp(16, 48, use_conv=True, act_layer=nn.GELU), (2, 16, 4, 4)),
    "gated_identity": (lambda: GatedMlp(16, 48, drop=0.1), TOKENS),
    "gated_sgu_identity_norm": (lambda: GatedMlp(16, 48, gate_layer=SGU_NO_NORM, drop=0.1), TOKENS),
}
NORMED = {
    "swiglu_ln": (lambda: SwiGLU(16, 24, norm_layer=nn.LayerNorm, drop=0.1), TOKENS),
    "glu_ln": (lambda: GluMlp(16, 48, norm_layer=nn.LayerNorm), TOKENS),
    "glu_conv_bn": (lambda: GluMlp(16, 48, use_conv=True, norm_layer=nn.BatchNorm2d), (2, 16, 4, 4)),
    "gated_sgu": (lambda: GatedMlp(16, 48, gate_layer=SGU, drop=0.1), TOKENS),
    "gated_sgu_ln": (lambda: GatedMlp(16, 48, gate_layer=SGU, norm_layer=nn.LayerNorm), TOKENS),
}


def _make(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nondegenerate_(build(), seed=seed + 1, scale=0.2).eval()


def _input(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(PLAIN | NORMED))
def test_keep_everything_is_the_original(case):
    build, shape = (PLAIN | NORMED)[case]
    block, x = _make(build), _input(shape)
    op = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
    with torch.no_grad():
        want = block(x)
        assert want.abs().max() > 1e-2  # not a degenerate output
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5


def _expansions(block: nn.Module) -> list[nn.Module]:
    return [getattr(block, a) for a in ("fc1", "fc1_g", "fc1_x") if hasattr(block, a)]


def _zeroed(block: nn.Module, n: int, h: int) -> nn.Module:
    """The original with input channels [n:], hidden units [h:] (fc2's columns) and output channels
    [n:] zeroed: what a partial MLP at (n, h) computes, with the original's own forward."""
    with torch.no_grad():
        for fc in _expansions(block):
            fc.weight[:, n:] = 0
        block.fc2.weight[:, h:] = 0
        block.fc2.weight[n:] = 0
        if block.fc2.bias is not None:
            block.fc2.bias[n:] = 0
    return block


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_half_is_the_original_with_the_dropped_units_zeroed(case):
    build, shape = PLAIN[case]
    block, x = _make(build), _input(shape)
    units = block.fc2.weight.shape[1]  # hidden units fc2 reads: H/2 of a GluMlp's 2H-wide fc1
    op = PartialMLP.from_module(block, ratio=0.5).eval()
    oracle = _zeroed(_make(build), 8, units // 2)
    with torch.no_grad():
        want = oracle(x)
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5
        assert op(x).narrow(op.channel_dim, 8, 8).abs().max() == 0  # the residual carries the rest


def _glu_halves(block: nn.Module) -> tuple[nn.Linear, nn.Linear, bool]:
    """(first, second, act on the first) of a SwiGLU / GluMlp, as timm's forward pairs them."""
    if isinstance(block, SwiGLU):
        return block.fc1_g, block.fc1_x, True
    w, b = block.fc1.weight.chunk(2), block.fc1.bias.chunk(2)
    halves = []
    for wi, bi in zip(w, b):
        lin = nn.Linear(wi.shape[1], wi.shape[0])
        lin.weight.data, lin.bias.data = wi, bi
        halves.append(lin)
    return halves[0], halves[1], not block.gate_last


def _glu_oracle(block: nn.Module, x: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """By hand: the first h units of both halves on x[..., :n], LayerNorm over the h kept units (the
    block's norm restricted to them, as partial_mlp slices a plain Mlp's norm), fc2 to n outputs."""
    first, second, act_first = _glu_halves(block)
    a = F.linear(x[..., :n], first.weight[:h, :n], first.bias[:h])
    b = F.linear(x[..., :n], second.weight[:h, :n], second.bias[:h])
    y = block.act(a) * b if act_first else a * block.act(b)
    ln = block.norm
    y = F.layer_norm(y, (h,), ln.weight[:h], ln.bias[:h], ln.eps)
    out = F.linear(y, block.fc2.weight[:n, :h], block.fc2.bias[:n])
    return torch.cat((out, torch.zeros_like(x[..., n:])), dim=-1)


def _gmlp_oracle(block: GatedMlp, x: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """By hand: gMLP's fc1 rows [:h] (u) and [H/2 : H/2 + h] (v), act, v normalised over its h kept
    units, the token projection whole, u * v, the block's norm over h, fc2 to n outputs."""
    half = block.fc2.weight.shape[1]
    rows = torch.cat((torch.arange(h), torch.arange(half, half + h)))
    z = block.act(F.linear(x[..., :n], block.fc1.weight[rows][:, :n], block.fc1.bias[rows]))
    u, v = z[..., :h], z[..., h:]
    g = block.gate
    v = F.layer_norm(v, (h,), g.norm.weight[:h], g.norm.bias[:h], g.norm.eps)
    y = u * g.proj(v.transpose(-1, -2)).transpose(-1, -2)
    if isinstance(block.norm, nn.LayerNorm):
        y = F.layer_norm(y, (h,), block.norm.weight[:h], block.norm.bias[:h], block.norm.eps)
    out = F.linear(y, block.fc2.weight[:n, :h], block.fc2.bias[:n])
    return torch.cat((out, torch.zeros_like(x[..., n:])), dim=-1)


@pytest.mark.parametrize("case", ["swiglu_ln", "glu_ln", "gated_sgu", "gated_sgu_ln"])
def test_half_with_norms_matches_a_hand_oracle(case):
    build, shape = NORMED[case]
    block, x = _make(build), _input(shape)
    units = block.fc2.weight.shape[1]
    op = PartialMLP.from_module(block, ratio=0.5, hidden_ratio=0.25).eval()
    oracle = _gmlp_oracle if isinstance(block, GatedMlp) else _glu_oracle
    with torch.no_grad():
        assert rel_err(op(x), oracle(block, x, 8, round(units / 4))) <= 1e-5


# (block, MACs per token at ratio 1/2, params of the inference form at ratio 1/2), by arithmetic:
# C = 16 -> n = 8 channels; H = 24 gated hidden units -> h = 12
HALF_COSTS = {
    # fc1_g and fc1_x: 2 x (8 x 12), fc2: 12 x 8; weights + biases
    "swiglu": (2 * 8 * 12 + 12 * 8, 2 * (8 * 12 + 12) + (12 * 8 + 8)),
    # one fc1 with 2 x 12 rows, fc2: 12 x 8
    "glu_gate_last": (8 * 24 + 12 * 8, (8 * 24 + 24) + (12 * 8 + 8)),
    # fc1 8 -> 24 (u and v), fc2 12 -> 8; the SGU's LayerNorm over 12 (2 x 12) and token projection 5 x 5 + 5
    "gated_sgu": (8 * 24 + 12 * 8, (8 * 24 + 24) + (12 * 8 + 8) + 2 * 12 + (5 * 5 + 5)),
}


@pytest.mark.parametrize("case", sorted(HALF_COSTS))
def test_macs_and_params_at_half_match_arithmetic(case):
    build, shape = (PLAIN | NORMED)[case]
    op = PartialMLP.from_module(_make(build), ratio=0.5)
    per_token, params = HALF_COSTS[case]
    batch, tokens, _ = shape
    want = batch * tokens * per_token
    if case == "gated_sgu":  # the token projection: 5 x 5 per kept unit v (12), per image
        want += batch * 12 * tokens * tokens
    macs, _ = op.macs(_input(shape))
    assert macs == want
    assert op.params() == params


def test_unknown_gate_layer_is_refused_with_the_reason():
    class MyGate(nn.Module):
        def __init__(self, dim, **_):
            super().__init__()
            self.proj = nn.Linear(dim // 2, dim // 2)

        def forward(self, x):
            u, v = x.chunk(2, dim=-1)
            return u * self.proj(v)

    with pytest.raises(OperatorError, match="gate_layer MyGate it cannot carry"):
        PartialMLP.from_module(GatedMlp(16, 48, gate_layer=MyGate))


def test_an_activation_with_weights_is_refused():
    with pytest.raises(OperatorError, match="activation PReLU has weights"):
        PartialMLP.from_module(SwiGLU(16, 24, act_layer=nn.PReLU))


# real models that use the three classes (small: 2 blocks, 64 x 64)
REAL = {
    "vit_swiglu": (
        lambda: timm.create_model("vit_small_patch16_224", img_size=64, depth=2, mlp_layer=SwiGLU, scale_mlp_norm=True),
        SwiGLU,
    ),
    "vit_glu": (lambda: timm.create_model("vit_small_patch16_224", img_size=64, depth=2, mlp_layer=GluMlp), GluMlp),
    "gmixer": (lambda: _mixer(embed_dim=384, mlp_ratio=(1.0, 4.0), mlp_layer=GluMlp, act_layer=nn.SiLU), GluMlp),
    "gmlp": (lambda: _mixer(embed_dim=128, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp), GatedMlp),
}


def _mixer(**kw):
    """timm's gmixer_12_224 / gmlp_ti16_224 configurations with 2 blocks at 64 x 64 (their factories
    fix num_blocks, so the class is built directly)."""
    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, **kw)


def _recipe(cls, ratio, **params):
    rule = {"select": {"type": cls.__name__}, "variant": "partial_mlp", "ratio": ratio, "params": params}
    return {"version": 1, "rules": [rule]}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_models_convert_and_deploy_equals_eval(name):
    build, cls = REAL[name]
    torch.manual_seed(0)
    model = nondegenerate_(build().eval())
    count = sum(type(m) is cls for m in model.modules())
    assert count >= 2
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    whole = partialize.apply(model, _recipe(cls, 1.0, hidden_ratio=1.0), input_size=64)
    half = partialize.apply(model, _recipe(cls, 0.5), input_size=64)
    plan = half._partialize_plan
    assert len(plan.converted) == count and plan.macs_after < plan.macs_before
    with torch.no_grad():
        want = model(x)
        assert rel_err(whole.eval()(x), want) <= 1e-5  # keep everything: the model itself
        assert rel_err(partialize.deploy(half)(x), half.eval()(x)) <= 1e-5


@pytest.mark.parametrize("name", ["vit_swiglu", "gmlp"])
def test_deployed_gated_models_export_equal_eager(name):
    """torch.jit.trace and the TorchScript-based ONNX exporter (onnxruntime) on the deployed model."""
    import io
    import warnings

    import onnxruntime as ort

    build, cls = REAL[name]
    torch.manual_seed(0)
    net = partialize.deploy(partialize.apply(nondegenerate_(build().eval()), _recipe(cls, 0.5), input_size=64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (x,), check_trace=False)
        f = io.BytesIO()
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
        want = net(x)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert rel_err(traced(x), want) <= 1e-4 and rel_err(got, want) <= 1e-4
