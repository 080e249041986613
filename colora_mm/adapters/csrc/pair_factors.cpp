// One side of CoLoRA's correlated pair (colora_mm/adapters/colora_pair.py) as one
// autograd node on the CPU: the factors (L, R) with dW = L R of Eq. 14 (side 0) or
// Eq. 15 (side 1), from the pair's parameters, the partner's frozen base weight and its
// low-rank offset:
//
//   side 0:  C = Bs W2p^T = Bs base + (Bs right^T) left^T           (rs x d')
//            L = [s1 A | s As],  R = [B ; C]
//   side 1:  C = W1p^T As = base As + right^T (left^T As)             (d' x rs)
//            L = [s2 A | s C],   R = [B ; Bs]
//   s_j = 1 / max(k_j (std X_j + std Y_j), 1e-12)   for the terms (A, B) and (X, Y)
//
// The forward runs the same ATen calls as the package's Python formulation (the same
// std, the scalings in the dtype's own arithmetic), so L and R are bit for bit theirs;
// the backward is the closed form (std's (T - mean T) / ((N - 1) std), zero where
// std = 0 or where the clamp binds), with the scalars on the host. One node replaces
// the dozen or so autograd nodes and the Python backward of the formulation it mirrors.
//
// For backward the node keeps its inputs (parameters and buffers, alive anyway) and
// nothing it formed: C, L and R are formed again, bit for bit, by the same code as the
// forward's (partner_product, form_factors). The node returns the scalings (no
// gradient), so that the low-rank op that multiplies the activations by L and R can
// form them again in its own backward instead of keeping them
// (colora_mm/adapters/lowrank.py, pair_side_rebuild), and an empty `slot` tensor (no
// gradient) that pair_side_rebuild points at the C it formed: that op's backward runs
// just before the node's, which then takes C from the slot (and empties it) instead of
// forming it a third time. Of a side's r (d + d') floats none lives from forward to
// backward.
//
// Where the layer's own low-rank op takes the side's parameters as its inputs
// (colora_mm/adapters/lowrank.py: a fused rebuild), no node is made here at all: that
// op's forward forms the factors with pair_side_forward (the node's forward, without
// autograd, its scalars returned), its backward forms them again with
// pair_side_rebuild and turns their gradients into the parameters' with
// pair_side_grads (the node's backward). One autograd node per adapted layer then
// carries the whole side, and none of the node's own records (the node, its edges,
// one record per input and output, the slot) lives from forward to backward.
#include <torch/extension.h>
#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kDenMin = 1e-12;

// saved_data keys of the node's scalars (short: stored inline in the key strings)
const char* const kKey[2] = {"k0", "k1"};
const char* const kDen[2] = {"den0", "den1"};
const char* const kS[2] = {"s0", "s1"};
const char* const kSig[4] = {"sig0", "sig1", "sig2", "sig3"};

// den = k (std X + std Y) and s = 1 / max(den, 1e-12) in the arithmetic of T, as the
// tensor ops compute them in that dtype.
template <typename T>
std::array<double, 2> scaling(double sx, double sy, double k) {
  const T den = (static_cast<T>(sx) + static_cast<T>(sy)) * static_cast<T>(k);
  const T s = static_cast<T>(1) / std::max(den, static_cast<T>(kDenMin));
  return {static_cast<double>(den), static_cast<double>(s)};
}

std::array<double, 2> scaling_in(const Tensor& like, double sx, double sy, double k) {
  return like.scalar_type() == torch::kFloat64 ? scaling<double>(sx, sy, k)
                                               : scaling<float>(sx, sy, k);
}

// The partner product of a side: C = Bs W2p^T (side 0, rs x d') or W1p^T As (side 1,
// d' x rs), the partner entering as its base weight and its low-rank offset.
Tensor partner_product(int64_t index, const Tensor& As, const Tensor& Bs,
                       const Tensor& base, const Tensor& left, const Tensor& right) {
  Tensor C;
  if (index == 0) {
    C = at::mm(Bs, base);
    if (left.size(1)) C = C + at::mm(at::mm(Bs, right.t()), left.t());
  } else {
    C = at::mm(base, As);
    if (left.size(1)) C = C + at::mm(right.t(), at::mm(left.t(), As));
  }
  return C;
}

