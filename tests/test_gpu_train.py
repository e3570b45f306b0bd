"""CUDA paths of the training step added in the eighth session of 2026-11-27: the LCD's TF32 products
and two graphs taking turns; since 2026-11-28 cuBLAS's small workspace (marker ``gpu``; deselected by
default, run with ``pytest -m gpu``)."""

import json
import subprocess
import sys

import pytest
import torch

from mettle.cache import ArraySpec
from mettle.train.config import LCDConfig
from mettle.train.lcd import LCD

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest.py)


def test_cuda_lcd_runs_tf32_by_default_and_restores_the_setting():
    """lcd.matmul=auto on CUDA: the LCD's products run as TF32 (its outputs differ from full float32's, by
    little; its gradients stay close to them), and the process's setting is the same after as before. That
    backward runs under the forward's setting is tested on the CPU (tests/train/test_lcd.py)."""
    torch.manual_seed(0)
    arrays = [ArraySpec(f"visual/stage0.block{i}", "visual", f"stage0.block{i}", i, 0, 96, (10, 10), (10, 10))
              for i in range(4)]
    tokens = {a.key: torch.randn(4, 3, 100, 96, device="cuda").half() for a in arrays}
    before, results = torch.backends.cuda.matmul.fp32_precision, {}
    for matmul in ("float32", "auto"):
        torch.manual_seed(1)
        lcd = LCD(arrays, LCDConfig(meta_tokens=4, dim=64, heads=4, matmul=matmul)).cuda()
        out = lcd(tokens)
        out.square().sum().backward()
        results[matmul] = out.detach(), {n: p.grad for n, p in lcd.named_parameters()}
        assert torch.backends.cuda.matmul.fp32_precision == before, matmul
    (exact, exact_grads), (fast, fast_grads) = results["float32"], results["auto"]
    assert not torch.equal(fast, exact)  # TF32 was on
    assert (fast - exact).norm() <= 1e-2 * exact.norm()
    for n, g in exact_grads.items():
        assert (fast_grads[n] - g).norm() <= 3e-2 * g.norm() + 1e-6, (n, float((fast_grads[n] - g).norm() / g.norm()))


def test_overlapped_copies_wait_for_the_replay_reading_their_buffers():
    """Two graphs taking turns with the host far ahead of a slow step (~30 ms, the copy <1 ms): every batch
    trains as given, as the eager steps do (a copy into buffers a queued replay still reads would mix two
    batches); a copy stream is made for the copies."""
    from torch import nn

    from mettle.train.step import TrainStep, make_optimizer

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.out = nn.Linear(512, 512), nn.Linear(512, 4)

        def forward(self, tokens):
            h = tokens["x"].float()
            for _ in range(24):
                h = torch.tanh(self.lin(h))
            return self.out(h).mean(1)

    torch.manual_seed(0)
    batches = [({"x": torch.randn(8, 2048, 512).half().pin_memory()}, {}, torch.randint(0, 4, (8,)).pin_memory())
               for _ in range(10)]
    losses = []
    for graphs in (False, True):
        torch.manual_seed(1)
        model = Slow().cuda()
        opt = make_optimizer(list(model.parameters()), 1e-3, 0.0, torch.device("cuda"), graphs)
        step = TrainStep(model, nn.functional.cross_entropy, opt, torch.device("cuda"), graphs=graphs,
                         overlap_copy=True)
        losses.append(torch.stack([step(*b) for b in batches]).cpu())  # read at the end: the host runs ahead
    assert step.replays == 6 and len(step.captured) == 2 and step.copier is not None
    assert torch.allclose(losses[1], losses[0], rtol=1e-4, atol=1e-6), losses


WORKSPACE_PROBE = """
import json, os, sys, torch
from mettle.cache.runtime import CUBLAS_ENV, cublas_workspace
for key in CUBLAS_ENV:
    os.environ.pop(key, None)
dev = torch.device("cuda")
held = cublas_workspace(sys.argv[1], dev)
api = getattr(torch.backends.cuda, "cublas_workspace_size", None)
a = torch.randn(512, 512, device=dev)
torch.cuda.synchronize()
before = torch.cuda.memory_allocated(dev)
b = a @ a  # the process's first product: cuBLAS takes its workspace here, from torch's allocator
torch.cuda.synchronize()
print(json.dumps({"held": held, "extra": torch.cuda.memory_allocated(dev) - before - b.numel() * 4,
                  "size": api() if api else None}))
"""


def test_the_small_cublas_workspace_is_what_cublas_takes():
    """cublas_workspace=auto (mettle-train's default) must reach cuBLAS, and the workspace comes from torch's
    allocator (so it counts in a run's peak). torch 2.14 keeps each stream's workspace in its allocator; a torch
    that stops caching it there (newer ones may) makes ``extra`` ~0 both ways: then check this test."""
    seen = {}
    for setting in ("auto", "library"):  # each in a fresh process
        proc = subprocess.run([sys.executable, "-c", WORKSPACE_PROBE, setting], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["auto"]["held"] == "small" and seen["library"]["held"] == "library"
    if seen["auto"]["size"] is not None:  # torch's run-time setter
        assert seen["auto"]["size"] == 4 << 20 and seen["library"]["size"] > 4 << 20, seen  # 32 MiB on Hopper
    assert seen["auto"]["extra"] <= 8 << 20, seen  # cuBLAS's 4 MiB, and cuBLASLt's 4 if not shared
    assert seen["auto"]["extra"] < seen["library"]["extra"], seen


def test_a_resumed_cuda_run_draws_the_same_dropout_as_an_uninterrupted_one(small_toy_cache, tmp_path, monkeypatch):
    """Dropout on CUDA draws from the device's generator, which the saved state carries since 2026-11-28
    (before, only the CPU's: a resumed run's masks differed). Kill after epoch 2, resume, compare every
    epoch's training loss with an uninterrupted run's (dropout 0.5, so other masks move them far more
    than the tolerance, which leaves room for CUDA's non-deterministic reductions)."""
    from mettle.cache import open_cache
    from mettle.train.config import resolve_config
    from mettle.train.run import train_run
    import mettle.train.run as run_module

    sets = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "head.hidden": 32, "optim.epochs": 4,
            "optim.batch_size": 2}

    def cfg(out):
        return resolve_config("ave", {"hidden": 64, "temporal": "gru", "dropout": 0.5}, sets=sets,
                              cache=str(small_toy_cache), out=str(out), device="cuda")

    source = open_cache(small_toy_cache)
    train_run(cfg(tmp_path / "clean"), source, progress=False, plot=False)

    class Killed(Exception):
        pass

    real_fit = run_module.fit

    def fit_killed_after_epoch_1(*a, **k):
        def on_epoch(record, result):
            k["on_epoch"](record, result)
            if record["epoch"] == 1:
                raise Killed
        return real_fit(*a, **{**k, "on_epoch": on_epoch})

    monkeypatch.setattr(run_module, "fit", fit_killed_after_epoch_1)
    with pytest.raises(Killed):
        train_run(cfg(tmp_path / "killed"), source, progress=False, plot=False)
    monkeypatch.undo()
    train_run(cfg(tmp_path / "killed"), source, progress=False, plot=False, resume=True)

    def losses(out):
        lines = next(out.iterdir()).joinpath("metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train_loss"] for x in lines]

    clean, resumed = losses(tmp_path / "clean"), losses(tmp_path / "killed")
    assert len(clean) == len(resumed) == 4
    assert resumed == pytest.approx(clean, rel=1e-4)
