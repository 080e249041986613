// The depthwise-style spatial branch's up-projection of colora_mm: a 3x3 convolution
// r -> C with groups = r (one input channel per group, m = C / r outputs each),
// stride 1, zero padding 1, float32 on the CPU; forward, and a backward that produces
// both gradients from one pass over the output gradient. Built on first use by
// colora_mm/adapters/up3x3.py (torch.utils.cpp_extension); it computes the same sums
// as torch.nn.functional.conv2d(z, w, None, 1, 1, 1, r) in another order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous()
              && t.dim() == dim, "colora_mm up3x3: ", name, " must be a contiguous float32 "
              "CPU tensor of ", dim, " dims, got ", t.sizes(), " ", t.scalar_type());
}

// One output channel's share of both gradients: its nine weight-gradient sums
// (written to gw) and its taps of the input gradient (added to acc). Kept out of the
// parallel region's body, where GCC's OpenMP outlining vectorises it far worse.
__attribute__((noinline)) void channel_backward(
    const float* __restrict__ gp, const float* __restrict__ zp, float* __restrict__ acc,
    const float* k, float* gw, int64_t lo, int64_t hi, int64_t Wp) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
  const float k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5],
              k6 = k[6], k7 = k[7], k8 = k[8];
#pragma omp simd reduction(+:s0,s1,s2,s3,s4,s5,s6,s7,s8)
  for (int64_t p = lo; p < hi; ++p) {
    const float g00 = gp[p - Wp - 1], g01 = gp[p - Wp], g02 = gp[p - Wp + 1];
    const float g10 = gp[p - 1], gv = gp[p], g12 = gp[p + 1];
    const float g20 = gp[p + Wp - 1], g21 = gp[p + Wp], g22 = gp[p + Wp + 1];
    s0 += gv * zp[p - Wp - 1]; s1 += gv * zp[p - Wp]; s2 += gv * zp[p - Wp + 1];
    s3 += gv * zp[p - 1];      s4 += gv * zp[p];      s5 += gv * zp[p + 1];
    s6 += gv * zp[p + Wp - 1]; s7 += gv * zp[p + Wp]; s8 += gv * zp[p + Wp + 1];
    acc[p] += k8 * g00 + k7 * g01 + k6 * g02 + k5 * g10 + k4 * gv + k3 * g12
            + k2 * g20 + k1 * g21 + k0 * g22;
  }
  gw[0] = s0; gw[1] = s1; gw[2] = s2; gw[3] = s3; gw[4] = s4;
  gw[5] = s5; gw[6] = s6; gw[7] = s7; gw[8] = s8;
}

// One output channel of the forward from the three shifted copies of its z plane,
// written to o, or (ACC) added to what o holds: o + (the nine taps' sum), the sum
// formed first, as out.add_(up(z)) rounds it.
template <bool ACC>
__attribute__((noinline)) void channel_forward(
    const float* __restrict__ z0, const float* __restrict__ z1,
    const float* __restrict__ z2, const float* k, float* __restrict__ o, int64_t HW,
    int64_t W) {
  const float k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5],
              k6 = k[6], k7 = k[7], k8 = k[8];
#pragma omp simd
  for (int64_t q = 0; q < HW; ++q) {
    const float v = k0 * z0[q] + k1 * z1[q] + k2 * z2[q]
                  + k3 * z0[q + W] + k4 * z1[q + W] + k5 * z2[q + W]
                  + k6 * z0[q + 2 * W] + k7 * z1[q + 2 * W] + k8 * z2[q + 2 * W];
    if (ACC)
      o[q] = o[q] + v;
    else
      o[q] = v;
  }
}

// rows are short (8-64 floats at ConvNeXt's shapes): an inlined loop, not memmove
inline void copy_row(const float* __restrict__ src, float* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

}  // namespace

