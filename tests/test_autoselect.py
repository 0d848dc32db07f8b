"""auto's cuda / triton choice for CUDA tensors: the rule table derived from benchmark
records, its size classes, its use by backends.resolve, and `bench --derive-auto`."""
from __future__ import annotations

import json
import math

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import autoselect, backends
from contrastive_kernels.__main__ import main as cli
from contrastive_kernels.bench import FAMILY

CUDA = torch.device("cuda")


def _rec(op, dtype, n, d, impl, ms, status="ok", device="cuda"):
    return {"op": op, "dtype": dtype, "N": n, "M": n, "D": d, "impl": impl, "ms": ms, "status": status,
            "device": device, "device_name": "NVIDIA H100 80GB HBM3"}


def _pair(op, dtype, n, d, cuda_ms, triton_ms):
    return [_rec(op, dtype, n, d, "cuda", cuda_ms), _rec(op, dtype, n, d, "triton", triton_ms)]


def _records():
    recs = []
    # lse / bfloat16: cuda wins at N*D = 512*512 and 2048*512, triton at 8192*512 and 32768*512.
    for n, (c, t) in zip((512, 2048, 8192, 32768), ((1.0, 2.0), (3.0, 4.0), (9.0, 8.0), (50.0, 40.0))):
        recs += _pair("clip_loss", "bfloat16", n, 512, c, t)
    # Two lse ops vote at one size: clip 1.5x slower on cuda, nt_xent 2x faster: cuda wins overall.
    recs += _pair("clip_loss", "float32", 4096, 256, 3.0, 2.0)
    recs += _pair("nt_xent", "float32", 4096, 256, 1.0, 2.0)
    # pairwise / float16: triton everywhere.
    recs += _pair("siglip_loss", "float16", 1024, 256, 2.0, 1.0) + _pair("siglip_loss", "float16", 8192, 256, 9.0, 7.0)
    # Ignored: a failed run, a CPU record, a peer, and a size timed on one backend only.
    recs += [_rec("barlow_twins_loss", "bfloat16", 1024, 8192, "cuda", 1.0),
             _rec("barlow_twins_loss", "bfloat16", 1024, 8192, "triton", 0.5, status="oom"),
             _rec("vicreg_loss", "float32", 64, 64, "cuda", 1.0, device="cpu"),
             _rec("vicreg_loss", "float32", 64, 64, "triton", 2.0, device="cpu"),
             _rec("clip_loss", "bfloat16", 512, 512, "open_clip", 0.1),
             _rec("normalized_similarity", "float32", 100, 10, "cuda", 1.0)]
    return recs


def test_derive_size_classes_and_votes():
    rules = autoselect.derive(_records(), FAMILY)
    assert set(rules) == {"lse", "pairwise"}  # xcorr / similarity: never both backends timed ok on cuda
    bound = int(math.sqrt(2048 * 512 * 8192 * 512))  # geometric midpoint of the last cuda and first triton work
    assert rules["lse"]["bfloat16"] == [(bound, "cuda"), (None, "triton")]
    assert rules["lse"]["float32"] == [(None, "cuda")]
    assert rules["pairwise"]["float16"] == [(None, "triton")]


def test_cuda_order_lookup(monkeypatch):
    rules = autoselect.derive(_records(), FAMILY)
    monkeypatch.setattr(autoselect, "RULES", rules)
    bound = rules["lse"]["bfloat16"][0][0]
    assert autoselect.cuda_order("lse", torch.bfloat16, bound) == ("cuda", "triton")  # bounds are inclusive
    assert autoselect.cuda_order("lse", torch.bfloat16, bound + 1) == ("triton", "cuda")
    assert autoselect.cuda_order("lse", "bfloat16", 1) == ("cuda", "triton")
    assert autoselect.cuda_order("pairwise", torch.float16, 10**12) == ("triton", "cuda")
    assert autoselect.cuda_order("pairwise", torch.float32, 10) is None  # dtype not measured
    assert autoselect.cuda_order("xcorr", torch.bfloat16, 10) is None  # family not measured
    assert autoselect.cuda_order("lse", torch.bfloat16, None) is None  # no size given


