"""Side-by-side timing: candidates run interleaved, round after round, so drift in machine load
hits all of them alike; results are medians with spread, compared as ratios."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .._modes import in_mode
from ..errors import PartializeError
from ..inference import deploy
from .allocator import allocator_state, use_allocator
from .flops import _input_chw


@dataclass
class Timing:
    """Per-call time of one candidate in seconds over ``rounds`` interleaved rounds."""

    name: str
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    rounds: int
    calls_per_round: int
    warmup_calls: int = 0

    @property
    def noisy(self) -> bool:
        """The spread is too wide to trust a ratio at the few-percent level: IQR > 5% of the median."""
        return self.iqr_s > NOISY * self.median_s

    def to_dict(self) -> dict:
        return asdict(self) | {"noisy": self.noisy}


NOISY = 0.05  # IQR / median above which a timing is flagged


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 7,
    warmup: int = 2,
    warmup_s: float = 0.2,
    min_round_s: float = 0.05,
    max_calls: int = 200,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time each zero-argument callable, interleaving them round by round, in inference mode.

    Each candidate is warmed up by time: untimed calls until ``warmup_s`` seconds have passed (at least
    ``warmup`` calls; caches, allocator and oneDNN's kernel choice settle). Then a call count per round
    is chosen so a round lasts at least ``min_round_s`` (capped at ``max_calls``); the order rotates
    every round. A timing whose IQR exceeds 5% of its median is ``noisy``.
    """
    names = list(fns)
    calls: dict[str, int] = {}
    warm: dict[str, int] = {}
    with torch.inference_mode():
        for name in names:
            t_warm, warm[name] = time.perf_counter(), 0
            while warm[name] < warmup or time.perf_counter() - t_warm < warmup_s:
                fns[name]()
                _sync(device)
                warm[name] += 1
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            one = max(time.perf_counter() - t0, 1e-7)
            calls[name] = max(1, min(max_calls, int(min_round_s / one)))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn, k = fns[name], calls[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name in names:
        s = sorted(samples[name])
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        out[name] = Timing(name, statistics.median(s), s[0], s[-1], q[2] - q[0], rounds, calls[name], warm[name])
    return out


# --- whole models, side by side -------------------------------------------------------------------


def _stats(samples_s: Timing) -> dict:
    return {
        "median": samples_s.median_s * 1e3,
        "iqr": samples_s.iqr_s * 1e3,
        "min": samples_s.min_s * 1e3,
        "max": samples_s.max_s * 1e3,
        "rounds": samples_s.rounds,
        "calls_per_round": samples_s.calls_per_round,
        "warmup_calls": samples_s.warmup_calls,
        "noisy": samples_s.noisy,
    }


def environment_fingerprint(threads: int) -> dict:
    """What a timing depends on besides the model: machine, cores, torch and its thread settings."""
    return {
        "machine": machine_description(threads),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY") if k in os.environ},
        "memory_allocator": allocator_state(),
    }


def _prepare(
    model: torch.nn.Module, device: torch.device, channels_last: bool, deployed: bool, chw: tuple[int, ...]
) -> torch.nn.Module:
    """What is timed: the deployed form (operators' inference forms, BN folded; ``partialize.deploy``,
    given an input of the timed shape) on the device, in the memory format asked for."""
    if deployed and not getattr(model, "_partialize_deployed", False):
        p = next(model.parameters(), None)
        model = deploy(model, torch.randn(1, *chw, device=p.device if p is not None else "cpu"))
    elif device.type != "cpu" or channels_last:
        model = copy.deepcopy(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def _conditions(dev, threads, batch, chw, amp, deployed, channels_last, rounds) -> dict:
    """What a ``measure_speed`` result was measured under."""
    return {
        "device": _device_name(dev),
        "threads": threads if dev.type == "cpu" else None,
        "batch": batch,
        "input_size": list(chw),
        "precision": "amp-fp16" if amp else "fp32",
        "form": "deployed (operators in inference form, BN folded)" if deployed else "as given",
        "channels_last": channels_last,
        "rounds": rounds,
        "allocator": allocator_state()["allocator"],
        "method": "eval + inference mode, warm-up by time, interleaved rounds, medians with IQR (flagged "
        f"noisy when IQR > {NOISY:.0%} of the median); latency = batch 1, throughput = batch {batch} images "
        "/ median time",
        "environment": environment_fingerprint(threads),
    }


def measure_speed(
    models: dict[str, torch.nn.Module],
    input_size: int | tuple[int, int, int] = 224,
    *,
    threads: int = 1,
    batch: int = 16,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    rounds: int = 7,
    latency: bool = True,
    min_round_s: float = 0.1,
    deployed: bool = True,
    allocator: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Latency at batch 1 and throughput at ``batch``, every model timed interleaved with the others.

    CPU runs under ``torch.set_num_threads(threads)`` (restored after). On CUDA the calls are
    synchronised, optionally under fp16 autocast (``amp``) and channels_last; peak memory is the
    extra allocated memory of one batch forward. Figures are medians over ``rounds`` with IQR and
    range; ``latency_ms`` is ms per batch-1 call, ``throughput_ips`` images per second. Every model is
    timed in its deployed form (``deployed=False``: as given). ``allocator="reuse"`` keeps freed memory
    in the heap for every model alike, process-wide and for good (``partialize.measure.allocator``);
    ``"system"`` insists on glibc's own behaviour; None times the process as it is. The conditions'
    environment records which it was.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PartializeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if amp and dev.type != "cuda":
        raise PartializeError("--amp (fp16 autocast) is only measured on CUDA; drop --amp or use --device cuda")
    chw = _input_chw(input_size)
    if allocator is not None:
        use_allocator(allocator)  # before anything is built or timed
    prev_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    modes = contextlib.ExitStack()  # timed in eval; every module of each model back in its own mode after
    for m in models.values():
        modes.enter_context(in_mode(m))
    prepared: dict[str, torch.nn.Module] = {}

    def runner(m, x):
        if amp:
            return lambda: _amp_call(m, x)
        return lambda: m(x)

    result: dict = {
        "conditions": _conditions(dev, threads, batch, chw, amp, deployed, channels_last, rounds),
        "models": {n: {} for n in models},
    }
    warmup = 10 if dev.type == "cuda" else 2

    def timed(x: torch.Tensor) -> dict:
        """Every model on input ``x``, interleaved."""
        return time_side_by_side(
            {k: runner(m, x) for k, m in prepared.items()},
            rounds=rounds,
            warmup=warmup,
            min_round_s=min_round_s,
            device=dev,
        )

    try:
        prepared.update((n, _prepare(m, dev, channels_last, deployed, chw)) for n, m in models.items())
        if latency:
            if progress:
                progress("latency, batch 1")
            t = timed(torch.randn(1, *chw, device=dev).contiguous(memory_format=fmt))
            for n in models:
                result["models"][n]["latency_ms"] = _stats(t[n])
        if progress:
            progress(f"throughput, batch {batch}")
        xb = torch.randn(batch, *chw, device=dev).contiguous(memory_format=fmt)
        t = timed(xb)
        for n in models:
            tm = t[n]
            result["models"][n]["throughput_ips"] = {
                "median": batch / tm.median_s,
                "min": batch / tm.max_s,
                "max": batch / tm.min_s,
                "batch_time_ms": _stats(tm),
            }
            result["models"][n]["peak_memory_mib"] = (
                _cuda_peak_mib(prepared[n], xb, amp) if dev.type == "cuda" else None
            )
    finally:
        if dev.type == "cpu":
            torch.set_num_threads(prev_threads)
        modes.close()
    return result


def _amp_call(m, x):
    with torch.autocast("cuda", dtype=torch.float16):
        return m(x)


@torch.inference_mode()
def _cuda_peak_mib(model: torch.nn.Module, x: torch.Tensor, amp: bool) -> float:
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    if amp:
        _amp_call(model, x)
    else:
        model(x)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"

    return "cpu: " + machine_description(torch.get_num_threads()).split(";")[0]


def speed_summary(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    input_size: int | tuple[int, int, int] = 224,
    threads: int = 1,
    batch: int = 16,
    *,
    names: tuple[str, str] = ("before", "after"),
    rounds: int = 5,
    device: str = "cpu",
) -> dict:
    """Cheap before/after speed check (what ``partialize convert`` prints): CPU latency at batch 1
    and throughput at ``batch`` for both models, interleaved, with ratios (b relative to a).

    Returns ``{"conditions", "models": {name: {...}}, "latency_speedup", "throughput_ratio"}`` where
    ``latency_speedup = latency(a) / latency(b)`` and ``throughput_ratio = throughput(b) / throughput(a)``
    (both > 1 when b is faster).
    """
    a, b = names
    r = measure_speed(
        {a: model_a, b: model_b},
        input_size,
        threads=threads,
        batch=batch,
        device=device,
        rounds=rounds,
        min_round_s=0.05,
    )
    ma, mb = r["models"][a], r["models"][b]
    r["latency_speedup"] = ma["latency_ms"]["median"] / mb["latency_ms"]["median"]
    r["throughput_ratio"] = mb["throughput_ips"]["median"] / ma["throughput_ips"]["median"]
    return r


def machine_description(threads: int) -> str:
    """One line naming the CPU, torch version and thread count the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}; {threads} thread(s)"


def op_self_times(model: torch.nn.Module, x: torch.Tensor, calls: int = 10, warmup: int = 3) -> dict[str, float]:
    """Self CPU time per aten op (ms per call of ``model``), from torch.profiler over ``calls`` calls
    after ``warmup`` calls, in inference mode; the caller sets the thread count."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()}
