"""Training faults: resume equals an uninterrupted run, NaN tokens are named, checkpoints are atomic."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from mettle.cache import open_cache
from mettle.train.config import resolve_config
from mettle.train.loop import fit, load_checkpoint
from mettle.train.run import train_run

SETS = {"lcd.dim": 32, "lcd.meta_tokens": 2, "lcd.heads": 2, "head.hidden": 32, "optim.epochs": 4,
        "optim.batch_size": 2}


def _cfg(cache, out):
    return resolve_config("ave", {"hidden": 256, "temporal": "gru", "dropout": 0.1}, sets=SETS, cache=str(cache),
                          out=str(out), device="cpu")


class Killed(Exception):
    pass


def _killed_run(cache, tmp_path, monkeypatch):
    """A clean 4-epoch run, and the same config killed right after epoch 2's state was saved."""
    source = open_cache(cache)
    _, clean = train_run(_cfg(cache, tmp_path / "clean"), source, progress=False, plot=False)

    def kill_after_second_epoch(record, result):
        if record["epoch"] == 1:
            raise Killed

    out = tmp_path / "killed"
    cfg = _cfg(cache, out)
    import mettle.train.run as run_module

    real_fit = run_module.fit  # the run dies right after epoch 2's state is saved, as a kill would leave it
    monkeypatch.setattr(run_module, "fit", lambda *a, **k: real_fit(
        *a, **{**k, "on_epoch": _chain(k["on_epoch"], kill_after_second_epoch)}))
    with pytest.raises(Killed):
        train_run(cfg, source, progress=False, plot=False)
    monkeypatch.undo()
    return cfg, source, next(out.iterdir()), clean


def test_resume_continues_to_the_same_result(small_toy_cache, tmp_path, monkeypatch):
    cfg, source, run_dir, clean = _killed_run(small_toy_cache, tmp_path, monkeypatch)
    assert not (run_dir / "results.json").exists()
    state = load_checkpoint(run_dir / "last.pt")  # weights_only load of the full training state
    assert state["epoch"] == 1 and len(state["history"]) == 2
    from mettle.train.config import ConfigError

    with pytest.raises(ConfigError, match="unfinished run .*Fix: pass --resume to continue it, or --overwrite"):
        train_run(cfg, source, progress=False, plot=False)  # a plain rerun threw the epochs done away
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    _, resumed = train_run(cfg, source, progress=False, plot=False, resume=True)
    assert resumed["test"] == clean["test"] and resumed["best_epoch"] == clean["best_epoch"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    clean_lines = [json.loads(x) for x in next((tmp_path / "clean").iterdir()).joinpath("metrics.jsonl")
                   .read_text().splitlines()]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in clean_lines]


def test_runs_saved_while_ave_reported_fractions_read_in_percent(small_toy_cache, tmp_path, monkeypatch):
    """AVE's accuracy was a fraction in runs saved before 2026-11-28 (every other task: percent). Their
    states resume, and their results are read, in percent: a sweep never mixes 0.90 with 90.0."""
    cfg, source, run_dir, clean = _killed_run(small_toy_cache, tmp_path, monkeypatch)
    assert clean["metric_units"] == "percent" and clean["best_epoch"] in (0, 1)  # else the best's units go untested
    state = load_checkpoint(run_dir / "last.pt")
    del state["metric_units"]  # the state as the older mettle saved it
    state["best"][0] /= 100
    state["val"] = {k: v / 100 if k == "accuracy" else v for k, v in state["val"].items()}
    state["history"] = [{k: v / 100 if k == "val_accuracy" else v for k, v in r.items()} for r in state["history"]]
    torch.save(state, run_dir / "last.pt")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_accuracy": r["val_accuracy"] / 100}) + "\n"
                                                   for r in lines))
    _, resumed = train_run(cfg, source, progress=False, plot=False, resume=True)
    clean_lines = [json.loads(x) for x in next((tmp_path / "clean").iterdir()).joinpath("metrics.jsonl")
                   .read_text().splitlines()]
    resumed_lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in resumed_lines] == pytest.approx([r["val_accuracy"] for r in clean_lines])
    assert resumed["val"] == pytest.approx(clean["val"]) and resumed["best_epoch"] == clean["best_epoch"]
    assert resumed["test"] == pytest.approx(clean["test"]) and resumed["table"] == clean["table"]
    old = {**resumed, "test": {**resumed["test"], "accuracy": resumed["test"]["accuracy"] / 100},
           "val": {**resumed["val"], "accuracy": resumed["val"]["accuracy"] / 100}, "table": ["| AVE accuracy | 0.9 |"]}
    del old["metric_units"]
    (run_dir / "results.json").write_text(json.dumps(old))
    _, again = train_run(cfg, source, progress=False, plot=False)  # finished: read, not trained
    assert again["test"] == pytest.approx(clean["test"]) and again["val"] == pytest.approx(clean["val"])
    assert again["table"] == clean["table"] and again["metric_units"] == "percent"
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_accuracy": r["val_accuracy"] / 100}) + "\n"
                                                   for r in resumed_lines))  # a finished old run's lines
    from mettle.train.run import read_metrics  # as sweeps plot them

    assert [r["val_accuracy"] for r in read_metrics(run_dir)] == pytest.approx([r["val_accuracy"] for r in clean_lines])


