"""One optimisation step (forward, loss, backward, clipping, AdamW), run eagerly or replayed as one
CUDA graph (``cuda_graphs``: auto = on CUDA devices, the default; true; false).

Why: from the cache, a step of LCD + head is small. On an H200 (BENCHMARKS.md, 2026-11-27) it took
34-37 ms at batch 1 and 85-95 ms at batch 8, nearly the same: the host issuing some thousands of
small kernels (forward, backward, optimiser) is the cost, not the GPU. A CUDA graph replays the whole
step with one launch: 5 ms at batch 1 and 21 ms at batch 8 on the same GPU, for 80-210 MiB more peak
memory (``--no-cuda-graphs`` keeps the eager step). The graph is captured once, for the batch shape of the first step after
``warmup`` eager steps; batches of any other shape (an epoch's last, smaller batch) run eagerly.

How the graph stays exact (the captured step is checked, not trusted):

* Inputs are copied into the graph's static buffers before each replay; parameters, optimiser
  moments and AdamW's step counters are updated in place at fixed addresses (AdamW is made with
  ``capturable=True`` and a device tensor ``lr`` that the schedule fills between steps).
* Gradients are left to the graph: captured with ``.grad`` unset, its backward writes them afresh
  each replay (no accumulation), so nothing zeroes them between replays.
* Dropout draws from the CUDA generator, which a replay advances exactly as the eager step would.
* At capture the step is run both ways from the same state (parameters, optimiser state, CUDA RNG)
  and the results compared: the loss within ``LOSS_TOLERANCE`` (relative), the parameter update
  within ``UPDATE_TOLERANCE`` of its own size (mean absolute difference against the mean absolute
  update). Capture refused by CUDA (a host synchronisation inside the step, say), a mismatch, or
  any other fault while capturing or checking gives a warning and eager steps for the rest of the
  run (graphs are the default on CUDA: they may cost speed, never a run). The eager result is the
  one kept.

Overlapping the copy (``overlap_copy``: auto, the default, wherever steps are graphed; false: one graph): a
replay first copies the batch into the graph's input buffers, and at batch 8 on an H200 the float16 tokens'
149 MB took 2.7 ms of a 14 ms step (BENCHMARKS.md; with TF32 products, steps back to back: 9.6 -> 7.8 ms for
+142 MiB, eighth session). With two sets of input buffers and a graph for each (one memory pool for both: they
never run at once), the next batch is copied on a stream of its own while the current step replays; the
copy waits only for the replay that last read its buffers. It costs one more batch of inputs on the
device (the tokens' size) and one more capture; it gains only where the host runs ahead of the GPU, as
mettle-train does (it reads a step's loss a step later). Inputs already on the device are copied on the
current stream, as without it.

Data contract: ``step(tokens, extra, target)`` takes ``tokens`` ``{key: (B, T, N, D)}`` (float, or int8
codes with their scales, as the model reads them), ``extra`` the head's keyword inputs, ``target`` what ``loss_fn`` takes, all tensors on the
host (ideally page-locked) or the device; returns the loss, a detached 0-d tensor on the device,
*not* synchronised: read it (``.item()``) a step later to keep the host ahead of the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .config import _convert

log = logging.getLogger(__name__)

LOSS_TOLERANCE = 1e-4
UPDATE_TOLERANCE = 1e-2


def graphs_for(setting: str | bool, device: torch.device) -> bool:
    """Whether ``cuda_graphs`` = ``setting`` (auto | true | false) graphs steps on ``device``.

    ``auto`` (the default) graphs on CUDA devices, where a step from the cache is bound by the host
    launching kernels (one H200: 0.034 -> 0.005 s a step at batch 1, BENCHMARKS.md); a CPU runs each op
    as it is issued and gains nothing. ``true`` off CUDA warns and runs eagerly."""
    setting = _convert("cuda_graphs", setting, "auto")  # as resolve_config checks it (a TrainConfig built directly)
    cuda = device.type == "cuda"
    if setting == "true" and not cuda:
        log.warning("cuda_graphs: training runs on %s, not a CUDA device; running without graphs", device)
    return cuda and setting != "false"


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device,
                   graphs: bool = False) -> torch.optim.AdamW:
    """AdamW as a step of ``device`` wants it: fused on CUDA (one kernel for all parameters and none of
    foreach's parameter-sized temporaries); for graphs also capturable, with ``lr`` a device tensor."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda)
    adopt_optimizer(opt, device, graphs)
    return opt


def adopt_optimizer(opt: torch.optim.Optimizer, device: torch.device, graphs: bool) -> None:
    """Put ``opt``'s groups and state in the form this run's steps need (after construction, and again
    after ``load_state_dict``, which restores the flags and ``lr`` type of the run that saved it).

    A schedule reads ``initial_lr``: kept a float, so that the schedule filling the tensor ``lr``
    never waits for the GPU."""
    cuda, graphs = device.type == "cuda", graphs and device.type == "cuda"
    for group in opt.param_groups:
        lr = float(group["lr"])
        group["fused"], group["capturable"] = cuda, graphs
        group["lr"] = torch.tensor(lr, device=device) if graphs else lr
        group["initial_lr"] = float(group.get("initial_lr", lr))  # a schedule made later keeps this float
    # AdamW warns once when a capturable instance steps outside a capture: the warm-up steps do, by design
    opt._warned_capturable_if_run_uncaptured = True
    for state in opt.state.values():
        if "step" in state:  # fused and capturable keep it on the device; plain AdamW on the host
            state["step"] = state["step"].to(device if cuda else "cpu", torch.float32)


Batch = tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any]


