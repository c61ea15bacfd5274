"""Loading the compiled extension fastres._C without ever crashing the package import."""

from __future__ import annotations

import functools

REBUILD = "pip install --no-build-isolation ."


@functools.cache
def load() -> tuple[object | None, str | None]:
    """(module, None) when fastres._C imports, else (None, the reason with the rebuild command)."""
    try:
        from fastres import _C  # noqa: PLC0415  (loading it registers torch.ops.fastres.*)
    except ImportError as exc:
        return None, f"fastres._C is not built or does not load ({exc}); rebuild with: {REBUILD}"
    from fastres import _meta  # noqa: F401,PLC0415  (fake kernels for the compiled ops)

    return _C, None


def build_info() -> dict:
    mod, why = load()
    if mod is None:
        return {"built": False, "reason": why}
    return {"built": True, **mod.build_info()}
