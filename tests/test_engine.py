"""Conversion engine: discovery, plans, precedence, apply, save/load, recipe errors, CLI."""

import json
import os

import pytest
import torch
import torchvision
from _helpers import randomize_bn, rel_err
from click.testing import CliRunner
from torch import nn

import partialize
from partialize.cli import main
from partialize.engine.apply import apply_plan
from partialize.engine.discover import discover
from partialize.errors import CheckpointError, RecipeError
from partialize.macs import count_macs
from partialize.ops import AdaPConv, DPConv, PartialAttention, PartialMLP, PartialSpatialAttention, PATConv, PConv
from partialize.recipe import load_recipe, parse_recipe

timm = pytest.importorskip("timm")


def _convertible_3x3(model):
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.groups == 1
        and m.in_channels == m.out_channels
    }


def test_resnet18_default_plan_converts_exactly_the_eligible_convs_with_exact_macs():
    model = torchvision.models.resnet18()
    plan = partialize.plan(model, input_size=64)
    assert {e.layer for e in plan.converted} == _convertible_3x3(model)
    skipped = {e.layer: e.reason for e in plan.skipped}
    assert "stride" in skipped["layer2.0.conv1"] and "in_channels" in skipped["layer2.0.conv1"]
    # independent count: a C->C 3x3 conv at HxW costs 9 C^2 HW MACs, its PConv 9 (C/4)^2 HW
    d = discover(model, input_size=64)
    expect = 0
    for name in _convertible_3x3(model):
        c, (h, w) = d.layers[name].in_channels, d.layers[name].out_shape[2:]
        expect += 9 * (c // 4) ** 2 * h * w - 9 * c * c * h * w
    assert sum(e.delta_macs for e in plan.converted) == expect
    assert all(e.found == "fx" for e in plan.converted)
    expect_params = 0
    for e in plan.converted:
        conv = model.get_submodule(e.layer)
        expect_params += 9 * (conv.in_channels // 4) ** 2 - conv.weight.numel()
    assert plan.params_after - plan.params_before == expect_params
    json.loads(plan.to_json())  # serialisable
    assert "layer1.0.conv1" in str(plan)


def test_apply_leaves_input_untouched_and_keeps_output_shape_dtype_and_modes():
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = partialize.apply(model, ratio=0.5, input_size=64)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(conv.layer1[0].conv1, PConv) and not isinstance(model.layer1[0].conv1, PConv)
    assert conv.layer1[0].conv1.dim_conv == 32
    x = torch.randn(2, 3, 64, 64)
    conv.train()
    out = conv(x)
    out.sum().backward()
    conv.eval()
    assert conv(x).shape == model(x).shape == (2, 10)
    bf = partialize.apply(model.to(torch.bfloat16), input_size=32)
    assert bf(x[:, :, :32, :32].bfloat16()).dtype == torch.bfloat16


def test_inplace_apply_modifies_the_model():
    model = torchvision.models.resnet18()
    out = partialize.apply(model, inplace=True, input_size=64)
    assert out is model and isinstance(model.layer1[0].conv1, PConv)


def test_precedence_type_then_glob_then_exact_name():
    model = torchvision.models.resnet18()
    rec = {
        "version": 1,
        "defaults": {"variant": "pconv", "ratio": 0.25},
        "rules": [
            {"select": {"name": "layer1.0.conv1"}, "ratio": 0.75},  # exact: highest, though first
            {"select": {"name": "layer1.*"}, "ratio": 0.5},  # glob
            {"select": {"type": "Conv2d", "kernel": 3}, "ratio": 0.125},  # type only: lowest
            {"select": {"name": "re:layer4\\.1\\.conv[12]"}, "variant": "skip"},
        ],
    }
    plan = partialize.plan(model, rec, input_size=64)
    ratio = {e.layer: e.ratio for e in plan.converted}
    assert ratio["layer1.0.conv1"] == 0.75
    assert ratio["layer1.1.conv2"] == 0.5
    assert ratio["layer3.1.conv1"] == 0.125
    reasons = {e.layer: e.reason for e in plan.skipped}
    assert reasons["layer4.1.conv1"] == "the recipe says skip"


def test_ignore_list_and_reasons():
    model = torchvision.models.resnet18()
    rec = {"version": 1, "rules": [{"select": {"type": "Conv2d", "kernel": 3}}], "ignore": ["layer1.*"]}
    plan = partialize.plan(model, rec, input_size=64)
    reasons = {e.layer: e.reason for e in plan.skipped}
    assert reasons["layer1.0.conv1"] == "in the recipe's ignore list"
    assert not any(e.layer.startswith("layer1.") for e in plan.converted)


def test_ignore_pattern_naming_no_module_is_an_error_when_strict():
    """Regression: a typo'd ignore pattern ("layr1.*") was accepted and layer1 converted unprotected."""
    model = torchvision.models.resnet18()
    rec = {"version": 1, "rules": [{"select": {"type": "Conv2d", "kernel": 3}}], "ignore": ["layr1.*", "layer4"]}
    with pytest.raises(RecipeError, match=r"ignore pattern 'layr1\.\*' names no module") as e:
        partialize.plan(model, rec, input_size=64)
    assert "layer4" not in str(e.value).split("names no module")[0]  # a whole block name is a module: fine
    plan = partialize.plan(model, rec | {"strict": False}, input_size=64)
    assert any(e.layer.startswith("layer1.") for e in plan.converted)  # allowed when not strict


def test_ratio_and_variant_are_refused_with_a_recipe():
    """Regression: plan(model, "default", ratio=0.5, variant="patconv") silently used the recipe's 1/4 PConv."""
    model = torchvision.models.resnet18()
    for kw in ({"ratio": 0.5}, {"variant": "patconv"}, {"ratio": 0.25, "variant": "pconv"}):
        with pytest.raises(RecipeError, match="set the conversion only when no recipe is given"):
            partialize.plan(model, "default", input_size=32, **kw)
        with pytest.raises(RecipeError, match="set the conversion only when no recipe is given"):
            partialize.apply(model, "auto", input_size=32, **kw)
    plan = partialize.plan(model, ratio=0.5, variant="patconv", input_size=32)  # no recipe: they apply
    assert {(e.variant, e.ratio) for e in plan.converted} == {("patconv", 0.5)}


def test_resnet50_recipe_converts_strided_convs_too():
    model = torchvision.models.resnet50()
    plan = partialize.plan(model, "resnet50-patconv")
    variants = {e.layer: e.variant for e in plan.converted}
    assert variants["layer2.0.conv2"] == "pconv" and variants["layer2.1.conv2"] == "patconv"
    assert len(plan.converted) == 16
    assert plan.macs_after / plan.macs_before < 0.6


def test_timm_convnext_recipe_converts_mixers_and_mlps():
    model = timm.create_model("convnext_atto", pretrained=False)
    rec = load_recipe("convnext_tiny-patconv")
    rec = rec.model_copy(
        update={
            "rules": [
                rec.rules[0],
                rec.rules[1].model_copy(
                    update={"select": rec.rules[1].select.model_copy(update={"type": ["Mlp", "ConvMlp"]})}
                ),
            ]
        }
    )
    conv = partialize.apply(model, rec, input_size=64)
    assert isinstance(conv.stages[0].blocks[0].conv_dw, PATConv)
    assert isinstance(conv.stages[0].blocks[0].mlp, PartialMLP)
    x = torch.randn(2, 3, 64, 64)
    assert conv.eval()(x).shape == model.eval()(x).shape


def test_timm_vit_attention_and_mlp():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    rec = {
        "version": 1,
        "rules": [
            {"select": {"name": "blocks.*.attn"}, "variant": "partial_attention", "ratio": 0.34},
            {"select": {"name": "blocks.*.mlp"}, "variant": "partial_mlp", "ratio": 0.5},
        ],
    }
    plan = partialize.plan(model, rec, input_size=64)
    assert len(plan.converted) == 2 * len(model.blocks)
    assert all(e.found == "fx" for e in plan.converted)  # attention and MLP blocks are leaves
    conv = partialize.apply(model, rec, input_size=64)
    attn = conv.blocks[0].attn
    assert isinstance(attn, PartialAttention) and attn.num_heads == 2 and attn.dim_cheap == 64
    x = torch.randn(2, 3, 64, 64)
    assert conv.eval()(x).shape == (2, 1000)
    # the kept heads are the original's last two, with q/k/v/proj restricted to their channels
    orig = model.blocks[0].attn.eval()
    t = torch.randn(2, 17, 192)
    w, b = orig.qkv.weight.reshape(3, 192, 192), orig.qkv.bias.reshape(3, 192)
    q, k, v = (t[..., 64:] @ w[j, 64:, 64:].T + b[j, 64:] for j in range(3))
    split = lambda z: z.reshape(2, 17, 2, 64).transpose(1, 2)  # noqa: E731
    heads = torch.softmax(split(q) @ split(k).transpose(-1, -2) * orig.scale, -1) @ split(v)
    ref = heads.transpose(1, 2).reshape(2, 17, 128) @ orig.proj.weight[64:, 64:].T + orig.proj.bias[64:]
    assert rel_err(attn.eval()(t)[..., 64:], ref) < 1e-5
    assert torch.equal(attn(t)[..., :64], t[..., :64])  # identity mixer on the cheap channels


def test_torchvision_vit_multihead_attention():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    rec = {
        "version": 1,
        "rules": [{"select": {"type": "MultiheadAttention"}, "variant": "partial_attention", "ratio": 0.25}],
    }
    conv = partialize.apply(model, rec, input_size=32)
    assert isinstance(conv.encoder.layers[0].self_attention, PartialAttention)
    assert conv.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_fasternet_to_partialnet_keeps_the_function():
    model = timm.create_model("fasternet_t0", pretrained=False).eval()
    conv = partialize.apply(model, "fasternet-to-partialnet", input_size=96)
    blk0, blk3 = conv.stages[0].blocks[0], conv.stages[3].blocks[0]
    assert isinstance(blk0.spatial_mixing, PATConv) and blk0.spatial_mixing.attn_type == "ch"
    assert isinstance(blk3.spatial_mixing, PATConv) and blk3.spatial_mixing.attn_type == "sf"
    assert isinstance(blk0.mlp[3], PartialSpatialAttention)
    x = torch.randn(2, 3, 96, 96)
    assert rel_err(conv.eval()(x), model(x)) < 1e-5  # every added attention starts as identity


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:  # not symbolically traceable
            x = self.body(x)
        else:
            x = self.body(-x)
        return self.head(x.mean(dim=(2, 3)))


def test_fallback_discovery_for_untraceable_model():
    model = Untraceable()
    d = discover(model, input_size=16)
    assert not d.traced
    assert d.trace_error  # the reason tracing failed is recorded
    assert d.layers["body"].found == "hook (tracing failed)"
    assert d.layers["body"].in_shape == (1, 16, 16, 16)
    conv = partialize.apply(model, input_size=16)
    assert isinstance(conv.body, PConv) and not isinstance(conv.stem, PConv)


# --- recipe errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expect",
    [
        ("version: 1\nrules:\n  - select: {type: Conv2d\n", ["invalid YAML", ":4"]),
        (
            "version: 1\nrules:\n  - select: {type: Conv2d}\n    ratoi: 0.5\n",
            [":4", "rules.0.ratoi", "allowed fields", "ratio"],
        ),
        (
            "version: 1\nrules:\n  - select: {type: Conv2d}\n    variant: pconv2\n",
            ["unknown variant 'pconv2'", "pconv"],
        ),
        ("version: 1\nrules:\n  - select: {name: 're:layer[1'}\n", [":3", "bad regular expression"]),
        ("version: 2\nrules:\n  - select: {type: Conv2d}\n", [":1", "version"]),
        ("version: 1\nrules: []\n", [":2", "at least one rule"]),
        (
            "version: 1\nrules:\n  - select: {type: Conv2d}\n    ratio: 1.5\n",
            [":4", "ratio must be in (0, 1]"],
        ),
    ],
)
def test_recipe_errors_name_line_field_and_fix(text, expect):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "my.yaml")
    msg = str(err.value)
    assert "my.yaml" in msg
    for part in expect:
        assert part in msg, msg


