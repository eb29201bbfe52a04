"""Measurement: MAC counts against hand formulas and published figures, dynamic operators, reports
(JSON round trip, compare errors, plot), accuracy and the pruning baseline."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _helpers import hooked_macs
from click.testing import CliRunner
from PIL import Image
from torch import nn

from partialize.cli import main
from partialize.measure.accuracy import DataError, evaluate_accuracy
from partialize.measure.flops import count_params, macs_breakdown, model_macs
from partialize.measure.pruning import prune_to_macs
from partialize.measure.render import plot_entries, render_report_table, report_markdown
from partialize.measure.report import (
    Report,
    ReportError,
    build_report,
    check_compatible,
    compare_entries,
)
from partialize.ops import (
    AdaPConv,
    DPConv,
    PartialSelfAttention,
    PartialSpatialAttention,
    PATConv,
    PConv,
)

# --- hand-computed counts ---------------------------------------------------------------------------


def test_conv_linear_counts_match_formulas():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),  # 8 * 3 * 9 * 16 * 16
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 8 * 2 * 9 * 8 * 8
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),  # 512 * 10
    )
    expected = 8 * 3 * 9 * 256 + 8 * 2 * 9 * 64 + 512 * 10
    x = torch.randn(1, 3, 16, 16)
    assert model_macs(model, x) == expected
    assert count_params(model) == (8 * 27 + 8) + (8 * 2 * 9 + 8) + (5120 + 10)


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _SDPAMasked(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def test_sdpa_counts_two_matmuls():
    b, h, nq, nk, d, dv = 2, 3, 10, 12, 16, 8
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, dv)
    expected = b * h * nq * nk * d + b * h * nq * nk * dv
    assert model_macs(_SDPA(), (q, k, v)) == expected
    # the same on every attention kernel: the math path (a mask and dropout force it) included
    mask = torch.zeros(nq, nk)
    assert model_macs(_SDPAMasked(mask), (q, k, v)) == expected


def test_partial_self_attention_count():
    c, hw = 96, 7
    n = hw * hw
    attn = PartialSelfAttention(c).eval()
    # qkv linear + q k^T + attn v (sdpa); the LayerNorm is not a MAC (partialize.macs)
    expected = n * c * 3 * c + 2 * n * n * c
    assert model_macs(attn, torch.randn(1, c, hw, hw)) == expected


def test_pconv_and_patconv_counts():
    c, hw = 64, 14
    n, rest = 16, 48
    x = torch.randn(1, c, hw, hw)
    conv = n * n * 9 * hw * hw
    assert model_macs(PConv(c, 0.25), x) == conv
    assert model_macs(PConv(c, 0.25).deploy(), x) == conv
    ch = PATConv(c, 0.25, "ch").eval()
    # PAT_ch: dense map from 2 * rest statistics to rest gates (its BN is not a MAC, folded or not)
    assert model_macs(ch, x) == conv + 2 * rest * rest
    assert model_macs(ch.deploy(), x) == conv + 2 * rest * rest
    sf = PATConv(c, 0.25, "sf").eval()
    t = hw * hw
    assert model_macs(sf, x) == conv + t * rest * 3 * rest + 2 * t * t * rest


def test_pat_sp_counts_train_and_merged():
    hidden, c, hw = 128, 64, 14
    sp = PartialSpatialAttention.from_module(nn.Conv2d(hidden, c, 1, bias=False), 0.5).eval()
    h = torch.randn(1, hidden, hw, hw)
    # MLP conv + one-channel gate conv over the 32 reweighted channels
    assert model_macs(sp, h) == c * hidden * hw * hw + 32 * hw * hw
    # merged: one 1x1 conv with C + 1 outputs
    assert model_macs(sp.deploy(), h) == (c + 1) * hidden * hw * hw


def test_dpconv_counts_realised_width_not_masked_conv():
    c, hw = 64, 14
    dp = DPConv(c, attn="ch", init_ratio=0.25).eval()
    n = dp.num_conv_channels
    assert n == 16
    r = macs_breakdown(dp, (c, hw, hw), crosscheck=False)
    expected = n * n * 9 * hw * hw + 2 * (c - n) * (c - n)
    assert r["total"] == expected
    # the training form runs the masked full conv; the count is of the inference form
    assert model_macs(dp, torch.randn(1, c, hw, hw)) > c * c * 9 * hw * hw
    assert r["dynamic"][""]["macs"] == expected
    # what is counted is what deploy() runs
    assert model_macs(dp.deploy(), torch.randn(1, c, hw, hw)) == expected
    d = r["dynamic"][""]
    assert (d["width"], d["channels"], d["realised_ratio"], d["input_hw"]) == (16, 64, 0.25, [hw, hw])


def test_dpconv_channelwise_attention_macs():
    """mapping="channelwise": each of the C - n gates maps its own [mean, std], 2 MACs per gate."""
    c, hw = 64, 14
    dp = DPConv(c, attn="ch", mapping="channelwise", init_ratio=0.25).eval()
    n = dp.num_conv_channels
    r = macs_breakdown(dp, (c, hw, hw), crosscheck=False)
    assert 2 * (c - n) == 96
    assert r["total"] == n * n * 9 * hw * hw + 2 * (c - n)
    assert sum(p.numel() for p in dp.attn.fc.parameters()) == 3 * c  # W in R^{C x 2} + bias: 2 MACs a gate
    ident = DPConv(c, attn="identity", init_ratio=0.25).eval()
    assert macs_breakdown(ident, (c, hw, hw), crosscheck=False)["total"] == n * n * 9 * hw * hw


def _routed_ada(c: int) -> AdaPConv:
    """Ada-PConv whose router sends inputs with positive mean to branch 2, negative to branch 0."""
    ada = AdaPConv(c).deploy()
    with torch.no_grad():
        ada.router.weight.zero_()
        ada.router.weight[2].fill_(10.0)
        ada.router.weight[0].fill_(-10.0)
    return ada


def test_adapconv_expected_macs_from_histogram():
    c, hw = 64, 8
    ada = _routed_ada(c)
    calib = torch.cat([torch.randn(3, c, hw, hw) + 2, torch.randn(5, c, hw, hw) - 2])
    r = macs_breakdown(ada, (c, hw, hw), calibration=calib, crosscheck=False)
    d = r["dynamic"][""]
    assert d["histogram"] == [5, 0, 3]
    widths = [8, 16, 32]
    branch = [w * w * 9 * hw * hw for w in widths]
    router = c * 3
    assert r["total"] == pytest.approx(router + (5 * branch[0] + 3 * branch[2]) / 8)
    assert d["realised_ratio"] == pytest.approx((5 * 8 + 3 * 32) / 8 / c)
    assert d["macs"] == pytest.approx(r["total"])
    # a soft-routed (training) layer is counted in its inference form: hard routing, same figure
    ada.routing = "soft"
    assert macs_breakdown(ada, (c, hw, hw), calibration=calib, crosscheck=False)["total"] == r["total"]


# published totals of torchvision's classifiers (their weights' metadata, ``_ops`` in GMACs): an
# independent count, made by torchvision, of every family the suite converts
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "convnext_tiny", "vit_b_16", "swin_t", "efficientnet_b0"])
def test_totals_match_torchvision_published_gmacs(name):
    model = torchvision.models.get_model(name)
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"]
    x = torch.randn(1, 3, 224, 224)
    assert model_macs(model, x) / 1e9 == pytest.approx(published, abs=6e-4)  # published to 3 decimals
    with torch.inference_mode():  # composite ops (conv2d, linear, sdpa) reach the counter whole here
        assert model_macs(model, x) / 1e9 == pytest.approx(published, abs=6e-4)
    if name == "vit_b_16":  # nn.MultiheadAttention's fast path: the plan counts it too
        import partialize

        assert partialize.plan(model).macs_before / 1e9 == pytest.approx(published, abs=6e-4)


def test_vit_tiny_counts_attention_arithmetic():
    """timm ViT-Ti/16 at 224 (SDPA attention), counted by hand: patch embedding, 12 blocks of qkv,
    q k^T, attn v, proj, fc1, fc2 on 197 tokens of width 192 (3 heads of 64), the head."""
    t, c, blocks = 197, 192, 12
    block = t * c * 3 * c + 2 * t * t * c + t * c * c + 2 * t * c * 4 * c
    expected = 196 * c * 3 * 16 * 16 + blocks * block + c * 1000
    model = timm.create_model("vit_tiny_patch16_224")
    assert model_macs(model, torch.randn(1, 3, 224, 224)) == expected
    import partialize

    assert partialize.plan(model).macs_before == expected


class _Reused(nn.Module):
    """A user model that calls one block twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


