"""partial_attention on window and relative-position attention (ops/sliced_attention.py): timm Swin and
Swin V2, torchvision's ShiftedWindowAttention (V1 and V2), BEiT (its own table and the shared one).

The oracle for a partial setting is the original layer itself with the parts a partial layer drops
zeroed: the input columns of the cheap channels in qkv, the proj columns of the dropped heads, the proj
rows (and bias) of the cheap channels; the cheap channels then carry the input (identity). This shares
no code with the operator, so a bias table sliced to the wrong heads, a logit scale or q/v bias left
whole, or a window mask applied to the wrong heads all show.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import function_macs, nondegenerate_, record_copies, rel_err, tiny_timm, tiny_tv_maxvit, tiny_tv_swin
from torch import nn

import partialize
from partialize.engine._calls import capture_calls
from partialize.errors import OperatorError
from partialize.ops import get_operator
from partialize.ops.sliced_attention import LAYOUTS

PA = get_operator("partial_attention")

MODELS = {
    "timm_swin": (lambda: tiny_timm("swin"), 56),
    "timm_swinv2": (lambda: tiny_timm("swinv2"), 64),
    "tv_swin": (lambda: tiny_tv_swin(), 32),
    "tv_swin_v2": (lambda: tiny_tv_swin(v2=True), 32),
    "beit": (lambda: tiny_timm("beit"), 32),
    "beit_shared": (lambda: tiny_timm("beit_shared"), 32),
    "davit": (lambda: tiny_timm("davit"), 64),  # window and channel attention
    "xcit": (lambda: tiny_timm("xcit"), 32),
    "edgenext": (lambda: tiny_timm("edgenext"), 64),
    "sam": (lambda: tiny_timm("sam"), 64),  # windowed and global blocks, decomposed relative position
    "twins": (lambda: tiny_timm("twins"), 64),
    "volo": (lambda: tiny_timm("volo"), 64),
    "eva": (lambda: tiny_timm("eva"), 28),
    "eva_unfused": (lambda: tiny_timm("eva_unfused"), 28),
    "vit_rope": (lambda: tiny_timm("vit_rope"), 32),
    "vit_rope_mixed": (lambda: tiny_timm("vit_rope_mixed"), 32),
    "tnt": (lambda: tiny_timm("tnt"), 32),
    "convit": (lambda: tiny_timm("convit"), 32),
    "swinv2_cr": (lambda: tiny_timm("swinv2_cr"), 64),
    "vit_relpos": (lambda: tiny_timm("vit_relpos"), 32),
    "vit_srelpos": (lambda: tiny_timm("vit_srelpos"), 32),
    "maxvit_rw": (lambda: tiny_timm("maxvit_rw"), 64),
    "maxvit_tf": (lambda: tiny_timm("maxvit_tf"), 64),
    "tv_maxvit": (tiny_tv_maxvit, 64),
    "cait": (lambda: tiny_timm("cait"), 32),
    "pvt_v2": (lambda: tiny_timm("pvt_v2"), 64),
    "twins_gsa": (lambda: tiny_timm("twins_gsa"), 64),
    "nextvit": (lambda: tiny_timm("nextvit"), 64),
    "hiera": (lambda: tiny_timm("hiera"), 64),
    "hieradet": (lambda: tiny_timm("hieradet"), 64),
    "visformer": (lambda: tiny_timm("visformer"), 64),
    "efficientformer": (lambda: tiny_timm("efficientformer"), 224),
    "levit": (lambda: tiny_timm("levit"), 64),
    "levit_conv": (lambda: tiny_timm("levit_conv"), 64),
    "tiny_vit": (lambda: tiny_timm("tiny_vit"), 224),
    "gcvit": (lambda: tiny_timm("gcvit"), 64),
}


def _layers(model):
    """Every attention layer of a listed class that converts (all blocks: shifted and unshifted windows,
    all stages). Left out, as the operator refuses them (test_refused_layers_say_why): layers with a
    ``refuse`` entry of their layout (PVT's spatial reduction) and Hiera's width-changing first blocks."""
    return [n for n, m in model.named_modules() if _listed(m) and not _refused(m)]


def _listed(m) -> bool:
    return f"{type(m).__module__}.{type(m).__qualname__}" in LAYOUTS


def _refused(m) -> bool:
    layout = LAYOUTS[f"{type(m).__module__}.{type(m).__qualname__}"]
    return any(getattr(m, a, None) is not None for a, _ in layout.refuse) or getattr(m, "dim_out", None) not in (
        None,
        getattr(m, "dim", None),
    )


def test_every_listed_class_is_tested_here():
    found = set()
    for build, _ in MODELS.values():
        found |= {f"{type(m).__module__}.{type(m).__qualname__}" for m in build().modules()}
    assert set(LAYOUTS) <= found, f"classes in LAYOUTS without a model in this test: {set(LAYOUTS) - found}"


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    build, size = MODELS[request.param]
    torch.manual_seed(0)
    model = nondegenerate_(build().eval())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = _layers(model)
    assert names, "no attention layer found"
    return request.param, model, size, x, names, capture_calls(model, x, names)


def _layout(layer):
    return LAYOUTS[f"{type(layer).__module__}.{type(layer).__qualname__}"]


def _heads(layer) -> int:
    return getattr(layer, _layout(layer).heads)


def _proj(layer) -> nn.Module:
    return layer.get_submodule(_layout(layer).proj)


def _lin(p: nn.Module) -> nn.Module:
    """The Linear / conv of a projection (LeViT's LinearNorm / ConvNorm: ``linear``, then ``bn``)."""
    return p.linear if hasattr(p, "linear") and hasattr(p, "bn") else p


def _dims(layer) -> tuple[int, int]:
    """(model width D, attention width A): the proj's output and input."""
    proj = _lin(_proj(layer))
    if isinstance(proj, nn.Linear):
        return proj.out_features, proj.in_features
    return proj.out_channels, proj.in_channels


def masked_original(layer: nn.Module, kept: int) -> nn.Module:
    """The original layer with what a partial layer keeping the last ``kept`` heads drops zeroed."""
    m = copy.deepcopy(layer)
    proj, heads = _lin(_proj(m)), _heads(m)
    dim, width = _dims(m)
    drop = heads - kept
    lo = drop * dim // heads  # cheap channels: the first lo of the input and output
    inner_lo = drop * width // heads  # the dropped heads' share of the attention width
    with torch.no_grad():
        for attr, _ in _layout(layer).projections:  # q/k/v (and a gate) see the attention channels only
            if getattr(m, attr, None) is not None:
                _lin(getattr(m, attr)).weight[:, :lo] = 0
        proj.weight[:lo] = 0  # cheap channels get nothing from attention...
        if proj.bias is not None:
            proj.bias[:lo] = 0
        bn = getattr(_proj(m), "bn", None)
        if bn is not None:  # a BatchNorm after the proj maps 0 to its shift: nothing there either
            bn.weight[:lo] = 0
            bn.bias[:lo] = 0
        proj.weight[:, :inner_lo] = 0  # ...and the dropped heads reach no channel
        for attr in _layout(layer).head_mixers:  # talking heads: nothing from the dropped heads' logits
            getattr(m, attr).weight[:, :drop] = 0
    return m


def _double(obj):
    """Floating tensors in nested tuples / lists / dicts as float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_double(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _double(v) for k, v in obj.items()}
    return obj


def _oracle(layer, kept, args, kwargs):
    x = args[0]
    layout = _layout(layer)
    axis = 1 if layout.conv_attr and getattr(layer, layout.conv_attr) else layout.channel_axis
    lo = (_heads(layer) - kept) * _dims(layer)[0] // _heads(layer)
    out = masked_original(layer, kept)(*args, **kwargs)
    cheap = torch.cat((x.narrow(axis, 0, lo), torch.zeros_like(x.narrow(axis, lo, x.shape[axis] - lo))), dim=axis)
    return out + cheap


def test_faithful_with_every_head(case):
    _, model, _, _, names, calls = case
    modules = dict(model.named_modules())
    for name in names:
        op = PA.from_module(modules[name], heads="all").eval()
        for args, kwargs in calls[name]:
            with torch.no_grad():
                assert rel_err(op(*args, **kwargs), modules[name](*args, **kwargs)) <= 1e-5, name


def test_kept_heads_equal_the_masked_original(case):
    key, model, _, _, names, calls = case
    modules = dict(model.named_modules())
    checked = 0
    for name in names:
        layer = modules[name]
        for kept in sorted({1, _heads(layer) - 1} - {0}):
            op = PA.from_module(layer, heads=kept).eval()
            assert op.num_heads == kept and op.dim_cheap == _dims(layer)[0] * (_heads(layer) - kept) // _heads(layer)
            for args, kwargs in calls[name]:
                with torch.no_grad():
                    got, want = op(*args, **kwargs), _oracle(layer, kept, args, kwargs)
                    assert got.shape == want.shape
                    err = rel_err(got, want)
                    if err > 1e-5:  # float32 rounding over wide layers (NextViT's 768): the same check in float64
                        a64, k64 = _double((args, kwargs))
                        err = rel_err(
                            copy.deepcopy(op).double()(*a64, **k64),
                            _oracle(copy.deepcopy(layer).double(), kept, a64, k64),
                        )
                assert err <= 1e-5, f"{key} {name} keeping {kept} of {_heads(layer)} heads"
                checked += 1
    assert checked >= 2


def test_macs_equal_an_independent_count(case):
    """macs() of each partial layer against the function-level count of tests/_helpers.py, and fewer
    than the original layer's."""
    _, model, _, _, names, calls = case
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        op = PA.from_module(layer, heads=max(1, _heads(layer) - 1)).eval()
        args, kwargs = calls[name][0]
        macs, _ = op.macs(*args, **kwargs)
        assert macs == function_macs(op.deploy(), args, kwargs), name
        if _heads(layer) > 1:
            assert macs < function_macs(layer, args, kwargs), name


def test_dropped_heads_matter(case):
    """The oracle is not vacuous: keeping every head differs from keeping one (the dropped heads and
    the position bias change the output)."""
    _, model, _, _, names, calls = case
    modules = dict(model.named_modules())
    name = next(n for n in names if _heads(modules[n]) > 1)
    layer = modules[name]
    args, kwargs = calls[name][0]
    with torch.no_grad():
        assert rel_err(_oracle(layer, 1, args, kwargs), layer(*args, **kwargs)) > 1e-2


def test_converted_model_runs_deploys_and_saves(case, tmp_path):
    key, model, size, x, names, _ = case
    recipe = {
        "version": 1,
        "rules": [{"select": {"name": n}, "variant": "partial_attention", "ratio": 0.5} for n in names],
    }
    converted = partialize.apply(model, recipe, input_size=size)
    plan = converted._partialize_plan
    assert len(plan.converted) == len(names), [(e.layer, e.reason) for e in plan.skipped]
    assert plan.macs_after < plan.macs_before
    nondegenerate_(converted, seed=2)
    with torch.no_grad():
        assert rel_err(partialize.deploy(converted)(x), converted.eval()(x)) <= 1e-4  # whole model: BNs folded too
    path = partialize.save(converted, tmp_path / "m.safetensors")
    loaded = partialize.load(path, model=model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), converted(x))


def test_beit_shared_bias_is_cut_to_the_kept_heads():
    """BEiT's model-level shared table arrives as a call argument (heads on axis -3): the operator
    narrows it to the kept heads, which the masked-original oracle confirms above; a layer called
    without it (no shared table) still runs."""
    torch.manual_seed(0)
    model = nondegenerate_(tiny_timm("beit_shared").eval())
    layer = model.blocks[0].attn
    tokens = torch.randn(2, 17, 64)
    bias = torch.randn(4, 17, 17)
    op = PA.from_module(layer, heads=2).eval()
    with torch.no_grad():
        got = op(tokens, shared_rel_pos_bias=bias)
        want = _oracle(layer, 2, (tokens,), {"shared_rel_pos_bias": bias})
        assert rel_err(got, want) <= 1e-5
        other = bias.clone()
        other[:2] += 5.0  # the dropped heads' bias: no effect
        assert rel_err(op(tokens, shared_rel_pos_bias=other), got) <= 1e-6
        assert op(tokens).shape == tokens.shape


def test_a_parameter_the_layout_does_not_place_is_refused():
    layer = copy.deepcopy(tiny_tv_swin().features[1][0].attn)
    layer.head_temperature = nn.Parameter(torch.ones(_heads(layer)))  # what a new release might add
    with pytest.raises(OperatorError, match="head_temperature"):
        PA.from_module(layer)


def test_window_attention_refuses_the_dwconv_mixer():
    with pytest.raises(OperatorError, match="mixer 'identity' only"):
        PA.from_module(tiny_tv_swin().features[1][0].attn, mixer="dwconv")


def test_onnx_export_equals_eager(case):
    """The TorchScript-based ONNX exporter on the deployed model, every listed layer converted; the
    file must compute what eager does, on the export batch and another."""
    import io
    import warnings

    import numpy as np
    import onnxruntime as ort

    key, model, size, x, names, _ = case
    recipe = {
        "version": 1,
        "rules": [{"select": {"name": n}, "variant": "partial_attention", "ratio": 0.5} for n in names],
    }
    net = partialize.deploy(partialize.apply(model, recipe, input_size=size))

    def export(m):
        f = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            axes = {"input": {0: "batch"}, "output": {0: "batch"}}
            torch.onnx.export(
                m, (x,), f, dynamo=False, input_names=["input"], output_names=["output"], dynamic_axes=axes
            )
        return f

    try:
        f = export(net)
    except Exception as e:  # VOLO's col2im, timm RoPE attention's traced is_causal: the original fails alike
        with pytest.raises(type(e)):
            export(model)
        return
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for inp in (x, torch.randn(3, *x.shape[1:]) * 2):
        with torch.no_grad():
            want = net(inp)
        got = torch.from_numpy(sess.run(None, {"input": inp.numpy().astype(np.float32)})[0])
        assert rel_err(got, want) <= 1e-4, key


def test_a_position_bias_module_of_another_class_is_refused():
    """KeptHeadsBias narrows the bias of the listed timm classes only (their forward is attn + bias)."""

    class OtherBias(nn.Module):
        def get_bias(self):
            return torch.zeros(1, 6, 5, 5)

    layer = copy.deepcopy(tiny_timm("vit_relpos").blocks[0].attn)
    layer.rel_pos = OtherBias()
    with pytest.raises(OperatorError, match="position bias"):
        PA.from_module(layer)


def test_refused_layers_say_why():
    """PVT / Twins layers with a spatial-reduction conv and Hiera's width-changing blocks are refused,
    each with its reason; the others of the same models convert (the case tests above)."""
    seen = 0
    for key, reason in (("pvt_v2", "spatial reduction"), ("twins_gsa", "spatial reduction"), ("hiera", "share")):
        model = MODELS[key][0]()
        for m in model.modules():
            if _listed(m) and _refused(m):
                with pytest.raises(OperatorError, match=reason):
                    PA.from_module(m)
                seen += 1
    assert seen >= 5


@pytest.mark.parametrize("key", ["efficientformer", "levit"])
def test_a_bias_cached_by_the_original_is_not_carried_over(key):
    """EfficientFormer and LeViT cache their gathered bias table in eval; a layer run before it is
    converted holds every head's bias there. The cut copy starts with an empty cache (its train()
    would clear it too, but a copy used as is must not hold the uncut table) and computes the bias of
    its kept heads."""
    torch.manual_seed(0)
    model = nondegenerate_(MODELS[key][0]().eval())
    name = _layers(model)[-1]
    layer = model.get_submodule(name)
    (args, kwargs), *_ = capture_calls(model, torch.randn(1, 3, MODELS[key][1], MODELS[key][1]), [name])[name]
    with torch.no_grad():
        layer(*args, **kwargs)  # fills the cache with all heads
    assert layer.attention_bias_cache
    kept = _heads(layer) - 1
    op = PA.from_module(layer, heads=kept)
    assert not op.attn.attention_bias_cache
    op.attn.training = op.training = False  # eval without train(False), which would empty the cache anyway
    with torch.no_grad():
        assert rel_err(op(*args, **kwargs), _oracle(layer, kept, args, kwargs)) <= 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_timm_attention_wider_than_the_model(gated):
    """timm Attention with heads x head_dim != the model width (CSATv2: 256 on 168) is cut as a copy:
    each head reads and writes its own dim / heads channels. Oracle: the original with the cheap
    channels' q/k/v (and gate) columns, the dropped heads' proj columns and the cheap proj rows zeroed."""
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    layer = nondegenerate_(Attention(48, num_heads=4, attn_head_dim=16, qkv_bias=True, gated=gated).eval())
    x = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(PA.from_module(layer, heads="all").eval()(x), layer(x)) <= 1e-6
        for kept in (1, 3):
            op = PA.from_module(layer, heads=kept).eval()
            lo, inner_lo = (4 - kept) * 12, (4 - kept) * 16
            m = copy.deepcopy(layer)
            m.qkv.weight[:, :lo] = 0
            if gated:
                m.gate.weight[:, :lo] = 0
            m.proj.weight[:lo] = 0
            m.proj.bias[:lo] = 0
            m.proj.weight[:, :inner_lo] = 0
            want = m(x) + torch.cat((x[..., :lo], torch.zeros_like(x[..., lo:])), -1)
            assert op.dim_cheap == lo and rel_err(op(x), want) <= 1e-5
            assert rel_err(want, layer(x)) > 1e-2
            macs, _ = op.macs(x)
            assert macs == function_macs(op.deploy(), (x,), {}) < function_macs(layer, (x,), {})
    with pytest.raises(OperatorError, match="mixer 'identity' only"):
        PA.from_module(layer, mixer="dwconv", grid=(2, 5))


def test_the_cut_projections_are_not_copied_whole_first(monkeypatch):
    """partial_attention copies the attention without the projections it replaces by their cuts (a
    wide ViT's qkv and proj were copied whole, then thrown away); the cut layer still equals the masked
    original (the oracle above)."""
    model = nondegenerate_(tiny_timm("beit").eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    name = _layers(model)[0]
    attn = model.get_submodule(name)
    (args, kwargs), *_ = capture_calls(model, x, [name])[name]
    copied = record_copies(monkeypatch, "partialize.ops.sliced_attention")
    op = PA.from_module(attn, heads=1).eval()
    assert copied and id(attn.qkv) not in copied and id(attn.proj) not in copied
    with torch.no_grad():
        assert rel_err(op(*args, **kwargs), _oracle(attn, 1, args, kwargs)) <= 1e-5
