"""contrastive_kernels.compat.lightly against the real lightly loss code (not a pytest file).

lightly's package imports torchvision, which CI and the GPU machines lack, so the tests compare
the compat modules with replicas of lightly's source (tests/peers.py, tests/_dist_worker.py).
This script checks those against lightly itself, from its wheel, without torchvision: it copies
the wheel's `lightly` package, keeps only the loss modules' imports in the package __init__ files
and stubs the two torchvision.ops names that lightly.models.utils imports (unused by the losses).

    python tests/crosscheck_lightly.py                   # the installed lightly (pip install --no-deps lightly)
    python tests/crosscheck_lightly.py /tmp/lw/lightly-1.6.0-py3-none-any.whl     # or a wheel

(tests/test_compat.py runs it against the lightly of the README's install command, pinned.)

Single process (float32 and float64; the memory bank over four steps, float32, lightly's bank
dtype) and torch.distributed on gloo with 2 and 3 processes (`gather_distributed=True`): each
rank's loss and gradients, relative error <= 1e-5 (SPEC's float32 tolerance).  Exit status 1 on
a failure.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile

import torch

TOL = 1e-5


def lightly_source(arg: str | None) -> str:
    """The `lightly` package directory: from the wheel given, or the installed one (found
    without importing it: its __init__ needs torchvision)."""
    if arg is None:
        import importlib.util
        spec = importlib.util.find_spec("lightly")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("crosscheck_lightly: lightly is not installed (pip install --no-deps lightly) and no "
                             "wheel was given")
        return list(spec.submodule_search_locations)[0]
    unpacked = tempfile.mkdtemp(prefix="lightly_wheel_")
    with zipfile.ZipFile(arg) as z:
        z.extractall(unpacked)
    return os.path.join(unpacked, "lightly")


def stub_tree(source: str) -> str:
    root = tempfile.mkdtemp(prefix="lightly_stub_")
    shutil.copytree(source, os.path.join(root, "lightly"), ignore=shutil.ignore_patterns("__pycache__"))
    open(os.path.join(root, "lightly", "__init__.py"), "w").close()
    open(os.path.join(root, "lightly", "models", "__init__.py"), "w").close()
    with open(os.path.join(root, "lightly", "models", "modules", "__init__.py"), "w") as f:
        f.write("from lightly.models.modules.memory_bank import MemoryBankModule\n")
    with open(os.path.join(root, "lightly", "loss", "__init__.py"), "w") as f:
        f.write("from lightly.loss.barlow_twins_loss import BarlowTwinsLoss\n"
                "from lightly.loss.dcl_loss import DCLLoss, DCLWLoss\n"
                "from lightly.loss.ntx_ent_loss import NTXentLoss\n"
                "from lightly.loss.vicreg_loss import VICRegLoss\n")
    os.makedirs(os.path.join(root, "torchvision"))
    open(os.path.join(root, "torchvision", "__init__.py"), "w").close()
    with open(os.path.join(root, "torchvision", "ops.py"), "w") as f:
        f.write("class StochasticDepth:  # (stub: lightly.models.utils imports it; no loss uses it)\n    pass\n\n\n"
                "def roi_align(*args, **kwargs):\n    raise NotImplementedError('torchvision stub')\n")
    return root


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def views(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = 0.6 * a + 0.8 * torch.randn(*shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def compare(make_ours, make_theirs, shape, steps, seed, dtype) -> float:
    """Worst relative error of (loss, d out0, d out1) over `steps` calls of one module pair
    (the banks' random initializations drawn from the same seed on both sides)."""
    torch.manual_seed(seed)
    ours = make_ours()
    torch.manual_seed(seed)
    theirs = make_theirs()
    worst = 0.0
    for t in range(steps):
        a, b = views(shape, 1000 * seed + t, dtype)
        ao, bo, at, bt = (x.clone().requires_grad_() for x in (a, b, a, b))
        torch.manual_seed(100 + t)
        lo = ours(ao, bo)
        torch.manual_seed(100 + t)
        lt = theirs(at, bt)
        lo.backward()
        lt.backward()
        worst = max(worst, rel(lo, lt), rel(ao.grad, at.grad), rel(bo.grad, bt.grad))
    return worst


def single_cases(CK, LL):
    return [("NTXentLoss", lambda: CK.NTXentLoss(0.3), lambda: LL.NTXentLoss(0.3), (17, 9), 1, True),
            ("NTXentLoss memory_bank_size=(32, 9)", lambda: CK.NTXentLoss(0.3, memory_bank_size=(32, 9)),
             lambda: LL.NTXentLoss(0.3, memory_bank_size=(32, 9)), (10, 9), 4, False),
            ("DCLLoss", lambda: CK.DCLLoss(0.2), lambda: LL.DCLLoss(0.2), (13, 7), 1, True),
            ("DCLWLoss", lambda: CK.DCLWLoss(0.2, sigma=0.7), lambda: LL.DCLWLoss(0.2, sigma=0.7), (13, 7), 1, True),
            ("BarlowTwinsLoss", lambda: CK.BarlowTwinsLoss(0.02), lambda: LL.BarlowTwinsLoss(0.02), (11, 6), 1,
             True),
            ("VICRegLoss", lambda: CK.VICRegLoss(), lambda: LL.VICRegLoss(), (11, 6), 1, True),
            ("VICRegLoss eps=0, (7, 3, 5)", lambda: CK.VICRegLoss(eps=0.0), lambda: LL.VICRegLoss(eps=0.0),
             (7, 3, 5), 1, True)]


def dist_cases(CK, LL):
    return [("BarlowTwinsLoss", lambda: CK.BarlowTwinsLoss(0.02, gather_distributed=True),
             lambda: LL.BarlowTwinsLoss(0.02, gather_distributed=True)),
            ("VICRegLoss", lambda: CK.VICRegLoss(gather_distributed=True),
             lambda: LL.VICRegLoss(gather_distributed=True)),
            ("NTXentLoss", lambda: CK.NTXentLoss(0.3, gather_distributed=True),
             lambda: LL.NTXentLoss(0.3, gather_distributed=True)),
            ("DCLLoss", lambda: CK.DCLLoss(0.2, gather_distributed=True),
             lambda: LL.DCLLoss(0.2, gather_distributed=True)),
            ("DCLWLoss", lambda: CK.DCLWLoss(0.2, 0.7, gather_distributed=True),
             lambda: LL.DCLWLoss(0.2, 0.7, gather_distributed=True))]


def dist_worker(rank, world, init_file, root, queue):
    import torch.distributed as dist
    sys.path.insert(0, root)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import lightly.loss as LL
    from contrastive_kernels.compat import lightly as CK
    out = {name: compare(mo, mt, (9, 6), 1, 10 * rank + 1, torch.float32) for name, mo, mt in dist_cases(CK, LL)}
    queue.put((rank, out))
    dist.destroy_process_group()


def main() -> int:
    import warnings
    import torch.multiprocessing as mp
    warnings.simplefilter("ignore")
    root = stub_tree(lightly_source(sys.argv[1] if len(sys.argv) > 1 else None))
    sys.path.insert(0, root)
    import lightly.loss as LL
    from contrastive_kernels.compat import lightly as CK
    failed = 0
    for name, mo, mt, shape, steps, f64 in single_cases(CK, LL):
        for dtype in (torch.float32, torch.float64) if f64 else (torch.float32,):
            worst = max(compare(mo, mt, shape, steps, seed, dtype) for seed in range(3))
            ok = worst <= TOL
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:36s} {str(dtype)[6:]:8s} 1 process: worst {worst:.1e}")
    ctx = mp.get_context("spawn")
    for world in (2, 3):
        queue = ctx.Queue()
        init_file = tempfile.mktemp(prefix="ck_xcheck_")
        procs = [ctx.Process(target=dist_worker, args=(r, world, init_file, root, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join()
        for name, *_ in dist_cases(CK, LL):
            worst = max(results[r][name] for r in range(world))
            ok = worst <= TOL
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:36s} float32  gloo, {world} ranks: worst {worst:.1e} "
                  "(every rank's loss and gradients)")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
