"""Training cost per sample: mettle from the cache vs end-to-end Mettle vs an adapter baseline.

Usage: python scripts/bench_train_cost.py [--sizes tiny full] [--batches 1 8] [--steps 3] [--device cpu]
       [--out DIR]

For AVE-shaped samples (10 one-second segments: 10 frames + 10 audio seconds), one training step
(forward, backward, optimiser) of:

* ``cache:last-grid`` / ``cache:full``: LCD over every block + the AVE head, fed tokens laid out
  as a cache of that budget holds them (in memory: the data path is benchmarked separately);
* ``end-to-end``: the same LCD + head fed by the live frozen Swin-V2-L + HTS-AT under no_grad,
  every token (the paper's setting);
* ``adapter``: LAVisH/DG-SCT-style bottleneck adapters (dim/8) after every frozen block, so the
  gradient flows back through both backbones; a linear head on the last tokens;
* ``cache:last-grid/int8``: (a) from an int8 cache, handed over as stored (int8 codes + per-token
  float32 scales, scaled inside the LCD's normalisation on the device);
* ``cache:grid1`` (not in the defaults): every layer pooled to one token, to see what a step costs
  without its tokens (the meta-token path: output projection and MLP over layers x segments x K);
* ``graphs:last-grid`` / ``graphs:full`` (CUDA, ``--modes`` or ``--cuda-graphs``): (a) with
  ``mettle-train --set overlap_copy=false``: the step replayed as one CUDA graph (train/step.py), the
  tokens handed over in page-locked host memory as the loader does and copied in by the timed step;
  ``graphs:last-grid/int8`` (not in the defaults): the same from an int8 cache (half the bytes to copy in);
* ``overlap:last-grid`` (CUDA, not in the defaults): mettle-train's default on CUDA since the eighth session
  of 2026-11-27 (``overlap_copy: auto``): two graphs taking turns, each batch copied in while the step before
  runs (one more batch of tokens on the device); ``overlap:last-grid/int8`` likewise;

(a) and (b) step through mettle-train's own ``TrainStep`` (no gradient clipping, as the adapter). (a) sizes
cuBLAS's workspace as mettle-train does (``cublas_workspace: auto``, 4 MiB a stream on CUDA since 2026-11-28;
``--set cublas_workspace=library`` for cuBLAS's own); (b) and (c) keep the library's, as their code would.

Each configuration runs in its own process. Reported: seconds per step (median of ``--steps``
after one warm-up step, each step timed alone: the GPU idle before it), seconds per step pipelined (``--steps``
more steps issued back to back, one wait at the end, as mettle-train runs them: the host prepares the
next step while the GPU runs this one), peak memory (GPU: max allocated; CPU: peak RSS, and peak RSS minus the
process's RSS right after imports), and the ratios of (a) against (b) and (c). ``full`` uses the
real architectures with random weights; ``tiny`` the test miniatures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODES = ("cache:last-grid", "cache:full", "end-to-end", "adapter", "cache:last-grid/int8", "graphs:last-grid",
         "graphs:full", "cache:grid1", "graphs:last-grid/int8", "overlap:last-grid", "overlap:last-grid/int8")
GRAPHED = ("graphs", "overlap")  # modes whose step replays CUDA graphs (overlap: two, with overlap_copy)
EAGER = MODES[:5]  # the default modes; graphs:* (CUDA only) run (a)'s step as one replayed CUDA graph
SETS = {"tiny": "tiny", "full": "specific"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_manifest():
    from mettle.manifests import Clip, Manifest

    vocab = {"event": tuple(f"c{i}" for i in range(28)) + ("background",)}
    return Manifest("bench", (Clip("x", ("train",), 10, 10.0, {"video": "x"}),), vocab)


def write_layout(size: str, path: Path) -> None:
    """Plan the full-token layout of ``size``'s backbones once, in the parent, for the cache-mode children."""
    from mettle.cache import plan_cache
    from mettle.extract.config import ExtractConfig, load_backbones

    backbones = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=SETS[size], random_init=True))
    meta = plan_cache(bench_manifest(), {m: b.record() for m, b in backbones.items()}, tokens="full")
    path.write_text(meta.to_json())


