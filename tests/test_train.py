"""Training: loss goes down, resume is bit-exact, checkpoints survive crashes, DPConv eq. 8 and its
ratios, distillation formula, router budget, CLI errors, and a 2-process gloo DDP run."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import partialize
from partialize.errors import CheckpointError
from partialize.ops import AdaPConv, DPConv
from partialize.ops.adapconv import router_budget_loss
from partialize.ops.dpconv import complexity_loss, dpconv_layers, kappa_from_theta
from partialize.train import DistillationLoss, finetune, freeze_dynamic, kd_loss, load_checkpoint, save_checkpoint
from partialize.train.data import digits_tensors, make_train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits():
    return digits_tensors(size=8)


def _loaders(digits, n_train=256, batch=32, seed=0):
    xt, yt, xv, yv = digits
    train = make_train_loader(TensorDataset(xt[:n_train], yt[:n_train]), batch, seed)
    val = DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=128)
    return train, val


def test_fixed_batch_loss_drops_by_half(digits):
    xt, yt, _, _ = digits
    model = partialize.apply(tiny_net(), ratio=0.25, input_size=8)
    loader = DataLoader(TensorDataset(xt[:32], yt[:32]), batch_size=32)  # one fixed batch per epoch
    r = finetune(model, loader, None, epochs=40, lr=5e-2, label_smoothing=0.0, weight_decay=0.0,
                 progress=False, log=None)  # fmt: skip
    first, last = r.history[0]["train_loss"], r.history[-1]["train_loss"]
    assert first > 2.0  # ~ln(10) at random init
    assert last < 0.5 * first


def _resume_model():
    torch.manual_seed(1)
    m = partialize.apply(tiny_net(), ratio="dynamic", input_size=8)
    for op in m.modules():
        if isinstance(op, DPConv):
            op.set_ratio(1.0)
    return m


RESUME_KW = dict(epochs=4, lr=5e-3, warmup_epochs=1, theta=4.0, gate_lr_scale=20.0, mixup=0.2, cutmix=0.5,
                 num_classes=10, ema_decay=0.9, seed=3, progress=False, log=None)  # fmt: skip


def test_resume_equals_uninterrupted(digits, tmp_path):
    train, val = _loaders(digits, n_train=128)
    a = _resume_model()
    ra = finetune(a, train, val, out_dir=str(tmp_path / "a"), **RESUME_KW)

    class Killed(Exception):
        pass

    def stop(rec):
        if rec["epoch"] == 2:
            raise Killed

    b = _resume_model()
    with pytest.raises(Killed):
        finetune(b, train, val, out_dir=str(tmp_path / "b"), on_epoch_end=stop, **RESUME_KW)
    torch.manual_seed(12345)  # a different RNG state in the new process must not matter
    b2 = _resume_model()
    rb = finetune(b2, train, val, out_dir=str(tmp_path / "b"), resume=True, **RESUME_KW)
    assert rb.resumed_from_epoch == 2
    sa, sb = a.state_dict(), b2.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    ea, eb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k in ea["ema"]:
        assert torch.equal(ea["ema"][k], eb["ema"][k]), k
    with open(tmp_path / "b" / "log.jsonl") as f:
        assert [int(__import__("json").loads(line)["epoch"]) for line in f] == [1, 2, 3, 4]


def test_best_checkpoint_without_validation_names_the_loss_it_kept(digits, tmp_path):
    """No validation set: best.pt is the lowest training loss, and says so (no loss posing as a top-1)."""
    train, _ = _loaders(digits, n_train=64)
    m = partialize.apply(tiny_net(), ratio=0.25, input_size=8)
    r = finetune(m, train, None, epochs=3, lr=1e-2, ema_decay=0.9, out_dir=str(tmp_path), progress=False, log=None)
    losses = [h["train_loss"] for h in r.history]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["best_top1"] is None and r.best_top1 is None
    assert best["best_metric"] == "train_loss" and best["best_score"] == pytest.approx(min(losses))
    assert best["epoch"] == 1 + losses.index(min(losses)) and best["ema"] is not None  # EMA weights kept too


def test_resume_reads_a_checkpoint_with_zero_based_epoch(digits, tmp_path):
    """last.pt files written before ``epoch_base`` stored the last epoch's 0-based index."""
    train, val = _loaders(digits, n_train=64)
    kw = dict(epochs=2, lr=1e-3, out_dir=str(tmp_path), progress=False, log=None)
    finetune(partialize.apply(tiny_net(), ratio=0.25, input_size=8), train, val, **{**kw, "epochs": 1})
    st = load_checkpoint(tmp_path / "last.pt")
    st.pop("format")
    st.pop("epoch_base")
    st["epoch"] = 0
    save_checkpoint(st, tmp_path / "last.pt")
    r = finetune(partialize.apply(tiny_net(), ratio=0.25, input_size=8), train, val, resume=True, **kw)
    assert r.resumed_from_epoch == 1 and [h["epoch"] for h in r.history] == [1, 2]


