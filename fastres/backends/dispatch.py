"""Choosing a backend for an op call.

Four backends implement the op set of ``fastres/_opset.py``:

* ``cuda``      the CUDA C++ kernels of fastres._C (``torch.ops.fastres.*`` on CUDA tensors);
* ``triton``    the Triton kernels of fastres.triton_kernels (``torch.ops.fastres_triton.*``);
* ``cpu``       the C++ CPU kernels of fastres._C (``torch.ops.fastres.*`` on CPU tensors);
* ``reference`` fastres.reference, plain PyTorch, any device;
* ``cudasim``   the CUDA backend's launchers and kernels run on CPU tensors by cudasim
                (``torch.ops.fastres_cudasim.*``, fastres._C_cudasim): a check, only when forced.

Each states what it cannot serve through ``not_supported_reasons(inputs)``. The dispatcher walks
the priority list and takes the first backend with no reasons. ``FASTRES_BACKEND=cuda|triton|cpu|
reference`` forces one: a forced backend that cannot serve raises with its reasons; an automatic
choice that passes over a backend says why once (logging, logger ``fastres``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from fastres import reference
from fastres._specs import Inputs
from fastres.backends import extension, records

log = logging.getLogger("fastres")

OP_NAMES = reference.OP_NAMES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend:
    name: str = "?"
    #: Has this backend passed the GPU parity tests on a real GPU (bench/results/)? Unverified GPU
    #: backends are never chosen automatically; FASTRES_BACKEND=<name> still forces them.
    verified_on_gpu: bool = True

    def requires_verification(self, device_type: str) -> bool:
        """Whether the dispatcher may choose this backend on ``device_type`` only once it is
        verified: by the project (``verified_on_gpu``) or by a self-test record of this very
        device and software (fastres.backends.records). CPU backends need neither."""
        return device_type == "cuda"

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all on this installation, or None. Probed once per
        process, outside any torch.compile trace (see _probe)."""
        return _probe(self.name)

    def _unavailable_reason(self) -> str | None:
        """The probe itself (may import modules, load the extension, read package metadata)."""
        return None

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Every reason this backend cannot serve ``inputs``; empty when it can."""
        why = self.unavailable_reason()
        return [why] if why else []

    def op(self, name: str) -> Callable[..., object]:
        """One op of the set (a name in OP_NAMES), signature as in fastres/_opset.py. Plain
        attribute look-ups only, so torch.compile traces through it."""
        raise NotImplementedError

    def eager_block(self):
        """(block_spec, block_eval, grad_node) of a compiled module that runs a whole residual
        block's eval convolutions from C++ in one call (csrc/cuda/block_py.h) and records such a
        call in the autograd graph (csrc/grad_node.h; None without the extension: grad-enabled
        calls then run per convolution), or None. For eager calls under no dispatch mode: it
        bypasses the dispatcher."""
        return None

    def eager_folded_block(self):
        """(cpu_block_spec, cpu_block_eval) of a compiled module that runs a residual block's
        eval call with folded BatchNorms from C++ in one call, the folds' check included
        (csrc/cpu/block_cpu_py.h), or None. For eager calls under no dispatch mode."""
        return None

    def eager_unit(self):
        """(unit_spec, unit_forward, unit_backward, grad_node) of a compiled module that runs a
        training unit's forward and backward from C++ (csrc/cuda/unit.h) and records the unit in
        the autograd graph (csrc/grad_node.h), or None. For eager calls under
        no dispatch mode: it bypasses the dispatcher."""
        return None


class ReferenceBackend(Backend):
    name = "reference"

    def requires_verification(self, device_type: str) -> bool:
        return False  # the yardstick itself: plain PyTorch

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        if inputs.dtype not in FLOAT_DTYPES + (torch.float64,):
            return [f"dtype {inputs.dtype} is not a floating dtype"]
        return []

    def op(self, name: str) -> Callable[..., object]:
        return getattr(reference, name)


class _CompiledBackend(Backend):
    device_type = "cpu"
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES

    def _unavailable_reason(self) -> str | None:
        mod, why = extension.load()
        return why

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type != self.device_type:
            reasons.append(f"{self.name} runs on {self.device_type} tensors, got {inputs.device}")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"{self.name} does not support dtype {inputs.dtype}")
        return reasons

    def op(self, name: str) -> Callable[..., object]:
        return getattr(torch.ops.fastres, name)


class CPUBackend(_CompiledBackend):
    """The C++ CPU kernels: convolution through ATen/oneDNN, the fusions as single passes."""

    name = "cpu"
    device_type = "cpu"
    dtypes = FLOAT_DTYPES + (torch.float64,)

    def eager_folded_block(self):
        return _entry(extension.load()[0], "cpu_block_spec", "cpu_block_eval")

    def eager_unit(self):
        return _entry(extension.load()[0], "cpu_unit_spec", "cpu_unit_forward",
                      "cpu_unit_backward", "grad_node")


class CUDABackend(_CompiledBackend):
    """The CUDA C++ kernels of fastres._C."""

    name = "cuda"
    device_type = "cuda"
    verified_on_gpu = False  # until a GPU run passes: python -m fastres.selftest on the device

    def _unavailable_reason(self) -> str | None:
        why = super()._unavailable_reason()
        if why:
            return why
        if not extension.has_cuda():
            return "fastres._C was built without CUDA (rebuild with FASTRES_CUDA=1 on a CUDA torch)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if reasons:
            return reasons
        if inputs.groups != 1:
            reasons.append(f"cuda kernels support groups=1 only, got groups={inputs.groups}")
        if inputs.dilation != (1, 1):
            reasons.append(f"cuda kernels support dilation 1 only, got {inputs.dilation}")
        if inputs.kernel_size not in ((1, 1), (3, 3), (7, 7)):
            reasons.append(f"cuda kernels support 1x1, 3x3 and 7x7, got {inputs.kernel_size}")
        return reasons

    def eager_block(self):
        return _entry(extension.load()[0], "block_spec", "block_eval", "grad_node")

    def eager_unit(self):
        return _entry(extension.load()[0], "unit_spec", "unit_forward", "unit_backward",
                      "grad_node")


def _entry(module, *names):
    fns = tuple(getattr(module, n, None) for n in names)
    return None if any(f is None for f in fns) else fns


class CudasimBackend(CUDABackend):
    """The CUDA backend's own launchers and kernels (csrc/cuda) executed on CPU tensors by cudasim
    (csrc/cuda/cudasim: every CUDA thread a fiber, warp instructions from the PTX fragment
    layouts), as torch.ops.fastres_cudasim.*: a correctness check of the CUDA code without a GPU,
    far slower than the cpu backend. Never chosen automatically (not in PRIORITY);
    FASTRES_BACKEND=cudasim forces it."""

    name = "cudasim"
    device_type = "cpu"
    verified_on_gpu = False  # a CPU harness: not CUDA's GPU record

    def _unavailable_reason(self) -> str | None:
        return extension.load_cudasim()

    def op(self, name: str) -> Callable[..., object]:
        return getattr(torch.ops.fastres_cudasim, name)

    def eager_block(self):
        if extension.load_cudasim() is not None:
            return None
        from fastres import _C_cudasim  # noqa: PLC0415  (loaded: load_cudasim imported it)

        return _entry(_C_cudasim, "block_spec", "block_eval", "grad_node")

    def eager_unit(self):
        if extension.load_cudasim() is not None:
            return None
        from fastres import _C_cudasim  # noqa: PLC0415

        return _entry(_C_cudasim, "unit_spec", "unit_forward", "unit_backward", "grad_node")


class TritonBackend(Backend):
    """The Triton kernels of fastres.triton_kernels (on CPU tensors only under TRITON_INTERPRET=1,
    and then only when forced: the interpreter is thousands of times slower than eager)."""

    name = "triton"
    verified_on_gpu = False  # until a GPU run passes: python -m fastres.selftest on the device

    def _unavailable_reason(self) -> str | None:
        try:
            from fastres import triton_kernels  # noqa: PLC0415
        except ImportError as exc:  # triton missing or too old
            return f"fastres.triton_kernels does not import: {exc}"
        probe = getattr(triton_kernels, "unavailable_reason", None)
        if probe is None:
            return "fastres.triton_kernels has no kernels in this build"
        return probe()

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        why = self.unavailable_reason()
        if why:
            return [why]
        from fastres import triton_kernels  # noqa: PLC0415

        return triton_kernels.not_supported_reasons(inputs)

    def op(self, name: str) -> Callable[..., object]:
        # Importing fastres.triton_kernels registers torch.ops.fastres_triton.* (select() did).
        # In eager, under no dispatch mode, the op's body itself: the torch.ops dispatch of a
        # triton_op costs 10-15 µs per call in eager; traced calls keep the registered op.
        if not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack():
            eager = _triton_eager()
            if eager is not None:
                return getattr(eager, name)
        return getattr(torch.ops.fastres_triton, name)

    def eager_block(self):
        # A block's eval convolutions as one launch plan (fastres/triton_kernels/block.py).
        from fastres import triton_kernels  # noqa: PLC0415

        make = getattr(triton_kernels, "eager_block", None)
        if make is None:
            return None
        entry = make()
        _triton_pointer_reader()
        # grad-enabled calls recorded by the extension's grad_node (csrc/grad_node.h)
        return (*entry, getattr(extension.load()[0], "grad_node", None))

    def eager_unit(self):
        # A training unit's forward and backward as launch plans (triton_kernels/unit.py),
        # recorded in the autograd graph by the extension's grad_node (csrc/grad_node.h).
        from fastres import triton_kernels  # noqa: PLC0415

        make = getattr(triton_kernels, "eager_unit", None)
        node = getattr(extension.load()[0], "grad_node", None)
        if make is None or node is None:
            return None
        entry = make()
        _triton_pointer_reader()
        return (*entry, node)


def _triton_pointer_reader() -> None:
    """The Triton launch plans read their tensors' data pointers and their inputs' signatures
    with the extension's tensor_ptrs and tensor_key, and the replays make their pooled outputs
    with its tensors_in (csrc/host_path.h), where it has them."""
    mod = extension.load()[0]
    ptrs, key = getattr(mod, "tensor_ptrs", None), getattr(mod, "tensor_key", None)
    if ptrs is not None and key is not None:
        from fastres.triton_kernels import block  # noqa: PLC0415

        if block._pointers is not ptrs:
            block.use_host_readers(ptrs, key)
    carve = getattr(mod, "tensors_in", None)
    if carve is not None:
        from fastres.triton_kernels import _replay  # noqa: PLC0415

        if _replay._tensors_in is not carve:
            _replay.use_tensors_in(carve)


_TRITON_EAGER: list = []


def _triton_eager():
    """fastres.triton_kernels.eager_ops(), made once (None where that build has none)."""
    if not _TRITON_EAGER:
        from fastres import triton_kernels  # noqa: PLC0415

        make = getattr(triton_kernels, "eager_ops", None)
        _TRITON_EAGER.append(make() if make is not None else None)
    return _TRITON_EAGER[0]


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (CUDABackend(), TritonBackend(), CPUBackend(), ReferenceBackend(), CudasimBackend())
}
PRIORITY = ("cuda", "triton", "cpu", "reference")  # cudasim: only when forced

_probed: dict[str, str | None] = {}


@torch._dynamo.assume_constant_result
def _probe(name: str) -> str | None:
    """BACKENDS[name]._unavailable_reason(), once per process. Marked a constant for Dynamo: the
    first call of a model may come from inside torch.compile, and the probes (importing
    fastres._C or triton, reading package versions) cannot be traced (fullgraph would fail)."""
    if name not in _probed:
        _probed[name] = BACKENDS[name]._unavailable_reason()
    return _probed[name]


_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


def forced() -> str | None:
    """The backend named by FASTRES_BACKEND, or None."""
    name = os.environ.get("FASTRES_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTRES_BACKEND={name!r}: choose one of {', '.join(BACKENDS)} or auto")
    return name


def select(inputs: Inputs, backend: str | None = None) -> Backend:
    """The backend that serves ``inputs``: ``backend`` or FASTRES_BACKEND if set, else the first
    backend of PRIORITY with no reasons against it."""
    name = backend or forced()
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(
                f"unknown fastres backend {name!r}: choose one of {', '.join(BACKENDS)}"
            )
        b = BACKENDS[name]
        reasons = b.not_supported_reasons(inputs)
        if reasons:
            raise RuntimeError(
                f"fastres backend {name!r} cannot serve {inputs}: " + "; ".join(reasons)
            )
        return b
    passed: list[str] = []
    dev = str(inputs.device)
    for name in _order(inputs):
        b = BACKENDS[name]
        if name == "triton" and inputs.device.type != "cuda":
            continue
        if b.requires_verification(inputs.device.type):
            seen = records.verdict(name, dev)
            if seen == "fail" or (not b.verified_on_gpu and seen != "pass"):
                if b.unavailable_reason() is None:
                    passed.append(
                        f"{name}: failed python -m fastres.selftest on this device"
                        if seen == "fail"
                        else f"{name}: not yet verified on this GPU (run python -m "
                        f"fastres.selftest once, or force it with FASTRES_BACKEND={name})"
                    )
                continue
        reasons = b.not_supported_reasons(inputs)
        if not reasons:
            if passed:
                _say_once(f"fastres: {inputs} runs on the {name} backend: " + " | ".join(passed))
            return b
        # A backend that cannot serve this device at all is no news; one that could is.
        if not any(r.startswith(f"{name} runs on") for r in reasons):
            passed.append(f"{name}: " + "; ".join(reasons))
    raise RuntimeError(f"no fastres backend serves {inputs}: " + " | ".join(passed))


def _order(inputs: Inputs) -> list[str]:
    """PRIORITY, except where this device's self-test timed the shape class of ``inputs``
    (python -m fastres.selftest --bench): then the verified backends faster than the reference
    path, fastest first, then reference, then the rest (fastres.backends.records.preference)."""
    pref = records.preference(str(inputs.device), records.class_of(inputs))
    if not pref:
        return list(PRIORITY)
    first = [n for n in pref.split(",") if n in PRIORITY]
    return first + [n for n in PRIORITY if n not in first]


def available() -> dict[str, str | None]:
    """Each backend's name and why it is unavailable (None when it is available)."""
    return {n: BACKENDS[n].unavailable_reason() for n in BACKENDS}


def op(backend: str, name: str) -> Callable[..., object]:
    """``BACKENDS[backend].op(name)``."""
    return BACKENDS[backend].op(name)