def test_a_module_called_twice_counts_twice_in_plan_and_report():
    import partialize

    m, s = _Reused(), 16
    stem, block = 32 * 3 * 9 * s * s, 32 * 32 * 9 * s * s
    plan = partialize.plan(m, input_size=s)
    assert plan.macs_before == stem + 2 * block
    assert plan.macs_after == stem + 2 * (8 * 8 * 9 * s * s)  # PConv 1/4 on both calls
    converted = partialize.apply(m, input_size=s)
    assert macs_breakdown(converted, s, crosscheck=False)["total"] == plan.macs_after
    assert hooked_macs(partialize.deploy(converted), torch.randn(1, 3, s, s)) == plan.macs_after


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050", "convnext_atto"])
def test_plan_convert_and_report_agree(name):
    """One counter: the plan's before/after, the report of the original and of the converted model."""
    import partialize

    model = timm.create_model(name)
    plan = partialize.plan(model, input_size=64)
    converted = partialize.apply(model, input_size=64)
    assert macs_breakdown(model, 64, crosscheck=False)["total"] == plan.macs_before
    assert macs_breakdown(converted, 64, crosscheck=False)["total"] == plan.macs_after
    if name != "convnext_atto":  # convs and linears only: the hook count is an independent oracle
        x = torch.randn(1, 3, 64, 64)
        assert hooked_macs(model, x) == plan.macs_before
        assert hooked_macs(partialize.deploy(converted), x) == plan.macs_after


