// Device helpers shared by the fastres CUDA kernels: compile-time switches, dtype conversions,
// cp.async / ldmatrix / mma.sync wrappers, the GEMM kernels' accumulator zeroing and prologue
// chunk, and the shared-memory swizzles.
//
// Kernel files include only this header and kernels.h (no ATen): a kernel file then compiles in
// the time its device code takes, not the ~30 s the ATen headers cost (csrc/cuda/README.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "fr_ptx.cuh"  // cp.async / ldmatrix / mma.sync / cvt.rna.tf32 (PTX and cudasim twins)
#include "kernels.h"

// Turn a runtime flag into a constexpr (flash-attention's static_switch.h).
//   FR_BOOL_SWITCH(has_bias, HAS_BIAS, [&] { launch<HAS_BIAS>(...); });
#define FR_BOOL_SWITCH(COND, CONST_NAME, ...)   \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// Return the pending launch error (if any) to the caller, which turns it into a C10 error.
#define FR_RETURN_IF_ERROR(EXPR)                \
  do {                                          \
    cudaError_t fr_err_ = (EXPR);               \
    if (fr_err_ != cudaSuccess) return fr_err_; \
  } while (0)
#define FR_LAUNCH_CHECK() FR_RETURN_IF_ERROR(cudaGetLastError())

// The two spellings cudasim (csrc/cuda/cudasim) defines differently: a kernel launch
//   FR_LAUNCH(grid, block, smem_bytes, stream, kernel)(args)  is
//   kernel<<<grid, block, smem_bytes, stream>>>(args)
// and the dynamic shared memory of a kernel (128-byte aligned).
#ifndef FASTRES_CUDASIM
#define FR_LAUNCH(G, B, S, ST, ...) __VA_ARGS__<<<G, B, S, ST>>>
#define FR_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace fastres {
namespace cuda {

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per kernel and device, not per launch (a
// driver call each time otherwise). The caller keeps one static instance per kernel; devices past
// 63 are simply set every time.
struct SmemOptIn {
  std::atomic<uint64_t> devices{0};
  template <class Kernel>
  cudaError_t ensure(Kernel* kernel, int bytes) {
    int dev = 0;
    FR_RETURN_IF_ERROR(cudaGetDevice(&dev));
    const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
    if (bit && (devices.load(std::memory_order_acquire) & bit)) return cudaSuccess;
    FR_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    devices.fetch_or(bit, std::memory_order_release);
    return cudaSuccess;
  }
};

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat32;
};
template <>
struct DTypeOf<__half> {
  static constexpr DType value = DType::kFloat16;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};

// Runtime dtype -> C++ type (the three activation dtypes).
#define FR_DTYPE_SWITCH(DT, TYPE, ...)          \
  [&] {                                         \
    switch (DT) {                               \
      case ::fastres::cuda::DType::kFloat16: {  \
        using TYPE = __half;                    \
        return __VA_ARGS__();                   \
      }                                         \
      case ::fastres::cuda::DType::kBFloat16: { \
        using TYPE = __nv_bfloat16;             \
        return __VA_ARGS__();                   \
      }                                         \
      default: {                                \
        using TYPE = float;                     \
        return __VA_ARGS__();                   \
      }                                         \
    }                                           \
  }()

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// dw[i] = sum over splits of ws[split][i], in split order, for i = first, first + step, ...
// (a weight gradient's split sum: conv_wgrad.cu's own launch, or CTAs of a later one).
template <typename T>
__device__ __forceinline__ void wgrad_sum_range(const float* __restrict__ ws, T* __restrict__ dw,
                                                int64_t n, int splits, int64_t first,
                                                int64_t step) {
  for (int64_t i = first; i < n; i += step) {
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += ws[sp * n + i];
    dw[i] = from_f<T>(s);
  }
}

// Element k of a per-channel vector of dtype dt (a model's BatchNorm parameters and running
// statistics, read in their own dtype: no per-call conversion to float32), as float. ld_as_f
// reads through the read-only cache; ld_rw_f is the plain load for a vector the kernel also
// writes (st_as_f: the running statistics, rounded to their dtype as copy_ would round them).
template <bool kReadOnly>
__device__ __forceinline__ float ld_vec_f(const void* v, DType dt, int k) {
  switch (dt) {
    case DType::kFloat16:
      return to_f(static_cast<const __half*>(v)[k]);
    case DType::kBFloat16:
      return to_f(static_cast<const __nv_bfloat16*>(v)[k]);
    default:
      if constexpr (kReadOnly) return __ldg(static_cast<const float*>(v) + k);
      return static_cast<const float*>(v)[k];
  }
}
__device__ __forceinline__ float ld_as_f(const void* v, DType dt, int k) {
  return ld_vec_f<true>(v, dt, k);
}
__device__ __forceinline__ float ld_rw_f(const void* v, DType dt, int k) {
  return ld_vec_f<false>(v, dt, k);
}
__device__ __forceinline__ void st_as_f(void* v, DType dt, int k, float x) {
  switch (dt) {
    case DType::kFloat16:
      static_cast<__half*>(v)[k] = from_f<__half>(x);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(v)[k] = from_f<__nv_bfloat16>(x);
      break;
    default:
      static_cast<float*>(v)[k] = x;
  }
}

// v rounded to T and back: what a value stored as T reads back as.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

// A 16-byte vector of T viewed element-wise.
template <typename T>
union Vec16 {
  static constexpr int N = 16 / sizeof(T);
  uint4 u;
  T v[N];
};

// Zero the accumulators of a GEMM kernel: the tensor-core fragments acc[MI][NI] and the SIMT
// per-thread 4 x 4 block (each kernel declares both and uses one; the other is dead code).
template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4], float (&sacc)[4][4]) {
#pragma unroll
  for (int a = 0; a < MI; ++a)
#pragma unroll
    for (int b = 0; b < NI; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) sacc[a][b] = 0.f;
}

