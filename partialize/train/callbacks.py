"""Everything in the training loop that is not the step itself, as callbacks: the operator families'
objectives, EMA, distillation, the progress bar, checkpoints and resume, the JSON log and the
per-epoch user function.

Every hook gets the :class:`~partialize.train.loop.Trainer` (model, optimizer, step, history...). The
loop calls them in list order; hooks that run outside the training itself (``epoch_record``,
``on_epoch_end``, the progress bar) run inside ``rng_preserved()``, so they cannot move the training's
random streams (what makes resume bit-exact).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch

# Imported here, never lazily inside the loop: importing rich draws from Python's global random
# (which timm's augmentation uses), and a resumed process would draw at another point of the stream.
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.utils import ModelEmaV3

from ..errors import CheckpointError
from ..ops.base import TrainingContext
from ..ops.registry import operators_in
from .checkpoint import load_checkpoint, rng_preserved, save_checkpoint, set_rng_state
from .config import option_name
from .distill import kd_loss
from .operators import build_objectives, evaluate

if TYPE_CHECKING:
    from .loop import Trainer


class Callback:
    """A part of the loop; override the hooks it needs (each does nothing by default)."""

    def on_train_start(self, t: Trainer) -> None:
        """After setup, before the first epoch (a resume loads its state here)."""

    def on_epoch_start(self, t: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (from 0) trains."""

    def on_task_loss(self, t: Trainer, x: torch.Tensor, logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The task loss of a step, inside autocast (distillation mixes the teacher in here)."""
        return task

    def on_loss(self, t: Trainer, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss after the task loss: global terms (the operator families' objectives)."""
        return loss

    def on_step_end(self, t: Trainer) -> None:
        """After the optimizer step; ``t.step`` is still that step's index."""

    def on_epoch_stop(self, t: Trainer) -> None:
        """After an epoch's last step, also when the epoch raised."""

    def epoch_record(self, t: Trainer) -> dict[str, Any]:
        """Entries for the epoch's log record."""
        return {}

    def on_epoch_end(self, t: Trainer, record: dict) -> None:
        """The epoch's record is complete (``t.history`` ends with it)."""

    def on_train_end(self, t: Trainer) -> None:
        """Training ended, however it ended."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries this callback adds to ``last.pt`` (tensors, numbers, strings)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Load what :meth:`checkpoint_state` saved, from a resumed checkpoint."""


class OperatorObjectives(Callback):
    """The operator families' objectives (``training_objective``) and the per-step ``after_step()``."""

    def on_train_start(self, t: Trainer) -> None:
        ctx = TrainingContext(t.raw, t.cfg.epochs, t.input_size, t.say, t.count_macs)
        with rng_preserved():  # counting MACs runs the model: it must not move the training's streams
            t.objectives = build_objectives(t.raw, t.operator_settings, ctx)

    def on_epoch_start(self, t: Trainer, epoch: int) -> None:
        for obj in t.objectives:
            obj.epoch_start(epoch + 1, t.cfg.epochs)

    def on_loss(self, t: Trainer, loss: torch.Tensor) -> torch.Tensor:
        added = []
        for obj in t.objectives:  # each family may reweight the task loss (000 eq. 8), then terms are added
            loss, terms = obj(loss)
            added += terms.values()
        for term in added:
            loss = loss + term
        return loss

    def on_step_end(self, t: Trainer) -> None:
        for op in operators_in(t.raw).values():
            op.after_step()

    def epoch_record(self, t: Trainer) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        for obj in t.objectives:
            rec.update(obj.epoch_record())
        return rec

    def on_train_end(self, t: Trainer) -> None:
        for obj in t.objectives:
            obj.close()


class EMA(Callback):
    """An exponential moving average of the weights (timm ``ModelEmaV3``), updated every step and
    evaluated each epoch (``ema_val_top1``). Built with the callback: before any objective hooks in."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.ema = ModelEmaV3(model, decay=decay)

    def on_step_end(self, t: Trainer) -> None:
        self.ema.update(t.raw, step=t.step)

    def epoch_record(self, t: Trainer) -> dict[str, Any]:
        if t.val_loader is None:
            return {}
        return {"ema_val_top1": evaluate(self.ema.module, t.val_loader, t.device, t.use_amp)["top1"]}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"ema": self.ema.module.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])


class Distillation(Callback):
    """``(1 - weight) * task + weight * T^2 KL`` against ``teacher``'s logits on the same (mixed) batch."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, weight: float) -> None:
        self.teacher, self.temperature, self.weight = teacher, float(temperature), float(weight)

    def on_task_loss(self, t: Trainer, x: torch.Tensor, logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher(x)
        if self.weight == 0.0:
            return task
        kd = kd_loss(logits.float(), t_logits.float(), self.temperature)
        return (1.0 - self.weight) * task + self.weight * kd


class ProgressBar(Callback):
    """A rich progress bar per epoch (rank 0), with the running loss and the lr."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_epoch_start(self, t: Trainer, epoch: int) -> None:
        with rng_preserved():
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(f"epoch {epoch + 1}/{t.cfg.epochs}", total=t.steps_per_epoch, info="")

    def on_step_end(self, t: Trainer) -> None:
        with rng_preserved():
            self.bar.update(self.task, advance=1, info=f"loss {t.sums['loss'] / t.sums['n']:.4f} lr {t.cur_lr:.2e}")

    def on_epoch_stop(self, t: Trainer) -> None:
        if self.bar is not None:
            with rng_preserved():
                self.bar.stop()
            self.bar = None


# best.pt: the weights and what chose them (no optimizer: it is for use, not for resuming)
BEST_KEYS = ("model", "plan", "epoch", "epoch_base", "best_top1", "best_metric", "best_score", "config", "ema")


class Checkpoint(Callback):
    """``out_dir/last.pt`` every epoch and ``best.pt`` when the score improves (atomic writes, rank 0);
    with ``resume``, the run continues from ``last.pt``, refusing settings it cannot honour."""

    def __init__(self, out_dir: str, resume: bool) -> None:
        self.last, self.best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
        self.resume = resume

    def on_train_start(self, t: Trainer) -> None:
        t.run_config = t.describe_run()
        if not self.resume:
            return
        if not os.path.isfile(self.last):
            t.say(f"--resume: no {self.last} yet, starting from scratch")
            return
        st = load_checkpoint(self.last)
        # epochs done (checkpoints without epoch_base stored the last epoch's 0-based index)
        done = int(st["epoch"]) if st.get("epoch_base") == 1 else int(st["epoch"]) + 1
        check_resume(self.last, st.get("config", {}), t.run_config, done)
        check_same_plan(self.last, st.get("plan", ""), t.plan_json())
        try:
            t.raw.load_state_dict(st["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{self.last!r} does not match this model: {e}") from None
        t.opt.load_state_dict(st["optimizer"])
        t.scaler.load_state_dict(st["scaler"])
        for cb in t.callbacks:
            cb.restore(st)
        t.start_epoch, t.step = done, int(st["step"])
        t.best, t.best_epoch = resumed_best(st), st.get("best_epoch")
        t.history = list(st.get("history", []))
        set_rng_state(st["rng"])
        if t.gen is not None and "loader" in st["rng"]:
            t.gen.set_state(st["rng"]["loader"])
        t.resumed = done
        t.say(f"resumed from {self.last} after epoch {done} (step {t.step})")
        old_epochs = st.get("config", {}).get("epochs", t.cfg.epochs)
        if old_epochs != t.cfg.epochs:
            t.say(t.schedule_change(old_epochs, st.get("scheduler", {})))

    def on_epoch_end(self, t: Trainer, record: dict) -> None:
        if t.rank == 0:
            state = self.state(t, record)
            for cb in t.callbacks:
                state.update(cb.checkpoint_state())
            save_checkpoint(state, self.last)
            if t.improved:
                save_checkpoint({k: state[k] for k in BEST_KEYS}, self.best)
        if t.distributed:
            torch.distributed.barrier()

    @staticmethod
    def state(t: Trainer, record: dict) -> dict:
        """``last.pt``'s entries before the callbacks add theirs. ``epoch`` counts from 1, as ``log.jsonl``."""
        with_val = t.val_loader is not None
        return {
            "model": t.raw.state_dict(), "plan": t.plan_json(), "optimizer": t.opt.state_dict(),
            "scheduler": {"step": t.step, "total": t.total, "warmup": t.warmup, "base_lr": t.cfg.lr,
                          "min_lr": t.cfg.min_lr},
            "scaler": t.scaler.state_dict(), "ema": None, "epoch": record["epoch"], "epoch_base": 1,
            "step": t.step, "best_top1": t.best if with_val else None, "best_epoch": t.best_epoch,
            # what chose best.pt: the highest validation top-1, or without a validation set the lowest
            # training loss (the trainer ranks epochs by -loss then; the file holds the loss itself)
            "best_metric": "val_top1" if with_val else "train_loss",
            "best_score": None if t.best is None else (t.best if with_val else -t.best),
            "history": t.history, "config": t.run_config, "rng": t.epoch_rng,
        }  # fmt: skip


def resumed_best(st: dict) -> float | None:
    """The trainer's ranking score of the checkpoint's best epoch (higher is better)."""
    if st.get("best_metric") == "train_loss":
        return None if st.get("best_score") is None else -float(st["best_score"])
    return st.get("best_score", st.get("best_top1"))


def check_same_plan(path: str, old: str, new: str) -> None:
    """CheckpointError when the checkpoint was trained from another conversion than this run's model
    (another model, recipe or layer choice): its weights would load into the wrong layers, or not at all."""
    if not old or not new:
        return  # a model without a plan (not converted by partialize): the state dict check decides
    a, b = (json.loads(p) for p in (old, new))
    for d in (a, b):  # per layer what was done to it; not the plan's timings or notes
        d["layers"] = [
            (e.get("layer"), e.get("status"), e.get("variant"), e.get("ratio")) for e in d.get("entries", [])
        ]
    what = [k for k in ("model", "recipe", "input_shape", "layers") if a.get(k) != b.get(k)]
    if what:
        x, y = next(((x, y) for x, y in zip(a["layers"], b["layers"]) if x != y), (None, None))
        layer = f"; layer {x[0]!r} is {x[2]} {x[3]} there, {y[2]} {y[3]} here" if x else ""
        raise CheckpointError(
            f"{path!r} was trained from another converted model (its {', '.join(what)} differ: model "
            f"{_spec(a)}, recipe {_recipe(a)}; this run: model {_spec(b)}, recipe {_recipe(b)}{layer}); resume "
            "with the model that run started from, or start a new run in another --out"
        )


def _spec(plan: dict) -> str:
    return repr((plan.get("model") or {}).get("spec") or "a user module")


def _recipe(plan: dict) -> str:
    return repr((plan.get("recipe") or {}).get("name"))


def check_resume(path: str, old: dict, new: dict, done: int) -> None:
    """CheckpointError listing every setting that differs from the checkpoint's (epochs may grow)."""
    changed = [k for k in new if k != "epochs" and k in old and old[k] != new[k]]
    if changed:
        diff = "; ".join(f"{option_name(k)} {old[k]!r} -> {new[k]!r}" for k in changed)
        raise CheckpointError(
            f"{path!r} was trained with other settings than this run, and resuming cannot honour a change "
            f"of them: {diff}. Resume with the checkpoint's settings, or start a new run in another --out "
            "(only --epochs may change on resume: the schedule is recomputed)"
        )
    if new["epochs"] < done:
        raise CheckpointError(
            f"{path!r} has already trained {done} epochs, more than --epochs {new['epochs']}: give --epochs >= "
            f"{done} to resume it (its weights are in {path!r}; best.pt holds the best epoch)"
        )


class JsonLog(Callback):
    """``out_dir/log.jsonl``, one record per epoch (rewritten from the history on resume: no duplicates)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "log.jsonl")

    def on_train_start(self, t: Trainer) -> None:
        if t.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.path, "w") as f:
                for rec in t.history:
                    f.write(json.dumps(rec) + "\n")

    def on_epoch_end(self, t: Trainer, record: dict) -> None:
        if t.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class EpochLine(Callback):
    """One line per epoch through ``log``: loss, val top-1, what each family says, branch histogram."""

    def on_epoch_end(self, t: Trainer, record: dict) -> None:
        msg = f"epoch {record['epoch']}/{t.cfg.epochs}: train loss {record['train_loss']:.4f}"
        if "val_top1" in record:
            msg += f", val top-1 {record['val_top1']:.2f}%"
        for obj in t.objectives:
            phrase = obj.epoch_summary(record)
            if phrase:
                msg += f", {phrase}"
        if "branch_histogram" in record:
            tot = [sum(v) for v in zip(*record["branch_histogram"].values())]
            msg += f", branch histogram {tot}"
        t.say(msg + f" ({record['time_s']:.1f}s)")


class OnEpochEnd(Callback):
    """Calls ``fn(record)`` after each epoch (``finetune(on_epoch_end=...)``)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_epoch_end(self, t: Trainer, record: dict) -> None:
        self.fn(record)
