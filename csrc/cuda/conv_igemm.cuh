// Implicit-GEMM convolution, NHWC activations x KRSC weights, one kernel family for
//   conv_bias_act (epilogue: + bias[k], + residual, ReLU),
//   conv_stats    (prologue: a = relu?(x * pre_scale[c] + pre_shift[c]) applied in shared memory;
//                  epilogue: per-CTA per-channel sum / sum of squares of the stored output),
//   conv_bwd dgrad (the gather form over grad_out; the weight read in its stored KRSC layout:
//                  B k-major in shared memory, ldmatrix.trans, no transposed copy per call).
//
// Data path (one CTA computes a BM x BN tile of out[M = N*OH*OW, OC]):
//   global --cp.async 16 B (zero-fill for padding / masked rows / masked channels)--> shared,
//   STAGES-deep pipeline over the reduction (r, s, channel block of BK = 64 bytes);
//   shared --ldmatrix.x4--> registers --mma.sync--> fp32 accumulators (or SIMT FMA for exact fp32);
//   accumulators --> fp32 tile in shared (reusing the pipeline buffers) --> bias/residual/ReLU,
//   rounded to T, 16-byte stores; the stats read the rounded values back from the same tile.
// The kernel (conv_igemm_kernel, after its stages) runs these stages, each a __forceinline__
// function: conv_mainloop (the gather and the pipeline; conv_mma_stage multiplies one stage),
// conv_acc_to_smem and conv_epilogue (the output), conv_tile_stats (the statistics).
//
// Each thread issues cp.async for fixed 16-byte chunks (column tid % 4 of each of its rows), so
// after cp.async.wait_group it may read and rewrite its own chunks without a barrier: that is
// where the prologue transform runs, before the barrier that precedes ldmatrix. Padding pixels
// and channels >= XC are never transformed, so they stay exactly zero, as the reference pads the
// transformed tensor.
#pragma once

#include <type_traits>

#include "fr_common.cuh"

// Planted bugs for cudasim's self-test (tests/test_cudasim.py builds csrc/cuda/cudasim/harness.cpp
// with -DFR_PLANT=n; a checker must fail on broken code): 1 cp.async.wait_group one group too
// early, 2 the main loop's barrier removed, 3 a wrong ldmatrix lane -> row mapping, 4 padding
// taps read from global memory (outside the tensor). 0, the default, plants nothing.
#ifndef FR_PLANT
#define FR_PLANT 0
#endif

