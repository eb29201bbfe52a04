"""Bad input is a clear error: recipes (text, files, YAML bombs, nesting, encodings, values), the Python
API's arguments and the CLI's options. Every case asserts the error class, that the message names the
field/option and the fix, and (CLI) exit code 2 without a traceback."""

import json
import math
import time

import pytest
import torch
import torchvision
from click.testing import CliRunner

import partialize
from partialize.cli import main
from partialize.errors import CheckpointError, PartializeError, RecipeError
from partialize.recipe import load_recipe, parse_recipe

OK = "version: 1\nrules:\n  - select: {type: Conv2d, kernel: 3}\n"


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def _clean_exit(r, code=2):
    """Exit ``code`` through sys.exit (the CLI printed the error), never an uncaught exception."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output


# --- recipes given as text, files, objects ---------------------------------------------------


def test_recipe_as_yaml_text_longer_than_a_file_name():
    text = OK + "description: " + "x" * 400 + "\n"  # > NAME_MAX: used to raise OSError File name too long
    rec = load_recipe(text)
    assert rec.rules[0].select.type == "Conv2d" and rec.description == "x" * 400
    plan = partialize.plan(torchvision.models.resnet18(), text, input_size=32)
    assert len(plan.converted) == 13


@pytest.mark.parametrize("bad", [[1, 2], 5, 2.5, b"version: 1"])
def test_recipe_of_the_wrong_type_is_a_recipe_error(bad):
    with pytest.raises(RecipeError, match="recipe must be"):
        load_recipe(bad)


def test_non_utf8_recipe_file_names_the_file_and_the_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("version: 1\nname: caf\xe9\nrules:\n  - select: {type: Conv2d}\n".encode("latin-1"))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(p))
    msg = str(err.value)
    assert "latin1.yaml" in msg and "UTF-8" in msg and "line 2" in msg and "save it as UTF-8" in msg
    _clean_exit(_cli("recipe", "validate", p))


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    text = "version: 1\nnote_holder:\n" + "".join("  " + line + "\n" for line in _bomb().splitlines())
    text += "rules:\n  - select: {type: Conv2d}\n"
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases"):
        parse_recipe(text, "bomb.yaml")
    assert time.perf_counter() - t0 < 5


def test_alias_bomb_inside_a_valid_field_is_refused_by_validate_and_convert(tmp_path):
    # params: dict[str, Any] accepts anything, so the bomb passes the schema: it must be refused by size
    body = "".join("    " + line + "\n" for line in _bomb().splitlines())
    p = tmp_path / "bomb.yaml"
    p.write_text("version: 1\nrules:\n  - select: {type: Conv2d}\n    params:\n" + body)
    t0 = time.perf_counter()
    r = _cli("recipe", "validate", p)
    _clean_exit(r)
    assert "bomb.yaml" in r.output and "aliases" in r.output and "write the values out" in r.output
    r = _cli("convert", "torchvision:resnet18", "-r", p, "--input-size", 32, "--json", "--no-speed")
    _clean_exit(r)
    assert time.perf_counter() - t0 < 20


def test_small_aliases_are_still_allowed():
    text = "version: 1\ndefaults: {params: &p {attn: ch}, variant: patconv}\nrules:\n  - select: {type: Conv2d}\n"
    text += "    params: *p\n"
    assert load_recipe(text).rules[0].params == {"attn": "ch"}


def test_recursive_alias_is_refused():
    text = "version: 1\nrules:\n  - &r\n    select: {type: Conv2d}\n    params: {self: *r}\n"
    with pytest.raises(RecipeError, match="refers to itself"):
        parse_recipe(text, "loop.yaml")


@pytest.mark.parametrize("depth", [60, 5000])
def test_deeply_nested_recipe_is_refused(tmp_path, depth):
    p = tmp_path / "deep.yaml"
    p.write_text(OK + "    params: {x: " + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(p))
    assert "deep.yaml:4" in str(err.value) and "nested" in str(err.value)
    _clean_exit(_cli("recipe", "validate", p))


# --- recipe values ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1.5", "0", "-0.5", ".nan", "true", "half"])
@pytest.mark.parametrize("where", ["defaults", "rule"])
def test_bad_ratio_is_refused_in_defaults_and_rules(value, where):
    if where == "defaults":
        text = f"version: 1\ndefaults: {{ratio: {value}}}\nrules:\n  - select: {{type: Conv2d}}\n"
        field, line = "defaults.ratio", 2
    else:
        text = f"version: 1\nrules:\n  - select: {{type: Conv2d}}\n    ratio: {value}\n"
        field, line = "rules.0.ratio", 4
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    msg = str(err.value)
    assert f"r.yaml:{line}" in msg and field in msg and "(0, 1]" in msg and "dynamic" in msg, msg


def test_cli_validate_and_convert_refuse_defaults_ratio_out_of_range(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\ndefaults: {ratio: 1.5}\nrules:\n  - select: {type: Conv2d}\n")
    r = _cli("recipe", "validate", p)
    _clean_exit(r)
    assert "defaults.ratio" in r.output
    _clean_exit(_cli("convert", "torchvision:resnet18", "-r", p, "--input-size", 32, "--no-speed"))


@pytest.mark.parametrize(
    "variant,params,expect",
    [
        ("patconv", "{attn: nope}", ["rules.0.params", "attn", "'nope'", "ch, sf"]),
        ("pconv", "{stride_mode: teleport}", ["rules.0.params", "stride_mode", "refuse, pool"]),
        ("pconv", "{forward_mode: fast}", ["forward_mode", "split_cat, slicing"]),
        ("dpconv", "{attn: sf}", ["attn", "identity, ch"]),
        ("ada_pconv", "{routing: random}", ["routing", "soft", "ste"]),
        ("partial_residual", "{read: half}", ["read", "all, group, complement"]),
        ("partial_attention", "{mixer: mlp}", ["mixer", "identity, dwconv"]),
        ("patconv", "{mapping: sparse}", ["mapping", "dense, channelwise"]),
        ("pconv", "{atn: ch}", ["rules.0.params", "no parameter 'atn'", "stride_mode"]),
        ("pat_sp", "{identity_init: maybe}", ["identity_init", "bool"]),
        ("partial_residual", "{offset: half}", ["offset", "float"]),
    ],
)
def test_operator_parameters_are_checked_when_the_recipe_is_validated(variant, params, expect):
    text = f"version: 1\nrules:\n  - select: {{type: Conv2d}}\n    variant: {variant}\n    params: {params}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "p.yaml")
    msg = str(err.value)
    assert "p.yaml:5" in msg
    for part in expect:
        assert part in msg, msg


def test_parameters_of_a_rule_without_variant_are_checked_against_every_operator_taking_them():
    ok = "version: 1\ndefaults: {variant: patconv}\nrules:\n  - select: {type: Conv2d}\n    params: {attn: sf}\n"
    assert load_recipe(ok).rules[0].params == {"attn": "sf"}
    bad = ok.replace("attn: sf", "attn: nope")
    with pytest.raises(RecipeError, match="attn.*'nope'"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no operator takes a parameter 'zzz'"):
        load_recipe(ok.replace("attn: sf", "zzz: 1"))


def test_defaults_params_are_checked_against_the_default_variant():
    text = "version: 1\ndefaults: {variant: pconv, params: {stride_mode: teleport}}\n"
    text += "rules:\n  - select: {type: Conv2d}\n"
    with pytest.raises(RecipeError, match="defaults.params.*stride_mode"):
        load_recipe(text)


def test_every_error_of_a_recipe_is_reported_at_once():
    text = (
        "version: 1\n"
        "defaults: {ratio: 2, variant: pconv3}\n"
        "rules:\n"
        "  - select: {type: Conv2d}\n"
        "    variant: nope\n"
        "  - select: {typo: 1}\n"
        "    ratio: 2\n"
        "  - select: {type: Conv2d}\n"
        "    variant: patconv\n"
        "    params: {attn: nope}\n"
        "ignore: ['re:((']\n"
        "input_size: -5\n"
    )
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "m.yaml")
    msg = str(err.value)
    for part in [
        "defaults.ratio",
        "defaults.variant",
        "rules.0.variant",
        "rules.1.select.typo",
        "rules.1.ratio",
        "rules.2.params",
        "ignore.0",
        "input_size",
    ]:
        assert part in msg, (part, msg)
    assert "8 problems" in msg


def test_bad_regex_in_ignore_is_a_recipe_error_with_its_line():
    text = OK + "ignore:\n  - layer1.*\n  - 're:(('\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "i.yaml")
    assert "i.yaml:6" in str(err.value) and "ignore.1" in str(err.value) and "regular expression" in str(err.value)


def test_bad_input_size_in_a_recipe():
    with pytest.raises(RecipeError, match="input_size.*greater than 0"):
        parse_recipe("version: 1\ninput_size: -5\nrules:\n  - select: {type: Conv2d}\n", "s.yaml")


def test_shipped_recipes_still_validate():
    from partialize.recipe import list_shipped_recipes

    for name in list_shipped_recipes():
        load_recipe(name)


# --- the Python API ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.5, 0, -0.5, math.nan, math.inf, "half", True, [0.5]])
def test_api_ratio_is_validated(ratio):
    model = torchvision.models.resnet18()
    for fn in (partialize.apply, partialize.plan):
        with pytest.raises(RecipeError) as err:
            fn(model, ratio=ratio, input_size=32)
        msg = str(err.value)
        assert "ratio=" in msg and "(0, 1]" in msg and "dynamic" in msg, msg


def test_api_ratio_none_is_the_default_quarter():
    plan = partialize.plan(torchvision.models.resnet18(), ratio=None, input_size=32)
    assert {(e.variant, e.ratio) for e in plan.converted} == {("pconv", 0.25)}


def test_api_unknown_variant_names_the_known_ones():
    with pytest.raises(RecipeError, match="variant='nope'.*pconv"):
        partialize.apply(torchvision.models.resnet18(), variant="nope", input_size=32)


def test_api_valid_ratio_and_variant_still_work():
    model = torchvision.models.resnet18()
    assert len(partialize.plan(model, ratio=0.5, input_size=32).converted) == 13
    assert len(partialize.plan(model, ratio=1 / 8, variant="patconv", input_size=32).converted) == 13


@pytest.mark.parametrize("size", [0, -5, 2.5, "32"])
def test_api_input_size_is_validated(size):
    with pytest.raises(PartializeError, match="input_size"):
        partialize.plan(torchvision.models.resnet18(), input_size=size)


def test_api_model_must_be_a_module():
    with pytest.raises(PartializeError, match="nn.Module"):
        partialize.apply("resnet18")


def test_default_recipe_with_a_bad_api_ratio_is_a_recipe_error_not_a_pydantic_error():
    from partialize.recipe import Recipe

    with pytest.raises(RecipeError, match="defaults.ratio"):
        Recipe.model_validate({"version": 1, "defaults": {"ratio": "half"}, "rules": [{"select": {}}]})


# --- load with the wrong model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory):
    from partialize.base_model import build_model

    conv = partialize.apply(build_model("torchvision:resnet18", num_classes=10), input_size=32)
    return partialize.save(conv, tmp_path_factory.mktemp("ck") / "r18.safetensors")


@pytest.mark.parametrize(
    "model",
    [
        torchvision.models.mobilenet_v2,
        lambda: torchvision.models.resnet18(num_classes=3),
        lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)),
    ],
)
def test_load_with_the_wrong_model_is_a_checkpoint_error(r18_checkpoint, model):
    with pytest.raises(CheckpointError) as err:
        partialize.load(r18_checkpoint, model=model())
    msg = str(err.value)
    assert "r18.safetensors" in msg and "torchvision:resnet18" in msg, msg


def test_load_model_argument_must_be_a_module(r18_checkpoint):
    with pytest.raises(CheckpointError, match="model= must be an nn.Module"):
        partialize.load(r18_checkpoint, model="resnet18")


# --- the CLI's options and arguments ------------------------------------------------------------


@pytest.mark.parametrize(
    "args,option",
    [
        (["convert", "torchvision:resnet18", "--batch", "0"], "--batch"),
        (["convert", "torchvision:resnet18", "--threads", "0"], "--threads"),
        (["convert", "torchvision:resnet18", "--input-size", "-5"], "--input-size"),
        (["convert", "torchvision:resnet18", "--num-classes", "0"], "--num-classes"),
        (["report", "torchvision:resnet18", "--input-size", "-5"], "--input-size"),
        (["report", "torchvision:resnet18", "--batch", "0"], "--batch"),
        (["report", "torchvision:resnet18", "--threads", "0"], "--threads"),
        (["report", "torchvision:resnet18", "--rounds", "0"], "--rounds"),
        (["report", "torchvision:resnet18", "--device", "tpu"], "--device"),
        (["report", "torchvision:resnet18", "--data-limit", "0"], "--data-limit"),
        (["bench", "models", "torchvision:resnet18", "--batch", "0"], "--batch"),
        (["bench", "torchvision:resnet18", "--input-size", "-1"], "--input-size"),
        (["bench", "models", "torchvision:resnet18", "--threads", "-1"], "--threads"),
        (["bench", "ops", "--threads", "0"], "--threads"),
        (["bench", "ops", "--channels", "x"], "--channels"),
        (["bench", "ops", "--channels", "0"], "--channels"),
        (["bench", "ops", "--sizes", ","], "--sizes"),
        (["bench", "ops", "--rounds", "0"], "--rounds"),
        (["export", "m.safetensors", "-f", "onnx", "--batch", "0"], "--batch"),
        (["export", "m.safetensors", "-f", "torchscript", "--input-size", "-5"], "--input-size"),
    ],
)
def test_bad_option_values_are_usage_errors(args, option):
    r = _cli(*args)
    _clean_exit(r)
    assert option in r.output and "Invalid value" in r.output, r.output


def test_convert_weights_of_another_head_says_num_classes(tmp_path):
    w = tmp_path / "w10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), w)
    r = _cli("convert", "torchvision:resnet18", "--weights", w, "--input-size", 32, "--dry-run")
    _clean_exit(r)
    assert "w10.pt" in r.output and "--num-classes 10" in r.output and "fc.weight" in r.output
    r = _cli("convert", "torchvision:resnet18", "--weights", w, "--num-classes", 10, "--input-size", 32, "--dry-run")
    assert r.exit_code == 0, r.output


def test_convert_weights_that_are_not_a_state_dict(tmp_path):
    w = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], w)
    r = _cli("convert", "torchvision:resnet18", "--weights", w, "--dry-run")
    _clean_exit(r)
    assert "not a state_dict" in r.output
    text = tmp_path / "text.pt"  # not a pickle at all: our reason, not torch's advice to drop weights_only
    text.write_text("not a checkpoint")
    r = _cli("convert", "torchvision:resnet18", "--weights", text, "--dry-run")
    _clean_exit(r)
    assert "weights_only=True, so no code in the file runs" in r.output and "weights_only=False" not in r.output


def test_convert_with_a_bad_ignore_regex_fails_before_building_the_model(tmp_path, monkeypatch):
    p = tmp_path / "r.yaml"
    p.write_text(OK + "ignore: ['re:((']\n")
    monkeypatch.setattr("partialize.base_model.build_model", lambda *a, **k: pytest.fail("model built"))
    r = _cli("convert", "torchvision:resnet18", "-r", p, "--dry-run")
    _clean_exit(r)
    assert "r.yaml:4" in r.output and "ignore.0" in r.output


def test_recipe_validate_reports_every_problem(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("version: 1\nrules:\n  - select: {type: Conv2d}\n    variant: nope\n  - select: {typo: 1}\n")
    r = _cli("recipe", "validate", p)
    _clean_exit(r)
    assert "2 problems" in r.output and "rules.0.variant" in r.output and "rules.1.select.typo" in r.output


@pytest.mark.parametrize("cmd", ["report", "bench"])
def test_missing_checkpoint_is_named_as_such(cmd, tmp_path):
    r = _cli(cmd, tmp_path / "nope.safetensors", "--input-size", 32)
    _clean_exit(r)
    assert "nope.safetensors" in r.output and "does not exist" in r.output


def test_report_with_a_folder_for_the_model(tmp_path):
    r = _cli("report", tmp_path, "--input-size", 32, "--no-speed")
    _clean_exit(r)
    assert "is a folder" in r.output


def test_a_key_given_twice_is_refused_not_silently_dropped():
    text = OK + "    params: {attn: ch}\n    params: {attn: sf}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "d.yaml")
    assert "d.yaml:5" in str(err.value) and "'params' appears twice" in str(err.value) and "line 4" in str(err.value)


@pytest.mark.parametrize("cmd", ["convert", "report", "bench"])
def test_a_model_that_cannot_take_the_input_size_is_a_clear_error(cmd):
    extra = {"convert": ["--dry-run"], "report": ["--no-speed"], "bench": ["--rounds", "1"]}[cmd]
    r = _cli(cmd, "vit_tiny_patch16_224", "--input-size", 32, *extra)
    _clean_exit(r)
    assert "does not run at --input-size 32" in r.output and "use --input-size 224" in r.output


def test_a_converted_checkpoint_given_as_plain_weights(r18_checkpoint):
    r = _cli("convert", "torchvision:resnet18", "--weights", r18_checkpoint, "--input-size", 32, "--dry-run")
    _clean_exit(r)
    assert "is a converted partialize model" in r.output and "report/export/finetune" in r.output


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d.update(model=None), "'model'"),
        (lambda d: d["model"].update(macs="lots"), "'model.macs'"),
        (lambda d: d["model"].pop("role"), "'model.role'"),
        (lambda d: d.update(input_size="x"), "'input_size'"),
    ],
)
def test_damaged_report_files_are_report_errors(tmp_path, change, field):
    import json

    from partialize.measure.report import ModelMeasurement, Report

    m = ModelMeasurement(name="a", role="model", params_total=1, params_trainable=1, macs=1.0)
    d = json.loads(Report(model=m, input_size=[3, 32, 32]).to_json())
    change(d)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    r = _cli("compare", p)
    _clean_exit(r)
    assert "r.json" in r.output and field in r.output and "regenerate" in r.output


def test_recipe_dicts_from_python_are_bounded_too():
    loop: dict = {}
    loop["x"] = loop
    bomb: list = [1] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9**9 values when walked, a few hundred objects in memory
    for params, why in ((loop, "contains itself"), ({"attn": bomb}, "more than")):
        rec = {"version": 1, "rules": [{"select": {"type": "Conv2d"}, "params": params}]}
        t0 = time.perf_counter()
        with pytest.raises(RecipeError, match=why):
            load_recipe(rec)
        assert time.perf_counter() - t0 < 5


def test_report_with_a_corrupt_image_in_data_leaves_it_out_and_names_it(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for c in "ab":
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(data / c / f"{i}.png")
    (data / "b" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "r.json"
    r = _cli("report", "torchvision:resnet18", "--input-size", 32, "--no-speed", "--data", data, "--json", out)
    assert r.exit_code == 0, r.output
    acc = json.loads(out.read_text())["model"]
    assert acc["accuracy"]["images"] == 4 and acc["accuracy"]["unreadable"] == 1  # 5 files, 1 unreadable
    note = next(n for n in acc["notes"] if "could not be read" in n)
    assert "broken.png" in note and "1 of 5 images" in note and "over the other 4" in note


def test_report_with_only_unreadable_images_is_a_clean_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    r = _cli("report", "torchvision:resnet18", "--input-size", 32, "--no-speed", "--data", tmp_path)
    _clean_exit(r)
    assert "broken.png" in r.output and "can be read" in r.output
