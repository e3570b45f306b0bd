"""The training step (train/step.py) on the CPU: it is the plain step, graphs fall back with a warning,
an optimiser saved by a graphed run resumes here, batch signatures tell shapes apart. The CUDA graph
itself is tested in tests/test_gpu.py."""

import logging

import torch
from torch import nn

from mettle.cache import open_cache
import pytest

from mettle.train.config import ConfigError, resolve_config
from mettle.train.loop import fit
from mettle.train.step import TrainStep, _signature, adopt_optimizer, graphs_for, make_optimizer

SETS = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "optim.batch_size": 2, "optim.lr": 1e-3}
HEAD = {"hidden": 32, "temporal": "gru", "dropout": 0.1}


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, tokens, scale):
        return self.lin(tokens["x"].float()) * scale


def _loss(out, target):
    return nn.functional.cross_entropy(out, target)


def test_the_step_is_forward_backward_clip_and_adamw():
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    step = TrainStep(a, _loss, make_optimizer(list(a.parameters()), 0.1, 0.01, torch.device("cpu")),
                     torch.device("cpu"), grad_clip=0.05)
    opt = torch.optim.AdamW(b.parameters(), lr=0.1, weight_decay=0.01)
    for i in range(4):
        x, y, s = torch.randn(5, 6).half(), torch.randint(0, 3, (5,)), torch.tensor(1.0 + i)
        loss = step({"x": x}, {"scale": s}, y)
        opt.zero_grad()
        ref = _loss(b({"x": x}, s), y)
        ref.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05))
        opt.step()
        assert norm > 0.05  # the clipping did something, so the comparison covers it
        assert torch.equal(loss, ref.detach()) and not loss.requires_grad
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert (step.eager, step.replays) == (4, 0)


def test_cuda_graphs_on_a_cpu_warn_and_train_as_without(small_toy_cache, caplog):
    cache = open_cache(small_toy_cache)
    plain = fit(resolve_config("ave", HEAD, sets=SETS, device="cpu"), cache, progress=False, max_steps=3)
    assert resolve_config("ave", HEAD).cuda_graphs == "auto"  # the default: graphs where they pay, on CUDA
    with caplog.at_level(logging.WARNING, logger="mettle.train.step"):
        fit(resolve_config("ave", HEAD, sets=SETS, device="cpu"), cache, progress=False, max_steps=1)
    assert "cuda_graphs" not in caplog.text  # auto on a CPU says nothing
    with caplog.at_level(logging.WARNING, logger="mettle.train.step"):
        graphs = fit(resolve_config("ave", HEAD, sets=SETS, device="cpu", cuda_graphs=True), cache, progress=False,
                     max_steps=3)
    assert "cuda_graphs: training runs on cpu" in caplog.text
    assert graphs.graph_replays == 0 and graphs.step_losses == plain.step_losses
    assert "overlap_copy" not in caplog.text  # auto on a CPU says nothing either
    with caplog.at_level(logging.WARNING, logger="mettle.train.loop"):  # two input buffers need graphs
        overlap = fit(resolve_config("ave", HEAD, sets={**SETS, "overlap_copy": "yes"}, device="cpu"), cache,
                      progress=False, max_steps=3)
    assert "overlap_copy: training runs without CUDA graphs (device cpu, cuda_graphs=auto)" in caplog.text
    with pytest.raises(ConfigError, match="overlap_copy='later' is not one of auto, true, false"):
        resolve_config("ave", HEAD, sets={"overlap_copy": "later"})
    assert overlap.graph_replays == 0 and overlap.step_losses == plain.step_losses


@pytest.mark.parametrize("given, setting", [(True, "true"), (False, "false"), ("auto", "auto"), ("Off", "false"),
                                            ("yes", "true")])
def test_cuda_graphs_setting_takes_flags_yaml_booleans_and_auto(given, setting):
    assert resolve_config("ave", HEAD, sets={"cuda_graphs": given}).cuda_graphs == setting


def test_a_bad_cuda_graphs_setting_names_the_choices():
    with pytest.raises(ConfigError, match="cuda_graphs='sometimes' is not one of auto, true, false"):
        resolve_config("ave", HEAD, sets={"cuda_graphs": "sometimes"})


def test_graphs_for_a_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)  # a device object needs no GPU
    assert [graphs_for(s, cuda) for s in ("auto", "true", "false")] == [True, True, False]
    assert [graphs_for(s, cpu) for s in ("auto", "true", "false")] == [False, False, False]
    assert [graphs_for(s, cuda) for s in (True, False)] == [True, False]  # a TrainConfig built directly
    with pytest.raises(ValueError, match="cuda_graphs='sometimes' is not one of auto, true, false"):
        graphs_for("sometimes", cuda)


def test_lagged_loss_reading_trains_the_same(small_toy_cache, monkeypatch):
    """On CUDA a step's loss is read after the next step is queued; forced here on the CPU."""
    import mettle.train.loop as loop

    cache = open_cache(small_toy_cache)
    cfg = resolve_config("ave", HEAD, sets={**SETS, "optim.epochs": 2}, device="cpu")
    plain = fit(cfg, cache, progress=False)
    monkeypatch.setattr(loop, "LAG_DEVICES", ("cpu",))
    lagged = fit(cfg, cache, progress=False)
    assert len(plain.step_losses) > 2 and lagged.step_losses == plain.step_losses
    assert [r["train_loss"] for r in lagged.history] == [r["train_loss"] for r in plain.history]


def test_an_optimiser_saved_with_a_tensor_lr_resumes_on_the_cpu():
    """A graphed run saves ``lr`` as a tensor and the flags it stepped with; the resuming run's own win."""
    model = Toy()
    saved = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    _loss(model({"x": torch.randn(4, 6)}, 1.0), torch.randint(0, 3, (4,))).backward()
    saved.step()
    state = saved.state_dict()
    state["param_groups"][0]["capturable"] = True  # as a graphed CUDA run leaves it
    opt = make_optimizer(list(model.parameters()), 0.5, 0.01, torch.device("cpu"))
    opt.load_state_dict(state)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["capturable"]
    adopt_optimizer(opt, torch.device("cpu"), graphs=True)  # graphs are CUDA-only: plain float lr here
    group = opt.param_groups[0]
    assert abs(group["lr"] - 0.01) < 1e-9 and type(group["lr"]) is float and group["capturable"] is False
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert type(group["lr"]) is float and abs(group["lr"] - 0.005) < 1e-9
    assert all(s["step"].device.type == "cpu" for s in opt.state.values())
    _loss(model({"x": torch.randn(4, 6)}, 1.0), torch.randint(0, 3, (4,))).backward()
    opt.step()
    sched.step()
    assert all(float(s["step"]) == 2 for s in opt.state.values())


def test_batch_signatures_tell_shapes_dtypes_and_values_apart():
    x = {"a": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.long)}
    base = _signature((x, {}, torch.zeros(2)))
    assert base == _signature(({"b": torch.ones(2, dtype=torch.long), "a": torch.ones(2, 3)}, {}, torch.ones(2)))
    assert base != _signature(({**x, "a": torch.zeros(1, 3)}, {}, torch.zeros(2)))
    assert base != _signature(({**x, "a": torch.zeros(2, 3).half()}, {}, torch.zeros(2)))
    assert base != _signature((x, {"k": 1}, torch.zeros(2)))
    assert _signature((x, {"k": 1}, None)) != _signature((x, {"k": 2}, None))