namespace fastres {
namespace cuda {

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_CTAS_ = 1>
struct ConvCfg {
  static constexpr int BM = BM_;
  static constexpr int BN = BN_;
  static constexpr int WARPS_M = WARPS_M_;
  static constexpr int WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  // CTAs per SM the config is sized for (__launch_bounds__' second argument: ptxas keeps the
  // registers within 65536 / (MIN_CTAS * THREADS)).
  static constexpr int MIN_CTAS = MIN_CTAS_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M;  // warp tile (tensor-core path)
  static constexpr int WN = BN / WARPS_N;
  static constexpr int A_STAGE = BM * 64;  // bytes: BM rows of one 64-byte reduction slice
  static constexpr int B_STAGE = BN * 64;
  static constexpr int PIPE_BYTES = STAGES * (A_STAGE + B_STAGE);
  static constexpr int CS_LD = BN + 4;  // fp32 epilogue tile row pitch (+4: fewer bank conflicts)
  // + the stats epilogue's per-thread (sum, sum of squares) in double: 2 * THREADS * 8 bytes.
  static constexpr int EPI_BYTES = BM * CS_LD * 4 + 2 * THREADS * 8;
  static constexpr int SMEM = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
};

// 16-bit tensor cores: 128 x 128 (8 warps, 64 x 32 each) for OC > 64, 128 x 64 (4 warps) else.
// The big tile's 69,632 B of shared memory allow 2 CTAs per SM (228 KB); so do 128 registers.
using CfgTcBig = ConvCfg<128, 128, 2, 4, 4, 2>;
using CfgTcSmall = ConvCfg<128, 64, 2, 2, 4>;
// Exact fp32: 64 x 64, 256 threads with 4 x 4 outputs each.
using CfgSimt = ConvCfg<64, 64, 4, 2, 3>;

// One thread's accumulators: tensor-core fragments acc[MI][NI] (its warp's WM x WN tile in m16n8
// tiles) or, for SIMT, sacc (rows ty + 16 i, cols tx + 16 j). The path not taken is dead code.
template <Math MATH, class Cfg>
struct ConvAcc {
  static constexpr int MI = (MATH == Math::kSimt) ? 1 : Cfg::WM / 16;
  static constexpr int NI = (MATH == Math::kSimt) ? 2 : Cfg::WN / 8;
  static_assert(MATH == Math::kSimt || (Cfg::WM % 16 == 0 && Cfg::WN % 16 == 0), "warp tile");
  static_assert(MATH != Math::kSimt || (Cfg::BM == 64 && Cfg::BN == 64 && Cfg::THREADS == 256),
                "SIMT tile");
  float acc[MI][NI][4];
  float sacc[4][4];
};

// ---- main loop, math: the A and B slices of one pipeline stage into the accumulators ----
// tid: the thread (SIMT path); lane, and the warp's tile row wm and column wn (tensor cores).
// B is n-major (BN rows of one 64-byte reduction slice, swz64) or, with KMAJOR (dgrad: the KRSC
// weight's rows are the reduction), k-major: BK rows of BN elements (kmajor_b_off).
template <typename T, class Cfg>
__device__ __forceinline__ int kmajor_b_off(int k, int n) {
  constexpr int EPC = 16 / sizeof(T);
  return swz_wide(k, n / EPC, Cfg::BN * static_cast<int>(sizeof(T))) +
         (n % EPC) * static_cast<int>(sizeof(T));
}

template <typename T, Math MATH, class Cfg, bool KMAJOR>
__device__ __forceinline__ void conv_mma_stage(ConvAcc<MATH, Cfg>& c, const unsigned char* a_s,
                                               const unsigned char* b_s, int tid, int lane, int wm,
                                               int wn) {
  constexpr int MI = ConvAcc<MATH, Cfg>::MI;
  constexpr int NI = ConvAcc<MATH, Cfg>::NI;
  // 32-bit B element (k, n) of a k-major stage (TF32 and SIMT: ldmatrix.trans moves 16-bit ones).
  const auto bk32 = [&](int k, int n) {
    return *reinterpret_cast<const uint32_t*>(b_s + kmajor_b_off<T, Cfg>(k, n));
  };
  if constexpr (MATH == Math::kSimt) {
    const int tx = tid & 15;
    const int ty = tid >> 4;
#pragma unroll
    for (int ch = 0; ch < 4; ++ch) {
      float4 av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        av[i] = *reinterpret_cast<const float4*>(a_s + swz64(ty + 16 * i, ch));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (KMAJOR) {
          const int n = tx + 16 * j;
          bv[j] = make_float4(
              __uint_as_float(bk32(4 * ch, n)), __uint_as_float(bk32(4 * ch + 1, n)),
              __uint_as_float(bk32(4 * ch + 2, n)), __uint_as_float(bk32(4 * ch + 3, n)));
        } else {
          bv[j] = *reinterpret_cast<const float4*>(b_s + swz64(tx + 16 * j, ch));
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          c.sacc[i][j] = fmaf(av[i].x, bv[j].x, c.sacc[i][j]);
          c.sacc[i][j] = fmaf(av[i].y, bv[j].y, c.sacc[i][j]);
          c.sacc[i][j] = fmaf(av[i].z, bv[j].z, c.sacc[i][j]);
          c.sacc[i][j] = fmaf(av[i].w, bv[j].w, c.sacc[i][j]);
        }
    }
  } else {
    // One 64-byte slice = two k-steps of 32 bytes (k16 for 16-bit, k8 for TF32).
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t af[MI][4];
      uint32_t bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // matrices: rows 0-7 / 8-15 of chunk 2kk, then of chunk 2kk+1 -> a0..a3
        const int row = wm * Cfg::WM + mi * 16 + (FR_PLANT == 3 ? lane & 7 : lane & 15);
        ldsm_x4(af[mi][0], af[mi][1], af[mi][2], af[mi][3], a_s + swz64(row, kk * 2 + (lane >> 4)));
      }
      if constexpr (!KMAJOR) {
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
          // matrices: (n 0-7, chunk 2kk), (n 0-7, 2kk+1), (n 8-15, 2kk), (n 8-15, 2kk+1)
          const int row = wn * Cfg::WN + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
          ldsm_x4(bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0], bfr[2 * nj + 1][1],
                  b_s + swz64(row, kk * 2 + ((lane >> 3) & 1)));
        }
      } else if constexpr (MATH == Math::kMma16) {
        // k-major, transposed on load: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
        // (k 8-15, n 8-15) of this k16 step; lane 8j + i addresses row i of matrix j.
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
          const int mat = lane >> 3;
          const int k = kk * 16 + ((mat & 1) << 3) + (lane & 7);
          const int n = wn * Cfg::WN + nj * 16 + ((mat >> 1) << 3);
          ldsm_x4_trans(bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0], bfr[2 * nj + 1][1],
                        b_s + kmajor_b_off<T, Cfg>(k, n));
        }
      } else {
        // TF32 m16n8k8, k-major: b0 = B[k = lane % 4][n = lane / 4], b1 at k + 4.
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int n = wn * Cfg::WN + ni * 8 + (lane >> 2);
          bfr[ni][0] = bk32(kk * 8 + (lane & 3), n);
          bfr[ni][1] = bk32(kk * 8 + (lane & 3) + 4, n);
        }
      }
      if constexpr (MATH == Math::kTf32) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int e = 0; e < 4; ++e) af[mi][e] = to_tf32(af[mi][e]);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) bfr[ni][e] = to_tf32(bfr[ni][e]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_tile<T>(c.acc[mi][ni], af[mi], bfr[ni]);
    }
  }
}

