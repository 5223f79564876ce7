// Native CPU kernels for masked batch norm: the computations of src/batchnorm/_masked.py (the
// readable reference), written from the masked section of docs/math.md (notation below, as
// there), registered as torch.library ops `batchnorm::masked_forward_train`,
// `masked_forward_eval`, `masked_backward_train`, `masked_backward_eval`.
//
//     x : input (N, C, *), contiguous, viewed as (N, C, L)
//     mask : (N, *) viewed as (N, L), true on the valid positions V;  M = |V|, every channel's count
//     mu = (1/M) sum_V x,   var = (1/M) sum_V (x - mu)^2,   r = 1 / sqrt(var + eps),   a = gamma * r
//     y = (x - mu) * a + beta on V, 0 on padded positions  (batch statistics, or given ones in
//         inference; centred first, as the reference, since SyncBatchNorm normalizes its training
//         batch with given global statistics, and x * a + b would cancel digits when |mu| >> sigma)
//     s1 = sum_V dy,   s2 = sum_V dy * (x - mu);   dbeta = s1,   dgamma = s2 * r  (= s2_hat = sum_V dy * x̂)
//     training:   dx = dy * a + (x - mu) * p + q on V, 0 on padded positions,
//                 p = -a r^2 s2 / M,  q = -a s1 / M   (= a (dy - s1/M - x̂ s2_hat/M))
//     inference:  dx = dy * a on V, 0 on padded positions
//
// Padding. A value at a padded position never reaches a result: every vector that may hold one
// goes through a select (Vec::blendv against the mask as all-ones / all-zeros lanes), never a
// multiplication by 0, since NaN * 0 = NaN. NaN or Inf in the padding of x or dy changes nothing.
//
// The mask's structure is computed once per call, as it is shared by every channel (MaskPlan):
// per sample the range [lo, hi) that holds its valid positions (outside it nothing is read and
// y or dx is filled with 0), and whether that range is dense, all valid (the prefix masks of
// `lengths=`), in which case the loops run without selects. The ranges, cut at kBlock positions,
// are the pieces, and consecutive pieces form groups of at most kBlock positions. The statistics
// follow the corrected two-pass algorithm of docs/math.md per group (m = sum(x)/n on the valid
// values, c = x - m, mean = m + sum(c)/n, M2 = sum(c^2) - sum(c)^2/n, the group's data in L1),
// groups merged in float64 by Moments::merge, as csrc/batch_norm.cpp does over runs.
//
// Threads. at::parallel_for over channels when there are enough of them (a channel's slice is read
// once from memory for its statistics or sums and again, from cache where it fits, for y or dx);
// otherwise over (channel, group) tasks merged afterwards, then over runs for y or dx.
//
// Precision as csrc/batch_norm.cpp: float32 and float64 compute in their own type, float16 and
// bfloat16 are widened to float32 (statistics float32).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using at::Tensor;
using batchnorm_native::compute_type;
using batchnorm_native::kBlock;
using batchnorm_native::Moments;
using batchnorm_native::param_or;
using batchnorm_native::Vec;
using batchnorm_native::widen;

// Positions [lo, hi) of sample n: `count` of them valid, all of them when `dense`.
struct Piece {
  int64_t n, lo, hi, count;
  bool dense;
};

// The mask's structure (file comment), for compute type T.
template <typename T>
struct MaskPlan {
  int64_t N = 0, L = 0;
  const bool* mask = nullptr;       // (N, L)
  std::vector<T> select;            // (N, L): all bits set on valid positions, 0 on padded ones
  std::vector<Piece> samples;       // (N,): the range of each sample's valid positions
  std::vector<Piece> pieces;        // the samples' ranges cut at kBlock positions, empty ones left out
  std::vector<int64_t> groups{0};   // group g is pieces [groups[g], groups[g + 1])
  double count = 0;                 // M

