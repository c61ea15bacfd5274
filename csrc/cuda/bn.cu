// BatchNorm kernels: finalize, apply + residual + ReLU, and the backward family (ReLU mask,
// per-channel reductions, BatchNorm backward). All memory-bound; the dense paths move 16 bytes
// per access. Per-channel reductions are two-level and deterministic: per-CTA partials in a fixed
// row order, then colsum_kernel adds the partials in a fixed order (no float atomics).
//
// Floating-point operation order mirrors fastres/reference.py where it is cheap to do so
// (__fmul_rn/__fadd_rn keep nvcc from contracting x * scale + shift into one FMA): the recomputed
// ReLU masks then agree bit for bit with the forward pass that produced them.
#include "fr_common.cuh"

namespace fastres {
namespace cuda {

namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    Vec16<T> u;
    u.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = to_f(u.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = to_f(p[e]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    Vec16<T> u;
#pragma unroll
    for (int e = 0; e < VEC; ++e) u.v[e] = from_f<T>(v[e]);
    *reinterpret_cast<uint4*>(p) = u.u;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = from_f<T>(v[e]);
  }
}

// VEC consecutive per-channel floats starting at c (c % VEC == 0; 16-byte aligned base).
template <int VEC>
__device__ __forceinline__ void load_chan(const float* p, int c, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p + c + e));
      v[e] = f.x;
      v[e + 1] = f.y;
      v[e + 2] = f.z;
      v[e + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = __ldg(p + c + e);
  }
}

template <int VEC>
__device__ __forceinline__ void load_chan_or(const float* p, int c, float dflt, float (&v)[VEC]) {
  if (p) {
    load_chan<VEC>(p, c, v);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = dflt;
  }
}

// load_chan_or of a vector in its own dtype dt (a BatchNorm weight, read as the model stores
// it): a 16-byte-aligned float32 one as load_chan, otherwise one element at a time.
template <int VEC>
__device__ __forceinline__ void load_chan_as(const void* p, DType dt, int c, float dflt,
                                             float (&v)[VEC]) {
  if (p && dt == DType::kFloat32 && reinterpret_cast<std::uintptr_t>(p) % 16 == 0) {
    load_chan<VEC>(static_cast<const float*>(p), c, v);
  } else if (p) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = ld_as_f(p, dt, c + e);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = dflt;
  }
}

__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }  // NaN stays NaN

}  // namespace

// ---------------------------------------------------------------------------------------------
// colsum: out_j[c] = sum_t partial[j][t][c]. Block (32 channels) x (32 row lanes).
// ---------------------------------------------------------------------------------------------
namespace {
// Column c's sum over the partials of sum j, in colsum's fixed order: lane ty adds rows
// t = ty, ty + 32, ...; thread (0, tx) then adds the 32 lane sums in lane order (valid there
// only). Called by all 32x32 threads of the CTA (it has a barrier).
__device__ __forceinline__ double colsum_column(const double* partial, int T, int C, int j, int c) {
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const double* base = partial + static_cast<int64_t>(j) * T * C;
  double s = 0.0;
  if (c < C) {
    for (int t = ty; t < T; t += 32) s += base[static_cast<int64_t>(t) * C + c];
  }
  __shared__ double red[32][33];
  red[ty][tx] = s;
  __syncthreads();
  double total = 0.0;
  if (ty == 0) {
#pragma unroll
    for (int y = 0; y < 32; ++y) total += red[y][tx];
  }
  __syncthreads();  // red is reused by the next call
  return total;
}
}  // namespace

__global__ void __launch_bounds__(1024) colsum_kernel(const ColSumParams p) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int j = blockIdx.y;
  const double total = colsum_column(p.partial, p.T, p.C, j, c);
  if (threadIdx.y == 0 && c < p.C) {
    // (a switch, not p.out[j]: a dynamic index into the parameter array costs a stack copy)
    float* dst = j == 0 ? p.out[0] : j == 1 ? p.out[1] : j == 2 ? p.out[2] : p.out[3];
    const float v = static_cast<float>(total);
    dst[c] = v;
    void* cdst = j == 0 ? p.cast[0] : j == 1 ? p.cast[1] : j == 2 ? p.cast[2] : p.cast[3];
    if (cdst) st_as_f(cdst, p.cast_dtype, c, v);
    if (j == 0 && p.cast0b) st_as_f(p.cast0b, p.cast_dtype, c, v);
  }
}

