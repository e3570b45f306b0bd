"""The benchmark scripts that count rather than time still run (they use private profiler APIs)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_profile_counts_operators_and_peak_memory():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "step_profile.py"), "--size", "tiny", "--batches", "1",
                          "--compare", "lcd.share=none"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True).stdout
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| 1 |")]
    head = next(line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| batch"))
    table = {r[head.index("sets")]: dict(zip(head, r)) for r in rows}
    shared, own = table["defaults"], table["lcd.share=none"]
    # every layer its own readout: no batched groups, more operators; the rest of the step is the same
    assert int(own["ops_lcd"]) > int(shared["ops_lcd"]) > 0
    assert own["ops_rest"] == shared["ops_rest"]
    assert float(shared["peak_mib"]) > 0
