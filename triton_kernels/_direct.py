"""Eager launches straight to the compiled kernel, without ``wrap_triton`` and without
``JITFunction.run``'s per-call binding.

``JITFunction.run`` binds every argument per call (``native_specialize_impl`` on each, a string
key built from the result), reads the driver's device and stream, checks the globals the kernel
used and builds launch metadata; ``wrap_triton`` adds a higher-order-op dispatch and a side-table
entry per call. On the fake sm_90 driver (bench/host_overhead_triton.py) that was 25-70 µs per
launch of the ~35 in a training step. Here a launch is one generated function that computes the
specialisation key and the launcher's argument tuple in one pass, one dict lookup and the
compiled kernel's launcher.

The key covers everything Triton 3.6 and 3.8 specialise a launch on (``create_function_from_
signature`` and ``native_specialize_impl``, identical in both):

* each tensor argument: its dtype and whether its data pointer is 16-byte aligned ("D");
  ``do_not_specialize``/``do_not_specialize_on_alignment`` drop the alignment as Triton does;
* each scalar (int, float, bool, None) and constexpr: its value and its type. Triton specialises
  an int on whether it equals 1, whether it is divisible by 16 and its range (i32, i64, u64), a
  float or bool on its type: the value and the type determine all of these. Exact values are
  finer than Triton's classes (one entry per shape rather than per shape class) and cheaper to
  key on than the tests (7 µs per conv launch with the tests, on the fake driver);
* the options (num_warps, num_stages, ...);
* the device (a CUfunction belongs to one device's context).

A key is finer than Triton's, never coarser; at most ``MAX_ENTRIES`` per kernel and device are
kept (dynamic shapes past that launch through JITFunction.run). The first
launch of a key goes through ``JITFunction.run`` (which compiles or finds the kernel and launches
it); its ``CompiledKernel``'s launcher, function handle and packed metadata are kept for the key.
Not re-checked per launch: Triton's knobs that change compile options (``TRITON_DEBUG``,
instrumentation) and the values of globals the kernels read (``_common``'s constexpr switches,
fixed per process). The launch hooks are honoured: with one registered, launch metadata is built
as Triton builds it.

Used only in eager (``_common.launch``): never while ``torch.compile``/``torch.export`` trace
(they need ``wrap_triton``'s op in the graph), nor under a ``TorchDispatchMode`` or on tensor
subclasses (fake, functional), nor under the interpreter.
"""

from __future__ import annotations

from triton import knobs
from triton.runtime import driver as _driver

#: Counters for tests: launches served from the cache, and first launches of a key (through
#: JITFunction.run).
stats = {"hits": 0, "misses": 0}

_ATTR = "_fastres_direct_plans"
MAX_ENTRIES = 4096
_kernels: list = []  # the kernels holding plans (clear())


class _Plan:
    """One kernel called with one number of positional arguments: the generated ``bind`` and the
    compiled kernels per device and key."""

    __slots__ = ("bind", "kinds", "per_device", "names")

    def __init__(self, kernel, nargs: int, values: dict):
        self.names = [p.name for p in kernel.params]
        self.kinds = {p.name: _kind(p, values.get(p.name)) for p in kernel.params}
        self.bind = _make_bind(kernel, self.kinds)
        self.per_device: dict[int, dict] = {}


def _kind(param, value) -> str:
    if param.is_constexpr:
        return "constexpr"
    if hasattr(value, "data_ptr"):
        return "tensor"
    if type(value) is int:
        return "int"
    return "other"


