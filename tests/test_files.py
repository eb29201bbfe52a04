"""Output files: never overwritten without --force, checked before the work starts, written atomically
with the umask's mode, nothing left behind on a full or read-only disk; compare says when throughputs
were timed apart and plots on honest axes; checkpoints of your own factories work from the CLI."""

import errno
import json
import os
import stat
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import partialize
from partialize._fs import atomic_write, check_output, write_text
from partialize.base_model import build_model
from partialize.cli import main
from partialize.errors import PartializeError
from partialize.measure.report import ModelMeasurement, Report

R18 = ["torchvision:resnet18", "--input-size", "32"]


def _cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def _refused(r, *parts):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    for p in parts:
        assert p in r.output, (p, r.output)


def _no_temporaries(folder):
    assert not [f for f in os.listdir(folder) if f.startswith(".partialize-")], os.listdir(folder)


@pytest.fixture()
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    conv = partialize.apply(build_model("torchvision:resnet18", num_classes=10), input_size=32)
    return partialize.save(conv, tmp_path_factory.mktemp("ck") / "r18.safetensors")


# --- never overwrite, checked before the work ------------------------------------------------


def test_report_json_and_md_refuse_an_existing_file_before_loading_anything(tmp_path, monkeypatch):
    for opt in ("--json", "--md"):
        out = tmp_path / f"existing.{opt[2:]}"
        out.write_text("keep me")
        monkeypatch.setattr("partialize.cli.measure.load_model", lambda *a, **k: pytest.fail("work started"))
        r = _cli("report", *R18, "--no-speed", opt, out)
        _refused(r, opt, "already exists", "--force")
        assert out.read_text() == "keep me"


