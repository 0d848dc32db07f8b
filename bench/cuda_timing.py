"""CUDA-event timing shared by the inline scripts of bench/gpu_round.sh (stages peak, shapes)."""
import statistics

import torch


def timed(fn, reps=30, warm=5):
    """(median, min, max) milliseconds of fn() over `reps` runs after `warm` unmeasured ones,
    each between two CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)