// ---- main loop: the STAGES-deep cp.async pipeline over the reduction (r, s, channel block) ----
// Each thread loads the 16-byte chunk column `chunk` of rows row0 + i * ROW_STEP of the A
// (activation) and B (weight) tiles; the gather state of those rows is computed once. Returns
// with this thread's copies all landed; the caller's barrier then frees the pipeline buffers.
template <typename T, Math MATH, class Cfg, bool DGRAD, bool PROLOGUE>
__device__ __forceinline__ void conv_mainloop(const ConvParams& p, unsigned char* smem, int m0,
                                              int n0, int tid, ConvAcc<MATH, Cfg>& c) {
  constexpr int BM = Cfg::BM;
  constexpr int BN = Cfg::BN;
  constexpr int THREADS = Cfg::THREADS;
  constexpr int STAGES = Cfg::STAGES;
  constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
  constexpr int BK = 4 * EPC;          // elements per 64-byte reduction slice
  constexpr int ROW_STEP = THREADS / 4;
  constexpr int A_ITERS = BM / ROW_STEP;
  constexpr int B_ITERS = BN / ROW_STEP;
  static_assert(BM % ROW_STEP == 0 && BN % ROW_STEP == 0, "tile rows must split over threads");

  unsigned char* sA = smem;
  unsigned char* sB = smem + STAGES * Cfg::A_STAGE;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wt = static_cast<const T*>(p.w);

  const int chunk = tid & 3;  // this thread's 16-byte column in every row it loads
  const int row0 = tid >> 2;  // its first row; the others are row0 + i * ROW_STEP

  // ---- per-row gather state of A (output pixel -> input window origin), computed once ----
  int64_t a_img[A_ITERS];  // element offset of image n (can pass 2^31)
  int a_h[A_ITERS], a_w[A_ITERS];
  {
    const int ohw = p.OH * p.OW;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int m = m0 + row0 + i * ROW_STEP;
      if (m < p.M) {
        const int n = m / ohw;
        const int rem = m - n * ohw;
        const int oh = rem / p.OW;
        const int ow = rem - oh * p.OW;
        a_img[i] = static_cast<int64_t>(n) * p.XH * p.XW * p.XC;
        if constexpr (DGRAD) {
          a_h[i] = oh + p.pad_h;
          a_w[i] = ow + p.pad_w;
        } else {
          a_h[i] = oh * p.stride_h - p.pad_h;
          a_w[i] = ow * p.stride_w - p.pad_w;
        }
      } else {  // a row past M: far out of range for every tap, so always zero-filled
        a_img[i] = 0;
        a_h[i] = -(1 << 30);
        a_w[i] = -(1 << 30);
      }
    }
  }
  // Is row i of A in range at tap (r, s)? If so, where is its pixel (element offset)?
  auto a_pixel = [&](int i, int r, int s, int64_t& off) -> bool {
    int h, w;
    bool ok;
    if constexpr (DGRAD) {
      const int th = a_h[i] - r * p.dil_h;
      const int tw = a_w[i] - s * p.dil_w;
      h = th / p.stride_h;
      w = tw / p.stride_w;
      ok = th >= 0 && tw >= 0 && h * p.stride_h == th && w * p.stride_w == tw && h < p.XH &&
           w < p.XW;
    } else {
      h = a_h[i] + r * p.dil_h;
      w = a_w[i] + s * p.dil_w;
      ok = FR_PLANT == 4 || (h >= 0 && h < p.XH && w >= 0 && w < p.XW);
    }
    off = ok ? a_img[i] + (static_cast<int64_t>(h) * p.XW + w) * p.XC : 0;
    return ok;
  };

  // ---- per-row state of B: the forward's weight rows are output channels (oc, r, s, xc); the
  // dgrad's k-major chunks (k, n) of the KRSC weight (w_k, R, S, w_c): 16 bytes along n ----
  constexpr int B_CPR = BN / EPC;  // k-major: 16-byte chunks per k row
  int64_t b_off[B_ITERS];
  bool b_ok[B_ITERS];
  int b_k[B_ITERS];  // k-major: the chunk's row in the stage
  {
    const int64_t rsx = static_cast<int64_t>(p.R) * p.S * p.XC;
#pragma unroll
    for (int j = 0; j < B_ITERS; ++j) {
      if constexpr (DGRAD) {
        const int q = tid + j * THREADS;
        b_k[j] = q / B_CPR;
        const int n = n0 + (q % B_CPR) * EPC;
        b_ok[j] = n < p.w_c;  // w_c % EPC == 0: a chunk is all in or all out
        b_off[j] = b_ok[j] ? n : 0;
      } else {
        const int oc = n0 + row0 + j * ROW_STEP;
        b_ok[j] = oc < p.OC;
        b_off[j] = b_ok[j] ? oc * rsx : 0;
        b_k[j] = 0;
      }
    }
  }
  const int64_t w_krow = static_cast<int64_t>(p.R) * p.S * p.w_c;  // dgrad: one k of the weight

  const int cblocks = (p.XC + BK - 1) / BK;
  const int k_iters = p.R * p.S * cblocks;

  // Issue the cp.async of reduction step (r, s, cb) into pipeline stage `stage`.
  auto load_stage = [&](int stage, int r, int s, int cb) {
    const int c = cb * BK + chunk * EPC;
    const bool c_ok = c < p.XC;  // XC % EPC == 0: a chunk is all in or all out
    unsigned char* dst_a = sA + stage * Cfg::A_STAGE;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      int64_t off;
      const bool ok = a_pixel(i, r, s, off) && c_ok;
      cp_async16(dst_a + swz64(row0 + i * ROW_STEP, chunk), ok ? x + off + c : x, ok);
    }
    unsigned char* dst_b = sB + stage * Cfg::B_STAGE;
    if constexpr (DGRAD) {
      const int64_t tap = static_cast<int64_t>(r * p.S + s) * p.w_c;
#pragma unroll
      for (int j = 0; j < B_ITERS; ++j) {
        const int k = cb * BK + b_k[j];
        const bool ok = b_ok[j] && k < p.w_k;  // k >= K: the zero padding of the reduction
        const int q = tid + j * THREADS;
        cp_async16(dst_b + swz_wide(b_k[j], q % B_CPR, BN * static_cast<int>(sizeof(T))),
                   ok ? wt + k * w_krow + tap + b_off[j] : wt, ok);
      }
    } else {
      const int64_t tap = static_cast<int64_t>(r * p.S + s) * p.XC + c;
#pragma unroll
      for (int j = 0; j < B_ITERS; ++j) {
        const bool ok = b_ok[j] && c_ok;
        cp_async16(dst_b + swz64(row0 + j * ROW_STEP, chunk), ok ? wt + b_off[j] + tap : wt, ok);
      }
    }
  };

  // The prologue on this thread's own A chunks of `stage` (loaded at step (r, s, cb)).
  auto transform_stage = [&](int stage, int r, int s, int cb) {
    const int c = cb * BK + chunk * EPC;
    if (c >= p.XC) return;
    const PrologueChunk<T> pro(p.pre_scale, p.pre_shift, c);
    unsigned char* base = sA + stage * Cfg::A_STAGE;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      int64_t off;
      if (!a_pixel(i, r, s, off)) continue;  // padding stays zero
      pro.apply(base + swz64(row0 + i * ROW_STEP, chunk), p.pre_relu);
    }
  };

  // This thread's lane and its warp's place in the tile (tensor-core paths).
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % Cfg::WARPS_M;
  const int wn = warp / Cfg::WARPS_M;
  zero_acc(c.acc, c.sacc);

  // ---- the pipeline ----
  int ld_r = 0, ld_s = 0, ld_cb = 0;  // next step to load
  int cs_r = 0, cs_s = 0, cs_cb = 0;  // next step to consume (prologue only)
  auto advance = [&](int& r, int& s, int& cb) {
    if (++cb == cblocks) {
      cb = 0;
      if (++s == p.S) {
        s = 0;
        ++r;
      }
    }
  };
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < k_iters) {
      load_stage(st, ld_r, ld_s, ld_cb);
      advance(ld_r, ld_s, ld_cb);
    }
    cp_async_commit();  // always commit (possibly empty) so group counting stays uniform
  }
  for (int it = 0; it < k_iters; ++it) {
    cp_async_wait<STAGES - 2 + (FR_PLANT == 1)>();  // this thread's copies for step `it` landed
    const int stage = it % STAGES;
    if constexpr (PROLOGUE) {
      transform_stage(stage, cs_r, cs_s, cs_cb);
      advance(cs_r, cs_s, cs_cb);
    }
    if (FR_PLANT != 2) __syncthreads();  // all copies (transforms) of `it` seen; it-1 consumed
    const int nxt = it + STAGES - 1;
    if (nxt < k_iters) {
      load_stage(nxt % STAGES, ld_r, ld_s, ld_cb);  // refills the stage step it-1 used
      advance(ld_r, ld_s, ld_cb);
    }
    cp_async_commit();
    conv_mma_stage<T, MATH, Cfg, DGRAD>(c, sA + stage * Cfg::A_STAGE, sB + stage * Cfg::B_STAGE,
                                        tid, lane, wm, wn);
  }
  cp_async_wait<0>();
}

