// cudasim runtime: fibers, the block scheduler, __syncthreads, warp collectives, cp.async and the
// launch checks. See cudasim.h and csrc/cuda/README.md (cudasim).
#include "cudasim.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(CUDASIM_UCONTEXT)
#include <ucontext.h>
#define CUDASIM_USE_UCONTEXT 1
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUDASIM_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif

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

#ifndef CUDASIM_USE_UCONTEXT
// Switch stacks: save the callee-saved registers on the current stack, store its pointer in
// *save, load `to` and pop the registers saved there. ~20 instructions instead of swapcontext's
// signal-mask system call (the conv kernels switch ~10^6 times per launch).
asm(R"(
.text
.p2align 4
.globl cudasim_ctx_switch
.hidden cudasim_ctx_switch
.type cudasim_ctx_switch,@function
cudasim_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cudasim_ctx_switch,.-cudasim_ctx_switch
)");
extern "C" void cudasim_ctx_switch(void** save, void* to);
#endif

namespace cudasim {

namespace {

#if defined(CUDASIM_ASAN)
constexpr size_t kStack = 512 * 1024;  // ASan's redzones grow every frame
#else
constexpr size_t kStack = 64 * 1024;  // the kernels' frames are a few KB (ptxas: no stack)
#endif
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

}  // namespace

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

thread_local ThreadState* g_cur = nullptr;
thread_local Builtins* g_builtins = nullptr;

namespace {

struct Warp {
  int kind = -1;
  const char* file = "";
  int line = 0;
  int arrived = 0;
  int size = 32;
  void* args[32];
};

using Compute = void (*)(int kind, void** args);

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

thread_local BlockRun* g_blk = nullptr;
thread_local void* g_sched_sp = nullptr;
#ifdef CUDASIM_USE_UCONTEXT
thread_local ucontext_t g_sched_uc;
#endif
[[maybe_unused]] const void* g_sched_bottom = nullptr;
[[maybe_unused]] size_t g_sched_size = 0;

std::mutex g_launch_mu;  // one launch at a time (the fibers' state is per OS thread, the
                         // bookkeeping below is not)
cudaError_t g_last_error = cudaSuccess;
std::string g_error_msg;
std::map<const void*, int> g_max_dyn_smem;
long g_set_attr_calls = 0;
std::vector<std::pair<uintptr_t, uintptr_t>> g_globals;  // [begin, end)
std::vector<char*> g_stacks;

char* stack_for(int i) {
  while (static_cast<int>(g_stacks.size()) <= i) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cudasim: cannot map a fiber stack\n");
      std::abort();
    }
    g_stacks.push_back(static_cast<char*>(p));
  }
  return g_stacks[i];
}

// ---- switching between the scheduler and a fiber ----
void enter(ThreadState* t) {
  g_cur = t;
  g_builtins = &t->b;
#ifdef CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t->stack, kStack);
#endif
#ifdef CUDASIM_USE_UCONTEXT
  swapcontext(&g_sched_uc, &t->uc);
#else
  cudasim_ctx_switch(&g_sched_sp, t->sp);
#endif
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void leave(ThreadState* t, bool exiting) {
#ifdef CUDASIM_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fake, g_sched_bottom, g_sched_size);
#else
  (void)exiting;
#endif
#ifdef CUDASIM_USE_UCONTEXT
  swapcontext(&t->uc, &g_sched_uc);
#else
  cudasim_ctx_switch(&t->sp, g_sched_sp);
#endif
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(t->fake, &g_sched_bottom, &g_sched_size);
#endif
}

std::string where(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

std::string who(const ThreadState* t) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", t->b.bid.x, t->b.bid.y,
                t->b.bid.z, t->b.tid.x, t->b.tid.y, t->b.tid.z);
  return buf;
}

// A kernel error found by a fiber: the block stops here, the launch reports it.
[[noreturn]] void fail(const std::string& msg) {
  BlockRun* blk = g_blk;
  if (!blk->failed) {
    blk->failed = true;
    blk->msg = msg;
  }
  leave(g_cur, true);
  std::abort();  // not reached: a failed block's fibers are never resumed
}

Granule& granule(const void* p) {
  return g_blk->shadow[(static_cast<const unsigned char*>(p) - g_blk->smem) / 16];
}