// z: (N, r, H, W) fp32 contiguous; w: (C, 9) fp32; out: (N, C, H, W)
// zero padding 1, stride 1; channel c reads z channel c / m, m = C / r.
// Forward: for each image and group, the group's z plane in three horizontally
// shifted copies (kx = 0, 1, 2; zero where the tap leaves the row), each with a zero
// row above and below: tap (ky, kx) of output position q is then copy kx at q + ky*W,
// and each output channel is one loop over its H*W values.
// With ACC, adds into `into` (N, C, H, W) instead of a new tensor.
template <bool ACC>
torch::Tensor up_forward_impl(torch::Tensor z, torch::Tensor w, torch::Tensor into) {
  check(z, 4, "z");
  check(w, 2, "w");
  const int64_t C = w.size(0);
  TORCH_CHECK(w.size(1) == 9 && C % z.size(1) == 0, "colora_mm up3x3: w ", w.sizes(),
              " must be (C, 9) with C divisible by r = ", z.size(1));
  const int64_t N = z.size(0), r = z.size(1), H = z.size(2), W = z.size(3), m = C / r;
  torch::Tensor out;
  if (ACC) {
    check(into, 4, "out");
    TORCH_CHECK(into.size(0) == N && into.size(1) == C && into.size(2) == H
                && into.size(3) == W, "colora_mm up3x3: out ", into.sizes(),
                " must be (N, C, H, W) = (", N, ", ", C, ", ", H, ", ", W, ")");
    out = into;
  } else {
    out = torch::empty({N, C, H, W}, z.options());
  }
  const float* zd = z.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t HW = H * W, rows = (H + 2) * W;
  at::parallel_for(0, N * r, 1, [&](int64_t b, int64_t e) {
    std::vector<float> sh(3 * rows, 0.f);
    for (int64_t nj = b; nj < e; ++nj) {
      const int64_t n = nj / r, j = nj % r;
      const float* src = zd + nj * HW;
      float* __restrict__ z0 = sh.data();
      float* __restrict__ z1 = z0 + rows;
      float* __restrict__ z2 = z1 + rows;
      for (int64_t h = 0; h < H; ++h) {
        const float* s = src + h * W;
        float* d0 = z0 + (h + 1) * W;
        float* d1 = z1 + (h + 1) * W;
        float* d2 = z2 + (h + 1) * W;
        d0[0] = 0.f;
        copy_row(s, d0 + 1, W - 1);               // d0[x] = z[x - 1]
        copy_row(s, d1, W);                       // d1[x] = z[x]
        copy_row(s + 1, d2, W - 1);               // d2[x] = z[x + 1]
        d2[W - 1] = 0.f;
      }
      for (int64_t cc = 0; cc < m; ++cc) {
        const int64_t c = j * m + cc;
        channel_forward<ACC>(z0, z1, z2, wd + c * 9, od + (n * C + c) * HW, HW, W);
      }
    }
  });
  return out;
}

torch::Tensor up_forward(torch::Tensor z, torch::Tensor w) {
  return up_forward_impl<false>(z, w, torch::Tensor());
}

// g: (N, C, H, W); returns gz (N, r, H, W), gw (C, 9).
// The N planes of one channel are stacked in one flattened buffer, rows of W + 1 (the
// last column zero), one zero row above each image and below the last: a tap
// (ky, kx) is then a constant shift (ky-1)*(W+1) + (kx-1), the stacked g is zero
// wherever a tap leaves an image, and both gradients are single loops over the buffer.
struct Stack {
  int64_t N, H, W, Wp, size, lo, hi;
  Stack(int64_t N_, int64_t H_, int64_t W_) : N(N_), H(H_), W(W_), Wp(W_ + 1) {
    size = 1 + (N * (H + 1) + 1) * Wp + 1;       // one spare element at each end
    lo = 1 + Wp;                                 // first interior position
    hi = 1 + N * (H + 1) * Wp;                   // past the last
  }
  int64_t at(int64_t n, int64_t h) const { return 1 + (1 + n * (H + 1) + h) * Wp; }
  // plane n of `src` (n-stride `stride`) into the interior; the rest stays zero
  void fill(const float* src, int64_t stride, float* dst) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h)
        copy_row(src + n * stride + h * W, dst + at(n, h), W);
  }
};