def test_resolve_uses_the_rule_for_cuda_tensors(monkeypatch):
    """With both backends available (simulated: this machine has no GPU), auto takes the
    first of the rule's order for the call's size class, and the static order without a rule."""
    monkeypatch.setattr(autoselect, "RULES", autoselect.derive(_records(), FAMILY))
    monkeypatch.setattr(backends, "unavailable_reason", lambda b, family, device=None: None)
    small, large = 512 * 512, 32768 * 512
    assert backends.resolve("auto", "lse", CUDA, torch.bfloat16, small) == "cuda"
    assert backends.resolve("auto", "lse", CUDA, torch.bfloat16, large) == "triton"
    assert backends.resolve("auto", "pairwise", CUDA, torch.float16, small) == "triton"
    for family in ("xcorr", "similarity"):
        assert backends.resolve("auto", family, CUDA, torch.bfloat16, small) == backends.AUTO_CUDA_ORDER[family][0]
    assert backends.resolve("auto", "lse", torch.device("cpu"), torch.bfloat16, large) == "cpu"
    assert backends.resolve("triton", "lse", CUDA, torch.bfloat16, small) == "triton"  # explicit names win


def test_resolve_skips_an_unavailable_first_choice(monkeypatch):
    monkeypatch.setattr(autoselect, "RULES", {"lse": {"bfloat16": [(None, "triton")]}})
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda b, family, device=None: "simulated: no triton" if b == "triton" else None)
    assert backends.resolve("auto", "lse", CUDA, torch.bfloat16, 100) == "cuda"


def test_losses_pass_rows_times_features(monkeypatch):
    seen = []
    real = backends.resolve

    def spy(backend, family, device, dtype, work=None):
        seen.append((family, work))
        return real(backend, family, device, dtype, work)

    monkeypatch.setattr(backends, "resolve", spy)
    ck.clip_loss(torch.randn(6, 5), torch.randn(6, 5), 10.0, backend="reference")
    ck.siglip_loss(torch.randn(7, 3), torch.randn(7, 3), 10.0, -10.0, backend="reference")
    assert ("lse", 30) in seen and ("pairwise", 21) in seen


@pytest.mark.parametrize("bad, match", [
    ({"lse": {"float32": []}}, "empty"),
    ({"lse": {"float32": [(10, "cuda")]}}, "open-ended"),
    ({"lse": {"float32": [(None, "cuda"), (None, "triton")]}}, "open-ended"),
    ({"lse": {"float32": [(10, "cuda"), (5, "triton"), (None, "cuda")]}}, "increase"),
    ({"lse": {"float32": [(None, "cpu")]}}, "backend must be one of"),
    ([("lse", "cuda")], "must be a dict"),
])
def test_invalid_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        autoselect._valid_rules(bad)


def test_committed_table_is_valid():
    assert autoselect._valid_rules(autoselect._auto_cuda_rules.RULES) is autoselect._auto_cuda_rules.RULES


def test_bench_derive_auto_writes_the_module(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_records()))
    out = tmp_path / "rules.py"
    assert cli(["bench", "--derive-auto", str(results), "--auto-out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ns: dict = {}
    exec(out.read_text(), ns)
    assert ns["RULES"] == autoselect.derive(_records(), FAMILY)
    assert "NVIDIA H100" in ns["SOURCE"] and str(results) in ns["SOURCE"]


def test_bench_derive_auto_without_pairs_is_an_error(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([_rec("clip_loss", "float32", 64, 64, "cpu", 1.0, device="cpu")]))
    with pytest.raises(SystemExit, match="both the cuda and the triton"):
        cli(["bench", "--derive-auto", str(results), "--auto-out", str(tmp_path / "r.py")])
