"""The command-line tools, called in-process through click's runner."""

import pytest
from click.testing import CliRunner

from mettle.extract.demo import main as demo_main
from mettle.manifests import load_manifest
from mettle.manifests.cli import main as manifest_main


def test_manifest_summary_and_out(tmp_path):
    out = tmp_path / "ave.json"
    r = CliRunner().invoke(manifest_main, ["--dataset", "ave", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "4143 clips" in r.output and "train 3339, val 402, test 402" in r.output
    assert "Church bell" in r.output
    assert len(load_manifest(out)) == 4143


@pytest.mark.parametrize("args, message", [
    (["--dataset", "ave2"], "unknown dataset 'ave2'"),
    (["--dataset", "llp", "--set", "eval_audio=old"], "eval_audio 'old' is unknown"),
    (["--dataset", "toy", "--set", "num_clips=many"], "expected int"),
    (["--dataset", "avsbench-s4"], "needs data_root"),
    (["--dataset", "avsbench-s4", "--set", "data_root=/nonexistent"], "s4_meta_data.csv: file not found"),
])
def test_user_errors_are_one_line_exit_2(args, message):
    r = CliRunner().invoke(manifest_main, args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0


def test_demo_runs_end_to_end(tmp_path):
    r = CliRunner().invoke(demo_main, ["--out", str(tmp_path / "demo"), "--clips", "6"])
    assert r.exit_code == 0, r.output
    assert "dataset toy: 6 clips" in r.output and "AVE accuracy (all seconds)" in r.output
    assert (tmp_path / "demo" / "manifest.json").is_file()
    assert "6 of 6 clips ok, 0 failed; 1 shards written now" in r.output
    assert (tmp_path / "demo" / "runs").is_dir() and "majority-class rate" in r.output
    # a rerun reuses the generated data, the finished cache and the finished run
    mtime = (tmp_path / "demo" / "data" / "toy" / "toy.json").stat().st_mtime_ns
    r = CliRunner().invoke(demo_main, ["--out", str(tmp_path / "demo"), "--clips", "6"])
    assert r.exit_code == 0 and (tmp_path / "demo" / "data" / "toy" / "toy.json").stat().st_mtime_ns == mtime
    assert "0 shards written now, 1 already done" in r.output
    r = CliRunner().invoke(demo_main, ["--out", str(tmp_path / "demo"), "--clips", "7"])
    assert r.exit_code == 2 and "multiple of 6" in r.output


def test_an_error_raised_in_a_loader_worker_prints_its_own_line():
    """torch re-raises a worker's exception in the main process with its traceback folded into the
    message; a CLI still prints the one line the error was raised with."""
    import click
    from torch._utils import ExceptionWrapper

    from mettle.cache import CacheError
    from mettle.manifests.cli import clean_errors

    line = "shard file /c/tokens.zarr/a/c/1/0/0/0 is missing (cache /c). Fix: re-extract it: a: b"

    @click.command()
    @clean_errors(CacheError)
    def cmd() -> None:
        try:
            raise CacheError(line)
        except CacheError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 2 and r.output == f"error: {line}\n", r.output


def test_system_errors_on_output_paths_are_one_line(tmp_path):
    """An output path under a file, or in a folder that cannot be written: the system's error, named
    with its path, as one line (every command printed a traceback before)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = CliRunner().invoke(manifest_main, ["--dataset", "toy", "--set", f"data_root={tmp_path / 'toy'}",
                                           "--set", "num_clips=6", "--out", str(afile / "m.json")])
    assert r.exit_code == 2 and "Traceback" not in r.output and str(afile) in r.output, r.output
    assert r.output.splitlines()[-1].startswith("error: ") and "Fix: check that the path" in r.output
    r = CliRunner().invoke(demo_main, ["--out", str(afile / "demo"), "--clips", "6"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "Fix: " in r.output, r.output
