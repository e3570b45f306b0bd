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


def test_device_busy_is_the_union_of_activities():
    """Copies overlap kernels on a GPU: busy time is the union of the intervals, not their sum; the gaps
    between the merged intervals are the device's idle time."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from device_busy import device_busy
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    ms = 1_000_000  # ns
    busy, span, gaps = device_busy([(5 * ms, 9 * ms), (0, 2 * ms), (1 * ms, 3 * ms), (6 * ms, 7 * ms)])
    assert (round(busy, 6), round(span, 6)) == (0.007, 0.009)  # [0, 3] and [5, 9]: 7 of 9 ms
    assert [round(g, 6) for g in gaps] == [0.002]
    assert device_busy([]) == (0.0, 0.0, [])