// ---- epilogue: the accumulators into the fp32 tile cs (BM x BN, row pitch CS_LD) ----
template <Math MATH, class Cfg>
__device__ __forceinline__ void conv_acc_to_smem(const ConvAcc<MATH, Cfg>& c, float* cs, int tid) {
  constexpr int LD = Cfg::CS_LD;
  if constexpr (MATH == Math::kSimt) {
    const int tx = tid & 15;
    const int ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) cs[(ty + 16 * i) * LD + tx + 16 * j] = c.sacc[i][j];
  } else {
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp % Cfg::WARPS_M;
    const int wn = warp / Cfg::WARPS_M;
#pragma unroll
    for (int mi = 0; mi < ConvAcc<MATH, Cfg>::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < ConvAcc<MATH, Cfg>::NI; ++ni) {
        const int row = wm * Cfg::WM + mi * 16 + (lane >> 2);
        const int col = wn * Cfg::WN + ni * 8 + 2 * (lane & 3);
        *reinterpret_cast<float2*>(cs + row * LD + col) =
            make_float2(c.acc[mi][ni][0], c.acc[mi][ni][1]);
        *reinterpret_cast<float2*>(cs + (row + 8) * LD + col) =
            make_float2(c.acc[mi][ni][2], c.acc[mi][ni][3]);
      }
  }
}