def test_resume_from_another_converted_model_is_refused_with_both_named(digits, tmp_path):
    train, val = _loaders(digits, n_train=64)
    kw = dict(epochs=2, lr=1e-3, out_dir=str(tmp_path), progress=False, log=None)
    finetune(partialize.apply(tiny_net(), ratio=0.25, input_size=8), train, val, **{**kw, "epochs": 1})
    other = partialize.apply(tiny_net(), ratio=0.5, input_size=8)
    with pytest.raises(CheckpointError, match="another converted model") as e:
        finetune(other, train, val, resume=True, **kw)
    assert "another --out" in str(e.value)
    same = partialize.apply(tiny_net(), ratio=0.25, input_size=8)  # the model it started from resumes
    assert finetune(same, train, val, resume=True, **kw).resumed_from_epoch == 1


def test_checkpoint_is_weights_only_and_complete(digits, tmp_path):
    train, val = _loaders(digits, n_train=64)
    m = partialize.apply(tiny_net(), ratio=0.25, input_size=8)
    finetune(m, train, val, epochs=1, lr=1e-3, ema_decay=0.9, out_dir=str(tmp_path), progress=False, log=None)
    st = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "rng", "plan"} <= set(st)
    assert st["epoch"] == 1 and st["scheduler"]["step"] == len(train)  # counted from 1, as log.jsonl
    assert '"entries"' in st["plan"]  # the plan travels as a JSON string
    assert torch.equal(st["model"]["3.conv.weight"], m.state_dict()["3.conv.weight"])
    assert os.path.isfile(tmp_path / "best.pt")


def test_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(1000.0)}, path)

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies half-way through the write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    st = load_checkpoint(path)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.arange(1000.0))
    assert os.listdir(tmp_path) == ["last.pt"]  # the temp file was removed
    path.write_bytes(path.read_bytes()[:100])  # a truncated file (not ours) is a clear error
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_checkpoint_survives_sigkill(tmp_path):
    """A process rewriting a 4 MB checkpoint in a loop is SIGKILLed: the file on disk is always whole."""
    code = (
        "import torch,sys\nfrom partialize.train.checkpoint import save_checkpoint\n"
        "i=0\nprint('ready',flush=True)\n"
        "while True:\n i+=1\n save_checkpoint({'epoch':i,'w':torch.full((1<<20,),float(i))},sys.argv[1])\n"
    )
    path = tmp_path / "last.pt"
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, cwd=ROOT)
    p.stdout.readline()
    deadline = time.time() + 20
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = load_checkpoint(path)
    assert st["epoch"] >= 1 and bool((st["w"] == float(st["epoch"])).all())


