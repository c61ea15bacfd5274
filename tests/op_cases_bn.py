"""The batch-norm family's cases of the op table (tests/op_cases.py assembles them): finalize
(running statistics, the count as a tensor), BN-add-ReLU (every residual form), ReLU-bias
backward, the BN backwards one-op and split (SyncBatchNorm's reduce and elemt passes)."""

from __future__ import annotations

import itertools

import torch
from op_cases import BF16, F16, F32, F64, LAYOUTS, OpCase
from op_check import Maker


def device_bn_cases():
    """test_ops_device's: C=24 at 2x7x5, identity, BN'd and option-A residuals, the backwards
    with and without out and a BN'd residual."""
    n, c, h, w = 2, 24, 7, 5

    def base(m):
        return m.act(n, c, h, w)

    def state(m):
        return m.vec(c), m.pos(c), torch.tensor(3, device=m.device)

    def finalize(m):
        x = base(m)
        return [((*m.sums(x), m.vec(c), m.vec(c), *state(m), n * h * w, 0.1, 1e-5), (4, 5, 6))]

    def finalize_count(m):
        x = base(m)
        cnt = torch.tensor([float(n * h * w)], dtype=m.acc, device=m.device)
        return [((*m.sums(x), cnt, m.vec(c), m.vec(c), *state(m), None, 1e-5), (5, 6, 7))]

    def add_relu(m):
        x, v = base(m), m.vec
        narrow = m.act(n, c // 2, 2 * h, 2 * w)[:, :, ::2, ::2]  # option A: a strided view
        return [((x, v(c), v(c), m.act(n, c, h, w), None, None, 0, True), ()),
                ((x, v(c), v(c), m.act(n, c, h, w), v(c), v(c), 0, True), ()),
                ((x, v(c), v(c), narrow, None, None, c // 4, True), ()),
                ((x, v(c), v(c), None, None, None, 0, False), ())]

    def relu_bias(m):
        return [((m.act(n, c, h, w), m.act(n, c, h, w)), ())]

    def bwd_args(m):
        x, go, out, rx = base(m), m.act(n, c, h, w), m.act(n, c, h, w), m.act(n, c, h, w)
        mean, invstd = m.stats(x)
        res = (rx, *m.stats(rx))
        return [(go, o, x, mean, invstd, r) for o in (out, None) for r in (res, (None,) * 3)]

    def add_relu_bwd(m):
        return [((go, o, x, mu, s, m.vec(c), *r, m.vec(c) if r[0] is not None else None), ())
                for go, o, x, mu, s, r in bwd_args(m)]

    def add_relu_bwd_reduce(m):
        return [((go, o, x, mu, s, *r), ()) for go, o, x, mu, s, r in bwd_args(m)]

    def add_relu_bwd_elemt(m):
        return [((go, o, x, mu, s, m.vec(c), m.vec(c), m.vec(c), *r,
                  *((m.vec(c), m.vec(c)) if r[0] is not None else (None, None))), ())
                for go, o, x, mu, s, r in bwd_args(m)]

    def relu_args(m):
        x, go = base(m), m.act(n, c, h, w)
        return go, x, *m.stats(x)

    def relu_bwd(m):
        go, x, mu, s = relu_args(m)
        # the BN weight of a model in dtype (bf16/fp16 training without autocast) is in dtype
        return [((go, x, mu, s, wt, m.vec(c), m.vec(c), relu), ())
                for relu in (True, False) for wt in (m.vec(c), m.vec(c).to(m.dtype))]

    def relu_bwd_reduce(m):
        go, x, mu, s = relu_args(m)
        return [((go, x, mu, s, m.vec(c), m.vec(c), relu), ()) for relu in (True, False)]

    def relu_bwd_elemt(m):
        go, x, mu, s = relu_args(m)
        return [((go, x, mu, s, None, m.vec(c), m.vec(c), relu, m.vec(c), m.vec(c)), ())
                for relu in (True, False)]

    fns = {"bn_finalize": finalize, "bn_finalize_count": finalize_count,
           "bn_add_relu": add_relu, "relu_bias_bwd": relu_bias, "bn_add_relu_bwd": add_relu_bwd,
           "bn_add_relu_bwd_reduce": add_relu_bwd_reduce,
           "bn_add_relu_bwd_elemt": add_relu_bwd_elemt, "bn_relu_bwd": relu_bwd,
           "bn_relu_bwd_reduce": relu_bwd_reduce, "bn_relu_bwd_elemt": relu_bwd_elemt}
    return [OpCase(op, "device", dtype, layout, fn)
            for dtype, layout in itertools.product((F32, BF16, F16), LAYOUTS)
            for op, fn in fns.items()]


RUNNING = ("none", "momentum", "cumulative", "nbt-only")


def finalize_args(m: Maker, affine: bool, running: str, c=37, count=50):
    """(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked, count,
    momentum) of a BatchNorm over ``count`` values per channel."""
    x = torch.randn(count, c, dtype=torch.float64) * 2 + 1
    s, ss = (t.to(m.acc).to(m.device) for t in (x.sum(0), (x * x).sum(0)))
    weight, bias = (m.pos(c), m.vec(c)) if affine else (None, None)
    rm = rv = nbt = None
    if running in ("momentum", "cumulative"):
        rm, rv = m.vec(c), m.vec(c, 0.5, 2.0)
        nbt = torch.tensor(3, device=m.device)
    if running == "nbt-only":
        nbt = torch.tensor(0, device=m.device)
    return s, ss, weight, bias, rm, rv, nbt, count, None if running == "cumulative" else 0.1


def flag_bn_cases():
    """Every option of the batch-norm ops at tiny odd shapes (Triton's)."""
    out = []

    def finalize(m):
        calls = []
        for affine, running in itertools.product((False, True), RUNNING):
            s, ss, wt, b, rm, rv, nbt, count, mom = finalize_args(m, affine, running)
            calls.append(((s, ss, wt, b, rm, rv, nbt, count, mom, 1e-5), (4, 5, 6)))
        return calls

    def finalize_count(m):
        calls = []
        for affine, running in itertools.product((False, True), RUNNING):
            s, ss, wt, b, rm, rv, nbt, count, mom = finalize_args(m, affine, running)
            cnt = torch.tensor([float(count)], dtype=m.acc, device=m.device)
            calls.append(((s, ss, cnt, wt, b, rm, rv, nbt, mom, 1e-5), (5, 6, 7)))
        return calls

    out += [OpCase("bn_finalize", "flags", F32, "channels_last", finalize),
            OpCase("bn_finalize_count", "flags", F32, "channels_last", finalize_count)]

    def add_relu(m, n=2, c=9, h=5, w=3):
        x, calls = m.act(n, c, h, w), []
        for residual, relu in itertools.product(
                ("none", "identity", "bn", "option-a", "strided", "shift"), (False, True)):
            res, rs, rb, off = None, None, None, 0
            if residual in ("identity", "bn", "shift"):
                res = m.act(n, c, h, w, layout="contiguous")
            if residual == "bn":
                rs, rb = m.pos(c), m.vec(c)
            if residual == "shift":
                rb = m.vec(c)
            if residual == "option-a":  # fewer channels, landing on channels [2, 7)
                res, off = m.act(n, 5, h, w), 2
            if residual == "strided":  # the option-A shortcut's x[:, :, ::2, ::2]
                res, off = m.act(n, 5, 2 * h, 2 * w)[:, :, ::2, ::2], 3
            calls.append(((x, m.pos(c), m.vec(c), res, rs, rb, off, relu), ()))
        return calls

    def add_relu_bwd(m, n=2, c=7, h=5, w=3):
        x = m.act(n, c, h, w, scale=2.0, offset=0.5)
        mean, invstd = m.stats(x)
        go = m.act(n, c, h, w, layout="contiguous")
        calls = []
        for has_out, res_mode, affine in itertools.product(
                (False, True), ("identity", "bn", "bn-noaffine"), (False, True)):
            out = m.act(n, c, h, w) if has_out else None
            rx = rmean = rinvstd = rweight = None
            if res_mode != "identity":
                rx = m.act(n, c, h, w, offset=-0.3)
                rmean, rinvstd = m.stats(rx)
                rweight = m.pos(c) if res_mode == "bn" else None
            calls.append(((go, out, x, mean, invstd, m.pos(c) if affine else None, rx, rmean,
                           rinvstd, rweight), ()))
        return calls

    def relu_bwd(m, n=1, c=11, h=7, w=5):
        x = m.act(n, c, h, w, scale=1.5, offset=0.2)
        mean, invstd = m.stats(x)
        go, calls = m.act(n, c, h, w), []
        for relu, affine in itertools.product((False, True), repeat=2):
            weight = m.pos(c) if affine else None
            scale = invstd * (weight if affine else 1.0)
            calls.append(((go, x, mean, invstd, weight, scale, m.vec(c) - mean * scale, relu),
                          ()))
        return calls

    for dtype in (F32, BF16, F16):
        out += [OpCase("bn_add_relu", "flags", dtype, "channels_last", add_relu),
                OpCase("bn_add_relu_bwd", "flags", dtype, "channels_last", add_relu_bwd),
                OpCase("bn_relu_bwd", "flags", dtype, "channels_last", relu_bwd)]

    def add_relu_split(m, n=2, c=7, h=5, w=3):
        """The SyncBatchNorm split: pass 1 and pass 2 (on the reference's float64 means, so
        that each pass is judged on its own)."""
        from fastres import reference

        other = "contiguous" if m.layout == "channels_last" else "channels_last"
        x = m.act(n, c, h, w, scale=2.0, offset=0.5)
        mean, invstd = m.stats(x)
        go = m.act(n, c, h, w)
        reduce_calls, elemt_calls = [], []
        for has_out, res_mode in itertools.product((False, True),
                                                   ("identity", "bn", "bn-noaffine")):
            weight = None if res_mode == "bn-noaffine" else m.pos(c)
            out = m.act(n, c, h, w) if has_out else None
            rx = rmean = rinvstd = rweight = None
            if res_mode != "identity":
                rx = m.act(n, c, h, w, layout=other, offset=-0.3)
                rmean, rinvstd = m.stats(rx)
                rweight = None if res_mode == "bn-noaffine" else m.pos(c)
            args = (go, out, x, mean, invstd, rx, rmean, rinvstd)
            reduce_calls.append((args, ()))
            exact = reference.bn_add_relu_bwd_reduce(
                *[a.double() if a is not None and a.is_floating_point() else a for a in args])
            mg, mgx, rmgx = ((t / (n * h * w)).to(m.acc) if t.numel() else None for t in exact)
            elemt_calls.append(((go, out, x, mean, invstd, weight, mg, mgx, rx, rmean, rinvstd,
                                 rweight, rmgx if rx is not None else None), ()))
        return reduce_calls, elemt_calls

    def relu_split(m, n=1, c=11, h=7, w=5):
        from fastres import reference

        x = m.act(n, c, h, w, scale=1.5, offset=0.2)
        mean, invstd = m.stats(x)
        go = m.act(n, c, h, w)
        reduce_calls, elemt_calls = [], []
        weight = m.pos(c) if m.layout == "channels_last" else None
        for relu in (False, True):
            scale = invstd * (weight if weight is not None else 1.0)
            shift = m.vec(c) - mean * scale
            args = (go, x, mean, invstd, scale, shift, relu)
            reduce_calls.append((args, ()))
            exact = reference.bn_relu_bwd_reduce(
                *[a.double() if isinstance(a, torch.Tensor) else a for a in args])
            mg, mgx = ((t / (n * h * w)).to(m.acc) for t in exact)
            elemt_calls.append(((go, x, mean, invstd, weight, scale, shift, relu, mg, mgx), ()))
        return reduce_calls, elemt_calls

    for dtype, layout in itertools.product((F32, BF16), LAYOUTS):
        out += [OpCase("bn_add_relu_bwd_reduce", "flags", dtype, layout,
                       lambda m: add_relu_split(m)[0]),
                OpCase("bn_add_relu_bwd_elemt", "flags", dtype, layout,
                       lambda m: add_relu_split(m)[1]),
                OpCase("bn_relu_bwd_reduce", "flags", dtype, layout, lambda m: relu_split(m)[0]),
                OpCase("bn_relu_bwd_elemt", "flags", dtype, layout, lambda m: relu_split(m)[1])]

    def relu_bias(m):
        go = m.act(1, 13, 5, 7)
        return [((go, m.act(1, 13, 5, 7, layout="channels_last") if has_out else None), ())
                for has_out in (False, True)]

    for dtype, layout in itertools.product((F32, BF16, F16), LAYOUTS):
        out.append(OpCase("relu_bias_bwd", "flags", dtype, layout, relu_bias))
    return out


def sweep_bn_cases():
    """Every dtype (float64 too) and layout, channel counts with vector tails (37: two AVX-512
    vectors and a tail), every residual form and option combination."""
    out = []

    def relu_bias(m, shape=(3, 37, 7, 9)):
        go = m.act(*shape)
        return [((go, o), ()) for o in (None, m.act(*shape), m.act(*shape, layout="channels_last"))]

    def add_relu(m, shape=(2, 37, 5, 7)):
        n, c, h, w = shape
        x = m.act(*shape)
        wide = m.act(n, c, 2 * h, 2 * w)
        other = "contiguous" if m.layout == "channels_last" else "channels_last"
        residuals = {
            "none": (None, 0), "dense": (m.act(*shape), 0),
            "other_format": (m.act(*shape, layout=other), 0),
            "strided": (wide[:, :, ::2, ::2], 0),  # the option-A subsample x[:, :, ::2, ::2]
            "fewer_channels": (m.act(n, c - 6, h, w), 3),
            "fewer_strided": (wide[:, 1:c - 4, ::2, ::2], 4),
            "channel_strided": (wide[:, ::2, :h, :w][:, :(c + 1) // 2], 1),
            "expanded": (torch.randn(1, c, 1, 1).to(m.dtype).expand(n, c, h, w), 0),
        }
        calls = []
        for (res, off), affine, relu in itertools.product(
                residuals.values(), ("none", "scale", "shift", "both"), (False, True)):
            if res is None and affine != "none":
                continue
            cr = 0 if res is None else res.shape[1]
            rs = m.pos(cr) if affine in ("scale", "both") else None
            rb = m.vec(cr) if affine in ("shift", "both") else None
            calls.append(((x, m.pos(c), m.vec(c), res, rs, rb, off, relu), ()))
        return calls

    def add_relu_bwd_args(m, shape=(3, 21, 7, 5)):
        c = shape[1]
        go, out, x, x2 = (m.act(*shape) for _ in range(4))
        for has_out, res, has_w in itertools.product(
                (False, True), ("identity", "bn", "bn_noweight"), (False, True)):
            mean, invstd = m.vec(c), m.pos(c)
            weight = m.vec(c) if has_w else None
            r, rw = (None, None, None), None
            if res != "identity":
                r = (x2, m.vec(c), m.pos(c))
                rw = m.vec(c) if res == "bn" else None
            yield go, out if has_out else None, x, mean, invstd, weight, r, rw

    def add_relu_bwd(m):
        return [((go, o, x, mu, s, wt, *r, rw), ())
                for go, o, x, mu, s, wt, r, rw in add_relu_bwd_args(m)]

    def add_relu_bwd_reduce(m):
        return [((go, o, x, mu, s, *r), ()) for go, o, x, mu, s, _, r, _ in add_relu_bwd_args(m)]

    def add_relu_bwd_elemt(m):  # arbitrary means: every term of the formula on its own
        c = 21
        return [((go, o, x, mu, s, wt, m.vec(c), m.vec(c), *r, rw,
                  m.vec(c) if r[0] is not None else None), ())
                for go, o, x, mu, s, wt, r, rw in add_relu_bwd_args(m)]

    def relu_bwd_args(m, shape=(2, 37, 6, 5)):
        c = shape[1]
        go, x = m.act(*shape), m.act(*shape)
        for relu, has_w in itertools.product((False, True), repeat=2):
            yield (go, x, m.vec(c), m.pos(c), m.vec(c) if has_w else None, m.vec(c), m.vec(c),
                   relu)

    def relu_bwd(m):
        return [(a, ()) for a in relu_bwd_args(m)]

    def relu_bwd_reduce(m):
        return [((go, x, mu, s, sc, sh, relu), ())
                for go, x, mu, s, _, sc, sh, relu in relu_bwd_args(m)]

    def relu_bwd_elemt(m):
        return [((*a, m.vec(37), m.vec(37)), ()) for a in relu_bwd_args(m)]

    fns = {"relu_bias_bwd": relu_bias, "bn_add_relu": add_relu, "bn_add_relu_bwd": add_relu_bwd,
           "bn_add_relu_bwd_reduce": add_relu_bwd_reduce,
           "bn_add_relu_bwd_elemt": add_relu_bwd_elemt, "bn_relu_bwd": relu_bwd,
           "bn_relu_bwd_reduce": relu_bwd_reduce, "bn_relu_bwd_elemt": relu_bwd_elemt}
    for dtype, layout in itertools.product((F32, BF16, F16, F64), LAYOUTS):
        out += [OpCase(op, "sweep", dtype, layout, fn, emulate=False) for op, fn in fns.items()]

    def finalize(m, c=13, count=50):
        x = torch.randn(count, c, dtype=torch.float64) * 3 + 1
        s, ss = (t.to(m.acc).to(m.device) for t in (x.sum(0), (x * x).sum(0)))
        return [((s, ss, *((m.vec(c), m.vec(c)) if affine else (None, None)), None, None, None,
                  count, 0.1, 1e-5), ()) for affine in (False, True)]

    def finalize_count(m, c=9, count=40):  # the count as a 0-d tensor
        x = torch.randn(count, c, dtype=torch.float64) * 2 - 1
        s, ss = (t.to(m.acc).to(m.device) for t in (x.sum(0), (x * x).sum(0)))
        cnt = torch.tensor(float(count), dtype=m.acc, device=m.device)
        return [((s, ss, cnt, m.vec(c), m.vec(c), None, None, None, 0.1, 1e-5), ())]

    def add_relu_bwd_mixed(m, shape=(2, 24, 6, 6)):
        """grad_out contiguous, input channels_last: each output follows its own tensor."""
        go = m.act(*shape, layout="contiguous")
        out, x = m.act(*shape, layout="channels_last"), m.act(*shape, layout="channels_last")
        return [((go, out, x, m.vec(24), m.pos(24), None, None, None, None, None), ())]

    for dtype in (F32, F64):
        out += [OpCase("bn_finalize", "sweep", dtype, "contiguous", finalize, emulate=False),
                OpCase("bn_finalize_count", "sweep", dtype, "contiguous", finalize_count,
                       emulate=False)]
    out.append(OpCase("bn_add_relu_bwd", "sweep", F32, "mixed", add_relu_bwd_mixed,
                      tag="formats", emulate=False))
    return out