// The terms (X_j, Y_j) of a side: (A, B) and the shared one.
std::array<Tensor, 4> terms(int64_t index, const Tensor& A, const Tensor& B,
                            const Tensor& As, const Tensor& Bs, const Tensor& C) {
  if (index == 0) return {A, B, As, C};
  return {A, B, C, Bs};
}

// L = [s_0 A | s_1 X] and R = [B ; Y] with (X, Y) = (As, C) on side 0, (C, Bs) on
// side 1: the forward's factors, and pair_side_rebuild's.
std::array<Tensor, 2> form_factors(int64_t index, const Tensor& A, const Tensor& B,
                                   const Tensor& As, const Tensor& Bs, const Tensor& C,
                                   double s0, double s1) {
  const auto t = terms(index, A, B, As, Bs, C);
  const int64_t rl = A.size(1), rs = t[2].size(1);
  Tensor L = at::empty({A.size(0), rl + rs}, A.options());
  Tensor L0 = L.narrow(1, 0, rl), L1 = L.narrow(1, rl, rs);
  at::mul_out(L0, A, s0);
  at::mul_out(L1, t[2], s1);
  Tensor R = at::cat({B, t[3]}, 0);
  return {L, R};
}

// A side's scalars: k (2), den (2), s (2), sig (4), in the order pair_side_forward
// returns them and pair_side_grads takes them.
struct Scalars {
  double k[2], den[2], s[2], sig[4];
  std::vector<double> list() const {
    return {k[0], k[1], den[0], den[1], s[0], s[1], sig[0], sig[1], sig[2], sig[3]};
  }
  static Scalars from(const std::vector<double>& v) {
    TORCH_CHECK(v.size() == 10, "colora_mm pair factors: expected the 10 scalars "
                "pair_side_forward returned, got ", v.size());
    Scalars c;
    for (int i = 0; i < 2; ++i) {
      c.k[i] = v[i];
      c.den[i] = v[2 + i];
      c.s[i] = v[4 + i];
    }
    for (int i = 0; i < 4; ++i) c.sig[i] = v[6 + i];
    return c;
  }
};

// The forward: (L, R) and the scalars, from C formed here.
std::array<Tensor, 2> side_forward(int64_t index, const Tensor& A, const Tensor& B,
                                   const Tensor& As, const Tensor& Bs, const Tensor& base,
                                   const Tensor& left, const Tensor& right, double k_ind,
                                   double k_sh, Scalars& c) {
  const Tensor C = partner_product(index, As, Bs, base, left, right);
  const auto t = terms(index, A, B, As, Bs, C);
  for (int i = 0; i < 4; ++i) c.sig[i] = at::std(t[i]).item<double>();
  c.k[0] = k_ind;
  c.k[1] = k_sh;
  for (int j = 0; j < 2; ++j) {
    const auto ds = scaling_in(A, c.sig[2 * j], c.sig[2 * j + 1], c.k[j]);
    c.den[j] = ds[0];
    c.s[j] = ds[1];
  }
  return form_factors(index, A, B, As, Bs, C, c.s[0], c.s[1]);
}