def test_dpconv_loss_matches_eq8():
    m = nn.Sequential(DPConv(16), DPConv(16))
    m[0].set_ratio(1.0)  # n = 16
    m[1].set_ratio(0.5)  # n = 8
    with torch.no_grad():
        m[1].gates.copy_(torch.tensor([0.5, -0.5, -0.3, -0.5]))  # n = 8; psi = 0.2 (gate 2 > gate 1)
    task = torch.tensor(2.0)
    kappa = kappa_from_theta(dpconv_layers(m).values(), 4.0)
    assert kappa == 2 * (16 / 4) ** 2
    loss, t = complexity_loss(task, dpconv_layers(m).values(), kappa)
    zeta = 16**2 + 8**2
    assert t.zeta == zeta and t.alpha == -0.01
    assert math.isclose(float(loss), 2.0 * (kappa / zeta) ** -0.01 + 0.9 * 0.2, rel_tol=1e-6)
    loss, t = complexity_loss(task, [m[0], m[1]], kappa=1000.0)  # under budget: alpha = 0
    assert t.alpha == 0.0 and math.isclose(float(loss), 2.0 + 0.9 * 0.2, rel_tol=1e-6)
    loss, _ = complexity_loss(task, [m[0], m[1]], kappa)
    loss.backward()  # at full width (zeta_0 = C^2) eq. 8 still pushes the gates up (fewer channels)
    assert bool((m[0].gates.grad < 0).all())


def test_dpconv_ratios_move_to_target_and_freeze(digits):
    train, val = _loaders(digits, n_train=256)
    torch.manual_seed(0)
    m = partialize.apply(tiny_net(), ratio="dynamic", input_size=8)
    dp = [op for op in m.modules() if isinstance(op, DPConv)]
    assert len(dp) == 1
    dp[0].set_ratio(1.0)
    kappa = kappa_from_theta(dp, 4.0)  # target width 16 / 4 = 4
    r = finetune(m, train, val, epochs=3, lr=3e-3, theta=4.0, gate_lr_scale=20.0, progress=False, log=None)
    traj = [h["ratios"]["3"] for h in r.history]
    assert traj[-1] == dp[0].ratio and 0.125 <= traj[-1] <= 0.5  # from 1.0 to within one step of 1/4
    assert [h["zeta"] for h in r.history] == [(16 * t) ** 2 for t in traj]  # zeta = n^2 at each epoch
    assert r.history[-1]["zeta"] <= 4 * kappa
    assert dp[0].is_prefix()
    x = digits[2][:16]
    m.eval()
    ref = m(x)
    ratios = freeze_dynamic(m)
    assert ratios["3"]["width"] == dp[0].num_conv_channels
    assert not any(isinstance(op, DPConv) for op in m.modules())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # frozen slice = what was trained