  MaskPlan(const Tensor& m, int64_t N_, int64_t L_) : N(N_), L(L_), mask(m.const_data_ptr<bool>()) {
    T ones;
    std::memset(&ones, 0xFF, sizeof(T));  // blendv takes a lane where its bits are set
    select.assign(N * L, T(0));
    int64_t group_size = 0;
    for (int64_t n = 0; n < N; ++n) {
      const bool* row = mask + n * L;
      int64_t lo = L, hi = 0, valid = 0;
      for (int64_t i = 0; i < L; ++i) {
        if (!row[i]) continue;
        lo = std::min(lo, i);
        hi = i + 1;
        ++valid;
        select[n * L + i] = ones;
      }
      if (valid == 0) lo = hi = 0;
      samples.push_back({n, lo, hi, valid, valid == hi - lo});
      count += static_cast<double>(valid);
      for (int64_t a = lo; a < hi; a += kBlock) {
        const int64_t b = std::min(hi, a + kBlock);
        const int64_t part = static_cast<int64_t>(std::count(row + a, row + b, true));
        if (part == 0) continue;
        if (group_size + (b - a) > kBlock && group_size > 0) {  // close the group
          groups.push_back(static_cast<int64_t>(pieces.size()));
          group_size = 0;
        }
        pieces.push_back({n, a, b, part, part == b - a});
        group_size += b - a;
      }
    }
    if (group_size > 0) groups.push_back(static_cast<int64_t>(pieces.size()));
  }

  int64_t num_groups() const { return static_cast<int64_t>(groups.size()) - 1; }
  const T* select_row(int64_t n) const { return select.data() + n * L; }
  const bool* mask_row(int64_t n) const { return mask + n * L; }
};

// v on valid lanes, 0 on padded ones: a select, never a multiplication by the mask.
template <bool Dense, typename T>
Vec<T> valid(const Vec<T>& v, const T* select) {
  if constexpr (Dense) {
    return v;
  } else {
    return Vec<T>::blendv(Vec<T>(0), v, Vec<T>::loadu(select));
  }
}

template <typename T>
double lane_sum(const Vec<T>& v) {
  constexpr int64_t W = Vec<T>::size();
  T lanes[W];
  v.store(lanes);
  double total = 0;
  for (int64_t k = 0; k < W; ++k) total += lanes[k];
  return total;
}

// ---------------------------------------------------------------------------------------------
// Reductions over the valid positions of one piece [lo, hi) of a run (x: the run's start)
// ---------------------------------------------------------------------------------------------

// sum_V x.
template <bool Dense, typename T>
double piece_sum(const T* x, const T* sel, const bool* m, int64_t lo, int64_t hi) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  int64_t i = lo;
  for (; i + W <= hi; i += W) acc += valid<Dense>(Vec<T>::loadu(x + i), sel + i);
  double total = lane_sum(acc);
  for (; i < hi; ++i)
    if (Dense || m[i]) total += x[i];
  return total;
}

// sum_V c and sum_V c^2 of c = x - m: the second pass of the corrected two-pass algorithm.
template <bool Dense, typename T>
void piece_centred_sums(const T* x, const T* sel, const bool* m, int64_t lo, int64_t hi, T mean, double& sum_c,
                        double& sum_cc) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vm(mean);
  Vec<T> acc_c(0), acc_cc(0);
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const Vec<T> c = valid<Dense>(Vec<T>::loadu(x + i) - vm, sel + i);  // c = x - m on V, 0 elsewhere
    acc_c += c;
    acc_cc = at::vec::fmadd(c, c, acc_cc);  // c^2
  }
  sum_c += lane_sum(acc_c);
  sum_cc += lane_sum(acc_cc);
  for (; i < hi; ++i) {
    if (!Dense && !m[i]) continue;
    const T c = x[i] - mean;
    sum_c += c;
    sum_cc += static_cast<double>(c) * c;
  }
}

