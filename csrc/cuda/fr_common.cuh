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

#include <cstdint>

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

namespace fastres {
namespace cuda {

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

// ---------------------------------------------------------------------------------------------
// Asynchronous copies, ldmatrix and mma.sync (sm_80+; the launchers refuse older GPUs).
// ---------------------------------------------------------------------------------------------

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled
// (src-size 0), which is how padding and out-of-range channels/rows become zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                        const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                              uint32_t& r3, const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a)
               : "memory");
}

// D += A * B for one m16n8 tile. 16-bit types: m16n8k16 (A: 4 regs, B: 2 regs);
// float: TF32 m16n8k8 (A: 4 regs, B: 2 regs, the registers hold fp32 bits, see to_tf32).
// The accumulator layout is the same for both: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g+8.
template <typename T>
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_tile<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_tile<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_tile<float>(float (&d)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// fp32 bits -> TF32 (round to nearest, ties away, as cuDNN/cuBLAS do) in a 32-bit register.
__device__ __forceinline__ uint32_t to_tf32(uint32_t x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(x)));
  return r;
}

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