cudaError_t launch_colsum(const ColSumParams& p, cudaStream_t stream) {
  if (p.C <= 0 || p.nsum <= 0) return cudaSuccess;
  if (p.nsum > 4) return cudaErrorInvalidValue;
  const dim3 grid((p.C + 31) / 32, p.nsum);
  FR_LAUNCH(grid, dim3(32, 32), 0, stream, colsum_kernel)(p);
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// bn_finalize: one CTA (C is at most a few thousand), so the read of num_batches_tracked by all
// threads and its increment are ordered by one barrier. bn_finalize_count reads the count from
// the device (count_dev) and, as the reference does with a float32 count tensor, forms the
// unbiasing factor n / (n - 1) in float32; from a host integer it is computed in double and
// rounded once (the reference's Python float).
// ---------------------------------------------------------------------------------------------
namespace {
// The batch's weight of the running statistics' update (nn.BatchNorm2d: momentum, or
// 1 / num_batches_tracked after the increment when None), from the count before the increment.
struct RunningUpdate {
  float keep, take;
};
__device__ __forceinline__ RunningUpdate running_update(const BnFinalizeParams& p,
                                                        int64_t nb_old) {
  const double factor = p.has_momentum ? p.momentum : 1.0 / static_cast<double>(nb_old + 1);
  return {static_cast<float>(1.0 - factor), static_cast<float>(factor)};
}

// Channel c's mean, invstd, scale, shift and running statistics from its sum and sumsq.
__device__ __forceinline__ void finalize_channel(const BnFinalizeParams& p, int c, float sum,
                                                 float sumsq, RunningUpdate u) {
  float cnt, unbias;
  if (p.count_dev) {
    cnt = *p.count_dev;
    unbias = __fdiv_rn(cnt, __fsub_rn(cnt, 1.f));
  } else {
    cnt = static_cast<float>(p.count);
    unbias = static_cast<float>(static_cast<double>(p.count) / static_cast<double>(p.count - 1));
  }
  const float eps = static_cast<float>(p.eps);
  const float mean = __fdiv_rn(sum, cnt);
  float var = __fsub_rn(__fdiv_rn(sumsq, cnt), __fmul_rn(mean, mean));
  var = var < 0.f ? 0.f : var;  // biased variance, clamped as the reference does
  const float invstd = 1.0f / sqrtf(__fadd_rn(var, eps));
  const DType vt = p.vec_dtype;
  const float scale = p.weight ? __fmul_rn(ld_as_f(p.weight, vt, c), invstd) : invstd;
  const float shift = p.bias ? __fsub_rn(ld_as_f(p.bias, vt, c), __fmul_rn(mean, scale))
                             : __fmul_rn(-mean, scale);
  p.mean[c] = mean;
  p.invstd[c] = invstd;
  p.scale[c] = scale;
  p.shift[c] = shift;
  if (p.running_mean)
    st_as_f(p.running_mean, vt, c,
            __fadd_rn(__fmul_rn(ld_rw_f(p.running_mean, vt, c), u.keep), __fmul_rn(u.take, mean)));
  if (p.running_var)
    st_as_f(p.running_var, vt, c,
            __fadd_rn(__fmul_rn(ld_rw_f(p.running_var, vt, c), u.keep),
                      __fmul_rn(u.take, __fmul_rn(var, unbias))));
}
}  // namespace

__global__ void __launch_bounds__(kThreads) bn_finalize_kernel(const BnFinalizeParams p) {
  const int64_t nb_old = p.num_batches_tracked ? *p.num_batches_tracked : 0;
  __syncthreads();  // every thread has read the old count before thread 0 changes it
  if (threadIdx.x == 0 && p.num_batches_tracked) *p.num_batches_tracked = nb_old + 1;
  const RunningUpdate u = running_update(p, nb_old);
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) finalize_channel(p, c, p.sum[c], p.sumsq[c], u);
}