def test_kd_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    T = 3.0
    p_t = F.softmax(t / T, dim=1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
    assert math.isclose(float(kd_loss(s, t, T)), float(manual), rel_tol=1e-5)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randint(0, 10, (8,), generator=g)
    crit = DistillationLoss(nn.CrossEntropyLoss(), temperature=T, weight=0.3)
    expect = 0.7 * F.cross_entropy(s, y) + 0.3 * manual
    assert math.isclose(float(crit(s, y, t)), float(expect), rel_tol=1e-5)
    assert math.isclose(float(crit(s, y)), float(F.cross_entropy(s, y)), rel_tol=1e-6)


def test_router_budget_value_and_direction():
    torch.manual_seed(0)
    op = AdaPConv(16)  # widths 2, 4, 8; router starts uniform
    x = torch.randn(4, 16, 8, 8)
    term = router_budget_loss(op, x, budget=0.1, weight=1.0)
    assert term.requires_grad
    cost = (1 / 16 + 1 / 4 + 1.0) / 3  # uniform router: mean of (n_i / n_max)^2
    assert float(term.detach()) == pytest.approx(cost - 0.1, rel=1e-5)
    term.backward()
    with torch.no_grad():
        op.router.bias -= 10.0 * op.router.bias.grad  # a step along the budget's gradient
    assert float(router_budget_loss(op, x, 0.1)) < float(term) - 0.05
    assert int(op.route(x).argmax(1)[0]) == 0  # now prefers the cheapest branch


def test_ada_training_logs_hard_histogram(digits):
    train, val = _loaders(digits, n_train=64)
    m = partialize.apply(tiny_net(), ratio="adaptive", input_size=8)
    r = finetune(m, train, val, epochs=1, lr=1e-3, router_budget=0.3, progress=False, log=None)
    hist = r.history[0]["branch_histogram"]
    assert list(hist) == ["3"] and sum(hist["3"]) == 128  # every val image routed to one branch
    assert 0.0 < r.history[0]["router_expected_cost"] <= 1.0


def test_cli_errors(tmp_path):
    from partialize.cli import main

    conv = tmp_path / "m.safetensors"
    partialize.save(partialize.apply(tiny_net(), input_size=8), conv)
    runner = CliRunner()
    res = runner.invoke(main, ["finetune", str(conv), "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a directory" in res.output
    (tmp_path / "d" / "val").mkdir(parents=True)
    res = runner.invoke(main, ["finetune", str(conv), "--data", str(tmp_path / "d")])
    assert res.exit_code == 2 and "no train/ subfolder" in res.output
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "c" / "last.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes: ~12 s on 2 cores
def test_ddp_two_gloo_processes_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the venv imports this checkout (editable install)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(ROOT, "tests", "_train_ddp_worker.py"), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r0["steps"] == 4  # 128 images / 2 ranks / batch 16
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert not torch.equal(r0["final"]["3.conv.weight"], r0["init"]["3.conv.weight"])  # it trained
    ck = load_checkpoint(tmp_path / "run" / "last.pt")  # rank 0 wrote it, with the DDP-free keys
    assert ck["epoch"] == 2 and torch.equal(ck["model"]["3.conv.weight"], r0["final"]["3.conv.weight"])
    assert sum(1 for _ in open(tmp_path / "run" / "log.jsonl")) == 2


def test_finetune_refuses_a_deployed_model_clearly(digits, tmp_path):
    """A deployed model has no trainable parameters: a TrainingError that says so (not AdamW's ValueError)."""
    from partialize.base_model import build_model
    from partialize.cli import main
    from partialize.train.finetune import TrainingError

    train, _ = _loaders(digits, n_train=32)
    frozen = partialize.deploy(partialize.apply(tiny_net(), ratio=0.5, input_size=8))
    with pytest.raises(TrainingError, match="no trainable parameters.*training form"):
        finetune(frozen, train, None, epochs=1, lr=1e-3, progress=False, log=None)
    conv = partialize.apply(build_model("torchvision:resnet18", weights="random", num_classes=2), input_size=32)
    path = tmp_path / "deployed.safetensors"
    partialize.save(conv, path, deployed=True)
    (tmp_path / "d" / "train").mkdir(parents=True)
    res = CliRunner().invoke(main, ["finetune", str(path), "--data", str(tmp_path / "d"), "--teacher", "none"])
    assert res.exit_code == 2, res.output
    assert "deployed.safetensors" in res.output and "is marked deployed" in res.output
    assert "partialize convert --out" in res.output and "Traceback" not in res.output


def test_evaluate_restores_each_routing(digits):
    """evaluate() routes hard for the measurement, then gives every Ada-PConv back its own routing."""
    from partialize.train.finetune import evaluate

    _, val = _loaders(digits)
    m = nn.Sequential(AdaPConv(16, routing="ste"), AdaPConv(16, routing="soft"), nn.Conv2d(16, 3, 1))
    m = nn.Sequential(nn.Conv2d(3, 16, 1), *m, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    ev = evaluate(m.train(), val, torch.device("cpu"))
    assert [m[1].routing, m[2].routing] == ["ste", "soft"]
    assert m.training  # and train mode too
    assert [sum(h) for h in ev["branch_histogram"].values()] == [128, 128]  # both routed hard, per image


def test_ada_trains_by_default_with_the_routing_it_deploys(digits):
    """Default routing while training is ste: the forward value is hard routing's, what deploy() runs;
    the CLI's default is the same; deploying it does not warn."""
    import warnings

    from partialize.cli.train import finetune_cmd, train_cmd
    from partialize.ops.adapconv import SoftRoutingWarning

    train, _ = _loaders(digits, n_train=64)
    m = partialize.apply(tiny_net(), ratio="adaptive", input_size=8)
    op = next(o for o in m.modules() if isinstance(o, AdaPConv))
    seen = []
    op.register_forward_pre_hook(lambda mod, _: seen.append(mod.routing) if mod.training else None)
    finetune(m, train, None, epochs=1, lr=1e-3, progress=False, log=None)
    assert seen and set(seen) == {"ste"}
    x = torch.randn(6, 16, 8, 8)
    op.train().routing = "ste"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SoftRoutingWarning)
        deployed = op.deploy()
        torch.testing.assert_close(op(x), deployed(x), rtol=0, atol=1e-6)  # trained value = deployed value
        partialize.deploy(m)
    for cmd in (finetune_cmd, train_cmd):
        assert next(p for p in cmd.params if p.name == "ada_routing").default == "ste"


def test_deploying_a_soft_trained_ada_warns(digits):
    from partialize.ops.adapconv import SoftRoutingWarning

    train, _ = _loaders(digits, n_train=64)
    m = partialize.apply(tiny_net(), ratio="adaptive", input_size=8)
    finetune(m, train, None, epochs=1, lr=1e-3, ada_routing="soft", progress=False, log=None)
    with pytest.warns(SoftRoutingWarning, match="trained with soft routing.*--ada-routing ste"):
        partialize.deploy(m)
    with pytest.warns(SoftRoutingWarning):
        freeze_dynamic(m)


class _Augmented(torch.utils.data.Dataset):
    """Digits with a flip decided by Python's global random, as timm's transforms do."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        import random

        x = self.x[i]
        return (x.flip(-1) if random.random() < 0.5 else x), self.y[i]


def _rng_kw():
    return dict(epochs=2, lr=5e-3, warmup_epochs=1, mixup=0.2, num_classes=10, seed=5, log=None)


def test_code_outside_training_does_not_move_its_random_streams(digits, tmp_path):
    """The progress bar, evaluation, checkpoint writes and a callback that draws from every global RNG
    (what importing rich did) leave the training exactly as without them."""
    import random

    import numpy as np

    xt, yt, xv, yv = digits
    val = DataLoader(TensorDataset(xv[:64], yv[:64]), batch_size=64)

    def run(**kw):
        torch.manual_seed(0)
        m = tiny_net()
        finetune(m, make_train_loader(_Augmented(xt[:64], yt[:64]), 16, 0), val, **_rng_kw(), **kw)
        return m.state_dict()

    plain = run(progress=False)

    def hungry(rec):
        random.random(), np.random.rand(), torch.rand(1)

    noisy = run(progress=True, on_epoch_end=hungry, out_dir=str(tmp_path))
    for k in plain:
        assert torch.equal(plain[k], noisy[k]), k


def test_resume_with_loader_workers_is_bit_exact(digits, tmp_path):
    """Workers seed their augmentation from the loader's generator; its state is part of the checkpoint."""
    xt, yt, _, _ = digits

    def loader():
        return make_train_loader(_Augmented(xt[:64], yt[:64]), 16, 0, workers=2)

    torch.manual_seed(0)
    a = tiny_net()
    finetune(a, loader(), None, out_dir=str(tmp_path / "a"), progress=False, **_rng_kw())

    class Killed(Exception):
        pass

    def stop(rec):
        if rec["epoch"] == 1:
            raise Killed

    torch.manual_seed(0)
    b = tiny_net()
    with pytest.raises(Killed):
        finetune(b, loader(), None, out_dir=str(tmp_path / "b"), progress=False, on_epoch_end=stop, **_rng_kw())
    b = tiny_net()
    r = finetune(b, loader(), None, out_dir=str(tmp_path / "b"), resume=True, progress=False, **_rng_kw())
    assert r.resumed_from_epoch == 1
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
