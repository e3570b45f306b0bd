"""The original project's entry points: every script exists and calls the driver; a smoke run works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def test_every_setting_and_task_has_its_script():
    names = sorted(p.name for p in (SCRIPTS / "original").glob("*.sh"))
    for task in ("ave", "avvp", "avs_s4", "avs_ms3", "avqa"):
        assert f"run_mettle_specific_swin_htsat_{task}.sh" in names and f"run_mettle_shared_swin_{task}.sh" in names
    for name in names:
        assert os.access(SCRIPTS / "original" / name, os.X_OK)
    out = subprocess.run([sys.executable, SCRIPTS / "run_original.py", "shared", "avs-s4", "--data-root", "/d",
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert "--dataset avsbench-s4" in out and "--backbones shared" in out and "--task avs-s4" in out


@pytest.mark.slow
def test_smoke_run_on_the_toy_dataset(toy48_cache, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", SCRIPTS / "original" / "run_mettle_specific_swin_htsat_ave.sh",
                    str(toy48_cache.parent / "toy"), "--work", str(tmp_path), "--dataset", "toy", "--backbones",
                    "tiny", "--device", "cpu", "--", "--set", "optim.epochs=1", "-q"],
                   check=True, env=env, capture_output=True, text=True)
    results = json.loads(next((tmp_path / "runs").glob("ave__*/results.json")).read_text())
    assert results["epochs"] == 1 and "accuracy" in results["test"]
