"""The plan never gives up on the whole model because of one layer, never swaps a layer whose
tensors other code reads, and never touches the caller's random state."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import partialize

ATTN_AND_MLP = {
    "version": 1,
    "strict": False,
    "rules": [
        {
            "select": {"type": ["Attention", "MultiScaleAttention", "WindowAttentionGlobal"]},
            "variant": "partial_attention",
        },
        {"select": {"type": "Mlp"}, "variant": "partial_mlp"},
    ],
}


def test_gcvit_and_mvitv2_layers_that_fail_become_skips_with_reasons():
    """mvitv2's attention needs a feat_size argument and pools per head: each layer is a skip with its
    reason, not an aborted plan. gcvit's (a 2C-wide k/v beside a given global query, which used to
    raise an IndexError while slicing) now converts, local and global layers alike."""
    for name, size in (("gcvit_xxtiny", 224), ("mvitv2_tiny", 224)):
        plan = partialize.plan(timm.create_model(name), ATTN_AND_MLP, input_size=size)
        attn = [e for e in plan.entries if "Attention" in e.original]
        if name.startswith("mvitv2"):
            assert attn and all(e.status == "skip" and e.reason for e in attn)
        else:
            assert attn and all(e.status == "convert" for e in attn)
        assert any(e.status == "convert" and e.variant == "partial_mlp" for e in plan.entries)
        converted = partialize.apply(timm.create_model(name), ATTN_AND_MLP, input_size=size)
        assert converted(torch.randn(1, 3, size, size)).shape == (1, 1000)


class UsesWeightElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.other = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)  # the weight, read directly
        return self.other(y)


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_a_layer_whose_weight_is_read_elsewhere_is_skipped_and_apply_works():
    m = UsesWeightElsewhere().eval()
    x = torch.randn(1, 16, 8, 8)
    plan = partialize.plan(m, example_input=x)
    by = {e.layer: e for e in plan.entries}
    assert by["conv"].status == "skip" and "used outside it" in by["conv"].reason
    assert by["other"].status == "convert"
    out = partialize.apply(m, example_input=x)(x)  # 'PConv' has no attribute 'weight' before
    assert out.shape == (1, 16, 8, 8)


def test_tied_weights_are_skipped():
    plan = partialize.plan(TiedWeights(), example_input=torch.randn(1, 16, 8, 8))
    assert {e.layer: e.status for e in plan.entries} == {"a": "skip", "b": "skip"}
    assert all("tied" in e.reason or "used outside it" in e.reason for e in plan.entries)


def test_plan_leaves_the_global_rng_alone_and_is_reproducible():
    model = timm.create_model("resnet18")
    recipe = {"version": 1, "rules": [{"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "variant": "patconv"}]}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = partialize.apply(model, recipe, input_size=32)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # another caller state: the converted weights do not depend on it
    b = partialize.apply(model, recipe, input_size=32)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