void complete_copies(ThreadState* t, size_t upto) {
  for (size_t i = 0; i < upto; ++i) {
    const Copy& c = t->copies[i];
    Granule& g = granule(c.dst);
    g.pending = false;
    g.w_epoch = g_blk->epoch;
    if (c.src_size > 0) std::memcpy(c.dst, c.src, c.src_size);
    if (c.size > c.src_size) std::memset(c.dst + c.src_size, 0, c.size - c.src_size);
  }
  t->copies.erase(t->copies.begin(), t->copies.begin() + upto);
}

void thread_exit(ThreadState* t) {
  BlockRun* blk = g_blk;
  if (!t->copies.empty())
    fail(who(t) + " exits with " + std::to_string(t->copies.size()) +
         " cp.async copies never waited for (cp.async.wait_group)");
  if (blk->bar_arrived > 0)
    fail(who(t) + " exits while " + std::to_string(blk->bar_arrived) +
         " threads wait at __syncthreads at " + where(blk->bar_file, blk->bar_line) +
         ": a barrier not reached by all threads of the block");
  const Warp& w = blk->warps[t->warp];
  if (w.arrived > 0)
    fail(who(t) + " exits while " + std::to_string(w.arrived) + " lanes of its warp wait at " +
         where(w.file, w.line) + " (a .sync.aligned warp instruction needs all 32 lanes)");
  t->st = St::kDone;
  --blk->live;
  ++blk->exited;
  leave(t, true);
}

void fiber_main() {
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  ThreadState* t = g_cur;
  g_blk->body(g_blk->ctx);
  thread_exit(g_cur == t ? t : g_cur);
  std::abort();
}

void init_fiber(ThreadState* t) {
#ifdef CUDASIM_ASAN
  // A reused stack keeps the redzones of the frames its last fiber left without returning.
  __asan_unpoison_memory_region(t->stack, kStack);
#endif
#ifdef CUDASIM_USE_UCONTEXT
  getcontext(&t->uc);
  t->uc.uc_stack.ss_sp = t->stack;
  t->uc.uc_stack.ss_size = kStack;
  t->uc.uc_link = nullptr;
  makecontext(&t->uc, fiber_main, 0);
#else
  // Stack top: [fake return address][fiber_main][6 callee-saved registers] (see the switch).
  uintptr_t top = (reinterpret_cast<uintptr_t>(t->stack) + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  t->sp = sp;
#endif
}

std::string deadlock_report(BlockRun* blk) {
  std::map<std::string, int> sites;
  for (int i = 0; i < blk->n; ++i) {
    const ThreadState& t = blk->th[i];
    if (t.st == St::kBar) ++sites["__syncthreads at " + where(t.file, t.line)];
    if (t.st == St::kWarp) ++sites["warp collective at " + where(t.file, t.line)];
  }
  std::string s = "deadlock in block (" + std::to_string(blk->block_idx.x) + "," +
                  std::to_string(blk->block_idx.y) + "," + std::to_string(blk->block_idx.z) +
                  "): " + std::to_string(blk->exited) + " threads exited, the others wait at";
  for (auto& kv : sites) s += " [" + kv.first + ": " + std::to_string(kv.second) + " threads]";
  return s;
}

// Run one block to completion; false (and blk->msg) on a kernel error.
bool run_block(BlockRun* blk) {
  const int n = blk->n;
  blk->live = n;
  blk->exited = 0;
  blk->bar_arrived = 0;
  blk->failed = false;
  for (int w = 0; w < (n + 31) / 32; ++w) {
    blk->warps[w].arrived = 0;
    blk->warps[w].size = std::min(32, n - 32 * w);
  }
  // Shared memory starts as garbage on a GPU: a NaN in every 16-, 32- and 64-bit float view
  // (0xff bytes), so a read of a byte nobody wrote shows up in the results.
  if (blk->smem_size) std::memset(blk->smem, 0xff, blk->smem_size);
  blk->shadow.assign(blk->smem_size / 16, Granule{});
  blk->epoch = 0;
  for (int i = 0; i < n; ++i) {
    ThreadState& t = blk->th[i];
    t.stack = stack_for(i);
    t.b.tid = uint3{static_cast<unsigned>(i % blk->block.x),
                          static_cast<unsigned>((i / blk->block.x) % blk->block.y),
                          static_cast<unsigned>(i / (blk->block.x * blk->block.y))};
    t.b.bid = blk->block_idx;
    t.b.bdim = blk->block;
    t.b.gdim = blk->grid;
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.st = St::kRun;
    t.copies.clear();
    t.group_ends.clear();
    init_fiber(&t);
  }
  while (blk->live > 0) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (blk->th[i].st != St::kRun) continue;
      ran = true;
      enter(&blk->th[i]);
      if (blk->failed) return false;
    }
    if (!ran && blk->live > 0) {
      blk->failed = true;
      blk->msg = deadlock_report(blk);
      return false;
    }
  }
  return true;
}

