"""The Triton backend's direct eager launch (triton_kernels/_direct.py) on a fake sm_90 driver.

The kernels are compiled for sm_90 (ptxas, no GPU) and launched into bench/host_overhead_triton's
fake driver, whose launcher records each launch. That needs Triton without the interpreter, which
tests/conftest.py turns on for this process, so the checks run in a child process without
TRITON_INTERPRET. Checked there:

* a second launch with the same specialisation hits the cache (also with another pointer of the
  same alignment); a different dtype, pointer alignment or int misses;
* every direct launch reaches the launcher exactly as JITFunction.run's launch of the same call
  does: grid, stream, compiled function (each compiled kernel gets its own handle from the fake
  load_binary), packed metadata and every argument in order;
* a fused block's eval calls (FASTRES_BACKEND=triton) launch from the block's launch plan
  (triton_kernels/block.py) into the compiled kernels, never through wrap_triton, read no
  package metadata (importlib.metadata) after the first call, and launch as JITFunction.run
  does for the same arguments;
* the checks catch a planted bug: a key that drops the alignment of one pointer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import importlib.metadata, json, os, sys
sys.path.insert(0, os.path.join(ROOT, "bench"))
import host_overhead_triton as hot

why = hot.cannot_install()
if why:
    print("RESULT " + json.dumps({"skip": why}))
    sys.exit(0)
drv = hot.install()
import torch
from fastres import triton_kernels
triton_kernels.eager_ops()  # registers the ops
from fastres.triton_kernels import _common, _direct, bn_eval


def launches_match(kernel, grid, args, meta):
    """Launch directly, then through JITFunction.run: the two recorded launches must agree."""
    drv.record, drv.calls[:] = True, []
    _common.launch(kernel, grid, *args, **meta)
    kernel[grid](*args, **meta)
    drv.record = False
    (d, t) = drv.calls
    same = d[:5] == t[:5] and len(d[5]) == len(t[5]) and all(
        a is b or (type(a) is type(b) and a == b) for a, b in zip(d[5], t[5]))
    return same, d, t


def round_args(x):
    out = torch.empty_like(x)
    return (_common._round_tf32_kernel, (1,), (x, out, x.numel()), {"BLOCK": 64, "num_warps": 4})


def checks(plant):
    fails = []
    _direct.clear()
    kernel = _common._round_tf32_kernel
    base = torch.randn(200)
    first = round_args(base[:17])
    _common.launch(first[0], first[1], *first[2], **first[3])
    if plant:  # drop the alignment of x_ptr (key element 1) from the key
        plan = kernel.__dict__[_direct._ATTR][3]
        bind = plan.bind
        plan.bind = lambda *a, **k: (lambda kp: (kp[0][:1] + kp[0][2:], kp[1]))(bind(*a, **k))
    # (view, expect a hit?) in order: each miss adds a key the later views may hit
    cases = [("same n=17", base[:17], True),
             ("n=1", base[:1], False),
             ("n=1 again", base[:1], True),
             ("n=32 (a multiple of 16)", base[:32], False),
             ("n=33", base[:33], False),
             ("x misaligned (offset 4 bytes), n=17", base[1:18], False),
             ("x misaligned again (offset 12 bytes), n=17", base[3:20], True),
             ("x aligned again (offset 64 bytes), n=17", base[16:33], True),
             ("float64 x", base[:17].double(), False)]
    for label, x, hit in cases:
        h0, m0 = _direct.stats["hits"], _direct.stats["misses"]
        _common.launch(*round_args(x)[:2], *round_args(x)[2], **round_args(x)[3])
        got_hit = _direct.stats["hits"] == h0 + 1 and _direct.stats["misses"] == m0
        if got_hit != hit:
            fails.append(f"{label}: expected a {'hit' if hit else 'miss'}")
        if x.dtype == torch.float32:
            same, d, t = launches_match(*round_args(x))
            if not same:
                fails.append(f"{label}: direct launch {d[:5]} differs from JITFunction.run's "
                             f"{t[:5]}")
    # a kernel with pointers of several dtypes, an int, a float and constexprs
    v16, v32 = torch.randn(64, dtype=torch.bfloat16), torch.randn(64).abs()
    sc, sh = torch.empty(64), torch.empty(64)
    for w in (v16, None):
        args = (w if w is not None else v32, v32, v16, v32, sc, sh, 64, 1e-5)
        meta = {"HAS_WEIGHT": w is not None, "HAS_BIAS": True, "BLOCK_C": 64}
        for _ in range(2):
            same, d, t = launches_match(bn_eval._bn_eval_vectors_kernel, (1,), args, meta)
            if not same:
                fails.append(f"bn_eval_vectors: direct {d} differs from JITFunction.run's {t}")
    return fails


def _ptr(a):
    """A launcher's pointer argument as an int (a tensor, or an int already), else None."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a if type(a) is int and a > 1 << 20 else None


