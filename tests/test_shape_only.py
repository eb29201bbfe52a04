"""Planning on shapes only (engine/_shape_only.py), and apply reusing the planner's operators.

The planner runs its passes on a meta copy of the model. Oracle: the plan made for real on the same
model (every entry's decision, reason and MAC change identical), the original's output before and
after, the state a forward writes into the model (caches, buffers) left alone, and torch's own meta
kernels for the cache that answers repeated meta ops. Apply takes the operators the planner built
only while the model is unchanged; oracle: a model rebuilt from the plan's data alone."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _helpers import nondegenerate_, rel_err
from torch import nn

from partialize.engine._shape_only import FastMeta, restored
from partialize.engine.apply import apply_plan
from partialize.engine.discover import discover
from partialize.engine.plan import Plan
from partialize.engine.planner import make_plan

MODELS = {  # small instances; LeViT caches its attention biases in eval, ConViT rebuilds a buffer
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "levit": (lambda: timm.create_model("levit_128s"), 224),
    "convit": (lambda: timm.create_model("convit_tiny", img_size=64, depth=2), 64),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(2, 4)), 224),
    "tv_vit": (lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), 32),
    "resnet": (lambda: timm.create_model("resnet18", num_classes=10), 64),
}


def _entries(plan: Plan) -> list[tuple]:
    return [(e.layer, e.status, e.variant, e.params.get("ratio"), e.delta_macs, e.reason) for e in plan.entries]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_plan_on_shapes_is_the_plan_made_for_real(name):
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = nondegenerate_(build().eval())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    fake = make_plan(model, "auto", discovery=discover(model, x, shape_only=True), example_input=x)
    real = make_plan(model, "auto", discovery=discover(model, x, shape_only=False), example_input=x)
    assert fake.shape_only and not real.shape_only
    assert _entries(fake) == _entries(real) and fake.macs_before == real.macs_before
    assert fake.converted  # something to compare
    a, b = apply_plan(model, fake, example_input=x), apply_plan(model, real, example_input=x)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the original, caches included, as before
        assert rel_err(a.eval()(x), b.eval()(x)) == 0.0


def test_plan_records_shape_only_and_round_trips():
    build, size = MODELS["vit"]
    model = build().eval()
    plan = make_plan(model, "auto", discovery=discover(model, input_size=size, shape_only=True), input_size=size)
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.shape_only is True and again.to_dict() == plan.to_dict()


class _Stateful(nn.Module):
    """Writes into itself in forward: a cache dict, an attribute, a replaced buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("table", torch.zeros(1))
        self.cache: dict = {}

    def forward(self, x):
        self.cache[x.shape[-1]] = x.sum(0)
        self.last = x.shape
        self.table = torch.ones(x.shape[-1])
        return self.fc(x) + self.table


def test_state_a_forward_writes_is_put_back():
    m = _Stateful()
    table, cache = m.table, m.cache
    with restored(m):
        m(torch.randn(2, 8))
    assert m.table is table and m.cache is cache and m.cache == {} and not hasattr(m, "last")
    disc = discover(m, torch.randn(2, 8), shape_only=True)
    assert disc.shadow is not None
    assert m.table is table and m.cache == {} and not hasattr(m, "last")


class _NeedsValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        k = int(x.abs().max().item() > 0) + 1  # a value decides the shape
        return self.conv(x)[:, : 4 * k]


def test_a_model_that_needs_values_is_planned_for_real():
    m = _NeedsValues().eval()
    disc = discover(m, torch.randn(1, 3, 8, 8), shape_only=True)
    assert disc.shadow is None and disc.output_shape == (1, 8, 8, 8)


def _meta_calls():
    """(name, thunk) pairs of ops on meta tensors whose kernels are Python decompositions or C++."""
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    x, w, c = m(2, 16, 9, 9), m(32, 16, 3, 3), m(16)
    last = m(2, 16, 9, 9).to(memory_format=torch.channels_last)
    return [
        ("conv", lambda: F.conv2d(x, w, None, 2, 1)),
        ("batch_norm", lambda: F.batch_norm(x, c, c, c, c, False)),
        ("layer_norm", lambda: F.layer_norm(x, (9,))),
        ("gelu", lambda: F.gelu(x)),
        ("broadcast add", lambda: x + c.view(16, 1, 1)),
        ("channels_last relu", lambda: F.relu(last)),
        ("channels_last add", lambda: last + last),
        ("cat", lambda: torch.cat([x, x], 1)),
        ("softmax", lambda: x.softmax(-1)),
        ("matmul", lambda: x @ m(9, 5)),
        ("half mul", lambda: x.half() * 2),
        ("split", lambda: x.split(4, 1)),
    ]


def _metadata(out):
    if isinstance(out, (list, tuple)):
        return [_metadata(o) for o in out]
    return (tuple(out.shape), out.stride(), out.dtype, out.device.type)


