// cudasim runtime: the CUDA runtime API the launchers call. The 16-bit float conversions of
// cuda_fp16.h, cudaGetLastError and its messages, cudaFuncSetAttribute and device attributes, and
// the launch: the driver's checks, then every block of the grid run by the scheduler
// (runtime_fibers.cpp).
#include "runtime_internal.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

// ---- 16-bit float conversions (round to nearest even, as __float2half_rn) ----
float __half2float(__half h) {
  const uint32_t s = uint32_t(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu;
  const uint32_t m = h.__x & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);  // exact
    return s ? -v : v;
  }
  if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
  return __uint_as_float(s | ((e + 112) << 23) | (m << 13));
}
__half __float2half_rn(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (ax >= 0x47800000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};
  if (ax < 0x38800000u) {  // half subnormal: units of 2^-24, nearest even (default rounding)
    const float v = std::nearbyint(std::ldexp(std::fabs(f), 24));
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(v))};
  }
  uint32_t h = (((ax >> 23) - 112) << 10) | ((ax & 0x7fffffu) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into inf: correct
  return __half{static_cast<uint16_t>(sign | h)};
}

namespace cudasim {

namespace {

std::mutex g_launch_mu;  // one launch at a time (the fibers' state is per OS thread, the
                         // bookkeeping below is not)
cudaError_t g_last_error = cudaSuccess;
std::string g_error_msg;
std::map<const void*, int> g_max_dyn_smem;
long g_set_attr_calls = 0;

}  // namespace

cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue:
      return g_error_msg.empty() ? "invalid argument" : g_error_msg.c_str();
    case cudaErrorInvalidConfiguration:
      return g_error_msg.empty() ? "invalid configuration argument" : g_error_msg.c_str();
    case cudaErrorLaunchFailure: return g_error_msg.c_str();
    default: return "unknown error";
  }
}

cudaError_t set_max_dyn_smem(const void* fn, int bytes) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  ++g_set_attr_calls;
  if (bytes < 0 || bytes > kMaxSmemOptin) {
    g_error_msg = "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                  "): over the device's " + std::to_string(kMaxSmemOptin) + " bytes";
    return cudaErrorInvalidValue;
  }
  g_max_dyn_smem[fn] = bytes;
  return cudaSuccess;
}

long func_set_attribute_calls() { return g_set_attr_calls; }

namespace {
std::atomic<long> g_launches{0};
std::atomic<bool> g_dry{false};
std::map<std::pair<const char*, int>, long> g_sites;  // under g_launch_mu
}  // namespace

long launch_count() { return g_launches.load(); }
std::vector<std::pair<std::string, long>> launch_sites() {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  std::vector<std::pair<std::string, long>> r;
  for (const auto& [site, n] : g_sites) r.emplace_back(where(site.first, site.second), n);
  return r;
}
bool set_dry_run(bool on) { return g_dry.exchange(on); }

cudaError_t device_attribute(int* v, cudaDeviceAttr a, int dev) {
  (void)dev;
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = kNumSMs; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = kCCMajor; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch(const void* fn, dim3 grid, dim3 block, size_t smem, const char* file, int line,
                   ThreadFn body, void* ctx) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  auto refuse = [&](cudaError_t e, const std::string& why) {
    g_error_msg = "cudasim: launch at " + where(file, line) + " refused: " + why;
    g_last_error = e;
    return e;
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024)
    return refuse(cudaErrorInvalidConfiguration,
                  "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                      std::to_string(block.z) + ") (at most 1024 threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    return refuse(cudaErrorInvalidConfiguration,
                  "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                      std::to_string(grid.z) + ")");
  if (smem > static_cast<size_t>(kDefaultSmem)) {
    auto it = g_max_dyn_smem.find(fn);
    const int allowed = it == g_max_dyn_smem.end() ? kDefaultSmem : it->second;
    if (smem > static_cast<size_t>(allowed))
      return refuse(cudaErrorInvalidValue,
                    std::to_string(smem) + " bytes of dynamic shared memory, the kernel allows " +
                        std::to_string(allowed) +
                        " (over 48 KB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
  }
  ++g_launches;
  ++g_sites[{file, line}];
  if (g_dry.load(std::memory_order_relaxed)) {
    return cudaSuccess;  // checked and counted, not run (set_dry_run)
  }
  static thread_local BlockRun blk;
  blk.th.resize(kMaxThreads);
  blk.n = static_cast<int>(threads);
  blk.body = body;
  blk.ctx = ctx;
  blk.grid = grid;
  blk.block = block;
  // Exactly the launch's bytes (a heap block of that size: ASan sees an overrun).
  std::vector<unsigned char> smem_buf(smem);
  blk.smem = smem ? smem_buf.data() : nullptr;
  blk.smem_size = smem;
  BlockRun* saved_blk = g_blk;
  ThreadState* saved_cur = g_cur;
  Builtins* saved_b = g_builtins;
  g_blk = &blk;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        blk.block_idx = uint3{x, y, z};
        ok = run_block(&blk);
      }
  g_blk = saved_blk;
  g_cur = saved_cur;
  g_builtins = saved_b;
  if (!ok) {
    g_error_msg = "cudasim: kernel launched at " + where(file, line) + ": " + blk.msg;
    g_last_error = cudaErrorLaunchFailure;
    if (std::getenv("CUDASIM_ABORT_ON_ERROR")) {
      std::fprintf(stderr, "%s\n", g_error_msg.c_str());
      std::abort();
    }
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace cudasim