def block_checks(plant=False):
    """A fused block's eval path: its launch plan (triton_kernels/block.py) launches straight
    into the compiled kernels, reads no package metadata per call, and each launch is the one
    JITFunction.run makes for the same arguments: grid, stream, function, packed metadata and
    every argument (pointers by their 16-byte alignment: the plan's come from its workspace).
    ``plant``: the first convolution's M (rows) off by one in the plan's launcher arguments."""
    import torchvision
    import fastres
    from fastres.triton_kernels import block as tblock

    from fastres.nn._fused import _FusedMixin

    os.environ["FASTRES_BACKEND"] = "triton"
    # the BatchNorms in the epilogues, as on a GPU (the fold cache is the CPU's)
    _FusedMixin._fold_cacheable = staticmethod(lambda conv, bn: False)
    fails = []
    block = fastres.convert(torchvision.models.resnet.Bottleneck(64, 16)).eval().to(
        dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)
    if plant:
        p0 = block.__dict__["_eval_plan"].direct[1].plan
        p0.steps[p0.n_prep].params[14] += 1  # M, the first integer after the 14 pointers
        p0.run_direct = tblock._runner(p0, len(block.__dict__["_eval_plan"].direct[2]), True)
    reads = []
    version, distribution = importlib.metadata.version, importlib.metadata.distribution
    importlib.metadata.version = lambda *a: reads.append(a) or version(*a)
    importlib.metadata.distribution = lambda *a: reads.append(a) or distribution(*a)
    wrapped = []
    wrap = _common.wrap_triton
    _common.wrap_triton = lambda k: wrapped.append(k) or wrap(k)
    p0 = tblock.stats["planned"]
    drv.record, drv.calls[:] = True, []
    try:
        with torch.no_grad():
            for _ in range(3):
                block(x)
    finally:
        drv.record = False
        importlib.metadata.version, importlib.metadata.distribution = version, distribution
        _common.wrap_triton = wrap
    if reads:
        fails.append(f"package metadata read per call: {reads[:3]}")
    if wrapped:
        fails.append(f"eval launched through wrap_triton: {len(wrapped)} launches")
    if tblock.stats["planned"] - p0 != 3:
        fails.append(f"{tblock.stats['planned'] - p0} of 3 calls served by the launch plan")
    planned = drv.calls[: len(drv.calls) // 3]
    eval_plan = block.__dict__["_eval_plan"]
    # With autograd (one Function over block_eval's keep call): the same launches.
    x.requires_grad_(True)
    block(x)
    drv.record, drv.calls[:] = True, []
    block(x)
    drv.record = False
    # Once more, the kept outputs (the inner ones in the call's workspace storage) read back:
    # they must be the tensors the launches wrote.
    kept = []
    tplan = block.__dict__["_eval_plan"].direct[0].parts[2].plan  # the grad plan's block_call
    run_keep = tplan.run_keep
    tplan.run_keep = lambda *a: kept.append(run_keep(*a)) or kept[-1]
    drv.record, keep_calls = True, len(drv.calls)
    try:
        block(x)
    finally:
        drv.record = False
        tplan.run_keep = run_keep
    written = [w if isinstance(w, int) else w.data_ptr()
               for w in (c[5][5] for c in drv.calls[keep_calls:] if c[0] == "_conv_fwd_kernel")]
    if len(kept) != 1 or [t.data_ptr() for t in kept[0]] != written:
        fails.append(f"the kept outputs {[[t.data_ptr() for t in k] for k in kept]} are not "
                     f"what the launches wrote {written}")
    del drv.calls[keep_calls:]
    x.requires_grad_(False)
    if len(drv.calls) != len(planned) or any(
            k[:5] != d[:5] or len(k[5]) != len(d[5]) or any(
                (_ptr(a) is None) != (_ptr(b) is None) or (
                    _ptr(a) is None and not (a is b or (type(a) is type(b) and a == b)))
                for a, b in zip(k[5], d[5])) for k, d in zip(drv.calls, planned)):
        fails.append("the plan's launches with autograd differ from those without")
    spec = eval_plan.direct[1]
    plan = spec.plan
    if plan is None or plan.run_direct is None or len(planned) != len(plan.steps):
        fails.append(f"{len(planned)} launches per call, plan {plan}")
        return fails, len(planned)
    # Each step again through JITFunction.run, on tensors of the plan's layout.
    from fastres.nn.eval_plan import _read

    ts = [_read(s) for s in eval_plan.direct[2]]
    vecs = torch.empty(plan.vec_shape, dtype=torch.float32)
    env = [x, *ts, vecs]
    for step, d in zip(plan.steps, planned):
        if step.out is not None:
            env.append(torch.empty_strided(step.out[0], step.out[1], dtype=step.out[2]))
        drv.record, drv.calls[:] = True, []
        step.kernel[step.grid](*tblock._args(step, env, vecs), **step.meta)
        drv.record = False
        (t,) = drv.calls
        pointers = {p for p, _ in step.slots} | {p for p, *_ in step.derived}
        same = d[:5] == t[:5] and len(d[5]) == len(t[5])
        for i, (a, b) in enumerate(zip(d[5], t[5])):
            if i in pointers:
                same &= _ptr(a) is not None and _ptr(b) is not None and (
                    _ptr(a) % 16 == 0) == (_ptr(b) % 16 == 0)
            else:
                same &= a is b or (type(a) is type(b) and a == b)
        if not same:
            fails.append(f"{d[0]}: the plan's launch {d[:5]} differs from JITFunction.run's "
                         f"{t[:5]}")
    return fails, len(planned)


clean = checks(False)
planted = checks(True)
block, per_call = block_checks()
block_planted, _ = block_checks(plant=True)
print("RESULT " + json.dumps({"clean": clean, "planted": planted, "block": block,
                              "block_planted": block_planted, "launches_per_call": per_call}))
'''


@pytest.fixture(scope="module")
def child() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = f"ROOT = {str(ROOT)!r}\n" + CHILD
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"child failed ({r.returncode}):\n{r.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    if "skip" in res:
        pytest.skip(f"the fake Triton driver cannot be installed: {res['skip']}")
    return res


def test_direct_cache_and_launch_args(child):
    assert child["clean"] == []


def test_planted_key_bug_is_caught(child):
    """A key without x_ptr's alignment serves a misaligned pointer the aligned kernel."""
    assert any("misaligned" in f for f in child["planted"]), child["planted"]


def test_block_eval_launches_directly(child):
    assert child["block"] == []
    assert child["launches_per_call"] == 3  # the 3 convolutions, each with its BatchNorm vectors


def test_planted_block_plan_bug_is_caught(child):
    """A plan whose launch carries a wrong integer argument differs from JITFunction.run's."""
    assert any("differs from JITFunction.run" in f for f in child["block_planted"]), \
        child["block_planted"]


def test_eager_ops_match_the_dispatched_ops():
    """eager_ops(): the same names as ops(), the same results without the dispatcher, and the
    running statistics' version counters bumped where the op writes them (interpreted on a
    machine without a GPU)."""
    import torch

    from fastres import triton_kernels

    if triton_kernels.unavailable_reason():
        pytest.skip(triton_kernels.unavailable_reason())
    eager, ops = triton_kernels.eager_ops(), triton_kernels.ops()
    assert set(vars(eager)) == set(vars(ops))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 16, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 3, 3, device=dev)
    b, m, v = (torch.randn(8, device=dev), torch.randn(8, device=dev),
               torch.rand(8, device=dev) + 0.5)
    args = (x, w, b, None, [1, 1], [1, 1], [1, 1], 1, True, None, m, v, 1e-5)
    assert torch.equal(eager.conv_bias_act(*args), ops.conv_bias_act(*args))
    s, ss = torch.randn(8, device=dev), torch.rand(8, device=dev) * 10 + 5
    rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
    nbt = torch.tensor(0, device=dev)
    before = (rm._version, rv._version, nbt._version)
    eager.bn_finalize(s, ss, None, None, rm, rv, nbt, 4, 0.1, 1e-5)
    assert all(a > b for a, b in zip((rm._version, rv._version, nbt._version), before,
                                     strict=True))
    assert int(nbt) == 1
