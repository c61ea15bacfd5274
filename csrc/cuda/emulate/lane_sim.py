"""Lane-level CPU emulation of the index math of the fastres CUDA kernels (no GPU needed).

    python csrc/cuda/emulate/lane_sim.py

Transcribes, line for line, the address arithmetic of csrc/cuda/conv_igemm.cuh (forward, dgrad,
prologue, stats epilogue; 16-bit, TF32 and SIMT tiles), csrc/cuda/conv_wgrad.cu (ldmatrix.trans
path, splits) and the row/channel mapping of channel_reduce_kernel in csrc/cuda/bn.cu, emulates
cp.async zero-fill, ldmatrix(.trans) and mma.sync with the PTX ISA fragment layouts, and compares
with direct convolutions on small integer data (every result exact). It checks indexing only:
not timing, races, alignment faults or the hardware itself. Keep it in sync with the kernels.
"""
# The nested functions mirror the kernels' lambdas: defined and called within one CTA iteration
# (B023 is harmless here); `l` is the lane index, as in the PTX fragment tables (E741).
# ruff: noqa: B023, E741

import itertools

import numpy as np


def swz64(row, chunk):
    return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4)


def swz_wide(row, chunk, rb):
    return row * rb + ((chunk ^ (row & 7)) << 4)


