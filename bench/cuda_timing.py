"""CUDA-event timing and result rows shared by the inline scripts of bench/gpu_round.sh (stages
peak, shapes, tshapes)."""
import json
import os
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


class Results:
    """A stage's result rows: each printed as a JSON line when added, all saved under $OUT with
    the device and the torch version."""

    def __init__(self):
        self.rows = []

    def add(self, row):
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def save(self, name):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": self.rows},
                      f, indent=1)