// s1 += sum_V dy, s2 += sum_V dy * (x - mu): the backward's two reductions in one pass.
template <bool Dense, typename T>
void piece_grad_sums(const T* dy, const T* x, const T* sel, const bool* m, int64_t lo, int64_t hi, T mu, double& s1,
                     double& s2) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vmu(mu);
  Vec<T> acc1(0), acc2(0);
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const Vec<T> g = valid<Dense>(Vec<T>::loadu(dy + i), sel + i);        // dy on V
    const Vec<T> d = valid<Dense>(Vec<T>::loadu(x + i) - vmu, sel + i);   // x - mu on V
    acc1 += g;
    acc2 = at::vec::fmadd(g, d, acc2);  // dy * (x - mu)
  }
  s1 += lane_sum(acc1);
  s2 += lane_sum(acc2);
  for (; i < hi; ++i) {
    if (!Dense && !m[i]) continue;
    s1 += dy[i];
    s2 += static_cast<double>(dy[i]) * (x[i] - mu);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise maps over one run of L values: the result on the valid positions, 0 elsewhere
// ---------------------------------------------------------------------------------------------

// `body(i)` (a vector at i) on [lo, hi) through the select, `scalar(i)` on the tail, 0 outside.
template <bool Dense, typename T, typename VecBody, typename ScalarBody>
void row_map(T* out, int64_t L, const Piece& s, const T* sel, const bool* m, const VecBody& body,
             const ScalarBody& scalar) {
  constexpr int64_t W = Vec<T>::size();
  std::fill(out, out + s.lo, T(0));
  int64_t i = s.lo;
  for (; i + W <= s.hi; i += W) valid<Dense>(body(i), sel + i).store(out + i);
  for (; i < s.hi; ++i) out[i] = (Dense || m[i]) ? scalar(i) : T(0);
  std::fill(out + s.hi, out + L, T(0));
}

// Picks the select-free loops for a dense sample.
template <typename F>
void by_density(const Piece& s, const F& f) {
  if (s.dense) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// y = (x - mu) * a + beta on V, 0 elsewhere.
template <typename T>
void row_affine(const MaskPlan<T>& plan, int64_t n, const T* x, T* out, T mu, T a, T beta) {
  const Vec<T> vmu(mu), va(a), vs(beta);
  by_density(plan.samples[n], [&](auto dense) {
    row_map<decltype(dense)::value>(
        out, plan.L, plan.samples[n], plan.select_row(n), plan.mask_row(n),
        [&](int64_t i) { return at::vec::fmadd(Vec<T>::loadu(x + i) - vmu, va, vs); },
        [&](int64_t i) { return (x[i] - mu) * a + beta; });
  });
}

// dx = dy * a + (x - mu) * p + q on V, 0 elsewhere (training).
template <typename T>
void row_input_grad(const MaskPlan<T>& plan, int64_t n, const T* dy, const T* x, T* dx, T mu, T a, T p, T q) {
  const Vec<T> vmu(mu), va(a), vp(p), vq(q);
  by_density(plan.samples[n], [&](auto dense) {
    row_map<decltype(dense)::value>(
        dx, plan.L, plan.samples[n], plan.select_row(n), plan.mask_row(n),
        [&](int64_t i) {
          const Vec<T> centred = Vec<T>::loadu(x + i) - vmu;
          return at::vec::fmadd(Vec<T>::loadu(dy + i), va, at::vec::fmadd(centred, vp, vq));
        },
        [&](int64_t i) { return dy[i] * a + (x[i] - mu) * p + q; });
  });
}

// dx = dy * a on V, 0 elsewhere (inference).
template <typename T>
void row_scale(const MaskPlan<T>& plan, int64_t n, const T* dy, T* dx, T a) {
  const Vec<T> va(a);
  by_density(plan.samples[n], [&](auto dense) {
    row_map<decltype(dense)::value>(
        dx, plan.L, plan.samples[n], plan.select_row(n), plan.mask_row(n),
        [&](int64_t i) { return Vec<T>::loadu(dy + i) * va; }, [&](int64_t i) { return dy[i] * a; });
  });
}

// ---------------------------------------------------------------------------------------------
// Per-channel reductions over a group of pieces (xc, gc: channel c's run of sample 0; sample n's
// run is `stride` = C * L values further per sample)
// ---------------------------------------------------------------------------------------------

// Moments of group g by the corrected two-pass algorithm, merged into `moments`.
template <typename T>
void group_moments(const MaskPlan<T>& plan, const T* xc, int64_t stride, int64_t g, Moments& moments) {
  double sum = 0, n_b = 0;
  for (int64_t k = plan.groups[g]; k < plan.groups[g + 1]; ++k) {  // sum_V x over the group
    const Piece& p = plan.pieces[k];
    const T* x = xc + p.n * stride;
    by_density(p, [&](auto dense) {
      sum += piece_sum<decltype(dense)::value>(x, plan.select_row(p.n), plan.mask_row(p.n), p.lo, p.hi);
    });
    n_b += static_cast<double>(p.count);
  }
  const T m = static_cast<T>(sum / n_b);  // m_b = sum(x) / n_b
  double sum_c = 0, sum_cc = 0;
  for (int64_t k = plan.groups[g]; k < plan.groups[g + 1]; ++k) {  // sum(c), sum(c^2), c = x - m_b
    const Piece& p = plan.pieces[k];
    const T* x = xc + p.n * stride;
    by_density(p, [&](auto dense) {
      piece_centred_sums<decltype(dense)::value>(x, plan.select_row(p.n), plan.mask_row(p.n), p.lo, p.hi, m, sum_c,
                                                 sum_cc);
    });
  }
  // mean_b = m_b + sum(c) / n_b,  M2_b = sum(c^2) - sum(c)^2 / n_b
  moments.merge(n_b, static_cast<double>(m) + sum_c / n_b, std::max(sum_cc - sum_c * sum_c / n_b, 0.0));
}

// s1 += sum_V dy, s2 += sum_V dy * (x - mu) over group g.
template <typename T>
void group_grad_sums(const MaskPlan<T>& plan, const T* gc, const T* xc, int64_t stride, int64_t g, T mu, double& s1,
                     double& s2) {
  for (int64_t k = plan.groups[g]; k < plan.groups[g + 1]; ++k) {
    const Piece& p = plan.pieces[k];
    by_density(p, [&](auto dense) {
      piece_grad_sums<decltype(dense)::value>(gc + p.n * stride, xc + p.n * stride, plan.select_row(p.n),
                                              plan.mask_row(p.n), p.lo, p.hi, mu, s1, s2);
    });
  }
}

// Parallel over channels when every thread gets a few, else over (channel, group) tasks.
bool by_channel(int64_t C) { return C >= 4 * at::get_num_threads(); }

// Grain of a parallel loop over runs of L values: about 16K values per task.
int64_t run_grain(int64_t L) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)); }

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_train_kernel(const MaskPlan<T>& plan, int64_t C, const T* x, const T* gamma, const T* beta, double eps,
                          T* y, T* mean, T* var, T* invstd) {
  const int64_t N = plan.N, L = plan.L, G = plan.num_groups(), stride = C * L;
  // mu = mean, var = M2 / M, r = 1/sqrt(var + eps); NaN for a channel without valid values.
  auto finish = [&](int64_t c, const Moments& total) {
    if (total.n == 0) {
      mean[c] = var[c] = invstd[c] = std::numeric_limits<T>::quiet_NaN();
      return;
    }
    mean[c] = static_cast<T>(total.mean);
    var[c] = static_cast<T>(std::max(total.m2 / total.n, 0.0));
    invstd[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));
  };
  if (by_channel(C)) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments total;
        for (int64_t g = 0; g < G; ++g) group_moments(plan, x + c * L, stride, g, total);  // (N, L) -> moments
        finish(c, total);
        const T a = gamma[c] * invstd[c];  // a = gamma * r
        for (int64_t n = 0; n < N; ++n) {  // y = (x - mu) * a + beta on V, from cache
          const int64_t o = (n * C + c) * L;
          row_affine(plan, n, x + o, y + o, mean[c], a, beta[c]);
        }
      }
    });
    return;
  }
  std::vector<Moments> parts(C * G);
  at::parallel_for(0, C * G, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) group_moments(plan, x + (t / G) * L, stride, t % G, parts[t]);
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments total;
    for (int64_t g = 0; g < G; ++g) total.merge(parts[c * G + g].n, parts[c * G + g].mean, parts[c * G + g].m2);
    finish(c, total);
  }
  at::parallel_for(0, N * C, run_grain(L), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t c = k % C;
      row_affine(plan, k / C, x + k * L, y + k * L, mean[c], gamma[c] * invstd[c], beta[c]);
    }
  });
}

