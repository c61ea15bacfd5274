"""A recorded run of op bodies, replayed as one generated function: the launch plans of the
training unit (``unit.py``).

``record(fn, inputs)`` runs ``fn(*inputs)`` (op bodies: their checks, configs and argument code)
while ``_common.launch`` records every launch, and a ``TorchFunctionMode`` watches every torch
call for work that is not a launch. It returns ``fn``'s outputs and a :class:`Segment` (or None
where the run cannot be repeated from its launches alone: a torch op computed or wrote data, a
copy, a conversion, a fill; an empty tensor; a view of an input).

A segment knows, for every tensor a launch took, where it comes from: one of the inputs (by
identity), or a region of a buffer the run allocated. Buffers that an output lives in are
allocated per call as that output (``torch.empty_strided``); the others are regions of one
workspace allocation, 256-byte aligned, so each pointer keeps the 16-byte alignment it had (the
launches are specialised on it). Scalars, grids and constexprs are the run's: they depend only on
the shape class of the inputs (dtype, shape, strides, alignment of each), which the caller keys
the segment by. Nothing of a tensor's values is kept.

The replay is one generated function per segment: with ``direct``, each compiled kernel's
launcher called with this call's pointers (integers for the buffers: Triton's launchers take
them for pointer arguments), as block.py's plans do; otherwise (the interpreter, a first run
that did not go direct) each launch through ``_common.launch`` with views of the buffers.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _common, _direct

__all__ = ["Segment", "record"]

_ALIGN = 256  # bytes: each workspace region starts on a multiple
_POOLED = 16384  # bytes: outputs this small share an allocation (Segment._layout)
_ALLOCS = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})


class _Watch(TorchFunctionMode):
    """Notes the first torch call that does more than allocate, view or return an input as it
    is (``bad``: its name)."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.bad is not None:
            return out
        name = getattr(func, "__name__", "")
        if name in _ALLOCS:
            return out
        if (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
                or (kwargs and "out" in kwargs)):
            self.bad = name  # in place, or into a given tensor
            return out
        results = out if isinstance(out, (tuple, list)) else (out,)
        sources = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Tensor)]
        for r in results:
            if isinstance(r, Tensor) and not any(r is a or _same_storage(r, a) for a in sources):
                self.bad = name  # new data
        return out


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def record(fn, inputs: tuple):
    """``(fn(*inputs), segment or None)``: see the module docstring."""
    launches: list = []
    watch = _Watch()
    entry = (threading.get_ident(), launches)
    _common.RECORD.append(entry)
    try:
        with watch:
            outs = fn(*inputs)
    finally:
        _common.RECORD.remove(entry)
    if watch.bad is not None:
        return outs, None
    seg = Segment.make(inputs, launches, outs)
    if seg is not None and _common.DIRECT and not _common._dispatch_modes():
        seg.go_direct(launches, _direct._driver.active.get_current_device())
    return outs, seg


class _Launch:
    __slots__ = ("kernel", "grid", "args", "meta", "where", "entry", "params")

    def __init__(self, kernel, grid, args, meta, where) -> None:
        self.kernel, self.meta = kernel, meta
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.where = where  # argument position -> tensor reference (see Segment.make)
        self.args = [None if p in where else a for p, a in enumerate(args)]
        self.entry = None  # (launcher, function, packed metadata) of the compiled kernel
        self.params: list | None = None  # the launcher's arguments, tensors left None


