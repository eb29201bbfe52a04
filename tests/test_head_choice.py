"""Which heads an attention keeps: ``partial_attention(kept_heads=...)`` and the choice calibration
makes from data (``PartialOperator.data_params``) for it and for ``single_head_attention``.

Oracles: the original layer with the dropped heads' proj columns, the cheap channels' q/k/v input
columns and proj rows zeroed (plus the identity on the cheap channels); and layers built so that
known heads add the most to the output (their value rows scaled up), for the choice.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from _helpers import nondegenerate_, rel_err

import partialize
from partialize.calibration import calibrate_model
from partialize.errors import OperatorError
from partialize.ops import get_operator

PA = get_operator("partial_attention")
SH = get_operator("single_head_attention")


def _vit(depth: int = 2):
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, num_heads=4, embed_dim=64, num_classes=10
    )
    return nondegenerate_(m.eval())


def _masked(layer, kept: list[int], dim_attn: int):
    m = copy.deepcopy(layer)
    d, dim = m.head_dim, m.qkv.in_features
    lo = dim - dim_attn
    with torch.no_grad():
        m.qkv.weight[:, :lo] = 0  # every head reads the attention channels only
        for h in set(range(m.num_heads)) - set(kept):
            m.proj.weight[:, h * d : (h + 1) * d] = 0
        m.proj.weight[:lo] = 0
        m.proj.bias[:lo] = 0
    return m


def _boost(layer, heads: list[int], factor: float = 5.0):
    """A copy whose ``heads`` add the most to the output (their value rows scaled up)."""
    m = copy.deepcopy(layer)
    d, dim = m.head_dim, m.qkv.in_features
    with torch.no_grad():
        for h in heads:
            m.qkv.weight[2 * dim + h * d : 2 * dim + (h + 1) * d] *= factor
            m.qkv.bias[2 * dim + h * d : 2 * dim + (h + 1) * d] *= factor
    return m


@pytest.mark.parametrize("kept", [[0, 2], [1], [0, 1, 3]])
def test_kept_heads_equal_the_masked_original(kept):
    layer = _vit().blocks[0].attn
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(1))
    op = PA.from_module(layer, kept_heads=kept).eval()
    assert op.num_heads == len(kept) and op.kept_heads == sorted(kept)
    lo = 64 - op.dim_attn
    with torch.no_grad():
        want = _masked(layer, kept, op.dim_attn)(x) + torch.cat((x[..., :lo], torch.zeros_like(x[..., lo:])), -1)
        assert rel_err(op(x), want) <= 1e-5
        last = PA.from_module(layer, heads=len(kept)).eval()  # the default keeps other heads: not the same
        if sorted(kept) != list(range(4 - len(kept), 4)):
            assert rel_err(last(x), op(x)) > 1e-3


def test_kept_heads_are_checked():
    layer = _vit().blocks[0].attn
    for bad in ([], [4], [1, 1], [-1], "0,1", [True]):
        with pytest.raises(OperatorError, match="kept_heads"):
            PA.from_module(layer, kept_heads=bad)
    with pytest.raises(OperatorError, match="disagree"):
        PA.from_module(layer, kept_heads=[0, 1], heads=3)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1), num_heads=(2, 4), embed_dim=32, img_size=56)
    with pytest.raises(OperatorError, match="kept_heads"):
        PA.from_module(swin.layers[0].blocks[0].attn, kept_heads=[1])


def test_data_params_keep_the_heads_that_add_most():
    layer = _boost(_vit().blocks[0].attn, [1, 3])
    calls = [((torch.randn(8, 17, 64, generator=torch.Generator().manual_seed(2)),), {})]
    assert PA.data_params(layer, calls, {"ratio": 0.5}) == {"kept_heads": [1, 3]}
    assert PA.data_params(layer, calls, {"heads": 1}) == {"kept_heads": [1]} or PA.data_params(
        layer, calls, {"heads": 1}
    ) == {"kept_heads": [3]}
    assert PA.data_params(layer, calls, {"kept_heads": [0, 2]}) == {}  # the recipe's choice stands
    assert PA.data_params(layer, calls, {"heads": "all"}) == {}
    one = _boost(_vit().blocks[0].attn, [2])
    scores = SH.data_params(one, calls, {})["head_scores"]
    assert max(range(4), key=scores.__getitem__) == 2
    assert SH.data_params(one, calls, {"head": 0}) == {}


def test_calibration_chooses_heads_records_them_and_reloads(tmp_path):
    model = _vit()
    model.blocks[1].attn = _boost(model.blocks[1].attn, [0, 1])
    recipe = {"version": 1, "rules": [{"select": {"type": "Attention"}, "variant": "partial_attention", "ratio": 0.5}]}
    converted = partialize.apply(model, recipe, input_size=32)
    x = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    res = calibrate_model(converted, model, x, images=80, steps=0, use=("heads",))
    plan = res.model._partialize_plan
    params = {e.layer: e.params for e in plan.converted}
    assert params["blocks.1.attn"]["kept_heads"] == [0, 1]  # the boosted heads, not the last two
    assert res.model.blocks[1].attn.kept_heads == [0, 1]
    assert "kept_heads" not in converted._partialize_plan.converted[0].params  # the input model is untouched
    default = calibrate_model(converted, model, x, images=80, steps=0)  # not a default step: the last heads
    assert default.model.blocks[1].attn.kept_heads is None
    path = partialize.save(res.model, tmp_path / "cal.safetensors")
    loaded = partialize.load(path, model=model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x[:4]), res.model.eval()(x[:4]))


def test_single_head_calibration_starts_from_the_head_that_adds_most():
    model = _vit(depth=1)
    model.blocks[0].attn = _boost(model.blocks[0].attn, [2])
    recipe = {"version": 1, "rules": [{"select": {"type": "Attention"}, "variant": "single_head_attention"}]}
    converted = partialize.apply(model, recipe, input_size=32)
    x = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    res = calibrate_model(converted, model, x, images=80, steps=0, use=("heads",))
    assert res.model.blocks[0].attn.head == 2