// ---- epilogue: the tile (* scale) + bias, + residual, ReLU, rounded to T, 16-byte stores ----
// With STATS the tile keeps the stored (rounded) values, zero outside the output, for the stats.
template <typename T, class Cfg, bool STATS, bool BIAS, bool RESIDUAL, bool RELU>
__device__ __forceinline__ void conv_epilogue(const ConvParams& p, float* cs, int m0, int n0,
                                              int tid) {
  constexpr int BM = Cfg::BM;
  constexpr int LD = Cfg::CS_LD;
  constexpr int EPC = 16 / sizeof(T);    // elements per 16-byte chunk
  constexpr int GROUPS = Cfg::BN / EPC;  // 16-byte output groups per tile row
  T* __restrict__ out = static_cast<T*>(p.out);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  const bool vec_ok = (p.OC % EPC) == 0;  // 16-byte aligned rows (base pointers are aligned)
  for (int idx = tid; idx < BM * GROUPS; idx += Cfg::THREADS) {
    const int row = idx / GROUPS;
    const int cg = idx - row * GROUPS;
    const int m = m0 + row;
    const int k0 = n0 + cg * EPC;
    float* crow = cs + row * LD + cg * EPC;
    if (m < p.M && k0 < p.OC) {
      float v[EPC];
#pragma unroll
      for (int e = 0; e < EPC; ++e) v[e] = crow[e];
      const int64_t off = static_cast<int64_t>(m) * p.OC + k0;
      if constexpr (BIAS) {
        if (p.bn_var != nullptr) {  // the BatchNorm itself, from its live tensors
#pragma unroll
          for (int e = 0; e < EPC; ++e) {
            const int k = k0 + e;
            if (k < p.OC) {  // one rounding per operation, as the reference's s and t
              float s = 1.0f / sqrtf(__fadd_rn(ld_as_f(p.bn_var, p.bn_dtype, k), p.bn_eps));
              if (p.bn_weight != nullptr) s = __fmul_rn(s, ld_as_f(p.bn_weight, p.bn_dtype, k));
              const float ms = __fmul_rn(ld_as_f(p.bn_mean, p.bn_dtype, k), s);
              const float t =
                  p.bn_bias != nullptr ? __fsub_rn(ld_as_f(p.bn_bias, p.bn_dtype, k), ms) : -ms;
              v[e] = __fadd_rn(__fmul_rn(v[e], s), t);
            }
          }
        } else if (p.scale != nullptr) {  // a BatchNorm's scale, not folded into the weight
#pragma unroll
          for (int e = 0; e < EPC; ++e)
            if (k0 + e < p.OC)  // two roundings, as the reference's multiply then add
              v[e] = __fadd_rn(__fmul_rn(v[e], __ldg(p.scale + k0 + e)), __ldg(p.bias + k0 + e));
        } else {
#pragma unroll
          for (int e = 0; e < EPC; ++e)
            if (k0 + e < p.OC) v[e] += __ldg(p.bias + k0 + e);
        }
      }
      if constexpr (RESIDUAL) {
        if (vec_ok) {
          Vec16<T> r;
          r.u = *reinterpret_cast<const uint4*>(res + off);
#pragma unroll
          for (int e = 0; e < EPC; ++e) v[e] += to_f(r.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < EPC; ++e)
            if (k0 + e < p.OC) v[e] += to_f(res[off + e]);
        }
      }
      Vec16<T> o;
#pragma unroll
      for (int e = 0; e < EPC; ++e) {
        if constexpr (RELU) v[e] = v[e] < 0.f ? 0.f : v[e];
        o.v[e] = from_f<T>(v[e]);
      }
      if (vec_ok) {
        *reinterpret_cast<uint4*>(out + off) = o.u;
      } else {
#pragma unroll
        for (int e = 0; e < EPC; ++e)
          if (k0 + e < p.OC) out[off + e] = o.v[e];
      }
      if constexpr (STATS) {
#pragma unroll
        for (int e = 0; e < EPC; ++e) crow[e] = (k0 + e < p.OC) ? to_f(o.v[e]) : 0.f;
      }
    } else if constexpr (STATS) {
#pragma unroll
      for (int e = 0; e < EPC; ++e) crow[e] = 0.f;
    }
  }
}

