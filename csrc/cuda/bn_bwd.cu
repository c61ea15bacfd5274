// BatchNorm's backward family (bn.cu has the forward): the ReLU mask, the per-channel reductions
// and the elementwise BatchNorm backward. Memory-bound; the dense paths move 16 bytes per access.
// The reductions are two-level and deterministic: per-chunk partials in a fixed row order, then
// colsum_kernel (bn.cu) adds them in a fixed order (no float atomics). The ReLU mask is
// recomputed with bn.cu's operation order (__fmul_rn/__fadd_rn), so it agrees bit for bit with
// the forward's.
#include "bn_common.cuh"

namespace fastres {
namespace cuda {

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