// The convolutions' prologue a = relu?(x * scale + shift) on the 16-byte chunks of channels
// c .. c + N - 1 that a thread loaded itself into shared memory (conv_igemm.cuh: A, conv_wgrad.cu:
// B): the factors are read once per stage, then applied to each of the thread's rows.
template <typename T>
struct PrologueChunk {
  static constexpr int N = Vec16<T>::N;
  float sc[N], sh[N];

  // scale 1 / shift 0 where the vector is absent.
  __device__ __forceinline__ PrologueChunk(const float* scale, const float* shift, int c) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      sc[e] = scale ? __ldg(scale + c + e) : 1.f;
      sh[e] = shift ? __ldg(shift + c + e) : 0.f;
    }
  }

  // The chunk at `chunk` (shared memory), in place. Two roundings (mul, then add) as the
  // reference computes x * scale + shift: bn_relu_bwd's recomputed ReLU mask matches bit for bit.
  __device__ __forceinline__ void apply(void* chunk, bool relu) const {
    uint4* ptr = static_cast<uint4*>(chunk);
    Vec16<T> v;
    v.u = *ptr;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      float y = __fadd_rn(__fmul_rn(to_f(v.v[e]), sc[e]), sh[e]);
      if (relu) y = y < 0.f ? 0.f : y;
      v.v[e] = from_f<T>(y);
    }
    *ptr = v.u;
  }
};

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` in a tile of 64-byte rows. The XOR
// spreads the 8 rows one ldmatrix phase reads over all 32 banks: rows r and r+2 would otherwise
// share banks (64-byte rows, 128-byte bank period), a 4-way conflict.
__device__ __forceinline__ int swz64(int row, int chunk) {
  return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4);
}
// Same for rows of 128 bytes or more (8+ chunks per row): XOR with row % 8.
__device__ __forceinline__ int swz_wide(int row, int chunk, int row_bytes) {
  return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}

}  // namespace cuda
}  // namespace fastres