bool in_smem(const void* p, size_t bytes) {
  const BlockRun* blk = g_blk;
  const auto* c = static_cast<const unsigned char*>(p);
  return blk->smem && c >= blk->smem && c + bytes <= blk->smem + blk->smem_size;
}

void check_smem(const void* p, size_t bytes, const char* what, const char* file, int line) {
  if (!in_smem(p, bytes))
    fail(who(g_cur) + ": " + what + " at " + where(file, line) + " addresses " +
         std::to_string(bytes) + " bytes outside the block's " +
         std::to_string(g_blk->smem_size) + " bytes of dynamic shared memory (offset " +
         std::to_string(static_cast<const unsigned char*>(p) - g_blk->smem) + ")");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    fail(who(g_cur) + ": " + what + " at " + where(file, line) +
         " with a shared address not 16-byte aligned");
}

// ---- warp collectives ----
const char* kind_name(int k) {
  switch (k) {
    case 0: return "ldmatrix.x4";
    case 1: return "ldmatrix.x4.trans";
    case 2: return "mma.sync.m16n8k16.bf16";
    case 3: return "mma.sync.m16n8k16.f16";
    case 4: return "mma.sync.m16n8k8.tf32";
    default: return "?";
  }
}

void collective(int kind, void* arg, const char* file, int line, Compute compute) {
  ThreadState* t = g_cur;
  BlockRun* blk = g_blk;
  Warp& w = blk->warps[t->warp];
  if (w.size != 32)
    fail(who(t) + ": " + kind_name(kind) + " at " + where(file, line) + " in a warp of " +
         std::to_string(w.size) + " threads (needs 32)");
  if (w.arrived == 0) {
    w.kind = kind;
    w.file = file;
    w.line = line;
  } else if (w.kind != kind || w.line != line || std::strcmp(w.file, file) != 0) {
    fail("divergent warp: " + who(t) + " (lane " + std::to_string(t->lane) + ") reaches " +
         kind_name(kind) + " at " + where(file, line) + " while " + std::to_string(w.arrived) +
         " lanes of its warp wait at " + kind_name(w.kind) + " at " + where(w.file, w.line));
  }
  w.args[t->lane] = arg;
  if (++w.arrived == 32) {
    compute(kind, w.args);
    w.arrived = 0;
    ThreadState* base = &blk->th[t->warp * 32];
    for (int l = 0; l < 32; ++l)
      if (base[l].st == St::kWarp) base[l].st = St::kRun;
    return;
  }
  t->st = St::kWarp;
  t->file = file;
  t->line = line;
  leave(t, false);
}

struct LdsmArg {
  const unsigned char* addr;
  uint32_t* r[4];
};

// ldmatrix.m8n8.x4.b16: lane 8j + i gives the address of row i of matrix j (16 bytes). Lane l
// receives in r[j] the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j, or with .trans
// (rows 2(l%4), 2(l%4)+1, col l/4); the lower column/row in the low 16 bits.
void ldsm_compute(int kind, void** args) {
  const bool trans = kind == 1;
  uint32_t res[32][4];
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      if (!trans) {
        const unsigned char* row = static_cast<LdsmArg*>(args[8 * j + l / 4])->addr;
        std::memcpy(&res[l][j], row + 4 * (l % 4), 4);
      } else {
        const unsigned char* r0 = static_cast<LdsmArg*>(args[8 * j + 2 * (l % 4)])->addr;
        const unsigned char* r1 = static_cast<LdsmArg*>(args[8 * j + 2 * (l % 4) + 1])->addr;
        uint16_t lo, hi;
        std::memcpy(&lo, r0 + 2 * (l / 4), 2);
        std::memcpy(&hi, r1 + 2 * (l / 4), 2);
        res[l][j] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) *static_cast<LdsmArg*>(args[l])->r[j] = res[l][j];
}