cudaError_t launch_bn_finalize(const BnFinalizeParams& p, cudaStream_t stream) {
  FR_LAUNCH(1, kThreads, 0, stream, bn_finalize_kernel)(p);
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

// colsum of (sum, sumsq) and bn_finalize in one launch, colsum's grid: each CTA finalizes its 32
// channels from the sums it has just made (the same values, in the same order, as the two
// launches). The count of batches is read by no CTA (momentum set, or no count): CTA 0 increments
// it alone. Otherwise (momentum=None reads the count in every CTA before one increments it), the
// two launches.
__global__ void __launch_bounds__(1024) colsum_finalize_kernel(const ColSumParams cs,
                                                               const BnFinalizeParams p) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const float sum = static_cast<float>(colsum_column(cs.partial, cs.T, cs.C, 0, c));
  const float sumsq = static_cast<float>(colsum_column(cs.partial, cs.T, cs.C, 1, c));
  if (threadIdx.y != 0) return;
  if (c == 0 && p.num_batches_tracked) *p.num_batches_tracked += 1;
  if (c >= p.C) return;
  cs.out[0][c] = sum;
  cs.out[1][c] = sumsq;
  finalize_channel(p, c, sum, sumsq, running_update(p, 0));
}

bool colsum_finalize_fusable(const BnFinalizeParams& p) {
  return p.has_momentum || !p.num_batches_tracked;
}

cudaError_t launch_colsum_finalize(const ColSumParams& cs, const BnFinalizeParams& p,
                                   cudaStream_t stream) {
  if (cs.nsum != 2 || cs.C != p.C) return cudaErrorInvalidValue;
  if (!colsum_finalize_fusable(p)) {
    FR_RETURN_IF_ERROR(launch_colsum(cs, stream));
    return launch_bn_finalize(p, stream);
  }
  if (p.C <= 0) return cudaSuccess;
  FR_LAUNCH(dim3((p.C + 31) / 32), dim3(32, 32), 0, stream, colsum_finalize_kernel)(cs, p);
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// bn_add_relu. Dense path: x, out (and residual) channels_last-dense with C % VEC == 0, VEC
// elements (16 bytes) per thread per step. Generic path: any strides, one element per step,
// iterating in out's physical order (channels_last or NCHW) so the writes stay coalesced.
// ---------------------------------------------------------------------------------------------
template <typename T, bool HAS_RES, bool RES_AFFINE, bool RELU>
__global__ void __launch_bounds__(kThreads) bn_add_relu_dense_kernel(const BnAddReluParams p) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t numel = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
  const int64_t nvec = numel / VEC;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.res);
  T* __restrict__ out = static_cast<T*>(p.out);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = v * VEC;
    const int c0 = static_cast<int>(off % p.C);
    float xv[VEC], sc[VEC], sh[VEC], z[VEC];
    load_f<T, VEC>(x + off, xv);
    load_chan<VEC>(p.scale, c0, sc);
    load_chan<VEC>(p.shift, c0, sh);
#pragma unroll
    for (int e = 0; e < VEC; ++e) z[e] = __fadd_rn(__fmul_rn(xv[e], sc[e]), sh[e]);
    if constexpr (HAS_RES) {
      float rv[VEC];
      load_f<T, VEC>(res + off, rv);
      if constexpr (RES_AFFINE) {
        float rsc[VEC], rsh[VEC];
        load_chan_or<VEC>(p.res_scale, c0, 1.f, rsc);
        load_chan_or<VEC>(p.res_shift, c0, 0.f, rsh);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (p.res_scale) rv[e] = __fmul_rn(rv[e], rsc[e]);
          if (p.res_shift) rv[e] = __fadd_rn(rv[e], rsh[e]);
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = __fadd_rn(z[e], rv[e]);
    }
    if constexpr (RELU) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = relu_f(z[e]);
    }
    store_f<T, VEC>(out + off, z);
  }
}