def _make_bind(kernel, kinds: dict):
    """``bind(*args, **meta) -> (key, params)``: the specialisation key and the launcher's
    arguments (every parameter in signature order, constexprs included, as JITFunction.run
    passes ``bound_args.values()``)."""
    sig, key, scalars, names = [], [], [], []
    # parameters by their names (constexprs come as keywords); helpers behind a prefix no kernel
    # parameter uses
    ns: dict = {"_fr_type": type}
    for i, p in enumerate(kernel.params):
        v = p.name
        assert not v.startswith("_fr_") and v != "options", v
        names.append(v)
        if p.has_default:
            ns[f"_fr_d{i}"] = p.default
            sig.append(f"{v}=_fr_d{i}")
        else:
            sig.append(v)
        if kinds[p.name] == "tensor":
            key.append(f"{v}.dtype")
            if not p.do_not_specialize and not p.do_not_specialize_on_alignment:
                key.append(f"not {v}.data_ptr() & 15")
        else:
            scalars.append(v)
    # Scalars and constexprs by value and type: finer than Triton's int specialisation (== 1,
    # divisible by 16, i32/i64/u64 by range), one entry per shape instead of per shape class,
    # and cheaper to compute than those tests (a tuple of values, the types mapped in C).
    src = (f"def bind({', '.join(sig)}, **options):\n"
           f"    s = ({', '.join(scalars)},)\n"
           f"    return ({', '.join(key)}, s, (*map(_fr_type, s),), *options.items()), "
           f"({', '.join(names)},)\n")
    exec(src, ns)  # noqa: S102 - generated from the kernel's own signature, as triton's binder
    return ns["bind"]


def _plan(kernel, args: tuple, meta: dict) -> _Plan:
    plans = kernel.__dict__.get(_ATTR)
    if plans is None:
        plans = {}
        setattr(kernel, _ATTR, plans)
        _kernels.append(kernel)
    plan = plans.get(len(args))
    if plan is None:
        values = dict(zip([p.name for p in kernel.params], args, strict=False))
        values.update(meta)
        plan = plans[len(args)] = _Plan(kernel, len(args), values)
    return plan


def launch(kernel, grid, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)`` through the cached compiled kernel (see the module
    docstring); the first launch of a specialisation goes through ``JITFunction.run``."""
    plans = kernel.__dict__.get(_ATTR)
    plan = plans.get(len(args)) if plans is not None else None
    if plan is None:
        plan = _plan(kernel, args, meta)
    drv = _driver.active
    device = drv.get_current_device()
    try:
        key, params = plan.bind(*args, **meta)
        entry = plan.per_device[device][key]
    except (KeyError, TypeError, AttributeError):  # a new key, or arguments of other kinds
        _first_launch(plan, kernel, grid, args, meta, device)
        return
    stats["hits"] += 1
    run, function, packed, compiled = entry
    stream = drv.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    rt = knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    # the metadata only a registered hook reads (a profiler's); JITFunction.run builds it always
    metadata = (compiled.launch_metadata(grid, stream, *params)
                if _hooked(enter) or _hooked(leave) else None)
    run(grid[0], g1, g2, stream, function, packed, metadata, enter, leave, *params)


def _hooked(hook) -> bool:
    """Whether a launch hook is registered (a HookChain with calls, or a plain callable)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _first_launch(plan: _Plan, kernel, grid, args, meta, device) -> None:
    stats["misses"] += 1
    compiled = kernel.run(*args, grid=grid, warmup=False, **meta)
    if compiled is None or hasattr(compiled, "result"):  # a hook skipped it; an async compile
        return
    try:
        key, params = plan.bind(*args, **meta)
        hash(key)
    except (TypeError, AttributeError):
        return  # arguments of other kinds than the plan's, or an unhashable constexpr
    values = dict(zip(plan.names, params, strict=True))
    if any(_kind(p, values[p.name]) != plan.kinds[p.name] for p in kernel.params):
        return  # this call does not fit the plan's key: it stays on JITFunction.run
    compiled.run  # noqa: B018 - loads the binary (done by the launch above already)
    entries = plan.per_device.setdefault(device, {})
    if len(entries) >= MAX_ENTRIES:
        return
    entries[key] = (
        compiled.run, compiled.function, compiled.packed_metadata, compiled)


def clear() -> None:
    """Forget every cached kernel and zero the counters (tests)."""
    while _kernels:
        _kernels.pop().__dict__.pop(_ATTR, None)
    stats["hits"] = stats["misses"] = 0
