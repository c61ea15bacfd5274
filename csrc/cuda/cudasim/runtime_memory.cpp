// cudasim runtime: shared and global memory. The launch's dynamic shared memory and the checks of
// addresses into it, cp.async (issued, landed only at its cp.async.wait_group), the race check's
// shadow per 16-byte granule (its write-after-read half here; the read-after-write half is
// ldmatrix_x4's, runtime_warp.cpp), and the global-read bounds check against registered
// allocations.
#include "runtime_internal.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace cudasim {

namespace {

std::vector<std::pair<uintptr_t, uintptr_t>> g_globals;  // [begin, end)

}  // namespace

Granule& granule(const void* p) {
  return g_blk->shadow[(static_cast<const unsigned char*>(p) - g_blk->smem) / 16];
}

namespace {

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

bool in_smem(const void* p, size_t bytes) {
  const BlockRun* blk = g_blk;
  const auto* c = static_cast<const unsigned char*>(p);
  return blk->smem && c >= blk->smem && c + bytes <= blk->smem + blk->smem_size;
}

}  // namespace

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

unsigned char* dynamic_smem() { return g_blk->smem; }

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

}  // namespace cudasim