def run_one(mode: str, size: str, batch: int, steps: int, device: str, layout: str = "",
            sets: dict | None = None) -> dict:
    from extract_ops import random_media
    from mettle.cache import SCALE, CacheMeta, plan_cache
    from mettle.cache.runtime import cublas_workspace, peak_memory
    from mettle.extract.config import ExtractConfig, load_backbones
    from mettle.extract.backbones.kept import kept_bytes
    from mettle.extract.tokens import TokenForward
    from mettle.train.config import resolve_config
    from mettle.train.model import MettleModel, count_parameters
    from mettle.train.step import TrainStep, make_optimizer
    from mettle.train.tasks import get_task

    idle = _rss()  # after every import of every mode (extract/ and timm too): "minus idle" leaves out fixed costs
    dev = torch.device(device)
    torch.manual_seed(0)
    manifest = bench_manifest()
    from_cache = mode.startswith(("cache", *GRAPHED))
    task = get_task("ave")
    cfg = resolve_config("ave", task.head_defaults, sets=sets)
    if from_cache:  # as mettle-train sizes cuBLAS's workspace (end-to-end keeps the library's, as the paper's code)
        cublas_workspace(cfg.cublas_workspace, dev)
    if from_cache:  # stage two never holds a backbone: read the layout the parent planned
        backbones = None
        records = CacheMeta.from_dict(json.loads(Path(layout).read_text())).backbones
    else:
        backbones = load_backbones(ExtractConfig(dataset="-", cache="-", backbones=SETS[size], random_init=True))
        records = {m: b.record() for m, b in backbones.items()}
    if not from_cache:  # media only where backbones run: a cache-mode process holds none (its memory is measured)
        media = random_media(batch * 10, size=224)
        frames, audio = media["visual"], media["audio"]
    labels = torch.randint(0, 29, (batch, 10), device=dev)
    if mode != "adapter":
        budget, _, stored = (mode.split(":")[1] if from_cache else "full").partition("/")
        meta = plan_cache(manifest, records, tokens=budget, dtype=stored or "float16")  # default: float16
        model = MettleModel(meta, manifest, cfg, task).to(dev)
        if mode == "end-to-end":  # float16 autocast on CUDA, as the live token source runs there
            forwards = {m: TokenForward(b, [a for a in meta.arrays if a.modality == m], dev, "auto")
                        for m, b in backbones.items()}
        else:  # what the loader hands the model: the cache's float16 tokens
            cached = {a.key: torch.randn(batch, 10, a.tokens, a.dim, device=dev, dtype=torch.float16)
                      for a in meta.arrays}  # drawn in float16: no float32 transient left in the measured peak
            if stored == "int8":  # codes + scales, as Cache.iterate hands an int8 cache's LCD arrays
                cached = {**{k: (v * 40).clamp(-127, 127).to(torch.int8) for k, v in cached.items()},
                          **{k + SCALE: torch.rand(v.shape[:-1], device=dev) for k, v in cached.items()}}
            if mode.startswith(GRAPHED) and dev.type == "cuda":  # the graph copies them in from the host
                cached = {k: v.cpu().pin_memory() for k, v in cached.items()}
                labels = labels.cpu().pin_memory()  # as the loader hands them over
    else:
        model = AdapterModel(backbones).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = mode.startswith(GRAPHED)
    opt = make_optimizer(params, 1e-4, 1e-2, dev, graphs)  # as mettle-train makes it
    train_step = TrainStep(model, task.loss, opt, dev, graphs=graphs, overlap_copy=mode.startswith("overlap"))
    warm = train_step.warmup + 2 if graphs else 1  # eager warm-up steps, the capture, one replay
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def one_step() -> None:
        if mode == "adapter":  # mixed precision on CUDA, the usual way to train such a baseline
            with torch.autocast("cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
                logits = model(frames, audio, batch).float()
            loss = task.loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elif mode == "end-to-end":
            tokens = {}
            for m, fw in forwards.items():
                x = fw.backbone.preprocess(frames if m == "visual" else audio)
                tokens.update({k: v.view(batch, 10, *v.shape[1:]) for k, v in fw(x, on_device=True).items()})
            train_step(tokens, {}, labels)
        else:
            train_step(cached, {}, labels)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for step in range(steps + warm):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        if step >= warm:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - t0)
        elif step == warm - 1 and dev.type == "cuda":  # warm-up (and capture) over: the timed steps' own peak next
            warm_peak = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
            torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):  # back to back, as mettle-train issues them
        one_step()
    sync()
    pipelined = (time.perf_counter() - t0) / steps
    if graphs and train_step.replays < steps:
        raise RuntimeError(f"{mode}: {train_step.replays} of {steps} timed steps replayed a graph (see the warnings)")
    peak_rss = peak_memory(torch.device("cpu"))  # VmHWM: ru_maxrss would carry the parent's peak
    return {"mode": mode, "size": size, "batch": batch, "seconds_per_step": statistics.median(times),
            "seconds_per_step_pipelined": pipelined,
            "seconds_per_sample": statistics.median(times) / batch, "trainable": count_parameters(model),
            "peak_gpu": max(warm_peak[0], torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
            # GPU: the timed steps' own peak (after warm-up and capture) and the most the allocator held from CUDA
            "peak_gpu_timed": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "peak_gpu_reserved": max(warm_peak[1], torch.cuda.max_memory_reserved(dev)) if dev.type == "cuda" else None,
            "peak_rss": peak_rss, "peak_rss_minus_idle": peak_rss - idle,
            "token_bytes": sum(t.numel() * t.element_size() for t in cached.values()) if from_cache else None,
            "kept_bytes": sum(kept_bytes(b) for b in backbones.values()) if backbones else 0}


class AdapterModel(nn.Module):
    """Frozen backbones with a trainable bottleneck adapter after every block (gradients pass through)."""

    BLOCKS = ("SwinTransformerV2Block", "SwinBlock")  # timm's Swin-V2 block, our HTS-AT block

    def __init__(self, backbones: dict) -> None:
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.adapters = nn.ModuleDict()
        for m, b in backbones.items():
            for p in b.parameters():
                p.requires_grad_(False)
            blocks = [blk for blk in b.modules() if type(blk).__name__ in self.BLOCKS]
            adapters = nn.ModuleList(nn.Sequential(nn.Linear(i.dim, max(8, i.dim // 8)), nn.GELU(),
                                                   nn.Linear(max(8, i.dim // 8), i.dim)) for i in b.blocks)
            assert len(blocks) == len(adapters), (m, len(blocks), len(adapters))
            self.adapters[m] = adapters
            for blk, ad in zip(blocks, adapters):
                blk.register_forward_hook(lambda mod, inp, out, ad=ad: out + ad(out))
        self.head = nn.Linear(sum(b.blocks[-1].dim for b in backbones.values()), 29)

    def forward(self, frames, audio, batch: int) -> torch.Tensor:
        feats = []
        for m, b in self.backbones.items():
            x = b.preprocess(frames if m == "visual" else audio).to(self.head.weight.device)
            last = len(b.blocks) - 1
            feats.append(b._run(x, [last], last)[0].mean(1))  # not forward_tokens: gradients must flow
        return self.head(torch.cat(feats, -1)).view(batch, 10, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=sorted(SETS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=list(EAGER), choices=MODES)
    ap.add_argument("--cuda-graphs", action="store_true", help="add graphs:last-grid and graphs:full to --modes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="folder for the table (train_cost.md) and raw results (JSON)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training config override for (a) and (b), e.g. lcd.share=none")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        sets = dict(s.split("=", 1) for s in args.set)
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.steps, args.device, args.layout,
                                 sets)))
        return
    if args.cuda_graphs:
        args.modes += [m for m in ("graphs:last-grid", "graphs:full") if m not in args.modes]
    rows = []
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="mettle-bench-"))  # the planned layouts, removed below
    try:
        _run_all(args, tmp, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = table(rows, args.device, args.set)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_cost.md").write_text("\n".join(lines) + "\n")
        (args.out / "train_cost.json").write_text(json.dumps(rows, indent=1))


def _run_all(args, tmp: Path, rows: list[dict]) -> None:
    """Each (size, batch, mode) in a child process of its own; results appended to ``rows``."""
    for size in args.sizes:
        layout = tmp / f"{size}.json"
        write_layout(size, layout)
        for batch in args.batches:
            for mode in args.modes:
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--one", mode, size, str(batch), "--steps",
                                       str(args.steps), "--device", args.device, "--layout", str(layout),
                                       *[f"--set={s}" for s in args.set]],
                                      capture_output=True, text=True)
                if proc.returncode:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                    rows.append({"mode": mode, "size": size, "batch": batch, "error": tail})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows[-1]["process_s"] = time.perf_counter() - t0  # the whole child: what a benchmark set's time goes to
                print(json.dumps(rows[-1]), file=sys.stderr)


def table(rows: list[dict], device: str, sets: list[str]) -> list[str]:
    mem = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB (minus idle)"
    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    out = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU threads, device {device}{gpu}, "
           f"{time.strftime('%Y-%m-%d')}; training config: defaults{''.join(' ' + s for s in sets)}", "",
           f"| size | batch | mode | s/step | s/step pipelined | s/sample | {mem} | trainable | time vs (a) | "
           "memory vs (a) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def find(r, mode):  # the successful row of ``mode`` at r's size and batch
        return next((b for b in rows if b["size"] == r["size"] and b["batch"] == r["batch"]
                     and b["mode"] == mode and "error" not in b), None)

    def memory(r):  # GPU: max allocated; CPU: peak RSS above idle
        return r["peak_gpu"] if r["peak_gpu"] is not None else r["peak_rss_minus_idle"]

    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']} | {r['batch']} | {r['mode']} | failed: {r['error']} | | | | | | |")
            continue
        base = find(r, "cache:last-grid")
        m = memory(r)
        mtxt = f"{m / 2**20:.0f}" if r["peak_gpu"] is not None else \
            f"{r['peak_rss'] / 2**20:.0f} ({m / 2**20:.0f})"
        if base:
            tr, mr = f"{r['seconds_per_step'] / base['seconds_per_step']:.1f}x", f"{m / max(memory(base), 1):.1f}x"
        else:
            tr = mr = "-"
        piped = r.get("seconds_per_step_pipelined")
        out.append(f"| {r['size']} | {r['batch']} | {r['mode']} | {r['seconds_per_step']:.4f} | "
                   f"{'-' if piped is None else f'{piped:.4f}'} | {r['seconds_per_sample']:.4f} | {mtxt} | {r['trainable']:,} | {tr} | {mr} |")
    for r in rows:  # graphed (a), one graph or two taking turns, against (b): the headline ratio
        e2e = find(r, "end-to-end")
        if r["mode"] in ("graphs:last-grid", "overlap:last-grid") and "error" not in r and e2e is not None:
            out.append(f"\n{r['size']}, batch {r['batch']}: end-to-end / {r['mode']} = "
                       f"{e2e['seconds_per_step'] / r['seconds_per_step']:.1f}x time (steps alone), "
                       f"{e2e['seconds_per_step_pipelined'] / r['seconds_per_step_pipelined']:.1f}x (pipelined), "
                       f"{e2e['peak_gpu'] / max(r['peak_gpu'], 1):.1f}x memory")
    held = [r for r in rows if r.get("peak_gpu_reserved") and "error" not in r]
    if held:  # the table's peak includes warm-up and a graph's capture; what replays need, and what CUDA gave
        out.append("\nGPU MiB, peak of the timed steps alone / most reserved from CUDA by the allocator: " + ", ".join(
            f"{r['size']} batch {r['batch']} {r['mode']} {r['peak_gpu_timed'] / 2**20:.0f} / "
            f"{r['peak_gpu_reserved'] / 2**20:.0f}" for r in held))
    kept = [r for r in rows if r.get("kept_bytes") and "error" not in r]
    if kept:  # what the frozen backbones keep instead of recomputing (kept.py) adds to (b)'s and (c)'s peaks
        out.append("\nOf (b)'s and (c)'s peaks, what the frozen backbones keep instead of making every forward "
                   "(weights cast to float16, attention's weight-only terms; kept.py): " + ", ".join(
                       f"{r['size']} batch {r['batch']} {r['mode']} {r['kept_bytes'] / 2**20:.0f} MiB" for r in kept))
    timed = [r for r in rows if "process_s" in r]
    if timed:  # where a benchmark set's minutes go: each configuration is a process of its own
        slow = max(timed, key=lambda r: r["process_s"])
        out.append(f"\n{len(timed)} processes, {sum(r['process_s'] for r in timed):.0f} s in all (imports, building "
                   f"the models, warm-up and timed steps; not the parent's layout planning, which builds each size's "
                   f"backbones once); the longest {slow['process_s']:.0f} s ({slow['size']}, "
                   f"batch {slow['batch']}, {slow['mode']})")
    floors = []
    for r in rows:  # what no implementation of (a) can go below, against (b) as measured
        e2e = find(r, "end-to-end")
        if not r["mode"].startswith("cache:last-grid") or "error" in r or e2e is None or not r.get("token_bytes"):
            continue
        floor = 16 * r["trainable"] + r["token_bytes"]
        em = memory(e2e)
        floors.append(f"| {r['size']} | {r['batch']} | {r['mode']} | {16 * r['trainable'] / 2**20:.1f} | "
                      f"{r['token_bytes'] / 2**20:.1f} | {floor / 2**20:.1f} | {em / floor:.1f}x |")
    if floors:
        out += ["", "The floor of (a): its trainable parameters at 16 bytes each (float32 weights, gradients and "
                "AdamW's two moments) plus the batch's `last-grid` tokens as handed over (float16, or int8 codes with "
                "their scales); (b)'s memory over it is the most any implementation of (a) could reach in this "
                "configuration.", "",
                "| size | batch | mode | trainable state MiB | tokens MiB | floor MiB | (b) / floor |",
                "| --- | --- | --- | --- | --- | --- | --- |", *floors]
    return out


if __name__ == "__main__":
    main()