// ---- statistics: this CTA's per-channel sum and sum of squares of the stored tile ----
// Column sums of the rounded tile in a fixed order: PARTS threads per column each sum a
// contiguous run of rows, then thread `col` adds the PARTS results in order. No atomics.
// Accumulated in double, as the reference and the CPU kernels do: in fp32, sum of squares
// E[x^2] - E[x]^2 loses the variance when |mean| >> std (the conv_stats device test missed
// the tolerance at 16-32 channels). Hopper's FP64 rate is half its FP32 rate and this loop
// is RPP (<= 64) adds per thread per tile, noise next to the tile's MMAs.
//
// p by value, like the kernel's own parameter: the compiler may then read p.OC before it knows
// that tid < BN (one predicate instead of a branch), the code this stage compiled to in the kernel.
template <class Cfg>
__device__ __forceinline__ void conv_tile_stats(const ConvParams p, float* cs, int tile_m, int n0,
                                                int tid) {
  constexpr int BM = Cfg::BM;
  constexpr int BN = Cfg::BN;
  constexpr int THREADS = Cfg::THREADS;
  constexpr int LD = Cfg::CS_LD;
  constexpr int PARTS = THREADS / BN;
  constexpr int RPP = BM / PARTS;
  static_assert(THREADS % BN == 0 && BM % PARTS == 0, "stats layout");
  const int col = tid % BN;
  const int part = tid / BN;
  double s = 0.0, q = 0.0;
#pragma unroll 4
  for (int r = 0; r < RPP; ++r) {
    const double v = cs[(part * RPP + r) * LD + col];
    s += v;
    q = fma(v, v, q);
  }
  double* red = reinterpret_cast<double*>(cs + BM * LD);  // BM * LD * 4 is a multiple of 8
  red[tid] = s;
  red[THREADS + tid] = q;
  __syncthreads();
  if (tid < BN && n0 + tid < p.OC) {
    double S = 0.0, Q = 0.0;
#pragma unroll
    for (int pp = 0; pp < PARTS; ++pp) {
      S += red[pp * BN + tid];
      Q += red[THREADS + pp * BN + tid];
    }
    p.stats_partial[static_cast<int64_t>(tile_m) * p.OC + n0 + tid] = S;
    p.stats_partial[(static_cast<int64_t>(p.m_tiles) + tile_m) * p.OC + n0 + tid] = Q;
  }
}

