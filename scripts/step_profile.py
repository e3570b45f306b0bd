"""What one training step from the cache launches and allocates: operators (kernels) and peak memory.

Usage: python scripts/step_profile.py [--size full|tiny] [--batches 1 8] [--tokens last-grid]
       [--device cpu|cuda] [--set lcd.chunk_mib=64 ...] [--compare KEY=VALUE ...]

Why: on a GPU the step of LCD + head is bound by its number of small kernels (one H200, 2026-11-27:
5 ms at batch 1 and 21 ms at batch 8 replayed as a CUDA graph, about 5 us a kernel), and its memory
is the tool's point. Both can be counted on the CPU, where the same operators run on the same
shapes, so a change to the LCD can be weighed on any machine before a GPU is lent:

* **operators**: the step's forward and backward as dispatched (after autograd; views and bare
  allocations left out), for the LCD of each modality (with the ``.sum()`` that drives its backward,
  two operators) and for the rest (head + loss). An operator is usually one kernel, but not always
  (a cat into an output of another dtype copies input by input inside one operator): the CUDA run
  counts the kernels themselves (with the memory copies and fills) with the profiler. On the CPU the
  head's GRU runs cell by cell (one cuDNN call on CUDA) and AdamW per parameter (one fused kernel on
  CUDA; not counted here).
* **peak**: the most tensor memory allocated at once during one whole training step (forward,
  backward, AdamW; warm: the optimiser state exists), above what was allocated when it started
  (parameters, optimiser state and the batch's tokens): the CPU allocator's events from
  torch.profiler (``profile_memory``); on CUDA ``max_memory_allocated``. The CUDA caching allocator
  rounds blocks and cuBLAS keeps a workspace, so the two differ by a few MiB; changes compare.
  On the CPU ``peak_in`` names the operators running when the peak was reached.

``--compare KEY=VALUE`` adds rows with that LCD/head option set (``--set`` applies to every row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train_cost import bench_manifest, write_layout  # noqa: E402
from extract_ops import dispatched  # noqa: E402


def build(size: str, batch: int, tokens: str, sets: list[str], device: torch.device, layout: Path):
    """The cache step of bench_train_cost's (a): model, optimiser, TrainStep (eager) and a batch."""
    from mettle.cache import CacheMeta, plan_cache
    from mettle.train.config import resolve_config
    from mettle.train.model import MettleModel
    from mettle.train.step import TrainStep, make_optimizer
    from mettle.train.tasks import get_task

    torch.manual_seed(0)
    records = CacheMeta.from_dict(json.loads(layout.read_text())).backbones
    manifest, task = bench_manifest(), get_task("ave")
    meta = plan_cache(manifest, records, tokens=tokens, dtype="float16")
    overrides = dict(kv.split("=", 1) for kv in sets)
    model = MettleModel(meta, manifest, resolve_config("ave", task.head_defaults, sets=overrides), task).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, task.loss, make_optimizer(params, 1e-4, 1e-2, device), device)
    batch_tokens = {a.key: torch.randn(batch, 10, a.tokens, a.dim, dtype=torch.float16, device=device)
                    for a in meta.arrays}
    labels = torch.randint(0, 29, (batch, 10), device=device)
    return model, task, step, batch_tokens, labels


def cpu_peak(fn) -> tuple[int, list[str]]:
    """Most bytes allocated at once by ``fn`` on the CPU, above what was allocated when it started,
    and the operators running at that moment (outermost first): where the peak is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    now = peak = 0
    at = None
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        now += e.nbytes()
        if now > peak:
            peak, at = now, e.start_ns()
    running = sorted((e for e in events if e.name() != "[memory]" and at is not None
                      and e.start_ns() <= at <= e.start_ns() + e.duration_ns()), key=lambda e: e.start_ns())
    return peak, [e.name() for e in running]


def profile_one(size: str, batch: int, tokens: str, sets: list[str], device: torch.device, layout: Path,
                top: int = 0) -> dict:
    model, task, step, batch_tokens, labels = build(size, batch, tokens, sets, device, layout)
    for _ in range(2):  # optimiser state made, allocator warm
        step(batch_tokens, {}, labels)

    def forward_backward(part=None):
        for p in model.parameters():
            p.grad = None  # as in a step: gradients are made afresh, not accumulated
        out = part(batch_tokens) if part is not None else task.loss(model(dict(batch_tokens)), labels)
        (out.float().sum() if part is not None else out).backward()

    lcds = {name.split(".")[-1]: m for name, m in model.named_modules() if type(m).__name__ == "LCD"}
    row = {"size": size, "batch": batch, "tokens": tokens, "sets": " ".join(sets) or "defaults"}
    if device.type == "cpu":
        ops = dispatched(forward_backward)
        total = sum(ops.values())
        row["top"] = [(name, n, None) for name, n in ops.most_common(top)]
        for name, lcd in lcds.items():
            row[f"ops_lcd_{name}"] = sum(dispatched(lambda lcd=lcd: forward_backward(lcd)).values())
        row["ops_lcd"] = sum(row[f"ops_lcd_{n}"] for n in lcds)
        row["ops_rest"] = total - row["ops_lcd"]
        step.opt.zero_grad(set_to_none=True)  # the step's own first act: not part of its peak
        peak, where = cpu_peak(lambda: step(batch_tokens, {}, labels))
        row["peak_mib"] = peak / 2**20
        row["peak_in"] = " > ".join(n for n in where if not n.startswith("autograd::engine"))[:80] or "-"
    else:
        from torch.profiler import ProfilerActivity, profile

        def kernels(fn) -> list:
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize(device)
            return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

        total = kernels(forward_backward)
        for name, lcd in lcds.items():
            row[f"kernels_lcd_{name}"] = len(kernels(lambda lcd=lcd: forward_backward(lcd)))
        row["kernels_lcd"] = sum(row[f"kernels_lcd_{n}"] for n in lcds)
        row["kernels_rest"] = len(total) - row["kernels_lcd"]
        row["kernel_ms"] = sum(e.device_time for e in total) / 1e3  # device time of the whole forward + backward
        by_name: dict[str, list] = {}
        for e in total:
            agg = by_name.setdefault(e.name, [0, 0.0])
            agg[0] += 1
            agg[1] += e.device_time / 1e3
        row["top"] = [(name, n, ms) for name, (n, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]
        step.opt.zero_grad(set_to_none=True)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch_tokens, {}, labels)
        torch.cuda.synchronize(device)
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--tokens", default="last-grid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="also profile with this option set (repeatable; each its own row)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also list each row's N most frequent operators (CPU) or the N kernels taking the most "
                    "device time (CUDA), over the whole forward + backward")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout.json"
        write_layout(args.size, layout)
        rows = [profile_one(args.size, b, args.tokens, args.set + extra, device, layout, args.top)
                for b in args.batches for extra in [[]] + [[c] for c in args.compare]]
    cols = [c for c in rows[0] if c not in ("size", "tokens", "top")]
    print(f"size {args.size}, tokens {args.tokens}, device {device}")
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    for r in rows if args.top else []:
        print(f"\nbatch {r['batch']}, {r['sets']}: the top {args.top} "
              + ("kernels by device time" if device.type == "cuda" else "operators by count"))
        print("| operator | count | device ms |\n| --- | --- | --- |")
        for name, n, ms in r["top"]:
            print(f"| {name[:90]} | {n} | {'-' if ms is None else f'{ms:.2f}'} |")


if __name__ == "__main__":
    main()
