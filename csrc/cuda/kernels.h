// The interface between the ATen launchers (ops_conv.cu, ops_bn.cu) and the kernel files
// (conv_*.cu, bn.cu, bn_bwd.cu): plain parameter structs and launch functions, no ATen. The launchers
// validate every input and fill these structs; the launch functions pick the template
// instantiation (FR_BOOL_SWITCH), launch on the given stream and return the launch status, which
// the launcher checks with C10_CUDA_CHECK.
//
// Layouts: activations are NHWC (channels_last) and dense; weights are KRSC (channels_last);
// per-channel vectors are float32, except a model's BatchNorm parameters and running statistics,
// read (and written) in their own dtype, named by a DType beside them. Element offsets that can
// pass 2^31 are int64_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastres {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How a convolution multiplies: 16-bit tensor cores (mma m16n8k16), TF32 tensor cores
// (mma m16n8k8, fp32 in and out) or exact fp32 FMA on the SIMT cores.
enum class Math : int { kMma16 = 0, kTf32 = 1, kSimt = 2 };

inline int dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
// Elements per 16-byte chunk: the cp.async unit. Reduction channel counts must be multiples of
// it (the launcher zero-pads channels otherwise).
inline int chunk_elems(DType dt) { return 16 / dtype_size(dt); }

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM convolution (forward and data gradient share one kernel).
//
// GEMM view: out[m, oc] = sum over (r, s, xc) of A[m, (r, s, xc)] * Wt[oc, (r, s, xc)], with
// m = (n, oh, ow) an output pixel. A gathers x (N, XH, XW, XC):
//   forward:  x = input,    xh = oh * stride - pad + r * dil                    (oc = K)
//   dgrad:    x = grad_out, xh = (oh + pad - r * dil) / stride when divisible   (oc = C)
// and Wt[oc, r, s, xc] is the KRSC weight for the forward; for dgrad, Wt[c, r, s, k] =
// weight[k, r, s, c], read from the KRSC weight itself (its reduction rows k-major in shared
// memory, transposed on load: no transposed copy; the gather form needs no flip).
// ---------------------------------------------------------------------------------------------
struct ConvParams {
  const void* x;           // (N, XH, XW, XC)
  const void* w;           // (OC, R, S, XC); dgrad: the KRSC weight (w_k, R, S, w_c)
  void* out;               // (N, OH, OW, OC) = (M, OC)
  const float* bias;       // (OC) or null
  const float* scale;      // (OC) or null (only with bias): out = acc * scale + bias
  // An eval BatchNorm in the epilogue, from its live tensors, in their own dtype (bn_dtype, all
  // four alike): s = bn_weight / sqrt(bn_var + bn_eps), out = acc * s + (bn_bias - bn_mean * s);
  // bn_weight, bn_bias may be null (1, 0). bn_var null: no BatchNorm. has_bias is set with it.
  const void* bn_weight;
  const void* bn_bias;
  const void* bn_mean;
  const void* bn_var;
  float bn_eps;
  DType bn_dtype;
  const void* residual;    // (M, OC) like out, or null
  const float* pre_scale;  // (XC) or null: prologue a = relu?(x * pre_scale + pre_shift)
  const float* pre_shift;  // (XC) or null
  double* stats_partial;   // (2, m_tiles, OC): per-CTA sum and sum of squares of out, or null
  int N, XH, XW, XC;
  int OH, OW, OC;
  int R, S;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int M;                 // N * OH * OW
  int w_k, w_c;          // dgrad: the weight's K (<= XC: rows past it read as zero) and its C
                         // (>= OC, a multiple of the 16-byte chunk)
  int m_tiles, n_tiles;  // filled by launch_conv
  bool dgrad;
  bool prologue, pre_relu;
  bool has_bias, has_residual, relu, stats;
};

// Rows of output pixels per CTA: the launcher sizes stats_partial with it.
inline int conv_block_m(Math math) { return math == Math::kSimt ? 64 : 128; }