class Smem:
    def __init__(self, nbytes, esize):
        self.e = esize
        self.a = np.zeros(nbytes // esize)

    def cp16(self, boff, g, goff, ok):
        n = 16 // self.e
        assert boff % 16 == 0
        self.a[boff // self.e : boff // self.e + n] = g[goff : goff + n] if ok else 0

    def row16(self, boff):
        assert boff % 16 == 0
        n = 16 // self.e
        return self.a[boff // self.e : boff // self.e + n].copy()

    def put16(self, boff, v):
        self.a[boff // self.e : boff // self.e + len(v)] = v


def ldsm_x4(sm, addrs, trans=False):
    """addrs[lane] = byte address of the row that lane supplies. Returns regs[lane][q] as tuples
    of the 16-bit elements (2 per reg) or 32-bit words (1 per reg, esize 4)."""
    regs = [[None] * 4 for _ in range(32)]
    for q in range(4):
        mat = [sm.row16(addrs[8 * q + r]) for r in range(8)]
        for l in range(32):
            if sm.e == 2:
                if not trans:
                    regs[l][q] = (mat[l // 4][2 * (l % 4)], mat[l // 4][2 * (l % 4) + 1])
                else:
                    regs[l][q] = (mat[2 * (l % 4)][l // 4], mat[2 * (l % 4) + 1][l // 4])
            else:
                assert not trans
                regs[l][q] = (mat[l // 4][l % 4],)
    return regs


def mma(acc, a, b, esize):
    """acc[lane][4], a[lane][4 regs], b[lane][2 regs] per the PTX layouts."""
    if esize == 2:  # m16n8k16
        A = np.zeros((16, 16))
        B = np.zeros((16, 8))
        for l in range(32):
            g, t = l // 4, l % 4
            A[g, 2 * t : 2 * t + 2] = a[l][0]
            A[g + 8, 2 * t : 2 * t + 2] = a[l][1]
            A[g, 2 * t + 8 : 2 * t + 10] = a[l][2]
            A[g + 8, 2 * t + 8 : 2 * t + 10] = a[l][3]
            B[2 * t : 2 * t + 2, g] = b[l][0]
            B[2 * t + 8 : 2 * t + 10, g] = b[l][1]
    else:  # m16n8k8 tf32
        A = np.zeros((16, 8))
        B = np.zeros((8, 8))
        for l in range(32):
            g, t = l // 4, l % 4
            A[g, t] = a[l][0][0]
            A[g + 8, t] = a[l][1][0]
            A[g, t + 4] = a[l][2][0]
            A[g + 8, t + 4] = a[l][3][0]
            B[t, g] = b[l][0][0]
            B[t + 4, g] = b[l][1][0]
    D = A @ B
    for l in range(32):
        g, t = l // 4, l % 4
        acc[l][0] += D[g, 2 * t]
        acc[l][1] += D[g, 2 * t + 1]
        acc[l][2] += D[g + 8, 2 * t]
        acc[l][3] += D[g + 8, 2 * t + 1]


def warp_accs(threads, tiles):
    """acc[warp][tile][lane]: the 4 fp32 accumulators of each m16n8 tile of a warp, zeroed."""
    return {w: [[[0.0] * 4 for _ in range(32)] for _ in range(tiles)] for w in range(threads // 32)}


def split_x4(rg):
    """One ldmatrix.x4 of B holds two n8 tiles: regs 0-1 are the first one's, 2-3 the second's."""
    return [(rg[l][0], rg[l][1]) for l in range(32)], [(rg[l][2], rg[l][3]) for l in range(32)]


def mma_warp(acc, af, bf, esize):
    """The warp tile's MI x NI mma.sync: acc[mi * NI + ni] += af[mi] * bf[ni]."""
    for mi, a in enumerate(af):
        for ni, b in enumerate(bf):
            mma(acc[mi * len(bf) + ni], a, b, esize)


def prologue16(sm, boff, c, prologue):
    """The GEMM kernels' prologue, relu?(x * scale + shift), in place on the 16-byte chunk of
    channels c.. at byte boff."""
    sc, sh, relu = prologue
    n = 16 // sm.e
    v = sm.row16(boff) * sc[c : c + n] + sh[c : c + n]
    sm.put16(boff, np.maximum(v, 0) if relu else v)


def pipeline(stages, k_iters, load_stage, compute_stage, transform_stage=None):
    """The cp.async main loop of both GEMM kernels: stages - 1 steps in flight; then per step `it`
    the prologue on its landed stage, the load of step it + stages - 1 into the stage step it - 1
    used, and the MMAs of step `it`. load_stage(stage, kt) and transform_stage(stage, kt) are
    called in step order."""
    for kt in range(min(stages - 1, k_iters)):
        load_stage(kt, kt)
    for it in range(k_iters):
        stage = it % stages
        if transform_stage is not None:
            transform_stage(stage, it)
        nxt = it + stages - 1
        if nxt < k_iters:
            assert nxt % stages != stage
            load_stage(nxt % stages, nxt)
        compute_stage(stage)


def geometry(R, S, st, pd, dl):
    """Filter size, stride, padding and dilation as the kernels' parameter structs hold them."""
    return dict(R=R, S=S, sh=st[0], sw=st[1], ph=pd[0], pw=pd[1], dh=dl[0], dw=dl[1])


def conv_params(N, XH, XW, XC, OH, OW, OC, R, S, st, pd, dl):
    """ConvParams (ops_cuda.cu: fill_conv_io): x (N, XH, XW, XC) gathered, out (N, OH, OW, OC)
    written, one GEMM row per output pixel."""
    p = dict(N=N, XH=XH, XW=XW, XC=XC, OH=OH, OW=OW, OC=OC, M=N * OH * OW)
    p.update(geometry(R, S, st, pd, dl))
    return p


def out_size(H, W, R, S, st, pd, dl):
    """Output height and width of a convolution (as conv_geom computes them)."""
    P = (H + 2 * pd[0] - dl[0] * (R - 1) - 1) // st[0] + 1
    Q = (W + 2 * pd[1] - dl[1] * (S - 1) - 1) // st[1] + 1
    return P, Q


def pad_axis(a, axis, size):
    """a zero-padded along `axis` to `size` (the launchers' pad_dim)."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)


# ------------------------------------------------------------------------------------------
def conv_kernel(
    p,
    x,
    wt,
    esize,
    cfg,
    simt=False,
    dgrad=False,
    prologue=None,
    stats=False,
    bias=None,
    residual=None,
    relu=False,
):
    BM, BN, WARPS_M, WARPS_N, STAGES = cfg
    THREADS = WARPS_M * WARPS_N * 32
    WM, WN = BM // WARPS_M, BN // WARPS_N
    EPC = 16 // esize
    BK = 4 * EPC
    ROW_STEP = THREADS // 4
    A_ITERS, B_ITERS = BM // ROW_STEP, BN // ROW_STEP
    A_STAGE, B_STAGE = BM * 64, BN * 64
    CS_LD = BN + 4
    out = np.full(p["M"] * p["OC"], np.nan)
    m_tiles = -(-p["M"] // BM)
    n_tiles = -(-p["OC"] // BN)
    partial = np.full((2, m_tiles, p["OC"]), np.nan)
    for bid in range(m_tiles * n_tiles):
        tile_n, tile_m = bid % n_tiles, bid // n_tiles
        m0, n0 = tile_m * BM, tile_n * BN
        sm = Smem(STAGES * (A_STAGE + B_STAGE), esize)
        sB0 = STAGES * A_STAGE
        st = {}
        for tid in range(THREADS):
            chunk, row0 = tid & 3, tid >> 2
            a_img, a_h, a_w = [], [], []
            ohw = p["OH"] * p["OW"]
            for i in range(A_ITERS):
                m = m0 + row0 + i * ROW_STEP
                if m < p["M"]:
                    n = m // ohw
                    rem = m - n * ohw
                    oh = rem // p["OW"]
                    ow = rem - oh * p["OW"]
                    a_img.append(n * p["XH"] * p["XW"] * p["XC"])
                    if dgrad:
                        a_h.append(oh + p["ph"])
                        a_w.append(ow + p["pw"])
                    else:
                        a_h.append(oh * p["sh"] - p["ph"])
                        a_w.append(ow * p["sw"] - p["pw"])
                else:
                    a_img.append(0)
                    a_h.append(-(1 << 30))
                    a_w.append(-(1 << 30))
            b_off, b_ok = [], []
            for j in range(B_ITERS):
                oc = n0 + row0 + j * ROW_STEP
                ok = oc < p["OC"]
                b_ok.append(ok)
                b_off.append(oc * p["R"] * p["S"] * p["XC"] if ok else 0)
            st[tid] = (chunk, row0, a_img, a_h, a_w, b_off, b_ok)

        def a_pixel(tid, i, r, s):
            chunk, row0, a_img, a_h, a_w, _, _ = st[tid]
            if dgrad:
                th = a_h[i] - r * p["dh"]
                tw = a_w[i] - s * p["dw"]
                h = int(th / p["sh"])
                w = int(tw / p["sw"])  # C++ truncation
                ok = (
                    th >= 0
                    and tw >= 0
                    and h * p["sh"] == th
                    and w * p["sw"] == tw
                    and h < p["XH"]
                    and w < p["XW"]
                )
            else:
                h = a_h[i] + r * p["dh"]
                w = a_w[i] + s * p["dw"]
                ok = 0 <= h < p["XH"] and 0 <= w < p["XW"]
            return ok, (a_img[i] + (h * p["XW"] + w) * p["XC"] if ok else 0)

        cblocks = -(-p["XC"] // BK)
        k_iters = p["R"] * p["S"] * cblocks

        def load_stage(stage, r, s, cb):
            for tid in range(THREADS):
                chunk, row0, _, _, _, b_off, b_ok = st[tid]
                c = cb * BK + chunk * EPC
                c_ok = c < p["XC"]
                for i in range(A_ITERS):
                    ok, off = a_pixel(tid, i, r, s)
                    ok = ok and c_ok
                    sm.cp16(
                        stage * A_STAGE + swz64(row0 + i * ROW_STEP, chunk),
                        x,
                        off + c if ok else 0,
                        ok,
                    )
                tap = (r * p["S"] + s) * p["XC"] + c
                for j in range(B_ITERS):
                    ok = b_ok[j] and c_ok
                    sm.cp16(
                        sB0 + stage * B_STAGE + swz64(row0 + j * ROW_STEP, chunk),
                        wt,
                        b_off[j] + tap if ok else 0,
                        ok,
                    )

        def transform_stage(stage, r, s, cb):
            for tid in range(THREADS):
                chunk, row0 = st[tid][0], st[tid][1]
                c = cb * BK + chunk * EPC
                if c >= p["XC"]:
                    continue
                for i in range(A_ITERS):
                    ok, _ = a_pixel(tid, i, r, s)
                    if ok:
                        b = stage * A_STAGE + swz64(row0 + i * ROW_STEP, chunk)
                        prologue16(sm, b, c, prologue)

        accs = warp_accs(THREADS, (WM // 16) * (WN // 8))
        sacc = np.zeros((THREADS, 4, 4))

        def compute_stage(stage):
            a_s, b_s = stage * A_STAGE, sB0 + stage * B_STAGE
            if simt:
                for tid in range(THREADS):
                    tx, ty = tid & 15, tid >> 4
                    for ch in range(4):
                        av = [sm.row16(a_s + swz64(ty + 16 * i, ch)) for i in range(4)]
                        bv = [sm.row16(b_s + swz64(tx + 16 * j, ch)) for j in range(4)]
                        for i in range(4):
                            for j in range(4):
                                sacc[tid, i, j] += av[i] @ bv[j]
                return
            MI, NI = WM // 16, WN // 8
            for warp in range(THREADS // 32):
                wm, wn = warp % WARPS_M, warp // WARPS_M
                for kk in range(2):
                    af = [
                        ldsm_x4(
                            sm,
                            [
                                a_s + swz64(wm * WM + mi * 16 + (l & 15), kk * 2 + (l >> 4))
                                for l in range(32)
                            ],
                        )
                        for mi in range(MI)
                    ]
                    bf = [None] * NI
                    for nj in range(NI // 2):
                        rg = ldsm_x4(
                            sm,
                            [
                                b_s
                                + swz64(
                                    wn * WN + nj * 16 + ((l >> 4) << 3) + (l & 7),
                                    kk * 2 + ((l >> 3) & 1),
                                )
                                for l in range(32)
                            ],
                        )
                        bf[2 * nj], bf[2 * nj + 1] = split_x4(rg)
                    mma_warp(accs[warp], af, bf, esize)

        ld = [0, 0, 0]
        cs_ = [0, 0, 0]

        def advance(v):
            v[2] += 1
            if v[2] == cblocks:
                v[2] = 0
                v[1] += 1
                if v[1] == p["S"]:
                    v[1] = 0
                    v[0] += 1

        def load_step(stage, kt):  # steps come in order: (r, s, cb) advanced as the kernel does
            load_stage(stage, *ld)
            advance(ld)

        def transform_step(stage, kt):
            transform_stage(stage, *cs_)
            advance(cs_)

        pipeline(
            STAGES,
            k_iters,
            load_step,
            compute_stage,
            transform_step if prologue is not None else None,
        )
        # epilogue
        cs = np.zeros((BM, CS_LD))
        if simt:
            for tid in range(THREADS):
                tx, ty = tid & 15, tid >> 4
                for i in range(4):
                    for j in range(4):
                        cs[ty + 16 * i, tx + 16 * j] = sacc[tid, i, j]
        else:
            MI, NI = WM // 16, WN // 8
            for warp in range(THREADS // 32):
                wm, wn = warp % WARPS_M, warp // WARPS_M
                for mi in range(MI):
                    for ni in range(NI):
                        for lane in range(32):
                            row = wm * WM + mi * 16 + (lane >> 2)
                            col = wn * WN + ni * 8 + 2 * (lane & 3)
                            a4 = accs[warp][mi * NI + ni][lane]
                            cs[row, col : col + 2] = a4[0:2]
                            cs[row + 8, col : col + 2] = a4[2:4]
        GROUPS = BN // EPC
        vec_ok = p["OC"] % EPC == 0
        for idx in range(BM * GROUPS):
            row, cg = idx // GROUPS, idx % GROUPS
            m, k0 = m0 + row, n0 + cg * EPC
            if m < p["M"] and k0 < p["OC"]:
                v = cs[row, cg * EPC : cg * EPC + EPC].copy()
                off = m * p["OC"] + k0
                valid = [k0 + e < p["OC"] for e in range(EPC)]
                if bias is not None:
                    for e in range(EPC):
                        if valid[e]:
                            v[e] += bias[k0 + e]
                if residual is not None:
                    for e in range(EPC):
                        if vec_ok or valid[e]:
                            v[e] += residual[off + e]
                if relu:
                    v = np.maximum(v, 0)
                for e in range(EPC):
                    if vec_ok or valid[e]:
                        out[off + e] = v[e]
                if stats:
                    cs[row, cg * EPC : cg * EPC + EPC] = [
                        v[e] if valid[e] else 0 for e in range(EPC)
                    ]
            elif stats:
                cs[row, cg * EPC : cg * EPC + EPC] = 0
        if stats:
            PARTS = THREADS // BN
            RPP = BM // PARTS
            red = np.zeros(2 * THREADS)
            for tid in range(THREADS):
                col, part = tid % BN, tid // BN
                vals = cs[part * RPP : (part + 1) * RPP, col]
                red[tid] = vals.sum()
                red[THREADS + tid] = (vals * vals).sum()
            for tid in range(BN):
                if n0 + tid < p["OC"]:
                    partial[0, tile_m, n0 + tid] = sum(red[pp * BN + tid] for pp in range(PARTS))
                    partial[1, tile_m, n0 + tid] = sum(
                        red[THREADS + pp * BN + tid] for pp in range(PARTS)
                    )
    return out, partial


def ref_conv(a_nchw, w_kcrs, stride, pad, dil):
    N, C, H, W = a_nchw.shape
    K, _, R, S = w_kcrs.shape
    P, Q = out_size(H, W, R, S, stride, pad, dil)
    ap = np.zeros((N, C, H + 2 * pad[0], W + 2 * pad[1]))
    ap[:, :, pad[0] : pad[0] + H, pad[1] : pad[1] + W] = a_nchw
    out = np.zeros((N, K, P, Q))
    for r, s in itertools.product(range(R), range(S)):
        patch = ap[
            :,
            :,
            r * dil[0] : r * dil[0] + stride[0] * (P - 1) + 1 : stride[0],
            s * dil[1] : s * dil[1] + stride[1] * (Q - 1) + 1 : stride[1],
        ]
        out += np.einsum("nchw,kc->nkhw", patch, w_kcrs[:, :, r, s])
    return out


def ref_dgrad(go, w, H, W, stride, pad, dil):
    # adjoint of ref_conv w.r.t. a, by brute force on the linear map
    N, K, P, Q = go.shape
    _, C, R, S = w.shape
    ga = np.zeros((N, C, H + 2 * pad[0], W + 2 * pad[1]))
    for r, s in itertools.product(range(R), range(S)):
        for pp, q in itertools.product(range(P), range(Q)):
            ga[:, :, pp * stride[0] + r * dil[0], q * stride[1] + s * dil[1]] += np.einsum(
                "nk,kc->nc", go[:, :, pp, q], w[:, :, r, s]
            )
    return ga[:, :, pad[0] : pad[0] + H, pad[1] : pad[1] + W]


# ---- forward / dgrad ----
rng = np.random.default_rng(0)


def make_prologue(x, pro, Cp):
    """(a, prologue): the GEMM's activation relu(x * sc + sh) and the kernels' prologue vectors
    (zero-padded to Cp channels) for random integer sc, sh; (x, None) without a prologue."""
    if not pro:
        return x, None
    C = x.shape[1]
    sc = rng.integers(-2, 3, C).astype(float)
    sh = rng.integers(-2, 3, C).astype(float)
    a = np.maximum(x * sc[None, :, None, None] + sh[None, :, None, None], 0)
    return a, (pad_axis(sc, 0, Cp), pad_axis(sh, 0, Cp), True)


BIG, SMALL, SIMT = (128, 128, 2, 4, 4), (128, 64, 2, 2, 4), (64, 64, 4, 2, 3)  # ConvCfg


def run_fwd(
    N,
    C,
    H,
    W,
    K,
    R,
    S,
    st,
    pd,
    dl,
    esize,
    cfg,
    simt=False,
    pro=False,
    stats=False,
    bias=False,
    res=False,
    relu=False,
):
    EPC = 16 // esize
    Cp = -(-C // EPC) * EPC
    x = rng.integers(-3, 4, (N, C, H, W)).astype(float)
    w = rng.integers(-2, 3, (K, C, R, S)).astype(float)
    P, Q = out_size(H, W, R, S, st, pd, dl)
    xp = pad_axis(x, 1, Cp)
    wp = pad_axis(w, 1, Cp)
    a, prologue = make_prologue(x, pro, Cp)
    p = conv_params(N, H, W, Cp, P, Q, K, R, S, st, pd, dl)
    b = rng.integers(-3, 4, K).astype(float) if bias else None
    r = rng.integers(-3, 4, (N, K, P, Q)).astype(float) if res else None
    out, partial = conv_kernel(
        p,
        xp.transpose(0, 2, 3, 1).ravel(),
        wp.transpose(0, 2, 3, 1).ravel(),
        esize,
        cfg,
        simt=simt,
        prologue=prologue,
        stats=stats,
        bias=b,
        residual=None if r is None else r.transpose(0, 2, 3, 1).ravel(),
        relu=relu,
    )
    ref = ref_conv(a, w, st, pd, dl)
    if bias:
        ref = ref + b[None, :, None, None]
    if res:
        ref = ref + r
    if relu:
        ref = np.maximum(ref, 0)
    got = out.reshape(N, P, Q, K).transpose(0, 3, 1, 2)
    assert np.array_equal(got, ref), (np.abs(got - ref).max(), np.isnan(got).sum())
    if stats:
        s, q = partial[0].sum(0), partial[1].sum(0)
        assert np.array_equal(s, ref.sum((0, 2, 3))) and np.array_equal(q, (ref**2).sum((0, 2, 3)))
    print(
        "fwd ok",
        N,
        C,
        H,
        W,
        K,
        R,
        S,
        st,
        pd,
        dl,
        esize,
        cfg,
        "simt" if simt else "",
        "pro" if pro else "",
        "stats" if stats else "",
        bias,
        res,
        relu,
    )


def run_dgrad(N, C, H, W, K, R, S, st, pd, dl, esize, cfg, simt=False):
    EPC = 16 // esize
    Kp = -(-K // EPC) * EPC
    w = rng.integers(-2, 3, (K, C, R, S)).astype(float)
    P, Q = out_size(H, W, R, S, st, pd, dl)
    go = rng.integers(-3, 4, (N, K, P, Q)).astype(float)
    gop = pad_axis(go, 1, Kp)
    wt = pad_axis(w, 0, Kp).transpose(1, 2, 3, 0)  # (C, R, S, Kp)
    p = conv_params(N, P, Q, Kp, H, W, C, R, S, st, pd, dl)
    out, _ = conv_kernel(
        p,
        gop.transpose(0, 2, 3, 1).ravel(),
        np.ascontiguousarray(wt).ravel(),
        esize,
        cfg,
        simt=simt,
        dgrad=True,
    )
    ref = ref_dgrad(go, w, H, W, st, pd, dl)
    got = out.reshape(N, H, W, C).transpose(0, 3, 1, 2)
    assert np.array_equal(got, ref), np.abs(got - ref).max()
    print("dgrad ok", N, C, H, W, K, R, S, st, pd, dl, esize, cfg)


run_fwd(2, 24, 7, 7, 40, 3, 3, (2, 2), (1, 1), (1, 1), 2, SMALL)
run_fwd(1, 40, 5, 6, 72, 3, 3, (1, 1), (1, 1), (1, 1), 2, BIG, bias=True, res=True, relu=True)
run_fwd(2, 3, 9, 9, 10, 7, 7, (2, 2), (3, 3), (1, 1), 2, SMALL, pro=True, stats=True)
run_fwd(3, 16, 6, 5, 20, 1, 1, (2, 2), (0, 0), (1, 1), 2, SMALL, bias=True, relu=True)
run_fwd(
    1, 12, 6, 6, 36, 3, 3, (1, 1), (2, 2), (2, 2), 4, SMALL, pro=True, stats=True
)  # tf32 cfg, dilation
run_fwd(2, 12, 5, 5, 20, 3, 3, (2, 1), (1, 1), (1, 1), 4, SIMT, simt=True, res=True, bias=True)
run_fwd(1, 8, 4, 4, 130, 3, 3, (1, 1), (1, 1), (1, 1), 2, BIG, stats=True, pro=True)
run_dgrad(2, 20, 7, 7, 24, 3, 3, (2, 2), (1, 1), (1, 1), 2, SMALL)
run_dgrad(1, 72, 5, 6, 40, 3, 3, (1, 1), (1, 1), (1, 1), 2, BIG)
run_dgrad(2, 12, 6, 6, 10, 1, 1, (2, 2), (0, 0), (1, 1), 4, SIMT, simt=True)
run_dgrad(1, 12, 8, 7, 12, 3, 3, (2, 2), (1, 1), (1, 1), 4, SMALL)
run_fwd(2, 16, 12, 12, 130, 3, 3, (1, 1), (1, 1), (1, 1), 2, BIG, pro=True, stats=True)
run_fwd(2, 40, 9, 9, 24, 3, 3, (1, 1), (1, 1), (1, 1), 2, SMALL, bias=True, res=True)


# ---- wgrad ----


def wgrad_kernel(p, go, x, esize, cfg, simt, prologue):
    BM, BN, BK, WARPS_M, WARPS_N, STAGES = cfg
    THREADS = WARPS_M * WARPS_N * 32
    WM, WN = BM // WARPS_M, BN // WARPS_N
    EPC = 16 // esize
    A_RB, B_RB = BM * esize, BN * esize
    A_CPR, B_CPR = BM // EPC, BN // EPC
    A_RSTEP, B_RSTEP = THREADS // A_CPR, THREADS // B_CPR
    A_ITERS, B_ITERS = BK // A_RSTEP, BK // B_RSTEP
    A_STAGE, B_STAGE = BK * A_RB, BK * B_RB
    K, C, R, S = p["K"], p["C"], p["R"], p["S"]
    RSC = R * S * C
    ws = np.full(p["splits"] * K * RSC, np.nan)
    cblocks = -(-C // BN)
    for bid in range(p["m_tiles"] * p["n_tiles"] * p["splits"]):
        tile_m = bid % p["m_tiles"]
        b2 = bid // p["m_tiles"]
        tile_n = b2 % p["n_tiles"]
        split = b2 // p["n_tiles"]
        tap = tile_n // cblocks
        cb = tile_n - tap * cblocks
        r = tap // S
        s = tap - r * S
        k0, c0 = tile_m * BM, cb * BN
        row_begin = split * p["rps"]
        row_end = min(p["NPQ"], row_begin + p["rps"])
        k_iters = -(-(row_end - row_begin) // BK) if row_end > row_begin else 0
        sm = Smem(STAGES * (A_STAGE + B_STAGE), esize)
        sB0 = STAGES * A_STAGE
        PQ = p["P"] * p["Q"]

        def b_pixel(j):
            if j >= row_end:
                return False, 0
            n = j // PQ
            rem = j - n * PQ
            pp = rem // p["Q"]
            q = rem - pp * p["Q"]
            h = pp * p["sh"] - p["ph"] + r * p["dh"]
            w = q * p["sw"] - p["pw"] + s * p["dw"]
            if h < 0 or h >= p["H"] or w < 0 or w >= p["W"]:
                return False, 0
            return True, ((n * p["H"] + h) * p["W"] + w) * C

        def load_stage(stage, kt):
            jb = row_begin + kt * BK
            for tid in range(THREADS):
                a_chunk, a_row0, b_chunk, b_row0 = (
                    tid % A_CPR,
                    tid // A_CPR,
                    tid % B_CPR,
                    tid // B_CPR,
                )
                a_k = k0 + a_chunk * EPC
                b_c = c0 + b_chunk * EPC
                for i in range(A_ITERS):
                    row = a_row0 + i * A_RSTEP
                    j = jb + row
                    ok = a_k < K and j < row_end
                    sm.cp16(
                        stage * A_STAGE + swz_wide(row, a_chunk, A_RB),
                        go,
                        j * K + a_k if ok else 0,
                        ok,
                    )
                for i in range(B_ITERS):
                    row = b_row0 + i * B_RSTEP
                    okp, off = b_pixel(jb + row)
                    ok = b_c < C and okp
                    sm.cp16(
                        sB0 + stage * B_STAGE + swz_wide(row, b_chunk, B_RB),
                        x,
                        off + b_c if ok else 0,
                        ok,
                    )

        def transform_stage(stage, kt):
            jb = row_begin + kt * BK
            for tid in range(THREADS):
                b_chunk, b_row0 = tid % B_CPR, tid // B_CPR
                b_c = c0 + b_chunk * EPC
                if b_c >= C:
                    continue
                for i in range(B_ITERS):
                    row = b_row0 + i * B_RSTEP
                    ok, _ = b_pixel(jb + row)
                    if ok:
                        b = sB0 + stage * B_STAGE + swz_wide(row, b_chunk, B_RB)
                        prologue16(sm, b, b_c, prologue)

        MI, NI = WM // 16, WN // 8
        accs = warp_accs(THREADS, MI * NI)
        sacc = np.zeros((THREADS, 4, 4))

        def compute_stage(stage):
            a_s, b_s = stage * A_STAGE, sB0 + stage * B_STAGE
            if simt:
                for tid in range(THREADS):
                    tx, ty = tid & 15, tid >> 4
                    for kr in range(BK):
                        a = sm.row16(a_s + swz_wide(kr, ty, A_RB))
                        b = sm.row16(b_s + swz_wide(kr, tx, B_RB))
                        sacc[tid] += np.outer(a, b)
                return
            for warp in range(THREADS // 32):
                wm, wn = warp % WARPS_M, warp // WARPS_M
                for kk in range(BK // 16):
                    af = []
                    for mi in range(MI):
                        addrs = []
                        for l in range(32):
                            q = l >> 3
                            krow = kk * 16 + ((q >> 1) << 3) + (l & 7)
                            mch = (wm * WM + mi * 16) // 8 + (q & 1)
                            addrs.append(a_s + swz_wide(krow, mch, A_RB))
                        af.append(ldsm_x4(sm, addrs, trans=True))
                    bf = [None] * NI
                    for nj in range(NI // 2):
                        addrs = []
                        for l in range(32):
                            q = l >> 3
                            krow = kk * 16 + ((q & 1) << 3) + (l & 7)
                            nch = (wn * WN + nj * 16) // 8 + (q >> 1)
                            addrs.append(b_s + swz_wide(krow, nch, B_RB))
                        rg = ldsm_x4(sm, addrs, trans=True)
                        bf[2 * nj], bf[2 * nj + 1] = split_x4(rg)
                    mma_warp(accs[warp], af, bf, esize)

        pipeline(
            STAGES,
            k_iters,
            load_stage,
            compute_stage,
            transform_stage if prologue is not None else None,
        )
        base = split * K * RSC + tap * C
        if simt:
            for tid in range(THREADS):
                tx, ty = tid & 15, tid >> 4
                c = c0 + tx * 4
                if c < C:
                    for i in range(4):
                        k = k0 + ty * 4 + i
                        if k < K:
                            ws[base + k * RSC + c : base + k * RSC + c + 4] = sacc[tid, i]
        else:
            for warp in range(THREADS // 32):
                wm, wn = warp % WARPS_M, warp // WARPS_M
                for mi in range(MI):
                    for ni in range(NI):
                        for lane in range(32):
                            k = k0 + wm * WM + mi * 16 + (lane >> 2)
                            c = c0 + wn * WN + ni * 8 + 2 * (lane & 3)
                            if c >= C:
                                continue
                            a4 = accs[warp][mi * NI + ni][lane]
                            if k < K:
                                ws[base + k * RSC + c : base + k * RSC + c + 2] = a4[0:2]
                            if k + 8 < K:
                                ws[base + (k + 8) * RSC + c : base + (k + 8) * RSC + c + 2] = a4[
                                    2:4
                                ]
    return ws.reshape(p["splits"], K * RSC).sum(0)


def plan_wgrad(p, cfg, num_sms=132):
    BM, BN, BK = cfg[:3]
    p["m_tiles"] = -(-p["K"] // BM)
    p["n_tiles"] = p["R"] * p["S"] * -(-p["C"] // BN)
    tiles = p["m_tiles"] * p["n_tiles"]
    want = -(-2 * num_sms // tiles)
    mx = max(1, p["NPQ"] // (16 * BK))
    splits = max(1, min(want, mx))
    rows = -(-p["NPQ"] // splits)
    rows = max(BK, -(-rows // BK) * BK)
    p["rps"] = rows
    p["splits"] = -(-p["NPQ"] // rows)


def run_wgrad(N, C, H, W, K, R, S, st, pd, esize, cfg, simt=False, pro=False, force_splits=None):
    x = rng.integers(-3, 4, (N, C, H, W)).astype(float)
    P, Q = out_size(H, W, R, S, st, pd, (1, 1))
    go = rng.integers(-3, 4, (N, K, P, Q)).astype(float)
    a, prologue = make_prologue(x, pro, C)
    p = dict(N=N, H=H, W=W, C=C, P=P, Q=Q, K=K, NPQ=N * P * Q)
    p.update(geometry(R, S, st, pd, (1, 1)))
    plan_wgrad(p, cfg)
    if force_splits:
        rows = -(-p["NPQ"] // force_splits)  # ceil
        p["rps"] = -(-rows // cfg[2]) * cfg[2]
        p["splits"] = -(-p["NPQ"] // p["rps"])
    dw = wgrad_kernel(
        p,
        go.transpose(0, 2, 3, 1).ravel(),
        x.transpose(0, 2, 3, 1).ravel(),
        esize,
        cfg,
        simt,
        prologue,
    )
    ap = np.zeros((N, C, H + 2 * pd[0], W + 2 * pd[1]))
    ap[:, :, pd[0] : pd[0] + H, pd[1] : pd[1] + W] = a
    ref = np.zeros((K, C, R, S))
    for r, s in itertools.product(range(R), range(S)):
        patch = ap[:, :, r : r + st[0] * (P - 1) + 1 : st[0], s : s + st[1] * (Q - 1) + 1 : st[1]]
        ref[:, :, r, s] = np.einsum("nkpq,ncpq->kc", go, patch)
    got = dw.reshape(K, R, S, C).transpose(0, 3, 1, 2)
    assert np.array_equal(got, ref), (np.abs(got - ref).max(), np.isnan(got).sum())
    print("wgrad ok", N, C, H, W, K, R, S, st, pd, esize, cfg, p["splits"], "pro" if pro else "")


WSMALL, WBIG, WSIMT = (
    (64, 64, 32, 2, 2, 4),
    (128, 128, 32, 2, 4, 4),
    (64, 64, 16, 4, 2, 3),
)  # WgradCfg
run_wgrad(2, 16, 6, 6, 24, 3, 3, (1, 1), (1, 1), 2, WSMALL, pro=True)
run_wgrad(2, 24, 7, 7, 16, 3, 3, (2, 2), (1, 1), 2, WSMALL, force_splits=3)
run_wgrad(1, 72, 5, 5, 136, 1, 1, (1, 1), (0, 0), 2, WBIG, pro=True, force_splits=2)
run_wgrad(2, 12, 6, 5, 20, 3, 3, (2, 2), (1, 1), 4, WSIMT, simt=True, pro=True, force_splits=2)
run_wgrad(2, 16, 10, 10, 24, 3, 3, (1, 1), (1, 1), 2, WSMALL, pro=True, force_splits=3)
run_wgrad(2, 12, 10, 9, 20, 3, 3, (1, 1), (1, 1), 4, WSIMT, simt=True, force_splits=2)


# ---- channel reduction mapping (bn.cu) ----
kThreads = 256


def plan(rows, C, vec, nsum, num_sms=132):
    cv_total = -(-C // vec)
    cvb = min(cv_total, kThreads)
    groups = -(-cv_total // cvb)
    chunks = -(-8 * num_sms // groups)
    chunks = max(1, min(chunks, -(-rows // 64)))
    rpc = max(1, -(-rows // chunks))
    chunks = max(1, -(-rows // rpc))
    return chunks, rpc, groups


def reduce_sim(g, C, vec):
    rows = g.shape[0]
    chunks, rpc, groups = plan(rows, C, vec, 1)
    partial = np.full((chunks, C), np.nan)
    cv_total = -(-C // vec)
    cvb = min(cv_total, kThreads)
    lanes = kThreads // cvb
    for chunk in range(chunks):
        for gy in range(groups):
            red = np.zeros((kThreads, vec))
            r0 = chunk * rpc
            r1 = min(rows, r0 + rpc)
            for tid in range(kThreads):
                cv = tid % cvb
                lane = tid // cvb
                c0 = (gy * cvb + cv) * vec
                if lane < lanes and c0 < C:
                    for row in range(r0 + lane, r1, lanes):
                        red[tid] += g[row, c0 : c0 + vec]
            for tid in range(kThreads):
                cv = tid % cvb
                lane = tid // cvb
                c0 = (gy * cvb + cv) * vec
                if lane == 0 and c0 < C:
                    partial[chunk, c0 : c0 + vec] = sum(red[l * cvb + cv] for l in range(lanes))
    return partial.sum(0)


for rows, C, vec in [
    (100, 3, 1),
    (1000, 64, 8),
    (300, 1000, 8),
    (70, 4096, 8),
    (129, 12, 4),
    (5, 2048, 8),
]:
    g = rng.integers(-3, 4, (rows, C)).astype(float)
    assert np.array_equal(reduce_sim(g, C, vec), g.sum(0)), (rows, C)
    print("reduce ok", rows, C, vec, plan(rows, C, vec, 1))

print("lane_sim: all checks passed")
