"""Loading the compiled extension fastres._C without ever crashing the package import.

What the extension reports about itself is read once, at load time, into plain Python values, so
that code traced by torch.compile (the dispatcher) never calls into the pybind11 module.
"""

from __future__ import annotations

from fastres import _opset as opset

REBUILD = "pip install --no-build-isolation ."

_loaded = False
_module: object | None = None
_reason: str | None = None
_info: dict = {}


def load() -> tuple[object | None, str | None]:
    """(module, None) when fastres._C imports, else (None, the reason with the rebuild command)."""
    global _loaded, _module, _reason, _info
    if _loaded:
        return _module, _reason
    _loaded = True
    opset.define("fastres")  # the schemas; fastres._C registers its kernels for them
    try:
        from fastres import _C  # noqa: PLC0415  (loading it registers torch.ops.fastres.*)
    except ImportError as exc:
        _reason = f"fastres._C is not built or does not load ({exc}); rebuild with: {REBUILD}"
        return None, _reason
    from fastres.backends import fakes  # noqa: PLC0415  (fake kernels for the compiled ops)

    fakes.register_fakes("fastres")
    _module, _info = _C, dict(_C.build_info())
    return _module, None


def has_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels."""
    load()
    return bool(_info.get("cuda", False))


def build_info() -> dict:
    mod, why = load()
    if mod is None:
        return {"built": False, "reason": why}
    return {"built": True, **_info}


_sim_loaded = False
_sim_reason: str | None = None


def load_cudasim() -> str | None:
    """Load fastres._C_cudasim (registers torch.ops.fastres_cudasim.*, the CUDA backend's launchers
    and kernels on CPU tensors, and their fakes); None when loaded, else why not."""
    global _sim_loaded, _sim_reason
    if _sim_loaded:
        return _sim_reason
    _sim_loaded = True
    opset.define("fastres_cudasim")
    try:
        from fastres import _C_cudasim  # noqa: F401,PLC0415
    except ImportError as exc:
        _sim_reason = (
            f"fastres._C_cudasim is not built or does not load ({exc}); it needs only the host "
            f"C++ compiler on Linux (FASTRES_CUDASIM=1 makes the build fail loudly otherwise); "
            f"rebuild with: {REBUILD}"
        )
        return _sim_reason
    from fastres.backends import fakes  # noqa: PLC0415

    fakes.register_fakes("fastres_cudasim")
    return None