def test_report_force_replaces_atomically_and_writes_both(tmp_path, umask022):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    js.write_text("old")
    r = _cli("report", *R18, "--no-speed", "--json", js, "--md", md, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["schema"] == "partialize.report"
    assert md.read_text().startswith("# partialize report")
    assert stat.S_IMODE(os.stat(md).st_mode) == 0o644
    _no_temporaries(tmp_path)


def test_report_output_may_never_be_an_input_even_with_force(tmp_path, ckpt):
    before = open(ckpt, "rb").read()
    r = _cli("report", ckpt, "--input-size", 32, "--no-speed", "--json", ckpt, "--force")
    _refused(r, "also an input")
    assert open(ckpt, "rb").read() == before


def test_report_json_and_md_may_not_be_the_same_file(tmp_path):
    p = tmp_path / "same.txt"
    _refused(_cli("report", *R18, "--no-speed", "--json", p, "--md", p), "--json and --md are the same file")


def _report(name, thr=None, acc=None, images=1437, source=None, spread=(0.9, 1.1)):
    m = ModelMeasurement(name=name, role="model", params_total=100, params_trainable=100, macs=1e9, source=source)
    if thr is not None:
        m.speed = {"throughput_ips": {"median": thr, "min": thr * spread[0], "max": thr * spread[1]}}
    if acc is not None:
        m.accuracy = {"top1": acc, "top5": 99.0, "images": images}
    cond = {"device": "cpu: test", "threads": 1, "batch": 16, "precision": "fp32", "channels_last": False, "rounds": 7}
    return Report(model=m, input_size=[3, 32, 32], speed_conditions=cond if thr is not None else None)


def test_compare_md_and_plot_refuse_existing_files_before_reading_reports(tmp_path):
    a = tmp_path / "a.json"
    _report("a", thr=100.0).to_json(a)
    for opt, name in (("--md", "c.md"), ("--plot", "c.png")):
        out = tmp_path / name
        out.write_bytes(b"keep me")
        _refused(_cli("compare", a, opt, out), opt, "already exists", "--force")
        assert out.read_bytes() == b"keep me"
        r = _cli("compare", a, opt, out, "--force")
        assert r.exit_code == 0, r.output
        assert out.read_bytes() != b"keep me"
    _refused(_cli("compare", a, "--md", a, "--force"), "also an input")
    assert json.loads(a.read_text())["schema"] == "partialize.report"
    _no_temporaries(tmp_path)


def test_compare_plot_with_an_unknown_extension_is_refused_up_front(tmp_path):
    a = tmp_path / "a.json"
    _report("a", thr=100.0).to_json(a)
    _refused(_cli("compare", a, "--plot", tmp_path / "p.txt"), "--plot", ".png")
    assert not (tmp_path / "p.txt").exists()


def test_bench_outputs_refuse_existing_files_before_timing(tmp_path, monkeypatch):
    md = tmp_path / "ops.md"
    md.write_text("keep me")
    monkeypatch.setattr("partialize.measure.opbench.bench_ops", lambda *a, **k: pytest.fail("timing started"))
    _refused(_cli("bench", "ops", "--channels", 8, "--sizes", 8, "--batches", 1, "--md", md), "--md", "--force")
    js = tmp_path / "b.json"
    js.write_text("keep me")
    monkeypatch.setattr("partialize.cli.measure.load_model", lambda *a, **k: pytest.fail("work started"))
    _refused(_cli("bench", "models", "torchvision:resnet18", "--json", js), "--json", "already exists")
    assert md.read_text() == "keep me" and js.read_text() == "keep me"


def test_convert_checks_out_before_building_or_measuring(tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    monkeypatch.setattr("partialize.base_model.build_model", lambda *a, **k: pytest.fail("work started"))
    _refused(_cli("convert", *R18, "--out", out), "already exists", "--force")
    # the suffix save() adds is part of the check
    _refused(_cli("convert", *R18, "--out", tmp_path / "m"), "m.safetensors", "already exists")
    assert out.read_bytes() == b"keep me"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody can write)")
def test_unwritable_output_folder_is_refused_before_the_work(monkeypatch):
    monkeypatch.setattr("partialize.base_model.build_model", lambda *a, **k: pytest.fail("work started"))
    _refused(_cli("convert", *R18, "--out", "/proc/partialize-test/m.safetensors"), "cannot write", "folder")
    monkeypatch.setattr("partialize.cli.measure.load_model", lambda *a, **k: pytest.fail("work started"))
    _refused(_cli("report", *R18, "--json", "/proc/partialize-test/r.json"), "cannot write --json")
    _refused(_cli("export", "/proc/partialize-test/m.safetensors", "-f", "torchscript"), "cannot write")


def test_full_disk_during_save_leaves_nothing_behind_and_the_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch

    def full(model, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    out = tmp_path / "m.safetensors"
    r = _cli("convert", *R18, "--no-speed", "--out", out)
    _refused(r, "disk is full", "nothing was written")
    assert not out.exists()
    _no_temporaries(tmp_path)
    out.write_bytes(b"old model")
    _refused(_cli("convert", *R18, "--no-speed", "--out", out, "--force"), "disk is full")
    assert out.read_bytes() == b"old model"
    _no_temporaries(tmp_path)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save
    ],
)
def test_io_errors_that_writers_wrap_are_recognised(tmp_path, monkeypatch, exc):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 100)
        raise exc

    if "enforce" in str(exc):  # torch.save says nothing useful: the folder's free space tells
        monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(PartializeError, match="disk is full"):
        atomic_write(tmp_path / "m.bin", write)
    _no_temporaries(tmp_path)


def test_other_writer_errors_are_not_disguised_as_disk_errors(tmp_path):
    def write(tmp):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "m.bin", write)
    _no_temporaries(tmp_path)


def test_atomic_write_turns_os_errors_into_partialize_errors(tmp_path):
    def fail(tmp):
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(PartializeError, match="not writable"):
        atomic_write(tmp_path / "x", fail)
    _no_temporaries(tmp_path)


# --- modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_model_files_and_reports_get_the_umask_mode(tmp_path, umask, mode):
    conv = partialize.apply(build_model("torchvision:resnet18"), input_size=32)
    old = os.umask(umask)
    try:
        model = partialize.save(conv, tmp_path / "m.safetensors")
        rep = tmp_path / "r.json"
        _report("a", thr=1.0).to_json(rep)
        text = write_text(tmp_path / "t.md", "hello")
    finally:
        os.umask(old)
    for p in (model, rep, text):
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, (p, oct(os.stat(p).st_mode))


def test_replacing_a_file_keeps_its_mode(tmp_path, umask022):
    p = tmp_path / "t.md"
    p.write_text("old")
    os.chmod(p, 0o640)
    write_text(p, "new", force=True)
    assert p.read_text() == "new" and stat.S_IMODE(os.stat(p).st_mode) == 0o640


