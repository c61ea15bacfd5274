// BatchNorm's forward kernels: the column sums of per-CTA partials (also the second level of the
// backward family's reductions, bn_bwd.cu), finalize, and apply + residual + ReLU. All
// memory-bound; the dense paths move 16 bytes per access. The column sums add the partials in a
// fixed order (no float atomics).
//
// Floating-point operation order mirrors fastres/reference.py where it is cheap to do so
// (__fmul_rn/__fadd_rn keep nvcc from contracting x * scale + shift into one FMA): the recomputed
// ReLU masks then agree bit for bit with the forward pass that produced them.
#include "bn_common.cuh"

namespace fastres {
namespace cuda {
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

cudaError_t launch_colsum_finalize(const ColSumParams& cs, const BnFinalizeParams& p,
                                   cudaStream_t stream) {
  if (cs.nsum != 2 || cs.C != p.C) return cudaErrorInvalidValue;
  if (!p.has_momentum && p.num_batches_tracked) {
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

}  // namespace cuda
}  // namespace fastres
