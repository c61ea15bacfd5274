"""The CPU ops' activation pool (csrc/cpu/act_pool.cpp): large outputs are reused after they are
freed, their old values never show, small ones bypass it, the cap and FASTRES_CPU_POOL_MB hold,
and the memory comes back on request."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastres import reference
from fastres.backends import extension

_mod, _why = extension.load()
if _mod is None:
    raise ImportError(_why)

ops = torch.ops.fastres
pool = torch.ops.fastres_cpu

# 2 x 64 x 256 x 256 float32 = 32 MiB: above the pool's 256 KiB floor.
BIG = (2, 64, 256, 256)


def _stats() -> dict:
    cached, hits, misses, cap = pool.act_pool_stats()
    return {"cached": cached, "hits": hits, "misses": misses, "cap": cap}


def _args(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    scale = torch.rand(c, generator=g) + 0.5
    shift = torch.randn(c, generator=g)
    return (x, scale, shift, None, None, None, 0, True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.fixture(autouse=True)
def _fresh_pool():
    if _stats()["cap"] == 0:
        pytest.skip("FASTRES_CPU_POOL_MB=0 in this environment: the pool is off")
    pool.act_pool_empty_cache()
    yield
    pool.act_pool_empty_cache()


def test_a_freed_output_is_reused_and_its_values_never_show():
    args = _args(BIG)
    first = ops.bn_add_relu(*args)
    torch.testing.assert_close(first, reference.bn_add_relu(*args))
    want = first.clone()
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # what a stale buffer would leak
    del first
    assert _stats()["cached"] >= _nbytes(want)
    before = _stats()
    second = ops.bn_add_relu(*args)
    after = _stats()
    assert second.data_ptr() == ptr, "the freed buffer of the same size was not reused"
    assert after["hits"] == before["hits"] + 1
    assert torch.equal(second, want)
    assert second.is_contiguous(memory_format=torch.channels_last)
    assert second.stride() == torch.empty(BIG, memory_format=torch.channels_last).stride()


def test_small_outputs_bypass_the_pool():
    before = _stats()
    out = ops.bn_add_relu(*_args((2, 8, 16, 16)))
    del out
    assert _stats() == before


def test_empty_cache_frees_the_cached_bytes():
    out = ops.bn_add_relu(*_args(BIG))
    n = _nbytes(out)
    del out
    assert _stats()["cached"] == n
    assert pool.act_pool_empty_cache() == n
    assert _stats()["cached"] == 0


def test_pooled_outputs_survive_resize_and_autograd():
    # A pooled tensor is an ordinary CPU tensor: it can be resized (its storage's allocator is the
    # pool) and take part in autograd like any other.
    out = ops.bn_add_relu(*_args(BIG))
    out.resize_(BIG[0], BIG[1], BIG[2], BIG[3] * 2)
    out.zero_()
    assert float(out.sum()) == 0.0
    leaf = torch.zeros(BIG, requires_grad=True)
    (leaf + ops.bn_add_relu(*_args(BIG))).sum().backward()
    assert torch.equal(leaf.grad, torch.ones(BIG))


def test_profiler_sees_pooled_allocations():
    # torch.profiler(profile_memory=True) accounts a pooled output to the op that made it, as it
    # does ATen's allocations, whether the buffer is new or reused.
    args = _args(BIG)
    n = _nbytes(args[0])
    for reused in (False, True):
        hits = _stats()["hits"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            out = ops.bn_add_relu(*args)
        assert _stats()["hits"] == hits + int(reused)
        ev = [e for e in prof.key_averages() if e.key == "fastres::bn_add_relu"]
        assert len(ev) == 1 and ev[0].self_cpu_memory_usage == n, (reused, ev)
        del out


def _run(code: str, env_value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTRES_CPU_POOL_MB=env_value)
    prelude = textwrap.dedent(
        """
        import torch
        from fastres.backends import extension
        extension.load()
        ops, pool = torch.ops.fastres, torch.ops.fastres_cpu
        def args(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(2, 64, 256, 256, generator=g)
            return (x, torch.ones(64), torch.zeros(64), None, None, None, 0, True)
        """
    )
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_env_zero_turns_the_pool_off():
    r = _run(
        """
        out = ops.bn_add_relu(*args(0)); del out
        out = ops.bn_add_relu(*args(1)); del out
        print(pool.act_pool_stats())
        """,
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[0,", "0,", "0,", "0]"]


def test_env_cap_bounds_the_cached_bytes():
    # 40 MiB holds one 32 MiB buffer, not two.
    r = _run(
        """
        a = ops.bn_add_relu(*args(0)); b = ops.bn_add_relu(*args(1))
        del a, b
        cached, hits, misses, cap = pool.act_pool_stats()
        print(cached, misses, cap)
        """,
        "40",
    )
    assert r.returncode == 0, r.stderr
    cached, misses, cap = map(int, r.stdout.split())
    assert (cached, misses, cap) == (32 << 20, 2, 40 << 20)


def test_env_bad_value_is_a_clear_error():
    r = _run("ops.bn_add_relu(*args(0))", "lots")
    assert r.returncode != 0
    assert "FASTRES_CPU_POOL_MB must be a whole number of MiB" in r.stderr