template <typename T, bool HAS_RES, bool RES_AFFINE, bool RELU>
__global__ void __launch_bounds__(kThreads) bn_add_relu_generic_kernel(const BnAddReluParams p) {
  const int64_t numel = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.res);
  T* __restrict__ out = static_cast<T*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = i;
    int n, c, h, w;
    if (p.out_channels_last) {
      c = static_cast<int>(t % p.C);
      t /= p.C;
      w = static_cast<int>(t % p.W);
      t /= p.W;
      h = static_cast<int>(t % p.H);
      n = static_cast<int>(t / p.H);
    } else {
      w = static_cast<int>(t % p.W);
      t /= p.W;
      h = static_cast<int>(t % p.H);
      t /= p.H;
      c = static_cast<int>(t % p.C);
      n = static_cast<int>(t / p.C);
    }
    const int64_t xo = n * p.xs[0] + c * p.xs[1] + h * p.xs[2] + w * p.xs[3];
    const int64_t oo = n * p.os[0] + c * p.os[1] + h * p.os[2] + w * p.os[3];
    float z = __fadd_rn(__fmul_rn(to_f(x[xo]), __ldg(p.scale + c)), __ldg(p.shift + c));
    if constexpr (HAS_RES) {
      const int j = c - p.res_off;
      if (j >= 0 && j < p.Cr) {
        float r = to_f(res[n * p.rs[0] + j * p.rs[1] + h * p.rs[2] + w * p.rs[3]]);
        if constexpr (RES_AFFINE) {
          if (p.res_scale) r = __fmul_rn(r, __ldg(p.res_scale + j));
          if (p.res_shift) r = __fadd_rn(r, __ldg(p.res_shift + j));
        }
        z = __fadd_rn(z, r);
      }
    }
    if constexpr (RELU) z = relu_f(z);
    out[oo] = from_f<T>(z);
  }
}

namespace {
unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > (1LL << 20)) blocks = 1LL << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks);
}
}  // namespace

template <typename T>
cudaError_t launch_bn_add_relu_t(const BnAddReluParams& p, cudaStream_t stream) {
  const int64_t numel = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
  if (numel == 0) return cudaSuccess;
  const bool has_res = p.res != nullptr;
  const bool affine = has_res && (p.res_scale != nullptr || p.res_shift != nullptr);
  return FR_BOOL_SWITCH(has_res, HAS_RES, [&] {
    return FR_BOOL_SWITCH(affine, RES_AFFINE, [&] {
      return FR_BOOL_SWITCH(p.relu, RELU, [&] {
        if constexpr (RES_AFFINE && !HAS_RES) {
          return cudaErrorInvalidValue;  // not reachable: affine implies a residual
        } else {
          if (p.dense) {
            constexpr int VEC = 16 / sizeof(T);
            FR_LAUNCH(grid_for(numel / VEC, kThreads), kThreads, 0, stream,
                      bn_add_relu_dense_kernel<T, HAS_RES, RES_AFFINE, RELU>)(p);
          } else {
            FR_LAUNCH(grid_for(numel, kThreads), kThreads, 0, stream,
                      bn_add_relu_generic_kernel<T, HAS_RES, RES_AFFINE, RELU>)(p);
          }
          return cudaGetLastError();
        }
      });
    });
  });
}

cudaError_t launch_bn_add_relu(const BnAddReluParams& p, DType dt, cudaStream_t stream) {
  return FR_DTYPE_SWITCH(dt, T, [&] { return launch_bn_add_relu_t<T>(p, stream); });
}

// ---------------------------------------------------------------------------------------------
// Backward family on NHWC-dense tensors: g = grad_out * mask, then per-channel sums, then the
// elementwise BatchNorm backward
//   grad_input = weight * invstd * (g - mean_g - xhat * mean_gx),
// with mean_g = sum_g / count (count = rows) or, for the SyncBatchNorm *_elemt ops, given means
// (global sums over the global count). The reduction and the elementwise pass launch separately
// for the *_reduce / *_elemt ops and back to back for the fused ones.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ __forceinline__ void load_g(const ChannelBwdParams& p, int64_t off,
                                       const float (&msc)[VEC], const float (&msh)[VEC],
                                       float (&g)[VEC]) {
  load_f<T, VEC>(static_cast<const T*>(p.grad_out) + off, g);
  if (p.mask_mode == 1) {  // threshold_backward: 0 where out <= 0, so a NaN out passes grad_out
    float o[VEC];
    load_f<T, VEC>(static_cast<const T*>(p.mask_src) + off, o);
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (o[e] <= 0.f) g[e] = 0.f;
  } else if (p.mask_mode == 2) {  // T(x * scale + shift) <= 0, as the prologue computed it
    float xv[VEC];
    load_f<T, VEC>(static_cast<const T*>(p.mask_src) + off, xv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float z = round_to<T>(__fadd_rn(__fmul_rn(xv[e], msc[e]), msh[e]));
      if (z <= 0.f) g[e] = 0.f;  // NaN z passes, as above
    }
  }
}