def test_flop_counter_is_a_reported_cross_check_not_the_count():
    """On this torch, flop_counter may or may not see CPU attention; the report carries its figure
    and the difference, and the count itself is ours whatever it says."""
    model = timm.create_model("vit_tiny_patch16_224")
    r = macs_breakdown(model, 224)
    assert r["total"] == model_macs(model, torch.randn(1, 3, 224, 224))
    if r["flop_counter"] is not None:
        assert r["crosscheck_rel_diff"] == pytest.approx((r["total"] - r["flop_counter"]) / r["flop_counter"])


def test_uncounted_contractions_are_listed_not_silently_zero():
    from partialize.macs import count_macs

    class Int8Linear(nn.Module):  # a weight-only int8 matmul: no formula in partialize.macs
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randint(-8, 8, (16, 32), dtype=torch.int8))
            self.register_buffer("scales", torch.ones(16))

        def forward(self, x):
            return torch.ops.aten._weight_int8pack_mm(x, self.w, self.scales)

    r = count_macs(Int8Linear(), torch.randn(4, 32))
    assert r.total == 0 and r.uncounted == {"aten::_weight_int8pack_mm": 1}
    # a GRU runs as addmm products and is counted: 5 steps x (input and hidden maps, 3 gates x 8 x 8)
    assert count_macs(nn.GRU(8, 8, batch_first=True), torch.randn(1, 5, 8)).total == 5 * 2 * 24 * 8


# --- reports ------------------------------------------------------------------------------------


def _tiny(partial: bool = False) -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    if partial:
        m[3] = PConv.from_module(m[3], 0.25)
    return m.eval()


def _tiny_macs(partial: bool, s: int = 32) -> int:
    stem = 32 * 3 * 9 * s * s
    mid = (8 * 8 if partial else 32 * 32) * 9 * s * s
    return stem + mid + 32 * 5  # BN, ReLU and pooling are not MACs


@pytest.fixture(scope="module")
def tiny_report() -> Report:
    torch.manual_seed(0)
    return build_report(
        _tiny(True), name="tiny-pconv", input_size=32, baseline=_tiny(False), baseline_name="tiny", rounds=2
    )


