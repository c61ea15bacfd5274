"""The CPU inference engines a user would pick instead of fastres, as benchmark providers.

Each provider turns the same torchvision module (eval, randomised BatchNorms) into a callable
``run(x) -> Tensor`` that takes the input in the layout the engine wants (prepared once, outside
the timed call, by ``prepare``) and returns the output as a torch tensor:

* ``eager``               torchvision as is (channels_last unless --bench-contiguous)
* ``compile``             ``torch.compile`` default mode
* ``compile-freezing``    ``torch.compile`` with Inductor's ``freezing=True`` (weights become
                          constants: oneDNN weight prepacking, conv + BN folding)
* ``fastres-cpu``         ``fastres.convert`` on the C++ CPU backend
* ``fastres-cpu+compile`` ``torch.compile`` of the converted model (issue 15, item 3)
* ``fastres-cpu-frozen``  ``fastres.convert(..., freeze=True)``: weights taken as constant, as
                          the peers below and Inductor's freezing take them (no per-call read
                          of their values)
* ``openvino``            ``openvino.convert_model`` + ``compile_model(..., "CPU")``
* ``onnxruntime``         ``torch.onnx.export`` + an ORT session on the CPU execution provider

The peers are optional (``pip install .[bench]``); a missing one skips with its reason.
Every engine runs with the same thread count (``THREADS``, default 2: this machine's cores).
bf16: eager, compile and fastres run a bf16 model on bf16 input; OpenVINO runs the fp32 graph
with ``INFERENCE_PRECISION_HINT=bf16`` (its documented way: it converts weights and activations
itself, fp32 in and out); ONNX Runtime's CPU execution provider has no bf16 convolution kernel,
so that cell is skipped with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

PEER_PROVIDERS = ["eager", "compile", "compile-freezing", "fastres-cpu", "fastres-cpu+compile",
                  "fastres-cpu-frozen", "openvino", "onnxruntime"]
FASTRES_PROVIDERS = ("fastres-cpu", "fastres-cpu+compile", "fastres-cpu-frozen")


def threads() -> int:
    """One thread count for every engine: FASTRES_BENCH_THREADS, else torch's own setting."""
    v = os.environ.get("FASTRES_BENCH_THREADS", "").strip()
    return int(v) if v else torch.get_num_threads()


def skip_reason(provider: str, dtype: torch.dtype) -> str | None:
    """Why ``provider`` cannot run here at ``dtype``, or None."""
    if provider == "openvino" and importlib.util.find_spec("openvino") is None:
        return "openvino: not installed (pip install .[bench])"
    if provider == "onnxruntime":
        for mod in ("onnxruntime", "onnx", "onnxscript"):
            if importlib.util.find_spec(mod) is None:
                return f"onnxruntime: {mod} not installed (pip install .[bench])"
        if dtype == torch.bfloat16:
            # Checked with onnxruntime 1.32.0 and torch 2.14's exporter: a bf16 Conv2d exports,
            # and loading it fails with INVALID_GRAPH "Type 'tensor(bfloat16)' of input
            # parameter (input) of operator (Conv) in node (node_conv2d) is invalid".
            return ("onnxruntime: ONNX Runtime does not accept a bfloat16 Conv (INVALID_GRAPH: "
                    "tensor(bfloat16) is not a valid Conv input type); its CPU execution "
                    "provider has no bf16 convolution")
    if provider.startswith("fastres-"):
        from fastres import backends

        why = backends.available()["cpu"]
        if why is not None:
            return f"{provider}: {why}"
    return None


def _ov_precision(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


class Engine:
    """A provider's compiled model: ``prepare(x)`` once per input (untimed), ``run(p)`` timed."""

    def __init__(self, run: Callable[[object], Tensor], prepare: Callable[[Tensor], object],
                 info: dict | None = None):
        self.run = run
        self.prepare = prepare
        self.info = info or {}


def build(provider: str, eager: nn.Module, x: Tensor, dtype: torch.dtype,
          channels_last: bool) -> Engine:
    """The engine of ``provider`` for ``eager`` (an eval module at ``dtype``); ``x`` is an
    example input at ``dtype`` with the benchmark's shape."""
    torch.set_num_threads(threads())
    if provider == "eager":
        return Engine(eager, lambda t: t)
    if provider in ("compile", "compile-freezing"):
        # dynamic=False: each batch size gets its own static graph, as a user who compiles for
        # one batch would; automatic-dynamic would turn the second batch size into a symbolic one.
        opts = {"freezing": True} if provider == "compile-freezing" else None
        return Engine(torch.compile(copy.deepcopy(eager), options=opts, dynamic=False),
                      lambda t: t)
    if provider in FASTRES_PROVIDERS:
        import fastres

        m = fastres.convert(copy.deepcopy(eager), freeze=provider.endswith("-frozen"))
        if provider.endswith("+compile"):
            m = torch.compile(m, dynamic=False)
        return Engine(m, lambda t: t)
    # The peers take fp32 NCHW-contiguous input: their graphs are NCHW, and a bf16 OpenVINO
    # model is the fp32 graph run under a bf16 precision hint.
    ref32 = copy.deepcopy(eager).float().to(memory_format=torch.contiguous_format)
    x32 = x.float().contiguous()

    def as_numpy(t: Tensor):
        return t.float().contiguous().numpy()

    if provider == "openvino":
        import openvino as ov

        with torch.no_grad():
            ov_model = ov.convert_model(ref32, example_input=x32)
        core = ov.Core()
        cfg = {"INFERENCE_NUM_THREADS": threads(),
               "INFERENCE_PRECISION_HINT": _ov_precision(dtype),
               "PERFORMANCE_HINT": "LATENCY"}
        cm = core.compile_model(ov_model, "CPU", cfg)
        req = cm.create_infer_request()
        got_prec = str(cm.get_property("INFERENCE_PRECISION_HINT"))

        def run(a):
            req.infer([a])
            return torch.from_numpy(req.get_output_tensor(0).data)

        eng = Engine(run, as_numpy, {"ov_inference_precision": got_prec,
                                     "ov_version": ov.get_version()})
        eng.compiled_model = cm  # for exec-graph inspection (docs/performance.md)
        return eng
    if provider == "onnxruntime":
        import onnxruntime as ort

        tmp = Path(tempfile.mkdtemp(prefix="fastres-ort-"))
        path = tmp / "model.onnx"
        with torch.no_grad():
            # torch 2.14's default exporter (dynamo=True, needs onnxscript); offline-safe.
            torch.onnx.export(ref32, (x32,), str(path), dynamo=True, external_data=False,
                              verbose=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run(a):
            return torch.from_numpy(sess.run(None, {name: a})[0])

        eng = Engine(run, as_numpy, {"ort_version": ort.__version__})
        eng.model_path = str(path)  # for per-node profiling (bench/cpu_profile.py); not a result
        return eng
    raise ValueError(f"unknown provider {provider!r}")