// Block: cvb channel vectors x (256 / cvb) row lanes; grid: (row chunks, channel groups).
template <typename T, int VEC, int NSUM>
__global__ void __launch_bounds__(kThreads) channel_reduce_kernel(const ChannelBwdParams p) {
  // The last row of CTAs: a deferred weight-gradient sum (of this launch's dtype T), if any.
  if (p.wsum.n > 0 && blockIdx.y == gridDim.y - 1) {
    wgrad_sum_range<T>(p.wsum.ws, static_cast<T*>(p.wsum.dw), p.wsum.n, p.wsum.splits,
                       blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
                       static_cast<int64_t>(gridDim.x) * blockDim.x);
    return;
  }
  const int cv_total = (p.C + VEC - 1) / VEC;
  const int cvb = cv_total < kThreads ? cv_total : kThreads;
  const int lanes = kThreads / cvb;
  const int tid = threadIdx.x;
  const int cv = tid % cvb;
  const int lane = tid / cvb;
  const int c0 = (blockIdx.y * cvb + cv) * VEC;
  const bool active = lane < lanes && c0 < p.C;
  const int chunk = blockIdx.x;
  const int64_t r0 = chunk * p.rows_per_chunk;
  int64_t r1 = r0 + p.rows_per_chunk;
  if (r1 > p.rows) r1 = p.rows;

  float acc[NSUM][VEC];
#pragma unroll
  for (int j = 0; j < NSUM; ++j)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = 0.f;

  if (active) {
    float msc[VEC], msh[VEC], mean[VEC], inv[VEC], mean_r[VEC], inv_r[VEC];
    if (p.mask_mode == 2) {
      load_chan<VEC>(p.m_scale, c0, msc);
      load_chan<VEC>(p.m_shift, c0, msh);
    }
    if constexpr (NSUM >= 2) {
      load_chan<VEC>(p.mean, c0, mean);
      load_chan<VEC>(p.invstd, c0, inv);
    }
    if constexpr (NSUM >= 3) {
      load_chan<VEC>(p.mean_r, c0, mean_r);
      load_chan<VEC>(p.invstd_r, c0, inv_r);
    }
#pragma unroll 1
    for (int64_t row = r0 + lane; row < r1; row += lanes) {
      const int64_t off = row * p.C + c0;
      float g[VEC];
      load_g<T, VEC>(p, off, msc, msh, g);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += g[e];
      if constexpr (NSUM >= 2) {
        float xv[VEC];
        load_f<T, VEC>(static_cast<const T*>(p.x) + off, xv);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          acc[1][e] = fmaf(g[e], __fmul_rn(__fsub_rn(xv[e], mean[e]), inv[e]), acc[1][e]);
      }
      if constexpr (NSUM >= 3) {
        float xv[VEC];
        load_f<T, VEC>(static_cast<const T*>(p.xr) + off, xv);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          acc[2][e] = fmaf(g[e], __fmul_rn(__fsub_rn(xv[e], mean_r[e]), inv_r[e]), acc[2][e]);
      }
    }
  }

  __shared__ float red[NSUM][kThreads][VEC];
#pragma unroll
  for (int j = 0; j < NSUM; ++j)
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[j][tid][e] = acc[j][e];
  __syncthreads();
  if (lane == 0 && c0 < p.C) {
#pragma unroll
    for (int j = 0; j < NSUM; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        // Each lane's fp32 sum covers rows_per_chunk / lanes rows (tens); lanes and chunks are
        // combined in double (colsum), as the reference sums in float64.
        double s = 0.0;
        for (int l = 0; l < lanes; ++l) s += red[j][l * cvb + cv][e];  // fixed order
        p.partial[(static_cast<int64_t>(j) * p.chunks + chunk) * p.C + c0 + e] = s;
      }
  }
}

