"""mettle-train on toy caches: it learns, writes its run folder, skips finished runs, refuses bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from mettle.cache import CacheError, open_cache
from mettle.train.cli import main as train_cli
from mettle.train.config import ConfigError, TrainConfig, resolve_config
from mettle.train.loop import fit
from mettle.train.run import train_run

FAST = {"lcd.dim": 64, "lcd.meta_tokens": 4, "lcd.heads": 2, "head.hidden": 64, "optim.epochs": 12,
        "optim.batch_size": 4, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def toy_cache(toy48_cache):
    return toy48_cache


def _cfg(cache, out, **sets):
    return resolve_config("ave", {"hidden": 256, "temporal": "gru", "dropout": 0.1}, sets={**FAST, **sets},
                          cache=str(cache), out=str(out), device="cpu")


@pytest.mark.slow
def test_ave_on_the_toy_cache_learns(toy_cache, tmp_path):
    source = open_cache(toy_cache)
    labels = torch.tensor([source.manifest.clips[r].labels["segment_labels"] for r in source.rows("test")])
    majority = 100 * float((labels == labels.flatten().mode().values).float().mean())
    run_dir, results = train_run(_cfg(toy_cache, tmp_path), source, progress=False)
    acc = results["test"]["accuracy"]
    assert acc >= max(85, majority + 25), (acc, majority)
    assert results["trainable_parameters"] > 0 and results["seconds_per_epoch"] > 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[-1]["train_loss"] < lines[0]["train_loss"]
    best = max(lines, key=lambda r: (r["val_accuracy"], -r["val_loss"]))  # selected on val, never test
    assert best["epoch"] == results["best_epoch"] and best["val_accuracy"] == results["val"]["accuracy"]
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "config.yaml").is_file()
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert ckpt["info"]["epoch"] == results["best_epoch"]
    again_dir, again = train_run(_cfg(toy_cache, tmp_path), source, progress=False)  # finished: skipped
    assert again_dir == run_dir and again == results
    r = CliRunner().invoke(train_cli, ["--task", "ave", "--cache", str(toy_cache), "--config",
                                       str(run_dir / "config.yaml"), "--eval-only", "--checkpoint",
                                       str(run_dir / "best.pt"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[0])["test"]["accuracy"] == pytest.approx(acc)


def test_layer_subsets_and_ablations_train(toy_cache, tmp_path):
    source = open_cache(toy_cache)
    for sets in ({"lcd.layers": "last-stage"}, {"lcd.layers": "every-2", "lcd.adapt": "false"},
                 {"lcd.layers": "stage0.block0,stage3.block0", "lcd.preserve": "false"}):
        res = fit(_cfg(toy_cache, tmp_path, **sets), source, progress=False, max_steps=2)
        assert len(res.step_losses) == 2 and all(torch.isfinite(torch.tensor(res.step_losses)))
    with pytest.raises(ConfigError, match="lcd.layers='stage9.block0'"):
        fit(_cfg(toy_cache, tmp_path, **{"lcd.layers": "stage9.block0"}), source, progress=False, max_steps=1)


def test_config_layers_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lcd:\n  meta_tokens: 2\noptim: {lr: 0.01}\nseed: 5\n")
    cfg = resolve_config("ave", {"hidden": 256}, y, {"lcd.meta_tokens": "3", "head.hidden": "32"}, seed=7)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.lcd.meta_tokens, cfg.optim.lr, cfg.seed, cfg.head["hidden"]) == (3, 0.01, 7, 32)
    with pytest.raises(ConfigError, match="unknown option 'lcd.tokens'"):
        resolve_config("ave", {}, sets={"lcd.tokens": "3"})
    with pytest.raises(ConfigError, match="not an integer"):
        resolve_config("ave", {}, sets={"lcd.meta_tokens": "many"})
    with pytest.raises(ConfigError, match="lcd.matmul='fast' is not one of auto, tf32, float32"):
        resolve_config("ave", {}, sets={"lcd.matmul": "fast"})
    assert resolve_config("ave", {}, sets={"lcd.matmul": "TF32"}).lcd.matmul == "tf32"
    with pytest.raises(ConfigError, match="optim.lr=nan is outside"):  # NaN fails every comparison
        resolve_config("ave", {}, sets={"optim.lr": "nan"})
    with pytest.raises(ConfigError, match="cublas_workspace='huge' is not one of auto, small, library"):
        resolve_config("ave", {}, sets={"cublas_workspace": "huge"})
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a YAML mapping"):
        resolve_config("ave", {}, y)


def test_execution_options_leave_the_run_fingerprint_alone():
    """Options that change only speed or memory (up to float rounding) find a finished run again."""
    base = resolve_config("ave", {"hidden": 256})
    for sets in ({"lcd.chunk_mib": "64"}, {"cuda_graphs": "false"}, {"workers": "2"}, {"lcd.matmul": "float32"},
                 {"overlap_copy": "true"}, {"cublas_workspace": "library"}):
        assert resolve_config("ave", {"hidden": 256}, sets=sets).fingerprint() == base.fingerprint(), sets
    assert resolve_config("ave", {"hidden": 256}, sets={"lcd.dim": "64"}).fingerprint() != base.fingerprint()


def test_cli_errors(toy_cache, tmp_path):
    runner = CliRunner()
    sweep, empty = tmp_path / "sweep.yaml", tmp_path / "empty.yaml"
    sweep.write_text("task: ave\ngrid: {lcd.dim: [16, 32]}\n")
    empty.write_text("task: ave\nseeds: []\n")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("lcd: {dim: 16}  # r\xe9sum\xe9\n".encode("latin-1"))
    for args, message in [(["--task", "dance", "--cache", str(toy_cache)], "unknown task 'dance'"),
                          (["--task", "ave", "--cache", str(tmp_path / "none")], "does not exist"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "lcd.k"], "is not key=value"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "optim.lr=fast"], "not a number"),
                          (["--task", "ave", "--cache", str(toy_cache), "--eval-only"], "needs --checkpoint"),
                          # values outside their range: ZeroDivisionError, raw torch messages or silent no-ops before
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "lcd.meta_tokens=0"],
                           "lcd.meta_tokens=0 is outside [1, inf). Fix: write e.g. lcd.meta_tokens=8"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "optim.batch_size=0"],
                           "optim.batch_size=0 is outside"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "optim.lr=0"], "optim.lr=0.0 is outside"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "optim.epochs=0"], "optim.epochs=0"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "head.dropout=1.5"], "head.dropout=1.5"),
                          (["--task", "ave", "--cache", str(toy_cache), "--workers", "-1"], "workers=-1 is outside"),
                          # options that were silently ignored
                          (["--task", "ave", "--cache", str(toy_cache), "--checkpoint", str(tmp_path / "best.pt")],
                           "--checkpoint is read by --eval-only only"),
                          (["--task", "ave", "--cache", str(toy_cache), "--resume", "--overwrite"],
                           "Fix: pass one of them"),
                          (["--sweep", str(sweep), "--cache", str(toy_cache), "--set", "optim.epochs=3", "--seed", "5"],
                           "--set, --seed would be ignored"),
                          (["--sweep", str(sweep), "--cache", str(toy_cache), "--workers", "-1"], "--workers -1"),
                          (["--sweep", str(empty), "--cache", str(toy_cache)], "seeds must be a non-empty list"),
                          (["--task", "ave", "--cache", str(toy_cache), "--set", "task=avvp"], "pass the task as --task"),
                          (["--task", "ave", "--cache", str(toy_cache / "cache.json")], "is a file, not a cache folder"),
                          (["--task", "ave", "--cache", str(toy_cache), "--init-from", str(tmp_path / "none"), "--out",
                            str(tmp_path / "runs")], f"--init-from {tmp_path / 'none'} does not exist"),
                          (["--task", "ave", "--cache", str(toy_cache), "--config", str(latin)], "latin.yaml: cannot read")]:
        r = runner.invoke(train_cli, args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert not list((tmp_path / "runs").glob("*"))  # a run that failed before its first epoch leaves no folder


def test_a_cache_lacking_the_tasks_blocks_is_refused(toy_cache, tmp_path):
    import shutil

    from mettle.cache.format import META_FILE

    seg = tmp_path / "seg"
    shutil.copytree(toy_cache, seg)
    d = json.loads((seg / META_FILE).read_text())
    d["arrays"] = [a for a in d["arrays"] if a["stage"] == 3]  # as a segmentation cache would lack them
    d["preset"] = "segmentation"
    (seg / META_FILE).write_text(json.dumps(d))
    with pytest.raises(CacheError, match="lacks visual/stage0.block0.*needed for task ave.*--preset"):
        fit(_cfg(seg, tmp_path), open_cache(seg), progress=False, max_steps=1)
    r = CliRunner().invoke(train_cli, ["--task", "ave", "--cache", str(seg), "--out", str(tmp_path / "runs"), "-q"])
    assert r.exit_code == 2 and "lacks" in r.output and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_mettle_train_on_a_real_format_ave_cache(toy_cache, tmp_path):
    """Dataset "ave" (not "toy") read from an AVE-format folder: the toy data are written in that format."""
    from mettle.extract.cli import main as extract_cli

    toy = toy_cache.parent / "toy"
    r = CliRunner().invoke(extract_cli, ["--dataset", "ave", "--set", f"annotations={toy}", "--data-root", str(toy),
                                         "--cache", str(tmp_path / "ave"), "--backbones", "tiny", "-q"])
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "ave")
    assert cache.meta.dataset == "ave" and cache.manifest.split_sizes() == {"train": 32, "val": 8, "test": 8}
    r = CliRunner().invoke(train_cli, ["--task", "ave", "--cache", str(tmp_path / "ave"), "--out", str(tmp_path / "runs"),
                                       "--device", "cpu", "-q", *[f"--set={k}={v}" for k, v in FAST.items()],
                                       "--set", "optim.epochs=2"])
    assert r.exit_code == 0, r.output
    assert "AVE accuracy (all seconds)" in r.output
    results = json.loads(next((tmp_path / "runs").glob("ave__ave-*/results.json")).read_text())
    assert results["source"]["dataset"] == "ave" and results["epochs"] == 2 and 1 < results["test"]["accuracy"] <= 100


def test_an_int8_cache_trains_from_its_codes_as_from_decoded_tokens(toy_root, tmp_path, monkeypatch):
    """An int8 cache hands the LCD its codes and scales (a quarter of float32's bytes); the training is
    the one its decoded tokens give, step for step."""
    from mettle.extract.config import ExtractConfig
    from mettle.extract.run import extract
    from mettle.train.model import MettleModel

    extract(ExtractConfig(dataset="toy", cache=str(tmp_path / "c"), data_root=str(toy_root), dtype="int8",
                          manifest_options={"num_clips": 12, "frames": True}, backbones="tiny", device="cpu",
                          limit=6), progress=False)
    cache = open_cache(tmp_path / "c")
    cfg = _cfg(tmp_path / "c", tmp_path, **{"optim.batch_size": 2, "optim.epochs": 2})
    seen = []
    real = cache.iterate
    monkeypatch.setattr(cache, "iterate", lambda *a, **k: (seen.append(k.get("codes")), real(*a, **k))[1])
    codes = fit(cfg, cache, progress=False)
    assert seen and all(seen)
    batch = next(real([[0, 1]], seen[0], codes=seen[0]))
    assert all(batch["tokens"][k].dtype == torch.int8 for k in seen[0])
    monkeypatch.setattr(MettleModel, "code_keys", property(lambda self: []))
    decoded = fit(cfg, cache, progress=False)
    assert len(codes.step_losses) == 4  # 4 training clips of the 6, batches of 2, 2 epochs
    assert codes.step_losses == decoded.step_losses and codes.val == decoded.val  # the same float32 products


def test_loader_workers_train_as_in_process_reads_through_one_kept_loader(toy_cache, tmp_path, monkeypatch):
    """With loader workers (--workers N) every epoch's training and validation pass and the final test pass
    read through one set of worker processes, kept by the cache, and the training is the one that reads in
    this process give, step for step."""
    from mettle.cache import loader as loader_module

    made = []
    real = loader_module.KeptLoader.__init__
    monkeypatch.setattr(loader_module.KeptLoader, "__init__",
                        lambda self, tokens, workers, *a, **k: (made.append(workers), real(self, tokens, workers, *a, **k))[1])
    in_process = fit(_cfg(toy_cache, tmp_path, **{"optim.epochs": 3}), open_cache(toy_cache), progress=False)
    cfg = resolve_config("ave", {"hidden": 256, "temporal": "gru", "dropout": 0.1}, sets={**FAST, "optim.epochs": 3},
                         cache=str(toy_cache), out=str(tmp_path), device="cpu", workers=2)
    with open_cache(toy_cache) as source:
        workers = fit(cfg, source, progress=False)
        assert made == [2] and not source._kept.closed
    assert source._kept is None
    assert len(workers.step_losses) == len(in_process.step_losses) > 3
    assert workers.step_losses == in_process.step_losses
    assert workers.val == in_process.val and workers.test == in_process.test
