// Helpers shared by the native kernels (batch_norm.cpp, masked.cpp, autograd.cpp): the vector type, the block
// size of float32 accumulation, the moments merge of the corrected two-pass algorithm
// (docs/math.md), and the dtype handling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <optional>

namespace batchnorm_native {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// float32 lanes accumulate at most this many values before they are added into float64.
constexpr int64_t kBlock = 4096;

// Running statistics of one channel over the values seen so far: count n, mean, and M2, the sum
// of squared deviations from the mean (var = M2 / n).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  // Merges a disjoint part (Chan, Golub & LeVeque's pairwise update):
  //   n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n.
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double total = n + n_b, d = mean_b - mean;
    mean += d * n_b / total;
    m2 += m2_b + d * d * n * n_b / total;
    n = total;
  }
};

inline at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A (C,) parameter in the compute type, or `fill` where it is absent.
inline Tensor param_or(const std::optional<Tensor>& p, int64_t C, at::ScalarType dtype, double fill) {
  if (p.has_value() && p->defined()) return p->to(dtype).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(dtype));
}

// float16/bfloat16 widened to float32, the compute type; float32/float64 as they are.
inline Tensor widen(const Tensor& t) { return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat); }

}  // namespace batchnorm_native