template <typename T, int VEC, BwdKind KIND>
__global__ void __launch_bounds__(kThreads)
    channel_bwd_elementwise_kernel(const ChannelBwdParams p) {
  const int64_t nvec = p.rows * p.C / VEC;
  const float cnt = static_cast<float>(p.rows);
  const bool given_means = p.mean_g != nullptr;  // uniform: no divergence
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = v * VEC;
    const int c0 = static_cast<int>(off % p.C);
    float msc[VEC], msh[VEC];
    if (p.mask_mode == 2) {
      load_chan<VEC>(p.m_scale, c0, msc);
      load_chan<VEC>(p.m_shift, c0, msh);
    }
    float g[VEC];
    load_g<T, VEC>(p, off, msc, msh, g);
    if constexpr (KIND == BwdKind::kG) {
      store_f<T, VEC>(static_cast<T*>(p.grad_res) + off, g);
    } else {
      // Per-channel means of the sums: sum / count, or given (then no division at all).
      auto chan_means = [&](const float* sum_p, const float* mean_p, float (&m)[VEC]) {
        if (given_means) {
          load_chan<VEC>(mean_p, c0, m);
        } else {
          load_chan<VEC>(sum_p, c0, m);
#pragma unroll
          for (int e = 0; e < VEC; ++e) m[e] = __fdiv_rn(m[e], cnt);
        }
      };
      // BatchNorm backward of g through (x, mean, invstd, weight) into `dst`.
      auto bn_bwd = [&](const void* xin, const float* mean_p, const float* inv_p, const void* w_p,
                        DType w_dt, const float* sgx_p, const float* mgx_p, void* dst) {
        float xv[VEC], mean[VEC], inv[VEC], w[VEC], mg[VEC], mgx[VEC], gi[VEC];
        load_f<T, VEC>(static_cast<const T*>(xin) + off, xv);
        load_chan<VEC>(mean_p, c0, mean);
        load_chan<VEC>(inv_p, c0, inv);
        load_chan_as<VEC>(w_p, w_dt, c0, 1.f, w);
        chan_means(p.sum_g, p.mean_g, mg);
        chan_means(sgx_p, mgx_p, mgx);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float wi = w_p ? __fmul_rn(w[e], inv[e]) : inv[e];
          const float xhat = __fmul_rn(__fsub_rn(xv[e], mean[e]), inv[e]);
          const float t = __fsub_rn(__fsub_rn(g[e], mg[e]), __fmul_rn(xhat, mgx[e]));
          gi[e] = __fmul_rn(wi, t);
        }
        store_f<T, VEC>(static_cast<T*>(dst) + off, gi);
      };
      bn_bwd(p.x, p.mean, p.invstd, p.weight, p.weight_dtype, p.sum_gx, p.mean_gx, p.grad_input);
      if constexpr (KIND == BwdKind::kBnId) {
        store_f<T, VEC>(static_cast<T*>(p.grad_res) + off, g);
      } else if constexpr (KIND == BwdKind::kBnBn) {
        bn_bwd(p.xr, p.mean_r, p.invstd_r, p.weight_r, p.weight_r_dtype, p.sum_gxr, p.mean_gxr,
               p.grad_res);
      }
    }
  }
}

namespace {
int channel_vec(int C, DType dt) {
  const int v = chunk_elems(dt);
  return (C % v == 0) ? v : 1;
}
}  // namespace

