// The elementwise passes of the CPU kernels: the epilogue of bn_add_relu and conv_bias_act
// (out = relu?(in * scale + shift + r), any strided residual) and conv_stats' prologue
// (out = relu?(in * scale + shift), the product rounded first as the reference rounds it).
// A part of kernels_impl.h, which includes it inside the ISA target region: internal linkage.
#pragma once

#ifndef FASTRES_KERNELS_IMPL_PART
#error "kernels_impl_pointwise.h is a part of kernels_impl.h: include kernels_impl.h"
#endif

namespace fastres::cpu::FASTRES_ISA {
namespace {

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

}  // namespace
}  // namespace fastres::cpu::FASTRES_ISA
