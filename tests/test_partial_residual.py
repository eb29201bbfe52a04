"""partial_residual: a ResNet block whose branch writes part of the channels (ops/partial_residual.py)."""

import copy

import pytest
import timm
import torch
import torchvision
from _helpers import nondegenerate_, randomize_bn, record_copies, rel_err
from torch import nn

import partialize
from partialize.engine.apply import apply_plan
from partialize.errors import OperatorError
from partialize.ops import PartialResidual, PATConv, PConv

BLOCKS = {
    "timm-bottleneck": lambda: timm.create_model("resnet50", pretrained=False).layer1[1],
    "timm-basic": lambda: timm.create_model("resnet18", pretrained=False).layer2[1],
    "tv-bottleneck": lambda: torchvision.models.resnet50().layer1[1],
    "tv-basic": lambda: torchvision.models.resnet18().layer2[1],
}


def _zeroed_reference(block, op: PartialResidual):
    """The original block made to compute what the partial one should, by an independent route: its
    last conv and BN output 0 outside the written group, its first conv ignores unread inputs."""
    ref = copy.deepcopy(block).eval()
    last, last_bn = ("conv3", "bn3") if hasattr(ref, "conv3") else ("conv2", "bn2")
    o, k, c = op.offset, op.dim_part, op.dim
    rest = [i for i in range(c) if not o <= i < o + k]
    a, b = op.read_range()
    unread = [i for i in range(c) if not a <= i < b]
    with torch.no_grad():
        getattr(ref, last).weight[rest] = 0
        bn = getattr(ref, last_bn)
        bn.weight[rest], bn.bias[rest], bn.running_mean[rest] = 0.0, 0.0, 0.0
        ref.conv1.weight[:, unread] = 0
    return ref


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@pytest.mark.parametrize(
    "read,offset", [("all", 0.0), ("all", 0.25), ("group", 0.5), ("complement", 0.0), ("complement", 0.5)]
)
def test_matches_the_original_block_with_the_dropped_parts_zeroed(kind, read, offset):
    block = BLOCKS[kind]().eval()
    randomize_bn(block)
    c = block.conv1.in_channels
    op = PartialResidual.from_module(block, ratio=0.5, offset=offset, read=read).eval()
    assert (op.dim, op.dim_part, op.offset) == (c, c // 2, int(offset * c))
    x = torch.randn(2, c, 12, 12)  # negatives too: the untouched channels must get the output activation
    x_before = x.clone()
    ref = _zeroed_reference(block, op)
    with torch.no_grad():
        want = ref(x.clone())
        got = op(x)
        deployed = op.deploy()(x)
    assert torch.equal(x, x_before)  # neither form writes into its input
    assert rel_err(got, want) < 1e-5
    assert rel_err(deployed, got) < 1e-5
    o, k = op.offset, op.dim_part
    untouched = torch.cat([x[:, :o], x[:, o + k :]], 1)
    assert torch.equal(torch.cat([got[:, :o], got[:, o + k :]], 1), torch.relu(untouched))


def test_weights_are_sliced_from_the_original_and_macs_halve_in_the_1x1_convs():
    block = timm.create_model("resnet50", pretrained=False).layer1[1]
    op = PartialResidual.from_module(block, ratio=0.5, offset=0.5, read="complement")
    assert op.conv1.weight.shape == (64, 128, 1, 1) and op.conv3.weight.shape == (128, 64, 1, 1)
    assert torch.equal(op.conv1.weight, block.conv1.weight[:, :128])  # reads the first half
    assert torch.equal(op.conv3.weight, block.conv3.weight[128:])  # writes the second half
    assert torch.equal(op.bn3.running_var, block.bn3.running_var[128:])
    assert op.conv2 is not block.conv2 and torch.equal(op.conv2.weight, block.conv2.weight)
    assert op.convertible_children() == ("bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "act3")
    # independent count at 56x56 (conv1 256->64, conv3 64->256): read="all" halves conv3's outputs,
    # read="complement" also halves conv1's inputs
    model = timm.create_model("resnet50", pretrained=False)
    for read, n_halved in (("all", 1), ("complement", 2)):
        rule = {"select": {"name": "layer1.1"}, "variant": "partial_residual", "ratio": 0.5, "params": {"read": read}}
        (entry,) = partialize.plan(model, {"version": 1, "rules": [rule]}).converted
        assert entry.delta_macs == -n_halved * (56 * 56 * 128 * 64)
        assert entry.delta_params == -n_halved * (128 * 64) - 2 * 128  # and bn3 loses half its affine


def test_training_form_trains():
    block = torchvision.models.resnet18().layer1[1]
    op = PartialResidual.from_module(block, ratio=0.5, read="group").train()
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    op(x).square().mean().backward()
    assert op.conv1.weight.grad.abs().sum() > 0 and op.conv2.weight.grad.abs().sum() > 0
    assert x.grad[:, 32:].abs().sum() > 0  # untouched channels pass the gradient through the shortcut


@pytest.mark.parametrize(
    "make,params,match",
    [
        (lambda: torchvision.models.resnet50().layer2[0], {}, "projection shortcut"),
        (lambda: timm.create_model("seresnet50", pretrained=False).layer1[1], {}, "squeeze-excitation"),
        (lambda: torchvision.models.resnet18().layer1[1], {"ratio": 0.5, "offset": 0.75}, "runs past"),
        (
            lambda: torchvision.models.resnet18().layer1[1],
            {"ratio": 0.25, "offset": 0.25, "read": "complement"},
            "either end",
        ),
        (lambda: torchvision.models.resnet18().layer1[1], {"ratio": 1.0}, "same block"),
        (lambda: torchvision.models.resnet18().layer1[1], {"read": "some"}, "read must be"),
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3)), {}, "does not know"),
    ],
)
def test_refusals_say_why(make, params, match):
    with pytest.raises(OperatorError, match=match):
        PartialResidual.from_module(make(), **params)


