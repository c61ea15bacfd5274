// The per-channel reductions of the CPU kernels: the double accumulators, reduce_dense (sums per
// channel over N, H, W in an order fixed by the shape, so bitwise reproducible whatever the
// thread count) and conv_stats' sum and sum of squares per channel (channel_stats).
// A part of kernels_impl.h, which includes it inside the ISA target region: internal linkage.
#pragma once

#ifndef FASTRES_KERNELS_IMPL_PART
#error "kernels_impl_reduce.h is a part of kernels_impl.h: include kernels_impl.h"
#endif

namespace fastres::cpu::FASTRES_ISA {
namespace {

// Row blocks of an NHWC reduction: at most this many partial sums per channel. The split depends
// on the shape only (never on the thread count), so the sums are bitwise reproducible.
constexpr int64_t kMaxBlocks = 64;
// Rows of an NHWC reduction summed in float before they are added to a block's double partials.
// 16 was as fast but its float rounding put the sum of squares of a 2x32x9x11 convolution output
// outside the suite's bound (4.9e-5 against 3.4e-5, PyTorch's own float32 error 1.2e-5); 4, 8 and
// 16 ran alike (memory-bound), 2 and 1 slower (bf16 8x256x56x56, alternating with eager's).
constexpr int64_t kRows = 4;

// float -> two double vectors (low and high halves).
inline void split_double(const Vectorized<float>& v, DV& lo, DV& hi) {
  static_assert(Vectorized<float>::size() == 2 * DV::size(), "vector widths");
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
#else
  alignas(64) float f[Vectorized<float>::size()];
  alignas(64) double d[Vectorized<float>::size()];
  v.store(f);
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) {
    d[i] = f[i];
  }
  lo = DV::loadu(d);
  hi = DV::loadu(d + DV::size());
#endif
}

// A register accumulator in double, summed across lanes in a fixed order.
template <typename M>
struct DAcc {
  DV lo = DV(0.0), hi = DV(0.0);
  inline void add(const Vectorized<M>& v) {
    if constexpr (std::is_same_v<M, double>) {
      lo = lo + v;
    } else {
      DV a, b;
      split_double(v, a, b);
      lo = lo + a;
      hi = hi + b;
    }
  }
  double total() const {
    alignas(64) double buf[2 * DV::size()];
    lo.store(buf);
    hi.store(buf + DV::size());
    double s = 0;
    for (int64_t i = 0; i < 2 * DV::size(); ++i) {
      s += buf[i];
    }
    return s;
  }
};

// acc[0, n) += f[0, n) (float or double partials into double ones).
template <typename M>
inline void add_to_doubles(double* acc, const M* f, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<M, float>) {
    constexpr int64_t kF = Vectorized<float>::size();
    for (; i + kF <= n; i += kF) {
      DV lo, hi;
      split_double(Vectorized<float>::loadu(f + i), lo, hi);
      (DV::loadu(acc + i) + lo).store(acc + i);
      (DV::loadu(acc + i + DV::size()) + hi).store(acc + i + DV::size());
    }
  }
  for (; i < n; ++i) {
    acc[i] += static_cast<double>(f[i]);
  }
}

// Per-channel sums of NS quantities over N, H, W, accumulated in double: body(i, n, prm, vals)
// fills vals[0, NS) for elements [i, i + n). NHWC: partial sums per fixed block of rows; NCHW:
// one partial per (n, c) plane; the partials are added in index order afterwards.
template <typename M, int NS, typename Body>
void reduce_dense(const Geom& g, double* const* out, const Body& body) {
  using V = Vectorized<M>;
  constexpr int64_t kV = V::size();
  const int64_t C = g.c, HW = g.h * g.w;
  if (g.channels_last) {
    const int64_t P = g.n * HW;
    const int64_t nb =
        std::clamp<int64_t>(P * C / kGrain, 1, std::min(kMaxBlocks, std::max<int64_t>(P, 1)));
    std::vector<double> part(static_cast<size_t>(nb * NS * C), 0.0);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      V vals[NS];
      // Rows in memory order, each row's channel vectors added into float partials (NS * C
      // values, L1-resident); every kRows rows the float partials go into the block's double
      // partials. Sequential reads (the strided per-channel sweep ran at ~10 GB/s).
      std::vector<M> fbuf(static_cast<size_t>(NS * C));
      M* fa = fbuf.data();
      for (int64_t b = b0; b < b1; ++b) {
        double* acc = part.data() + b * NS * C;
        for (int64_t p0 = P * b / nb, p1 = P * (b + 1) / nb; p0 < p1; p0 += kRows) {
          const int64_t pe = std::min(p0 + kRows, p1);
          std::fill(fbuf.begin(), fbuf.end(), M(0));
          for (int64_t p = p0; p < pe; ++p) {
            for (int64_t c = 0; c < C; c += kV) {
              const int64_t n = std::min(kV, C - c);
              const ChanVec<M> prm{c, n};
              body(p * C + c, n, prm, vals);
              for (int s = 0; s < NS; ++s) {
                M* f = fa + s * C + c;
                const V v = vload(f, n) + vals[s];
                if (n == kV) {
                  v.store(f);
                } else {
                  v.store(f, n);
                }
              }
            }
          }
          add_to_doubles(acc, fa, NS * C);
        }
      }
    });
    for (int s = 0; s < NS; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t b = 0; b < nb; ++b) {
          t += part[(b * NS + s) * C + c];
        }
        out[s][c] = t;
      }
    }
  } else {
    const int64_t U = g.n * C;
    std::vector<double> part(static_cast<size_t>(U * NS), 0.0);
    at::parallel_for(0, U, grain_for(HW), [&](int64_t u0, int64_t u1) {
      V vals[NS];
      for (int64_t u = u0; u < u1; ++u) {
        DAcc<M> acc[NS];
        const ChanScalar<M> prm{u % C};
        for (int64_t q = 0; q < HW; q += kV) {
          const int64_t n = std::min(kV, HW - q);
          body(u * HW + q, n, prm, vals);
          for (int s = 0; s < NS; ++s) {
            acc[s].add(n == kV ? vals[s] : V::set(V(M(0)), vals[s], n));
          }
        }
        for (int s = 0; s < NS; ++s) {
          part[u * NS + s] = acc[s].total();
        }
      }
    });
    for (int s = 0; s < NS; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t n = 0; n < g.n; ++n) {
          t += part[(n * C + c) * NS + s];
        }
        out[s][c] = t;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// conv_stats' statistics: sum and sum of squares per channel.

template <typename T>
void stats_impl(const StatsArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  const T* in = static_cast<const T*>(a.in);
  double* outs[2] = {a.sum, a.sumsq};
  reduce_dense<M, 2>(a.g, outs, [&](int64_t i, int64_t n, const auto&, V* vals) {
    const V v = IO<T>::load(in + i, n);
    vals[0] = v;
    vals[1] = v * v;
  });
}

void channel_stats(const StatsArgs& a) {
  if (is_empty(a.g)) {
    zero(a.sum, a.g.c);
    zero(a.sumsq, a.g.c);
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) { stats_impl<decltype(tag)>(a); });
}

}  // namespace
}  // namespace fastres::cpu::FASTRES_ISA
