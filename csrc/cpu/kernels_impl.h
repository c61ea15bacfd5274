// The single-pass CPU kernels of fastres, written once with at::vec::Vectorized and compiled once
// per instruction set: kernels_<isa>.cpp defines FASTRES_ISA (a namespace name) and, on x86,
// CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 so that at::vec picks its 256/512-bit Vectorized<T>.
// Everything here has internal linkage (anonymous namespace) except the one table getter, so the
// copies for different instruction sets never meet in the linker.
//
// Data layout: dense (N, C, H, W) activations in NCHW or NHWC order (kernels.h, Geom).
//   NHWC: rows of C channels; per-channel vectors are loaded as vectors along the row.
//   NCHW: planes of H*W values of one channel; per-channel values are broadcast scalars.
// Arithmetic happens in the opmath type (float, or double for float64 activations); reduced
// floating types are converted on load and rounded (to nearest even) on store.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

#ifndef FASTRES_ISA
#error "define FASTRES_ISA (the namespace of this instruction set) before including kernels_impl.h"
#endif

namespace fastres::cpu::FASTRES_ISA {
namespace {

using at::vec::Vectorized;
using DV = Vectorized<double>;

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per parallel chunk: 32 K floats is 128 KiB of traffic per input, far above the
// ~2 us an OpenMP fork/join costs on this class of machine, and small enough to split a ResNet
// activation (8x64x56x56 = 1.6 M values) into ~50 chunks.
constexpr int64_t kGrain = 32768;
// Row blocks of an NHWC reduction: at most this many partial sums per channel. The split depends
// on the shape only (never on the thread count), so the sums are bitwise reproducible.
constexpr int64_t kMaxBlocks = 64;
// Rows of an NHWC reduction summed in float before they are added to a block's double partials.
// 16 was as fast but its float rounding put the sum of squares of a 2x32x9x11 convolution output
// outside the suite's bound (4.9e-5 against 3.4e-5, PyTorch's own float32 error 1.2e-5); 4, 8 and
// 16 ran alike (memory-bound), 2 and 1 slower (bf16 8x256x56x56, alternating with eager's).
constexpr int64_t kRows = 4;

#define FASTRES_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr bool NAME = false;           \
      return __VA_ARGS__();                  \
    }                                        \
  }()

template <typename F>
void dispatch_dtype(c10::ScalarType t, const F& f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::Double:
      return f(double{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    case c10::ScalarType::Half:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "fastres cpu kernels: unsupported dtype ", t);
  }
}

template <typename M>
inline Vectorized<M> vload(const M* p, int64_t n) {
  return n == Vectorized<M>::size() ? Vectorized<M>::loadu(p) : Vectorized<M>::loadu(p, n);
}

// n (<= Vectorized<opmath>::size()) consecutive values of T as one opmath vector, and back.
// A full vector of bfloat16/float16 values is half a Vectorized<T>; at::vec's partial
// loadu/store go through a stack buffer and memcpy on AVX2 (measured: bf16 bn_add_relu 65 ms
// with them vs 12 ms on AVX-512, 8x256x56x56, one thread), so full vectors move with one plain
// 128/256-bit load or store here.
template <typename T>
struct IO {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  static inline V load(const T* p, int64_t n) {
    if constexpr (std::is_same_v<T, M>) {
      return vload(p, n);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      if (n == V::size()) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return at::vec::convert<float>(Vectorized<T>(_mm512_castsi256_si512(raw)));
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if (n == V::size()) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return at::vec::convert<float>(Vectorized<T>(_mm256_castsi128_si256(raw)));
      }
#endif
      return at::vec::convert<float>(Vectorized<T>::loadu(p, n));
    }
  }
  static inline void store(T* p, const V& v, int64_t n) {
    if constexpr (std::is_same_v<T, M>) {
      if (n == V::size()) {
        v.store(p);
      } else {
        v.store(p, n);
      }
    } else {
      const Vectorized<T> r = at::vec::convert<T>(v);
#if defined(CPU_CAPABILITY_AVX512)
      if (n == V::size()) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(r));
        return;
      }
#elif defined(CPU_CAPABILITY_AVX2)
      if (n == V::size()) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(r));
        return;
      }
#endif
      r.store(p, n);
    }
  }
};

