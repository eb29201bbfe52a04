"""Native PartialNet family: timm registration, shapes, training step, deploy equivalence and the
papers' params/MACs (001 Table 6; the reference-code counts transcribed in shared/paper_tables.md)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from _helpers import randomize_bn, rel_err
from torch import nn

import partialize  # noqa: F401  (registers partialnet_* with timm)
from partialize.errors import RecipeError, WeightsUnavailableError
from partialize.inference import deploy
from partialize.measure.flops import count_params, model_macs
from partialize.models.partialnet import PartialSpatialConv, partialnet_train_settings
from partialize.ops import MergedSpatialAttention, PATConv

VARIANTS = ("t0", "t1", "t2", "s", "m", "l")
# 001 Table 6: params (M, training form) and FLOPs (G multiply-adds, deploy form) at 224x224
PAPER = {
    "t0": (4.3, 0.25),
    "t1": (7.8, 0.55),
    "t2": (12.6, 1.03),
    "s": (29.0, 2.71),
    "m": (61.3, 6.69),
    "l": (104.4, 11.91),
}
# counted from the public reference code (shared/paper_tables.md notes): params with PAT_sp, deploy MACs
REFERENCE_CODE = {"t2": (12.65, 1.03), "s": (28.98, 2.71), "m": (61.37, 6.67), "l": (104.47, 11.88)}
TOL = 0.03


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics/affines and gate parameters, so folding and merging are really tested."""
    g = randomize_bn(model, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PartialSpatialConv):
                m.gate.weight.normal_(0, 0.5, generator=g)


# PartialNet-M and -L at 224 take seconds each per test on 2 cores: behind the slow marker
@pytest.fixture(
    scope="module", params=[pytest.param(v, marks=pytest.mark.slow) if v in ("m", "l") else v for v in VARIANTS]
)
def variant_model(request):
    """(variant, eval-mode training form with non-trivial BN statistics, its deploy form, and a
    snapshot of the training form taken before deploying: its state_dict clone and module types), built once."""
    torch.manual_seed(0)
    m = timm.create_model(f"partialnet_{request.param}", num_classes=1000)
    _randomize_norms(m)
    m.eval()
    before = (
        {k: v.clone() for k, v in m.state_dict().items()},
        {n: type(q) for n, q in m.named_modules()},
    )
    return request.param, m, deploy(m), before


def test_registry_names_and_pretrained_cfg():
    assert timm.list_models("partialnet_*") == sorted(f"partialnet_{v}" for v in VARIANTS)
    m = timm.create_model("partialnet_t2", num_classes=7)
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == pytest.approx(0.9)  # 001 Table 7 test crop ratio
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "classifier"
    assert m.classifier.out_features == 7
    resolved = timm.data.resolve_data_config({}, model=m)
    assert resolved["input_size"] == (3, 224, 224) and resolved["crop_pct"] == pytest.approx(0.9)


def test_architecture_follows_table6(variant_model):
    v, m, _, _ = variant_model
    c = {"t0": 32, "t1": 48, "t2": 64, "s": 96, "m": 128, "l": 160}[v]
    assert m.stem.conv.kernel_size == (4, 4) and m.stem.conv.stride == (4, 4)
    assert [s.blocks[0].mixer.dim for s in m.stages] == [c, 2 * c, 4 * c, 8 * c]
    for i, s in enumerate(m.stages):
        if i:
            assert s.downsample.conv.kernel_size == (2, 2) and s.downsample.conv.stride == (2, 2)
        for b in s.blocks:
            assert isinstance(b.mixer, PATConv) and b.mixer.attn_type == ("sf" if i == 3 else "ch")
            assert b.mixer.dim_conv == round(b.mixer.dim / 4)  # partial ratio 1/4
            assert b.mlp.fc1.out_channels == 2 * b.mixer.dim  # MLP ratio 2
            assert isinstance(b.mlp.fc2, PartialSpatialConv)
    act = nn.GELU if v in ("t0", "t1") else nn.ReLU
    assert isinstance(m.act, act) and isinstance(m.stages[0].blocks[0].mlp.act, act)
    assert m.conv_head.out_channels == 1280
    # stochastic depth: the last block gets the Table 7 rate
    rate = partialnet_train_settings(v)["drop_path_rate"]
    last = m.stages[-1].blocks[-1].drop_path
    assert getattr(last, "drop_prob", 0.0) == pytest.approx(rate)


def test_params_and_macs_match_paper(variant_model):
    v, m, d, _ = variant_model
    params = count_params(m) / 1e6  # training form (PAT_sp unmerged, BN separate)
    macs = model_macs(d, torch.randn(1, 3, 224, 224)) / 1e9  # deploy form (BN folded, PAT_sp merged)
    p_paper, f_paper = PAPER[v]
    assert abs(params / p_paper - 1) < TOL, (v, params, p_paper)
    assert abs(macs / f_paper - 1) < TOL, (v, macs, f_paper)
    if v in REFERENCE_CODE:  # tighter: the public reference code's own counts
        p_ref, f_ref = REFERENCE_CODE[v]
        assert abs(params / p_ref - 1) < 0.005, (v, params, p_ref)
        assert abs(macs / f_ref - 1) < 0.01, (v, macs, f_ref)