struct MmaArg {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
};

float b16_to_f(uint16_t v, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{v}) : __half2float(__half{v});
}

// mma.sync D = A * B + C with the PTX fragment layouts (g = lane / 4, t = lane % 4):
//   m16n8k16 (bf16/f16): a0..a3 = (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
//                        b0, b1 = (k 2t..2t+1, n g), (k 2t+8..2t+9, n g)
//   m16n8k8 (tf32):      a0..a3 = (g, t), (g+8, t), (g, t+4), (g+8, t+4); b0, b1 = (k t, n g),
//                        (k t+4, n g); the hardware reads 19 bits of each operand
//   C/D: d0, d1 = (g, 2t), (g, 2t+1); d2, d3 = (g+8, 2t), (g+8, 2t+1).
void mma_compute(int kind, void** args) {
  float A[16][16], B[16][8], C[16][8];
  const bool tf32 = kind == 4;
  const int K = tf32 ? 8 : 16;
  for (int l = 0; l < 32; ++l) {
    const MmaArg* m = static_cast<MmaArg*>(args[l]);
    const int g = l / 4, t = l % 4;
    if (tf32) {
      auto f = [](uint32_t u) { return __uint_as_float(u & 0xffffe000u); };
      A[g][t] = f(m->a[0]);
      A[g + 8][t] = f(m->a[1]);
      A[g][t + 4] = f(m->a[2]);
      A[g + 8][t + 4] = f(m->a[3]);
      B[t][g] = f(m->b[0]);
      B[t + 4][g] = f(m->b[1]);
    } else {
      const bool bf = kind == 2;
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = b16_to_f(static_cast<uint16_t>(m->a[r]), bf);
        A[row][col + 1] = b16_to_f(static_cast<uint16_t>(m->a[r] >> 16), bf);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * t + 8 * r][g] = b16_to_f(static_cast<uint16_t>(m->b[r]), bf);
        B[2 * t + 8 * r + 1][g] = b16_to_f(static_cast<uint16_t>(m->b[r] >> 16), bf);
      }
    }
    C[g][2 * t] = m->d[0];
    C[g][2 * t + 1] = m->d[1];
    C[g + 8][2 * t] = m->d[2];
    C[g + 8][2 * t + 1] = m->d[3];
  }
  // Products of 16-bit or TF32 operands are exact in fp32; accumulated in fp32, k in order.
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < K; ++k) acc = std::fmaf(A[i][k], B[k][j], acc);
      C[i][j] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    MmaArg* m = static_cast<MmaArg*>(args[l]);
    const int g = l / 4, t = l % 4;
    m->d[0] = C[g][2 * t];
    m->d[1] = C[g][2 * t + 1];
    m->d[2] = C[g + 8][2 * t];
    m->d[3] = C[g + 8][2 * t + 1];
  }
}

}  // namespace

// ---- API used by the kernels ----
unsigned char* dynamic_smem() { return g_blk->smem; }

void syncthreads(const char* file, int line) {
  ThreadState* t = g_cur;
  BlockRun* blk = g_blk;
  if (blk->exited > 0)
    fail(who(t) + " reaches __syncthreads at " + where(file, line) + " after " +
         std::to_string(blk->exited) +
         " threads of the block exited: a barrier not reached by all threads");
  if (blk->bar_arrived == 0) {
    blk->bar_file = file;
    blk->bar_line = line;
  } else if (blk->bar_line != line || std::strcmp(blk->bar_file, file) != 0) {
    fail("divergent barriers: " + who(t) + " reaches __syncthreads at " + where(file, line) +
         " while " + std::to_string(blk->bar_arrived) + " threads wait at " +
         where(blk->bar_file, blk->bar_line));
  }
  if (++blk->bar_arrived == blk->n) {
    blk->bar_arrived = 0;
    ++blk->epoch;
    for (int i = 0; i < blk->n; ++i)
      if (blk->th[i].st == St::kBar) blk->th[i].st = St::kRun;
    return;
  }
  t->st = St::kBar;
  t->file = file;
  t->line = line;
  leave(t, false);
}

void cp_async(void* smem, const void* gmem, int src_size, int size, const char* file, int line) {
  check_smem(smem, size, "cp.async destination", file, line);
  if (src_size > 0) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
      fail(who(g_cur) + ": cp.async at " + where(file, line) +
           " from a global address not 16-byte aligned");
    check_global_read(gmem, src_size, "cp.async", file, line);
  }
  // Write after read: another thread read these bytes in this barrier interval; on a GPU the copy
  // may land before that read (cudasim lands it late, so only this check sees it).
  Granule& g = granule(smem);
  const int me = g_cur->linear;
  if (g.r_epoch == g_blk->epoch && g.reader != me)
    fail("shared-memory race: " + who(g_cur) + ": cp.async at " + where(file, line) +
         " overwrites bytes at offset " +
         std::to_string(static_cast<unsigned char*>(smem) - g_blk->smem) + " that " +
         (g.reader == -2 ? std::string("several threads") : "thread " + std::to_string(g.reader)) +
         " read with ldmatrix at " + where(g.r_file, g.r_line) +
         " with no __syncthreads in between");
  g.writer = me;
  g.pending = true;
  g.w_file = file;
  g.w_line = line;
  g_cur->copies.push_back(Copy{static_cast<unsigned char*>(smem),
                               static_cast<const unsigned char*>(gmem), src_size, size});
}

void cp_async_commit() { g_cur->group_ends.push_back(g_cur->copies.size()); }

// cp.async.wait_group n: all but the newest n committed groups have landed. Copies land here
// and nowhere earlier, so a read before the wait (or before the barrier after another
// thread's wait) sees what shared memory held before: NaN at first, a stale stage later.
void cp_async_wait(int n, const char* file, int line) {
  (void)file;
  (void)line;
  ThreadState* t = g_cur;
  const int groups = static_cast<int>(t->group_ends.size());
  if (groups <= n) return;
  const size_t upto = t->group_ends[groups - n - 1];
  complete_copies(t, upto);
  t->group_ends.erase(t->group_ends.begin(), t->group_ends.begin() + (groups - n));
  for (auto& e : t->group_ends) e -= upto;
}

void ldmatrix_x4(bool trans, uint32_t* r0, uint32_t* r1, uint32_t* r2, uint32_t* r3,
                 const void* smem, const char* file, int line) {
  check_smem(smem, 16, trans ? "ldmatrix.trans" : "ldmatrix", file, line);
  // Read after write: bytes whose cp.async has not landed, or landed (another thread's
  // wait_group) in this barrier interval: nothing orders that landing before this read.
  Granule& g = granule(smem);
  const int me = g_cur->linear;
  if (g.writer >= 0 && (g.pending || (g.writer != me && g.w_epoch == g_blk->epoch)))
    fail("shared-memory race: " + who(g_cur) + ": ldmatrix at " + where(file, line) +
         " reads bytes at offset " +
         std::to_string(static_cast<const unsigned char*>(smem) - g_blk->smem) +
         " written by thread " + std::to_string(g.writer) + "'s cp.async at " +
         where(g.w_file, g.w_line) +
         (g.pending ? ", not landed yet (its cp.async.wait_group comes later)"
                    : ", landed by its wait_group with no __syncthreads before this read"));
  g.reader = (g.r_epoch == g_blk->epoch && g.reader != me) ? -2 : me;
  g.r_epoch = g_blk->epoch;
  g.r_file = file;
  g.r_line = line;
  LdsmArg a{static_cast<const unsigned char*>(smem), {r0, r1, r2, r3}};
  collective(trans ? 1 : 0, &a, file, line, ldsm_compute);
}

void mma_sync(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b, const char* file,
              int line) {
  MmaArg m{d, a, b};
  collective(2 + static_cast<int>(kind), &m, file, line, mma_compute);
}

void register_global(const void* p, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  g_globals.emplace_back(b, b + bytes);
}
void clear_globals() { g_globals.clear(); }

void check_global_read(const void* p, size_t bytes, const char* what, const char* file, int line) {
  if (g_globals.empty()) return;
  const auto b = reinterpret_cast<uintptr_t>(p);
  for (const auto& r : g_globals)
    if (b >= r.first && b + bytes <= r.second) return;
  fail(who(g_cur) + ": " + what + " at " + where(file, line) + " reads " +
       std::to_string(bytes) + " bytes of global memory outside every allocation");
}

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
