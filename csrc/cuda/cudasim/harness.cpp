// cudasim's standalone self-test: one bf16 3x3 convolution (conv_igemm_kernel, the 128 x 64
// tensor-core tile, 18 pipeline steps over 4 stages) on exactly-sized heap buffers registered with
// the simulator, against a float64 direct convolution. Built without torch by
// tests/test_cudasim.py, with -DFR_PLANT=n to plant a bug (csrc/cuda/conv_igemm.cuh) that
// cudasim must catch, and by scripts/cudasim_sanitizers.sh under ASan + UBSan.
// Exit status: 0 correct, 1 wrong results, 2 the simulator reported a kernel error.
//
// `harness <check>` runs instead one of the toy kernels below that the simulator must refuse or
// report (exit 2 with the message): early-exit (a barrier not reached by all threads),
// divergent-barrier, divergent-warp (lanes at two different ldmatrix call sites), smem-48k (a
// launch over 48 KB of dynamic shared memory without cudaFuncSetAttribute), block-1025.
#include <cstdio>
#include <cstring>
#include <vector>

#include "../conv_igemm.cuh"

using namespace fastres::cuda;
using T = __nv_bfloat16;

namespace toy {

__global__ void early_exit(int* out) {
  if (threadIdx.x >= 32) return;  // BUG: these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();  // BUG: another barrier (bar.sync 0 would pair them on a GPU: by luck)
  }
  out[threadIdx.x] = 1;
}

__global__ void divergent_warp(int* out) {
  FR_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  const unsigned char* row = smem + 16 * (threadIdx.x % 8);
  if (threadIdx.x < 16) {
    ldsm_x4(r[0], r[1], r[2], r[3], row);
  } else {
    ldsm_x4(r[0], r[1], r[2], r[3], row);  // BUG: half the warp at another call site
  }
  out[threadIdx.x] = static_cast<int>(r[0]);
}

__global__ void big_smem(int* out) {
  FR_DYNAMIC_SMEM(smem);
  smem[threadIdx.x] = 1;
  out[threadIdx.x] = smem[threadIdx.x];
}

int run(const char* what) {
  std::vector<int> out(2048);
  if (!std::strcmp(what, "early-exit")) {
    FR_LAUNCH(1, 64, 0, nullptr, early_exit)(out.data());
  } else if (!std::strcmp(what, "divergent-barrier")) {
    FR_LAUNCH(1, 64, 0, nullptr, divergent_barrier)(out.data());
  } else if (!std::strcmp(what, "divergent-warp")) {
    FR_LAUNCH(1, 32, 128, nullptr, divergent_warp)(out.data());
  } else if (!std::strcmp(what, "smem-48k")) {
    FR_LAUNCH(1, 32, 64 * 1024, nullptr, big_smem)(out.data());
  } else if (!std::strcmp(what, "block-1025")) {
    FR_LAUNCH(1, 1025, 0, nullptr, early_exit)(out.data());
  } else {
    std::printf("unknown check %s\n", what);
    return 3;
  }
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) {
    std::printf("not reported\n");
    return 0;
  }
  std::printf("cudasim reported: %s\n", cudaGetErrorString(e));
  return 2;
}

}  // namespace toy

int main(int argc, char** argv) {
  if (argc > 1) return toy::run(argv[1]);
  const int N = 2, H = 9, W = 9, C = 64, K = 64, R = 3, S = 3, pad = 1;
  const int P = H, Q = W, M = N * P * Q;
  uint32_t seed = 12345;
  auto rnd = [&] {  // uniform in [-1, 1), deterministic
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / 8388608.f - 1.f;
  };
  // Exact sizes (vectors of T): a read past them is outside every registered allocation.
  std::vector<T> x(static_cast<size_t>(N) * H * W * C), w(static_cast<size_t>(K) * R * S * C);
  std::vector<T> out(static_cast<size_t>(M) * K);
  for (auto& v : x) v = __float2bfloat16_rn(rnd());
  for (auto& v : w) v = __float2bfloat16_rn(rnd() / 24.f);
  cudasim::register_global(x.data(), x.size() * sizeof(T));
  cudasim::register_global(w.data(), w.size() * sizeof(T));

  ConvParams p{};
  p.x = x.data();
  p.w = w.data();
  p.out = out.data();
  p.N = N, p.XH = H, p.XW = W, p.XC = C, p.OH = P, p.OW = Q, p.OC = K, p.R = R, p.S = S;
  p.stride_h = p.stride_w = 1, p.pad_h = p.pad_w = pad, p.dil_h = p.dil_w = 1;
  p.M = M;
  const cudaError_t e =
      launch_conv_kernel<T, Math::kMma16, CfgTcSmall, false, false, false, false, false, false>(
          p, nullptr);
  if (e != cudaSuccess) {
    std::printf("cudasim reported: %s\n", cudaGetErrorString(e));
    return 2;
  }
  double worst = 0.0;
  int bad = 0;
  for (int n = 0; n < N; ++n)
    for (int oh = 0; oh < P; ++oh)
      for (int ow = 0; ow < Q; ++ow)
        for (int k = 0; k < K; ++k) {
          double ref = 0.0;
          for (int r = 0; r < R; ++r)
            for (int s = 0; s < S; ++s) {
              const int h = oh - pad + r, wc = ow - pad + s;
              if (h < 0 || h >= H || wc < 0 || wc >= W) continue;
              for (int c = 0; c < C; ++c)
                ref += double(__bfloat162float(x[((size_t(n) * H + h) * W + wc) * C + c])) *
                       __bfloat162float(w[((size_t(k) * R + r) * S + s) * C + c]);
            }
          const double o = __bfloat162float(out[((size_t(n) * P + oh) * Q + ow) * K + k]);
          const double err = std::fabs(o - ref);
          // bf16 output: half an ulp is 2^-9 relative; fp32 accumulation adds far less.
          if (!(err <= 4e-3 * std::fabs(ref) + 1e-3)) ++bad;
          if (!std::isnan(worst) && !(err <= worst)) worst = err;  // a NaN sticks
        }
  std::printf("%d of %d outputs wrong, max error %g\n", bad, M * K, worst);
  return bad ? 1 : 0;
}
