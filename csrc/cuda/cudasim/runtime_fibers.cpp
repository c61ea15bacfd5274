// cudasim runtime: every CUDA thread a fiber (the x86-64 stack switch, or ucontext), the block
// scheduler that runs a block's fibers round-robin to completion on one OS thread, __syncthreads,
// and the kernel-error reports (fail, deadlocks, threads that exit with others waiting). See
// cudasim.h and csrc/cuda/README.md (cudasim).
#include "runtime_internal.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#define CUDASIM_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif

#ifndef CUDASIM_USE_UCONTEXT
// Switch stacks: save the callee-saved registers on the current stack, store its pointer in
// *save, load `to` and pop the registers saved there: 15 instructions instead of swapcontext's
// signal-mask system call (every barrier and every warp instruction switches fibers).
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

thread_local ThreadState* g_cur = nullptr;
thread_local Builtins* g_builtins = nullptr;
thread_local BlockRun* g_blk = nullptr;

namespace {

#if defined(CUDASIM_ASAN)
constexpr size_t kStack = 512 * 1024;  // ASan's redzones grow every frame
#else
constexpr size_t kStack = 64 * 1024;  // the kernels' frames are a few KB (ptxas: no stack)
#endif

thread_local void* g_sched_sp = nullptr;
#ifdef CUDASIM_USE_UCONTEXT
thread_local ucontext_t g_sched_uc;
#endif
[[maybe_unused]] const void* g_sched_bottom = nullptr;
[[maybe_unused]] size_t g_sched_size = 0;

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

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace cudasim
