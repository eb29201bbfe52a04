"""Measurement: MAC counts against hand formulas, the fvcore / flop_counter cross-check, dynamic
operators, reports (JSON round trip, compare errors, plot), accuracy and the pruning baseline."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from partialize.cli import main
from partialize.measure.accuracy import DataError, evaluate_accuracy
from partialize.measure.flops import (
    count_macs,
    count_params,
    flop_counter_macs,
    macs_breakdown,
    override_modules,
)
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
    assert count_macs(model, x) == expected
    assert flop_counter_macs(model, x) == expected
    assert count_params(model) == (8 * 27 + 8) + (8 * 2 * 9 + 8) + (5120 + 10)


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_counts_two_matmuls():
    b, h, nq, nk, d, dv = 2, 3, 10, 12, 16, 8
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, dv)
    expected = b * h * nq * nk * d + b * h * nq * nk * dv
    assert count_macs(_SDPA(), (q, k, v)) == expected
    assert flop_counter_macs(_SDPA(), (q, k, v)) == expected


def test_partial_self_attention_count():
    c, hw = 96, 7
    n = hw * hw
    attn = PartialSelfAttention(c).eval()
    # qkv linear + q k^T + attn v (sdpa) + LayerNorm (fvcore: 5 per element with affine)
    expected = n * c * 3 * c + 2 * n * n * c + 5 * n * c
    assert count_macs(attn, torch.randn(1, c, hw, hw)) == expected


def test_pconv_and_patconv_counts():
    c, hw = 64, 14
    n, rest = 16, 48
    x = torch.randn(1, c, hw, hw)
    conv = n * n * 9 * hw * hw
    assert count_macs(PConv(c, 0.25), x) == conv
    assert count_macs(PConv(c, 0.25).deploy(), x) == conv
    ch = PATConv(c, 0.25, "ch").eval()
    # PAT_ch: dense map from 2 * rest statistics to rest gates, plus the eval BN1d (2 per element)
    assert count_macs(ch, x) == conv + 2 * rest * rest + 2 * rest
    assert count_macs(ch.deploy(), x) == conv + 2 * rest * rest  # BN folded into an affine
    sf = PATConv(c, 0.25, "sf").eval()
    t = hw * hw
    assert count_macs(sf, x) == conv + t * rest * 3 * rest + 2 * t * t * rest + 5 * t * rest


def test_pat_sp_counts_train_and_merged():
    hidden, c, hw = 128, 64, 14
    sp = PartialSpatialAttention.from_module(nn.Conv2d(hidden, c, 1, bias=False), 0.5).eval()
    h = torch.randn(1, hidden, hw, hw)
    # MLP conv + one-channel gate conv over the 32 reweighted channels + eval BN2d(1)
    assert count_macs(sp, h) == c * hidden * hw * hw + 32 * hw * hw + 2 * hw * hw
    # merged: one 1x1 conv with C + 1 outputs
    assert count_macs(sp.deploy(), h) == (c + 1) * hidden * hw * hw


def test_dpconv_counts_realised_width_not_masked_conv():
    c, hw = 64, 14
    dp = DPConv(c, attn="ch", init_ratio=0.25).eval()
    n = dp.num_conv_channels
    assert n == 16
    r = macs_breakdown(dp, (c, hw, hw), crosscheck=False)
    expected = n * n * 9 * hw * hw + 2 * (c - n) * (c - n)
    assert r["total"] == expected
    assert r["fvcore_static"] > c * c * 9 * hw * hw  # fvcore alone sees the masked full conv
    # what is counted is what deploy() runs
    assert count_macs(dp.deploy(), torch.randn(1, c, hw, hw)) == expected
    assert r["dynamic"][""]["realised_ratio"] == 0.25
    assert r["dynamic"][""]["attn_macs"] == 2 * (c - n) * (c - n)
    assert r["dynamic"][""]["dense_equivalent_macs"] == c * c * 9 * hw * hw + 2 * c * c


def test_dpconv_channelwise_attention_macs():
    """mapping="channelwise": each of the C - n gates maps its own [mean, std], 2 MACs per gate."""
    c, hw = 64, 14
    dp = DPConv(c, attn="ch", mapping="channelwise", init_ratio=0.25).eval()
    n = dp.num_conv_channels
    r = macs_breakdown(dp, (c, hw, hw), crosscheck=False)
    assert r["dynamic"][""]["attn_macs"] == 2 * (c - n) == 96
    assert r["total"] == n * n * 9 * hw * hw + 2 * (c - n)
    assert r["dynamic"][""]["dense_equivalent_macs"] == c * c * 9 * hw * hw + 2 * c
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
    # soft routing runs every branch
    ada.routing = "soft"
    r = macs_breakdown(ada, (c, hw, hw), calibration=calib, crosscheck=False)
    assert r["total"] == pytest.approx(router + sum(branch))
    assert "soft" in r["dynamic"][""]["basis"]


def test_override_propagates_to_ancestors():
    per = {"": 100, "a": 60, "a.b": 50, "a.b.c": 50, "d": 40}
    out = override_modules(per, {"a.b": 10})
    assert out == {"": 60, "a": 20, "a.b": 10, "d": 40}


@pytest.mark.parametrize("name", ["resnet50", "convnext_atto", "vit_tiny_patch16_224"])
def test_fvcore_and_flop_counter_agree(name):
    model = timm.create_model(name, pretrained=False)
    r = macs_breakdown(model, 224)
    assert r["flop_counter"] > 0
    assert abs(r["crosscheck_rel_diff"]) < 0.02, r


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
    bn = 2 * 32 * s * s
    mid = (8 * 8 if partial else 32 * 32) * 9 * s * s
    pool = 32 * s * s
    return stem + bn + mid + pool + 32 * 5


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
    assert r.model.params_total == count_params(_tiny(True))
    conv_row = next(row for row in r.model.layers if row["name"] == "3")
    assert (conv_row["type"], conv_row["partial"], conv_row["params"]) == ("PConv", True, 8 * 8 * 9)
    assert conv_row["macs"] == 8 * 8 * 9 * 32 * 32
    assert r.speed_conditions["threads"] == 1 and r.speed_conditions["batch"] == 16
    lat = r.model.speed["latency_ms"]
    assert lat["min"] <= lat["median"] <= lat["max"]
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
    before = count_macs(model, x)
    target = 0.55 * before
    pruned, info = prune_to_macs(model, target, 64)
    reached = count_macs(pruned, x)
    assert abs(reached - target) / target <= 0.05
    assert reached == info["reached_macs"]
    assert count_macs(model, x) == before  # the original is untouched
    assert pruned(x).shape == (1, 1000)  # classifier kept


# --- CLI: bench and checkpoints -------------------------------------------------------------------


def test_bench_models_shorthand(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "resnet10t", "resnet18", "--input-size", "32", "--rounds", "2", "--batch", "2"]
    res = CliRunner().invoke(main, args + ["--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    r10 = timm.create_model("resnet10t")
    assert data["models"]["resnet10t"]["params"] == count_params(r10)
    assert data["models"]["resnet10t"]["macs"] == count_macs(r10, torch.randn(1, 3, 32, 32))
    assert data["conditions"]["threads"] == 1 and data["conditions"]["batch"] == 2
    assert "1.00x" in res.output  # the first model is the reference


def test_report_cli_unknown_model_is_friendly():
    res = CliRunner().invoke(main, ["report", "resnet_does_not_exist", "--no-speed"])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_report_on_checkpoint_path(tmp_path):
    import partialize
    import partialize.io as io

    model = timm.create_model("resnet18", pretrained=False)
    converted = partialize.apply(model, ratio=0.25)
    ckpt = io.save(converted, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["report", str(ckpt), "--no-speed", "--input-size", "64", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = Report.from_json(str(out))
    assert rep.model.macs == count_macs(converted, torch.randn(1, 3, 64, 64))


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
    assert next(r.vs_dense for r in rows if r.op == "dense3x3") == 1.0


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