cudaError_t launch_conv(ConvParams& p, DType dt, Math math, cudaStream_t stream);
// The per-dtype instantiations (one kernel file each, so they compile in parallel).
cudaError_t launch_conv_bf16(ConvParams& p, Math math, cudaStream_t stream);
cudaError_t launch_conv_f16(ConvParams& p, Math math, cudaStream_t stream);
cudaError_t launch_conv_f32(ConvParams& p, Math math, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Weight gradient: dw[k, r, s, c] = sum over (n, p, q) of grad_out[n, p, q, k] * a[n, h, w, c],
// a = relu?(x * pre_scale + pre_shift) recomputed on load (never stored). Split over (n, p, q)
// into `splits` slices; each writes fp32 partials to ws (splits, K, R*S*C), reduced in a fixed
// order by a second kernel into dw (K, R, S, C) in the activations' dtype (deterministic).
// ---------------------------------------------------------------------------------------------
struct WgradParams {
  const void* grad_out;    // (N, P, Q, K)
  const void* x;           // (N, H, W, C)
  const float* pre_scale;  // (C) or null
  const float* pre_shift;  // (C) or null
  float* ws;               // (splits, K, R*S*C)
  void* dw;                // (K, R, S, C)
  int N, H, W, C, P, Q, K, R, S;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t NPQ;
  int64_t rows_per_split;  // multiple of the CTA's reduction tile
  int splits;
  int m_tiles, n_tiles;  // filled by the launcher
  bool prologue, pre_relu;
};

// A weight gradient's sum over its splits, dw[i] = sum of ws[split][i] in split order (rounded
// to dt once), as a launch of its own or in the grid of a later one (WgradSum::n 0: none).
struct WgradSum {
  const float* ws = nullptr;
  void* dw = nullptr;
  int64_t n = 0;
  int splits = 0;
  DType dt = DType::kFloat32;
};

// Plan the split (rows_per_split, splits) for `num_sms` SMs; returns the workspace floats needed.
int64_t plan_wgrad(WgradParams& p, DType dt, int num_sms);
// The split kernel, then its sum; with `defer`, the split kernel only, its sum described there
// (for launch_wgrad_sums or a channel reduction's grid, ChannelBwdParams::wsum).
cudaError_t launch_wgrad(WgradParams& p, DType dt, cudaStream_t stream,
                         WgradSum* defer = nullptr);
// Up to two weight-gradient sums in one launch (one per dtype).
cudaError_t launch_wgrad_sums(const WgradSum* sums, int count, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// BatchNorm and elementwise kernels (bn.cu; the backward family in bn_bwd.cu).
// ---------------------------------------------------------------------------------------------

// out_j[c] = sum over t of partial[j][t][c] in a fixed order, for j < nsum (<= 4). Partials and
// the sum are double (fp32 sums of ~10^6 values lose the variance; the reference sums in float64);
// the result is rounded to float once.
// cast[j] (or null): out_j also rounded to cast_dtype there, cast0b a second copy of out_0 (a
// 16-bit model's BatchNorm gradients written here: no conversion launch after the reduction).
struct ColSumParams {
  const double* partial;  // (nsum, T, C)
  float* out[4];         // each (C)
  void* cast[4];         // each (C) in cast_dtype, or null
  void* cast0b;          // (C) in cast_dtype, or null
  DType cast_dtype;
  int nsum, T, C;
};
cudaError_t launch_colsum(const ColSumParams& p, cudaStream_t stream);

struct BnFinalizeParams {
  const float* sum;
  const float* sumsq;
  // The BatchNorm's parameters and running statistics in their own dtype (vec_dtype, all four
  // alike): the running statistics are updated in place, rounded to it.
  const void* weight;            // or null
  const void* bias;              // or null
  void* running_mean;            // or null
  void* running_var;             // or null
  DType vec_dtype;
  int64_t* num_batches_tracked;  // or null
  float* mean;
  float* invstd;
  float* scale;
  float* shift;
  int C;
  int64_t count;           // values per channel (bn_finalize), unless count_dev is set
  const float* count_dev;  // or null: the count as one float on the device (bn_finalize_count:
                           // an all-reduced count, read by the kernel, no host sync)
  bool has_momentum;
  double momentum;
  double eps;
};
cudaError_t launch_bn_finalize(const BnFinalizeParams& p, cudaStream_t stream);
// launch_colsum(cs) then launch_bn_finalize(p) (cs.out[0], cs.out[1] are p's sum and sumsq),
// in one launch unless momentum is None with a batch count (every CTA would read the count that
// one of them increments).
cudaError_t launch_colsum_finalize(const ColSumParams& cs, const BnFinalizeParams& p,
                                   cudaStream_t stream);

// out = relu?(x * scale[c] + shift[c] + r), r = residual[.., c - res_off, ..] (* res_scale +
// res_shift) where 0 <= c - res_off < Cr. Strides in elements, (n, c, h, w) order.
struct BnAddReluParams {
  const void* x;
  const float* scale;
  const float* shift;
  const void* res;         // or null
  const float* res_scale;  // or null
  const float* res_shift;  // or null
  void* out;
  int N, C, H, W;
  int Cr, res_off;
  int64_t xs[4], rs[4], os[4];
  bool out_channels_last;  // iteration order of the generic path
  bool dense;              // x, out (and res) channels_last-dense, C % 8 == 0 / aligned: 16-B path
  bool relu;
};
cudaError_t launch_bn_add_relu(const BnAddReluParams& p, DType dt, cudaStream_t stream);

// The backward family on NHWC-dense tensors (rows = N*H*W, C channels).
//   g = grad_out * mask, mask: none (0) | out > 0 (1) | T(x * m_scale + m_shift) > 0 (2)
//   sums: [0] sum g, [1] sum g * xhat, [2] sum g * xhat_res  (nsum of them)
//   outputs (kind): kG: grad_z = g;  kBn: grad_input;  kBnId: grad_input, grad_res = g;
//                   kBnBn: grad_input, grad_res (the residual's BatchNorm backward)
// The BatchNorm backward uses the per-channel means sum / rows of the sums, or, when mean_g is set,
// the given means (the SyncBatchNorm *_elemt ops: global sums over the global count, all-reduced
// between launch_channel_reduce and launch_channel_elementwise).
enum class BwdKind : int { kG = 0, kBn = 1, kBnId = 2, kBnBn = 3 };
struct ChannelBwdParams {
  const void* grad_out;
  const void* mask_src;  // out (mode 1) or x (mode 2); null for mode 0
  const float* m_scale;  // mode 2
  const float* m_shift;  // mode 2
  const void* x;         // BN input
  const float* mean;
  const float* invstd;
  const void* weight;  // or null (1), in its own dtype weight_dtype
  const void* xr;      // BN'd residual input (kBnBn)
  const float* mean_r;
  const float* invstd_r;
  const void* weight_r;  // or null, in its own dtype weight_r_dtype
  DType weight_dtype, weight_r_dtype;
  // sums (outputs of the reduction, inputs of the elementwise pass)
  float* sum_g;    // grad_bias
  float* sum_gx;   // grad_weight
  float* sum_gxr;  // grad_res_weight
  // or null: the sums also rounded to cast_dtype (the parameters' gradients of a 16-bit model;
  // cast_g2 a second copy of sum_g: the BN'd residual's grad_bias)
  void* cast_g;
  void* cast_gx;
  void* cast_gxr;
  void* cast_g2;
  DType cast_dtype;
  // given means of the sums (inputs of the elementwise pass instead of sum / rows), or null
  const float* mean_g;
  const float* mean_gx;
  const float* mean_gxr;  // kBnBn
  void* grad_input;
  void* grad_res;  // grad_z for kG
  double* partial;  // workspace (nsum, chunks, C): per-chunk sums, combined in double
  int64_t rows;
  int C;
  int mask_mode;
  int nsum;
  int chunks;  // filled by plan_channel_bwd
  int64_t rows_per_chunk;
  BwdKind kind;
  // A deferred weight-gradient sum of the channels' dtype the reduction's launch also runs (one
  // more row of CTAs), or n 0.
  WgradSum wsum;
};
// Plan the row split; returns the partial doubles needed (nsum * chunks * C).
int64_t plan_channel_bwd(ChannelBwdParams& p, DType dt, int num_sms);
// Reduction (two levels, deterministic) then the elementwise pass.
cudaError_t launch_channel_bwd(const ChannelBwdParams& p, DType dt, cudaStream_t stream);
// The two passes on their own (the *_reduce / *_elemt ops): the reduction needs the plan and the
// partial workspace and writes sum_g, sum_gx (, sum_gxr); the elementwise pass needs neither.
cudaError_t launch_channel_reduce(const ChannelBwdParams& p, DType dt, cudaStream_t stream);
cudaError_t launch_channel_elementwise(const ChannelBwdParams& p, DType dt, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastres
