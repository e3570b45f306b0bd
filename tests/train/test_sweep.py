"""Sweeps: a grid on one cache, finished runs skipped, the same table on dask workers."""

import json

import pytest
from click.testing import CliRunner

from mettle.train.cli import main as train_cli
from mettle.train.config import ConfigError
from mettle.train.sweep import load_sweep

SWEEP = """
task: ave
base:
  lcd: {dim: 16, heads: 2}
  head: {hidden: 16, temporal: none}
  optim: {epochs: 1, batch_size: 2}
grid:
  lcd.meta_tokens: [1, 2]
  lcd.layers: [all, last-stage]
seeds: [0, 1]
"""


@pytest.mark.slow
def test_sweep_table_resume_and_dask(small_toy_cache, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    runner = CliRunner()
    args = ["--sweep", str(path), "--cache", str(small_toy_cache), "--device", "cpu", "-q"]
    r = runner.invoke(train_cli, [*args, "--out", str(tmp_path / "seq")])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "seq" / "sweep-ave"
    rows = json.loads((folder / "sweep.json").read_text())
    assert len(rows) == 4 and all(row["seeds"] == 2 for row in rows)
    assert {(row["lcd.meta_tokens"], row["lcd.layers"]) for row in rows} == {(1, "all"), (1, "last-stage"),
                                                                             (2, "all"), (2, "last-stage")}
    assert rows[0]["trainable_parameters"] > rows[1]["trainable_parameters"]  # all blocks > last stage
    assert (folder / "sweep.csv").read_text().count("\n") == 5 and (folder / "sweep.png").stat().st_size > 1000
    assert (folder / "curves.png").stat().st_size > 1000 and (folder / "layers.png").stat().st_size > 1000
    assert "+-" in (folder / "sweep.md").read_text()
    runs = sorted((tmp_path / "seq").glob("ave__*/results.json"))
    assert len(runs) == 8
    stamps = [p.stat().st_mtime_ns for p in runs]
    r = runner.invoke(train_cli, [*args, "--out", str(tmp_path / "seq")])  # finished runs are skipped
    assert r.exit_code == 0 and [p.stat().st_mtime_ns for p in runs] == stamps
    r = runner.invoke(train_cli, [*args, "--out", str(tmp_path / "dask"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "dask" / "sweep-ave" / "sweep.json").read_text()) == rows


def test_sweep_file_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: ave\ngrid:\n  lcd.meta_tokens: 4\n")
    with pytest.raises(ConfigError, match="grid values must be non-empty lists"):
        load_sweep(path)
    path.write_text("task: ave\nmatrix: {}\n")
    with pytest.raises(ConfigError, match="unknown section matrix"):
        load_sweep(path)
    path.write_text("task: ave\ngrid: {cuda_graphs: [true, false], lcd.dim: [32, 64]}\n")
    with pytest.raises(ConfigError, match="grid axis cuda_graphs does not change results"):
        load_sweep(path)
    path.write_text("task: ave\ngrid: {lcd.chunk_mib: [16, 64]}\n")
    with pytest.raises(ConfigError, match="grid axis lcd.chunk_mib does not change results"):
        load_sweep(path)
    path.write_text("task: ave\ngrid: {lcd.tokens: [1]}\n")
    r = CliRunner().invoke(train_cli, ["--sweep", str(path), "--cache", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