std::vector<torch::Tensor> up_backward(torch::Tensor g, torch::Tensor z, torch::Tensor w) {
  check(g, 4, "grad");
  check(z, 4, "z");
  check(w, 2, "w");
  TORCH_CHECK(g.size(0) == z.size(0) && g.size(1) == w.size(0) && g.size(2) == z.size(2)
              && g.size(3) == z.size(3) && w.size(1) == 9 && w.size(0) % z.size(1) == 0,
              "colora_mm up3x3: grad ", g.sizes(), ", z ", z.sizes(), ", w ", w.sizes(),
              " do not belong together");
  const int64_t N = z.size(0), r = z.size(1), H = z.size(2), W = z.size(3);
  const int64_t C = g.size(1), m = C / r;
  auto gz = torch::empty_like(z);
  auto gw = torch::empty({C, 9}, w.options());
  const float* gd = g.data_ptr<float>();
  const float* zd = z.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  float* gzd = gz.data_ptr<float>();
  float* gwd = gw.data_ptr<float>();
  const Stack st(N, H, W);
  const int64_t Wp = st.Wp, lo = st.lo, hi = st.hi, HW = H * W;
  at::parallel_for(0, r, 1, [&](int64_t b, int64_t e) {
    std::vector<float> zpv(st.size, 0.f), gpv(st.size, 0.f), accv(st.size);
    float* __restrict__ zp = zpv.data();
    float* __restrict__ gp = gpv.data();
    float* __restrict__ acc = accv.data();
    for (int64_t j = b; j < e; ++j) {
      st.fill(zd + j * HW, r * HW, zp);
      std::fill(acc, acc + st.size, 0.f);
      for (int64_t cc = 0; cc < m; ++cc) {
        const int64_t c = j * m + cc;
        st.fill(gd + c * HW, C * HW, gp);
        channel_backward(gp, zp, acc, wd + c * 9, gwd + c * 9, lo, hi, Wp);
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          copy_row(acc + st.at(n, h), gzd + (n * r + j) * HW + h * W, W);
    }
  });
  return {gz, gw};
}

// ---------------------------------------------------------------------------------
// The range-kernel filter (Eq. 11, colora_mm/adapters/filter.py) for inference, one
// call per feature map: per sample and channel, the range statistics, the four maps
// (cos, sin, cos z, sin z), their separable Gaussian blur (11 taps along W, then along
// H, reflect padding that keeps bouncing on short axes) and the ratio, without the
// dozen tensors and ops the PyTorch formulation forms.

namespace {

// Index of position pos (may lie outside [0, n)) on a reflect-padded axis of n: the
// edge is not repeated, and positions beyond one reflection keep bouncing (period
// 2 (n - 1)), as colora_mm.adapters.filter.reflect_indices.
int64_t reflect(int64_t pos, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  int64_t m = pos % period;
  if (m < 0) m += period;
  return m >= n ? period - m : m;
}

// Source index of each tap of each output position on a reflect-padded axis of n.
std::vector<int64_t> reflect_table(int64_t n, int64_t k) {
  std::vector<int64_t> idx(n * k);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t t = 0; t < k; ++t) idx[j * k + t] = reflect(j + t - k / 2, n);
  return idx;
}

}  // namespace