// A value the compiler cannot see through: keeps x * s + b from being contracted into an FMA
// where the reference rounds the product first (the prologue and the ReLU mask recomputed from
// it must agree with fastres.reference bit for bit, or a value within an ulp of zero would flip
// the mask).
template <typename V>
inline V opaque(V v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    __m512 r = v;
    asm("" : "+v"(r));
    return r;
  } else {
    __m512d r = v;
    asm("" : "+v"(r));
    return r;
  }
#elif defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    __m256 r = v;
    asm("" : "+x"(r));
    return r;
  } else {
    __m256d r = v;
    asm("" : "+x"(r));
    return r;
  }
#else
  return v;  // the baseline x86-64 target has no FMA to contract into
#endif
}

template <typename V>
inline V mul_add_exact(const V& x, const V& s, const V& b) {
  return opaque(x * s) + b;
}

// The largest opmath value that rounds to zero in T (round to nearest even): the ReLU mask of the
// reference is computed after rounding to T.
template <typename T>
constexpr opmath_t<T> zero_threshold() {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return 2.98023223876953125e-08f;  // 2^-25, half of float16's smallest subnormal
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return 4.59177480789956e-41f;  // 2^-134, half of bfloat16's smallest subnormal
  } else {
    return opmath_t<T>(0);
  }
}

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

// Per-channel values for elements of one NHWC row: a vector of channels [c, c + n).
template <typename M>
struct ChanVec {
  int64_t c, n;
  inline Vectorized<M> operator()(const void* arr) const {
    return vload(static_cast<const M*>(arr) + c, n);
  }
};

// Per-channel values for elements of one NCHW plane: channel c broadcast.
template <typename M>
struct ChanScalar {
  int64_t c;
  inline Vectorized<M> operator()(const void* arr) const {
    return Vectorized<M>(static_cast<const M*>(arr)[c]);
  }
};

inline bool is_empty(const Geom& g) {
  return g.n * g.c * g.h * g.w == 0;  // (data pointers of empty tensors may be null)
}

inline void zero(double* out, int64_t c) {
  if (out != nullptr) {
    std::fill(out, out + c, 0.0);
  }
}

inline int64_t grain_for(int64_t inner) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
}

// Elementwise map over a dense (N, C, H, W) tensor: body(i, n, prm) handles elements [i, i + n),
// all of one NCHW plane or consecutive channels of one NHWC row; prm(arr) gives their per-channel
// values of arr.
template <typename M, typename Body>
void map_dense(const Geom& g, const Body& body) {
  constexpr int64_t kV = Vectorized<M>::size();
  const int64_t C = g.c, HW = g.h * g.w;
  if (g.channels_last) {
    at::parallel_for(0, g.n * HW, grain_for(C), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t c = 0; c < C; c += kV) {
          const int64_t n = std::min(kV, C - c);
          body(p * C + c, n, ChanVec<M>{c, n});
        }
      }
    });
  } else {
    at::parallel_for(0, g.n * C, grain_for(HW), [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const ChanScalar<M> prm{u % C};
        for (int64_t q = 0; q < HW; q += kV) {
          body(u * HW + q, std::min(kV, HW - q), prm);
        }
      }
    });
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
// bn_add_relu and the conv_bias_act epilogue: out = relu?(in * scale + shift + r).

