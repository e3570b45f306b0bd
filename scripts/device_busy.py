"""How busy a device was, from the activities a profiler recorded (used by bench_pipeline.py --trace)."""

from __future__ import annotations


def device_busy(intervals: list[tuple[int, int]]) -> tuple[float, float, list[float]]:
    """``(busy, span, gaps)`` in seconds for device activities given as ``(start_ns, end_ns)``: the length of
    their union, the time from the first start to the last end, and the idle gaps between (in time order).
    Why a union: copies run beside kernels on their own engines, so summed durations can pass the wall time."""
    busy = span = 0.0
    gaps: list[float] = []
    start = end = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                busy += (end - start) / 1e9
                gaps.append((a - end) / 1e9)
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        busy += (end - start) / 1e9
        span = (end - min(a for a, _ in intervals)) / 1e9
    return busy, span, gaps
