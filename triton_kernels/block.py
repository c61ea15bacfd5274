"""A residual block's eval convolutions as one launch plan: ``block_spec`` and ``block_eval``, the
Triton backend's ``eager_block`` (the same contract as csrc/cuda/block_py.h's, which
fastres/nn/eval_plan.py and fastres/_autograd_block.py call).

    spec = block_spec(n_main, has_ds, ((sh, sw, ph, pw, dh, dw, groups, eps), ...))
    y = block_eval(spec, x, (w, bn_bias, bn_weight, running_mean, running_var, ...))
    (h_1, ..., y) = block_eval(spec, x, tensors, True)   # and the outputs a backward needs

Convolutions in the plan's order: the main path, then the downsample; five tensors each. A call
is one launch of ``_conv_fwd_kernel`` per convolution: each computes its BatchNorm's scale and
shift from the four vectors as they are now (``BN_VECTORS``, into the call's buffer) and applies
them in its epilogue with the ReLU, the last one with the shortcut's residual. Float32 on TF32
tensor cores adds one launch before them, ``_round_weights_kernel``: the weights rounded to TF32
into the same buffer (wgmma truncates its shared-memory operand; see bn_eval.py).

Why a plan: through the op bodies each launch cost ~50 µs of Python on the fake sm_90 driver
(bench/host_overhead_triton.py): the op's argument checks (~12 µs), the config and layout
decisions, the argument tuple of ~45 values and ``_direct``'s key of it. All of that depends only
on the shape class of the call: the input's shape, strides and dtype, and each tensor's dtype,
shape, strides and pointer alignment. A plan is made once per shape class by running the op
bodies' own argument code (``conv.conv_forward_args``) and keeps, per launch, the compiled
kernel's launcher, function handle, packed metadata, grid and every argument; a call allocates
the outputs and passes the launcher those with this call's pointers in place. Nothing of a
tensor's values is kept: the kernels read the parameters and statistics as they are.

A plan serves a call when every tensor's pointer is the one the plan last saw (parameters do not
move between calls) or, after any pointer changed, when the full signature (dtype, shape,
strides, 16-byte alignment of each tensor) is the plan's; otherwise a new plan is made. Where the
op bodies would make a copy the plan cannot repeat (a weight not channels_last, float32 weights
rounded to TF32 by a launch of their own, a channel count padded to 16), the block runs through
the op bodies instead (``_ops.conv_bias_act``), one call per convolution. Under the interpreter
the plan's launches go through ``_common.launch`` (``kernel[grid](...)``), which the tests run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _direct, _ops, _replay
from . import bn_eval as _bn
from .conv import _conv_fwd_kernel, conv_forward_args

__all__ = ["block_spec", "block_eval", "stats"]

#: Per convolution: conv weight, BN bias, BN weight, running mean, running var.
PER_CONV = 5
#: Counters for tests: calls served by a plan, plans made, calls through the op bodies.
stats = {"planned": 0, "built": 0, "ops": 0}
_KERNEL_TENSORS = 14  # _conv_fwd_kernel's pointer arguments come first, in args[0:14]


class _Spec:
    """block_spec's result: the block's structure and its plans by shape class."""

    __slots__ = ("n_main", "has_ds", "convs", "plan")

    def __init__(self, n_main: int, has_ds: bool, convs) -> None:
        self.n_main, self.has_ds = int(n_main), bool(has_ds)
        self.convs = tuple(tuple(c) for c in convs)
        if len(self.convs) != self.n_main + self.has_ds:
            raise ValueError(f"block_spec: {len(self.convs)} convolutions for {self.n_main} main "
                             f"and {int(self.has_ds)} downsample")
        self.plan: _Plan | None = None  # the last shape class served (a block sees one or few)


def block_spec(n_main: int, has_ds: bool, convs) -> _Spec:
    """The spec of a block with ``n_main`` convolutions on its main path and, with ``has_ds``,
    a conv + BN downsample; ``convs``: per convolution (stride h, w, padding h, w, dilation h,
    w, groups, BatchNorm eps)."""
    return _Spec(n_main, has_ds, convs)


class _Step:
    """One launch: where its tensors come from, and everything else fixed.

    ``slots``: (argument position, env index), env being [x, *tensors, vectors, outputs...];
    ``derived``: (argument position, element offset) of pointers into the vectors buffer (a
    BatchNorm's scale or shift)."""

    __slots__ = ("kernel", "grid", "args", "meta", "slots", "derived", "out", "entry",
                 "params", "device")

    def __init__(self, kernel, grid, args, meta, slots, derived, out) -> None:
        self.kernel = kernel
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        # No tensor kept (the first call's activations would stay alive): every tensor position
        # is a slot or a derived pointer, filled per call.
        filled = {p for p, _ in slots} | {p for p, _ in derived}
        assert filled == {p for p, a in enumerate(args) if isinstance(a, Tensor)}
        self.args = [None if p in filled else a for p, a in enumerate(args)]
        self.meta = meta
        self.slots = slots
        # (position, element offset, shape, strides): a view of the buffer
        self.derived = tuple((p, off, tuple(args[p].shape), args[p].stride())
                             for p, off in derived)
        self.out = out  # (shape, stride, dtype) of the output it allocates, or None
        self.entry = None  # (launcher, function, packed metadata) of the compiled kernel
        self.params: list | None = None  # the launcher's arguments, pointers filled per call
        self.device = None  # the device the compiled function was loaded on


class _Plan:
    __slots__ = ("x_sig", "sig", "ptrs", "steps", "device", "keep_idx", "direct", "vec_shape",
                 "run_direct", "run_checked", "run_keep", "n_prep")

    def __init__(self, x_sig, sig, ptrs, steps, device, keep_idx, vec_shape, n_prep) -> None:
        self.x_sig, self.sig, self.ptrs, self.steps = x_sig, sig, ptrs, steps
        self.n_prep = n_prep  # steps before the convolutions' (the TF32 rounding of weights)
        self.device = device
        # The call without keep as one generated function (_runners): through the compiled
        # launchers (once every step has one), and through _common.launch.
        self.run_direct = None
        self.run_checked = None
        self.run_keep = None  # with keep, through the compiled launchers
        self.keep_idx = keep_idx  # env indices of (h_1, ..., [downsample], y)
        self.direct = None  # the device whose compiled kernels every step holds, once filled
        self.vec_shape = vec_shape  # the buffer of scales, shifts and rounded weights


def _input_sig(x: Tensor) -> tuple | bytes:
    """dtype, device, shape, strides and alignment (see :func:`use_host_readers`)."""
    return x.dtype, x.device, x.shape, x.stride(), x.data_ptr() & 15


def _signature(ts) -> tuple:
    return tuple(
        None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() & 15)
        for t in ts)


