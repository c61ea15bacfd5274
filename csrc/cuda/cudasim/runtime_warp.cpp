// cudasim runtime: the warp-level instructions. A collective waits until all 32 lanes of the warp
// reach the same call site (else a divergent-warp error) and then computes the warp's result
// from the PTX fragment layouts: ldmatrix.x4(.trans) (with the race check's read-after-write
// half) and mma.sync (m16n8k16 bf16/f16, m16n8k8 TF32).
#include "runtime_internal.h"

#include <cstring>
#include <string>

namespace cudasim {

namespace {

using Compute = void (*)(int kind, void** args);

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

}  // namespace cudasim