def test_fast_meta_answers_what_the_meta_kernels_answer():
    FastMeta.cache.clear()
    for name, call in _meta_calls():
        want = _metadata(call())
        with FastMeta():
            first, second = _metadata(call()), _metadata(call())  # the second from the cache
        assert first == want and second == want, name
    assert len(FastMeta.cache) >= 8  # the calls were cached (split is a view: it is not)


def test_fast_meta_in_place_returns_its_argument_and_bad_shapes_still_raise():
    x = torch.empty(2, 3, device="meta")
    with FastMeta():
        for _ in range(2):  # the second time from the cache
            assert x.relu_() is x and x.add_(x) is x
            with pytest.raises(RuntimeError):
                x + torch.empty(4, device="meta")


def test_fast_meta_leaves_real_tensors_alone():
    a, b = torch.randn(3, 4), torch.randn(4)
    with FastMeta():
        got = (a + b).relu()
    assert torch.equal(got, (a + b).relu())


def _conv_net():
    torch.manual_seed(0)
    return nondegenerate_(timm.create_model("resnet18", num_classes=10).eval())


def test_apply_takes_the_planners_operators_only_while_they_are_still_right():
    """apply reuses the operators the planner built from this model, unless the model changed since:
    a weight changed in place (its version counter), a layer replaced, or another model."""
    from partialize.engine.apply import _built_by_planner

    model, x = _conv_net(), torch.randn(1, 3, 64, 64)
    plan = make_plan(model, "auto", example_input=x)
    assert set(_built_by_planner(model, plan)) == {e.layer for e in plan.converted}
    assert _built_by_planner(model, plan) == {}  # handed out once
    plan = make_plan(model, "auto", example_input=x)
    assert _built_by_planner(_conv_net(), plan) == {}  # another model (an equal copy)
    plan = make_plan(model, "auto", example_input=x)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(2.0)  # fine-tuned in between
    assert "layer1.0.conv1" not in _built_by_planner(model, plan)
    net = apply_plan(model, make_plan(model, "auto", example_input=x), example_input=x)
    rebuilt = apply_plan(model, Plan.from_dict(json.loads(net._partialize_plan.to_json())), example_input=x)
    with torch.no_grad():
        assert rel_err(net.eval()(x), rebuilt.eval()(x)) == 0.0  # reused == built from the plan's data
    mine = {t.untyped_storage().data_ptr() for t in net.parameters()}
    assert not mine & {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert not mine & {t.untyped_storage().data_ptr() for t in rebuilt.parameters()}


def test_apply_does_not_copy_the_layers_it_replaces_and_leaves_no_placeholder():
    """The copy apply swaps into skips the converted blocks whose operators are built; the converted
    model still equals one rebuilt from the plan's data, and holds no nn.Identity placeholder."""
    model, x = _conv_net(), torch.randn(1, 3, 64, 64)
    net = apply_plan(model, make_plan(model, "auto", example_input=x), example_input=x)
    rebuilt = apply_plan(model, Plan.from_dict(json.loads(net._partialize_plan.to_json())), example_input=x)
    assert sum(type(m) is nn.Identity for m in net.modules()) == sum(type(m) is nn.Identity for m in rebuilt.modules())
    with torch.no_grad():
        assert rel_err(net.eval()(x), rebuilt.eval()(x)) == 0.0


class _Listed(nn.Module):
    """Keeps its blocks in a plain list as well: a placeholder there would stay behind."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(2)])
        self.listed = [self.body[0], self.body[1]]

    def forward(self, x):
        return self.body(x)


def test_a_block_also_held_elsewhere_is_refused_and_the_others_are_not_copied():
    """A swap by name would leave the list holding the original block (where, once, apply's copy left
    a placeholder, and then the old block): refused with the reason (the placeholder rule itself is
    tested in test_module_clone.py)."""
    from partialize.engine.apply import _built_by_planner, _copy_for

    model, x = _Listed().eval(), torch.randn(2, 16)
    rule = {"select": {"name": "body.?"}, "variant": "partial_mlp", "ratio": 0.5}
    plan = make_plan(model, {"version": 1, "rules": [rule]}, example_input=x)
    assert not plan.converted
    assert all("plain attribute 'listed'" in e.reason for e in plan.skipped if e.layer in ("body.0", "body.1"))
    plain = _conv_net()  # nothing held twice: the converted blocks are not copied
    plan = make_plan(plain, "auto", example_input=torch.randn(1, 3, 64, 64))
    copied = _copy_for(plain, plan, _built_by_planner(plain, plan))
    assert type(copied.get_submodule(plan.converted_outermost[0].layer)) is nn.Identity


class _Rows(nn.Module):
    """A bidirectional LSTM over the rows of a feature map (Sequencer's shape)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(12, 12, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_lstm_macs_on_shapes_follow_the_formula():
    """On meta torch runs an LSTM as matmuls, so each is counted; oracle: 4 gates x H x (I + H) per
    step, per batch row, per direction (the CPU's fused kernel has no formula: counted 0, uncounted)."""
    disc = discover(_Rows().eval(), torch.randn(5, 7, 12))
    assert disc.shadow is not None
    assert disc.macs == 2 * 7 * 5 * 4 * 12 * (12 + 12)