_data_ptr = Tensor.data_ptr


def _pointers(ts) -> list | bytes | None:
    """Every tensor's data pointer (None when one is absent: no plan has such a tensor), compared
    only with what this function returned before. One C-level map: ~40% less than a
    comprehension over the ~20 tensors of a block; :func:`use_host_readers` installs the
    extension's ``tensor_ptrs`` (csrc/host_path.h), another ~85%."""
    try:
        return list(map(_data_ptr, ts))
    except TypeError:
        return None


def use_host_readers(pointers, key) -> None:
    """Read the tensors' data pointers with ``pointers`` (``fastres._C.tensor_ptrs``: packed
    bytes, None when a tensor is absent) and an input's signature with ``key``
    (``fastres._C.tensor_key``) instead of :func:`_pointers`' and :func:`_input_sig`'s Python;
    the backend installs them once the extension loads (fastres/backends/dispatch.py). Plans
    made before compare unequal once, then re-check their layouts and keep the new form."""
    global _pointers, _input_sig
    _pointers, _input_sig = pointers, key


def _order(spec: _Spec) -> list[int]:
    """Launch order: the main convolutions but the last, the downsample, the last."""
    n = spec.n_main
    return [*range(n - 1), *([n] if spec.has_ds else []), n - 1]


def _build(spec: _Spec, x: Tensor, ts) -> _Plan | None:
    """The plan of this call's shape class after the op's checks of every convolution (a bad
    tensor raises here, as the op would), or None where the op bodies must run (see the module
    docstring). Launches nothing."""
    n_conv = len(spec.convs)
    if len(ts) != PER_CONV * n_conv:
        raise ValueError(f"block_eval: {len(ts)} tensors for {n_conv} convolutions")
    if not 1 <= n_conv <= 4 or x.numel() == 0:
        return None  # an empty batch: the op bodies launch nothing
    bns = [ts[PER_CONV * i + 1: PER_CONV * (i + 1)] for i in range(n_conv)]  # (b, g, m, v)
    if any(t is None or not t.is_contiguous() for bn in bns for t in bn):
        return None  # no affine part, or a strided vector: the op bodies handle those
    vec_idx = 1 + len(ts)
    env: list = [x, *ts, None]
    weights = [ts[PER_CONV * i] for i in range(n_conv)]
    # Float32 on TF32 tensor cores: the weights rounded to TF32 by the same launch (see
    # bn_eval._bn_eval_vectors_block_kernel), read by the convolutions from the buffer.
    rounded = (x.dtype == torch.float32 and _common.dot_precision(x.dtype) == "tf32"
               and all(w is not None and w.dtype == torch.float32 for w in weights))
    if rounded and not all(_dense(w) for w in weights):
        return None
    # The BatchNorms' scales and shifts (each written by its convolution, BN_VECTORS) and the
    # rounded weights: one float32 buffer; a launch of its own only to round the weights.
    offs, total, woffs, size = _bn.eval_vectors_layout(
        [bn[3].shape[0] for bn in bns], [w.numel() for w in weights] if rounded else ())
    vecs = torch.empty(size, dtype=torch.float32, device=x.device)
    env[vec_idx] = vecs
    steps = []
    if rounded:
        grid, args, meta = _bn.round_weights_args(weights, vecs, woffs)
        slots = tuple((pos, vec_idx if a is vecs else _index(a, ts))
                      for pos, a in enumerate(args) if isinstance(a, Tensor))
        steps.append(_Step(_bn._round_weights_kernel, grid, args, meta, slots, (), None))
    n_prep = len(steps)
    keep_idx = []
    h_idx, ds_idx = 0, None
    order = _order(spec)
    for j, i in enumerate(order):
        sh, sw, ph, pw, dh, dw, groups, _ = spec.convs[i]
        w = ts[PER_CONV * i]
        b, g, m, v = bns[i]
        is_ds = spec.has_ds and i == spec.n_main
        last = j == len(order) - 1
        src = 0 if is_ds else h_idx
        res_idx = (ds_idx if ds_idx is not None else 0) if last else None
        inp, res = env[src], (env[res_idx] if res_idx is not None else None)
        geo = ((sh, sw), (ph, pw), (dh, dw))
        _ops.check_conv_bias_act(inp, w, b, res, *geo, groups, g, m, v)
        k = w.shape[0]
        scale, shift = vecs[offs[i]: offs[i] + k], vecs[total + offs[i]: total + offs[i] + k]
        wk = w
        if rounded:
            wk = vecs[woffs[i]: woffs[i] + w.numel()].as_strided(w.shape, w.stride())
        out, part, grid, args, meta = conv_forward_args(
            inp, wk, shift, res, not is_ds, None, None, False, False, *geo, scale,
            weight_rounded=rounded, bn=(g, b, m, v, spec.convs[i][7]))
        wanted = (inp, wk, shift, scale, res if res is not None else inp, out, inp, inp, inp,
                  inp, g, b, m, v)
        if part is not None or any(a is not t for a, t in zip(args[:_KERNEL_TENSORS], wanted,
                                                                 strict=True)):
            return None  # a copy made per call (layout, TF32 rounding, padding)
        out_idx = len(env)
        env.append(out)
        base = 1 + PER_CONV * i  # env index of this convolution's weight; b, g, m, v follow
        where = (src, None if rounded else base, None, None,
                 res_idx if res is not None else src, out_idx, src, src, src, src,
                 base + 2, base + 1, base + 3, base + 4)
        derived = ((2, total + offs[i]), (3, offs[i]), *(((1, woffs[i]),) if rounded else ()))
        steps.append(_Step(_conv_fwd_kernel, grid, args, meta,
                           tuple((p, e) for p, e in enumerate(where) if e is not None), derived,
                           (tuple(out.shape), out.stride(), out.dtype)))
        if is_ds:
            ds_idx = out_idx
        else:
            h_idx = out_idx
        keep_idx.append(out_idx)
    plan = _Plan(_input_sig(x), _signature(ts), _pointers(ts), steps, x.device,
                 tuple(keep_idx), (size,), n_prep)
    plan.run_checked = _runner(plan, len(ts), direct=False)
    return plan


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span in some order the rounding copies
    linearly (contiguous or channels_last)."""
    return t.is_contiguous() or (t.dim() == 4
                                 and t.is_contiguous(memory_format=torch.channels_last))


def _index(t: Tensor, ts) -> int:
    """env index of one of the block's tensors (the first of ``ts`` that is ``t``)."""
    for i, u in enumerate(ts):
        if u is t:
            return 1 + i
    raise AssertionError("a BatchNorm vector that is none of the block's tensors")


