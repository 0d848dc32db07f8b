"""The benchmark harness itself (``python -m contrastive_kernels bench``): argument
parsing, the records it writes, how it reports peers that are missing, impls that
fail or run out of memory, and that its peer adapters compute the same losses."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from contrastive_kernels import _peers, bench
from contrastive_kernels.__main__ import main

FIELDS = ("op", "impl", "kind", "device", "dtype", "N", "M", "D", "ms", "peak_bytes", "flops", "gflops",
          "frac_peak", "status")


def _args(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def _load(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _clear_peer_caches():
    for fn in (_peers._lightly_loss, _peers._open_clip_loss, _peers._pml_losses, _peers._inf_cl):
        fn.cache_clear()


# ------------------------------------------------------------------ arguments
def test_quick_parses_and_covers_every_op_at_small_sizes():
    args = _args("--quick")
    assert args.quick
    cases = bench.build_cases(args, "cpu")
    assert {c["op"] for c in cases} == set(bench.OPS)
    for c in cases:
        assert c["N"] * c["M"] * c["D"] <= 2 ** 26, c  # small: the quick suite runs in minutes on 2 cores
        assert c["dtype"] == "float32"


def test_default_cpu_suite_has_the_issue_shapes():
    cases = bench.build_cases(_args(), "cpu")
    shapes = {(c["op"], c["N"], c["D"]) for c in cases}
    for want in [("nt_xent", 8192, 128), ("clip_loss", 8192, 256), ("siglip_loss", 4096, 256),
                 ("barlow_twins_loss", 256, 8192), ("vicreg_loss", 256, 8192)]:
        assert want in shapes
    assert len({c["N"] for c in cases if c["op"] == "nt_xent"}) >= 4  # a batch-size sweep for the plot


def test_default_gpu_suite_has_the_issue_shapes():
    cases = bench.build_cases(_args(), "cuda")
    shapes = {(c["op"], c["N"], c["D"], c["dtype"]) for c in cases}
    assert ("clip_loss", 32768, 512, "bfloat16") in shapes
    assert ("siglip_loss", 32768, 768, "bfloat16") in shapes
    for n in (256, 1024, 4096):
        assert ("barlow_twins_loss", n, 8192, "bfloat16") in shapes
        assert ("barlow_twins_loss", n, 8192, "float32") in shapes


def test_op_sizes_dtype_selection():
    args = _args("--op", "clip_loss,nt_xent", "--op", "info_nce", "--sizes", "32,64x16,8x24x4", "--dtype", "bf16")
    cases = bench.build_cases(args, "cpu")
    assert {c["op"] for c in cases} == {"clip_loss", "nt_xent", "info_nce"}
    assert {c["dtype"] for c in cases} == {"bfloat16"}
    info = sorted((c["N"], c["M"], c["D"]) for c in cases if c["op"] == "info_nce")
    assert (8, 24, 4) in info and (64, 64, 16) in info
    nt = sorted((c["N"], c["M"]) for c in cases if c["op"] == "nt_xent")
    assert (32, 64) in nt  # M = 2N rows of Z = [z1; z2]
    with pytest.raises(SystemExit):
        bench.build_cases(_args("--op", "no_such_op"), "cpu")
    with pytest.raises(argparse.ArgumentTypeError):
        bench._parse_sizes("12x")


def test_nominal_flops():
    assert bench.nominal_flops("nt_xent", 8192, 16384, 128) == 6 * 16384 ** 2 * 128
    assert bench.nominal_flops("clip_loss", 8192, 8192, 256) == 6 * 8192 * 8192 * 256
    assert bench.nominal_flops("info_nce_moco", 256, 65536, 128) == 4 * 256 * 65536 * 128
    # Barlow Twins: N < D counts the Gram path, N > D the D x D path
    assert bench.nominal_flops("barlow_twins_loss", 256, 256, 8192) == 8 * 256 ** 2 * 8192
    assert bench.nominal_flops("barlow_twins_loss", 8192, 8192, 256) == 6 * 8192 * 256 ** 2
    assert bench.nominal_flops("vicreg_loss", 256, 256, 8192) == 8 * 256 ** 2 * 8192


# ------------------------------------------------------------------ runs
def test_tiny_run_every_op_in_process(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = main(["bench", "--quick", "--sizes", "12x8", "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--mm-size", "256", "--isolate", "none", "--peers", "all", "--out", out])
    assert rc == 0
    recs = _load(out)
    assert {r["op"] for r in recs} == set(bench.OPS)
    for r in recs:
        for f in FIELDS:
            assert f in r, (f, r)
        assert r["N"] == 12 and r["D"] == 8
        if r["impl"] == "reference":
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["flops"] > 0 and r["gflops"] > 0 and r["frac_peak"] > 0
            assert isinstance(r["peak_bytes"], int)
        elif r["status"].startswith("skipped"):
            assert r["ms"] is None and r["gflops"] is None and r["peak_bytes"] is None
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["command"].startswith("python -m contrastive_kernels bench")
    assert "--quick" in meta["command"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["machine"]["cpu_count"] >= 1
    assert meta["matmul_gflops"]["cpu/float32"] > 0
    md = open(os.path.join(out, "results.md")).read()
    assert "| op | dtype |" in md and "clip_loss" in md
    with open(os.path.join(out, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "impl" in printed and "nt_xent" in printed


def _replica_agreement_cases():
    cases = []
    for op, peers in _peers.OP_PEERS.items():
        for impl in peers:
            if impl == "inf-cl":
                continue
            marks = []
            cases.append(pytest.param(op, impl, marks=marks, id=f"{op}-{impl}"))
    return cases


@pytest.mark.parametrize("op,impl", _replica_agreement_cases())
def test_peer_adapters_compute_the_reference_loss(op, impl):
    """Each adapter (library or replica) gets the same inputs and hyper-parameters as
    the reference; their losses agree, so the timings compare the same computation."""
    why = _peers.unavailable_reason(impl, "cpu")
    if why:
        # only the library adapters can be unavailable; their replicas are tested instead
        assert _peers.PEERS[impl][0] == "library", why
        return
    n, m, d = (9, 33, 24) if op == "info_nce_moco" else (9, 9, 24)
    m = bench.derive_m(op, n, m)
    inputs = bench.make_inputs(op, n, m, d, torch.float32, "cpu", seed=3)
    ref = bench.ck_callable(op, "reference")(*inputs)
    got = _peers.build(impl, op, bench.PARAMS[op], "cpu")(*inputs)
    assert torch.isfinite(ref)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()), (got.item(), ref.item())


def test_open_clip_library_equals_its_replica():
    why = _peers.unavailable_reason("open_clip", "cpu")
    assert not why, f"open_clip is needed by the tests (pip install --no-deps open-clip-torch): {why}"
    for op in ("clip_loss", "siglip_loss"):
        inputs = bench.make_inputs(op, 10, 10, 16, torch.float32, "cpu", seed=5)
        lib = _peers.build("open_clip", op, bench.PARAMS[op], "cpu")(*inputs)
        rep = _peers.build("open_clip-formula", op, bench.PARAMS[op], "cpu")(*inputs)
        assert torch.equal(lib, rep)


def test_missing_peer_is_skipped_not_zero(tmp_path, monkeypatch):
    real = _peers._installed
    monkeypatch.setattr(_peers, "_installed", lambda mod: False if mod == "open_clip" else real(mod))
    _clear_peer_caches()
    try:
        out = str(tmp_path / "run")
        assert main(["bench", "--op", "clip_loss", "--sizes", "8x4", "--repeats", "1", "--threads", "1",
                     "--mm-size", "256", "--isolate", "none", "--out", out, "--no-plot"]) == 0
    finally:
        _clear_peer_caches()
    recs = {r["impl"]: r for r in _load(out)}
    oc = recs["open_clip"]
    assert oc["status"] == "skipped (not installed)"
    assert oc["ms"] is None and oc["gflops"] is None and oc["peak_bytes"] is None
    # with the library missing, its replica runs by default, labelled as a replica
    assert recs["open_clip-formula"]["status"] == "ok"
    assert recs["open_clip-formula"]["kind"] == "replica"
    md = open(os.path.join(out, "results.md")).read()
    assert "skipped (not installed)" in md and "open_clip-formula (replica)" in md


def test_impl_that_raises_is_recorded_as_error(tmp_path, monkeypatch):
    real = bench.ck_callable

    def broken(op, backend, path=None):
        if backend == "reference":
            def boom(*a):
                raise RuntimeError("boom from the test")
            return boom
        return real(op, backend, path)

    monkeypatch.setattr(bench, "ck_callable", broken)
    out = str(tmp_path / "run")
    assert main(["bench", "--op", "siglip_loss", "--sizes", "8x4", "--repeats", "1", "--isolate", "none",
                 "--mm-size", "256", "--peers", "none", "--out", out, "--no-plot"]) == 0
    recs = {r["impl"]: r for r in _load(out)}
    rec = recs["reference"]
    assert rec["status"] == "error: RuntimeError: boom from the test"
    assert all(r["status"] == "ok" for k, r in recs.items() if k != "reference")  # the others still ran
    assert rec["ms"] is None and rec["gflops"] is None


def test_isolated_workers_errors_and_out_of_memory(tmp_path):
    """The default CPU path: one fresh worker per measurement.  A failing case and a
    case over the memory cap become records; the probe sees an N x M matrix."""
    out = str(tmp_path / "run")
    assert main(["bench", "--op", "uniformity_loss,nt_xent", "--sizes", "1x8,2048x8,16384x4", "--repeats", "1",
                 "--threads", "1", "--mm-size", "256", "--backends", "reference", "--peers", "none",
                 "--mem-limit", "2", "--out", out, "--no-plot"]) == 0
    recs = {(r["op"], r["N"]): r for r in _load(out)}
    # uniformity with one row is invalid input: the worker's exception is recorded
    assert recs[("uniformity_loss", 1)]["status"].startswith("error: ValueError")
    # the reference builds the 4096 x 4096 float32 logits (64 MiB): the probe must see them
    r = recs[("nt_xent", 2048)]
    assert r["status"] == "ok", r
    assert r["peak_bytes"] >= 4096 * 4096 * 4, r["peak_bytes"]
    assert "VmHWM" in r["mem_method"] or "ru_maxrss" in r["mem_method"]
    # 32768 x 32768 float32 logits are 4 GiB, over the 2 GiB cap
    assert recs[("nt_xent", 16384)]["status"] == "oom"


def test_list_prints_plan(capsys):
    assert main(["bench", "--quick", "--op", "barlow_twins_loss", "--paths", "gram,tiled", "--list"]) == 0
    text = capsys.readouterr().out
    assert "barlow_twins_loss" in text and "reference" in text


def test_unknown_peer_or_backend_is_rejected():
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--peers", "no-such-peer", "--list"])
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--backends", "gpu", "--list"])


def test_headline_ratios():
    recs = [
        {"op": "clip_loss", "device": "cpu", "dtype": "float32", "N": 8, "M": 8, "D": 4, "impl": "cpu",
         "status": "ok", "ms": 2.0, "peak_bytes": 100},
        {"op": "clip_loss", "device": "cpu", "dtype": "float32", "N": 8, "M": 8, "D": 4, "impl": "open_clip",
         "status": "ok", "ms": 5.0, "peak_bytes": 800},
        {"op": "clip_loss", "device": "cpu", "dtype": "float32", "N": 8, "M": 8, "D": 4, "impl": "inf-cl",
         "status": "skipped (needs CUDA)", "ms": None, "peak_bytes": None},
    ]
    rows = {h["vs"]: h for h in bench.headline(recs)}
    assert rows["open_clip"]["speedup"] == pytest.approx(2.5)
    assert rows["open_clip"]["memory_ratio"] == pytest.approx(8.0)
    assert "speedup" not in rows["inf-cl"] and rows["inf-cl"]["status"] == "skipped (needs CUDA)"


def test_issue_targets_judged_from_records():
    mib = 1 << 20
    clip = {"op": "clip_loss", "device": "cuda", "dtype": "bfloat16", "N": 32768, "M": 32768, "D": 512}
    bt = {"op": "barlow_twins_loss", "device": "cuda", "dtype": "bfloat16", "N": 1024, "M": 1024, "D": 8192}
    recs = [
        {**clip, "impl": "cuda", "status": "ok", "ms": 20.0, "frac_peak": 0.30, "peak_bytes": 100 * mib,
         "grad_bytes": 64 * mib},
        {**clip, "impl": "triton", "status": "ok", "ms": 10.0, "frac_peak": 0.60, "peak_bytes": 200 * mib,
         "grad_bytes": 64 * mib},
        {**clip, "impl": "open_clip", "status": "skipped (not installed)", "ms": None},
        {**clip, "impl": "open_clip-formula", "status": "ok", "ms": 15.0},
        {**clip, "impl": "inf-cl", "status": "skipped (not installed)", "ms": None},
        {**bt, "impl": "cuda", "status": "ok", "ms": 1.0, "frac_peak": 0.1},
        {**bt, "impl": "fb-barlowtwins-formula", "status": "ok", "ms": 12.0},
        {**bt, "dtype": "float32", "impl": "fb-barlowtwins-formula", "status": "ok", "ms": 1.0},
    ]
    rows = {t["id"]: t for t in bench.targets(recs)}
    peak, infcl, oc, mem, bt_row = (rows[k] for k in ("clip_peak", "clip_inf_cl", "clip_open_clip", "clip_memory",
                                                      "barlow_fb"))
    # the fastest fused backend (triton, 10 ms) is the one judged
    assert peak["fused"] == "triton" and peak["value"] == pytest.approx(0.60) and peak["verdict"] == "met"
    assert infcl["value"] is None and infcl["verdict"] == "not measured (inf-cl: skipped (not installed))"
    # open_clip itself did not run: its replica stands in, named
    assert oc["vs"] == "open_clip-formula" and oc["value"] == pytest.approx(1.5) and oc["verdict"] == "missed"
    # 200 MiB of growth over the inputs, 64 MiB of it gradients: 136 MiB beyond, above 64
    assert mem["value"] == 136 * mib and mem["verdict"] == "missed"
    assert bt_row["value"] == pytest.approx(12.0) and bt_row["verdict"] == "met"
    table = "\n".join(bench.target_lines(bench.targets(recs)))
    assert "60.0%" in table and "+136.0 MiB beyond" in table and "12.00x vs fb-barlowtwins-formula" in table
    assert bench.target_report(recs) == bench.target_lines(bench.targets(recs))
    # no GPU case at all: every target says so, and the report leaves the section out
    cpu = [{**r, "device": "cpu"} for r in recs]
    assert all(t["verdict"].startswith("not measured (no fused") for t in bench.targets(cpu))
    assert bench.target_report(cpu) == []
