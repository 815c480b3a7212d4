"""Timing helpers: warm-ups, then medians (the method in docs/benchmarks.md)."""

import json
import os
import statistics
import time


def seconds(fn, repeats=10, warmup=3):
    """Calls `fn` `warmup` times untimed, then `repeats` times timed; the
    seconds of each timed call. `fn` must block until its result is ready
    (e.g. call `.numpy()`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(fn, repeats=10, warmup=3):
    """`seconds(fn, repeats, warmup)` as a dict of the median, min and max."""
    return summary(seconds(fn, repeats, warmup))


def summary(times):
    """The median, min and max of times in seconds, as `measure` gives."""
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
    }


def ms_range(seconds):
    """ "min-max" of a `measure` result, in milliseconds."""
    return f"{1e3 * seconds['min']:.1f}-{1e3 * seconds['max']:.1f}"


def write_json(path, results):
    """Writes the results with the versions they were measured with."""
    with open(path, "w") as fh:
        json.dump({"results": results, "versions": versions()}, fh, indent=1)


def print_table(header, rows):
    widths = [
        max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)
    ]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*header))
    for row in rows:
        print(line.format(*row))


def versions():
    import platform

    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