template <typename T, bool HAS_RES, bool RELU>
void epilogue_impl(const EpilogueArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  constexpr int64_t kV = V::size();
  const Geom& g = a.g;
  const int64_t C = g.c, H = g.h, W = g.w, HW = H * W;
  T* out = static_cast<T*>(a.out);
  const T* in = static_cast<const T*>(a.in);
  const M* scale = static_cast<const M*>(a.scale);
  const M* shift = static_cast<const M*>(a.shift);
  const T* res = static_cast<const T*>(a.res);
  const M* rscale = static_cast<const M*>(a.res_scale);
  const M* rshift = static_cast<const M*>(a.res_shift);
  const int64_t c0 = a.res_c0, cn = a.res_cn;
  const int64_t rsn = a.rs[0], rsc = a.rs[1], rsh = a.rs[2], rsw = a.rs[3];
  const V zero(M(0));
  auto act = [&](const V& v) {
    if constexpr (RELU) {
      return at::vec::clamp_min(v, zero);  // max(v, 0) that keeps NaN, as torch.relu
    } else {
      return v;
    }
  };

  if (g.channels_last) {
    // Residual channels of one pixel are contiguous when rsc == 1 (the dense case and views like
    // x[:, :, ::2, ::2] of a channels_last x); otherwise they are gathered into a row buffer.
    const bool gather = HAS_RES && !(rsc == 1 || cn == 1);
    at::parallel_for(0, g.n * HW, grain_for(C), [&](int64_t p0, int64_t p1) {
      std::vector<T> buf(gather ? cn : 0);
      for (int64_t p = p0; p < p1; ++p) {
        const T* x = in + p * C;
        T* y = out + p * C;
        auto plain = [&](int64_t cb, int64_t ce) {
          for (int64_t c = cb; c < ce; c += kV) {
            const int64_t n = std::min(kV, ce - c);
            const V v =
                at::vec::fmadd(io::load(x + c, n), vload(scale + c, n), vload(shift + c, n));
            io::store(y + c, act(v), n);
          }
        };
        if constexpr (HAS_RES) {
          const int64_t ni = p / HW, s = p - ni * HW, hi = s / W, wi = s - hi * W;
          const T* r = res + ni * rsn + hi * rsh + wi * rsw;
          if (gather) {
            for (int64_t j = 0; j < cn; ++j) {
              buf[j] = r[j * rsc];
            }
            r = buf.data();
          }
          plain(0, c0);
          for (int64_t j = 0; j < cn; j += kV) {
            const int64_t n = std::min(kV, cn - j), c = c0 + j;
            V v = at::vec::fmadd(io::load(x + c, n), vload(scale + c, n), vload(shift + c, n));
            v = v + at::vec::fmadd(io::load(r + j, n), vload(rscale + j, n), vload(rshift + j, n));
            io::store(y + c, act(v), n);
          }
          plain(c0 + cn, C);
        } else {
          plain(0, C);
        }
      }
    });
  } else {
    // A residual plane is contiguous in the dense case; strided planes are gathered first.
    const bool plane_dense = (W == 1 || rsw == 1) && (H == 1 || rsh == W);
    at::parallel_for(0, g.n * C, grain_for(HW), [&](int64_t u0, int64_t u1) {
      std::vector<T> buf;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t ni = u / C, c = u - ni * C;
        const T* x = in + u * HW;
        T* y = out + u * HW;
        const V s(scale[c]), b(shift[c]);
        const T* r = nullptr;
        V rs(M(1)), rb(M(0));
        if (HAS_RES && c >= c0 && c < c0 + cn) {
          const int64_t j = c - c0;
          r = res + ni * rsn + j * rsc;
          if (!plane_dense) {
            buf.resize(HW);
            for (int64_t hh = 0; hh < H; ++hh) {
              for (int64_t ww = 0; ww < W; ++ww) {
                buf[hh * W + ww] = r[hh * rsh + ww * rsw];
              }
            }
            r = buf.data();
          }
          rs = V(rscale[j]);
          rb = V(rshift[j]);
        }
        if (r != nullptr) {
          for (int64_t q = 0; q < HW; q += kV) {
            const int64_t n = std::min(kV, HW - q);
            V v = at::vec::fmadd(io::load(x + q, n), s, b);
            v = v + at::vec::fmadd(io::load(r + q, n), rs, rb);
            io::store(y + q, act(v), n);
          }
        } else {
          for (int64_t q = 0; q < HW; q += kV) {
            const int64_t n = std::min(kV, HW - q);
            io::store(y + q, act(at::vec::fmadd(io::load(x + q, n), s, b)), n);
          }
        }
      }
    });
  }
}