// The backward: the gradients of (A, B, As, Bs) from those of (L, R) (either may be
// undefined), C the partner product the forward formed (formed again by the caller).
std::array<Tensor, 4> side_grads(int64_t index, const Tensor& A, const Tensor& B,
                                 const Tensor& As, const Tensor& Bs, const Tensor& base,
                                 const Tensor& left, const Tensor& right, const Tensor& C,
                                 const Tensor& gL, const Tensor& gR, const Scalars& c) {
  const auto t = terms(index, A, B, As, Bs, C);
  const int64_t width[2] = {A.size(1), t[2].size(1)};
  std::array<Tensor, 4> g;
  int64_t col = 0;
  for (int j = 0; j < 2; ++j) {
    const Tensor &X = t[2 * j], &Y = t[2 * j + 1];
    Tensor gLj = gL.defined() ? gL.narrow(1, col, width[j]) : Tensor();
    Tensor gRj = gR.defined() ? gR.narrow(0, col, width[j]) : Tensor();
    col += width[j];
    // d loss / d std X_j = d loss / d std Y_j = -<dL_j, s_j X_j> s_j k_j, zero where
    // the clamp binds; std's backward: (T - mean T) / ((N - 1) std), zero at std = 0
    double dstd = 0;
    if (gLj.defined() && c.den[j] >= kDenMin)
      dstd = -c.s[j] * at::sum(gLj * X).item<double>() * c.s[j] * c.k[j];
    const double dofx = c.sig[2 * j] * static_cast<double>(X.numel() - 1);
    const double dofy = c.sig[2 * j + 1] * static_cast<double>(Y.numel() - 1);
    Tensor gX = gLj.defined() ? gLj * c.s[j] : at::zeros_like(X);
    if (dstd != 0 && dofx != 0) gX.add_(X - X.mean(), dstd / dofx);
    Tensor gY = gRj.defined() ? gRj.clone(at::MemoryFormat::Contiguous)
                              : at::zeros_like(Y);
    if (dstd != 0 && dofy != 0) gY.add_(Y - Y.mean(), dstd / dofy);
    g[2 * j] = gX;
    g[2 * j + 1] = gY;
  }
  Tensor gAs, gBs;
  if (index == 0) {
    // C = Bs base + (Bs right^T) left^T
    gAs = g[2];
    const Tensor& gC = g[3];
    gBs = at::mm(gC, base.t());
    if (left.size(1)) gBs.addmm_(at::mm(gC, left), right);
  } else {
    // C = base As + right^T (left^T As); as rs-row products, transposed once
    gBs = g[3];
    const Tensor gCt = g[2].t();
    Tensor gAst = at::mm(gCt, base);
    if (left.size(1)) gAst.addmm_(at::mm(gCt, right.t()), left.t());
    gAs = gAst.t().contiguous();
  }
  return {g[0], g[1], gAs, gBs};
}

class PairSideFactors : public torch::autograd::Function<PairSideFactors> {
 public:
  static variable_list forward(AutogradContext* ctx, int64_t index, Tensor A, Tensor B,
                               Tensor As, Tensor Bs, Tensor base, Tensor left,
                               Tensor right, double k_ind, double k_sh) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    Scalars c;
    const auto LR = side_forward(index, A, B, As, Bs, base, left, right, k_ind, k_sh, c);
    Tensor scalings = at::tensor(std::vector<double>{c.s[0], c.s[1]},
                                 at::TensorOptions().dtype(at::kDouble));
    Tensor slot = at::empty({0}, A.options());
    ctx->save_for_backward({A, B, As, Bs, base, left, right});
    ctx->mark_non_differentiable({slot, scalings});
    // the scalars as plain doubles (stored inline) rather than lists (two heap blocks
    // each): a node's small blocks live from forward to backward
    auto& data = ctx->saved_data;
    data.reserve(12);
    data["slot"] = slot;
    data["index"] = index;
    for (int i = 0; i < 2; ++i) {
      data[kKey[i]] = c.k[i];
      data[kDen[i]] = c.den[i];
      data[kS[i]] = c.s[i];
    }
    for (int i = 0; i < 4; ++i) data[kSig[i]] = c.sig[i];
    return {LR[0], LR[1], slot, scalings};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(), "colora_mm pair factors: the CPU op has no "
                "second derivative; set COLORA_MM_UP3X3=conv for create_graph=True");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    const Tensor &A = saved[0], &B = saved[1], &As = saved[2], &Bs = saved[3],
                 &base = saved[4], &left = saved[5], &right = saved[6];
    const int64_t index = ctx->saved_data["index"].toInt();
    // C as pair_side_rebuild formed it in the low-rank op's backward, else formed here
    Tensor slot = ctx->saved_data["slot"].toTensor();
    Tensor C;
    if (slot.numel()) {
      C = at::empty({0}, slot.options()).set_(slot);
      slot.set_();
    } else {
      at::NoGradGuard no_grad;
      C = partner_product(index, As, Bs, base, left, right);
    }
    auto& data = ctx->saved_data;
    Scalars c;
    for (int i = 0; i < 2; ++i) {
      c.k[i] = data[kKey[i]].toDouble();
      c.den[i] = data[kDen[i]].toDouble();
      c.s[i] = data[kS[i]].toDouble();
    }
    for (int i = 0; i < 4; ++i) c.sig[i] = data[kSig[i]].toDouble();
    const auto g = side_grads(index, A, B, As, Bs, base, left, right, C, grads[0], grads[1],
                              c);
    return {Tensor(), g[0], g[1], g[2], g[3], Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

}  // namespace