int64_t plan_channel_bwd(ChannelBwdParams& p, DType dt, int num_sms) {
  const int vec = channel_vec(p.C, dt);
  const int cv_total = (p.C + vec - 1) / vec;
  const int cvb = cv_total < kThreads ? cv_total : kThreads;
  const int groups = (cv_total + cvb - 1) / cvb;
  // ~8 CTAs of 256 threads per SM, but at least 64 rows per chunk.
  int64_t chunks = (8LL * num_sms + groups - 1) / groups;
  const int64_t max_chunks = (p.rows + 63) / 64;
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  p.rows_per_chunk = (p.rows + chunks - 1) / chunks;
  if (p.rows_per_chunk < 1) p.rows_per_chunk = 1;
  p.chunks = static_cast<int>((p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk);
  if (p.chunks < 1) p.chunks = 1;
  return static_cast<int64_t>(p.nsum) * p.chunks * p.C;
}

template <typename T, int VEC>
cudaError_t launch_channel_reduce_tv(const ChannelBwdParams& p, cudaStream_t stream) {
  const int cv_total = (p.C + VEC - 1) / VEC;
  const int cvb = cv_total < kThreads ? cv_total : kThreads;
  if (p.wsum.n > 0 && p.wsum.dt != DTypeOf<T>::value) return cudaErrorInvalidValue;
  const dim3 rgrid(p.chunks, (cv_total + cvb - 1) / cvb + (p.wsum.n > 0 ? 1 : 0));
  switch (p.nsum) {
    case 1:
      FR_LAUNCH(rgrid, kThreads, 0, stream, channel_reduce_kernel<T, VEC, 1>)(p);
      break;
    case 2:
      FR_LAUNCH(rgrid, kThreads, 0, stream, channel_reduce_kernel<T, VEC, 2>)(p);
      break;
    case 3:
      FR_LAUNCH(rgrid, kThreads, 0, stream, channel_reduce_kernel<T, VEC, 3>)(p);
      break;
    default: return cudaErrorInvalidValue;
  }
  FR_LAUNCH_CHECK();
  ColSumParams cp{};
  cp.partial = p.partial;
  cp.out[0] = p.sum_g;
  cp.out[1] = p.sum_gx;
  cp.out[2] = p.sum_gxr;
  cp.cast[0] = p.cast_g;
  cp.cast[1] = p.cast_gx;
  cp.cast[2] = p.cast_gxr;
  cp.cast0b = p.cast_g2;
  cp.cast_dtype = p.cast_dtype;
  cp.nsum = p.nsum;
  cp.T = p.chunks;
  cp.C = p.C;
  return launch_colsum(cp, stream);
}

template <typename T, int VEC>
cudaError_t launch_channel_elementwise_tv(const ChannelBwdParams& p, cudaStream_t stream) {
  const unsigned egrid = grid_for(p.rows * p.C / VEC, kThreads);
  switch (p.kind) {
    case BwdKind::kG:
      FR_LAUNCH(egrid, kThreads, 0, stream,
                channel_bwd_elementwise_kernel<T, VEC, BwdKind::kG>)(p);
      break;
    case BwdKind::kBn:
      FR_LAUNCH(egrid, kThreads, 0, stream,
                channel_bwd_elementwise_kernel<T, VEC, BwdKind::kBn>)(p);
      break;
    case BwdKind::kBnId:
      FR_LAUNCH(egrid, kThreads, 0, stream,
                channel_bwd_elementwise_kernel<T, VEC, BwdKind::kBnId>)(p);
      break;
    case BwdKind::kBnBn:
      FR_LAUNCH(egrid, kThreads, 0, stream,
                channel_bwd_elementwise_kernel<T, VEC, BwdKind::kBnBn>)(p);
      break;
  }
  FR_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t launch_channel_reduce(const ChannelBwdParams& p, DType dt, cudaStream_t stream) {
  if (p.rows == 0 || p.C == 0) return cudaSuccess;
  return FR_DTYPE_SWITCH(dt, T, [&] {
    if (channel_vec(p.C, dt) == 1) return launch_channel_reduce_tv<T, 1>(p, stream);
    return launch_channel_reduce_tv<T, 16 / sizeof(T)>(p, stream);
  });
}

cudaError_t launch_channel_elementwise(const ChannelBwdParams& p, DType dt, cudaStream_t stream) {
  if (p.rows == 0 || p.C == 0) return cudaSuccess;
  return FR_DTYPE_SWITCH(dt, T, [&] {
    if (channel_vec(p.C, dt) == 1) return launch_channel_elementwise_tv<T, 1>(p, stream);
    return launch_channel_elementwise_tv<T, 16 / sizeof(T)>(p, stream);
  });
}

cudaError_t launch_channel_bwd(const ChannelBwdParams& p, DType dt, cudaStream_t stream) {
  FR_RETURN_IF_ERROR(launch_channel_reduce(p, dt, stream));
  return launch_channel_elementwise(p, dt, stream);
}

}  // namespace cuda
}  // namespace fastres