void epilogue(const EpilogueArgs& a) {
  if (is_empty(a.g)) {
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    FASTRES_BOOL_SWITCH(a.res != nullptr, kRes, [&] {
      FASTRES_BOOL_SWITCH(a.relu, kRelu, [&] { epilogue_impl<T, kRes, kRelu>(a); });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// conv_stats' prologue: out = relu?(in * scale + shift), product rounded first as the reference.

template <typename T, bool RELU>
void prologue_impl(const PrologueArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  T* out = static_cast<T*>(a.out);
  const T* in = static_cast<const T*>(a.in);
  const V zero(M(0));
  map_dense<M>(a.g, [&](int64_t i, int64_t n, const auto& prm) {
    V v = mul_add_exact(io::load(in + i, n), prm(a.scale), prm(a.shift));
    if constexpr (RELU) {
      v = at::vec::clamp_min(v, zero);
    }
    io::store(out + i, v, n);
  });
}

void prologue(const PrologueArgs& a) {
  if (is_empty(a.g)) {
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    FASTRES_BOOL_SWITCH(a.relu, kRelu, [&] { prologue_impl<T, kRelu>(a); });
  });
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

// ---------------------------------------------------------------------------------------------
// BatchNorm backward (and relu_bias_bwd): the masked gradient, its reductions, and the apply.

template <typename T, Mask MASK, typename Prm>
inline Vectorized<opmath_t<T>> masked_grad(const BnBwdArgs& a, int64_t i, int64_t n,
                                           const Prm& prm) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  const V go = io::load(static_cast<const T*>(a.grad_out) + i, n);
  if constexpr (MASK == Mask::kOut) {
    // threshold_backward: 0 where out <= 0, else grad_out, so a NaN out passes the gradient
    // (go & (out > 0) would zero it). The comparison is all-ones or all-zeros bits per lane.
    return V::blendv(go, V(M(0)), io::load(static_cast<const T*>(a.out) + i, n) <= V(M(0)));
  } else if constexpr (MASK == Mask::kPre) {
    const V z = mul_add_exact(io::load(static_cast<const T*>(a.x) + i, n), prm(a.pre_scale),
                              prm(a.pre_shift));
    return V::blendv(go, V(M(0)), z <= V(zero_threshold<T>()));  // NaN z passes, as above
  } else {
    return go;
  }
}

template <typename T, Mask MASK, bool HAS_X, bool HAS_X2, bool WRITE_G>
void bn_reduce_impl(const BnBwdArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  constexpr int NS = 1 + int(HAS_X) + int(HAS_X2);
  const T* x = static_cast<const T*>(a.x);
  const T* x2 = static_cast<const T*>(a.x2);
  T* g_out = static_cast<T*>(a.g_out);
  double* outs[3] = {a.sum_g, a.sum_gx, a.sum_gx2};
  if constexpr (!HAS_X) {
    outs[1] = outs[2] = nullptr;
  }
  reduce_dense<M, NS>(a.g, outs, [&](int64_t i, int64_t n, const auto& prm, V* vals) {
    const V g = masked_grad<T, MASK>(a, i, n, prm);
    if constexpr (WRITE_G) {
      io::store(g_out + i, g, n);
    }
    vals[0] = g;
    if constexpr (HAS_X) {
      vals[1] = g * (io::load(x + i, n) - prm(a.mean));
    }
    if constexpr (HAS_X2) {
      vals[2] = g * (io::load(x2 + i, n) - prm(a.mean2));
    }
  });
}

void bn_bwd_reduce(const BnBwdArgs& a) {
  if (is_empty(a.g)) {
    zero(a.sum_g, a.g.c);
    zero(a.sum_gx, a.g.c);
    zero(a.sum_gx2, a.g.c);
    return;
  }
  const bool has_x = a.x != nullptr, has_x2 = a.x2 != nullptr, write_g = a.g_out != nullptr;
  TORCH_INTERNAL_ASSERT(has_x || !has_x2);
  TORCH_INTERNAL_ASSERT(a.mask != Mask::kPre || (has_x && !has_x2 && !write_g));
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.mask == Mask::kPre) {
      return bn_reduce_impl<T, Mask::kPre, true, false, false>(a);
    }
    FASTRES_BOOL_SWITCH(a.mask == Mask::kOut, kOut, [&] {
      constexpr Mask m = kOut ? Mask::kOut : Mask::kNone;
      if (!has_x) {
        TORCH_INTERNAL_ASSERT(write_g);
        bn_reduce_impl<T, m, false, false, true>(a);
      } else if (has_x2) {
        TORCH_INTERNAL_ASSERT(!write_g);
        bn_reduce_impl<T, m, true, true, false>(a);
      } else {
        FASTRES_BOOL_SWITCH(write_g, kWrite, [&] { bn_reduce_impl<T, m, true, false, kWrite>(a); });
      }
    });
  });
}

