"""Deployment and export: deployed == eval-mode trained (every shipped recipe on the three Table 4
networks, PartialNet), ONNX == PyTorch under onnxruntime, save -> load -> deploy bit-stable, versioned
checkpoints that refuse what they cannot read, no-clobber export, torch.compile on converted models."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from _helpers import rel_err
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import partialize
from partialize.base_model import build_model
from partialize.cli import main
from partialize.errors import CheckpointError, PartializeError
from partialize.exporting import export, export_onnx
from partialize.inference import eval_reference
from partialize.ops import AdaPConv, DPConv, PartialSpatialAttention, PATConvDeploy
from partialize.ops.attention import GaussianChannelAttention, PartialSelfAttention

SIZE = 64  # the functions are the same at 224; 64x64 keeps the default run fast
TABLE4 = {
    "resnet50": "resnet50-patconv",
    "mobilenetv2_100": "mobilenetv2-patconv",
    "convnext_tiny": "convnext_tiny-patconv",
}
GENERIC = ("default", "dynamic", "adaptive")
CASES = [(m, r) for m in TABLE4 for r in (*GENERIC, TABLE4[m])] + [("fasternet_t0", "fasternet-to-partialnet")]
# default run: every recipe that converts something here (mobilenetv2 and convnext_tiny have no
# eligible dense 3x3 conv, so default/dynamic/adaptive only fold their BNs: those run with -m slow)
DEFAULT_CASES = [(m, r) for m, r in CASES if m in ("resnet50", "fasternet_t0") or r == TABLE4.get(m)]
SLOW_CASES = [c for c in CASES if c not in DEFAULT_CASES]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every folding/merging/routing path non-trivial: random BN statistics and affines, random
    PAT_ch / PAT_sp / PAT_sf parameters (they start as the identity), DPConv gates at a random
    power-of-two width, Ada-PConv routers that pick different branches for different inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            if isinstance(m, (GaussianChannelAttention, PartialSelfAttention, PartialSpatialAttention)):
                for name, p in m.named_parameters():  # at the scale of a trained layer, not beyond
                    if "norm" not in name and not name.startswith("conv."):
                        std = 1 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.2
                        p.add_(torch.randn(p.shape, generator=g) * std)
            if isinstance(m, DPConv):
                widths = [w for w in (1 / 8, 1 / 4, 1 / 2) if m.dim * w >= 1]
                m.set_ratio(widths[int(torch.randint(len(widths), (1,), generator=g))])
            if isinstance(m, AdaPConv):
                m.router.weight.normal_(0, 4.0 / m.dim**0.5, generator=g)
                m.router.bias.normal_(0, 1.0, generator=g)
    return model


@functools.cache
def converted(name: str, recipe: str | None, seed: int = 0) -> nn.Module:
    """``name`` converted by ``recipe`` (None: a native model) with randomized statistics, eval mode.
    Cached (tests never modify it: deploy and export work on copies)."""
    torch.manual_seed(seed)
    base = build_model(name, num_classes=10)
    model = base if recipe is None else partialize.apply(base, recipe, input_size=SIZE)
    return randomize(model, seed).eval()


def _ada_choices(model: nn.Module) -> set[int]:
    return {int(c) for m in model.modules() if isinstance(m, AdaPConv) for c in m.last_choice}


def _check_deployed(name: str, recipe: str | None) -> None:
    m = converted(name, recipe)
    d = partialize.deploy(m)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        want, got = eval_reference(m)(x), d(x)
    assert rel_err(got, want) < 1e-4
    # what deploy promises: no training-form operator left, hard routing, frozen, eval mode
    kinds = {type(q).__name__ for q in d.modules()}
    assert not kinds & {"PATConv", "DPConv", "PartialSpatialAttention", "GaussianChannelAttention"}, kinds
    assert all(q.routing == "hard" for q in d.modules() if isinstance(q, AdaPConv))
    assert not d.training and not any(p.requires_grad for p in d.parameters())
    if recipe == "adaptive" and any(isinstance(q, AdaPConv) for q in d.modules()):
        assert len(_ada_choices(d)) > 1  # the batch really was split between branches
    assert m.training is False and type(m) is type(d)  # the input model is untouched


@pytest.mark.parametrize("name,recipe", DEFAULT_CASES, ids=[f"{m}-{r}" for m, r in DEFAULT_CASES])
def test_deployed_equals_eval_mode_trained(name, recipe):
    _check_deployed(name, recipe)


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", SLOW_CASES, ids=[f"{m}-{r}" for m, r in SLOW_CASES])
def test_deployed_equals_eval_mode_trained_bn_only_cases(name, recipe):
    _check_deployed(name, recipe)


def test_deploy_folds_bn_into_the_right_convs():
    """resnet50-patconv: every BN after a conv/PATConv is folded, and the folded model still equals
    the trained one; the input model keeps its BNs."""
    m = converted("resnet50", "resnet50-patconv")
    d = partialize.deploy(m)
    assert not any(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in d.modules())
    assert sum(isinstance(q, PATConvDeploy) for q in d.modules()) == 13  # 16 blocks - 3 strided
    assert sum(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in m.modules()) > 50


# --- ONNX -----------------------------------------------------------------------------------


def _onnx_err(model: nn.Module, tmp_path, batch: int = 2) -> float:
    x = torch.randn(batch, 3, SIZE, SIZE)
    res = export_onnx(model, str(tmp_path / "m.onnx"), x)
    assert os.path.getsize(res.path) > 0
    return res.max_rel_err


ONNX_DEFAULT = [(m, r) for m, r in TABLE4.items()] + [("partialnet_t0", None), ("partialnet_t1", None)]


@pytest.mark.slow  # the dynamo exporter takes 10-25 s a model; test_export_ops covers every operator fast
@pytest.mark.parametrize("name,recipe", ONNX_DEFAULT, ids=[m for m, _ in ONNX_DEFAULT])
def test_onnx_equals_pytorch(name, recipe, tmp_path):
    assert _onnx_err(converted(name, recipe), tmp_path) < 1e-4


ONNX_SLOW = [c for c in CASES if c not in ONNX_DEFAULT] + [(f"partialnet_{v}", None) for v in ("t2", "s", "m", "l")]


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", ONNX_SLOW, ids=[f"{m}-{r}" for m, r in ONNX_SLOW])
def test_onnx_equals_pytorch_all(name, recipe, tmp_path):
    assert _onnx_err(converted(name, recipe), tmp_path) < 1e-4


@pytest.mark.slow  # a dynamo ONNX export of a whole ResNet-18; the per-operator legacy export is fast
def test_ada_onnx_routes_per_sample(tmp_path):
    """Ada-PConv exports as all-branches + per-sample select: same outputs as eager hard routing on a
    batch whose samples take different branches."""
    m = converted("torchvision:resnet18", "adaptive")
    d = partialize.deploy(m)
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        want = d(x)
    assert len(_ada_choices(d)) > 1
    n_ada = sum(isinstance(q, AdaPConv) for q in d.modules())
    assert n_ada == 13  # 16 basic-block 3x3 convs, 3 strided ones left alone
    with torch.no_grad():  # the traced graph selects per sample: the same outputs as eager grouping
        traced = torch.jit.trace(d, (x,), check_trace=False)
        assert rel_err(traced(x), want) < 1e-6
        assert rel_err(traced(x.flip(0)), d(x.flip(0))) < 1e-6  # another routing than the traced one
    res = export_onnx(d, str(tmp_path / "ada.onnx"), x)
    assert res.max_rel_err < 1e-4
    assert any("every branch" in n and f"({n_ada} layer(s))" in n for n in res.notes)


# --- checkpoints: save -> load -> deploy, versioning, no clobbering ----------------------------


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "name,recipe",
    [
        ("torchvision:resnet18", "adaptive"),
        ("resnet18", "dynamic"),
        ("mobilenetv2_100", "mobilenetv2-patconv"),
    ],
)
def test_save_load_deploy_is_bit_stable(name, recipe, tmp_path):
    m = converted(name, recipe)
    path = partialize.save(m, tmp_path / "m.safetensors")
    d0 = partialize.deploy(m)
    d1 = partialize.deploy(partialize.load(path))
    assert _state_equal(d0, d1)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(d0(x), d1(x))
    # the file marked deployed loads straight into the same deployed model
    dep = partialize.save(m, tmp_path / "d.safetensors", deployed=True)
    d2 = partialize.load(dep)
    assert getattr(d2, "_partialize_deployed", False) and _state_equal(d0, d2)
    assert not getattr(partialize.load(dep, deployed=False), "_partialize_deployed", False)
    with pytest.raises(PartializeError, match="deployed model"):
        partialize.save(d0, tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A small converted checkpoint: resnet18 (timm) with the default recipe at 32x32."""
    torch.manual_seed(0)
    m = randomize(partialize.apply(build_model("resnet18", num_classes=10), "default", input_size=32))
    return partialize.save(m, tmp_path_factory.mktemp("ck") / "r18.safetensors")


