"""How much does TracIn self-influence cost, in training epochs, and against Captum?

    python benchmarks/bench_core.py [--quick] [--device cpu|cuda] [--json PATH] [--profile]

For two models, on 6,400 synthetic rows with batches of 256 everywhere:

* (a) an MLP 40→128→64→10 on Gaussian features, 10 classes;
* (b) a small CNN on 8×8 single-channel images:
  Conv2d(1,16,3,p1)-ReLU-Conv2d(16,32,3,p1)-ReLU-MaxPool2d(2)-Flatten-Linear(512,10).

it measures, in one run, the time of one plain training epoch (SGD step per batch, same rows,
same batch size, ``DataLoader(dataset, 256, shuffle=True)``) and the time of self-influence for
ONE checkpoint with:

* tracin_tasks, all layers and ``layers="last"``;
* Captum ``TracInCP`` (hook path: ``sample_wise_grads_per_batch=True``, all layers);
* Captum ``TracInCPFast`` (final fc layer; Captum leaves out that layer's bias);
* plain ``torch.func``: ``functional_call`` + ``vmap(grad)`` over all parameters, summing the
  squared norms per row.

Every figure is the median of several repeats after a warm-up, the repeats of all methods
interleaved round-robin (so changes in machine load hit them alike), and is also given in
epochs (time / epoch time). Each method reads the checkpoint from the same ``torch.save`` file
once per call. tracin_tasks is given the Dataset and the batch size, as its API intends, and
builds its own loader; Captum and torch.func walk ``DataLoader(dataset, 256)`` (on CUDA every
loader's collate moves the batch to the device), so data loading is paid alike. The scores of
tracin_tasks, Captum and torch.func are compared on the same data.

Then, in a fresh subprocess per size, the peak memory of tracin_tasks' all-layer
self-influence over N and 10×N rows of a lazily generated dataset (rows are synthesised from
their index, so the data takes no memory): on CPU the peak RSS growth over a baseline taken
after model/data creation (the kernel's high-water mark is reset there through
/proc/self/clear_refs; ru_maxrss deltas where that is not possible), on CUDA the growth of
``torch.cuda.max_memory_allocated``.

The targets are printed next to the figures and marked met or not; nothing fails on a miss
(the exit status is 0 unless something crashed). ``--quick`` shrinks everything to a smoke
test; ``--profile`` adds a torch.profiler / cProfile breakdown of tracin_tasks' all-layer call.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

from tracin_tasks import Checkpoint, TracIn  # noqa: E402

# Captum is imported by main() only (it pulls in matplotlib; the memory workers need none of it)
captum: Any = None
TracInCP: Any = None
TracInCPFast: Any = None


def _import_captum() -> None:
    global captum, TracInCP, TracInCPFast
    try:
        import captum as _captum
        from captum.influence import TracInCP as _cp, TracInCPFast as _cpf
    except ImportError:  # the Captum rows then read "n/a"
        return
    captum, TracInCP, TracInCPFast = _captum, _cp, _cpf


warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="captum")

N_CLASSES = 10
LEARNING_RATE = 0.1
TARGETS = {
    "mlp_all_epochs": 1.0,  # tracin_tasks all layers, epochs per checkpoint, MLP
    "cnn_all_epochs": 2.0,  # same, CNN
    "last_epochs": 0.5,  # tracin_tasks layers="last", both models
    "cnn_speedup_vs_captum": 4.0,  # Captum TracInCP time / tracin_tasks all-layer time, CNN
    "memory_ratio": 1.2,  # peak growth at 10×N / at N
}


# ------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc = nn.Linear(64, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, N_CLASSES)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": ("MLP 40→128→64→10", MLP, (40,)),
    "cnn": ("CNN 8×8: conv16-conv32-pool-fc", CNN, (1, 8, 8)),
}


def _templates(kind: str, seed: int) -> torch.Tensor:
    """One mean per class: Gaussian feature means (MLP) or 8×8 patterns (CNN)."""
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn((N_CLASSES, *MODELS[kind][2]), generator=gen)


def make_dataset(kind: str, n: int, seed: int = 0) -> TensorDataset:
    """n rows: class mean + unit Gaussian noise, 5% of labels flipped (rows to be found)."""
    means = _templates(kind, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    x = means[y] + torch.randn((n, *MODELS[kind][2]), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.05
    y = torch.where(flip, (y + torch.randint(1, N_CLASSES, (n,), generator=gen)) % N_CLASSES, y)
    return TensorDataset(x, y)


class LazySynthetic(Dataset):
    """Rows synthesised from their index with a seeded generator: no memory for the data."""

    def __init__(self, kind: str, n: int, seed: int = 0):
        self.kind, self.n, self.seed = kind, n, seed
        self.means = _templates(kind, seed)
        self.shape = MODELS[kind][2]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = int(torch.randint(0, N_CLASSES, (1,), generator=gen))
        return self.means[y] + torch.randn(self.shape, generator=gen), y


def make_loader(data: Dataset, batch_size: int, device: torch.device, shuffle: bool = False) -> DataLoader:
    """The one DataLoader every method walks; batches land on ``device``."""
    if device.type == "cpu":
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle)

    def collate(rows):
        return tuple(t.to(device, non_blocking=True) for t in default_collate(rows))

    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float
    times: list[float]
    result: Any = field(default=None, repr=False)


def measure_interleaved(
    fns: dict[str, tuple[Callable[[], Any], int, int]], device: torch.device
) -> dict[str, Timing]:
    """Median wall time of each ``fn`` in ``{name: (fn, repeats, warmups)}``.

    After the warm-ups, the timed runs go round-robin (round r times every method that still
    has repeats left, in an order rotated by r), so a change in machine load during the run hits
    every method alike instead of whichever happened to be measured then.
    """
    results: dict[str, Any] = {}
    for name, (fn, _, warmups) in fns.items():
        for _ in range(warmups):
            results[name] = fn()
    gc.collect()  # once, outside the timed runs (it can take a while with a big heap)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(rep for _, rep, _ in fns.values())):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn, repeats, _ = fns[name]
            if r >= repeats:
                continue
            _sync(device)
            t0 = time.perf_counter()
            results[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: Timing(statistics.median(times[n]), times[n], results.get(n)) for n in fns}


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer) -> None:
    model.train()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def load_for_captum(lrs: dict[str, float]) -> Callable[[nn.Module, str], float]:
    """Captum's checkpoints_load_func: load the weights into the model, return the lr."""

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, map_location=next(model.parameters()).device, weights_only=True))
        return lrs[path]

    return load