template <typename T, Mask MASK, bool HAS_X2>
void bn_apply_impl(const BnBwdArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  const T* x = static_cast<const T*>(a.x);
  const T* x2 = static_cast<const T*>(a.x2);
  T* gx = static_cast<T*>(a.grad_x);
  T* gx2 = static_cast<T*>(a.grad_x2);
  map_dense<M>(a.g, [&](int64_t i, int64_t n, const auto& prm) {
    const V g = masked_grad<T, MASK>(a, i, n, prm);
    const V v = at::vec::fmadd(prm(a.b), io::load(x + i, n) - prm(a.mean),
                               at::vec::fmadd(prm(a.a), g, prm(a.d)));
    io::store(gx + i, v, n);
    if constexpr (HAS_X2) {
      const V v2 = at::vec::fmadd(prm(a.b2), io::load(x2 + i, n) - prm(a.mean2),
                                  at::vec::fmadd(prm(a.a2), g, prm(a.d2)));
      io::store(gx2 + i, v2, n);
    }
  });
}

void bn_bwd_apply(const BnBwdArgs& a) {
  if (is_empty(a.g)) {
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.mask == Mask::kPre) {
      TORCH_INTERNAL_ASSERT(a.x2 == nullptr);
      return bn_apply_impl<T, Mask::kPre, false>(a);
    }
    FASTRES_BOOL_SWITCH(a.mask == Mask::kOut, kOut, [&] {
      constexpr Mask m = kOut ? Mask::kOut : Mask::kNone;
      FASTRES_BOOL_SWITCH(a.x2 != nullptr, kX2, [&] { bn_apply_impl<T, m, kX2>(a); });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// max |x| (NaN-propagating: at::vec::maximum keeps NaN), one read pass in fixed chunks.

template <typename T>
double absmax_impl(const AbsMaxArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  constexpr int64_t kV = V::size();
  const T* p = static_cast<const T*>(a.in);
  const int64_t chunks = (a.n + kGrain - 1) / kGrain;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e = std::min(a.n, (c + 1) * kGrain);
      V m(M(0));
      int64_t i = c * kGrain;
      for (; i + kV <= e; i += kV) {
        m = at::vec::maximum(m, IO<T>::load(p + i, kV).abs());
      }
      if (i < e) {
        m = at::vec::maximum(m, IO<T>::load(p + i, e - i).abs());  // zero-filled lanes
      }
      alignas(64) M lanes[kV];
      m.store(lanes);
      double r = 0.0;
      for (int64_t k = 0; k < kV; ++k) {
        const double v = static_cast<double>(lanes[k]);
        r = (std::isnan(v) || std::isnan(r)) ? std::nan("") : std::max(r, v);
      }
      part[static_cast<size_t>(c)] = r;
    }
  });
  double r = 0.0;
  for (const double v : part) {
    r = (std::isnan(v) || std::isnan(r)) ? std::nan("") : std::max(r, v);
  }
  return r;
}

double absmax(const AbsMaxArgs& a) {
  double r = 0.0;
  dispatch_dtype(a.dtype, [&](auto tag) { r = absmax_impl<decltype(tag)>(a); });
  return r;
}

#undef FASTRES_BOOL_SWITCH

}  // namespace
}  // namespace fastres::cpu::FASTRES_ISA

// The table getter is plain code: compiled for the baseline ISA even in the AVX TUs, since it is
// called before anyone knows whether this CPU has the instruction set.
#ifdef FASTRES_ISA_TARGET_PUSHED
#pragma GCC pop_options
#endif

namespace fastres::cpu {

#define FASTRES_CAT_(a, b) a##b
#define FASTRES_CAT(a, b) FASTRES_CAT_(a, b)

const Kernels* FASTRES_CAT(kernels_, FASTRES_ISA)() {
  static const Kernels table = {
      FASTRES_ISA_NAME,
      &FASTRES_ISA::epilogue,
      &FASTRES_ISA::prologue,
      &FASTRES_ISA::channel_stats,
      &FASTRES_ISA::bn_bwd_reduce,
      &FASTRES_ISA::bn_bwd_apply,
      &FASTRES_ISA::absmax,
  };
  return &table;
}

#undef FASTRES_CAT
#undef FASTRES_CAT_

}  // namespace fastres::cpu
