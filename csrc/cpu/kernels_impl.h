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
//
// This file holds what every pass uses: the opmath type and the parallel grain, the dtype and flag
// dispatch, loads and stores of T as opmath vectors (IO), the unfused multiply-add the
// reference's roundings need, the per-channel accessors of a row or plane, and the elementwise
// driver map_dense. The passes follow in parts, included below so that they too are compiled
// inside the ISA target region kernels_<isa>.cpp opened (each reopens the anonymous namespace):
//   kernels_impl_pointwise.h  epilogue (bn_add_relu, conv_bias_act), prologue (conv_stats)
//   kernels_impl_reduce.h     the per-channel reductions: reduce_dense, channel_stats
//   kernels_impl_bn_bwd.h     the BatchNorm backward family: bn_bwd_reduce, bn_bwd_apply
//   kernels_impl_absmax.h     absmax
// They define the kernels in the table's order; keep it so. GCC's inlining follows the order in
// which the kernels are defined: absmax defined before the BatchNorm backward changed which
// reduce_dense instances GCC 12 inlined.
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

}  // namespace
}  // namespace fastres::cpu::FASTRES_ISA

#define FASTRES_KERNELS_IMPL_PART
#include "kernels_impl_pointwise.h"
#include "kernels_impl_reduce.h"
#include "kernels_impl_bn_bwd.h"
#include "kernels_impl_absmax.h"
#undef FASTRES_KERNELS_IMPL_PART

#undef FASTRES_BOOL_SWITCH

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
