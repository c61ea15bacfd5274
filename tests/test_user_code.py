"""What users do around a converted model: hooks inside fused blocks, torch.fx and torchvision's
feature extraction, torch.jit.trace / script, ONNX export. Each gives torchvision's numbers (the
blocks involved run their plain forward, op by op) or, for torch.jit.script, one clear error."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fastres
from fastres.harness.rule import randomise_bn


def _pair(num_classes: int = 10):
    tv = randomise_bn(torchvision.models.resnet18(num_classes=num_classes)).eval()
    return tv, fastres.convert(copy.deepcopy(tv)).eval()


def _record(model: nn.Module, names: list[str], kind: str):
    """Hooks on ``names`` appending (name, what they saw) to a list; returns (list, handles)."""
    seen, handles = [], []
    mods = dict(model.named_modules())
    for name in names:
        m = mods[name]
        if kind == "forward":
            h = m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, inp[0].clone(), out.clone()))
            )
        else:
            h = m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name, inp[0].clone(), None))
            )
        handles.append(h)
    return seen, handles


HOOKED = ["conv1", "bn1", "layer1.0.relu", "layer2.0.conv1", "layer2.0.downsample.0",
          "layer3.1.bn2", "layer4.1.conv2"]


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_hooks_inside_fused_blocks_fire_as_in_torchvision(kind, grad):
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        ours(x)  # plans made before the hooks exist
        seen_tv, _ = _record(tv, HOOKED, kind)
        seen_ours, handles = _record(ours, HOOKED, kind)
        out_tv, out_ours = tv(x), ours(x)
    assert [n for n, _, _ in seen_ours] == [n for n, _, _ in seen_tv]
    for (name, i_o, o_o), (_, i_t, o_t) in zip(seen_ours, seen_tv, strict=True):
        torch.testing.assert_close(i_o, i_t, rtol=1e-4, atol=1e-4, msg=name)
        if o_o is not None:
            torch.testing.assert_close(o_o, o_t, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(out_ours, out_tv, rtol=1e-4, atol=1e-4)
    for h in handles:
        h.remove()


def test_blocks_run_fused_again_once_the_hooks_are_gone(monkeypatch):
    """A hook makes only its own block run unfused, and only while it exists."""
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    conv_forward = nn.Conv2d.forward

    def counting(self, inp):
        calls.append(self)
        return conv_forward(self, inp)

    monkeypatch.setattr(nn.Conv2d, "forward", counting)
    with torch.no_grad():
        ours(x)
        assert calls == []  # every block and the stem fused
        h = ours.layer3[0].conv2.register_forward_hook(lambda *a: None)
        ours(x)
        block = ours.layer3[0]
        assert set(calls) == {block.conv1, block.conv2, block.downsample[0]}
        h.remove()
        calls.clear()
        ours(x)
        assert calls == []


def test_convert_reports_modules_that_run_unfused_while_hooked():
    tv = torchvision.models.resnet18(num_classes=10)
    tv.layer2[0].conv1.register_forward_hook(lambda *a: None)
    tv.bn1.register_forward_pre_hook(lambda *a: None)
    _, rep = fastres.convert(tv, report=True)
    assert rep.hooked == [("", ["bn1"]), ("layer2.0", ["conv1"])]
    assert "runs unfused while hooks exist on conv1: layer2.0" in str(rep)
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        _, rep = fastres.convert(torchvision.models.resnet18(), report=True)
    finally:
        h.remove()
    assert rep.global_hook and "global module hook" in str(rep)


def test_global_module_hooks_see_every_module_call():
    tv, ours = _pair()
    x = torch.randn(1, 3, 32, 32)
    for model in (tv, ours):
        model(x)
    seen: dict[str, list[str]] = {"tv": [], "ours": []}
    for who, model in (("tv", tv), ("ours", ours)):
        names = {m: n for n, m in model.named_modules()}
        h = nn.modules.module.register_module_forward_hook(
            lambda m, i, o, who=who, names=names: seen[who].append(names.get(m, "?"))
        )
        try:
            with torch.no_grad():
                model(x)
        finally:
            h.remove()
    assert seen["ours"] == seen["tv"]


def test_backward_hook_inside_a_fused_block_fires_in_training():
    # float64: a ResNet-18's training gradients at float32 and this size are dominated by
    # rounding (BatchNorm over 2 values per channel in layer4), for torchvision too.
    tv, ours = _pair()
    tv, ours = tv.double(), ours.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (tv, ours):
        model.train()
    grads = {}
    for who, model in (("tv", tv), ("ours", ours)):
        model.layer2[1].conv1.register_full_backward_hook(
            lambda m, gi, go, who=who: grads.__setitem__(who, go[0].clone())
        )
        model(x).sum().backward()
    torch.testing.assert_close(grads["ours"], grads["tv"])


def test_conv_bn_relu_inner_hook():
    tv = randomise_bn(nn.Sequential(torchvision.ops.Conv2dNormActivation(8, 16))).eval()
    ours = fastres.convert(copy.deepcopy(tv)).eval()
    assert type(ours[0]) is fastres.ConvBNReLU
    seen = []
    ours[0][1].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, tv(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seen[0], tv[0][1](tv[0][0](x)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- tracing


def test_fx_symbolic_trace_and_feature_extraction():
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(ours)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tv(x), rtol=1e-4, atol=1e-4)
    nodes = {"layer3": "layer3", "layer2.0.conv1": "inner", "layer4.1.relu_1": "last_relu"}
    fe_tv = create_feature_extractor(tv, nodes)
    fe_ours = create_feature_extractor(ours, nodes)
    with torch.no_grad():
        got, want = fe_ours(x), fe_tv(x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)


def test_fx_symbolic_trace_timm_resnet():
    timm = pytest.importorskip("timm")
    tv = randomise_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()
    ours = fastres.convert(copy.deepcopy(tv)).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(ours)
    fe = create_feature_extractor(ours, {"layer3": "feat"})
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tv(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fe(x)["feat"], tv.layer3(tv.layer2(tv.layer1(
            tv.maxpool(tv.act1(tv.bn1(tv.conv1(x))))))), rtol=1e-4, atol=1e-4)


def test_jit_trace():
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(ours, x)  # its own check_trace re-runs and compares
        torch.testing.assert_close(traced(x), tv(x), rtol=1e-4, atol=1e-4)
        x2 = torch.randn(3, 3, 40, 40)
        torch.testing.assert_close(traced(x2), tv(x2), rtol=1e-4, atol=1e-4)


def test_jit_script_raises_one_clear_error():
    _, ours = _pair()
    with pytest.raises(RuntimeError, match=r"fastres\.revert"):
        torch.jit.script(ours)
    # Nothing of the model was swapped by the failed attempt.
    assert type(ours.layer1[0]) is fastres.BasicBlock


def test_onnx_export_gives_standard_operators_and_torchvision_numbers(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "resnet18.onnx"
    with torch.no_grad():
        torch.onnx.export(ours, (x,), str(path), dynamo=True, external_data=False)
        want = tv(x)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "Relu" in ops and "Add" in ops, ops
    standard = {"Conv", "Relu", "Add", "BatchNormalization", "MaxPool", "GlobalAveragePool",
                "AveragePool", "ReduceMean", "Flatten", "Gemm", "Reshape", "MatMul", "Constant",
                "Identity"}
    assert ops <= standard, ops - standard
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- mistakes


def _mistakes():
    block = lambda: torchvision.models.resnet.BasicBlock(8, 8)  # noqa: E731
    x = torch.randn(2, 8, 6, 6)

    def bn_double(m):
        m.bn1.running_var.data = m.bn1.running_var.data.double()
        return m

    return {
        "3-D input": (block, lambda m: m, x[0]),
        "channels": (block, lambda m: m, torch.randn(2, 6, 6, 6)),
        "float64 input": (block, lambda m: m, x.double()),
        "int input": (block, lambda m: m, x.to(torch.int64)),
        "bf16 input": (block, lambda m: m, x.bfloat16()),
        "BN buffer dtype": (block, bn_double, x),
    }


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(_mistakes()))
def test_mistakes_raise_what_torchvision_raises(case, train):
    """The exception is an instance of the type torchvision raises for the same mistake (code
    that catches RuntimeError around a model keeps working), and an int input's hint does not
    suggest converting the module to an integer dtype."""
    make, spoil, x = _mistakes()[case]
    tv = spoil(make()).train(train)
    ours = fastres.convert(copy.deepcopy(tv)).train(train)
    with pytest.raises(Exception) as theirs:
        tv(x)
    with pytest.raises(Exception) as got:
        ours(x)
    assert isinstance(got.value, type(theirs.value)), (type(got.value), type(theirs.value))
    assert ".to(torch.int64)" not in str(got.value)
