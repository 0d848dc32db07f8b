"""python -m contrastive_kernels info / check."""
import argparse
import json
import subprocess
import sys

import torch

from contrastive_kernels import check


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "contrastive_kernels", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_text_and_json():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "extension _C" in out.stdout and "lse@cpu" in out.stdout
    js = _run("info", "--json")
    assert js.returncode == 0, js.stderr
    info = json.loads(js.stdout)
    for key in ("contrastive_kernels", "torch", "triton", "extension", "backends", "available_backends"):
        assert key in info
    assert info["extension"]["built"] is True, f"the compiled extension is not loaded: {info['extension']}"
    assert "reference" in info["available_backends"]


def test_check_passes_on_this_machine():
    out = _run("check", "--sizes", "1,7", "--dim", "5", "--dtypes", "float32,float16")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout


def test_check_bad_arguments_are_usage_errors():
    """A bad option value: argparse's usage line and exit 2, no traceback."""
    for argv, message in ((("--dtypes", "float64"), "--dtypes: each of float32, float16, bfloat16; got 'float64'"),
                          (("--sizes", "0,7"), "--sizes: batch sizes must be positive"),
                          (("--backends", "gpu"), "--backends: each of cuda, triton, cpu; got 'gpu'"),
                          (("--device", "tpu"), "invalid choice: 'tpu'")):
        out = _run("check", *argv)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    for argv, message in ((("--dtype", "float64"), "dtype must be one of float32, float16, bfloat16"),
                          (("--sizes", "0"), "--sizes values must be positive")):
        out = _run("bench", "--list", *argv)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_check_fails_when_it_checks_nothing(capsys):
    """A backend asked for that cannot run here, or a filter that leaves no case: exit 1, said."""
    rc = check.run(_args(op="no_such_op"))
    assert rc == 1 and "no case name starts with 'no_such_op'" in capsys.readouterr().out
    if not torch.cuda.is_available():
        rc = check.run(_args(backends="cuda", op="nt_xent", sizes="7", dtypes="float32"))
        out = capsys.readouterr().out
        assert rc == 1 and "FAIL" in out and "cannot run on cpu here" in out, out
        rc = check.run(_args(device="cuda", op="nt_xent", sizes="7", dtypes="float32"))
        assert rc == 1 and "CUDA is not available here" in capsys.readouterr().out


def _args(**kw):
    p = argparse.ArgumentParser()
    check.add_arguments(p)
    return p.parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_check_detects_a_wrong_kernel(monkeypatch, capsys):
    """A backend whose loss is off by 1e-3 relative must fail the float32 check (exit 1)."""
    good = check.CASES[[c.name for c in check.CASES].index("nt_xent")]

    def make(gen, n, d, dtype, device):
        tensors, call = good.make(gen, n, d, dtype, device)

        def wrong(be, **t):
            out = call(be, **t)
            return out * (1 + 1e-3) if be != "reference" else out
        return tensors, wrong

    monkeypatch.setattr(check, "CASES", [check.Case("nt_xent_broken", "lse", make)])
    rc = check.run(_args(backends="_family_reference", sizes="7", dtypes="float32"))
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and "1 failed" in out


def test_check_passes_the_compositions(capsys):
    """Every fused composition in functional.py, over the materializing family references."""
    rc = check.run(_args(backends="_family_reference", sizes="1,7", dtypes="float32"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(check.CASES)} passed" in out


def test_check_error_measure_on_zero_reference():
    z = torch.zeros(3, dtype=torch.float64)
    assert abs(check._rel(z + 1e-9, z) - 3 ** 0.5 * 1e-9) < 1e-18
    assert abs(check._rel(torch.tensor([1.0 + 1e-6], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)) - 1e-6) < 1e-12
