"""Recipe precedence is torch.ao's: the most specific rule that names a variant decides it, and only
the ratio and params given for that variant apply (issue 12 §4)."""

from __future__ import annotations

import pytest
import timm

import partialize
from partialize.errors import RecipeError


@pytest.fixture(scope="module")
def model():
    return timm.create_model("resnet18")


def _entries(plan):
    return {e.layer: e for e in plan.converted}


def test_params_for_one_variant_never_reach_a_layer_another_rule_converts_otherwise(model):
    recipe = {
        "version": 1,
        "rules": [
            {"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "variant": "patconv", "params": {"attn": "sf"}},
            {"select": {"name": "layer1.0.conv1"}, "variant": "pconv", "ratio": 0.5},
        ],
    }
    plan = partialize.plan(model, recipe, input_size=32)  # merged, this was pconv(attn=sf): a RecipeError
    by = _entries(plan)
    assert by["layer1.0.conv1"].variant == "pconv" and by["layer1.0.conv1"].ratio == 0.5
    assert "attn" not in by["layer1.0.conv1"].params
    assert by["layer1.0.conv2"].variant == "patconv" and by["layer1.0.conv2"].params["attn"] == "sf"
    assert by["layer1.0.conv2"].ratio == 0.25  # the name rule's ratio is for pconv only


def test_a_rule_without_variant_is_for_the_defaults_variant(model):
    recipe = {
        "version": 1,
        "defaults": {"variant": "patconv", "params": {"attn": "ch"}},
        "rules": [
            {"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "ratio": 0.5},
            {"select": {"name": "layer2.*"}, "variant": "pconv"},
        ],
    }
    by = _entries(partialize.plan(model, recipe, input_size=32))
    assert by["layer1.0.conv1"].variant == "patconv" and by["layer1.0.conv1"].ratio == 0.5
    assert by["layer1.0.conv1"].params["attn"] == "ch"
    # layer2: pconv decides; the defaults' params and the ratio rule are for patconv
    assert by["layer2.1.conv1"].variant == "pconv" and by["layer2.1.conv1"].ratio == 0.25
    assert "attn" not in by["layer2.1.conv1"].params


def test_exact_name_beats_glob_beats_type_and_file_order_breaks_ties(model):
    recipe = {
        "version": 1,
        "rules": [
            {"select": {"name": "layer3.0.conv2"}, "variant": "skip"},
            {"select": {"name": "layer3.*"}, "variant": "patconv"},
            {"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "variant": "pconv"},
            {"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "variant": "dpconv"},
        ],
    }
    plan = partialize.plan(model, recipe, input_size=32)
    by = {e.layer: e for e in plan.entries}
    assert by["layer3.0.conv2"].status == "skip" and by["layer3.0.conv2"].reason == "the recipe says skip"
    assert by["layer3.1.conv1"].variant == "patconv"
    assert by["layer1.0.conv1"].variant == "dpconv"  # the later of two equal type rules


def test_a_ratio_word_the_chosen_variant_does_not_take_names_the_layer_and_rule(model):
    recipe = {
        "version": 1,
        "defaults": {"ratio": "adaptive"},
        "rules": [{"select": {"type": "Conv2d", "kernel": 3, "stride": 1}, "variant": "patconv"}],
    }
    with pytest.raises(RecipeError, match=r"layer 'layer1.0.conv1': ratio 'adaptive' does not apply to variant "
                       r"'patconv' \(chosen by rules\[0\]"):  # fmt: skip
        partialize.plan(model, recipe, input_size=32)


def test_a_cycle_param_gives_the_converted_layers_its_values_in_turn(model):
    """``{cycle: [a, b]}``: the layers the rule selects take a, b, a... in definition order, the refused
    stride-2 blocks too (so a value the operator always refuses cannot stall the cycle); each value is
    checked like a plain one, and the plan records the concrete value."""
    recipe = {
        "version": 1,
        "rules": [
            {
                "select": {"type": "BasicBlock"},
                "variant": "partial_residual",
                "params": {"offset": {"cycle": [0.0, 0.5]}, "read": "complement"},
                "ratio": 0.5,
            }
        ],
    }
    plan = partialize.plan(model, recipe, input_size=32)
    got = [(e.layer, e.params["offset"]) for e in plan.converted]
    # turns: layer1.0 0, layer1.1 0.5, layer2.0 0 (refused), layer2.1 0.5, layer3.0 0 (refused), ...
    assert got == [("layer1.0", 0.0), ("layer1.1", 0.5), ("layer2.1", 0.5), ("layer3.1", 0.5), ("layer4.1", 0.5)]
    assert {e.layer for e in plan.skipped} == {"layer2.0", "layer3.0", "layer4.0"}  # projection shortcuts
    bad_values = (
        ({"cycle": []}, "non-empty list"),
        ({"cycle": [0.0, "half"]}, "'half' is not a valid"),
        ({"cycle": [0.0, {"cycle": [0.5]}]}, "cannot be cycles"),
    )
    for bad, match in bad_values:
        recipe["rules"][0]["params"]["offset"] = bad
        with pytest.raises(RecipeError, match=match):
            partialize.plan(model, recipe, input_size=32)