@dataclass
class _Graph:
    """One captured step: its input buffers, its loss output and when its last replay is done with them."""

    graph: torch.cuda.CUDAGraph
    static: Batch
    loss: torch.Tensor
    done: torch.cuda.Event = field(default_factory=torch.cuda.Event)


class TrainStep:
    """``step(tokens, extra, target) -> loss``: see the module docstring.

    ``model(tokens, **extra)`` gives the outputs ``loss_fn(outputs, target)`` scores; ``opt`` from
    :func:`make_optimizer` (with ``graphs`` as here); ``grad_clip`` > 0 clips the gradients' total norm.
    ``overlap_copy`` (with ``graphs``): two input buffers and graphs, the next batch's copy beside the current
    replay (see the module docstring). Counters ``replays`` and ``eager`` say how the steps ran.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], opt: torch.optim.Optimizer,
                 device: torch.device, grad_clip: float = 0.0, graphs: bool = False, warmup: int = 3,
                 overlap_copy: bool = False) -> None:
        self.model, self.loss_fn, self.opt, self.device = model, loss_fn, opt, device
        # at least one eager step before the capture: AdamW makes its state lazily, in its first step, and the
        # capture's start must have it (else the snapshot misses it and every capture differs from eager)
        self.grad_clip, self.warmup = grad_clip, max(1, warmup)
        self.graphs = graphs and device.type == "cuda"  # graphs_for decides (and warns) for a run's setting
        self.buffers = 2 if overlap_copy and self.graphs else 1
        self.captured: list[_Graph] = []  # replayed in turn
        self.turn = 0
        self.signature: tuple | None = None
        self.replays = self.eager = 0
        self.side = torch.cuda.Stream(device) if self.graphs else None
        self.copier = torch.cuda.Stream(device) if self.buffers > 1 else None

    def __call__(self, tokens: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor], target: Any) -> torch.Tensor:
        if self.graphs:
            sig = _signature((tokens, extra, target))
            if self.captured and sig == self.signature:
                return self._replay((tokens, extra, target))
            if not self.captured and self.eager >= self.warmup and (self.signature is None or sig == self.signature):
                return self._capture((tokens, extra, target), sig)
            if self.signature is None:
                self.signature = sig  # the first batch's shape is the one worth a graph
            return self._eager_on_side(tokens, extra, target)
        return self._eager(tokens, extra, target)

    def _replay(self, batch: Batch) -> torch.Tensor:
        """The next graph in turn on ``batch``: its inputs copied in (by the copy stream when two graphs take
        turns and ``batch`` is on the host), the replay, its loss cloned out of the graph's buffer."""
        g = self.captured[self.turn]
        self.turn = (self.turn + 1) % len(self.captured)
        current = torch.cuda.current_stream(self.device)
        for other in self.captured:  # the graphs share a pool: never two at once, whichever stream a caller is on
            if other is not g:
                current.wait_event(other.done)
        if self.copier is not None and _on_host(batch):
            self.copier.wait_event(g.done)  # the replay that last read these buffers is over
            with torch.cuda.stream(self.copier):  # page-locked sources are kept until the copy is done
                _copy_into(g.static, _pinned(batch))
            current.wait_stream(self.copier)
        else:
            _copy_into(g.static, batch)
        g.graph.replay()
        g.done.record(current)
        self.replays += 1
        return g.loss.clone()

    def _eager_on_side(self, tokens, extra, target) -> torch.Tensor:
        """:meth:`_eager` on the side stream (warm-up, odd batches, the capture's check), as CUDA graphs want,
        ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            loss = self._eager(tokens, extra, target)
        current.wait_stream(self.side)
        return loss

    def _forward_backward(self, tokens, extra, target) -> torch.Tensor:
        loss = self.loss_fn(self.model(dict(tokens), **extra), target)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        return loss.detach()

    def _eager(self, tokens, extra, target) -> torch.Tensor:
        tokens, extra, target = to_device((tokens, extra, target), self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self._forward_backward(tokens, extra, target)
        if self.captured:  # the graphs keep their own gradients: free these
            self.opt.zero_grad(set_to_none=True)
        self.eager += 1
        return loss

    def _capture(self, batch: Batch, sig: tuple) -> torch.Tensor:
        """Check and capture the step for ``batch``'s shape: the eager step from the current state first
        (its result, kept on the host, is the one kept), then back to the same state, the capture (with
        ``overlap_copy`` two, the second into the first's memory pool) and, from that state again, one replay
        of each, compared with it. Returns the eager step's loss.

        Why in this order, the eager step on the side stream: its activations and gradients are freed
        before the graph's pool holds its own, so a run's peak can be the larger of the two, not their sum
        (with the check after the capture, on the default stream, a graphed run's peak was 66 MiB above an
        eager run's at batch 1 and 8 on the H200, 15d5e9e, BENCHMARKS.md); and the default stream would
        give cuBLAS a second workspace. Two graphs share one pool: they replay one after the other on one
        stream, and what the first leaves for the host (its loss) is cloned out before the second runs; the
        gradients each writes afresh are dropped before the next capture (``.grad`` set to None), so the
        second reuses their memory.
        """
        start = _snapshot(self.model, self.opt, self.device)
        statics = [to_device(batch, self.device, copy=True) for _ in range(self.buffers)]
        loss = self._eager_on_side(*statics[0])  # a fault of the step itself is raised here, as in any eager step
        eager = _snapshot(self.model, self.opt, self.device)
        current = torch.cuda.current_stream(self.device)  # to restore if the capture fails
        captured: list[_Graph] = []
        checking, loss_err, update_err, out, g, graph, static = False, 0.0, 0.0, None, None, None, None
        try:
            for static in statics:
                _restore(self.model, self.opt, self.device, start)
                self.opt.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                pool = captured[0].graph.pool() if captured else None
                # on this step's GPU and on the warm-up's stream: torch.cuda.graph's own capture stream is made
                # once per process on whichever GPU was current then (a graph captured there from work on
                # another GPU is empty, replays as nothing, and would pass the check below); thread_local:
                # loader threads may pin memory meanwhile
                with torch.cuda.device(self.device), torch.cuda.graph(
                        graph, pool=pool, stream=self.side, capture_error_mode="thread_local"):
                    out = self._forward_backward(*static)
                captured.append(_Graph(graph, static, out))  # `graph` stays bound: the failure paths del it
            checking = True
            for g in captured:
                _restore(self.model, self.opt, self.device, start)
                g.graph.replay()
                replayed = _snapshot(self.model, self.opt, self.device, params_only=True)
                # the worst graph's errors; NaN (a replay gone wrong) counts as infinite, which max would drop
                gap = abs(float(g.loss) - float(loss)) / max(abs(float(loss)), 1e-12)
                loss_err = max(loss_err, _finite_or_inf(gap))
                update_err = max(update_err, _finite_or_inf(_update_error(start["params"], replayed["params"],
                                                                          eager["params"])))
        except Exception as e:  # RuntimeError: what CUDA and torch raise when a capture is refused; graphs are on by
            # default, so a fault in the check falls back too, it does not end the run
            failure = _first_line(e)
        else:
            failure = None
        # a failure is handled outside the except block: its traceback would keep the failed attempt's device
        # tensors alive, and the graph its pool, through the eager steps (out of memory)
        if failure is not None and not checking:  # graph.__exit__ leaves the capture stream current when
            with torch.cuda.device(self.device):  # capture_end raises; set_stream also makes its device current
                torch.cuda.set_stream(current)
        _restore(self.model, self.opt, self.device, eager)  # the eager result is the one kept, whatever happened
        if failure is not None:
            del captured, statics, out, g, graph, static  # the graphs and their pool go with them
            self._drop_graph()
            log.warning("cuda_graphs: %s failed (%s); running without graphs",
                        "checking the captured training step" if checking else "capturing the training step", failure)
            return loss
        if not (loss_err <= LOSS_TOLERANCE and update_err <= UPDATE_TOLERANCE):
            log.warning("cuda_graphs: the captured training step differs from the eager one (loss by %.2g, "
                        "update by %.2g, relative); running without graphs", loss_err, update_err)
            del captured, statics, out, g, graph, static  # the graphs and their pool go with them
            self._drop_graph()
            return loss
        self.captured, self.signature, self.turn = captured, sig, 0
        log.info("cuda_graphs: training steps on batches of %s run as %s (loss within %.2g, update within %.2g "
                 "of eager)", _describe(sig), "one CUDA graph" if len(captured) == 1 else
                 f"{len(captured)} CUDA graphs taking turns, each batch copied in during the step before",
                 loss_err, update_err)
        return loss

    def _drop_graph(self) -> None:
        """Eager steps from now on; the graph's pool goes back to CUDA once the caller holds no graph (the
        gradients the capture made live in it: dropped here)."""
        self.opt.zero_grad(set_to_none=True)
        self.captured, self.graphs, self.copier = [], False, None
        torch.cuda.empty_cache()


def _finite_or_inf(x: float) -> float:
    return x if x == x else float("inf")


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _signature(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return ("T", tuple(batch.shape), batch.dtype)
    if isinstance(batch, Mapping):
        return ("M",) + tuple((k, _signature(v)) for k, v in sorted(batch.items()))
    if isinstance(batch, (tuple, list)):
        return ("L",) + tuple(_signature(v) for v in batch)
    return ("V", batch)  # plain values are baked into the graph: they must match too


def _describe(sig: tuple) -> str:
    shapes = []

    def walk(s):
        if s[0] == "T":
            shapes.append(s[1])
        else:
            for x in s[1:]:
                walk(x[1] if s[0] == "M" else x)
    walk(sig)
    return f"{len(shapes)} tensors, the first {shapes[0]}" if shapes else "no tensors"


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A (nested) dict / tuple / list batch with every tensor replaced by ``fn(tensor)``; other values kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device, copy: bool = False) -> Any:
    """Tensors in a (nested) dict / tuple / list moved to ``device`` without blocking (``copy``: always copies)."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True, copy=copy))


def _on_host(batch: Any) -> bool:
    """Whether every tensor in a (nested) batch is in host memory."""
    tensors: list[torch.Tensor] = []
    _map_tensors(batch, lambda t: tensors.append(t) or t)
    return all(t.device.type == "cpu" for t in tensors)


def _pinned(batch: Any) -> Any:
    """``batch`` with its pageable host tensors copied into page-locked memory (the loader's tokens already
    are; targets and head inputs made on the host may not be): a copy from pageable memory may wait for the
    copy stream, and so for the replay before, where it should be queued behind it."""
    return _map_tensors(batch, lambda t: t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory())


def _copy_into(static: Any, batch: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, Mapping):
        for k, v in static.items():
            _copy_into(v, batch[k])
    elif isinstance(static, (tuple, list)):
        for s, b in zip(static, batch):
            _copy_into(s, b)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, params_only: bool = False) -> dict:
    """Host copies of the trainable state (kept off the GPU: they must not add to its peak memory)."""
    params = [p.detach().to("cpu", copy=True) for p in _trainable(model)]
    if params_only:
        return {"params": params}
    state = {id(p): {k: v.detach().to("cpu", copy=True) for k, v in s.items() if isinstance(v, torch.Tensor)}
             for p, s in opt.state.items()}
    return {"params": params, "state": state, "rng": torch.cuda.get_rng_state(device)}


def _restore(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, snap: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(_trainable(model), snap["params"]):
            p.copy_(saved)
        for p, s in opt.state.items():
            for k, v in snap["state"].get(id(p), {}).items():
                s[k].copy_(v)
    torch.cuda.set_rng_state(snap["rng"], device)


def _update_error(start: list[torch.Tensor], replayed: list[torch.Tensor], eager: list[torch.Tensor]) -> float:
    """Mean |replayed - eager| over mean |eager - start|, over all trainable parameters (host copies)."""
    diff = sum(float((r - e).abs().sum()) for r, e in zip(replayed, eager))
    update = sum(float((e - s).abs().sum()) for e, s in zip(eager, start))
    return diff / max(update, 1e-30)