// The kernel: main loop, then the epilogue through the fp32 tile in the pipeline's shared memory.
template <typename T, Math MATH, class Cfg, bool DGRAD, bool PROLOGUE, bool STATS, bool BIAS,
          bool RESIDUAL, bool RELU>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS)
    conv_igemm_kernel(const ConvParams p) {
  static_assert(MATH != Math::kSimt || std::is_same<T, float>::value, "SIMT path is fp32 only");
  static_assert(MATH != Math::kTf32 || std::is_same<T, float>::value, "TF32 path is fp32 only");
  static_assert(MATH != Math::kMma16 || sizeof(T) == 2, "mma m16n8k16 path is 16-bit only");
  FR_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  // n-tile fastest: the CTAs sharing one activation tile run together and hit it in L2.
  const int tile_n = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.n_tiles));
  const int tile_m = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.n_tiles));
  const int m0 = tile_m * Cfg::BM;
  const int n0 = tile_n * Cfg::BN;

  ConvAcc<MATH, Cfg> c;
  conv_mainloop<T, MATH, Cfg, DGRAD, PROLOGUE>(p, smem, m0, n0, tid, c);
  __syncthreads();  // the pipeline buffers become the fp32 epilogue tile
  float* cs = reinterpret_cast<float*>(smem);
  conv_acc_to_smem(c, cs, tid);
  __syncthreads();
  conv_epilogue<T, Cfg, STATS, BIAS, RESIDUAL, RELU>(p, cs, m0, n0, tid);
  if constexpr (STATS) {
    __syncthreads();  // the rounded tile complete
    conv_tile_stats<Cfg>(p, cs, tile_m, n0, tid);
  }
}