// s1, s2 (C,) over the valid positions, in parallel over channels or (channel, group) tasks.
template <typename T>
void grad_sums_kernel(const MaskPlan<T>& plan, int64_t C, const T* dy, const T* x, const T* mu, double* s1,
                      double* s2) {
  const int64_t L = plan.L, G = plan.num_groups(), stride = C * L;
  std::vector<double> p1(C * G, 0.0), p2(C * G, 0.0);
  // Tasks t = (c, g); with enough channels a thread takes whole channels (grain G).
  at::parallel_for(0, C * G, by_channel(C) ? G : 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t c = t / G;
      group_grad_sums(plan, dy + c * L, x + c * L, stride, t % G, mu[c], p1[t], p2[t]);
    }
  });
  for (int64_t c = 0; c < C; ++c) {  // (C, G) -> (C,)
    s1[c] = s2[c] = 0;
    for (int64_t g = 0; g < G; ++g) {
      s1[c] += p1[c * G + g];
      s2[c] += p2[c * G + g];
    }
  }
}

template <typename T>
void backward_train_kernel(const MaskPlan<T>& plan, int64_t C, const T* dy, const T* x, const T* gamma, const T* mu,
                           const T* invstd, bool need_dx, T* dx, T* dgamma, T* dbeta) {
  const int64_t N = plan.N, L = plan.L, G = plan.num_groups(), stride = C * L;
  const double M = plan.count;
  auto coefficients = [&](int64_t c, double s1, double s2, T& a, T& p, T& q) {
    dbeta[c] = static_cast<T>(s1);               // dbeta = s1
    dgamma[c] = static_cast<T>(s2 * invstd[c]);  // dgamma = s2 * r
    const double r = invstd[c];
    const double ad = static_cast<double>(gamma[c]) * r;  // a = gamma * r
    a = static_cast<T>(ad);
    p = static_cast<T>(-ad * r * r * s2 / M);  // p = -a r^2 s2 / M
    q = static_cast<T>(-ad * s1 / M);          // q = -a s1 / M
  };
  if (by_channel(C)) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t g = 0; g < G; ++g) group_grad_sums(plan, dy + c * L, x + c * L, stride, g, mu[c], s1, s2);
        T a, p, q;
        coefficients(c, s1, s2, a, p, q);
        if (!need_dx) continue;
        for (int64_t n = 0; n < N; ++n) {  // dx = dy a + (x - mu) p + q on V, from cache
          const int64_t o = (n * C + c) * L;
          row_input_grad(plan, n, dy + o, x + o, dx + o, mu[c], a, p, q);
        }
      }
    });
    return;
  }
  std::vector<double> s1(C), s2(C);
  grad_sums_kernel(plan, C, dy, x, mu, s1.data(), s2.data());
  std::vector<T> a(C), p(C), q(C);
  for (int64_t c = 0; c < C; ++c) coefficients(c, s1[c], s2[c], a[c], p[c], q[c]);
  if (!need_dx) return;
  at::parallel_for(0, N * C, run_grain(L), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t c = k % C;
      row_input_grad(plan, k / C, dy + k * L, x + k * L, dx + k * L, mu[c], a[c], p[c], q[c]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

// The input in the compute type, contiguous, and its (N, C, L) extents; the mask contiguous, its
// (N, L) checked against them.
struct Operands {
  Tensor x, mask;
  int64_t N, C, L;
};

Operands operands(const Tensor& input, const Tensor& mask, const char* op) {
  TORCH_CHECK(input.dim() >= 2, "batchnorm::", op, ": expected (N, C, *) input, got ", input.dim(), "D");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "batchnorm::", op, ": expected a bool mask, got ", mask.scalar_type());
  const int64_t N = input.size(0), C = input.size(1);
  int64_t L = 1;
  for (int64_t d = 2; d < input.dim(); ++d) L *= input.size(d);
  TORCH_CHECK(mask.dim() >= 1 && mask.size(0) == N && mask.numel() == N * L, "batchnorm::", op,
              ": expected a mask of the input's shape without dimension 1, got ", mask.sizes(), " for input ",
              input.sizes());
  return {widen(input).contiguous(), mask.contiguous(), N, C, L};
}

// dy in the compute type, contiguous like x.
Tensor gradient(const Tensor& grad_output, const Operands& o) {
  TORCH_CHECK(grad_output.sizes() == o.x.sizes(), "batchnorm: expected dy of the input's shape");
  return widen(grad_output).to(o.x.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_forward_train(const Tensor& input, const Tensor& mask,
                                                                const std::optional<Tensor>& weight,
                                                                const std::optional<Tensor>& bias, double eps) {
  const Operands o = operands(input, mask, "masked_forward_train");
  const auto cdt = compute_type(input);
  const auto opts = at::TensorOptions().dtype(cdt);
  Tensor mean = at::empty({o.C}, opts), var = at::empty({o.C}, opts), invstd = at::empty({o.C}, opts);
  Tensor y = at::empty_like(o.x);
  const Tensor gamma = param_or(weight, o.C, cdt, 1.0), beta = param_or(bias, o.C, cdt, 0.0);
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_masked_forward_train", [&] {
    const MaskPlan<scalar_t> plan(o.mask, o.N, o.L);
    forward_train_kernel<scalar_t>(plan, o.C, o.x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                                   beta.const_data_ptr<scalar_t>(), eps, y.mutable_data_ptr<scalar_t>(),
                                   mean.mutable_data_ptr<scalar_t>(), var.mutable_data_ptr<scalar_t>(),
                                   invstd.mutable_data_ptr<scalar_t>());
  });
  return {y.to(input.scalar_type()), mean, var, invstd};
}

std::tuple<Tensor, Tensor> masked_forward_eval(const Tensor& input, const Tensor& mask, const Tensor& mean,
                                               const Tensor& var, const std::optional<Tensor>& weight,
                                               const std::optional<Tensor>& bias, double eps) {
  const Operands o = operands(input, mask, "masked_forward_eval");
  const auto cdt = compute_type(input);
  const Tensor mu = mean.to(cdt).contiguous();
  const Tensor invstd = at::rsqrt(var.to(cdt) + eps).contiguous();            // r = 1/sqrt(var + eps)
  const Tensor a = (param_or(weight, o.C, cdt, 1.0) * invstd).contiguous();  // a = gamma * r
  const Tensor beta = param_or(bias, o.C, cdt, 0.0);
  Tensor y = at::empty_like(o.x);
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_masked_forward_eval", [&] {
    const MaskPlan<scalar_t> plan(o.mask, o.N, o.L);
    const scalar_t *mp = mu.const_data_ptr<scalar_t>(), *ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    const scalar_t* x = o.x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, o.N * o.C, run_grain(o.L), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {  // y = (x - mu) * a + beta on V, 0 elsewhere
        const int64_t c = k % o.C;
        row_affine(plan, k / o.C, x + k * o.L, out + k * o.L, mp[c], ap[c], bp[c]);
      }
    });
  });
  return {y.to(input.scalar_type()), invstd};
}