// z: (N, C, H, W) float32 contiguous; g: (k,) float32 (the 1-D Gaussian). Returns
// Filter(z), same shape. The range weights' cos and sin come from ATen's vectorised
// functions over the whole map; the rest is one pass per (sample, channel) plane.
torch::Tensor range_filter(torch::Tensor z, torch::Tensor g, double eps) {
  check(z, 4, "z");
  check(g, 1, "kernel");
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), HW = H * W;
  const int64_t k = g.size(0), pad = k / 2;
  TORCH_CHECK(k % 2 == 1, "colora_mm range_filter: the window must be odd, got ", k);
  torch::NoGradGuard no_grad;
  auto out = torch::empty_like(z);
  if (z.numel() == 0) return out;
  const float* zd = z.data_ptr<float>();
  // gamma_c = (pi / 2) / max(max z - min z, 1e-5) per plane
  auto gamma = torch::empty({N, C, 1, 1}, z.options());
  float* gmd = gamma.data_ptr<float>();
  const float half_pi = static_cast<float>(M_PI / 2.0);
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t plane = b; plane < e; ++plane) {
      const float* zp = zd + plane * HW;
      float lo = zp[0], hi = zp[0];
      for (int64_t q = 1; q < HW; ++q) {
        lo = std::min(lo, zp[q]);
        hi = std::max(hi, zp[q]);
      }
      gmd[plane] = half_pi / std::max(hi - lo, 1e-5f);
    }
  });
  auto gz = z * gamma;
  auto cz_t = at::cos(gz), sz_t = at::sin(gz);
  const float* czd = cz_t.data_ptr<float>();
  const float* szd = sz_t.data_ptr<float>();
  const float* gd = g.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  // source of each position of a reflect-padded row (W + 2 pad)
  std::vector<int64_t> wsrc(W + 2 * pad);
  for (int64_t j = 0; j < W + 2 * pad; ++j) wsrc[j] = reflect(j - pad, W);
  const std::vector<int64_t> ih = reflect_table(H, k);
  // Per plane, the four maps of one image row side by side (row h of map m at
  // (h * 4 + m) * W): the pass along H then runs on 4 W contiguous values at a time.
  const int64_t W4 = 4 * W;
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> rowbuf(4 * (W + 2 * pad)), rows(4 * HW), blur(4 * HW);
    const int64_t Wpad = W + 2 * pad;
    for (int64_t plane = b; plane < e; ++plane) {
      const float* zp = zd + plane * HW;
      const float* cz = czd + plane * HW;
      const float* sz = szd + plane * HW;
      // along W: each row of cos, sin, cos z, sin z reflect-padded, then k shifted adds
      for (int64_t h = 0; h < H; ++h) {
        const float* c = cz + h * W;
        const float* sn = sz + h * W;
        const float* zr = zp + h * W;
        float* p0 = rowbuf.data();
        float* p1 = p0 + Wpad;
        float* p2 = p1 + Wpad;
        float* p3 = p2 + Wpad;
        for (int64_t j = 0; j < Wpad; ++j) {
          const int64_t q = wsrc[j];
          p0[j] = c[q];
          p1[j] = sn[q];
          p2[j] = c[q] * zr[q];
          p3[j] = sn[q] * zr[q];
        }
        float* dst = rows.data() + h * W4;
        std::fill(dst, dst + W4, 0.f);
        for (int64_t m = 0; m < 4; ++m) {
          float* d = dst + m * W;
          const float* src = rowbuf.data() + m * Wpad;
          for (int64_t t = 0; t < k; ++t) {
            const float gt = gd[t];
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) d[w] += gt * src[w + t];
          }
        }
      }
      // along H: the four maps' rows at once
      for (int64_t h = 0; h < H; ++h) {
        float* dst = blur.data() + h * W4;
        const int64_t* ix = ih.data() + h * k;
        std::fill(dst, dst + W4, 0.f);
        for (int64_t t = 0; t < k; ++t) {
          const float gt = gd[t];
          const float* src = rows.data() + ix[t] * W4;
#pragma omp simd
          for (int64_t i = 0; i < W4; ++i) dst[i] += gt * src[i];
        }
      }
      float* op = od + plane * HW;
      for (int64_t h = 0; h < H; ++h) {
        const float* b0 = blur.data() + h * W4;
        const float* b1 = b0 + W;
        const float* b2 = b1 + W;
        const float* b3 = b2 + W;
        const float* c = cz + h * W;
        const float* sn = sz + h * W;
        float* o = op + h * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w)
          o[w] = (c[w] * b2[w] + sn[w] * b3[w]) / (c[w] * b0[w] + sn[w] * b1[w] + epsf);
      }
    }
  });
  return out;
}

namespace {

// What the two autograd nodes below share: the inputs they save, and the backward of
// the up-projection (z's and the weight's gradients) from the output's gradient. They
// save z and the weight as they come where both are contiguous (the parameter and the
// branch's map, as a block hands them in): no view and no shape record lives from
// forward to backward, each of which would be one more small heap block per call.
std::vector<torch::Tensor> save_inputs(torch::autograd::AutogradContext* ctx,
                                       const torch::Tensor& z, const torch::Tensor& weight) {
  auto zc = z.contiguous();
  auto wc = weight.contiguous();
  ctx->save_for_backward({zc, wc});
  return {zc, wc.view({wc.size(0), 9})};
}

std::vector<torch::Tensor> saved_backward(torch::autograd::AutogradContext* ctx,
                                          const torch::Tensor& grad) {
  TORCH_CHECK(!torch::GradMode::is_enabled(), "colora_mm up3x3: the CPU kernel has no "
              "second derivative; set COLORA_MM_UP3X3=conv for create_graph=True");
  auto saved = ctx->get_saved_variables();
  const torch::Tensor& w = saved[1];
  auto res = up_backward(grad.contiguous(), saved[0], w.view({w.size(0), 9}));
  return {res[0], res[1].view(w.sizes())};
}

}  // namespace

