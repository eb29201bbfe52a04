"""Operators: equivalences, equations re-computed directly, gradients, deploy forms, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err
from torch import fx, nn

from partialize.errors import OperatorError
from partialize.ops import (
    AdaPConv,
    DPConv,
    GaussianChannelAttention,
    MergedSpatialAttention,
    PartialAttention,
    PartialMLP,
    PartialOperator,
    PartialSelfAttention,
    PartialSpatialAttention,
    PATConv,
    PConv,
    get_operator,
    list_operators,
    register_operator,
    unregister_operator,
)
from partialize.ops.dpconv import binarize_ste


def _trained_bn(module: nn.Module, *inputs) -> nn.Module:
    """Run a few train-mode forwards so BN running stats are non-trivial, then eval."""
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(*[i + 0.1 * torch.randn_like(i) for i in inputs])
    return module.eval()


# --- PConv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k,d", [(3, 1), (5, 1), (3, 2), (1, 1)])
def test_pconv_identity_and_conv_part(k, d):
    conv = nn.Conv2d(32, 32, k, 1, d * (k - 1) // 2, dilation=d, bias=True)
    op = PConv.from_module(conv, ratio=0.25)
    x = torch.randn(2, 32, 11, 13)
    y = op(x)
    assert y.shape == x.shape
    assert torch.equal(y[:, 8:], x[:, 8:])  # untouched channels: exactly identity
    ref = F.conv2d(x[:, :8], conv.weight[:8, :8], conv.bias[:8], padding=conv.padding, dilation=d)
    assert rel_err(y[:, :8], ref) < 1e-6


def test_pconv_split_cat_equals_slicing_and_slicing_has_gradients():
    op = PConv(48, 0.25)
    x = torch.randn(3, 48, 9, 9, requires_grad=True)
    a = op(x)
    op.forward_mode = "slicing"
    b = op(x)
    assert torch.equal(a, b)
    b.square().sum().backward()  # the in-place write goes to a clone: autograd is fine
    assert op.conv.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize(
    "conv,reason",
    [
        (nn.Conv2d(16, 16, 3, 2, 1), "stride"),
        (nn.Conv2d(16, 32, 3, 1, 1), "in_channels"),
        (nn.Conv2d(16, 32, 3, 1, 1, groups=4), "in_channels"),
        (nn.Conv2d(16, 16, 3, 1, 0), "spatial size"),
    ],
)
def test_pconv_refuses_what_it_cannot_represent(conv, reason):
    with pytest.raises(OperatorError, match=reason):
        PConv.from_module(conv, 0.25)


@pytest.mark.parametrize("groups,ratio,kept", [(6, 0.5, 3), (6, 0.25, 2), (4, 0.25, 1), (2, 0.25, 1)])
def test_pconv_on_a_grouped_conv_keeps_whole_groups(groups, ratio, kept):
    """RegNet / ResNeXt convs: the first round(ratio * groups) groups stay the same grouped conv (the
    oracle: F.conv2d of the original weight on those channels), the other channels are identity."""
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 48, 3, 1, 1, groups=groups, bias=True)
    op = PConv.from_module(conv, ratio)
    n = kept * 48 // groups
    assert op.dim_conv == n and op.conv.groups == kept
    x = torch.randn(2, 48, 7, 7)
    want = torch.cat((F.conv2d(x[:, :n], conv.weight[:n], conv.bias[:n], padding=1, groups=kept), x[:, n:]), dim=1)
    assert rel_err(op(x), want) <= 1e-6 and rel_err(op.deploy()(x), want) <= 1e-6
    with pytest.raises(OperatorError, match="same layer"):
        PConv.from_module(nn.Conv2d(48, 48, 3, 1, 1, groups=2), 0.9)  # both groups: nothing partial


def test_pconv_depthwise_and_pooled_stride_generalisations():
    dw = nn.Conv2d(32, 32, 7, 1, 3, groups=32, bias=True)
    op = PConv.from_module(dw, 0.25)
    x = torch.randn(2, 32, 10, 10)
    y = op(x)
    ref = F.conv2d(x[:, :8], dw.weight[:8], dw.bias[:8], padding=3, groups=8)
    assert rel_err(y[:, :8], ref) < 1e-6 and torch.equal(y[:, 8:], x[:, 8:])
    strided = nn.Conv2d(32, 32, 3, 2, 1)
    with pytest.raises(OperatorError, match="stride_mode: pool"):
        PConv.from_module(strided, 0.25)
    op = PConv.from_module(strided, 0.25, stride_mode="pool")
    for hw in (10, 11):  # odd sizes: conv gives ceil(H/2), so does the ceil-mode pool
        x = torch.randn(2, 32, hw, hw)
        y = op(x)
        assert y.shape == strided(x).shape
        ref = F.conv2d(x[:, :8], strided.weight[:8, :8], strided.bias[:8], stride=2, padding=1)
        assert rel_err(y[:, :8], ref) < 1e-6
        pooled = F.avg_pool2d(x[:, 8:], 2, 2, ceil_mode=True, count_include_pad=False)
        assert torch.equal(y[:, 8:], pooled)
        assert rel_err(op.deploy()(x), y) < 1e-6


def test_pconv_ratio_rounding_and_bounds():
    assert PConv(40, 0.25).dim_conv == 10
    assert PConv(20, 1 / 8).dim_conv == 3  # 2.5 rounds half up
    assert PConv(4, 0.01).dim_conv == 1
    with pytest.raises(OperatorError, match="ratio"):
        PConv(16, 1.5)


def test_pconv_from_timm_partial_conv_keeps_function():
    timm = pytest.importorskip("timm")
    model = timm.create_model("fasternet_t0", pretrained=False)
    src = model.stages[0].blocks[0].spatial_mixing
    x = torch.randn(2, src.dim_conv3 + src.dim_untouched, 8, 8)
    op = PConv.from_module(src, ratio=None)  # inherit the source ratio
    assert op.dim_conv == src.dim_conv3
    assert rel_err(op(x), src(x)) < 1e-6
    wider = PConv.from_module(src, ratio=0.5)  # Dirac extension keeps the function
    assert rel_err(wider(x), src(x)) < 1e-6


# --- PAT_ch (eq. 2-4) --------------------------------------------------------------------


def test_gaussian_channel_attention_matches_equations():
    attn = _trained_bn(GaussianChannelAttention(12), torch.randn(4, 12, 7, 7))
    x = torch.randn(3, 12, 7, 7)
    hw = 49
    mu = x.sum(dim=(2, 3)) / hw  # eq. 2
    std = torch.sqrt(((x - mu[:, :, None, None]) ** 2).sum(dim=(2, 3)) / hw + attn.eps)  # eq. 3
    z = torch.cat((mu, std), dim=1)
    pre = z @ attn.fc.weight.T + attn.fc.bias
    g = torch.sigmoid(pre)
    bn = attn.norm
    s = (g - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias  # eq. 4
    assert rel_err(attn(x), x * s[:, :, None, None]) < 1e-5


def test_patconv_is_conv_concat_attention():
    conv = nn.Conv2d(32, 32, 3, 1, 1, bias=False)
    op = _trained_bn(PATConv.from_module(conv, 0.25, attn="ch"), torch.randn(4, 32, 8, 8))
    x = torch.randn(2, 32, 8, 8)
    y = op(x)
    assert rel_err(y[:, :8], F.conv2d(x[:, :8], conv.weight[:8, :8], padding=1)) < 1e-6  # eq. 1
    assert rel_err(y[:, 8:], op.attn(x[:, 8:])) < 1e-6


def test_patconv_from_pconv_starts_as_identity_on_attention_channels():
    src = PConv(40, 0.25)
    op = PATConv.from_module(src, ratio=None, attn="ch")
    x = torch.randn(4, 40, 6, 6)
    for mode in (op.train, op.eval):
        mode()
        assert rel_err(op(x), src(x)) < 1e-6


# --- PAT_sf (eq. 6) ----------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (12, 12)])
def test_partial_self_attention_matches_eq6(hw):
    h, w = hw
    attn = PartialSelfAttention(24, num_heads=4, num_buckets=8).eval()
    with torch.no_grad():
        attn.rel_bias.normal_()
    x = torch.randn(2, 24, h, w)
    tokens = F.layer_norm(x.flatten(2).transpose(1, 2), (24,), attn.norm.weight, attn.norm.bias)
    q, k, v = (tokens @ attn.qkv.weight.T).chunk(3, dim=-1)
    split = lambda t: t.reshape(2, h * w, 4, 6).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack((ys.flatten(), xs.flatten()), 1).float()
    dist = torch.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)).round().long().clamp(max=7)
    r = attn.rel_bias[:, dist]  # (heads, N, N)
    s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(6) + r, dim=-1)  # eq. 6
    ref = (s @ v).transpose(1, 2).reshape(2, h * w, 24).transpose(1, 2).reshape(2, 24, h, w)
    assert rel_err(attn(x), ref) < 1e-5


# --- PAT_sp (eq. 5) and its merge ----------------------------------------------------------


def test_pat_sp_matches_eq5_and_merges_into_one_conv():
    mlp2 = nn.Conv2d(64, 32, 1, bias=True)
    sp = PartialSpatialAttention(mlp2, ratio=0.5)
    h = torch.randn(4, 64, 9, 9)
    _trained_bn(sp, h)
    with torch.no_grad():
        sp.gate_norm.weight.fill_(1.3)
        sp.gate_norm.bias.fill_(0.2)
    y = mlp2(h)
    bn = sp.gate_norm
    pre = F.conv2d(y[:, 16:], sp.gate.weight, sp.gate.bias)
    s = (F.hardsigmoid(pre) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    ref = torch.cat((y[:, :16], y[:, 16:] * s), dim=1)  # eq. 5
    assert rel_err(sp(h), ref) < 1e-6
    merged = sp.deploy()
    assert isinstance(merged, MergedSpatialAttention)
    assert rel_err(merged(h), sp(h)) < 1e-5
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].out_channels == 33  # no extra 1x1 conv, one extra row


def test_pat_sp_identity_init_preserves_the_mlp():
    mlp2 = nn.Conv2d(16, 8, 1)
    sp = PartialSpatialAttention.from_module(mlp2, ratio=0.5)
    h = torch.randn(3, 16, 5, 5)
    for mode in (sp.train, sp.eval):
        mode()
        assert rel_err(sp(h), mlp2(h)) < 1e-6


# --- DPConv ------------------------------------------------------------------------------


def test_dpconv_ratio_formula_and_mask_prefix():
    op = DPConv(64)
    for zeros in range(0, 7):
        with torch.no_grad():
            op.gates.fill_(0.7)
            if zeros:
                op.gates[6 - zeros :] = -0.7
        g = (op.gates > 0).float()
        assert op.ratio == pytest.approx(2 ** float((1 - g).sum()) / 64)  # r_p = 2^{sum(1-g)}/C
        m = op.mask()
        n = op.num_conv_channels
        assert int(m.sum()) == n and bool(m[:n].all())


def test_dpconv_non_power_of_two_channels():
    op = DPConv(48, init_ratio=0.25)  # K = ceil(log2 48) = 6
    assert op.num_gates == 6
    assert op.num_conv_channels == 16  # nearest power of two to 12 on the log scale
    with torch.no_grad():
        op.gates.fill_(-0.5)  # all zeros -> 2^6 = 64 > 48: capped at C
    assert op.num_conv_channels == 48 and op.ratio == 1.0
    assert int(op.mask().sum()) == 48
    x = torch.randn(2, 48, 6, 6)
    assert rel_err(op.deploy()(x), op.eval()(x)) < 1e-6


def test_dpconv_straight_through_gradient():
    g = torch.tensor([-1.5, -0.3, 0.0, 0.4, 2.0], requires_grad=True)
    b = binarize_ste(g)
    assert torch.equal(b.detach(), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    b.sum().backward()
    assert torch.equal(g.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # identity inside [-1, 1]


def test_dpconv_complexity_penalty_and_monotonic_enforcement():
    op = DPConv(32)
    with torch.no_grad():
        op.gates.copy_(torch.tensor([0.5, -0.2, 0.3, -0.4, 0.1]))
    assert float(op.penalty().detach()) == pytest.approx(0.5 + 0.5)  # increases 0.3-(-0.2), 0.1-(-0.4)
    assert float(op.complexity()) == pytest.approx(2.0 ** (2 * 2))  # two zero gates -> n=4
    op.complexity().backward()
    assert op.gates.grad.abs().sum() > 0  # reaches the gates through the STE
    op.enforce_monotonic_()
    assert float(op.penalty()) == 0.0 and op.is_prefix()
    before = op.gates.detach().clone()
    op.anneal_(1, 4)  # temperature sqrt(1/4): tempered gates = g~ * 2, the learned gates untouched
    assert torch.equal(op.gates.detach(), before) and torch.allclose(op.tempered_gates().detach(), before * 2)


@pytest.mark.parametrize("attn", ["identity", "ch"])
def test_dpconv_deploy_equals_training_form(attn):
    conv = nn.Conv2d(32, 32, 3, 1, 1)
    op = DPConv.from_module(conv, 0.25, attn=attn)
    _trained_bn(op, torch.randn(4, 32, 8, 8))
    x = torch.randn(3, 32, 8, 8)
    dep = op.deploy()
    assert rel_err(dep(x), op(x)) < 1e-5
    assert op.num_conv_channels == 8  # ratio 1/4 of 32
    y = op(x)
    ref = F.conv2d(x[:, :8], op.conv.weight[:8, :8], op.conv.bias[:8], padding=1)
    assert rel_err(y[:, :8], ref) < 1e-6  # conv part: the top-left block on the first 8 channels


def test_dpconv_refuses_to_deploy_non_monotone_gates():
    op = DPConv(16)
    with torch.no_grad():
        op.gates.copy_(torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    with pytest.raises(OperatorError, match="monotone"):
        op.deploy()


# --- Ada-PConv ---------------------------------------------------------------------------


def test_ada_hard_equals_soft_when_router_is_one_hot():
    conv = nn.Conv2d(32, 32, 3, 1, 1)
    op = AdaPConv.from_module(conv)
    x = torch.randn(6, 32, 8, 8)
    with torch.no_grad():  # make the router decisive and input-dependent
        op.router.weight.normal_(std=200.0)
    probs = op.route(x)
    assert torch.allclose(probs.max(dim=1).values, torch.ones(6), atol=1e-6)
    soft = op(x)
    op.routing = "hard"
    hard = op(x)
    assert rel_err(hard, soft) < 1e-5
    hist = op.last_histogram
    assert int(hist.sum()) == 6 and (hist > 0).sum() >= 2  # several branches actually used


def test_ada_hard_runs_only_the_chosen_branch():
    op = AdaPConv(16, routing="hard")
    calls = []
    for i, conv in enumerate(op.branches):
        conv.register_forward_hook(lambda m, a, o, i=i: calls.append((i, a[0].shape[0])))
    with torch.no_grad():
        op.router.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))
    y = op(torch.randn(5, 16, 6, 6))
    assert calls == [(2, 5)] and y.shape == (5, 16, 6, 6)
    assert op.last_histogram.tolist() == [0, 0, 5]


def test_ada_soft_is_weighted_mixture_of_branches():
    op = AdaPConv(16)
    with torch.no_grad():
        op.router.weight.normal_()
    x = torch.randn(3, 16, 5, 5)
    a = op.route(x)
    branches = [torch.cat((c(x[:, :n]), x[:, n:]), 1) for c, n in zip(op.branches, op.widths)]
    ref = sum(a[:, i, None, None, None] * b for i, b in enumerate(branches))
    assert rel_err(op(x), ref) < 1e-5


# --- all operators: gradients, deploy, dtypes, fx ------------------------------------------


def _all_ops():
    conv = nn.Conv2d(32, 32, 3, 1, 1)
    return {
        "pconv": (PConv.from_module(conv, 0.25), 32),
        "patconv_ch": (PATConv.from_module(conv, 0.25, attn="ch"), 32),
        "patconv_sf": (PATConv.from_module(conv, 0.25, attn="sf"), 32),
        "pat_sp": (PartialSpatialAttention(nn.Conv2d(64, 32, 1), 0.5), 64),
        "dpconv": (DPConv.from_module(conv, 0.25), 32),
        "dpconv_ch": (DPConv.from_module(conv, 0.25, attn="ch"), 32),
        "ada_pconv": (AdaPConv.from_module(conv), 32),
    }


@pytest.mark.parametrize("name", list(_all_ops()))
def test_gradients_reach_every_parameter(name):
    op, cin = _all_ops()[name]
    op.train()
    with torch.no_grad():  # move BN/attention away from their exact-identity starting points
        for n, p in op.named_parameters():
            if n.endswith(("norm.weight", "router.weight")):
                p.normal_()
    y = op(torch.randn(4, cin, 8, 8))
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in op.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", list(_all_ops()))
def test_deploy_equals_eval_mode_training_form(name):
    op, cin = _all_ops()[name]
    _trained_bn(op, torch.randn(4, cin, 8, 8))
    if isinstance(op, AdaPConv):
        with torch.no_grad():
            op.router.weight.normal_(std=200.0)  # decisive router: soft == hard
    x = torch.randn(3, cin, 8, 8)
    dep = op.deploy()
    assert not dep.training
    assert rel_err(dep(x), op(x)) < 1e-5


@pytest.mark.parametrize("name", list(_all_ops()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_and_channels_last(name, dtype, channels_last):
    op, cin = _all_ops()[name]
    _trained_bn(op, torch.randn(4, cin, 8, 8))
    if isinstance(op, AdaPConv):
        with torch.no_grad():
            op.router.weight.normal_(std=200.0)  # decisive router: soft == hard
    x = torch.randn(2, cin, 8, 8)
    ref = op(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    op = op.to(dtype=dtype, memory_format=fmt)
    xx = x.to(dtype=dtype, memory_format=fmt)
    for m in (op, op.deploy()):
        y = m(xx)
        assert y.dtype == dtype and y.shape == ref.shape
        assert rel_err(y, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("name", list(_all_ops()))
def test_every_operator_and_deploy_form_stays_one_node_for_the_engine_tracer(name):
    """Operators are leaves for partialize's tracer (their insides may be data-dependent, e.g. Ada
    hard routing), so a model containing one traces with the op as a single call_module node."""
    from partialize.engine.tracer import LeafTracer

    op, cin = _all_ops()[name]
    _trained_bn(op, torch.randn(4, cin, 8, 8))
    for m in (op, op.deploy()):

        class Parent(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.op = inner

            def forward(self, x):
                return self.op(x) + 1

        parent = Parent(m).eval()
        gm = fx.GraphModule(parent, LeafTracer().trace(parent))
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["op"]
        x = torch.randn(2, cin, 8, 8)
        assert rel_err(gm(x), parent(x)) < 1e-6


# --- registry ------------------------------------------------------------------------------


def test_registry_names_and_user_registration():
    assert {"pconv", "patconv", "pat_sp", "dpconv", "ada_pconv"} <= set(list_operators())
    assert get_operator("patconv") is PATConv

    try:

        @register_operator("test_halfconv")
        class HalfConv(PConv):
            @classmethod
            def from_module(cls, original, **kw):
                return super().from_module(original, ratio=0.5)

        assert get_operator("test_halfconv") is HalfConv
        assert HalfConv.from_module(nn.Conv2d(8, 8, 3, 1, 1)).dim_conv == 4
        with pytest.raises(ValueError, match="already registered"):
            register_operator("pconv")(HalfConv)
        with pytest.raises(TypeError, match="must subclass partialize.ops.PartialOperator"):
            register_operator("test_not_an_operator")(nn.Conv2d)  # duck typing is not the contract

        class NoFromModule(PartialOperator):
            pass

        with pytest.raises(TypeError, match="must implement from_module"):
            register_operator("test_no_from_module")(NoFromModule)
    finally:
        unregister_operator("test_halfconv")
    assert not {"test_halfconv", "test_not_an_operator", "test_no_from_module"} & set(list_operators())
    from partialize.errors import RecipeError

    with pytest.raises(RecipeError, match="known variants"):
        get_operator("no_such_op")


# --- BN folded into deployed operators -----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PConv(32, 0.25),
        lambda: PConv.from_module(nn.Conv2d(32, 32, 3, 2, 1), 0.25, stride_mode="pool"),
        lambda: PATConv(32, 0.25, "ch"),
        lambda: PATConv(32, 0.25, "sf"),
    ],
)
def test_fold_bn_into_deployed_operator(make):
    op = make()
    bn = nn.BatchNorm2d(32)
    seq = _trained_bn(nn.Sequential(op, bn), torch.randn(4, 32, 8, 8))
    with torch.no_grad():
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    fused = op.eval().deploy().fold_bn(bn)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # even sizes (a strided PConv's pool + BN run as one depthwise conv), odd sizes (pool with
    # partial windows), and channels_last
    for size, fmt in ((8, torch.contiguous_format), (7, torch.contiguous_format), (8, torch.channels_last)):
        x = torch.randn(3, 32, size, size).contiguous(memory_format=fmt)
        assert rel_err(fused(x), seq(x)) < 1e-5


def test_partial_mlp_deploy_folds_its_batchnorms():
    timm = pytest.importorskip("timm")
    block = timm.create_model("mobilenetv2_100", pretrained=False).blocks[1][1]
    op = _trained_bn(PartialMLP.from_module(block, 0.5), torch.randn(4, 24, 8, 8))
    x = torch.randn(2, 24, 8, 8)
    dep = op.deploy()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dep.modules())
    assert rel_err(dep(x), op(x)) < 1e-5
    assert torch.equal(op(x)[:, 12:], x[:, 12:])  # the other half passes the block unchanged


def test_dpconv_complexity_keeps_gradient_at_full_width():
    op = DPConv(16)
    with torch.no_grad():
        op.gates.fill_(-0.5)  # all gates off: n = 16 = C, zeta at its cap C^2
    z = op.complexity()
    assert float(z.detach()) == 256.0
    z.backward()
    assert (op.gates.grad < 0).all()  # raising a gate lowers the width: the gradient still says so


def test_ada_ste_routing_forward_is_hard_and_gradient_reaches_router():
    op = AdaPConv.from_module(nn.Conv2d(32, 32, 3, 1, 1))
    with torch.no_grad():
        op.router.weight.normal_(std=0.5)
    x = torch.randn(6, 32, 8, 8)
    op.routing = "hard"
    hard = op(x)
    op.routing = "ste"
    y = op(x)
    assert rel_err(y, hard) < 1e-5  # the value is the hard routing's
    (y * torch.randn_like(y)).sum().backward()
    assert op.router.weight.grad is not None and op.router.weight.grad.abs().sum() > 0


# --- what the operators refuse -------------------------------------------------------------


def test_conv2d_subclasses_are_refused():
    timm = pytest.importorskip("timm")
    std = timm.layers.StdConv2d(16, 16, 3, padding=1)
    with pytest.raises(OperatorError, match="plain nn.Conv2d only"):
        PConv.from_module(std, 0.25)


def test_no_op_conversion_is_refused():
    with pytest.raises(OperatorError, match="keeps all 16 channels"):
        PConv.from_module(nn.Conv2d(16, 16, 3, 1, 1), 1.0)
    with pytest.raises(OperatorError, match="keeps all"):
        PConv.from_module(nn.Conv2d(1, 1, 3, 1, 1), 0.25)  # one channel: nothing to split


def test_partial_sources_keep_their_constraints():
    dw = PConv.from_module(nn.Conv2d(32, 32, 3, 1, 1, groups=32), 0.25)
    with pytest.raises(OperatorError, match="depthwise PConv"):
        DPConv.from_module(dw)
    with pytest.raises(OperatorError, match="depthwise PConv"):
        AdaPConv.from_module(dw)
    pooled = PConv.from_module(nn.Conv2d(32, 32, 3, 2, 1), 0.25, stride_mode="pool")
    with pytest.raises(OperatorError, match="strided PConv"):
        PATConv.from_module(pooled, 0.25)


def test_dpconv_channelwise_attention_deploys():
    op = DPConv.from_module(nn.Conv2d(32, 32, 3, 1, 1), 0.25, attn="ch", mapping="channelwise")
    _trained_bn(op, torch.randn(4, 32, 8, 8))
    x = torch.randn(2, 32, 8, 8)
    assert rel_err(op.deploy()(x), op(x)) < 1e-5


def test_ada_numeric_ratio_centres_the_branches():
    op = AdaPConv.from_module(nn.Conv2d(32, 32, 3, 1, 1), ratio=0.25)
    assert op.widths == [4, 8, 16]
    with pytest.raises(OperatorError, match="number or 'adaptive'"):
        AdaPConv.from_module(nn.Conv2d(32, 32, 3, 1, 1), ratio="dynamic")


@pytest.mark.parametrize("which", ["timm_mlp", "timm_convmlp", "timm_ir", "tv_ir", "tv_mlpblock"])
def test_partial_mlp_at_ratio_one_is_the_original_block(which):
    timm = pytest.importorskip("timm")
    import torchvision

    if which == "timm_mlp":
        block, x = timm.layers.Mlp(16, 48, norm_layer=nn.LayerNorm), torch.randn(2, 5, 16)
    elif which == "timm_convmlp":
        block, x = timm.layers.ConvMlp(16, 48, norm_layer=nn.BatchNorm2d), torch.randn(2, 16, 6, 6)
    elif which == "timm_ir":
        block, x = timm.create_model("mobilenetv2_100", pretrained=False).blocks[1][1], torch.randn(2, 24, 6, 6)
    elif which == "tv_ir":
        block, x = torchvision.models.mobilenet_v2().features[3], torch.randn(2, 24, 6, 6)
    else:
        block = torchvision.models.vision_transformer.MLPBlock(16, 48, 0.0)
        x = torch.randn(2, 5, 16)
    block = _trained_bn(block, x)
    op = PartialMLP.from_module(block, ratio=1.0).eval()
    assert rel_err(op(x), block(x)) < 1e-6  # the layers run in the block's own order


def test_partial_mlp_refuses_blocks_with_unknown_weighted_layers():
    class Odd(nn.Sequential):
        pass

    timm = pytest.importorskip("timm")
    mlp = timm.layers.Mlp(16, 32)
    mlp.extra = nn.Linear(16, 16)  # a weighted child the slicer does not know
    with pytest.raises(OperatorError, match="does not know how to slice"):
        PartialMLP.from_module(mlp, 0.5)


def test_partial_attention_refuses_masks():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    op = PartialAttention.from_module(mha, 0.25)
    t = torch.randn(2, 5, 32)
    assert op(t, t, t, need_weights=False)[0].shape == t.shape
    with pytest.raises(OperatorError, match="masks"):
        op(t, t, t, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_regnet_grouped_convs_convert_and_deploy_equal():
    """torchvision RegNet: every stride-1 grouped 3x3 conv becomes a PConv on whole groups; the model
    (non-degenerate init) deploys to the same function, BNs folded into the grouped conv part."""
    import torchvision
    from _helpers import nondegenerate_

    import partialize

    torch.manual_seed(0)
    model = nondegenerate_(torchvision.models.regnet_x_400mf().eval())
    rule = {"select": {"type": "Conv2d", "kernel": 3, "groups": "grouped"}, "variant": "pconv"}
    converted = partialize.apply(model, {"version": 1, "rules": [rule]}, input_size=64)
    plan = converted._partialize_plan
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    stride1 = [m for m in grouped if m.stride == (1, 1)]
    assert len(plan.converted) == len(stride1) > 10
    assert all(op.group_width for op in converted.modules() if isinstance(op, PConv))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(partialize.deploy(converted)(x), converted.eval()(x)) <= 1e-5


def test_partial_mlp_keeps_scalar_activations_whole_and_refuses_ones_that_mix_units():
    """MetaFormer's StarReLU (s * relu(x)^2 + b, two scalars) acts alike on every hidden unit, so the
    sliced MLP keeps it; a softmax over the hidden units mixes them, so no slice reproduces it."""
    import timm
    from _helpers import nondegenerate_

    from partialize.ops import get_operator

    mlp_op = get_operator("partial_mlp")
    torch.manual_seed(0)
    mlp = nondegenerate_(timm.create_model("caformer_s18").eval()).stages[0].blocks[0].mlp
    assert type(mlp.act).__name__ == "StarReLU" and mlp.act.scale.item() != 1.0
    x = torch.randn(2, 64, 8, 8)
    op = mlp_op.from_module(mlp, ratio=0.5).eval()
    h = mlp.fc1.out_channels // 2
    with torch.no_grad():  # oracle: the first 32 channels through the first h hidden units, by hand
        a = F.conv2d(x[:, :32], mlp.fc1.weight[:h, :32])
        a = mlp.act.scale * F.relu(a) ** 2 + mlp.act.bias
        y = F.conv2d(a, mlp.fc2.weight[:32, :h])
        want = torch.cat((y, torch.zeros_like(x[:, 32:])), dim=1)
        assert rel_err(op(x), want) <= 1e-5
    with pytest.raises(OperatorError):
        mlp_op.from_module(nn.Sequential(nn.Linear(8, 16), nn.Softmax(dim=-1), nn.Linear(16, 8)))


def test_pat_sf_cached_position_bias_follows_the_table():
    """Without gradients PAT_sf serves its gathered bias from a cache; a table changed in place (as
    load_state_dict does) must not be served stale, with or without inference mode."""
    import copy

    torch.manual_seed(0)
    op = PATConv(32, 0.25, "sf").eval()
    with torch.no_grad():
        op.attn.rel_bias.normal_()
    dep = op.deploy()
    x = torch.randn(1, 32, 7, 7)
    with torch.inference_mode():
        first = dep(x)
    state = {k: v.clone() for k, v in dep.state_dict().items()}
    key = next(k for k in state if k.endswith("rel_bias"))
    state[key] = state[key] + torch.randn_like(state[key])
    dep.load_state_dict(state)
    with torch.no_grad():
        second = dep(x)
    fresh = copy.deepcopy(dep)
    fresh.attn._bias_cache = None
    with torch.no_grad():
        assert rel_err(second, fresh(x)) <= 1e-6  # the new table
        assert rel_err(second, first) > 1e-3  # ...which differs from the old one
    y = dep(x.requires_grad_())  # a gradient through the cached bias works outside inference mode
    y.sum().backward()
    assert x.grad is not None


def test_pconv_from_module_draws_nothing_from_the_rng_and_keeps_the_source_weights():
    """PConv.from_module overwrites every weight it builds, so it must not spend time drawing a random
    init: the global RNG state is untouched, and the conv equals the source's top-left block."""
    src = torch.nn.Conv2d(64, 64, 3, padding=1, bias=True)
    state = torch.random.get_rng_state()
    op = PConv.from_module(src, ratio=0.25)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(op.conv.weight, src.weight[:16, :16]) and torch.equal(op.conv.bias, src.bias[:16])
    direct = PConv(64, ratio=0.25)  # built directly, it still gets a random init
    assert direct.conv.weight.abs().sum() > 0 and not torch.equal(torch.random.get_rng_state(), state)