def test_report_numbers_and_ratios(tiny_report):
    r = tiny_report
    assert r.model.macs == _tiny_macs(True)
    assert r.baseline.macs == _tiny_macs(False)
    assert r.ratios["tiny-pconv"]["macs"] == pytest.approx(_tiny_macs(True) / _tiny_macs(False))
    # conv 3->32 (864) + BN (64) + PConv 8x8 3x3 (576) + linear 32->5 with bias (165)
    assert r.model.params_total == 864 + 64 + 576 + 165
    conv_row = next(row for row in r.model.layers if row["name"] == "3")
    assert (conv_row["type"], conv_row["partial"], conv_row["params"]) == ("PConv", True, 8 * 8 * 9)
    assert conv_row["macs"] == 8 * 8 * 9 * 32 * 32
    assert r.speed_conditions["threads"] == 1 and r.speed_conditions["batch"] == 16
    lat, tp = r.model.speed["latency_ms"], r.model.speed["throughput_ips"]
    assert lat["median"] > 0 and tp["median"] > 0
    assert r.model.accuracy is None and any("accuracy not measured" in n for n in r.model.notes)
    assert "multiply-adds" in r.units["macs"]


def test_report_json_round_trip(tiny_report, tmp_path):
    path = tmp_path / "r.json"
    tiny_report.to_json(path)
    back = Report.from_json(str(path))
    assert back == tiny_report
    assert json.loads(path.read_text())["schema_version"] == 1
    assert Report.from_json(back.to_json()) == tiny_report


def test_report_json_rejects_other_versions(tiny_report):
    d = tiny_report.to_dict()
    d["schema_version"] = 99
    with pytest.raises(ReportError, match="schema version 99"):
        Report.from_dict(d)
    with pytest.raises(ReportError, match="not a partialize report"):
        Report.from_json('{"a": 1}')


def test_report_markdown_and_table_state_units(tiny_report):
    md = report_markdown(tiny_report)
    assert "multiply-adds" in md and "not measured" in md
    assert f"{_tiny_macs(True) / 1e9:.3f}" in md
    assert "| 3 | Conv2d | PConv |" in md  # converted layer, before and after
    table = render_report_table(tiny_report)
    assert [c.header for c in table.columns] == ["metric", "tiny-pconv", "tiny"]
    assert "multiply-adds" in str(table.caption)


def _copy(report: Report) -> Report:
    return Report.from_json(report.to_json())


def test_compare_refuses_incompatible_reports(tiny_report):
    other = _copy(tiny_report)
    other.units["macs"] = "FLOPs (2 per multiply-add)"
    with pytest.raises(ReportError, match="macs units differ"):
        check_compatible([tiny_report, other])
    other = _copy(tiny_report)
    other.input_size = [3, 64, 64]
    with pytest.raises(ReportError, match="different input sizes"):
        check_compatible([tiny_report, other])
    other = _copy(tiny_report)
    other.speed_conditions["threads"] = 4
    with pytest.raises(ReportError, match="different threads"):
        check_compatible([tiny_report, other])
    other = _copy(tiny_report)
    other.speed_conditions["allocator"] = "reuse" if tiny_report.speed_conditions["allocator"] != "reuse" else "system"
    with pytest.raises(ReportError, match="different allocator"):  # freed-memory reuse moves times 20-27%
        check_compatible([tiny_report, other])
    acc = {"top1": 50.0, "top5": 90.0, "images": 80, "classes": 10, "data": "/d/val"}
    a, b = _copy(tiny_report), _copy(tiny_report)
    a.model.accuracy, b.model.accuracy = dict(acc), dict(acc, images=280, top1=40.0)
    with pytest.raises(ReportError, match="accuracy was measured on other images.*images 80 vs 280"):
        check_compatible([a, b])
    b.model.accuracy = dict(acc, data="/elsewhere/val")  # the same data in another place is fine
    check_compatible([a, b])
    other = _copy(tiny_report)
    other.model.macs *= 2
    with pytest.raises(ReportError, match="two different models are both called 'tiny-pconv'"):
        compare_entries([tiny_report, other])
    check_compatible([tiny_report, _copy(tiny_report)])  # identical conditions are fine