def test_resnet50_partial_recipe_nests_patconv_and_deploys_exactly(tmp_path):
    model = timm.create_model("resnet50", pretrained=False, num_classes=10).eval()
    randomize_bn(model)
    conv = partialize.apply(model, "resnet50-partial", input_size=64).eval()
    blocks = [e.layer for e in conv._partialize_plan.converted if e.variant == "partial_residual"]
    assert blocks == [f"layer{s}.{i}" for s, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for i in range(1, n)]
    assert isinstance(conv.layer3[2], PartialResidual) and isinstance(conv.layer3[2].conv2, PATConv)
    assert (conv.layer3[1].offset, conv.layer3[2].offset) == (0, 512)  # odd blocks first half, even second
    plan = conv._partialize_plan
    # nested layers count once in the share of converted MACs
    assert plan.converted_macs_share() <= 1.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, deployed = conv(x), partialize.deploy(conv)(x)
    assert rel_err(deployed, got) < 1e-4
    path = partialize.save(conv, tmp_path / "p.safetensors")
    back = partialize.load(path).eval()
    with torch.no_grad():
        assert torch.equal(back(x), got)


def test_changed_children_of_a_converted_block_are_skipped_with_the_reason():
    model = torchvision.models.resnet18()
    rec = {
        "version": 1,
        "rules": [
            {"select": {"name": "layer1.1"}, "variant": "partial_residual", "ratio": 0.5, "params": {"read": "group"}},
            {"select": {"name": ["layer1.1.conv1", "layer1.1.conv2"]}, "variant": "pconv"},
        ],
    }
    plan = partialize.plan(model, rec, input_size=64)
    skipped = {e.layer: e.reason for e in plan.skipped}
    assert "changes this layer's channels" in skipped["layer1.1.conv1"]
    assert "changes this layer's channels" in skipped["layer1.1.conv2"]
    assert [e.layer for e in plan.converted] == ["layer1.1"]


def _regnet_block(kind: str):
    """torchvision RegNet blocks: Y with squeeze-excitation on the hidden channels, X without."""
    net = torchvision.models.regnet_y_400mf() if kind == "y" else torchvision.models.regnet_x_400mf()
    return net.trunk_output.block2.get_submodule("block2-1")