class Segment:
    """The launches of one recorded run and where each tensor comes from (see the module
    docstring). ``run`` is the generated replay: ``run(ins, stream, enter, leave)`` once
    ``direct``, else ``run(ins)``; ``checked(ins)`` the replay through ``_common.launch``
    always (a launch hook, another device). Each returns the outputs as the recorded run
    did."""

    __slots__ = ("launches", "device", "direct", "run", "checked", "n_in", "outs", "alloc",
                 "region", "ws", "dev", "pool")
    # device: the driver's device the compiled kernels were loaded on (direct replays);
    # dev: the inputs' torch.device, where the outputs and the workspace are allocated

    @staticmethod
    def make(inputs: tuple, launches: list, outs) -> Segment | None:
        by_id = {}
        dev = None
        for i, t in enumerate(inputs):
            if isinstance(t, Tensor):
                by_id.setdefault(id(t), i)
                dev = t.device if dev is None else dev
        in_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor)}
        bufs: dict[int, int] = {}  # storage pointer -> its size in bytes

        def ref(t: Tensor):
            """("in", index) or ("buf", storage pointer, byte offset, shape, stride, dtype)."""
            i = by_id.get(id(t))
            if i is not None:
                return ("in", i)
            st = t.untyped_storage()
            base = st.data_ptr()
            if base in in_storages or st.nbytes() == 0 or base % 16 or t.device != dev:
                return None  # a view of an input, an empty tensor, an unaligned buffer
            bufs[base] = st.nbytes()
            return ("buf", base, t.data_ptr() - base, tuple(t.shape), tuple(t.stride()), t.dtype)

        steps = []
        for kernel, grid, args, meta in launches:
            where = {}
            for p, a in enumerate(args):
                if isinstance(a, Tensor):
                    r = ref(a)
                    if r is None:
                        return None
                    where[p] = r
            if any(isinstance(v, Tensor) for v in meta.values()) or 0 in grid:
                return None
            steps.append(_Launch(kernel, grid, args, dict(meta), where))
        out_refs = []
        for t in outs:
            r = None if t is None else ref(t)
            if t is not None and r is None:
                return None
            out_refs.append(r)
        seg = Segment()
        seg.launches, seg.n_in, seg.dev, seg.outs = steps, len(inputs), dev, out_refs
        seg.device, seg.direct = None, False
        if not seg._layout(bufs):
            return None
        seg.run = seg.checked = seg._generate(direct=False)
        return seg

    def _layout(self, bufs: dict) -> bool:
        """Buffers an output lives in are allocated as their first output, when it spans the
        whole buffer from its start; every other buffer is a workspace region. Small ones
        (``_POOLED`` bytes or less: per-channel vectors) share one allocation per dtype, a
        region each (``pool``). False where a tensor in an allocated buffer is not of its dtype
        or not on an element boundary."""
        self.alloc: dict[int, tuple] = {}  # storage pointer -> (shape, stride, dtype)
        self.pool: dict = {}  # dtype -> [elements, [(storage pointer, element offset)]]
        for r in self.outs:
            if r is None or r[0] != "buf" or r[1] in self.alloc:
                continue
            _, base, off, shape, stride, dt = r
            if off == 0 and _span(shape, stride) * dt.itemsize == bufs[base]:
                self.alloc[base] = (shape, stride, dt)
                if bufs[base] <= _POOLED:
                    pool = self.pool.setdefault(dt, [0, []])
                    pool[1].append((base, pool[0]))
                    pool[0] += -(-bufs[base] // _ALIGN) * _ALIGN // dt.itemsize
        self.region: dict[int, int] = {}  # storage pointer -> byte offset in the workspace
        nbytes = 0
        for base, size in bufs.items():
            if base not in self.alloc:
                self.region[base] = nbytes
                nbytes += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        self.ws = nbytes
        refs = [r for step in self.launches for r in step.where.values()] + self.outs
        for r in refs:
            if r is not None and r[0] == "buf" and r[1] in self.alloc:
                adt = self.alloc[r[1]][2]
                if r[5] != adt or r[2] % adt.itemsize:
                    return False
        return True

    def go_direct(self, launches: list, device) -> bool:
        """Keep each launch's compiled kernel, made by the recorded run ``launches`` (which went
        direct on ``device``), and generate the direct replay; False where one is not in
        _direct's cache (a launch hook skipped it, too many keys)."""
        for step, (kernel, _, args, meta) in zip(self.launches, launches, strict=True):
            dplan = _direct._plan(kernel, tuple(args), meta)
            try:
                key, params = dplan.bind(*args, **meta)
                entry = dplan.per_device[device][key]
            except (KeyError, TypeError, AttributeError):
                return False
            step.entry = entry[:3]
            step.params = [None if isinstance(v, Tensor) else v for v in params]
            # the launcher's arguments are the kernel's parameters in order, as args then meta
            if len(params) < len(args) or any(params[p] is not args[p] for p in step.where):
                return False
        self.device = device
        self.direct = True
        self.run = self._generate(direct=True)
        return True

    def _generate(self, direct: bool):
        ns = {"_empty": torch.empty, "_empty_strided": torch.empty_strided, "_u8": torch.uint8,
              "_launch": _common.launch, "_v": _view, "_as": torch.as_strided,
              "_tensors_in": _tensors_in, "dev": self.dev}
        lines = [f"def run(ins{', stream, enter, leave' if direct else ''}):"]
        lines.append(f"    ({''.join(f'i{k}, ' for k in range(self.n_in))}) = ins")
        counter = [0]

        def const(value) -> str:
            counter[0] += 1
            ns[f"c{counter[0]}"] = value
            return f"c{counter[0]}"

        names = {base: f"s{j}" for j, base in enumerate(self.alloc)}
        if self.ws:
            lines.append(f"    ws = _empty({self.ws}, dtype=_u8, device=dev)")
            if direct:
                lines.append("    b = ws.data_ptr()")
        pooled = set()
        for j, (dt, (n, members)) in enumerate(self.pool.items()):
            lines.append(f"    pool{j} = _empty({n}, dtype={const(dt)}, device=dev)")
            specs = tuple((off, *self.alloc[base][:2]) for base, off in members)
            lines.append(f"    ({''.join(names[base] + ', ' for base, _ in members)}) = "
                         f"_tensors_in(pool{j}, {const(specs)})")
            if direct:
                lines.append(f"    q{j} = pool{j}.data_ptr()")
                lines.extend(f"    p{names[base]} = q{j} + {off * dt.itemsize}"
                             for base, off in members)
            pooled.update(base for base, _ in members)
        for base, (shape, stride, dt) in self.alloc.items():
            if base in pooled:
                continue
            s = names[base]
            lines.append(f"    {s} = _empty_strided({const(shape)}, {const(stride)}, "
                         f"dtype={const(dt)}, device=dev)")
            if direct:
                lines.append(f"    p{s} = {s}.data_ptr()")

        def tensor(r, as_ptr: bool) -> str:
            if r[0] == "in":
                return f"i{r[1]}"
            _, base, off, shape, stride, dt = r
            if base in self.alloc:
                s = names[base]
                if as_ptr:
                    return f"(p{s} + {off})" if off else f"p{s}"
                if off == 0 and (shape, stride, dt) == self.alloc[base]:
                    return s
                return f"_as({s}, {const(shape)}, {const(stride)}, {off // dt.itemsize})"
            at = self.region[base] + off
            if as_ptr:
                return f"(b + {at})"
            return f"_v(ws, {at}, {const(shape)}, {const(stride)}, {const(dt)})"

        for step in self.launches:
            if direct:
                # the arguments after the last pointer are constants: one tuple, splatted
                cut = max(step.where) + 1
                exprs = [const(v) for v in step.params[:cut]]
                for p, r in step.where.items():
                    exprs[p] = tensor(r, True)
                if cut < len(step.params):
                    exprs.append(f"*{const(tuple(step.params[cut:]))}")
                launcher, function, packed = step.entry
                lines.append(f"    {const(launcher)}({', '.join(map(str, step.grid))}, stream, "
                             f"{const(function)}, {const(packed)}, None, enter, leave, "
                             f"{', '.join(exprs)})")
            else:
                exprs = [const(v) for v in step.args]
                for p, r in step.where.items():
                    exprs[p] = tensor(r, False)
                lines.append(f"    _launch({const(step.kernel)}, {const(step.grid)}, "
                             f"{', '.join(exprs)}, **{const(step.meta)})")
        outs = ["None" if r is None else tensor(r, False) for r in self.outs]
        lines.append(f"    return ({''.join(o + ', ' for o in outs)})")
        exec("\n".join(lines) + "\n", ns)  # noqa: S102 - generated from the recorded launches
        return ns["run"]


def _tensors_in_py(pool: Tensor, specs: tuple) -> tuple:
    """Per (element offset from pool's start, shape, stride) of ``specs`` a tensor in
    ``pool``'s storage; per (offset, shape, stride, dtype) one of that dtype, ``offset`` its
    elements from pool's start (pool contiguous)."""
    out = []
    for spec in specs:
        off, shape, stride = spec[:3]
        if len(spec) == 3:
            out.append(torch.as_strided(pool, shape, stride, pool.storage_offset() + off))
            continue
        dt = spec[3]
        flat = pool.reshape(-1).view(torch.uint8)
        start = off * dt.itemsize
        n = _span(shape, stride) * dt.itemsize
        out.append(flat[start: start + n].view(dt).as_strided(shape, stride))
    return tuple(out)


_tensors_in = _tensors_in_py


def use_tensors_in(fn) -> None:
    """Make the pooled outputs with ``fn`` (the extension's ``tensors_in``, csrc/host_path.h:
    plain tensors sharing the pool's storage, ~0.2 µs each) instead of torch.as_strided (~2 µs
    each); replays generated afterwards use it."""
    global _tensors_in
    _tensors_in = fn


def _span(shape, stride) -> int:
    """Elements a dense tensor's storage spans."""
    return 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0


def _view(ws: Tensor, off: int, shape, stride, dtype) -> Tensor:
    """The workspace's bytes from ``off`` as a tensor of ``dtype``, ``shape``, ``stride``."""
    n = _span(shape, stride)
    return ws[off: off + n * dtype.itemsize].view(dtype).as_strided(shape, stride)