def test_compare_cli_error_and_plot(tiny_report, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    tiny_report.to_json(a)
    other = _copy(tiny_report)
    other.units["macs"] = "GFLOPs"
    other.to_json(b)
    res = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert res.exit_code == 2 and "units differ" in res.output
    plot, md = tmp_path / "p.png", tmp_path / "c.md"
    res = CliRunner().invoke(main, ["compare", str(a), "--plot", str(plot), "--md", str(md)])
    assert res.exit_code == 0, res.output
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "GMACs per image" in res.output  # no accuracy: MACs vs throughput
    assert f"{_tiny_macs(False) / _tiny_macs(True):.2f}x" in md.read_text()


def test_plot_needs_something_to_plot(tiny_report, tmp_path):
    from partialize.errors import PartializeError

    entries = compare_entries([tiny_report], with_speed=False)
    with pytest.raises(PartializeError, match="nothing to plot"):
        plot_entries(entries, str(tmp_path / "x.png"))


# --- accuracy -------------------------------------------------------------------------------------


class _Brightness(nn.Module):
    """Predicts class 1 for bright images, class 0 for dark ones (mean over the normalised image)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2, 3))[:, None])


def _image_folder(root, layout: dict[str, list[int]]) -> None:
    for cls, values in layout.items():
        (root / cls).mkdir(parents=True)
        for i, v in enumerate(values):
            Image.new("RGB", (40, 40), (v, v, v)).save(root / cls / f"{i}.png")


def test_accuracy_on_image_folder(tmp_path):
    # class "dark" holds 3 dark images and 1 bright (wrong); class "light" 2 bright images
    _image_folder(tmp_path / "val", {"dark": [10, 20, 30, 250], "light": [240, 250]})
    acc = evaluate_accuracy(_Brightness(), str(tmp_path), batch=4, input_size=32)
    assert acc["images"] == 6 and acc["classes"] == 2
    assert acc["top1"] == pytest.approx(100 * 5 / 6)
    assert acc["top5"] == 100.0  # only two classes: top-5 is top-2
    assert acc["data"].endswith("val")


def test_report_with_data_measures_accuracy(tmp_path):
    _image_folder(tmp_path, {"dark": [10, 20], "light": [200, 30]})
    r = build_report(_Brightness(), name="b", input_size=32, speed=False, data=str(tmp_path))
    assert r.model.accuracy["top1"] == 75.0
    assert "| 75.00 | 100.00 |" in report_markdown(r)


# --- pruning baseline ---------------------------------------------------------------------------


def test_pruning_baseline_reaches_target_macs():
    model = timm.create_model("resnet18", pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    before = model_macs(model, x)
    target = 0.55 * before
    pruned, info = prune_to_macs(model, target, 64)
    reached = model_macs(pruned, x)
    assert abs(reached - target) / target <= 0.05
    assert reached == info["reached_macs"]
    assert model_macs(model, x) == before  # the original is untouched
    assert pruned(x).shape == (1, 1000)  # classifier kept


# --- CLI: bench and checkpoints -------------------------------------------------------------------


def test_bench_models_shorthand(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "resnet10t", "resnet18", "--input-size", "32", "--rounds", "2", "--batch", "2"]
    res = CliRunner().invoke(main, args + ["--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    r10 = timm.create_model("resnet10t")
    assert data["models"]["resnet10t"]["params"] == sum(p.numel() for p in r10.parameters())
    assert data["models"]["resnet10t"]["macs"] == hooked_macs(r10, torch.randn(1, 3, 32, 32))
    assert data["conditions"]["threads"] == 1 and data["conditions"]["batch"] == 2
    m = data["models"]  # the printed ratio is the second model's throughput over the first's
    ratio = m["resnet18"]["throughput_ips"]["median"] / m["resnet10t"]["throughput_ips"]["median"]
    assert f"{ratio:.2f}x" in res.output
    assert "input 32x32; batch 2" in " ".join(res.output.split())  # the caption says what was timed


def test_report_cli_unknown_model_is_friendly():
    res = CliRunner().invoke(main, ["report", "resnet_does_not_exist", "--no-speed"])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_report_on_checkpoint_path(tmp_path):
    import partialize
    import partialize.serialization as io

    model = timm.create_model("resnet18", pretrained=False)
    converted = partialize.apply(model, ratio=0.25)
    ckpt = io.save(converted, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["report", str(ckpt), "--no-speed", "--input-size", "64", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = Report.from_json(str(out))
    assert rep.model.macs == hooked_macs(partialize.deploy(converted), torch.randn(1, 3, 64, 64))


def test_bench_ops_restores_thread_count():
    from partialize.measure.opbench import bench_ops

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = bench_ops(channels=(8,), sizes=(8,), batches=(1,), threads=1, rounds=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {r.op for r in rows} >= {"dense3x3", "pconv(slicing)"}
    dense = next(r for r in rows if r.op == "dense3x3")
    for r in rows:  # each ratio is that operator's time over the dense conv's, measured in the same run
        assert r.vs_dense == pytest.approx(r.ms / dense.ms)


def test_calibration_batch_samples_across_classes(tmp_path):
    """The ImageFolder is sorted by class: the first 6 images would all be class "a" (dark)."""
    from partialize.measure.accuracy import calibration_batch

    _image_folder(tmp_path, {"a": [10] * 10, "b": [240] * 10})
    x = calibration_batch(_Brightness(), str(tmp_path), n=6, input_size=32)
    assert x.shape == (6, 3, 32, 32)
    bright = int((x.mean(dim=(1, 2, 3)) > 0).sum())
    assert 0 < bright < 6  # both classes are represented
    assert torch.equal(x, calibration_batch(_Brightness(), str(tmp_path), n=6, input_size=32))  # seeded
    assert not torch.equal(x, calibration_batch(_Brightness(), str(tmp_path), n=6, input_size=32, seed=1))


def test_accuracy_limit_samples_across_classes(tmp_path):
    """A model that always says "dark": on the first 4 images (all dark) it would score 100%."""
    from partialize.measure.accuracy import sample_indices

    class AlwaysDark(_Brightness):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    _image_folder(tmp_path, {"dark": [10, 20, 30, 40, 50], "light": [200, 210, 220, 230, 240]})
    acc = evaluate_accuracy(AlwaysDark(), str(tmp_path), batch=3, input_size=32, limit=4)
    picked = sample_indices(10, 4)
    n_dark = sum(i < 5 for i in picked)
    assert acc["images"] == 4 and 0 < n_dark < 4  # the sample spans both classes
    assert acc["top1"] == pytest.approx(100 * n_dark / 4)
    assert evaluate_accuracy(AlwaysDark(), str(tmp_path), input_size=32)["top1"] == 50.0


def test_accuracy_class_count_mismatch_is_reported(tmp_path):
    _image_folder(tmp_path, {"a": [10], "b": [240], "c": [120]})
    with pytest.raises(DataError, match="2 outputs but .* has 3 class folders"):
        evaluate_accuracy(_Brightness(), str(tmp_path), input_size=32)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.warns(UserWarning, match="10 outputs but .* has 3 class folders"):
        acc = evaluate_accuracy(wide, str(tmp_path), input_size=32)
    assert acc["images"] == 3


def test_speed_protocol_deployed_forms_warmup_by_time_noise_flag_and_fingerprint():
    from partialize.measure.speed import measure_speed, time_side_by_side

    calls = {"a": 0}

    def fn():
        calls["a"] += 1

    t = time_side_by_side({"a": fn}, rounds=3, warmup=1, warmup_s=0.05, min_round_s=0.001)["a"]
    assert t.warmup_calls > 1 and t.warmup_calls + 1 + 3 * t.calls_per_round == calls["a"]  # warmed by time
    res = measure_speed({"m": _tiny(True)}, 32, batch=2, rounds=3, min_round_s=0.001)
    cond = res["conditions"]
    assert cond["form"].startswith("deployed") and cond["environment"]["torch_threads"] == 1
    assert cond["environment"]["torch"] == torch.__version__
    lat = res["models"]["m"]["latency_ms"]
    assert lat["noisy"] == (lat["iqr"] > 0.05 * lat["median"])


def test_op_self_times_names_the_ops_that_ran():
    """A conv + ReLU model: the profile holds a convolution and a ReLU op and no matrix product."""
    from partialize.measure.speed import op_self_times

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    times = op_self_times(m, torch.randn(2, 3, 16, 16), calls=2, warmup=1)
    assert any("conv" in k for k in times) and any("relu" in k or "clamp" in k for k in times)
    assert not any(k.endswith(("::mm", "::addmm", "::bmm")) for k in times)
    assert all(v >= 0 for v in times.values())


def test_a_buffer_replaced_in_forward_is_not_read_elsewhere():
    """ConViT's GPSA replaces a buffer in its forward; the old tensor was freed, a temporary in the next
    block could take its id(), and the counter said that block read GPSA's weights, so the planner
    refused 4 of ConViT-Tiny's 12 attention layers. The counter holds what it owns while it counts."""
    from partialize.macs import count_macs

    class Replaces(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(1, 1, 1, 3))

        def forward(self, x):
            self.cache = torch.ones(1, 1, 1, 3)  # as GPSA's rel_indices: a new tensor each call
            return x * 2

    class Temporaries(nn.Module):
        def forward(self, x):
            return sum(torch.ones(1, 1, 1, 3).sum() * 0 for _ in range(50)) + x

    model = nn.Sequential(*[m for _ in range(8) for m in (Replaces(), Temporaries())])
    assert count_macs(model, torch.randn(2, 3), per_module=True).used_outside == {}

    # and a real read from outside is still seen: a parent that uses its child's weight itself
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(x, self.fc.weight)

    assert "fc" in count_macs(Reads(), torch.randn(2, 3), per_module=True).used_outside


def test_report_fine_tunes_the_pruning_baseline_before_its_accuracy(tmp_path):
    """--pruning-finetune: the pruned baseline is trained (KD from the baseline) on DIR/train, then its
    accuracy is measured; the settings and the accuracy before the fine-tune are in the JSON."""
    from partialize.train.data import digits_tensors, write_image_folder

    xt, yt, xv, yv = digits_tensors(size=16)
    write_image_folder(str(tmp_path / "data"), xt[:128], yt[:128], "train")
    write_image_folder(str(tmp_path / "data"), xv[:48], yv[:48], "val")
    ckpt = tmp_path / "r18.safetensors"
    r = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "10", "--input-size", "16",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "report.json"
    args = ["report", str(ckpt), "--baseline", "torchvision:resnet18", "--num-classes", "10", "--input-size", "16",
            "--pruning-baseline", "--pruning-finetune", "1", "--ft-batch", "32", "--data", str(tmp_path / "data"),
            "--no-speed", "--json", str(out)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    ft = doc["pruning"]["finetune"]
    assert ft["epochs"] == 1 and ft["batch_size"] == 32 and ft["train_images"] == 128
    assert ft["train_loss"] is not None and ft["train_loss"] > 0
    pruned = doc["pruned"]
    assert pruned["accuracy"]["top1"] is not None and ft["top1_before"] is not None
    assert any("fine-tuned 1 epoch" in n for n in pruned["notes"])
    # without a fine-tune the pruned accuracy stays unmeasured, and the flags are checked
    base = ["report", str(ckpt), "--baseline", "torchvision:resnet18", "--num-classes", "10", "--no-speed"]
    bad = CliRunner().invoke(main, [*base, "--pruning-finetune", "1", "--data", str(tmp_path / "data")])
    assert bad.exit_code != 0 and "--pruning-baseline" in bad.output
    nodir = CliRunner().invoke(
        main, [*base, "--pruning-baseline", "--pruning-finetune", "1", "--train-data", str(tmp_path / "nope")]
    )
    assert nodir.exit_code != 0 and "nope" in nodir.output


def test_pairwise_distances_count_one_reduction_per_output():
    """torch.cdist dispatches _cdist_forward (p != 2, or small inputs) or _euclidean_dist: each output
    distance is an M-long reduction. Hand count: batch x P x R x M; it was 0 and not listed."""
    from partialize.macs import count_macs

    class Dist(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, a, b):
            return torch.cdist(a, b, p=self.p)

    a, b = torch.randn(2, 30, 8), torch.randn(2, 40, 8)
    for p in (1.0, 2.0):
        r = count_macs(Dist(p), a, b)
        assert r.total == 2 * 30 * 40 * 8 and not r.uncounted, (p, r.total, r.uncounted)
    big = torch.randn(1, 40, 8), torch.randn(1, 30, 8)  # > 25 rows: the matrix-product path for p=2
    assert count_macs(Dist(2.0), *big).total == 40 * 30 * 8


def test_report_uses_the_checkpoints_size_and_says_when_outputs_outnumber_the_folders(tmp_path):
    """A checkpoint converted at 32 px is reported at 32 px (224 upsampled its images and counted 49x
    its MACs); a model with more outputs than the folder has classes gets the warning in its notes,
    where the report's reader sees it, next to the accuracy it qualifies."""
    _image_folder(tmp_path / "val", {"dark": [10, 20], "light": [200, 230]})
    ckpt = tmp_path / "r18.safetensors"
    r = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "--num-classes", "4", "--input-size", "32",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "report.json"
    res = CliRunner().invoke(main, ["report", str(ckpt), "--data", str(tmp_path), "--no-speed", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["input_size"] == [3, 32, 32]
    assert any("4 outputs" in n and "2 class folders" in n for n in doc["model"]["notes"]), doc["model"]["notes"]


class _Contractions(nn.Module):
    def forward(self, a, b, v, m1, m2, m3):
        return (
            torch.einsum("...ji,...jk->...ik", a, b),
            torch.einsum("ij,jk,kl->il", m1, m2, m3),
            torch.inner(a, a),
            torch.linalg.multi_dot([a[0, 0], a[0, 0].T, a[0, 0]]),
            torch.linalg.multi_dot([v, m2.T, m1.T]),
        )


def test_einsum_inner_multi_dot_counted_alike_in_no_grad_and_inference_mode():
    """Hand counts (regression: under inference_mode an ellipsis einsum counted the output times the
    first operand's last size, 360, and inner and multi_dot counted 0 without being listed)."""
    a, b, v = torch.randn(2, 5, 7, 3), torch.randn(2, 5, 7, 4), torch.randn(4)
    m1, m2, m3 = torch.randn(2, 3), torch.randn(3, 4), torch.randn(4, 5)
    ellipsis = 2 * 5 * 3 * 4 * 7  # (2, 5, 3, 4) outputs, each a 7-long sum
    chain = 2 * 3 * 4 + 2 * 4 * 5  # (m1 m2) first, then with m3: torch's left-to-right order
    inner = 2 * 5 * 7 * 2 * 5 * 7 * 3  # every pair of rows, 3 long
    multi = 3 * 7 * 3 + 7 * 3 * 3  # 7x3 @ (3x7 @ 7x3): the cheaper bracketing
    vec = min(4 * 3 + 3 * 2, 4 * 3 * 2 + 4 * 2)  # v(4) @ 4x3 @ 3x2: (v M) N, 18, against v (M N), 32
    expected = ellipsis + chain + inner + multi + vec
    from partialize.macs import count_macs

    args = (a, b, v, m1, m2, m3)
    assert model_macs(_Contractions(), args) == expected
    with torch.inference_mode():
        assert model_macs(_Contractions(), args) == expected
        assert count_macs(_Contractions(), *args).uncounted == {}


def test_report_builds_model_and_baseline_with_the_checkpoints_classes(tmp_path):
    """A 10-class checkpoint against `--baseline resnet18` used to get a 1000-class baseline; and
    `report resnet18 --num-classes 10` ignored the count for MODEL. Oracle: sum of p.numel() of timm's
    10-class resnet18."""
    want = sum(p.numel() for p in timm.create_model("resnet18", num_classes=10).parameters())
    ck = tmp_path / "r.safetensors"
    args = ["convert", "resnet18", "--num-classes", "10", "--input-size", "32", "--no-speed", "--out", str(ck)]
    assert CliRunner().invoke(main, args).exit_code == 0
    out = tmp_path / "a.json"
    r = CliRunner().invoke(main, ["report", str(ck), "--baseline", "resnet18", "--no-speed", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["baseline"]["params_total"] == want
    out = tmp_path / "b.json"
    args = ["report", "resnet18", "--num-classes", "10", "--input-size", "32", "--no-speed", "--json", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["model"]["params_total"] == want