def test_forward_224_and_small_input(variant_model):
    v, m, _, _ = variant_model
    with torch.no_grad():
        y224 = m(torch.randn(1, 3, 224, 224))
        feats = m.forward_features(torch.randn(2, 3, 64, 64))
        y64 = m.forward_head(feats)
    assert y224.shape == (1, 1000) and torch.isfinite(y224).all()
    assert feats.shape == (2, m.num_features, 2, 2)
    assert y64.shape == (2, 1000) and torch.isfinite(y64).all()


def test_deploy_equals_eval(variant_model):
    v, m, d, (state_before, types_before) = variant_model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = m(x), d(x)
    assert rel_err(out, ref) < 1e-4
    assert not any(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in d.modules())
    assert all(isinstance(b.mlp.fc2, MergedSpatialAttention) for s in d.stages for b in s.blocks)
    # deploy() left its input untouched: same modules, same tensors (values, not just keys), still eval
    assert m.training is False and {n: type(q) for n, q in m.named_modules()} == types_before
    after = m.state_dict()
    assert after.keys() == state_before.keys()
    for k, t in state_before.items():
        assert torch.equal(after[k], t), k


def test_dpconv_option_deploys_exactly():
    m = timm.create_model("partialnet_t0", dpconv=True, num_classes=10)
    _randomize_norms(m)
    m.eval()
    assert type(m.stages[0].blocks[0].mixer).__name__ == "DPConv"
    assert isinstance(m.stages[3].blocks[0].mixer, PATConv)  # stage 4 keeps PAT_sf
    d = deploy(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-4
    assert d.stages[0].blocks[0].mixer.dim_conv == 8  # learned width starts at 1/4 of 32


def test_one_training_step_updates_every_parameter():
    torch.manual_seed(0)
    m = timm.create_model("partialnet_t0", num_classes=5, layer_scale_init_value=1e-2)
    m.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        for k, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), k
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unchanged = [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == []


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    a = timm.create_model("partialnet_t0", num_classes=5)
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    ya, yb = a(x), b(x)
    ya.sum().backward()
    yb.sum().backward()
    assert rel_err(yb, ya) < 1e-6
    assert rel_err(b.stem.conv.weight.grad, a.stem.conv.weight.grad) < 1e-5


def test_features_only_pyramid():
    f = timm.create_model("partialnet_t1", features_only=True)
    outs = f(torch.randn(2, 3, 64, 64))
    assert f.feature_info.channels() == [48, 96, 192, 384]
    assert f.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(o.shape) for o in outs] == [(2, 48, 16, 16), (2, 96, 8, 8), (2, 192, 4, 4), (2, 384, 2, 2)]
    f2 = timm.create_model("partialnet_t1", features_only=True, out_indices=(2, 3))
    assert [o.shape[1] for o in f2(torch.randn(2, 3, 64, 64))] == [192, 384]


def test_reset_classifier_and_head():
    m = timm.create_model("partialnet_t0").eval()
    m.reset_classifier(3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert m(x).shape == (2, 3)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 1280)
        m.reset_classifier(0)
        assert m(x).shape == (2, 1280)


def test_pretrained_weights(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="no pretrained weights"):
        timm.create_model("partialnet_t2", pretrained=True)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        timm.create_model("partialnet_t0", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "x")))
    src = timm.create_model("partialnet_t0")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    m = timm.create_model("partialnet_t0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values()))


def test_partial_spatial_conv_identity_init_and_merge():
    conv = nn.Conv2d(16, 8, 1, bias=False)
    sp = PartialSpatialConv.from_module(conv, ratio=0.5)  # identity init: MLP unchanged
    h = torch.randn(2, 16, 5, 5)
    sp.eval()
    with torch.no_grad():
        assert rel_err(sp(h), conv(h)) < 1e-6
        sp.keep_conv.weight.normal_()
        sp.gate.weight.normal_()
        sp.gate_norm.weight.fill_(0.7)
        sp.gate_norm.running_mean.fill_(0.2)
        merged = sp.deploy()
        assert rel_err(merged(h), sp(h)) < 1e-5
    assert sum(isinstance(q, nn.Conv2d) for q in merged.modules()) == 1


def test_train_settings_table7():
    expect = {  # batch, lr, wd, drop path, clip, mixup (001 Table 7)
        "t0": (4096, 0.004, 0.005, 0.0, None, 0.05),
        "t1": (4096, 0.004, 0.01, 0.02, None, 0.1),
        "t2": (4096, 0.004, 0.02, 0.05, None, 0.1),
        "s": (4096, 0.004, 0.03, 0.1, None, 0.3),
        "m": (2048, 0.002, 0.05, 0.2, 1.0, 0.5),
        "l": (2048, 0.002, 0.05, 0.3, 0.01, 0.7),
    }
    for v, (bs, lr, wd, dp, clip, mix) in expect.items():
        s = partialnet_train_settings(f"partialnet_{v}")
        got = (
            s["batch_size"],
            s["lr"],
            s["weight_decay"],
            s["drop_path_rate"],
            s["clip_grad"],
            s["mixup_alpha"],
        )
        assert got == (bs, lr, wd, dp, clip, mix), v
        assert s["epochs"] == 300 and s["warmup_epochs"] == 20 and s["test_crop_pct"] == 0.9
        assert s["model"] == f"partialnet_{v}"
    assert partialnet_train_settings("t0")["rand_augment"] is None
    assert partialnet_train_settings("s")["rand_augment"] == "rand-m7-mstd0.5"
    with pytest.raises(RecipeError, match="known variants"):
        partialnet_train_settings("xl")
