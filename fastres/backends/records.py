"""What passed where: the self-test's records, and what the dispatcher reads from them.

``python -m fastres.selftest`` writes one record per run: the device and the software it ran on
(:func:`device_key`), each backend's verdict, the kernel variants it launched and, with
``--bench``, each backend's time against the reference path per shape class, in a named timing
kind (``bench["kind"]``, fastres.harness.timer): the dispatcher ranks only on kernel time
(``device``: the profiler's kernel time per call) or CUDA-graph replay time (``graph``), never on a
host-bound wall time (:data:`RANKABLE_KINDS`); a bench in another kind, or naming none, is kept
for people and ranks nothing. A record also names the commit it was measured at
(``FASTRES_COMMIT``, set by the project's scripts) beside its key's GPU, driver, torch and triton.
A record counts
only for its exact key: another GPU, driver, CUDA, torch, triton or fastres version, or one byte
changed in a compiled kernel (``fastres/_C*.so``) or a Triton source, and it is ignored.

Records live in the user's cache, ``~/.cache/fastres/selftest/*.json`` (``FASTRES_CACHE_DIR``
replaces ``~/.cache/fastres``), where every run stores its record; nothing else is read (the
project's own GPU runs are kept in ``bench/results/`` of the source tree for people, not for the
dispatcher).

Among the records matching this device the newest wins. The dispatcher (fastres.backends.dispatch)
asks two questions, each answered once per process and device, outside any torch.compile trace
(:func:`verdict`, :func:`preference`, like ``backends._probe``): did this backend pass here, and
which backends are fastest for this shape class, never one slower than the reference path.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
from pathlib import Path

import torch

FORMAT = "fastres-selftest/1"
#: The timing kinds a ranking may rest on: kernel time and graph-replay time.
RANKABLE_KINDS = ("device", "graph")
_PKG = Path(__file__).resolve().parent.parent  # the fastres package: its _C*.so


# --------------------------------------------------------------------------------------------
# The key: device and software.


def cache_dir() -> Path:
    """``FASTRES_CACHE_DIR`` or ``~/.cache/fastres`` (``$XDG_CACHE_HOME/fastres`` when set)."""
    env = os.environ.get("FASTRES_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastres"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def kernel_hashes() -> dict[str, str]:
    """sha256 of each compiled extension (fastres/_C*.so: the CPU and CUDA kernels, cudasim's)
    and of the Triton kernels' sources (one hash over fastres.triton_kernels' *.py, sorted)."""
    out = {}
    for so in sorted(_PKG.glob("_C*.so")) + sorted(_PKG.glob("_C*.pyd")):
        out[so.name.split(".")[0]] = _sha256_file(so)
    spec = importlib.util.find_spec("fastres.triton_kernels")
    locs = list(spec.submodule_search_locations or []) if spec else []
    if locs:
        h = hashlib.sha256()
        for src in sorted(Path(locs[0]).glob("*.py")):
            h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
        out["triton_kernels"] = h.hexdigest()
    return out


def _dist_version(name: str) -> str | None:
    for dist in (name, f"pytorch-{name}"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _driver_version() -> str | None:
    fn = getattr(torch._C, "_cuda_getDriverVersion", None)
    if fn is None:
        return None
    try:
        v = int(fn())  # e.g. 12080 for CUDA 12.8 capable drivers
    except (RuntimeError, TypeError, ValueError):
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=16)
def device_key(device: str) -> dict:
    """The key a record must match exactly to count on ``device`` ("cpu", "cuda", "cuda:1")."""
    from fastres._version import __version__  # noqa: PLC0415

    dev = torch.device(device)
    key = {"device": dev.type}
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        key.update(name=torch.cuda.get_device_name(idx), capability=f"{cap[0]}.{cap[1]}",
                   driver=_driver_version(), cuda=torch.version.cuda)
    else:
        key.update(name=cpu_model(), capability=None, driver=None, cuda=None,
                   machine=platform.machine())
    key.update(torch=torch.__version__, triton=_dist_version("triton"),
               fastres=__version__, kernels=kernel_hashes())
    return key


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def stale_fields(record: dict, key: dict) -> list[str]:
    """The key fields in which ``record`` differs from ``key`` (empty: it counts here)."""
    if record.get("format") != FORMAT:
        return ["format"]
    rk = record.get("key") or {}
    return [f for f in sorted(set(rk) | set(key)) if rk.get(f) != key.get(f)]


# --------------------------------------------------------------------------------------------
# Records on disk.


def save(record: dict, path: str | os.PathLike | None = None) -> Path:
    """Write ``record`` to ``path``, or to the cache as selftest/<device>_<key id>.json."""
    if path is None:
        d = cache_dir() / "selftest"
        p = d / f"{record['key']['device']}_{key_id(record['key'])}.json"
        try:  # a run of some backends keeps the other backends' verdicts of the same key
            old = json.loads(p.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("key") == record["key"]:
            record = {**record,
                      "backends": {**old.get("backends", {}), **record["backends"]},
                      "coverage": {**old.get("coverage", {}), **record["coverage"]},
                      "bench": record["bench"] or old.get("bench", {})}
    else:
        p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(p)  # readers never see half a record
    reset()
    return p


def record_paths() -> list[Path]:
    return sorted((cache_dir() / "selftest").glob("*.json"))


def matching(device: str) -> list[tuple[Path, dict]]:
    """Every record that counts on ``device``, newest first."""
    key = device_key(device)
    out = []
    for p in record_paths():
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and not stale_fields(rec, key):
            out.append((p, rec))
    out.sort(key=lambda pr: pr[1].get("date", ""), reverse=True)
    return out


def new_record(device: str) -> dict:
    return {
        "format": FORMAT,
        "key": device_key(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("FASTRES_COMMIT", "").strip() or "unknown",
        "backends": {},
        "coverage": {},
        "bench": {},
    }


# --------------------------------------------------------------------------------------------
# Shape classes.

_CH_EDGES = (64, 256)  # ResNet widths: 64 (layer1/stem), 128-256, 512-2048
_N_EDGES = (8, 64)  # latency-bound inference, training batches, large batches


def _bucket(v: int | None, edges: tuple[int, ...], tag: str) -> str:
    if v is None:
        return f"{tag}*"
    for e in edges:
        if v <= e:
            return f"{tag}<={e}"
    return f"{tag}>{edges[-1]}"


def shape_class(kernel_size, stride, channels: int | None, dtype: torch.dtype,
                channels_last: bool, batch: int | None) -> str:
    """One shape class: kernel, stride, input-channel range, dtype, layout, batch range."""
    dt = str(dtype).replace("torch.", "")
    return (f"k{kernel_size[0]}x{kernel_size[1]} s{stride[0]} {_bucket(channels, _CH_EDGES, 'c')} "
            f"{dt} {'cl' if channels_last else 'nchw'} {_bucket(batch, _N_EDGES, 'n')}")


def class_of(inputs) -> str:
    """The shape class of a fastres.backends.Inputs."""
    return shape_class(inputs.kernel_size, inputs.stride, getattr(inputs, "channels", None),
                       inputs.dtype, inputs.channels_last, getattr(inputs, "batch", None))


def _wild(cls: str, which: tuple[str, ...]) -> str:
    parts = cls.split(" ")
    return " ".join(p[:1] + "*" if p[:1] in which and p[1:2] in "<>*" else p for p in parts)


def ranking(bench: dict) -> dict[str, list[str]]:
    """Per shape class (and the same class with batch, then also channels, any), the backends
    faster than the reference path, fastest first, then ``reference``. Wildcard classes rank by
    the geometric mean of the measured classes' speedups. A bench not timed in one of
    :data:`RANKABLE_KINDS` ranks nothing (empty)."""
    if bench.get("kind") not in RANKABLE_KINDS:
        return {}
    classes = bench.get("classes", {})
    speed: dict[str, dict[str, list[float]]] = {}
    for cls, entry in classes.items():
        for wild in (cls, _wild(cls, ("n",)), _wild(cls, ("n", "c"))):
            for name, b in entry.get("backends", {}).items():
                s = b.get("speedup")
                if s and s > 0:
                    speed.setdefault(wild, {}).setdefault(name, []).append(s)
    out = {}
    for cls, per in speed.items():
        gm = {n: math.exp(sum(map(math.log, xs)) / len(xs)) for n, xs in per.items()}
        # "Never slower than the reference path": speedup >= 1 or it ranks below reference.
        fast = sorted((n for n, s in gm.items() if s >= 1.0), key=lambda n: -gm[n])
        out[cls] = fast + ["reference"]
    return out


# --------------------------------------------------------------------------------------------
# What the dispatcher reads, once per process and device.

_state: dict[str, dict] = {}


def reset() -> None:
    """Forget what was read (after a new record is written, or in tests)."""
    _state.clear()
    device_key.cache_clear()
    kernel_hashes.cache_clear()


def _resolve(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def state(device: str) -> dict:
    """{"verdicts": {backend: "pass"|"fail"}, "by": {backend: record path}, "ranking": {class:
    [names]}, "wins": {backend: [classes]}} for ``device``, from the newest matching record per
    backend."""
    device = _resolve(device)
    if device in _state:
        return _state[device]
    st: dict = {"verdicts": {}, "by": {}, "ranking": {}, "ranking_by": None, "wins": {}}
    try:
        recs = matching(device)
    except Exception as exc:  # noqa: BLE001 - a broken cache must never break the dispatcher
        st["error"] = f"{type(exc).__name__}: {exc}"
        recs = []
    for path, rec in recs:  # newest first: the first record naming a backend decides for it
        for name, b in rec.get("backends", {}).items():
            if name not in st["verdicts"] and b.get("status") in ("pass", "fail"):
                st["verdicts"][name] = b["status"]
                st["by"][name] = str(path)
        if (st["ranking_by"] is None and rec.get("bench", {}).get("classes")
                and rec["bench"].get("kind") in RANKABLE_KINDS):
            st["ranking"] = ranking(rec["bench"])
            st["ranking_by"] = str(path)
    # Only verified backends may be preferred.
    for cls, names in st["ranking"].items():
        st["ranking"][cls] = [n for n in names
                              if n == "reference" or st["verdicts"].get(n) == "pass"]
        first = st["ranking"][cls][0]
        if "*" not in cls:
            st["wins"].setdefault(first, []).append(cls)
    _state[device] = st
    return st


@torch._dynamo.assume_constant_result
def verdict(name: str, device: str) -> str:
    """"pass", "fail" or "" (no record) for backend ``name`` on ``device``. A constant for Dynamo:
    reading files and hashing the kernels cannot be traced."""
    return state(device)["verdicts"].get(name, "")


@torch._dynamo.assume_constant_result
def preference(device: str, cls: str) -> str:
    """Comma-separated backends for shape class ``cls`` on ``device``, fastest first, the
    reference path after those faster than it; "" when nothing was measured for the class."""
    rk = state(device)["ranking"]
    for c in (cls, _wild(cls, ("n",)), _wild(cls, ("n", "c"))):
        if c in rk:
            return ",".join(rk[c])
    return ""
