"""Shared helpers for benchmarks: median timing, a printed table and the ``--json`` row format.

Each row is ``{"name", "value", "unit", "baseline", "ratio"}`` with ``ratio = baseline / value`` for times (how many
times faster than the baseline measured in the same process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON list of rows instead of a table")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (runs in under a minute)")
    return p


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def median_cpu_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median process CPU time (all threads) per call in milliseconds: the work a call does, which the load of a
    shared machine changes little (with ``OMP_WAIT_POLICY=passive``, idle threads add none), unlike wall time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1000.0)
    return statistics.median(times)


def row(name: str, value: float, unit: str, baseline: float | None) -> dict:
    ratio = None if baseline is None or value == 0 else baseline / value
    return {"name": name, "value": round(value, 4), "unit": unit, "baseline": None if baseline is None else round(baseline, 4),
            "ratio": None if ratio is None else round(ratio, 3)}


def emit(rows: list[dict], as_json: bool, title: str, baseline_name: str) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    print(f"\n{title}\n(baseline: {baseline_name}; ratio = baseline / value, >1 means faster)\n")
    w = max(len(r["name"]) for r in rows)
    print(f"{'name':<{w}}  {'value':>10}  {'unit':<5}  {'baseline':>10}  {'ratio':>8}")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['name']:<{w}}  {r['value']:>10.3f}  {r['unit']:<5}  {base:>10}  {ratio:>8}")
