"""The Triton paged-decode kernel and its plain-torch twin against the reference attention.

The kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``), which must be
set before triton compiles anything: those cases run in a fresh subprocess
(`run_interpreted` below), so no earlier import of triton in this session can
make them run compiled (or fail for want of a GPU). Shapes come from
hypothesis plus explicit examples: partial last blocks, several sequences of
different lengths, GQA ratios 1 and 3, block sizes 16 and 32. The pool is
filled with large garbage first, so a read of an unwritten slot shows.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minisys.attention import AttentionMetadata, ReferenceAttention, get_backend
from minisys.attention.paged import decode_static

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")     # tests/conftest.py
TRITON_WHEELS = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")   # requirements.txt's marker


def make_case(seed: int, lens: list[int], num_kv_heads: int, group: int, head_dim: int, block_size: int,
              dtype=torch.float32):
    """(q, k_pool, v_pool, block_tables, seq_lens, expected): random K/V written into shuffled blocks of a
    garbage pool; ``expected`` is `ReferenceAttention` on the same K/V packed (the oracle)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq = len(lens), num_kv_heads * group
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    k_pool = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) * 100).to(dtype)
    v_pool = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) * 100).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 1                                      # one more column than any sequence uses
    tables = torch.tensor([order[-1]] * (B * width)).view(B, width)   # padding: a valid garbage block
    ks, vs, q = [], [], torch.randn(B, Hq, head_dim, generator=g).to(dtype)
    for b, n in enumerate(lens):
        blocks = [order.pop(0) for _ in range(need[b])]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)])
        k_pool.view(-1, num_kv_heads, head_dim)[slots] = k
        v_pool.view(-1, num_kv_heads, head_dim)[slots] = v
        ks.append(k)
        vs.append(v)
    meta = AttentionMetadata(seqlens_q=[1] * B, context_lens=[n - 1 for n in lens])
    expected = ReferenceAttention().forward_packed(q, torch.cat(ks), torch.cat(vs), meta)
    return q, k_pool, v_pool, tables, torch.tensor(lens), expected


SHAPES = dict(lens=st.lists(st.integers(1, 70), min_size=1, max_size=4), num_kv_heads=st.integers(1, 3),
              group=st.sampled_from([1, 3]), head_dim=st.sampled_from([16, 64]), block_size=st.sampled_from([16, 32]))
EXAMPLES = [  # (lens, num_kv_heads, group, head_dim, block_size): SmolLM2's heads, partial and full last blocks
    ([5, 33, 16, 64], 3, 3, 64, 16), ([1, 31, 32, 70], 3, 1, 64, 32), ([17], 1, 3, 16, 16), ([48, 2], 2, 3, 16, 32)]


def with_examples(f):
    for case in EXAMPLES:
        f = example(**dict(zip(("lens", "num_kv_heads", "group", "head_dim", "block_size"), case)))(f)
    return f


def run_interpreted(max_examples: int) -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernel equals the reference on every shape."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from minisys.attention.triton_decode import paged_decode_attention

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)
    @given(**SHAPES)
    @with_examples
    def kernel_matches_reference(lens, num_kv_heads, group, head_dim, block_size):
        q, kp, vp, bt, seq_lens, expected = make_case(len(lens) * 7 + sum(lens), lens, num_kv_heads, group,
                                                      head_dim, block_size)
        got = paged_decode_attention(q, kp, vp, bt, seq_lens)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    kernel_matches_reference()
    q, kp, vp, bt, seq_lens, expected = make_case(1, [9, 40], 3, 3, 64, 16, dtype=torch.bfloat16)
    got = paged_decode_attention(q, kp, vp, bt, seq_lens)        # bf16 in, fp32 inside, bf16 out
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    print("interpreted kernel OK")


@pytest.mark.skipif(not TRITON_WHEELS, reason="triton installs only on Linux x86_64 (requirements.txt)")
def test_triton_kernel_equals_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import tests.test_triton_decode as t; t.run_interpreted(6)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interpreted kernel OK" in proc.stdout


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(**SHAPES)
@with_examples
def test_decode_static_equals_reference(lens, num_kv_heads, group, head_dim, block_size):
    """The plain-torch twin (the CPU stand-in inside a CUDA-graph step) reads all W blocks and masks."""
    q, kp, vp, bt, seq_lens, expected = make_case(sum(lens), lens, num_kv_heads, group, head_dim, block_size)
    torch.testing.assert_close(decode_static(q, kp, vp, bt, seq_lens), expected, atol=2e-5, rtol=1e-4)


def test_auto_reads_device_lengths_on_cpu_without_triton():
    """A decode step with ``seq_lens_tensor`` goes to the static path on CPU; its lists are not read."""
    lens = [3, 20, 47]
    q, kp, vp, bt, seq_lens, expected = make_case(5, lens, 3, 3, 64, 16)
    meta = AttentionMetadata(seqlens_q=[1] * 3, context_lens=[0] * 3, block_tables=bt, seq_lens_tensor=seq_lens)
    torch.testing.assert_close(get_backend("auto").forward_paged(q, kp, vp, meta), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="decode steps only"):
        AttentionMetadata(seqlens_q=[2], context_lens=[0], seq_lens_tensor=torch.tensor([2]))


@pytest.mark.skipif(not TRITON_WHEELS, reason="triton installs only on Linux x86_64 (requirements.txt)")
def test_triton_is_a_named_backend_and_refuses_odd_shapes():
    backend = get_backend("triton")
    assert backend.name == "triton"
    from minisys.attention.triton_decode import paged_decode_attention
    q = torch.zeros(1, 3, 48)
    pool = torch.zeros(2, 16, 3, 48)
    with pytest.raises(ValueError, match="power-of-two"):
        paged_decode_attention(q, pool, pool, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))


def test_auto_uses_the_kernel_only_for_shapes_it_takes():
    from minisys.attention.auto import kernel_fits
    assert kernel_fits(64, 16) and kernel_fits(128, 32)
    assert not kernel_fits(80, 16) and not kernel_fits(64, 24)      # auto falls back to the paged path there


def test_the_triton_backend_is_refused_at_load_on_cpu(tiny_dirs, monkeypatch):
    """--attention triton on a CPU (no interpreter) is a clear error when the model loads, not a model that
    loads and then fails every decode step (it did: 'RuntimeError: 0 active drivers')."""
    from minisys.model import load
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton.*CUDA"):
        load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="triton", quiet=True)
