// Weight gradient of the convolution as an implicit GEMM reducing over the output pixels:
//   dw[k, (r, s, c)] = sum over rows j = (n, p, q) of grad_out[j, k] * a[n, h(p, r), w(q, s), c]
// with a = relu?(x * pre_scale + pre_shift) recomputed on load (the prologue of conv_stats; the
// transformed activation is never stored).
//
// Both operands are read with the reduction index j as the row, so they land in shared memory
// "k-major" (rows of j, output channels / input channels contiguous) and the 16-bit path feeds
// mma.sync through ldmatrix.trans. A CTA owns a BM (k) x BN (c, within one tap (r, s)) tile and
// one slice of the rows; its fp32 partial goes to a workspace (splits, K, R*S*C) that a second
// kernel sums over the splits in a fixed order: deterministic, no float atomics.
//
// fp32 uses exact FMA on the SIMT cores (TF32 ldmatrix.trans would split 32-bit elements).
#include "fr_common.cuh"

namespace fastres {
namespace cuda {

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_,
          int MIN_CTAS_ = 1>
struct WgradCfg {
  static constexpr int BM = BM_;  // output channels k
  static constexpr int BN = BN_;  // input channels c (one tap)
  static constexpr int BK = BK_;  // reduction rows (n, p, q) per pipeline step
  static constexpr int WARPS_M = WARPS_M_;
  static constexpr int WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int MIN_CTAS = MIN_CTAS_;  // CTAs per SM it is sized for (launch bounds)
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M;
  static constexpr int WN = BN / WARPS_N;
};
// 16-bit, K > 64 and C > 64: 65,536 B of shared memory and <= 128 registers, 2 CTAs per SM.
using WgCfgBig = WgradCfg<128, 128, 32, 2, 4, 4, 2>;
using WgCfgSmall = WgradCfg<64, 64, 32, 2, 2, 4>;  // 16-bit, K <= 64 or C <= 64
using WgCfgSimt = WgradCfg<64, 64, 16, 4, 2, 3>;   // fp32: 4 x 4 outputs per thread

template <class Cfg, typename T>
constexpr int wgrad_smem_bytes() {
  return Cfg::STAGES * Cfg::BK * (Cfg::BM + Cfg::BN) * static_cast<int>(sizeof(T));
}

template <typename T, bool SIMT, class Cfg, bool PROLOGUE>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS)
    wgrad_kernel(const WgradParams p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  constexpr int THREADS = Cfg::THREADS, STAGES = Cfg::STAGES;
  constexpr int EPC = 16 / sizeof(T);
  constexpr int A_RB = BM * sizeof(T);  // bytes per shared row (>= 128 for the XOR swizzle)
  constexpr int B_RB = BN * sizeof(T);
  constexpr int A_CPR = BM / EPC;  // 16-byte chunks per row
  constexpr int B_CPR = BN / EPC;
  constexpr int A_RSTEP = THREADS / A_CPR;
  constexpr int B_RSTEP = THREADS / B_CPR;
  constexpr int A_ITERS = BK / A_RSTEP;
  constexpr int B_ITERS = BK / B_RSTEP;
  constexpr int A_STAGE = BK * A_RB;
  constexpr int B_STAGE = BK * B_RB;
  static_assert(A_RB >= 128 && B_RB >= 128, "swizzle needs 8+ chunks per row");
  static_assert(THREADS % A_CPR == 0 && THREADS % B_CPR == 0, "chunk mapping");
  static_assert(BK % A_RSTEP == 0 && BK % B_RSTEP == 0, "row mapping");
  static_assert(!SIMT || (sizeof(T) == 4 && BM == 64 && BN == 64 && THREADS == 256), "SIMT");
  static_assert(SIMT || sizeof(T) == 2, "tensor-core wgrad is 16-bit only");

  FR_DYNAMIC_SMEM(smem);
  unsigned char* sA = smem;
  unsigned char* sB = smem + STAGES * A_STAGE;

  const int tid = threadIdx.x;
  const int cblocks = (p.C + BN - 1) / BN;
  unsigned bid = blockIdx.x;
  const int tile_m = static_cast<int>(bid % static_cast<unsigned>(p.m_tiles));
  bid /= static_cast<unsigned>(p.m_tiles);
  const int tile_n = static_cast<int>(bid % static_cast<unsigned>(p.n_tiles));
  const int split = static_cast<int>(bid / static_cast<unsigned>(p.n_tiles));
  const int tap = tile_n / cblocks;
  const int cb = tile_n - tap * cblocks;
  const int r = tap / p.S;
  const int s = tap - r * p.S;
  const int k0 = tile_m * BM;
  const int c0 = cb * BN;
  const int64_t row_begin = static_cast<int64_t>(split) * p.rows_per_split;
  int64_t row_end = row_begin + p.rows_per_split;
  if (row_end > p.NPQ) row_end = p.NPQ;
  const int k_iters =
      row_end > row_begin ? static_cast<int>((row_end - row_begin + BK - 1) / BK) : 0;

  const T* __restrict__ go = static_cast<const T*>(p.grad_out);
  const T* __restrict__ x = static_cast<const T*>(p.x);

  const int a_chunk = tid % A_CPR;
  const int a_row0 = tid / A_CPR;
  const int b_chunk = tid % B_CPR;
  const int b_row0 = tid / B_CPR;
  const int a_k = k0 + a_chunk * EPC;
  const bool a_k_ok = a_k < p.K;  // K % EPC == 0: all in or all out
  const int b_c = c0 + b_chunk * EPC;
  const bool b_c_ok = b_c < p.C;
  const int PQ = p.P * p.Q;

  // Element offset of a[row j] at this CTA's tap, or false when padding / past the slice.
  auto b_pixel = [&](int64_t j, int64_t& off) -> bool {
    if (j >= row_end) return false;
    const int64_t n = j / PQ;
    const int rem = static_cast<int>(j - n * PQ);
    const int pp = rem / p.Q;
    const int q = rem - pp * p.Q;
    const int h = pp * p.stride_h - p.pad_h + r * p.dil_h;
    const int w = q * p.stride_w - p.pad_w + s * p.dil_w;
    if (h < 0 || h >= p.H || w < 0 || w >= p.W) return false;
    off = ((n * p.H + h) * p.W + w) * p.C;
    return true;
  };

  auto load_stage = [&](int stage, int kt) {
    const int64_t jb = row_begin + static_cast<int64_t>(kt) * BK;
    unsigned char* dst_a = sA + stage * A_STAGE;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int row = a_row0 + i * A_RSTEP;
      const int64_t j = jb + row;
      const bool ok = a_k_ok && j < row_end;
      cp_async16(dst_a + swz_wide(row, a_chunk, A_RB), ok ? go + j * p.K + a_k : go, ok);
    }
    unsigned char* dst_b = sB + stage * B_STAGE;
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int row = b_row0 + i * B_RSTEP;
      int64_t off = 0;
      const bool ok = b_c_ok && b_pixel(jb + row, off);
      cp_async16(dst_b + swz_wide(row, b_chunk, B_RB), ok ? x + off + b_c : x, ok);
    }
  };

  // Prologue on this thread's own B chunks (see conv_igemm.cuh: no barrier needed before it).
  auto transform_stage = [&](int stage, int kt) {
    if (!b_c_ok) return;
    const PrologueChunk<T> pro(p.pre_scale, p.pre_shift, b_c);
    const int64_t jb = row_begin + static_cast<int64_t>(kt) * BK;
    unsigned char* base = sB + stage * B_STAGE;
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int row = b_row0 + i * B_RSTEP;
      int64_t off;
      if (!b_pixel(jb + row, off)) continue;  // padding stays zero
      pro.apply(base + swz_wide(row, b_chunk, B_RB), p.pre_relu);
    }
  };

  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % Cfg::WARPS_M;
  const int wn = warp / Cfg::WARPS_M;
  constexpr int MI = SIMT ? 1 : Cfg::WM / 16;
  constexpr int NI = SIMT ? 2 : Cfg::WN / 8;
  float acc[MI][NI][4];
  float sacc[4][4];  // SIMT: k = ty*4 + i, c = tx*4 + j; this pipeline step's BK rows
  zero_acc(acc, sacc);
  // SIMT (exact fp32): the steps' sums are added in double. One fp32 accumulator over a split's
  // rows (hundreds to ~10^5) missed the tolerance rule already at 198 rows on cudasim (wgrad err
  // 7.0e-5 against PyTorch's 2.3e-5, bound 5.5e-5); a double add per 16 FMAs is ~6 % more work on
  // a path that is for exactness, not speed.
  double dacc[SIMT ? 4 : 1][SIMT ? 4 : 1] = {};

  auto compute_stage = [&](int stage) {
    const unsigned char* a_s = sA + stage * A_STAGE;
    const unsigned char* b_s = sB + stage * B_STAGE;
    if constexpr (SIMT) {
      const int tx = tid & 15;
      const int ty = tid >> 4;
#pragma unroll
      for (int kr = 0; kr < BK; ++kr) {
        const float4 a = *reinterpret_cast<const float4*>(a_s + swz_wide(kr, ty, A_RB));
        const float4 b = *reinterpret_cast<const float4*>(b_s + swz_wide(kr, tx, B_RB));
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sacc[i][j] = fmaf(av[i], bv[j], sacc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          dacc[i][j] += sacc[i][j];
          sacc[i][j] = 0.f;
        }
    } else {
      const int q = lane >> 3;  // which 8x8 matrix this lane addresses
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[MI][4];
        uint32_t bfr[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          // matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15),
          // transposed on load -> a0..a3 of the row-major A fragment
          const int krow = kk * 16 + ((q >> 1) << 3) + (lane & 7);
          const int mch = (wm * Cfg::WM + mi * 16) / 8 + (q & 1);
          ldsm_x4_trans(af[mi][0], af[mi][1], af[mi][2], af[mi][3],
                        a_s + swz_wide(krow, mch, A_RB));
        }
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
          // matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
          const int krow = kk * 16 + ((q & 1) << 3) + (lane & 7);
          const int nch = (wn * Cfg::WN + nj * 16) / 8 + (q >> 1);
          ldsm_x4_trans(bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0], bfr[2 * nj + 1][1],
                        b_s + swz_wide(krow, nch, B_RB));
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma_tile<T>(acc[mi][ni], af[mi], bfr[ni]);
      }
    }
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < k_iters) load_stage(st, st);
    cp_async_commit();
  }
  for (int it = 0; it < k_iters; ++it) {
    cp_async_wait<STAGES - 2>();
    const int stage = it % STAGES;
    if constexpr (PROLOGUE) transform_stage(stage, it);
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < k_iters) load_stage(nxt % STAGES, nxt);
    cp_async_commit();
    compute_stage(stage);
  }
  cp_async_wait<0>();

  // fp32 partial of this split (every split writes its whole tile, zeros included).
  const int64_t rsc = static_cast<int64_t>(p.R) * p.S * p.C;
  float* ws = p.ws + static_cast<int64_t>(split) * p.K * rsc + static_cast<int64_t>(tap) * p.C;
  if constexpr (SIMT) {
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const int c = c0 + tx * 4;  // C % 4 == 0: the 4 columns are all in or all out
    if (c < p.C) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = k0 + ty * 4 + i;
        if (k < p.K)
          *reinterpret_cast<float4*>(ws + k * rsc + c) =
              make_float4(static_cast<float>(dacc[i][0]), static_cast<float>(dacc[i][1]),
                          static_cast<float>(dacc[i][2]), static_cast<float>(dacc[i][3]));
      }
    }
  } else {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int k = k0 + wm * Cfg::WM + mi * 16 + (lane >> 2);
        const int c = c0 + wn * Cfg::WN + ni * 8 + 2 * (lane & 3);  // C even: c, c+1 both in/out
        if (c >= p.C) continue;
        if (k < p.K)
          *reinterpret_cast<float2*>(ws + k * rsc + c) =
              make_float2(acc[mi][ni][0], acc[mi][ni][1]);
        if (k + 8 < p.K)
          *reinterpret_cast<float2*>(ws + (k + 8) * rsc + c) =
              make_float2(acc[mi][ni][2], acc[mi][ni][3]);
      }
  }
}

