// cudasim: the CUDA language surface the fastres kernels use, for the host C++ compiler.
//
// The kernel files (csrc/cuda/*.cu, *.cuh) and the ATen launchers (ops_conv.cu, ops_bn.cu,
// ops_bn_bwd.cu) are compiled unchanged by g++ against this header (reached through the stand-in
// <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <c10/cuda/*.h> in cudasim/include/) and run
// on CPU memory with
// CUDA semantics: every CUDA thread is a fiber, the threads of a block run interleaved on one OS
// thread (blocks one after another), __syncthreads is a real barrier, warp collectives
// (ldmatrix, mma.sync) are computed from the PTX fragment layouts when all 32 lanes of the warp
// reach the same call site, cp.async lands only at cp.async.wait_group. See csrc/cuda/README.md
// (cudasim) for what it catches and what it cannot.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTRES_CUDASIM 1

// ---- qualifiers and attributes ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A __shared__ array is one object per block: a function-local static is one object shared by
// all fibers of the block (blocks run one after another on the simulating OS thread).
#define __shared__ static thread_local
// Dynamic shared memory (see fr_common.cuh): a pointer to the launch's buffer, NaN-filled at each
// block start.
#define FR_DYNAMIC_SMEM(name) unsigned char* const name = ::cudasim::dynamic_smem()

// ---- vector types ----
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- 16-bit floating types (storage and the conversions the kernels use; round to nearest even)
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
float __half2float(__half h);
__half __float2half_rn(float f);

// ---- arithmetic intrinsics (the build uses -ffp-contract=off: a*b+c is never fused) ----
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
using std::fma;
using std::fmaf;

// ---- runtime API subset ----
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
};
using cudaStream_t = struct CUstream_st*;

namespace cudasim {

// The simulated device: an H200 (sm_90, 132 SMs, 227 KB opt-in shared memory per block).
constexpr int kNumSMs = 132;
constexpr int kCCMajor = 9;
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxSmemOptin = 227 * 1024;

struct ThreadState;  // runtime_internal.h
extern thread_local ThreadState* g_cur;
// The builtins of the running fiber and block.
struct Builtins {
  uint3 tid, bid;
  dim3 bdim, gdim;
};
extern thread_local Builtins* g_builtins;
unsigned char* dynamic_smem();

void syncthreads(const char* file, int line);
cudaError_t get_last_error();
const char* error_string(cudaError_t e);
cudaError_t set_max_dyn_smem(const void* fn, int bytes);
cudaError_t device_attribute(int* v, cudaDeviceAttr a, int dev);
// cudaFuncSetAttribute calls so far (tests: the launchers cache it per kernel and device).
long func_set_attribute_calls();
// Launches so far, and the dry-run switch: while on, a launch is checked and counted but its
// kernel does not run (the host path's own cost, measured with the kernels made free:
// bench/host_overhead.py). Returns the previous setting.
long launch_count();
bool set_dry_run(bool on);
// Launches so far per call site ("file:line" of the launch in the launcher's source).
std::vector<std::pair<std::string, long>> launch_sites();

// The PTX instructions the kernels use (CPU twins in csrc/cuda/fr_ptx.cuh call these). file:line
// is the call site in the kernel source, for the reports.
void cp_async(void* smem, const void* gmem, int src_size, int size, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n, const char* file, int line);
void ldmatrix_x4(bool trans, uint32_t* r0, uint32_t* r1, uint32_t* r2, uint32_t* r3,
                 const void* smem, const char* file, int line);
enum class MmaKind : int { kBf16 = 0, kF16 = 1, kTf32 = 2 };
void mma_sync(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b, const char* file,
              int line);

// Global memory ranges the sim may check reads against (the standalone harness registers its
// buffers; with none registered nothing is checked).
void register_global(const void* p, size_t bytes);
void clear_globals();
void check_global_read(const void* p, size_t bytes, const char* what, const char* file, int line);

// One launch: checks as the driver does, then runs every block.
using ThreadFn = void (*)(void* ctx);
cudaError_t launch(const void* fn, dim3 grid, dim3 block, size_t smem, const char* file, int line,
                   ThreadFn body, void* ctx);

template <class... P>
struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  const char* file;
  int line;
  template <class... A>
  void operator()(A&&... args) const {
    // Every CUDA thread calls the kernel with its own copy of the parameters (std::apply copies).
    struct Params {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> v;
    } prm{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    ThreadFn body = [](void* c) {
      Params* q = static_cast<Params*>(c);
      std::apply(q->fn, q->v);
    };
    launch(reinterpret_cast<const void*>(fn), grid, block, smem, file, line, body, &prm);
  }
};
template <class... P>
Launch<P...> make_launch(dim3 g, dim3 b, size_t s, cudaStream_t, const char* file, int line,
                         void (*fn)(P...)) {
  return Launch<P...>{fn, g, b, s, file, line};
}

}  // namespace cudasim

#define threadIdx (::cudasim::g_builtins->tid)
#define blockIdx (::cudasim::g_builtins->bid)
#define blockDim (::cudasim::g_builtins->bdim)
#define gridDim (::cudasim::g_builtins->gdim)
#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
// kernel<<<grid, block, smem, stream>>>(args) is written FR_LAUNCH(grid, block, smem, stream,
// kernel)(args) in the sources (fr_common.cuh).
#define FR_LAUNCH(G, B, S, ST, ...) \
  ::cudasim::make_launch(G, B, S, ST, __FILE__, __LINE__, __VA_ARGS__)

template <class T>
inline T __ldg(const T* p) {
  ::cudasim::check_global_read(p, sizeof(T), "__ldg", __builtin_FILE(), __builtin_LINE());
  return *p;
}

inline cudaError_t cudaGetLastError() { return ::cudasim::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::cudasim::error_string(e); }
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::cudasim::set_max_dyn_smem(reinterpret_cast<const void*>(fn), value);
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;  // one simulated device
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  return ::cudasim::device_attribute(v, a, dev);
}