@pytest.mark.parametrize("kind", ["x", "y"])
@pytest.mark.parametrize("read,offset", [("all", 0.0), ("complement", 0.0), ("complement", 0.5)])
def test_regnet_block_matches_the_original_with_the_dropped_parts_zeroed(kind, read, offset):
    """RegNet's branch is nested (f.a.0 ... f.c.1): the cut block equals the original whose last conv
    and BN output 0 outside the written group and whose first conv ignores the unread inputs; the
    grouped 3x3 (and the SE) stay as they were, free for a conv rule."""
    block = _regnet_block(kind).eval()
    randomize_bn(block)
    op = PartialResidual.from_module(block, ratio=0.5, offset=offset, read=read).eval()
    c = block.f.a[0].in_channels
    o, k = op.offset, op.dim_part
    assert (op.dim, k, o) == (c, c // 2, int(offset * c))
    ref = copy.deepcopy(block).eval()
    rest = [i for i in range(c) if not o <= i < o + k]
    a, b = op.read_range()
    with torch.no_grad():
        ref.f.c[0].weight[rest] = 0
        bn = ref.f.c[1]
        bn.weight[rest], bn.bias[rest], bn.running_mean[rest] = 0.0, 0.0, 0.0
        ref.f.a[0].weight[:, [i for i in range(c) if not a <= i < b]] = 0
        x = torch.randn(2, c, 10, 10)
        got = op(x)
        assert rel_err(got, ref(x)) < 1e-5
        assert rel_err(op.deploy()(x), got) < 1e-5
    assert "f.b" in op.kept and ("f.se" in op.kept) == (kind == "y")
    assert op.f.c[0].out_channels == k and op.f.a[0].in_channels == b - a


def test_regnet_projection_block_is_refused_and_auto_alternates_offsets():
    """The first block of a stage has a projection (``proj``): refused with the reason. ``auto`` turns
    the others into coupling pairs (offsets 0, 1/2, 0... through ``{cycle: [0, 0.5]}``, each recorded
    in the plan: consecutive blocks of a stage alternate) and still converts the grouped 3x3 inside
    each with PConv."""
    net = torchvision.models.regnet_x_400mf().eval()
    with pytest.raises(OperatorError, match=r"projection shortcut \(proj\)"):
        PartialResidual.from_module(net.trunk_output.block2[0])
    plan = partialize.plan(net, "auto", input_size=64)
    blocks = [e for e in plan.converted if e.variant == "partial_residual"]
    assert len(blocks) >= 10 and {e.params["offset"] for e in blocks} == {0.0, 0.5}
    for a, b in zip(blocks, blocks[1:]):
        if a.layer.rsplit(".", 1)[0] == b.layer.rsplit(".", 1)[0]:  # the same stage
            assert a.params["offset"] != b.params["offset"], (a.layer, b.layer)
    inner = {e.layer for e in plan.converted if e.variant == "pconv"}
    assert {f"{e.layer}.f.b.0" for e in blocks} <= inner
    skipped = {e.layer: e.reason for e in plan.skipped}
    assert "projection shortcut" in skipped["trunk_output.block2.block2-0"]


PROJECTION_BLOCKS = {
    "timm-bottleneck": lambda: timm.create_model("resnet50", pretrained=False).layer2[0],
    "timm-basic": lambda: timm.create_model("resnet18", pretrained=False).layer3[0],
    "tv-bottleneck": lambda: torchvision.models.resnet50().layer1[0],  # width changes, no stride
    "regnet": lambda: torchvision.models.regnet_y_400mf().trunk_output.block2[0],
    # input wider than the output (128 -> 64), so input and output fractions differ in width
    "tv-basic-narrowing": lambda: torchvision.models.resnet.BasicBlock(
        128, 64, downsample=torch.nn.Sequential(torch.nn.Conv2d(128, 64, 1, bias=False), torch.nn.BatchNorm2d(64))
    ),
}


@pytest.mark.parametrize("kind", sorted(PROJECTION_BLOCKS))
@pytest.mark.parametrize(
    "ratio,read,offset",
    [(0.5, "all", 0.0), (0.25, "group", 0.0), (0.25, "group", 0.75), (0.5, "group", 0.0), (0.25, "group", 0.5)],
)
def test_a_projection_block_equals_the_original_with_its_branch_zeroed_outside_the_group(kind, ratio, read, offset):
    """projection=True: the branch writes [o, o + k) of the output and reads the same fractions of the
    input; the other channels are the projection's alone. Reference: the original block with its last
    conv / BN zeroed outside the written group and its first conv's unread input columns zeroed."""
    block = PROJECTION_BLOCKS[kind]().eval()
    randomize_bn(block)
    names = (
        ("f.a.0", "f.c.0", "f.c.1")
        if kind == "regnet"
        else ("conv1",) + (("conv3", "bn3") if hasattr(block, "conv3") else ("conv2", "bn2"))
    )
    first, last, last_bn = (block.get_submodule(n) for n in names)
    c_in, c_out = first.in_channels, last.out_channels
    op = PartialResidual.from_module(block, ratio=ratio, offset=offset, read=read, projection=True).eval()
    k = round(ratio * c_out)
    o = round(offset * c_out)
    assert (op.dim, op.in_dim, op.dim_part, op.offset) == (c_out, c_in, k, o)
    a, b = op.read_range()
    if read == "all":
        assert (a, b) == (0, c_in)
    else:  # the same fractions of the inputs: as wide, starting as far in (at an end when the group is)
        assert b - a == round(ratio * c_in) and a == (c_in - (b - a) if o + k == c_out else round(offset * c_in))
    ref = copy.deepcopy(block).eval()
    rest = [i for i in range(c_out) if not o <= i < o + k]
    unread = [i for i in range(c_in) if not a <= i < b]
    r_first, r_last, r_bn = (ref.get_submodule(n) for n in names)
    with torch.no_grad():
        r_last.weight[rest] = 0
        r_bn.weight[rest], r_bn.bias[rest], r_bn.running_mean[rest] = 0.0, 0.0, 0.0
        r_first.weight[:, unread] = 0
    x = torch.randn(2, c_in, 16, 16)
    x_before = x.clone()
    with torch.no_grad():
        want, got, deployed = ref(x), op(x), op.deploy()(x)
    assert torch.equal(x, x_before)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
    assert rel_err(deployed, got) < 1e-5


def test_a_projection_block_is_refused_without_the_flag_and_saves_the_counted_macs():
    model = timm.create_model("resnet50", pretrained=False)
    with pytest.raises(OperatorError, match=r"projection shortcut \(downsample\).*projection: true"):
        PartialResidual.from_module(model.layer2[0])
    # independent count for layer2.0 (input 256 x 56 x 56; conv1 256 -> 128 at 56x56, conv3 128 -> 512
    # at 28x28 after the strided 3x3): at 1/4 with read="group" conv1 reads 64 of its 256 inputs and conv3
    # writes 128 of its 512 outputs; bn3 keeps 128 of its 512 affine pairs
    rule = {
        "select": {"name": "layer2.0"},
        "variant": "partial_residual",
        "ratio": 0.25,
        "params": {"read": "group", "projection": True},
    }
    (entry,) = partialize.plan(model, {"version": 1, "rules": [rule]}).converted
    assert entry.delta_macs == -(56 * 56 * 128 * 192 + 28 * 28 * 128 * 384)
    assert entry.delta_params == -(128 * 192 + 128 * 384) - 2 * 384


def test_the_projection_form_trains_and_exports():
    import io
    import warnings

    import onnxruntime as ort

    block = timm.create_model("resnet18", pretrained=False).layer2[0]
    randomize_bn(block)
    op = PartialResidual.from_module(block, ratio=0.5, read="group", projection=True).train()
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    op(x).square().mean().backward()
    assert op.downsample[0].weight.grad.abs().sum() > 0 and op.conv1.weight.grad.abs().sum() > 0
    assert x.grad[:, 32:].abs().sum() > 0  # inputs the branch does not read still reach the projection
    op.eval()
    dep = op.deploy()
    assert isinstance(dep.downsample[1], torch.nn.Identity)  # the projection's BN folded into its conv
    x = torch.randn(1, 64, 8, 8)
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = dep(x)
        assert rel_err(want, op(x)) < 1e-5
        torch.onnx.export(dep, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    assert rel_err(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want) < 1e-5


def test_a_projection_that_returns_its_input_is_not_written_into():
    """The deploy form adds into the projection's output in place; a projection that hands back the
    input itself (here nn.Identity on a width-keeping block) must get a copy, not the caller's tensor."""
    block = torchvision.models.resnet.BasicBlock(32, 32, downsample=torch.nn.Identity()).eval()
    randomize_bn(block)
    op = PartialResidual.from_module(block, ratio=0.5, read="group", projection=True).eval()
    dep = op.deploy()
    x = torch.randn(2, 32, 8, 8)
    x_before = x.clone()
    with torch.no_grad():
        got, want = dep(x), op(x)
    assert torch.equal(x, x_before) and rel_err(got, want) < 1e-6


def test_an_empty_read_range_is_refused():
    block = torchvision.models.resnet.BasicBlock(
        4, 64, downsample=torch.nn.Sequential(torch.nn.Conv2d(4, 64, 1, bias=False), torch.nn.BatchNorm2d(64))
    )
    with pytest.raises(OperatorError, match="none of its 4 inputs"):
        PartialResidual.from_module(block, ratio=15 / 16, read="complement", projection=True)


def _state(model: nn.Module) -> dict:
    return {k: (v.data_ptr(), v._version, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def test_a_kept_child_a_nested_operator_replaces_is_not_copied_and_the_original_stays_untouched(monkeypatch):
    """The planner's partial residual holds the original's kept children (the grouped 3x3 ``f.b``), not
    copies: RegNet-Y 128GF's were half a gigabyte, copied and then replaced by a nested PConv. Apply
    copies what stays; the converted model shares no tensor with the original, and neither planning
    nor applying changes the original's values, storage, version counters or training modes."""
    net = torchvision.models.regnet_y_400mf()
    nondegenerate_(net)
    net.train()
    block = net.trunk_output.block2.get_submodule("block2-1")
    block.f.se.eval()  # a kept child in a mode of its own
    before, modes = _state(net), [m.training for m in net.modules()]
    plan = partialize.plan(net, "auto", input_size=64)
    op = plan._built[1]["trunk_output.block2.block2-1"][0]
    assert isinstance(op, PartialResidual) and op.f.b is block.f.b  # shared, not copied
    copied = record_copies(monkeypatch, "partialize.ops.partial_residual", "partialize.engine.apply")
    conv = apply_plan(net, plan)
    grouped = [e.layer for e in plan.converted if e.layer.endswith(".f.b.0")]
    assert len(grouped) >= 10
    assert not [n for n in grouped if id(net.get_submodule(n)) in set(copied)]  # the replaced 3x3s: never copied
    new = conv.trunk_output.block2.get_submodule("block2-1")
    assert isinstance(new.f.b[0], PConv) and new.f.se is not block.f.se
    held = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}
    assert not [n for n, t in conv.state_dict().items() if t.untyped_storage().data_ptr() in held]
    ids = {id(m) for m in net.modules()}
    assert not [n for n, m in conv.named_modules() if id(m) in ids]
    after = _state(net)
    assert after.keys() == before.keys()
    for k, (ptr, version, value) in before.items():
        assert after[k][:2] == (ptr, version) and torch.equal(after[k][2], value), k
    assert [m.training for m in net.modules()] == modes
    # the same as a conversion built anew (the plan applied a second time) and as one in place
    again = apply_plan(net, plan)
    same = copy.deepcopy(net)
    in_place = apply_plan(same, partialize.plan(same, "auto", input_size=64), inplace=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = conv.eval()(x)
        assert torch.equal(again.eval()(x), want) and torch.equal(in_place.eval()(x), want)
    assert rel_err(want, net.eval()(x)) > 1e-3  # a conversion that changed the function (not the original)


def test_a_block_of_two_dtypes_is_built_with_copies():
    """Sharing the kept children needs one device and dtype in the block: moving the operator to the
    block's dtype must not convert the original's own modules."""
    from partialize.engine.planner import build_op

    block = _regnet_block("y")
    op = build_op(block, "partial_residual", 0.5, {}, share_kept=True)
    assert op.f.b is block.f.b
    block.f.se.double()
    op = build_op(block, "partial_residual", 0.5, {}, share_kept=True)
    assert op.f.b is not block.f.b and op.f.se is not block.f.se
    assert block.f.se.fc1.weight.dtype == torch.float64
    other = _regnet_block("y")
    assert build_op(other, "partial_residual", 0.5, {}).f.b is not other.f.b  # only the planner shares
