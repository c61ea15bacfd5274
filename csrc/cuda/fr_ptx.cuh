// The inline-PTX wrappers of the kernels (sm_80+; the launchers refuse older GPUs): cp.async,
// ldmatrix, mma.sync and the TF32 rounding, and, under cudasim (csrc/cuda/cudasim), their CPU
// twins with the same signatures. A twin takes the caller's file:line through default arguments
// (call sites are unchanged) so that cudasim names the line of a divergent or misaddressed call.
// Nothing else in the kernels is inline PTX.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fastres {
namespace cuda {

#ifndef FASTRES_CUDASIM

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

#else  // FASTRES_CUDASIM: the CPU twins (semantics in csrc/cuda/cudasim/runtime_*.cpp)

#define FR_SITE const char *fr_file = __builtin_FILE(), int fr_line = __builtin_LINE()

// src-size 0 when !valid: nothing is read, 16 zero bytes land. The copy lands at the
// cp.async.wait_group that retires its group, not before.
inline void cp_async16(void* smem, const void* gmem, bool valid, FR_SITE) {
  ::cudasim::cp_async(smem, gmem, valid ? 16 : 0, 16, fr_file, fr_line);
}
inline void cp_async_commit() { ::cudasim::cp_async_commit(); }
template <int N>
inline void cp_async_wait(FR_SITE) {
  ::cudasim::cp_async_wait(N, fr_file, fr_line);
}
inline void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* smem,
                    FR_SITE) {
  ::cudasim::ldmatrix_x4(false, &r0, &r1, &r2, &r3, smem, fr_file, fr_line);
}
inline void ldsm_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                          const void* smem, FR_SITE) {
  ::cudasim::ldmatrix_x4(true, &r0, &r1, &r2, &r3, smem, fr_file, fr_line);
}
template <typename T>
inline void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], FR_SITE) {
  using ::cudasim::MmaKind;
  const MmaKind k = std::is_same<T, __nv_bfloat16>::value ? MmaKind::kBf16
                    : std::is_same<T, __half>::value      ? MmaKind::kF16
                                                          : MmaKind::kTf32;
  ::cudasim::mma_sync(k, d, a, b, fr_file, fr_line);
}
// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero.
inline uint32_t to_tf32(uint32_t x) {
  if ((x & 0x7f800000u) == 0x7f800000u) return (x & 0x7fffffu) ? (x | 0x400000u) & 0xffffe000u
                                                               : x;  // NaN stays NaN, inf
  return (x + 0x1000u) & 0xffffe000u;
}
#undef FR_SITE

#endif  // FASTRES_CUDASIM

}  // namespace cuda
}  // namespace fastres