def test_rule_matching_nothing_lists_closest_names_unless_not_strict():
    model = torchvision.models.resnet18()
    rec = {"version": 1, "rules": [{"select": {"name": "layer1.0.conv3"}}]}
    with pytest.raises(RecipeError, match="matches no layer.*layer1.0.conv1"):
        partialize.plan(model, rec, input_size=32)
    rec["strict"] = False
    assert partialize.plan(model, rec, input_size=32).converted == []


def test_converting_a_converted_model_does_not_nest_operators():
    model = torchvision.models.resnet18()
    once = partialize.apply(model, input_size=32)
    plan = partialize.plan(once, input_size=32)
    assert plan.converted == []
    reasons = {e.layer: e.reason for e in plan.skipped}
    assert reasons["layer1.0.conv1.conv"] == "inside layer1.0.conv1, which is already a partial operator"


def test_ratio_words_and_numeric_ratios_per_variant():
    model = torchvision.models.resnet18()
    ada = partialize.plan(model, variant="ada_pconv", ratio=0.25, input_size=32)
    assert ada.converted and all(e.variant == "ada_pconv" for e in ada.converted)
    rec = {"version": 1, "rules": [{"select": {"name": "layer1.0.conv1"}, "variant": "pat_sp", "ratio": "dynamic"}]}
    with pytest.raises(RecipeError, match="does not apply to variant 'pat_sp'"):
        partialize.plan(model, rec, input_size=32)


def test_unknown_variant_parameter_is_a_recipe_error():
    model = torchvision.models.resnet18()
    rec = {"version": 1, "rules": [{"select": {"name": "layer1.0.conv1"}, "params": {"atn": "ch"}}]}
    with pytest.raises(RecipeError, match="atn"):
        partialize.plan(model, rec, input_size=32)


# --- save / load ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["resnet50-patconv", "dynamic", "adaptive"])
def test_save_load_round_trip_identical_outputs(tmp_path, recipe):
    from partialize.base_model import build_model

    model = build_model("torchvision:resnet18", num_classes=7)
    rec = load_recipe(recipe).model_copy(update={"strict": False})
    conv = partialize.apply(model, rec, input_size=64)
    with torch.no_grad():  # make trained-looking state: non-default BN stats, gates and routers
        for m in conv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
            if isinstance(m, DPConv):
                m.set_ratio(0.5)
                m.gates.mul_(torch.rand_like(m.gates) + 0.5)
            if isinstance(m, AdaPConv):
                m.router.weight.normal_(std=5.0)
    path = partialize.save(conv, tmp_path / "m.safetensors")
    back = partialize.load(path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(back.eval()(x), conv.eval()(x))
    assert [e.layer for e in back._partialize_plan.converted] == [e.layer for e in conv._partialize_plan.converted]


@pytest.mark.parametrize("kwargs", [{"act_layer": "gelu"}, {"global_pool": "max"}, {"output_stride": 16}])
def test_load_refuses_a_rebuilt_model_that_computes_something_else(tmp_path, kwargs):
    """A plan names its base by architecture and num_classes only. A timm model built with other
    arguments has the same layers and tensors but another function: load must not hand that back
    (nor export write it). The oracle is the saved model's own output, and the same architecture built
    with the user's arguments must load to exactly it."""
    from _helpers import nondegenerate_

    torch.manual_seed(0)
    base = nondegenerate_(timm.create_model("resnet18", num_classes=10, **kwargs).eval())
    conv = partialize.apply(base, "default", input_size=64).eval()
    path = partialize.save(conv, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="computes something other.*model=timm.create_model"):
        partialize.load(path)
    with pytest.raises(CheckpointError, match="computes something other"):
        partialize.export(path, "torchscript", out=tmp_path / "m.ts.pt")
    assert not (tmp_path / "m.ts.pt").exists()
    right = partialize.load(path, model=timm.create_model("resnet18", num_classes=10, **kwargs))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(right.eval()(x), conv(x))
    with pytest.raises(CheckpointError, match="not the base model the file was converted from"):
        partialize.load(path, model=timm.create_model("resnet18", num_classes=10))


def test_a_file_without_a_probe_still_loads(tmp_path):
    """Files written before probes were stored load as before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = timm.create_model("resnet18", num_classes=10).eval()
    conv = partialize.apply(base, "default", input_size=64).eval()
    path = partialize.save(conv, tmp_path / "m.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert "probe" in meta
    meta.pop("probe")
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata=meta)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(partialize.load(old).eval()(x), conv(x))


def test_load_errors_are_clear_and_nothing_is_unpickled(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        partialize.load(bad)
    from partialize.base_model import build_model

    conv = partialize.apply(build_model("torchvision:resnet18"), input_size=32)
    path = partialize.save(conv, tmp_path / "ok.safetensors")
    data = open(path, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        partialize.load(trunc)
    with pytest.raises(CheckpointError, match="does not exist"):
        partialize.load(tmp_path / "missing.safetensors")


# --- CLI -----------------------------------------------------------------------------------


def test_cli_convert_dry_run_and_json(tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        main, ["convert", "torchvision:resnet18", "--recipe", "default", "--input-size", "64", "--dry-run"]
    )
    assert r.exit_code == 0, r.output
    assert "layer1.0.conv1" in r.output and "MACs" in r.output
    r = runner.invoke(main, ["convert", "torchvision:resnet18", "--input-size", "64", "--dry-run", "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["plan"]["macs_after"] < data["plan"]["macs_before"]
    assert len([e for e in data["plan"]["entries"] if e["status"] == "convert"]) == 13
    out = tmp_path / "c.safetensors"
    r = runner.invoke(main, ["convert", "torchvision:resnet18", "--input-size", "64", "--no-speed", "--out", str(out)])
    assert r.exit_code == 0 and out.exists()
    assert isinstance(partialize.load(out).layer1[0].conv1, PConv)


def test_cli_errors_without_traceback(tmp_path, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(main, ["convert", "resnet5O", "--dry-run"])
    assert r.exit_code == 2 and "unknown model" in r.output
    assert isinstance(r.exception, SystemExit)  # a clean exit, not an uncaught exception
    bad = tmp_path / "r.yaml"
    bad.write_text("version: 1\nrules:\n  - select: {typo: Conv2d}\n")
    r = runner.invoke(main, ["recipe", "validate", str(bad)])
    assert r.exit_code != 0 and "r.yaml:3" in r.output and "typo" in r.output
    import partialize.base_model

    monkeypatch.setattr(partialize.base_model, "hub_reachable", lambda *a, **k: False)  # offline, no network use
    r = runner.invoke(main, ["convert", "resnet18", "--weights", "pretrained", "--dry-run"])
    assert r.exit_code == 2 and "--weights random" in r.output
    assert isinstance(r.exception, SystemExit)


def test_cli_recipe_schema_and_validate_shipped():
    runner = CliRunner()
    r = runner.invoke(main, ["recipe", "schema"])
    schema = json.loads(r.output)
    assert "rules" in schema["properties"] and "Select" in json.dumps(schema)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in sorted(os.listdir(os.path.join(here, "recipes"))):
        if f.endswith(".yaml"):
            r = runner.invoke(main, ["recipe", "validate", os.path.join(here, "recipes", f)])
            assert r.exit_code == 0, r.output


def test_load_never_runs_a_factory_named_by_the_file_and_never_touches_the_callers_model(tmp_path):
    from partialize.serialization import read_plan

    model = Untraceable()
    conv = partialize.apply(model, input_size=16)
    conv._partialize_plan.model = {"spec": "builtins:print", "kwargs": {}}  # what a crafted file could say
    path = partialize.save(conv, tmp_path / "c.safetensors")
    assert read_plan(path).model["spec"] == "builtins:print"
    with pytest.raises(CheckpointError, match="would import and run code"):
        partialize.load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    back = partialize.load(path, model=model)  # the caller's model is copied, not converted in place
    assert not isinstance(model.body, PConv) and isinstance(back.body, PConv)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(partialize.PartializeError, match="already exists"):
        partialize.save(conv, path)  # no silent overwrite
    partialize.save(conv, path, overwrite=True)


def test_planning_counting_and_applying_put_every_module_back_in_its_own_mode():
    """A training model with a frozen BN (``bn.eval()``, a common fine-tuning set-up): ``model.train(was)``
    after an eval pass would unfreeze it. Planning, counting MACs and applying must leave each module in
    the mode it had."""
    model = torchvision.models.resnet18().train()
    model.layer2[0].bn1.eval()
    model.layer3.eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(1, 3, 64, 64)
    count_macs(model, x)
    assert [m.training for m in model.modules()] == modes
    plan = partialize.plan(model, "auto", input_size=64)
    assert [m.training for m in model.modules()] == modes
    apply_plan(model, plan)
    assert [m.training for m in model.modules()] == modes
    from partialize.measure.speed import measure_speed

    measure_speed({"m": model}, 32, rounds=1, batch=2, min_round_s=0.01, deployed=False)  # timed as given
    assert [m.training for m in model.modules()] == modes
    assert modes.count(False) > 1  # the check is not vacuous: some modules were in eval, the root trains
    assert model.training


class _ListHeld(nn.Module):
    """A conv registered as a child and also kept in a plain list (and a dict) its forward runs."""

    def __init__(self, where: str = "list"):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)
        self.layers = [self.conv] if where == "list" else {"first": self.conv}

    def forward(self, x):
        for layer in self.layers if isinstance(self.layers, list) else self.layers.values():
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("where", ["list", "dict"])
def test_a_layer_also_held_by_a_plain_attribute_is_skipped_with_the_reason(where):
    """Swapping by name would leave the list's reference running the original conv while the plan
    claimed the conversion (its MACs, its parameters): the layer is refused; the rest converts."""
    model = _ListHeld(where).eval()
    x = torch.randn(1, 16, 16, 16)
    rec = {"version": 1, "rules": [{"select": {"type": "Conv2d"}, "variant": "pconv", "ratio": 0.25}]}
    plan = partialize.plan(model, rec, example_input=x)
    skipped = {e.layer: e.reason for e in plan.skipped}
    assert "plain attribute 'layers'" in skipped["conv"]
    assert [e.layer for e in plan.converted] == ["head"]
    conv = apply_plan(model, plan)
    assert type(conv.layers[0] if where == "list" else conv.layers["first"]) is nn.Conv2d
    # the plan's count is the converted model's own: 16*16*9*256 for the conv, a quarter's quarter for the head
    assert plan.macs_after == count_macs(conv, x).total == 16 * 16 * 9 * 256 + 4 * 4 * 9 * 256


def test_a_layer_with_hooks_is_skipped_with_the_reason_and_converts_once_they_are_removed():
    """The converted layer is a new module: hooks on the original (or on a layer inside it) would
    silently stop running. Refused with the reason; without the hooks it converts."""
    model = torchvision.models.resnet18().eval()
    rec = {"version": 1, "rules": [{"select": {"name": "layer1.0.conv2"}, "variant": "pconv"}]}
    h1 = model.layer1[0].conv2.register_forward_hook(lambda m, a, o: o * 2)
    h2 = model.layer1[1].conv2.register_forward_pre_hook(lambda m, a: None)
    plan = partialize.plan(model, rec, input_size=64)
    assert "forward hooks registered" in {e.layer: e.reason for e in plan.skipped}["layer1.0.conv2"]
    block = {"version": 1, "rules": [{"select": {"name": "layer1.1"}, "variant": "partial_residual"}]}
    reason = {e.layer: e.reason for e in partialize.plan(model, block, input_size=64).skipped}["layer1.1"]
    assert "forward pre hooks registered (its conv2)" in reason
    h1.remove()
    h2.remove()
    assert [e.layer for e in partialize.plan(model, rec, input_size=64).converted] == ["layer1.0.conv2"]
    assert [e.layer for e in partialize.plan(model, block, input_size=64).converted] == ["layer1.1"]


def test_a_module_that_reads_its_state_dict_version_round_trips(tmp_path):
    """torchvision's MNASNet reads the state-dict version in _load_from_state_dict; safetensors keeps
    no versions, so its files saved but never loaded. The reloaded model equals the saved one."""
    model = torchvision.models.mnasnet0_5().eval()
    randomize_bn(model)
    conv = partialize.apply(model, "auto", input_size=64).eval()
    path = partialize.save(conv, tmp_path / "m.safetensors")
    back = partialize.load(path, model=torchvision.models.mnasnet0_5()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), conv(x))


def test_tied_weights_are_saved_once_and_load_tied():
    """A weight shared by two layers is one tensor in the file; loading fills both names (the one the
    file left out is not reported missing) and keeps them one tensor."""
    import tempfile

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 1)
            self.c = nn.Conv2d(16, 16, 1)
            self.c.weight = self.b.weight

        def forward(self, x):
            return self.c(self.b(self.a(self.stem(x))))

    torch.manual_seed(0)
    model = Tied().eval()
    conv = partialize.apply(model, "default", input_size=32).eval()
    with tempfile.TemporaryDirectory() as d:
        path = partialize.save(conv, f"{d}/t.safetensors")
        fresh = Tied()
        back = partialize.load(path, model=fresh).eval()
    assert back.c.weight is back.b.weight
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), conv(x))


def test_a_model_whose_output_holds_nan_saves_and_loads(tmp_path):
    """A probe with NaN in it (an untrained, ill-conditioned model can give them) is compared by
    position: the file loads, and a rebuilt model without them would not pass."""
    base = timm.create_model("resnet18", num_classes=10).eval()
    conv = partialize.apply(base, "default", input_size=64).eval()
    with torch.no_grad():
        conv.fc.bias[3] = float("nan")
    path = partialize.save(conv, tmp_path / "m.safetensors")
    back = partialize.load(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x).isnan(), conv(x).isnan()) and back(x).isnan().any()
