// What bn.cu (BatchNorm forward: finalize, apply + residual + ReLU) and bn_bwd.cu (the backward
// family) share: the block size and the vector loads and stores of the dense paths (16 bytes per
// access). Included by those two translation units only (an unnamed namespace: each has its own).
#pragma once

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

// Blocks of a grid-stride launch over `work` items, per_block each (at most 2^20: the loops
// cover the rest).
inline unsigned grid_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > (1LL << 20)) blocks = 1LL << 20;
  return static_cast<unsigned>(blocks);
}

}  // namespace
}  // namespace cuda
}  // namespace fastres