template <typename T, Math MATH, class Cfg, bool DGRAD, bool PROLOGUE, bool STATS, bool BIAS,
          bool RESIDUAL, bool RELU>
cudaError_t launch_conv_kernel(ConvParams& p, cudaStream_t stream) {
  auto kernel = conv_igemm_kernel<T, MATH, Cfg, DGRAD, PROLOGUE, STATS, BIAS, RESIDUAL, RELU>;
  const int m_tiles = (p.M + Cfg::BM - 1) / Cfg::BM;
  if (p.stats && m_tiles != p.m_tiles) return cudaErrorInvalidValue;  // partials sized wrongly
  p.m_tiles = m_tiles;
  p.n_tiles = (p.OC + Cfg::BN - 1) / Cfg::BN;
  const int64_t grid = static_cast<int64_t>(p.m_tiles) * p.n_tiles;
  if (grid <= 0 || grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  static SmemOptIn opt_in;  // one per instantiation: once per kernel and device
  FR_RETURN_IF_ERROR(opt_in.ensure(kernel, Cfg::SMEM));
  FR_LAUNCH(static_cast<unsigned>(grid), Cfg::THREADS, Cfg::SMEM, stream, kernel)(p);
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

// Flags -> template parameters. Only the combinations the ops use are instantiated:
// dgrad (no options), conv_stats (prologue or not), conv_bias_act (bias x residual x relu).
template <typename T, Math MATH, class Cfg>
cudaError_t launch_conv_flags(ConvParams& p, cudaStream_t stream) {
  if (p.dgrad) {
    if (p.prologue || p.stats || p.has_bias || p.has_residual || p.relu)
      return cudaErrorInvalidValue;
    return launch_conv_kernel<T, MATH, Cfg, true, false, false, false, false, false>(p, stream);
  }
  if (p.stats) {
    if (p.has_bias || p.has_residual || p.relu) return cudaErrorInvalidValue;
    return FR_BOOL_SWITCH(p.prologue, PRO, [&] {
      return launch_conv_kernel<T, MATH, Cfg, false, PRO, true, false, false, false>(p, stream);
    });
  }
  if (p.prologue) return cudaErrorInvalidValue;
  return FR_BOOL_SWITCH(p.has_bias, HAS_BIAS, [&] {
    return FR_BOOL_SWITCH(p.has_residual, HAS_RES, [&] {
      return FR_BOOL_SWITCH(p.relu, RELU, [&] {
        return launch_conv_kernel<T, MATH, Cfg, false, false, false, HAS_BIAS, HAS_RES, RELU>(
            p, stream);
      });
    });
  });
}

// 16-bit: the tile by output channels (a 128-wide tile would be half empty at OC <= 64).
template <typename T>
cudaError_t launch_conv_mma16(ConvParams& p, cudaStream_t stream) {
  if (p.OC <= 64) return launch_conv_flags<T, Math::kMma16, CfgTcSmall>(p, stream);
  return launch_conv_flags<T, Math::kMma16, CfgTcBig>(p, stream);
}

}  // namespace cuda
}  // namespace fastres