namespace {

void check_inputs(int64_t index, const Tensor& A, const Tensor& B, const Tensor& As,
                  const Tensor& Bs, const Tensor& base, const Tensor& left,
                  const Tensor& right) {
  TORCH_CHECK(index == 0 || index == 1, "colora_mm pair factors: index must be 0 or 1");
  for (const Tensor* p : {&A, &B, &As, &Bs, &base, &left, &right})
    TORCH_CHECK(p->device().is_cpu() && p->dim() == 2 && p->scalar_type() == A.scalar_type()
                && (A.scalar_type() == torch::kFloat32 || A.scalar_type() == torch::kFloat64),
                "colora_mm pair factors: every tensor must be a 2-D float32 or float64 CPU "
                "tensor of one dtype, got ", p->sizes(), " ", p->scalar_type());
}

}  // namespace

std::vector<Tensor> pair_side_factors(int64_t index, Tensor A, Tensor B, Tensor As,
                                      Tensor Bs, Tensor base, Tensor left, Tensor right,
                                      double k_ind, double k_sh) {
  check_inputs(index, A, B, As, Bs, base, left, right);
  return PairSideFactors::apply(index, A, B, As, Bs, base, left, right, k_ind, k_sh);
}

// The node's forward without the node: (L, R) without autograd history and the ten
// scalars (k, den, s, sig in pairs, then the four stds) pair_side_grads takes.
std::tuple<Tensor, Tensor, std::vector<double>> pair_side_forward(
    int64_t index, Tensor A, Tensor B, Tensor As, Tensor Bs, Tensor base, Tensor left,
    Tensor right, double k_ind, double k_sh) {
  check_inputs(index, A, B, As, Bs, base, left, right);
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Scalars c;
  const auto LR = side_forward(index, A, B, As, Bs, base, left, right, k_ind, k_sh, c);
  return {LR[0], LR[1], c.list()};
}

// The node's backward without the node: the gradients of (A, B, As, Bs) from those of
// (L, R) (either may be None), with C as pair_side_rebuild formed it (or None: formed
// here) and the scalars pair_side_forward returned.
std::vector<Tensor> pair_side_grads(int64_t index, Tensor A, Tensor B, Tensor As,
                                    Tensor Bs, Tensor base, Tensor left, Tensor right,
                                    c10::optional<Tensor> C, c10::optional<Tensor> gL,
                                    c10::optional<Tensor> gR, std::vector<double> scalars) {
  check_inputs(index, A, B, As, Bs, base, left, right);
  const Scalars c = Scalars::from(scalars);
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t width = A.size(1) + (index == 0 ? As.size(1) : Bs.size(0));
  const Tensor gl = gL.has_value() ? *gL : Tensor(), gr = gR.has_value() ? *gR : Tensor();
  TORCH_CHECK(!gl.defined() || (gl.dim() == 2 && gl.size(0) == A.size(0)
                                && gl.size(1) == width && gl.scalar_type() == A.scalar_type()),
              "colora_mm pair factors: the gradient of L must be (", A.size(0), " x ", width,
              ") of the factors' dtype, got ", gl.sizes(), " ", gl.scalar_type());
  TORCH_CHECK(!gr.defined() || (gr.dim() == 2 && gr.size(0) == width
                                && gr.size(1) == B.size(1) && gr.scalar_type() == A.scalar_type()),
              "colora_mm pair factors: the gradient of R must be (", width, " x ", B.size(1),
              ") of the factors' dtype, got ", gr.sizes(), " ", gr.scalar_type());
  const Tensor product = C.has_value() && C->defined()
                             ? *C : partner_product(index, As, Bs, base, left, right);
  const auto g = side_grads(index, A, B, As, Bs, base, left, right, product, gl, gr, c);
  return {g[0], g[1], g[2], g[3]};
}

// (L, R) of a side again, bit for bit, and the partner product C: C formed as the
// forward formed it, then the factors from it and the forward's scalings; `slot` (the
// node's, or undefined) is pointed at C for the node's backward.
std::vector<Tensor> pair_side_rebuild(int64_t index, Tensor A, Tensor B, Tensor As,
                                      Tensor Bs, Tensor base, Tensor left, Tensor right,
                                      double s0, double s1, c10::optional<Tensor> slot) {
  check_inputs(index, A, B, As, Bs, base, left, right);
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor C = partner_product(index, As, Bs, base, left, right);
  const auto LR = form_factors(index, A, B, As, Bs, C, s0, s1);
  if (slot.has_value() && slot->defined()) slot->set_(C);
  return {LR[0], LR[1], C};
}
