// The depthwise-style spatial branch's up-projection of colora_mm: a 3x3 convolution
// r -> C with groups = r (one input channel per group, m = C / r outputs each),
// stride 1, zero padding 1, float32 on the CPU; forward, and a backward that produces
// both gradients from one pass over the output gradient. Built on first use by
// colora_mm/adapters/up3x3.py (torch.utils.cpp_extension); it computes the same sums
// as torch.nn.functional.conv2d(z, w, None, 1, 1, 1, r) in another order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
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

// One output channel of the forward from the three shifted copies of its z plane.
__attribute__((noinline)) void channel_forward(
    const float* __restrict__ z0, const float* __restrict__ z1,
    const float* __restrict__ z2, const float* k, float* __restrict__ o, int64_t HW,
    int64_t W) {
  const float k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5],
              k6 = k[6], k7 = k[7], k8 = k[8];
#pragma omp simd
  for (int64_t q = 0; q < HW; ++q)
    o[q] = k0 * z0[q] + k1 * z1[q] + k2 * z2[q]
         + k3 * z0[q + W] + k4 * z1[q + W] + k5 * z2[q + W]
         + k6 * z0[q + 2 * W] + k7 * z1[q + 2 * W] + k8 * z2[q + 2 * W];
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
torch::Tensor up_forward(torch::Tensor z, torch::Tensor w) {
  check(z, 4, "z");
  check(w, 2, "w");
  const int64_t C = w.size(0);
  TORCH_CHECK(w.size(1) == 9 && C % z.size(1) == 0, "colora_mm up3x3: w ", w.sizes(),
              " must be (C, 9) with C divisible by r = ", z.size(1));
  const int64_t N = z.size(0), r = z.size(1), H = z.size(2), W = z.size(3), m = C / r;
  auto out = torch::empty({N, C, H, W}, z.options());
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
        channel_forward(z0, z1, z2, wd + c * 9, od + (n * C + c) * HW, HW, W);
      }
    }
  });
  return out;
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

// Forward and backward as one autograd node, without a Python call in backward.
class Up3x3Function : public torch::autograd::Function<Up3x3Function> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor z,
                               torch::Tensor weight) {
    auto zc = z.contiguous();
    auto w9 = weight.reshape({weight.size(0), 9}).contiguous();
    ctx->save_for_backward({zc, w9});
    ctx->saved_data["shape"] = weight.sizes().vec();
    return up_forward(zc, w9);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(), "colora_mm up3x3: the CPU kernel has no "
                "second derivative; set COLORA_MM_UP3X3=conv for create_graph=True");
    auto saved = ctx->get_saved_variables();
    auto out = up_backward(grads[0].contiguous(), saved[0], saved[1]);
    return {out[0], out[1].view(ctx->saved_data["shape"].toIntVector())};
  }
};

torch::Tensor up3x3(torch::Tensor z, torch::Tensor weight) {
  return Up3x3Function::apply(z, weight);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("up3x3", &up3x3, "conv2d(z, weight, padding=1, groups=r) with its backward");
}
