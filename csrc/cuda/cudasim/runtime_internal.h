// cudasim runtime, internal: the state the runtime files share (a thread's fiber, its block, the
// race check's shadow of shared memory) and the helpers each defines for the others. Included by
// csrc/cuda/cudasim/runtime_*.cpp only; kernels and launchers see cudasim.h alone (and the module
// is built with -fvisibility=hidden: none of this is exported).
#pragma once

#include "cudasim.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(CUDASIM_UCONTEXT)
#include <ucontext.h>
#define CUDASIM_USE_UCONTEXT 1
#endif

namespace cudasim {

constexpr int kMaxThreads = 1024;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int src_size, size;
};

// The race check's shadow of one 16-byte granule of dynamic shared memory: the last cp.async into
// it and the ldmatrix reads of it, with the barrier interval ("epoch": barriers released so far
// in the block) each happened in. Only accesses through the PTX twins are seen (cp.async writes,
// ldmatrix reads), not plain loads and stores.
struct Granule {
  int writer = -1;  // thread of the last cp.async into it
  bool pending = false;  // issued, not landed yet
  int w_epoch = -1;      // when it landed
  const char* w_file = "";
  int w_line = 0;
  int reader = -1;  // last ldmatrix reader in r_epoch; -2: several threads
  int r_epoch = -1;
  const char* r_file = "";
  int r_line = 0;
};

enum class St : int { kRun, kBar, kWarp, kDone };

struct ThreadState {
  void* sp = nullptr;
#ifdef CUDASIM_USE_UCONTEXT
  ucontext_t uc;
#endif
  void* fake = nullptr;  // ASan's fake stack of this fiber
  char* stack = nullptr;
  Builtins b{};
  int linear = 0, warp = 0, lane = 0;
  St st = St::kRun;
  const char* file = "";
  int line = 0;
  std::vector<Copy> copies;        // issued, not yet landed, oldest first
  std::vector<size_t> group_ends;  // committed groups: end index in copies of each
};

struct Warp {
  int kind = -1;
  const char* file = "";
  int line = 0;
  int arrived = 0;
  int size = 32;
  void* args[32];
};

struct BlockRun {
  std::vector<ThreadState> th;
  int n = 0, live = 0, exited = 0;
  int bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  Warp warps[kMaxThreads / 32];
  bool failed = false;
  std::string msg;
  ThreadFn body = nullptr;
  void* ctx = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  dim3 grid, block;
  uint3 block_idx{};
  std::vector<Granule> shadow;  // smem_size / 16
  int epoch = 0;
};

// The block running on this OS thread (runtime_fibers.cpp).
extern thread_local BlockRun* g_blk;

// runtime_fibers.cpp
void leave(ThreadState* t, bool exiting);  // back to the scheduler
std::string where(const char* file, int line);
std::string who(const ThreadState* t);
[[noreturn]] void fail(const std::string& msg);
bool run_block(BlockRun* blk);

// runtime_memory.cpp
Granule& granule(const void* p);
void check_smem(const void* p, size_t bytes, const char* what, const char* file, int line);

}  // namespace cudasim