def test_check_output_refuses_folders_and_existing_files(tmp_path):
    with pytest.raises(PartializeError, match="is a folder"):
        check_output(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(PartializeError, match="already exists"):
        check_output(tmp_path / "f")
    assert check_output(tmp_path / "f", force=True)
    with pytest.raises(PartializeError, match="not a folder"):
        check_output(tmp_path / "f" / "below")


# --- compare: separate runs, honest plots ------------------------------------------------------


def test_compare_says_when_throughputs_were_timed_in_separate_runs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _report("r18", thr=100.0).to_json(a)
    _report("r18 again", thr=207.0).to_json(b)  # the same model, timed later on a quieter machine
    md = tmp_path / "c.md"
    r = _cli("compare", a, b, "--md", md)
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "2.07x (separate runs)" in text
    assert "2 separate runs" in text and "not timed side by side" in text and "--remeasure" in text
    assert "separate runs" in r.output


def test_compare_within_one_report_is_side_by_side():
    from partialize.measure.render import compare_markdown

    a, b = _report("a", thr=100.0).model, _report("b", thr=150.0).model
    text = compare_markdown([a, b], {"device": "cpu", "batch": 16, "precision": "fp32", "rounds": 7}, ["x", "x"])
    assert "1.50x" in text and "separate runs" not in text


def test_plot_has_a_sane_accuracy_axis_spread_bars_and_zero_based_throughput():
    from partialize.measure.render import plot_figure

    entries = [_report("a", thr=100.0, acc=56.95).model, _report("b", thr=120.0, acc=57.2).model]
    fig, what = plot_figure(entries, None, ["a.json", "b.json"])
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert hi - lo >= 10 and lo <= 56.95 and hi >= 57.2  # not zoomed to 56.95-57.2
    assert ax.get_xlim()[0] == 0.0
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2 and all(c.has_xerr and c.has_yerr for c in bars)
    assert "separate runs" in what and "NOT timed side by side" in ax.get_title()


def test_compare_remeasure_times_the_models_side_by_side(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, name in ((a, "x"), (b, "y")):
        rep = _report(name, thr=100.0 if name == "x" else 300.0, source="torchvision:resnet18")
        rep.speed_conditions.update(batch=2, rounds=1)
        rep.model.macs = 1e9
        rep.to_json(path)
    md = tmp_path / "c.md"
    r = _cli("compare", a, b, "--remeasure", "--md", md)
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "re-measured side by side" in text and "separate runs" not in text
    assert "3.00x" not in text  # the stale 300 vs 100 is gone


# --- package.module:factory checkpoints from the CLI -------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_factory_checkpoints_need_trust_factory_and_import_from_the_working_folder(tmp_path, monkeypatch):
    mod = "partialize_test_factory_mod"
    (tmp_path / f"{mod}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def net(num_classes=10):
                return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop(mod, None)
    ck = tmp_path / "f.safetensors"
    r = _cli("convert", f"{mod}:net", "--input-size", 16, "--no-speed", "--out", ck)
    assert r.exit_code == 0, r.output  # the working folder is importable, as with python -m
    _refused(_cli("report", ck, "--input-size", 16, "--no-speed"), "--trust-factory")
    r = _cli("report", ck, "--input-size", 16, "--no-speed", "--trust-factory")
    assert r.exit_code == 0, r.output
    r = _cli("export", ck, "-f", "torchscript", "--trust-factory")
    assert r.exit_code == 0, r.output
    assert torch.jit.load(str(tmp_path / "f.ts.pt"))(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    r = _cli("bench", "models", ck, "--input-size", 16, "--rounds", 1, "--batch", 2, "--trust-factory")
    assert r.exit_code == 0, r.output
    from partialize.errors import CheckpointError
    from partialize.serialization import trusting_factories

    with pytest.raises(CheckpointError, match="trusting_factories"):
        partialize.load(ck)
    with trusting_factories():
        assert partialize.load(ck)(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with pytest.raises(CheckpointError):
        partialize.load(ck)  # the trust ends with the block
    # finetune and train load checkpoints too: the flag their own error names must exist there
    from partialize.datasets import write_image_folder

    x = torch.randn(20, 3, 16, 16).clamp(-2, 2)
    y = torch.arange(20) % 10
    write_image_folder(x, y, tmp_path / "data" / "train")
    write_image_folder(x, y, tmp_path / "data" / "val")
    ft = ("finetune", ck, "--data", tmp_path / "data", "--teacher", "none", "--epochs", 1, "--batch-size", 4,
          "--no-report", "--device", "cpu")  # fmt: skip
    _refused(_cli(*ft, "--out", tmp_path / "r1"), "--trust-factory")
    r = _cli(*ft, "--out", tmp_path / "r2", "--trust-factory")
    assert r.exit_code == 0, r.output