def _args(step: _Step, env: list, vecs: Tensor) -> list:
    args = list(step.args)
    for pos, i in step.slots:
        args[pos] = env[i]
    for pos, off, shape, stride in step.derived:  # a view of the buffer
        args[pos] = vecs.as_strided(shape, stride, off)
    return args


def _fill(step: _Step, args: list, device) -> None:
    """Keep the compiled kernel of ``step`` (made by the launch of ``args`` that just ran): its
    launcher entry and argument list, from _direct's cache. Left empty when it is not there (a
    launch hook skipped it, too many keys): the step then launches through _common.launch."""
    dplan = _direct._plan(step.kernel, tuple(args), step.meta)
    try:
        key, params = dplan.bind(*args, **step.meta)
        entry = dplan.per_device[device][key]
    except (KeyError, TypeError, AttributeError):
        return
    params = list(params)
    for pos, _ in step.slots:
        params[pos] = None
    for pos, *_ in step.derived:
        params[pos] = None
    step.entry, step.params, step.device = entry[:3], params, device


def block_eval(spec: _Spec, x: Tensor, ts, keep: bool = False):
    """The block's eval output (``keep``: (h_1, ..., [downsample], y)), no autograd."""
    plan = spec.plan
    if plan is not None:
        if _input_sig(x) != plan.x_sig:
            plan = None
        else:
            ptrs = _pointers(ts)
            if ptrs != plan.ptrs:  # a tensor replaced or moved: the plan if its layout is
                if _signature(ts) != plan.sig:
                    plan = None
                else:
                    plan.ptrs = ptrs
    if plan is None:
        plan = _build(spec, x, ts)
        if plan is None:
            spec.plan = None
            return _through_ops(spec, x, ts, keep)
        spec.plan = plan
        stats["built"] += 1
    else:
        if plan.run_direct is not None and not _common._dispatch_modes():
            drv = _direct._driver.active
            device = drv.get_current_device()
            rt = _direct.knobs.runtime
            enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
            if (device == plan.direct and not _direct._hooked(enter)
                    and not _direct._hooked(leave)):
                stats["planned"] += 1
                run = plan.run_keep if keep else plan.run_direct
                return run(x, ts, drv.get_current_stream(device), enter, leave)
        if not keep and plan.direct is None and not _common.DIRECT:  # the interpreter
            stats["planned"] += 1
            return plan.run_checked(x, ts)
    vecs = torch.empty(plan.vec_shape, dtype=torch.float32, device=plan.device)
    env = [x, *ts, vecs]
    # The first call of a plan, the interpreter with keep, a dispatch mode, a launch hook,
    # another device: each launch through _common.launch, keeping the compiled kernels where it
    # went direct.
    fill = (_common.DIRECT and not _common._dispatch_modes()
            and not torch.compiler.is_compiling())
    device = _direct._driver.active.get_current_device() if fill else None
    for step in plan.steps:
        if step.out is not None:
            shape, stride, dt = step.out
            env.append(torch.empty_strided(shape, stride, dtype=dt, device=plan.device))
        args = _args(step, env, vecs)
        _common.launch(step.kernel, step.grid, *args, **step.meta)
        if fill and step.device != device:
            _fill(step, args, device)
    if fill and all(s.device == device for s in plan.steps):
        plan.direct = device
        plan.run_direct = _runner(plan, len(ts), direct=True)
        plan.run_keep = _runner(plan, len(ts), direct=True, keep=True)
    stats["planned"] += 1
    return tuple(env[i] for i in plan.keep_idx) if keep else env[-1]