def torch_func_self_influence(model: nn.Module, path: str, lr: float, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """The textbook per-example-gradient baseline: vmap(grad) over every parameter."""
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def row_loss(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))
    out = []
    for x, y in loader:
        g = per_row(params, x, y)
        out.append(lr * sum(t.pow(2).flatten(1).sum(1, dtype=torch.float64) for t in g.values()))
    return torch.cat(out)


def final_bias_term(model: nn.Module, path: str, lr: float, loader: DataLoader, device: torch.device) -> np.ndarray:
    """η‖∂ℓ/∂logits‖²: the final layer's bias part, which TracInCPFast leaves out."""
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    model.eval()
    parts = []
    with torch.no_grad():
        for x, y in loader:
            g = torch.softmax(model(x).double(), 1) - F.one_hot(y, N_CLASSES).double()
            parts.append(lr * g.pow(2).sum(1))
    return torch.cat(parts).cpu().numpy()


def rel_diffs(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max over rows of |a-b|/|b|, max|a-b| / max|b|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    denom = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    return float((np.abs(ours - ref) / denom).max()), float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------
def bench_model(kind: str, args, device: torch.device, workdir: str) -> dict[str, Any]:
    title, build, _ = MODELS[kind]
    torch.manual_seed(0)
    model = build().to(device)
    data = make_dataset(kind, args.rows)
    train_loader = make_loader(data, args.batch_size, device, shuffle=True)
    loader = make_loader(data, args.batch_size, device)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    res: dict[str, Any] = {"title": title, "params": sum(p.numel() for p in model.parameters()), "rows": args.rows}
    # a couple of epochs give a realistic checkpoint and warm the training path up
    for _ in range(args.train_epochs):
        train_epoch(model, train_loader, opt)
    path = os.path.join(workdir, f"{kind}.pt")
    torch.save(model.state_dict(), path)
    ckpt = Checkpoint(path=path, learning_rate=LEARNING_RATE, step=args.train_epochs)
    lrs = {path: LEARNING_RATE}
    fresh = build().to(device)  # its own weights are never used: every method loads the file

    tr_all = TracIn(fresh, [ckpt], device=device)
    tr_last = TracIn(fresh, [ckpt], layers="last", device=device)
    # the first call on a new TracIn builds its engine and checks it once against autograd;
    # it doubles as tracin_all's warm-up
    t0 = time.perf_counter()
    tr_all.self_influence(data, args.batch_size)
    _sync(device)
    res["tracin_all_first_call_s"] = time.perf_counter() - t0

    # {name: (fn, repeats, warm-ups)}; the training epoch keeps training the model (its
    # checkpoint is already saved) and is timed in the same rounds as everything else
    fns: dict[str, tuple[Callable[[], Any], int, int]] = {
        "epoch": (lambda: train_epoch(model, train_loader, opt), args.repeats, 0),
        "data_pass": (lambda: [None for _ in loader], args.repeats, 1),
        "tracin_all": (lambda: tr_all.self_influence(data, args.batch_size), args.repeats, 0),
        "tracin_last": (lambda: tr_last.self_influence(data, args.batch_size), args.repeats, 1),
    }
    if captum is not None:
        cp = TracInCP(
            copy.deepcopy(fresh), data, [path], checkpoints_load_func=load_for_captum(lrs),
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size,
            sample_wise_grads_per_batch=True,
        )
        cpf = TracInCPFast(
            copy.deepcopy(fresh), "fc", data, [path], checkpoints_load_func=load_for_captum(lrs),
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size,
        )
        fns["captum_cp"] = (lambda: cp.self_influence(loader, outer_loop_by_checkpoints=True), args.captum_repeats, 1)
        fns["captum_fast"] = (lambda: cpf.self_influence(loader, outer_loop_by_checkpoints=True), args.captum_repeats, 1)
    func_model = copy.deepcopy(fresh)
    fns["torch_func"] = (lambda: torch_func_self_influence(func_model, path, LEARNING_RATE, loader, device), args.repeats, 1)

    timings = measure_interleaved(fns, device)
    epoch_s = timings["epoch"].median
    outputs = {}
    for name, t in timings.items():
        res[f"{name}_s"] = t.median
        res[f"{name}_times"] = t.times
        res[f"{name}_epochs"] = t.median / epoch_s
        out = t.result
        if isinstance(out, torch.Tensor):
            outputs[name] = out.detach().cpu().double().numpy()
        elif isinstance(out, np.ndarray):
            outputs[name] = out

    agree = {}
    if "captum_cp" in outputs:
        agree["tracin_all_vs_captum_cp"] = rel_diffs(outputs["tracin_all"], outputs["captum_cp"])
        res["speedup_vs_captum_cp"] = res["captum_cp_s"] / res["tracin_all_s"]
        bias = final_bias_term(copy.deepcopy(fresh), path, LEARNING_RATE, loader, device)
        agree["tracin_last_vs_captum_fast_plus_bias"] = rel_diffs(outputs["tracin_last"], outputs["captum_fast"] + bias)
    agree["tracin_all_vs_torch_func"] = rel_diffs(outputs["tracin_all"], outputs["torch_func"])
    res["agreement"] = agree
    return res


# ------------------------------------------------------------------------------------------
# memory, in a fresh process per size
# ------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_worker(kind: str, rows: int, ckpt_path: str, device_name: str, batch_size: int, threads: int) -> None:
    """Print one JSON line: peak memory growth of tracin_tasks' all-layer self-influence."""
    import resource

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = MODELS[kind][1]().to(device)
    data = LazySynthetic(kind, rows)
    tracin = TracIn(model, [Checkpoint(path=ckpt_path, learning_rate=LEARNING_RATE, step=0)], device=device)
    gc.collect()
    out: dict[str, Any] = {"kind": kind, "rows": rows, "device": device.type}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    # Reset the kernel's high-water mark (VmHWM) so the peak is this call's, not import's.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss0 = _status_kb("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    scores = tracin.self_influence(data, batch_size)
    out["seconds"] = time.perf_counter() - t0
    if hwm_reset and rss0 is not None:
        out["cpu_peak_growth_kb"] = _status_kb("VmHWM") - rss0
        out["cpu_method"] = "VmHWM after clear_refs - VmRSS before"
    else:
        out["cpu_peak_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
        out["cpu_method"] = "ru_maxrss delta"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_growth_bytes"] = torch.cuda.max_memory_allocated(device) - base
    out["finite"] = bool(np.isfinite(scores).all()) and scores.shape == (rows,)
    print("MEMORY_RESULT " + json.dumps(out), flush=True)


def bench_memory(args, device: torch.device, workdir: str) -> dict[str, Any]:
    """Launch one fresh process per (model, size); they run side by side (memory is per process)."""
    results: dict[str, Any] = {}
    procs = []
    for kind in args.models:
        path = os.path.join(workdir, f"{kind}.pt")
        if not os.path.exists(path):  # the timing run saved it; otherwise use fresh weights
            torch.manual_seed(0)
            torch.save(MODELS[kind][1]().state_dict(), path)
        for rows in (args.memory_rows, 10 * args.memory_rows):
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", kind, str(rows), path,
                   "--device", device.type, "--batch-size", str(args.batch_size), "--threads", str(args.memory_threads)]
            procs.append((kind, rows, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for kind, rows, proc in procs:
        stdout, stderr = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("MEMORY_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory worker {kind}/{rows} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
        results.setdefault(kind, {})[rows] = json.loads(line.split(" ", 1)[1])
    for kind, by_rows in results.items():
        small, large = by_rows[args.memory_rows], by_rows[10 * args.memory_rows]
        key = "cuda_peak_growth_bytes" if device.type == "cuda" else "cpu_peak_growth_kb"
        unit = 1 if device.type == "cuda" else 1024
        by_rows["n_bytes"] = small[key] * unit
        by_rows["10n_bytes"] = large[key] * unit
        by_rows["ratio"] = large[key] / small[key] if small[key] > 0 else float("inf")
        if device.type == "cuda":
            by_rows["cpu_ratio"] = large["cpu_peak_growth_kb"] / max(small["cpu_peak_growth_kb"], 1)
    return results


# ------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------
def profile_tracin(kind: str, args, device: torch.device, workdir: str) -> str:
    """torch.profiler op table and cProfile top functions for one all-layer call."""
    path = os.path.join(workdir, f"{kind}.pt")
    data = make_dataset(kind, args.rows)
    tr = TracIn(MODELS[kind][1]().to(device), [Checkpoint(path=path, learning_rate=LEARNING_RATE)], device=device)
    tr.self_influence(data, args.batch_size)  # warm
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        tr.self_influence(data, args.batch_size)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48)
    pr = cProfile.Profile()
    pr.enable()
    tr.self_influence(data, args.batch_size)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(28)
    text = buf.getvalue()
    text = text[text.find("   ncalls"):] if "   ncalls" in text else text
    return f"--- torch.profiler, {kind}, tracin_tasks all layers ---\n{table}\n--- cProfile (cumulative), {kind} ---\n{text}"


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA — {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU — {name} ({os.cpu_count()} logical cores)"


def _tracin_version() -> str:
    import tracin_tasks

    text = f"{tracin_tasks.__version__} from {os.path.dirname(os.path.abspath(tracin_tasks.__file__))}"
    try:
        rev = subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", _REPO, "status", "--porcelain", "--", "tracin_tasks"], capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            text += f" (git {rev.stdout.strip()}{', tracin_tasks/ has uncommitted changes' if dirty.stdout.strip() else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.1f} ms" if s < 10 else f"{s:9.2f} s "


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:8.1f} MiB"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT MET")


def report(results: dict[str, Any], memory: dict[str, Any] | None, args, device: torch.device) -> tuple[str, list]:
    lines = []
    verdicts = []  # (what, value, target, ok)
    w = lines.append
    w("=" * 100)
    w("tracin_tasks core benchmark: self-influence cost per checkpoint, in training epochs")
    w("=" * 100)
    w(f"device       : {_device_name(device)}")
    w(f"torch        : {torch.__version__}   threads: {torch.get_num_threads()} intra-op, "
      f"{torch.get_num_interop_threads()} inter-op   python {platform.python_version()}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        w(f"load average : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (at the end of the run; other work on the machine skews timings)")
    w(f"tracin_tasks : {_tracin_version()}")
    w(f"captum       : {captum.__version__ if captum is not None else 'not installed (Captum rows n/a)'}")
    w(f"setup        : {args.rows} rows, batch {args.batch_size}, 1 checkpoint (float32); median of "
      f"{args.repeats} repeats after a warm-up (Captum: {args.captum_repeats}), interleaved round-robin{'   [QUICK MODE]' if args.quick else ''}")
    w("               tracin_tasks gets the Dataset; training/Captum/torch.func walk DataLoader(dataset, batch);")
    w("               every method reads the checkpoint file once per call")
    w("")
    labels = [
        ("tracin_all", "tracin_tasks, all layers"),
        ("tracin_last", 'tracin_tasks, layers="last"'),
        ("captum_cp", "Captum TracInCP (hooks), all layers"),
        ("captum_fast", "Captum TracInCPFast (final fc weight)"),
        ("torch_func", "torch.func vmap(grad), all layers"),
    ]
    for kind, r in results.items():
        w(f"[{kind}] {r['title']}  ({r['params']:,} parameters)")
        w(f"  {'method':<42}{'median':>12}{'epochs/ckpt':>14}   {'target':<14}{'':<8}")
        w(f"  {'training epoch (SGD step per batch)':<42}{_fmt_s(r['epoch_s'])}{1.0:>14.2f}")
        w(f"  {'  (one pass of the DataLoader alone)':<42}{_fmt_s(r['data_pass_s'])}{r['data_pass_s'] / r['epoch_s']:>14.2f}")
        for key, label in labels:
            if f"{key}_s" not in r:
                w(f"  {label:<42}{'n/a':>12}{'n/a':>14}")
                continue
            target, ok = "", None
            epochs = r[f"{key}_epochs"]
            if key == "tracin_all":
                limit = TARGETS[f"{kind}_all_epochs"]
                target, ok = f"≤ {limit:g} epoch", epochs <= limit
                verdicts.append((f"{kind}: tracin_tasks all layers, epochs/ckpt", f"{epochs:.2f}", target, ok))
            elif key == "tracin_last":
                limit = TARGETS["last_epochs"]
                target, ok = f"≤ {limit:g} epoch", epochs <= limit
                verdicts.append((f'{kind}: tracin_tasks layers="last", epochs/ckpt', f"{epochs:.2f}", target, ok))
            mark = _mark(ok) if target else ""
            w(f"  {label:<42}{_fmt_s(r[f'{key}_s'])}{epochs:>14.2f}   {target:<14}{mark}")
        w(f"  first call on a new TracIn (engine build + one-off autograd check): {_fmt_s(r['tracin_all_first_call_s']).strip()}")
        if "speedup_vs_captum_cp" in r:
            sp = r["speedup_vs_captum_cp"]
            if kind == "cnn":
                limit = TARGETS["cnn_speedup_vs_captum"]
                ok = sp >= limit
                verdicts.append(("cnn: speed-up of tracin_tasks all layers over Captum TracInCP", f"{sp:.2f}×", f"≥ {limit:g}×", ok))
                w(f"  speed-up over Captum TracInCP (all layers): {sp:.2f}×   target ≥ {limit:g}×   {_mark(ok)}")
            else:
                w(f"  speed-up over Captum TracInCP (all layers): {sp:.2f}×   (no target on the MLP)")
        w(f"  speed-up over torch.func vmap(grad): {r['torch_func_s'] / r['tracin_all_s']:.2f}×")
        w("  agreement on this data (float32; max over rows of |a-b|/|b|, and max|a-b|/max|b|):")
        names = {
            "tracin_all_vs_captum_cp": "tracin_tasks all vs Captum TracInCP",
            "tracin_last_vs_captum_fast_plus_bias": "tracin_tasks last vs TracInCPFast + bias term*",
            "tracin_all_vs_torch_func": "tracin_tasks all vs torch.func",
        }
        for key, (elem, norm) in r["agreement"].items():
            w(f"    {names[key]:<50} {elem:.2e}   {norm:.2e}")
        if "tracin_last_vs_captum_fast_plus_bias" in r["agreement"]:
            w("    * TracInCPFast scores only the final layer's weight; η‖∂ℓ/∂logits‖² (its bias part) is added back")
        w("")
    if memory is not None:
        unit = "torch.cuda.max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth (VmHWM) over a post-setup baseline"
        w("Peak memory of tracin_tasks all-layer self-influence — fresh process per size, lazily generated rows;")
        w(f"  measure: {unit}; {args.memory_threads} thread(s) per process, all sizes run side by side")
        w(f"  {'model':<8}{'N rows':>10}{'at N':>14}{'10×N rows':>12}{'at 10×N':>14}{'ratio':>8}   {'target':<10}")
        for kind, m in memory.items():
            limit = TARGETS["memory_ratio"]
            ok = m["ratio"] <= limit
            verdicts.append((f"{kind}: peak memory ratio 10×N / N", f"{m['ratio']:.2f}", f"≤ {limit:g}", ok))
            w(f"  {kind:<8}{args.memory_rows:>10,}{_fmt_bytes(m['n_bytes']):>14}{10 * args.memory_rows:>12,}"
              f"{_fmt_bytes(m['10n_bytes']):>14}{m['ratio']:>8.2f}   ≤ {limit:<8g}{_mark(ok)}")
            if device.type == "cuda":
                w(f"  {'':<8}(host RSS growth ratio on the same runs: {m['cpu_ratio']:.2f})")
        w("")
    w("Targets")
    for what, value, target, ok in verdicts:
        w(f"  {what:<66}{value:>9}   {target:<12}{_mark(ok)}")
    met = sum(1 for v in verdicts if v[3])
    w(f"  {met}/{len(verdicts)} met")
    return "\n".join(lines), verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test (seconds of work, plus interpreter start-ups)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--profile", action="store_true", help="print a profile of tracin_tasks' all-layer call")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rows", type=int, default=None, help="rows per model (default 6400; quick 384)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; quick 1)")
    parser.add_argument("--captum-repeats", type=int, default=None, help="timed repeats for Captum (default 3; quick 1)")
    parser.add_argument("--memory-rows", type=int, default=None, help="N for the memory check (default 6400; quick 256)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--memory-threads", type=int, default=1,
                        help="torch threads in each memory subprocess (default 1: they run side by side)")
    parser.add_argument("--memory-worker", nargs=3, metavar=("MODEL", "ROWS", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        kind, rows, path = args.memory_worker
        memory_worker(kind, int(rows), path, args.device, args.batch_size, args.threads)
        return 0
    _import_captum()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False (this torch is "
              f"{torch.__version__}); install a CUDA build of torch or use --device cpu.", file=sys.stderr)
        return 2
    args.rows = args.rows or (384 if args.quick else 6400)
    args.repeats = args.repeats or (1 if args.quick else 7)
    args.captum_repeats = args.captum_repeats or (1 if args.quick else 3)
    args.memory_rows = args.memory_rows or (256 if args.quick else 6400)
    args.train_epochs = 1 if args.quick else 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        print(f"running on CUDA: {torch.cuda.get_device_name(device)}", flush=True)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_core_") as workdir:
        results = {}
        for kind in args.models:
            print(f"... timing {kind} ({time.perf_counter() - t_start:.1f} s)", file=sys.stderr, flush=True)
            results[kind] = bench_model(kind, args, device, workdir)
        memory = None
        if not args.no_memory:
            print(f"... memory subprocesses ({time.perf_counter() - t_start:.1f} s)", file=sys.stderr, flush=True)
            memory = bench_memory(args, device, workdir)
        text, verdicts = report(results, memory, args, device)
        print(text)
        if args.profile:
            for kind in args.models:
                print()
                print(profile_tracin(kind, args, device, workdir))
    elapsed = time.perf_counter() - t_start
    print(f"\n(total benchmark time {elapsed:.1f} s)")
    if args.json:
        payload = {
            "device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "captum": captum.__version__ if captum is not None else None, "quick": args.quick,
            "tracin_tasks": _tracin_version(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "rows": args.rows, "batch_size": args.batch_size, "repeats": args.repeats,
            "captum_repeats": args.captum_repeats, "targets": TARGETS, "models": results,
            "memory": {k: {str(kk): vv for kk, vv in v.items()} for k, v in (memory or {}).items()},
            "verdicts": [{"what": a, "value": b, "target": c, "met": d} for a, b, c, d in verdicts],
            "total_seconds": elapsed,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