// Forward and backward as one autograd node, without a Python call in backward.
class Up3x3Function : public torch::autograd::Function<Up3x3Function> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor z,
                               torch::Tensor weight) {
    auto in = save_inputs(ctx, z, weight);
    return up_forward(in[0], in[1]);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto res = saved_backward(ctx, grads[0]);
    return {res[0], res[1]};
  }
};

torch::Tensor up3x3(torch::Tensor z, torch::Tensor weight) {
  return Up3x3Function::apply(z, weight);
}

// out += conv2d(z, weight, padding=1, groups=r) in place as one autograd node: the
// branch's output goes straight into the convolution output it adds to, without a
// tensor of its own. The gradient of out passes through unchanged (to the op that
// made it); z's and the weight's are those of up3x3.
class Up3x3AddFunction : public torch::autograd::Function<Up3x3AddFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor out,
                               torch::Tensor z, torch::Tensor weight) {
    auto in = save_inputs(ctx, z, weight);
    up_forward_impl<true>(in[0], in[1], out);
    ctx->mark_dirty({out});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto res = saved_backward(ctx, grads[0]);
    return {grads[0], res[0], res[1]};
  }
};

torch::Tensor up3x3_add_(torch::Tensor out, torch::Tensor z, torch::Tensor weight) {
  check(out, 4, "out");
  return Up3x3AddFunction::apply(out, z, weight);
}

// pair_factors.cpp (built into the same extension)
std::vector<torch::Tensor> pair_side_factors(int64_t index, torch::Tensor A, torch::Tensor B,
                                             torch::Tensor As, torch::Tensor Bs,
                                             torch::Tensor base, torch::Tensor left,
                                             torch::Tensor right, double k_ind, double k_sh);
std::vector<torch::Tensor> pair_side_rebuild(int64_t index, torch::Tensor A, torch::Tensor B,
                                             torch::Tensor As, torch::Tensor Bs,
                                             torch::Tensor base, torch::Tensor left,
                                             torch::Tensor right, double s0, double s1,
                                             c10::optional<torch::Tensor> slot);
std::tuple<torch::Tensor, torch::Tensor, std::vector<double>> pair_side_forward(
    int64_t index, torch::Tensor A, torch::Tensor B, torch::Tensor As, torch::Tensor Bs,
    torch::Tensor base, torch::Tensor left, torch::Tensor right, double k_ind, double k_sh);
std::vector<torch::Tensor> pair_side_grads(int64_t index, torch::Tensor A, torch::Tensor B,
                                           torch::Tensor As, torch::Tensor Bs,
                                           torch::Tensor base, torch::Tensor left,
                                           torch::Tensor right, c10::optional<torch::Tensor> C,
                                           c10::optional<torch::Tensor> gL,
                                           c10::optional<torch::Tensor> gR,
                                           std::vector<double> scalars);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("up3x3", &up3x3, "conv2d(z, weight, padding=1, groups=r) with its backward");
  mod.def("range_filter", &range_filter, "the range-kernel filter (Eq. 11), no autograd");
  mod.def("up3x3_add_", &up3x3_add_, "out += conv2d(z, weight, padding=1, groups=r), "
          "in place, as one autograd node");
  mod.def("pair_side_factors", &pair_side_factors, "one side of a CoLoRA pair: the "
          "factors (L, R) of its update as one autograd node, with an empty slot for "
          "its partner product C and its two scalings (no gradient)");
  mod.def("pair_side_rebuild", &pair_side_rebuild, "the factors (L, R) of a side again, "
          "bit for bit, from its inputs and scalings (no autograd), and its partner "
          "product C (also left in the node's slot, where one is given)");
  mod.def("pair_side_forward", &pair_side_forward, "the node's forward without autograd: "
          "(L, R) and the side's ten scalars");
  mod.def("pair_side_grads", &pair_side_grads, "the node's backward without autograd: the "
          "gradients of (A, B, As, Bs) from those of (L, R)");
}