_ALIGN = 256  # bytes: each region of the call's workspace starts on a multiple


def _runner(plan: _Plan, n_ts: int, direct: bool, keep: bool = False):
    """The plan's call as one generated function: one workspace allocation for the scales,
    shifts, rounded weights and the outputs that do not leave the call (without ``keep``: every
    one but the last; with it, (h_1, ..., [downsample], y) are returned, each allocated), one
    per output, then each launch with its arguments written out (constants bound by name).
    ``direct``: ``run(x, ts, stream, enter, leave)`` calls each compiled kernel's launcher with
    workspace pointers as integers (which Triton's launchers take for pointer arguments); else
    ``run(x, ts)`` passes views of the workspace to _common.launch (the interpreter runs this
    one: the same layout and wiring, with tensors)."""
    vec_idx = 1 + n_ts
    # env index -> (byte offset, shape, stride, dtype, buffer): the workspace "ws", or with keep
    # "kp", one allocation for the inner outputs, which leave the call as tensors in its storage
    # (_replay._tensors_in). Not the workspace's: the saved outputs would hold its rounded
    # weights; not the block's output's, which goes on to the next block.
    regions = {vec_idx: (0, plan.vec_shape, (1,), torch.float32, "ws")}
    nbytes = _round_up(4 * plan.vec_shape[0])
    kbytes = 0
    convs = plan.steps[plan.n_prep:]
    final = vec_idx + len(convs)  # env index of the block output (the last step's)
    for j, step in enumerate(convs):
        if vec_idx + 1 + j == final:
            continue
        shape, stride, dt = step.out
        size = _round_up(_span(shape, stride) * dt.itemsize)
        if keep:
            regions[vec_idx + 1 + j] = (kbytes, shape, stride, dt, "kp")
            kbytes += size
        else:
            regions[vec_idx + 1 + j] = (nbytes, shape, stride, dt, "ws")
            nbytes += size
    ns = {"_empty": torch.empty, "_empty_strided": torch.empty_strided, "_u8": torch.uint8,
          "_dev": plan.device, "_launch": _common.launch, "_v": _view,
          "_tensors_in": _replay._tensors_in}

    def const(name, value):
        ns[name] = value
        return name

    def region(off, shape, stride, dt, buf, tag):
        if direct:
            return f"({'b' if buf == 'ws' else 'k'} + {off})"
        return (f"_v({buf}, {off}, {const(f'shape{tag}', shape)}, "
                f"{const(f'stride{tag}', stride)}, {const(f'dt{tag}', dt)})")

    lines = [f"def run(x, ts{', stream, enter, leave' if direct else ''}):",
             f"    ({''.join(f't{i}, ' for i in range(n_ts))}) = ts",
             f"    ws = _empty({nbytes}, dtype=_u8, device=_dev)"]
    if kbytes:
        lines.append(f"    kp = _empty({kbytes}, dtype=_u8, device=_dev)")
    outs = [e for e in range(vec_idx + 1, final + 1) if e not in regions]  # allocated each
    for e in outs:
        shape, stride, dt = convs[e - vec_idx - 1].out
        lines.append(f"    o{e} = _empty_strided({const(f'shape{e}', shape)}, "
                     f"{const(f'stride{e}', stride)}, dtype={const(f'dt{e}', dt)}, device=_dev)")
    if direct:
        lines.append("    b = ws.data_ptr()")
        if kbytes:
            lines.append("    k = kp.data_ptr()")
    for s, step in enumerate(plan.steps):
        values = list(step.params if direct else step.args)
        exprs = [const(f"k{s}_{p}", v) for p, v in enumerate(values)]
        for p, e in step.slots:
            if e == 0:
                exprs[p] = "x"
            elif e < vec_idx:
                exprs[p] = f"t{e - 1}"
            elif e not in regions:
                exprs[p] = f"o{e}"
            else:
                exprs[p] = region(*regions[e], f"{s}_{p}")
        for p, off, shape, stride in step.derived:
            exprs[p] = region(4 * off, shape, stride, torch.float32, "ws", f"{s}_{p}")
        if direct:
            launcher, function, packed = step.entry
            head = (f"{const(f'L{s}', launcher)}({', '.join(map(str, step.grid))}, stream, "
                    f"{const(f'F{s}', function)}, {const(f'P{s}', packed)}, None, enter, leave")
            lines.append(f"    {head}, {', '.join(exprs)})")
        else:
            lines.append(f"    _launch({const(f'K{s}', step.kernel)}, {step.grid}, "
                         f"{', '.join(exprs)}, **{const(f'M{s}', step.meta)})")
    if keep:
        inner = [e for e in plan.keep_idx if e in regions]
        if inner:
            specs = tuple((regions[e][0] // regions[e][3].itemsize, *regions[e][1:4])
                          for e in inner)
            lines.append(f"    ({''.join(f'o{e}, ' for e in inner)}) = "
                         f"_tensors_in(kp, {const('kept', specs)})")
        lines.append(f"    return ({''.join(f'o{e}, ' for e in plan.keep_idx)})")
    else:
        lines.append(f"    return o{final}")
    exec("\n".join(lines) + "\n", ns)  # noqa: S102 - generated from the plan's own steps
    return ns["run"]


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _span(shape, stride) -> int:
    """Elements a dense tensor's storage spans."""
    return 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0


def _view(ws: Tensor, off: int, shape, stride, dtype) -> Tensor:
    """The region of the workspace at byte ``off`` as a tensor of ``dtype``, ``shape``,
    ``stride``."""
    n = _span(shape, stride)
    return ws[off: off + n * dtype.itemsize].view(dtype).as_strided(shape, stride)


def _through_ops(spec: _Spec, x: Tensor, ts, keep: bool):
    """The block through the op bodies, one conv_bias_act per convolution."""
    stats["ops"] += 1
    outs = []
    h = x
    ds = None
    for j, i in enumerate(order := _order(spec)):
        sh, sw, ph, pw, dh, dw, groups, eps = spec.convs[i]
        w, b, g, m, v = ts[PER_CONV * i: PER_CONV * (i + 1)]
        is_ds = spec.has_ds and i == spec.n_main
        last = j == len(order) - 1
        inp = x if (i == 0 or is_ds) else h
        res = (ds if ds is not None else x) if last else None
        y = _ops.conv_bias_act(inp, w, b, res, [sh, sw], [ph, pw], [dh, dw], groups, not is_ds,
                               g, m, v, eps)
        outs.append(y)
        if is_ds:
            ds = y
        else:
            h = y
    return tuple(outs) if keep else outs[-1]
