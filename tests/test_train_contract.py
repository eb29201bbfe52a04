"""The trainer calls only the operator contract (issue 12): a user's operator with its own training
setting, structure parameter, objective, per-step/per-epoch hooks, routing and freeze trains through
finetune() like the built-in ones; settings are checked against what the operators declare; DPConv's
MAC target becomes kappa at the plan's size; the CLI's operator options come from the declarations;
run_finetune() returns what it wrote."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import partialize
from partialize.cli import main
from partialize.cli.train import finetune_cmd, train_cmd
from partialize.ops.base import PartialOperator, TrainingObjective, TrainingSetting
from partialize.train import FinetuneConfig, TrainingError, finetune, freeze_dynamic, run_finetune
from partialize.train.config import check_settings, declared_settings
from partialize.train.data import digits_tensors, make_train_loader, write_image_folder
from partialize.train.finetune import param_groups


class _GateObjective(TrainingObjective):
    """Adds ``weight * g^2`` per layer and records what the trainer asked of it."""

    def __init__(self, layers, weight):
        super().__init__(layers)
        self.weight, self.starts, self.closed = weight, [], 0

    def run_settings(self):
        return {"gate_weight": self.weight}

    def epoch_start(self, epoch, total_epochs):
        self.starts.append((epoch, total_epochs))

    def __call__(self, loss):
        return loss, {n: self.weight * op.g.pow(2).sum() for n, op in self.layers.items()}

    def epoch_record(self):
        return {"gate": {n: float(op.g.detach()) for n, op in self.layers.items()}}

    def close(self):
        self.closed += 1


class Gated(PartialOperator):
    """x + g * conv(x), g a learned structure parameter; routes "train" or "hard"; freezes to a conv."""

    training_settings = {"gate_weight": TrainingSetting(0.0, check=lambda v: v >= 0, must_be=">= 0", fix="e.g. 0.5")}
    objectives: list = []

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.g = nn.Parameter(torch.tensor([0.5]))
        self.routing, self.calls, self.seen = "train", [], []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled(), self.routing, float(self.g.detach())))
        return x + self.g * self.conv(x)

    def structure_parameters(self):
        return [self.g]

    def after_step(self):
        self.calls.append("step")

    def after_epoch(self, epoch, total_epochs):
        self.calls.append(("epoch", epoch, total_epochs))

    def set_routing(self, routing):
        before, self.routing = self.routing, routing
        return before

    def freeze(self):
        dense = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, padding=1, bias=False)
        with torch.no_grad():  # x + g conv(x) as one conv: g W plus a Dirac at the centre
            dense.weight.copy_(self.g * self.conv.weight + nn.init.dirac_(torch.empty_like(self.conv.weight)))
        return dense

    @classmethod
    def training_objective(cls, layers, settings, context):
        obj = _GateObjective(layers, settings["gate_weight"])
        cls.objectives.append(obj)
        return obj


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Gated(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    xt, yt, xv, yv = digits_tensors(size=8)
    return make_train_loader(TensorDataset(xt[:64], yt[:64]), 16, 0), DataLoader(TensorDataset(xv[:32], yv[:32]), 32)


def test_a_users_operator_trains_through_the_contract(digits):
    train, val = digits
    net = _net()
    op = net[2]
    Gated.objectives.clear()
    r = finetune(net, train, val, epochs=2, lr=1e-2, gate_weight=0.5, progress=False, log=None)
    (obj,) = Gated.objectives
    steps = [s for s in op.seen if s[0] and s[1]]  # training forwards
    assert len(steps) == 8 and {s[2] for s in steps} == {"train"}  # 2 epochs x 4 steps, the training routing
    assert {s[2] for s in op.seen if not s[0]} == {"hard"}  # every evaluation forward ran the deployed routing
    assert op.routing == "hard"  # and the model is left at it
    assert op.calls == ["step"] * 4 + [("epoch", 1, 2)] + ["step"] * 4 + [("epoch", 2, 2)]
    assert obj.starts == [(1, 2), (2, 2)] and obj.closed == 1
    for e, rec in enumerate(r.history):  # the term the objective added: 0.5 g^2 at each step's forward
        g = [s[3] for s in steps[4 * e : 4 * e + 4]]
        assert rec["train_loss"] - rec["train_task_loss"] == pytest.approx(sum(0.5 * v * v for v in g) / 4, rel=1e-5)
        assert rec["gate"]["2"] == pytest.approx(float(op.g) if e == 1 else steps[4][3])
    assert r.ratios == {"2": {}}  # learned structure: what describe() says (nothing, for this operator)
    x = torch.randn(4, 3, 8, 8)
    net.eval()
    ref = net(x)
    freeze_dynamic(net)
    assert type(net[2]) is nn.Conv2d
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_structure_parameters_get_their_own_group():
    net = _net()
    groups = param_groups(net, weight_decay=0.05, gate_lr_scale=3.0)
    (gate,) = [g for g in groups if any(p is net[2].g for p in g["params"])]
    assert gate["params"] == [net[2].g] and gate["lr_scale"] == 3.0 and gate["weight_decay"] == 0.0
    decayed = [p for g in groups if g["weight_decay"] == 0.05 for p in g["params"]]
    assert all(p.ndim > 1 for p in decayed) and any(p is net[2].conv.weight for p in decayed)


def test_settings_are_checked_against_the_declarations(digits):
    train, _ = digits
    cfg = FinetuneConfig.from_settings(epochs=1, lr=1e-3, theta=4.0, router_budget=0.3, seed=2)
    assert (cfg.epochs, cfg.seed) == (1, 2) and cfg.operator_settings == {"theta": 4.0, "router_budget": 0.3}
    assert FinetuneConfig.from_settings(epochs=1, settings={"size": 8}).run_settings == {"size": 8}  # the old name
    with pytest.raises(TrainingError, match="unknown training setting.*'thetta'.*the operators' .*theta"):
        FinetuneConfig.from_settings(epochs=1, lr=1e-3, thetta=4.0).validate()
    with pytest.raises(TrainingError, match=r"--lr \(lr=\) is required"):
        FinetuneConfig.from_settings(epochs=1).validate()
    with pytest.raises(TrainingError, match=r"--dp-alpha \(dp_alpha=\) must be <= 0, got 0.5"):
        check_settings(dp_alpha=0.5)
    with pytest.raises(TrainingError, match=r"--ada-routing \(ada_routing=\) must be 'ste' or 'soft', got 'hard'"):
        check_settings(ada_routing="hard")
    with pytest.raises(TrainingError, match=r"--theta \(theta=\) must be a finite number"):
        check_settings(theta=float("inf"))
    # an unregistered operator's setting is known when the model holds it, and checked
    with pytest.raises(TrainingError, match="gate_weight must be >= 0"):
        finetune(_net(), train, None, epochs=1, lr=1e-3, gate_weight=-1.0, progress=False, log=None)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(TrainingError, match=r"--theta \(theta=\) was given but the model has no layer.*'dpconv'.*"
                                            r"ratio='dynamic'"):  # fmt: skip
        finetune(plain, train, None, epochs=1, lr=1e-3, theta=4.0, progress=False, log=None)


def _dp_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    return partialize.apply(net, ratio="dynamic", input_size=8)


def test_target_macs_becomes_kappa_at_the_plans_size(digits):
    train, _ = digits
    # by hand at 8x8: conv 3->16 = 64 * 16 * 27, linear 16 x 10; the DPConv conv costs 9 * 64 * n^2
    fixed, unit = 64 * 16 * 27 + 160, 9 * 64
    target = fixed + unit * 8**2  # every layer at width 8 of 16: theta 2, kappa (16 / 2)^2
    said = []
    r = finetune(_dp_net(), train, None, epochs=1, lr=1e-3, target_macs=target, progress=False, log=said.append)
    assert r.history[0]["kappa"] == pytest.approx(64.0)
    assert any("kappa 64.0 (uniform theta 2.00)" in s for s in said), said
    with pytest.raises(TrainingError, match=r"below the 2\.781e\+04 MACs the model spends outside"):
        finetune(_dp_net(), train, None, epochs=1, lr=1e-3, target_macs=20000, progress=False, log=None)
    with pytest.raises(TrainingError, match="give one DPConv target, not --theta.*and --target-macs"):
        finetune(_dp_net(), train, None, epochs=1, lr=1e-3, theta=4.0, target_macs=target, progress=False, log=None)


def test_cli_operator_options_come_from_the_declarations(tmp_path):
    flagged = {k: s for k, s in declared_settings().items() if s.flag}
    assert {"theta", "target_macs", "dp_alpha", "router_budget", "ada_routing"} <= set(flagged)
    for cmd in (finetune_cmd, train_cmd):
        params = {p.name: p for p in cmd.params}
        for key, s in flagged.items():
            assert params[key].opts == [s.flag] and params[key].default == s.default, key
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["finetune", str(tmp_path / "m.safetensors"), "--data", str(tmp_path), "--dp-alpha",
                                  "0.5", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 2 and "--dp-alpha (dp_alpha=) must be <= 0" in r.output and not out.exists(), r.output


def test_run_finetune_returns_what_it_wrote(tmp_path):
    xt, yt, xv, yv = digits_tensors(size=8)
    tr = torch.cat([(yt == c).nonzero()[:4, 0] for c in range(10)])  # every class in both splits
    va = torch.cat([(yv == c).nonzero()[:2, 0] for c in range(10)])
    write_image_folder(str(tmp_path / "data"), xt[tr], yt[tr], "train")
    write_image_folder(str(tmp_path / "data"), xv[va], yv[va], "val")
    ckpt = tmp_path / "r.safetensors"
    r = CliRunner().invoke(main, ["convert", "resnet10t", "-r", "dynamic", "--num-classes", "10", "--input-size", "16",
                                  "--no-speed", "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    said = []
    res = run_finetune(str(ckpt), str(tmp_path / "data"), teacher="none", epochs=1, batch_size=16, lr=1e-3,
                       device="cpu", amp=False, report=False, out_dir=str(tmp_path / "run"),
                       log=said.append)  # fmt: skip
    assert res.written and res.report_paths == []
    assert any(s.startswith("resolution: 16x16") for s in said) and any(s.startswith("epoch 1/1") for s in said)
    trained = partialize.load(res.model_path)
    ops = [(n, m) for n, m in trained.named_modules() if isinstance(m, PartialOperator)]
    learned = {n: m.describe() for n, m in ops if m.structure_parameters()}
    assert learned and res.frozen == learned  # the widths the trained model has, as frozen
    with open(res.result_path) as f:
        assert json.load(f)["frozen_ratios"] == learned
    assert res.result.history[0]["epoch"] == 1 and res.result.checkpoints["last"].endswith("last.pt")


def test_the_logged_task_loss_is_the_label_loss_when_distilling(digits):
    """train_task_loss is the label cross-entropy; with kd_weight 1 the minimised loss is the KD term
    alone, and the two differ. Oracle: the cross-entropy of the untrained net on the same images (a
    learning rate of 1e-12 leaves it as it was; the epoch's mean does not depend on the order)."""
    import torch.nn.functional as F

    train, _ = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        xs, ys = zip(*train.dataset)
        x, y = torch.stack(xs), torch.as_tensor(ys)
        label = float(F.cross_entropy(net(x), y, label_smoothing=0.1))
    r = finetune(net, train, None, teacher=teacher, epochs=1, lr=1e-12, weight_decay=0.0, kd_weight=1.0,
                 amp=False, progress=False, log=None)  # fmt: skip
    rec = r.history[0]
    assert rec["train_task_loss"] == pytest.approx(label, rel=1e-4)
    assert abs(rec["train_loss"] - rec["train_task_loss"]) > 0.05


def test_without_val_the_final_report_says_accuracy_was_not_measured(tmp_path):
    """A data folder with train/ only: the end-of-run report used to score the folder itself (train/
    as one class: top-1 0%, top-5 100%). There is nothing held out, so nothing is scored."""
    from partialize.measure.accuracy import DataError, resolve_val_dir

    xt, yt, _, _ = digits_tensors(size=8)
    write_image_folder(str(tmp_path / "data"), xt[:40], yt[:40], "train")
    with pytest.raises(DataError, match="train/ folder and no val/"):
        resolve_val_dir(str(tmp_path / "data"))
    ckpt = tmp_path / "r.safetensors"
    r = CliRunner().invoke(main, ["convert", "resnet10t", "--num-classes", "10", "--input-size", "16", "--no-speed",
                                  "--out", str(ckpt)])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = run_finetune(str(ckpt), str(tmp_path / "data"), teacher="none", epochs=1, batch_size=16, lr=1e-3,
                       device="cpu", amp=False, speed=False, out_dir=str(tmp_path / "run"),
                       log=lambda _s: None)  # fmt: skip
    with open(res.report_paths[0]) as f:
        rep = json.load(f)
    assert rep["model"]["accuracy"] is None
    assert any("has no val/ folder" in n for n in rep["model"]["notes"])
    from partialize.measure.accuracy import calibration_batch  # images only: the training layout is fine

    assert calibration_batch(partialize.load(str(ckpt)), str(tmp_path / "data"), n=8, input_size=16).shape[0] == 8


def test_a_frozen_bn_in_a_training_model_stays_frozen_through_finetune(digits):
    """A user's frozen BN (requires_grad off and eval mode, inside a model in train mode) kept its
    weights but had its running statistics updated by every epoch's train(). Oracle: its buffers as
    they were before the fine-tune."""
    train, val = digits
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    net.train()
    net[1].requires_grad_(False).eval()
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    other = net[4].running_mean.clone()
    said = []
    finetune(net, train, val, epochs=1, lr=1e-2, progress=False, log=said.append)
    assert all(torch.equal(before[k], v) for k, v in net[1].state_dict().items())
    assert not torch.equal(other, net[4].running_mean)  # the BN that trains still updates its statistics
    assert any("1 module(s) are in eval mode" in s for s in said)