// dw[i] = sum over splits of ws[split][i], in split order; one sum per grid row (blockIdx.y).
template <typename T>
__global__ void wgrad_reduce_kernel(const WgradSum a, const WgradSum b) {
  const WgradSum& s = blockIdx.y == 0 ? a : b;
  wgrad_sum_range<T>(s.ws, static_cast<T*>(s.dw), s.n, s.splits,
                     blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T>
cudaError_t launch_wgrad_reduce(const WgradSum& a, const WgradSum* b, cudaStream_t stream) {
  const int64_t n = b && b->n > a.n ? b->n : a.n;
  int64_t blocks = (n + 255) / 256;
  if (blocks > 65536) blocks = 65536;
  if (blocks < 1) return cudaSuccess;
  FR_LAUNCH(dim3(static_cast<unsigned>(blocks), b ? 2 : 1), 256, 0, stream,
            wgrad_reduce_kernel<T>)(a, b ? *b : a);
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, bool SIMT, class Cfg>
cudaError_t launch_wgrad_cfg(WgradParams& p, cudaStream_t stream, WgradSum* defer) {
  constexpr int smem = wgrad_smem_bytes<Cfg, T>();
  const int64_t grid = static_cast<int64_t>(p.m_tiles) * p.n_tiles * p.splits;
  if (grid <= 0 || grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  FR_RETURN_IF_ERROR(FR_BOOL_SWITCH(p.prologue, PRO, [&] {
    auto kernel = wgrad_kernel<T, SIMT, Cfg, PRO>;
    static SmemOptIn opt_in;  // one per instantiation: once per kernel and device
    FR_RETURN_IF_ERROR(opt_in.ensure(kernel, smem));
    FR_LAUNCH(static_cast<unsigned>(grid), Cfg::THREADS, smem, stream, kernel)(p);
    return cudaGetLastError();
  }));
  WgradSum sum;
  sum.ws = p.ws;
  sum.dw = p.dw;
  sum.n = static_cast<int64_t>(p.K) * p.R * p.S * p.C;
  sum.splits = p.splits;
  sum.dt = DTypeOf<T>::value;
  if (defer) {
    *defer = sum;
    return cudaSuccess;
  }
  return launch_wgrad_reduce<T>(sum, nullptr, stream);
}

namespace {
// 0: SIMT fp32, 1: small 16-bit tile, 2: big 16-bit tile.
int wgrad_cfg_id(const WgradParams& p, DType dt) {
  if (dt == DType::kFloat32) return 0;
  return (p.K <= 64 || p.C <= 64) ? 1 : 2;
}
}  // namespace

int64_t plan_wgrad(WgradParams& p, DType dt, int num_sms) {
  int bm, bn, bk;
  switch (wgrad_cfg_id(p, dt)) {
    case 0: bm = WgCfgSimt::BM, bn = WgCfgSimt::BN, bk = WgCfgSimt::BK; break;
    case 1: bm = WgCfgSmall::BM, bn = WgCfgSmall::BN, bk = WgCfgSmall::BK; break;
    default: bm = WgCfgBig::BM, bn = WgCfgBig::BN, bk = WgCfgBig::BK; break;
  }
  p.m_tiles = (p.K + bm - 1) / bm;
  p.n_tiles = p.R * p.S * ((p.C + bn - 1) / bn);
  const int64_t tiles = static_cast<int64_t>(p.m_tiles) * p.n_tiles;
  // Enough CTAs for ~2 waves, but at least 16 pipeline steps per split.
  const int64_t want = (2LL * num_sms + tiles - 1) / tiles;
  int64_t max_splits = p.NPQ / (16LL * bk);
  if (max_splits < 1) max_splits = 1;
  int64_t splits = want < max_splits ? want : max_splits;
  if (splits < 1) splits = 1;
  int64_t rows = (p.NPQ + splits - 1) / splits;
  rows = (rows + bk - 1) / bk * bk;
  if (rows < bk) rows = bk;
  p.rows_per_split = rows;
  p.splits = static_cast<int>((p.NPQ + rows - 1) / rows);
  if (p.splits < 1) p.splits = 1;
  return static_cast<int64_t>(p.splits) * p.K * p.R * p.S * p.C;
}

cudaError_t launch_wgrad(WgradParams& p, DType dt, cudaStream_t stream, WgradSum* defer) {
  switch (wgrad_cfg_id(p, dt)) {
    case 0: return launch_wgrad_cfg<float, true, WgCfgSimt>(p, stream, defer);
    case 1:
      if (dt == DType::kBFloat16)
        return launch_wgrad_cfg<__nv_bfloat16, false, WgCfgSmall>(p, stream, defer);
      return launch_wgrad_cfg<__half, false, WgCfgSmall>(p, stream, defer);
    default:
      if (dt == DType::kBFloat16)
        return launch_wgrad_cfg<__nv_bfloat16, false, WgCfgBig>(p, stream, defer);
      return launch_wgrad_cfg<__half, false, WgCfgBig>(p, stream, defer);
  }
}

cudaError_t launch_wgrad_sums(const WgradSum* sums, int count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  if (count > 2) return cudaErrorInvalidValue;
  if (count == 2 && sums[0].dt != sums[1].dt) {
    FR_RETURN_IF_ERROR(launch_wgrad_sums(sums, 1, stream));
    return launch_wgrad_sums(sums + 1, 1, stream);
  }
  const WgradSum* b = count == 2 ? sums + 1 : nullptr;
  return FR_DTYPE_SWITCH(sums[0].dt, T, [&] { return launch_wgrad_reduce<T>(sums[0], b, stream); });
}

}  // namespace cuda
}  // namespace fastres
