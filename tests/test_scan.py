"""``partialize scan`` / ``partialize.scan`` and the shipped ``auto`` recipe: the nodes listed are the
ones built, their MACs before and after each operator match counts written out here by hand, and
refusals carry the operator's reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from _helpers import nondegenerate_, rel_err
from click.testing import CliRunner
from timm.layers import Attention, Mlp
from torch import nn

import partialize
from partialize.cli import main
from partialize.errors import PartializeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Net(nn.Module):
    """16x16 input: a strided stem (3 -> 16), a 3x3 conv (16 -> 16) at 8x8, then the 64 tokens of width 16
    through a timm Attention (4 heads), a scale-norm Attention (refused) and a timm Mlp (hidden 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.attn = Attention(16, num_heads=4, qkv_bias=True)
        self.attn_sn = Attention(16, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
        self.mlp = Mlp(16, hidden_features=32)

    def forward(self, x):
        x = self.conv(self.stem(x))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        t = t + self.attn_sn(t)
        return (t + self.mlp(t)).mean(1)


HW, N, C = 8 * 8, 64, 16


def conv_macs(k: int, cin: int, cout: int, pixels: int) -> int:
    return k * k * cin * cout * pixels


def attention_macs(tokens: int, heads: int, head_dim: int, width: int) -> int:
    """qkv (width -> 3 x heads x head_dim) and proj Linears, plus q @ k^T and attn @ v over every head."""
    inner = heads * head_dim
    return tokens * width * 3 * inner + 2 * heads * tokens * tokens * head_dim + tokens * inner * inner


def mlp_macs(tokens: int, width: int, hidden: int) -> int:
    return 2 * tokens * width * hidden


@pytest.fixture(scope="module")
def scanned() -> dict:
    torch.manual_seed(0)
    return partialize.scan(Net().eval(), 16)


def test_scan_lists_exactly_the_built_nodes_by_kind(scanned):
    got = [(n["name"], n["kind"]) for n in scanned["nodes"]]
    assert got == [("stem", "conv"), ("conv", "conv"), ("attn", "attention"), ("attn_sn", "attention"), ("mlp", "mlp")]
    assert scanned["format"] == "partialize.scan" and scanned["version"] == 1
    assert scanned["input_shape"] == [1, 3, 16, 16]
    assert scanned["operators"] == partialize.list_operators()
    assert all(set(n["operators"]) == set(scanned["operators"]) for n in scanned["nodes"])
    s = scanned["summary"]
    assert (s["conv"]["nodes"], s["conv"]["convertible"]) == (2, 2)  # the strided 3 -> 16 stem: partial_kernel
    assert (s["attention"]["nodes"], s["attention"]["convertible"]) == (2, 1)
    assert (s["mlp"]["nodes"], s["mlp"]["convertible"]) == (1, 1)
    # the plain timm Attention is taken by both attention operators; the scale-norm one by neither
    assert s["attention"]["by_operator"] == {"partial_attention": 1, "single_head_attention": 1}


def test_scan_macs_match_a_count_by_hand(scanned):
    nodes = {n["name"]: n for n in scanned["nodes"]}
    assert nodes["stem"]["macs"] == conv_macs(3, 3, 16, HW) == 27_648
    assert nodes["conv"]["macs"] == conv_macs(3, 16, 16, HW) == 147_456
    assert nodes["attn"]["macs"] == attention_macs(N, 4, 4, C) == 196_608
    assert nodes["mlp"]["macs"] == mlp_macs(N, C, 32) == 65_536
    pconv = nodes["conv"]["operators"]["pconv"]  # 1/4: a 3x3 conv on 4 of the 16 channels
    assert (pconv["macs_before"], pconv["macs_after"], pconv["ratio"]) == (147_456, conv_macs(3, 4, 4, HW), 0.25)
    pa = nodes["attn"]["operators"]["partial_attention"]  # 1/4: round(3/4 * 4) = 3 heads keep attention
    assert (pa["macs_before"], pa["macs_after"]) == (196_608, attention_macs(N, 3, 4, 12))
    pm = nodes["mlp"]["operators"]["partial_mlp"]  # 1/2: 8 channels, hidden 16
    assert (pm["macs_before"], pm["macs_after"], pm["ratio"]) == (65_536, mlp_macs(N, 8, 16), 0.5)
    pk = nodes["stem"]["operators"]["partial_kernel"]  # 1 of 3 inputs keeps the 3x3, 2 a centre tap
    assert (pk["macs_before"], pk["macs_after"]) == (27_648, conv_macs(3, 1, 16, HW) + conv_macs(1, 2, 16, HW))
    for op in ("patconv", "dpconv", "ada_pconv"):  # the other conv operators take the 3x3 conv too
        r = nodes["conv"]["operators"][op]
        assert r["converts"] and r["macs_before"] == 147_456 and r["macs_after"] < 147_456 / 2, (op, r)


def test_scan_gives_each_refusal_with_its_reason(scanned):
    nodes = {n["name"]: n for n in scanned["nodes"]}
    for op in ("pconv", "patconv", "dpconv", "ada_pconv"):
        r = nodes["stem"]["operators"][op]
        assert not r["converts"], op
        assert "in_channels (3) != out_channels (16)" in r["reason"] and "stride (2, 2)" in r["reason"]
    assert "scale_norm" in nodes["attn_sn"]["operators"]["partial_attention"]["reason"]
    assert "does not know how to slice a Attention" in nodes["attn"]["operators"]["partial_mlp"]["reason"]
    assert "converts nn.Conv2d layers, got Mlp" in nodes["mlp"]["operators"]["pconv"]["reason"]
    assert "PAT_sp wraps a dense 1x1" in nodes["conv"]["operators"]["pat_sp"]["reason"]
    assert [op for op, r in nodes["stem"]["operators"].items() if r["converts"]] == ["partial_kernel"]


def test_scan_kind_filter_and_errors():
    res = partialize.scan(Net().eval(), 16, kind="attention")
    assert [n["name"] for n in res["nodes"]] == ["attn", "attn_sn"] and res["kinds"] == ["attention"]
    with pytest.raises(PartializeError, match="kind='block'"):
        partialize.scan(Net(), 16, kind="block")
    r = CliRunner().invoke(main, ["scan", "resnet1"])
    assert r.exit_code == 2 and "unknown model 'resnet1'" in r.output and "resnet18" in r.output
    r = CliRunner().invoke(main, ["scan", "vit_tiny_patch16_224", "--input-size", "40"])
    assert r.exit_code != 0 and "does not run at --input-size 40" in r.output


def test_cli_scan_resnet18_writes_versioned_json(tmp_path):
    cmd = [sys.executable, "-m", "partialize", "scan", "resnet18", "--input-size", "64", "--json", "out.json"]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "why not" in res.stdout and "layer1.0.conv1" in res.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    assert (data["format"], data["version"], data["model"]) == ("partialize.scan", 1, "resnet18")
    assert data["input_shape"] == [1, 3, 64, 64] and data["traced"] is True
    s = data["summary"]
    assert (s["conv"]["nodes"], s["mlp"]["nodes"], s["attention"]["nodes"]) == (20, 8, 0)
    assert s["conv"]["by_operator"]["pconv"] == 13  # the 3x3 stride-1 in == out convs
    assert s["mlp"]["by_operator"] == {"partial_residual": 5}  # the identity-shortcut BasicBlocks
    nodes = {n["name"]: n for n in data["nodes"]}
    r = nodes["layer1.0.conv1"]["operators"]["pconv"]
    assert (r["macs_before"], r["macs_after"]) == (conv_macs(3, 64, 64, 16 * 16), conv_macs(3, 16, 16, 16 * 16))
    assert nodes["conv1"]["macs"] == conv_macs(7, 3, 64, 32 * 32)
    assert "in_channels (3) != out_channels (64)" in nodes["conv1"]["operators"]["pconv"]["reason"]
    assert "downsample" in nodes["layer2.0"]["operators"]["partial_residual"]["reason"]
    for n in data["nodes"]:
        assert {"name", "kind", "type", "original", "found", "macs", "calls", "operators"} <= set(n)
        for r in n["operators"].values():
            assert ("macs_after" in r) if r["converts"] else bool(r["reason"])


def test_auto_recipe_validates():
    r = CliRunner().invoke(main, ["recipe", "validate", os.path.join(ROOT, "recipes", "auto.yaml")])
    assert r.exit_code == 0 and "valid recipe auto (6 rules)" in r.output, r.output
    r = CliRunner().invoke(main, ["recipe", "list"])
    assert "auto " in r.output


def test_auto_converts_vit_tiny_attention_and_mlp():
    """vit_tiny at 64 px (17 tokens, width 192, 3 heads, MLP 768): every block's attention keeps 2 of its
    3 heads (1/4, rounded) and every MLP runs on 96 channels with hidden 384 (1/2); the MACs saved
    equal the count by hand, and the deployed model equals the converted one in eval."""
    model = nondegenerate_(timm.create_model("vit_tiny_patch16_224", img_size=64).eval())
    plan = partialize.plan(model, "auto")
    kinds = sorted({(e.layer.split(".")[-1], e.variant) for e in plan.converted})
    assert kinds == [("attn", "partial_attention"), ("mlp", "partial_mlp")]
    assert len(plan.converted) == 24 and not plan.skipped
    t, w = 17, 192
    block_before = attention_macs(t, 3, 64, w) + mlp_macs(t, w, 768)
    block_after = attention_macs(t, 2, 64, 128) + mlp_macs(t, 96, 384)  # on the 128 attended channels
    assert plan.macs_before - plan.macs_after == 12 * (block_before - block_after)
    converted = nondegenerate_(partialize.apply(model, plan.recipe), seed=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, orig = converted.eval()(x), model(x)
        assert rel_err(partialize.deploy(converted)(x), ref) < 1e-4
        assert rel_err(ref, orig) > 0.05  # converted: not the original's function (the check can fail)


def test_attention_nodes_are_found_by_name_whatever_the_suffix():
    """ConViT's GPSA / MHSA and timm's AttentionRope are attention nodes (they used to be listed as
    MLP-like, the kind scan gives any other block an operator accepts); channel gates named for
    attention (ResNeSt's SplitAttn, SKNet's SelectiveKernelAttn) are not."""
    from partialize.engine.scan import is_attention_name

    for name in ("GPSA", "MHSA", "AttentionRope", "WindowAttention", "LocallyGroupedAttn", "XCA", "AttentionCl"):
        assert is_attention_name(name), name
    for name in ("SplitAttn", "SelectiveKernelAttn", "GaussianChannelAttention", "Mlp", "Bottleneck"):
        assert not is_attention_name(name), name