std::tuple<Tensor, Tensor, Tensor> masked_backward_train(const Tensor& grad_output, const Tensor& input,
                                                         const Tensor& mask, const std::optional<Tensor>& weight,
                                                         const Tensor& mean, const Tensor& invstd,
                                                         bool need_input_grad) {
  const Operands o = operands(input, mask, "masked_backward_train");
  const auto cdt = compute_type(input);
  const Tensor dy = gradient(grad_output, o);
  const Tensor gamma = param_or(weight, o.C, cdt, 1.0);
  const Tensor mu = mean.to(cdt).contiguous(), r = invstd.to(cdt).contiguous();
  const auto opts = at::TensorOptions().dtype(cdt);
  Tensor dgamma = at::zeros({o.C}, opts), dbeta = at::zeros({o.C}, opts);
  Tensor dx = need_input_grad ? at::empty_like(o.x) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_masked_backward_train", [&] {
    const MaskPlan<scalar_t> plan(o.mask, o.N, o.L);
    backward_train_kernel<scalar_t>(plan, o.C, dy.const_data_ptr<scalar_t>(), o.x.const_data_ptr<scalar_t>(),
                                    gamma.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                                    r.const_data_ptr<scalar_t>(), need_input_grad,
                                    need_input_grad ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                    dgamma.mutable_data_ptr<scalar_t>(), dbeta.mutable_data_ptr<scalar_t>());
  });
  return {need_input_grad ? dx.to(input.scalar_type()) : dx, dgamma, dbeta};
}