def _chain(first, second):
    def both(record, result):
        first(record, result)
        second(record, result)
    return both


def test_non_finite_tokens_name_the_clip(small_toy_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_toy_cache, bad)
    source = open_cache(bad)
    row = source.rows("train")[0]
    import zarr

    arr = zarr.open_array(str(bad / "tokens.zarr" / "visual" / "stage3.block0"), mode="r+")
    block = arr[:]
    block[row] = np.inf
    arr[:] = block
    with pytest.raises(FloatingPointError, match=f"non-finite tokens in clip {source.manifest.clips[row].clip_id}"):
        fit(_cfg(bad, tmp_path), open_cache(bad), progress=False)


def test_a_killed_checkpoint_write_leaves_the_old_file(tmp_path, monkeypatch):
    from mettle.train.loop import save_checkpoint

    path = tmp_path / "best.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": 1})

    def dies(obj, f, *a, **k):
        with open(f, "wb") as h:
            h.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(2)}, {"epoch": 2})
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["info"]["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(2))


def test_a_cuda_run_saves_and_restores_its_device_rng(monkeypatch, caplog):
    """On CUDA the dropout masks come from the device's generator: the saved state carries it and a
    resume puts it back (a stand-in for torch.cuda's two calls here; tests/test_gpu_train.py runs it
    for real). A state saved without it warns that the resumed run is not exact."""
    from mettle.train.loop import restore_rng, rng_state

    device_rng = {"state": torch.tensor([7, 1, 2], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: device_rng["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: device_rng.update(state=s.clone()))
    cuda = torch.device("cuda", 0)
    saved = rng_state(cuda)
    assert set(saved) == {"torch_rng", "cuda_rng"} and saved["cuda_rng"].tolist() == [7, 1, 2]
    assert set(rng_state(torch.device("cpu"))) == {"torch_rng"}
    cpu_draw = torch.rand(3)
    device_rng["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the stream moved on
    with caplog.at_level("WARNING"):
        restore_rng(saved, cuda)
    assert device_rng["state"].tolist() == [7, 1, 2] and torch.equal(torch.rand(3), cpu_draw)
    assert not caplog.records
    device_rng["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    with caplog.at_level("WARNING"):
        restore_rng({"torch_rng": saved["torch_rng"]}, cuda)
    assert device_rng["state"].tolist() == [9, 9, 9]
    assert "no CUDA RNG state" in caplog.text and "without --resume" in caplog.text
    caplog.clear()
    restore_rng(saved, torch.device("cpu"))  # saved on CUDA, resumed on the CPU: the CPU stream only
    assert device_rng["state"].tolist() == [9, 9, 9] and not caplog.records


def test_init_keys_chooses_what_init_from_carries(small_toy_cache, tmp_path, caplog):
    """``init_keys`` patterns restrict --init-from (the reference AVQA workflow carries its fusion layers
    only); a pattern matching nothing of the checkpoint, and init_keys without --init-from, are refused
    by name; at its default the run fingerprint is what it was before the option existed."""
    from mettle.train.config import EXECUTION_OPTIONS, ConfigError
    from mettle.train.loop import build_model, init_from, save_checkpoint

    source = open_cache(small_toy_cache)
    cfg = _cfg(small_toy_cache, tmp_path)
    donor = build_model(resolve_config("ave", {"hidden": 256, "temporal": "gru", "dropout": 0.1},
                                       sets={**SETS, "seed": 5}, cache=str(small_toy_cache), device="cpu"), source)
    save_checkpoint(tmp_path / "best.pt", donor.state_dict(), {})
    given = donor.state_dict()
    heads = [k for k in given if k.startswith("head.")]
    assert heads and len(heads) < len(given)

    model = build_model(cfg, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_from(model, tmp_path, "head.*") == len(heads)
    for k, v in model.state_dict().items():
        assert torch.equal(v, given[k] if k.startswith("head.") else before[k]), k
    assert init_from(build_model(cfg, source), tmp_path / "best.pt") == len(given)  # the default: all of it
    with pytest.raises(ValueError, match=r"init_keys pattern 'heads\.\*' matches no parameter .*head\."):
        init_from(model, tmp_path, "head.*, heads.*")
    with pytest.raises(ConfigError, match="init_keys='head.\\*' chooses parameters of --init-from"):
        resolve_config("ave", {}, sets={"init_keys": "head.*"}, cache=str(small_toy_cache))
    chosen = resolve_config("ave", {}, sets={"init_keys": "head.*"}, init_from=str(tmp_path))
    default = resolve_config("ave", {}, init_from=str(tmp_path))
    assert chosen.fingerprint() != default.fingerprint()
    legacy = default.to_dict()  # the fingerprint's recipe before init_keys existed
    for k in (*EXECUTION_OPTIONS, "init_keys"):
        section, _, key = k.rpartition(".")
        (legacy[section] if section else legacy).pop(key)
    assert default.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:8]


def test_a_run_folder_is_not_reused_for_another_cache_at_the_same_path(small_toy_cache, tmp_path, caplog):
    """The run folder's name holds the cache folder's name, not its identity: after a cache is extracted
    again at the same path with other backbones, a rerun refuses the old results (and --resume the old
    state) instead of reporting them as this cache's; --overwrite trains again."""
    from mettle.cache import CacheError
    from mettle.train.run import eval_checkpoint

    cache = tmp_path / "a" / "cache"
    shutil.copytree(small_toy_cache, cache)
    cfg = resolve_config("ave", {"hidden": 32, "temporal": "gru", "dropout": 0.1}, sets={**SETS, "optim.epochs": 1},
                         cache=str(cache), out=str(tmp_path / "runs"), device="cpu")
    run_dir, first = train_run(cfg, open_cache(cache), progress=False, plot=False)
    assert train_run(cfg, open_cache(cache), progress=False, plot=False)[1] == first  # the same cache: skipped
    meta = json.loads((cache / "cache.json").read_text())
    meta["backbones"]["audio"]["weights_id"] = "another-checkpoint"  # as a re-extraction would record it
    (cache / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="another token source .*audio backbone weights_id: cache has .* this run "
                                         "has another-checkpoint.*Fix: pass another --out"):
        train_run(cfg, open_cache(cache), progress=False, plot=False)
    (run_dir / "results.json").unlink()
    with pytest.raises(CacheError, match="--resume would continue training on another token source"):
        train_run(cfg, open_cache(cache), progress=False, plot=False, resume=True)
    with caplog.at_level("WARNING"):
        eval_checkpoint(cfg, open_cache(cache), run_dir / "best.pt")
    assert "its checkpoint was trained on another token source" in caplog.text
    again, second = train_run(cfg, open_cache(cache), overwrite=True, progress=False, plot=False)
    assert again == run_dir and second["source"]["backbones"]["audio"]["weights_id"] == "another-checkpoint"


def test_a_split_left_empty_is_refused_before_training(small_toy_cache, tmp_path):
    """Every validation clip failed extraction: nothing would select the checkpoint, and the run crashed
    after training (KeyError in the results table). Refused up front, naming the split and the fix."""
    bad = tmp_path / "bad"
    shutil.copytree(small_toy_cache, bad)
    source = open_cache(bad)
    done = json.loads((bad / "done.json").read_text())
    val = source.rows("val")
    assert val
    for row in val:
        done["clip_status"][row] = "decode failed"
    (bad / "done.json").write_text(json.dumps(done))
    with pytest.raises(ValueError, match=f"nothing of the val split for task ave \\({len(val)} clips in it, "
                                         f"{len(val)} failed extraction\\). Fix: extract more clips"):
        fit(_cfg(bad, tmp_path), open_cache(bad), progress=False)