def _rewrite(src: str, dst: str, **meta_changes) -> str:
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, dst, metadata={k: v for k, v in meta.items() if v is not None})
    return dst


def test_newer_format_is_refused(small_ckpt, tmp_path):
    bad = _rewrite(small_ckpt, str(tmp_path / "v2.safetensors"), format="partialize/2")
    with pytest.raises(CheckpointError, match="written by a newer partialize"):
        partialize.load(bad)
    unknown = _rewrite(small_ckpt, str(tmp_path / "u.safetensors"), format="somethingelse/1")
    with pytest.raises(CheckpointError, match="unknown format 'somethingelse/1'"):
        partialize.load(unknown)


def test_non_partialize_safetensors_is_refused(tmp_path):
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a partialize checkpoint"):
        partialize.load(plain)


def test_truncated_and_mismatched_checkpoints(small_ckpt, tmp_path):
    data = open(small_ckpt, "rb").read()
    for i, cut in enumerate((40, len(data) // 2, len(data) - 8)):  # inside the header, the tensors
        p = tmp_path / f"cut{i}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            partialize.load(p)
    # weights that do not match the plan: the same tensors under another recipe's plan
    other = partialize.apply(build_model("resnet18", num_classes=10), "dynamic", input_size=32)
    plan = other._partialize_plan.to_json(indent=None)
    bad = _rewrite(small_ckpt, str(tmp_path / "mismatch.safetensors"), plan=plan)
    with pytest.raises(CheckpointError, match="do not match the replayed plan"):
        partialize.load(bad)


def test_export_never_overwrites_and_never_writes_on_error(small_ckpt, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(PartializeError, match="already exists"):
        export(small_ckpt, "safetensors", str(out))
    assert out.read_bytes() == b"keep me"
    newer = _rewrite(small_ckpt, str(tmp_path / "v2.safetensors"), format="partialize/2")
    with pytest.raises(CheckpointError):
        export(newer, "onnx", str(tmp_path / "never.onnx"), force=True)
    assert not (tmp_path / "never.onnx").exists()
    res = export(small_ckpt, "safetensors", str(out), force=True)
    assert res.max_rel_err == 0.0 and res.deploy_rel_err < 1e-4
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "partialize/1" and meta["deployed"] == "true"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partialize-")] == []


def test_cli_export_onnx_and_torchscript(small_ckpt, tmp_path):
    runner = CliRunner()
    onnx_out = str(tmp_path / "r18.onnx")
    r = runner.invoke(main, ["export", small_ckpt, "--format", "onnx", "--out", onnx_out])
    assert r.exit_code == 0, r.output
    errs = [float(line.rsplit(":", 1)[1]) for line in r.output.splitlines() if "max relative error" in line]
    assert len(errs) == 2 and max(errs) < 1e-4 and os.path.getsize(onnx_out) > 0
    r = runner.invoke(main, ["export", small_ckpt, "--format", "onnx", "--out", onnx_out])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    ts_out = str(tmp_path / "r18.ts.pt")
    r = runner.invoke(main, ["export", small_ckpt, "-f", "torchscript", "-o", ts_out, "--batch", "2"])
    assert r.exit_code == 0, r.output
    ts = torch.jit.load(ts_out)
    d = partialize.load(small_ckpt, deployed=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ts(x), d(x)) < 1e-4
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    r = runner.invoke(main, ["export", plain, "-f", "onnx"])
    assert r.exit_code == 2 and "not a partialize checkpoint" in r.output


# --- torch.compile ---------------------------------------------------------------------------


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    m = converted("torchvision:resnet18", "default")
    d = partialize.deploy(m)
    x = torch.randn(2, 3, 32, 32)
    for model in (m, d):
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            assert rel_err(compiled(x), model(x)) < 1e-4


@pytest.mark.slow
def test_torch_compile_graph_capture():
    """torch.compile (dynamo graph capture + AOT autograd, no code generation) on torchvision resnet18
    + default recipe at 32x32, trained form (eval) and deployed form, equals eager. Inductor runs in
    the slow test below (about a minute of C++ compilation on 2 cores)."""
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    """The same with the default inductor backend (generates and compiles C++ kernels on CPU)."""
    _compile_check("inductor")


def test_export_at_a_size_the_model_cannot_take_is_a_clear_error(tmp_path):
    """A ViT built for 224 px exported at 64: the reason and the fix (the size it was built for), no
    traceback from the exporter and no file."""
    ckpt = str(tmp_path / "v.safetensors")
    args = ["convert", "vit_tiny_patch16_224", "--recipe", "auto", "--num-classes", "4", "--no-speed", "--out", ckpt]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, ["export", ckpt, "--format", "torchscript", "--input-size", "64"])
    assert r.exit_code != 0 and "does not run at --input-size 64" in r.output, r.output
    assert "Traceback" not in r.output and not os.path.exists(tmp_path / "v.ts.pt")


def test_a_saved_ada_pconv_loads_with_the_routing_it_was_trained_with(tmp_path):
    """Routing is no tensor: a file loaded back routed as its recipe said (soft), not as the fine-tune
    left it, so the loaded model's eval differed from its own export by 2-4%. Saved and restored, with
    the trained routing that deploy()'s warning reads."""
    m = converted("torchvision:resnet18", "adaptive").eval()
    ops = [q for q in m.modules() if isinstance(q, AdaPConv)]
    for q in ops:  # as the trainer leaves them after an ste fine-tune
        q.set_routing("hard")
        q.trained_routing = "ste"
    back = partialize.load(partialize.save(m, tmp_path / "a.safetensors")).eval()
    got = [q for q in back.modules() if isinstance(q, AdaPConv)]
    assert [(q.routing, q.trained_routing) for q in got] == [("hard", "ste")] * len(ops)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
        assert rel_err(back(x), partialize.deploy(back)(x)) < 1e-5


def test_export_without_input_size_uses_the_non_square_shape_the_model_was_converted_at(tmp_path):
    """A model converted at 48 x 64 is exported at 48 x 64 (it was exported at 64 x 64)."""
    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=10)
    m = randomize(partialize.apply(base, "default", example_input=torch.randn(1, 3, 48, 64)))
    assert tuple(m._partialize_plan.input_shape) == (1, 3, 48, 64)
    ckpt = partialize.save(m, tmp_path / "r.safetensors")
    res = partialize.export(ckpt, "torchscript", out=str(tmp_path / "r.ts.pt"))
    assert tuple(res.input_shape[-2:]) == (48, 64)