std::tuple<Tensor, Tensor, Tensor> masked_backward_eval(const Tensor& grad_output, const Tensor& input,
                                                        const Tensor& mask, const std::optional<Tensor>& weight,
                                                        const Tensor& mean, const Tensor& invstd,
                                                        bool need_input_grad, bool need_param_grads) {
  const Operands o = operands(input, mask, "masked_backward_eval");
  const auto cdt = compute_type(input);
  const Tensor dy = gradient(grad_output, o);
  const Tensor mu = mean.to(cdt).contiguous(), r = invstd.to(cdt).contiguous();
  const Tensor a = (param_or(weight, o.C, cdt, 1.0) * r).contiguous();  // a = gamma * r
  const auto opts = at::TensorOptions().dtype(cdt);
  const int64_t params = need_param_grads ? o.C : 0;
  Tensor dgamma = at::zeros({params}, opts), dbeta = at::zeros({params}, opts);
  Tensor dx = need_input_grad ? at::empty_like(o.x) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_masked_backward_eval", [&] {
    const MaskPlan<scalar_t> plan(o.mask, o.N, o.L);
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    if (need_param_grads) {
      std::vector<double> s1(o.C), s2(o.C);
      grad_sums_kernel<scalar_t>(plan, o.C, g, o.x.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                                 s1.data(), s2.data());
      scalar_t *gb = dbeta.mutable_data_ptr<scalar_t>(), *gg = dgamma.mutable_data_ptr<scalar_t>();
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < o.C; ++c) {
        gb[c] = static_cast<scalar_t>(s1[c]);          // dbeta = s1
        gg[c] = static_cast<scalar_t>(s2[c] * rp[c]);  // dgamma = s2 * r
      }
    }
    if (need_input_grad) {
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      scalar_t* out = dx.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, o.N * o.C, run_grain(o.L), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k)  // dx = dy * a on V, 0 elsewhere
          row_scale(plan, k / o.C, g + k * o.L, out + k * o.L, ap[k % o.C]);
      });
    }
  });
  return {need_input_grad ? dx.to(input.scalar_type()) : dx, dgamma, dbeta};
}

}  // namespace

// The namespace is defined by csrc/batch_norm.cpp (TORCH_LIBRARY); these ops join it.
TORCH_LIBRARY_FRAGMENT(batchnorm, m) {
  m.def(
      "masked_forward_train(Tensor x, Tensor mask, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_forward_eval(Tensor x, Tensor mask, Tensor mean, Tensor var, Tensor? weight, Tensor? bias,"
      " float eps) -> (Tensor, Tensor)");
  m.def(
      "masked_backward_train(Tensor dy, Tensor x, Tensor mask, Tensor? weight, Tensor mean, Tensor invstd,"
      " bool need_input_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_backward_eval(Tensor dy, Tensor x, Tensor mask, Tensor? weight, Tensor mean, Tensor invstd,"
      " bool need_input_grad, bool need_param_grads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) {
  m.impl("masked_forward_train", &masked_forward_train);
  m.impl("masked_forward_eval", &masked_forward_eval);
  m.impl("masked_backward_train", &masked_backward_train);
  m.impl("masked_backward_eval", &masked_backward_eval);
}
