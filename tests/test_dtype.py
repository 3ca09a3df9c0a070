"""``--dtype auto``: bf16 on CUDA and on CPUs with native bf16 (AVX-512-BF16, AMX), fp32 otherwise.

The probe is mocked both ways (a cpuinfo file of each kind), and checked on
this machine against its own /proc/cpuinfo.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minisys.model import dtype as D

AVX2_ONLY = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize("cpuinfo, want", [(AVX2_ONLY, torch.float32), (AVX512_BF16, torch.bfloat16),
                                           (AMX, torch.bfloat16)], ids=["avx2", "avx512-bf16", "amx"])
def test_auto_follows_the_cpu_flags(tmp_path, monkeypatch, cpuinfo, want):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    flags = D.cpu_flags(path)
    assert "avx2" in flags
    monkeypatch.setattr(D, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": flags)
    assert D.auto_dtype("cpu") == want
    assert D.resolve_dtype("auto", "cpu") == want
    assert D.auto_dtype("cuda") == torch.bfloat16                 # CUDA: bf16 whatever the CPU
    assert D.resolve_dtype(None, "cpu") == torch.float32          # no dtype given: the device default


def test_without_cpuinfo_torch_is_asked(monkeypatch):
    monkeypatch.setattr(D, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert D.auto_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")
    assert D.auto_dtype("cpu") == torch.bfloat16
    assert D.cpu_flags(Path("/nonexistent/cpuinfo")) is None


def test_this_machines_probe_reads_its_own_flags():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in text.split() or "amx_bf16" in text.split()
    if text:
        assert D.cpu_has_native_bf16() == native
        assert D.auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_names_and_refusals():
    assert D.resolve_dtype("bf16", "cpu") == torch.bfloat16 and D.resolve_dtype("float16", "cpu") == torch.float16
    assert D.resolve_dtype(torch.float32, "cuda") == torch.float32
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        D.resolve_dtype("int8", "cpu")
    from minisys.llm import LLM
    with pytest.raises(ValueError, match="got 'fp8'"):
        LLM(dtype="fp8")
    from minisys.cli import build_parser
    args = build_parser().parse_args(["generate", "hi", "--dtype", "auto"])
    assert args.dtype == "auto"


def test_loader_resolves_auto_through_the_probe(tiny_dirs, monkeypatch):
    from minisys.model import load
    monkeypatch.setattr(D, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset({"avx2"}))
    model, _ = load(str(tiny_dirs["llama"]), device="cpu", dtype="auto", quiet=True)
    assert model.dtype == torch.float32
    monkeypatch.setattr(D, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset({"avx512_bf16"}))
    model, _ = load(str(tiny_dirs["llama"]), device="cpu", dtype="auto", quiet=True)
    assert model.dtype == torch.bfloat16
