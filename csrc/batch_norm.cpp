// Native CPU kernels for batch norm: the four computations of src/batchnorm/backends.py, written
// from the equations of docs/math.md (notation below, as there), registered as torch.library ops
// `batchnorm::forward_train`, `forward_eval`, `backward_train`, `backward_eval`.
//
//     x : input (N, C, *)            M : values per channel, N * prod(*)
//     mu, var : batch mean and biased variance per channel (C,)
//     r = 1 / sqrt(var + eps)        a = gamma * r          b = beta - mu * a
//     s1 = sum(dy)                   s2 = sum(dy * (x - mu))
//
// Layouts. Contiguous (N, C, *) is viewed as (N, C, L) ("rows": channel c is N runs of L values);
// (N, C) and channels_last (N, *, C) as an (R, C) matrix ("columns": channel c is column c);
// contiguous input with runs shorter than kShortRun as an (N, C * L) matrix (channel c is L
// adjacent columns). Any other strides are made contiguous first.
//
// Precision. float32 and float64 compute in their own type; float16/bfloat16 are widened to
// float32 (statistics float32), as torch does. Statistics follow the corrected two-pass algorithm
// of docs/math.md (Chan, Golub & LeVeque), never E[x^2] - E[x]^2: over a block of values that
// sits in cache, m = sum(x)/n, c = x - m, mean = m + sum(c)/n, M2 = sum(c^2) - sum(c)^2/n (that
// is, var = sum(c^2)/n - delta^2 with delta = sum(c)/n); blocks, runs and threads' parts are then
// merged by the same authors' pairwise update (Moments::merge), in float64. float32 lanes
// accumulate at most kBlock values before their sum is taken in float64.
//
// Threads. at::parallel_for over channels when there are enough of them (one thread reads a
// channel's slice once for its statistics and again, from cache where it fits, for the output or
// dx); otherwise over groups of runs or chunks of rows, whose partial statistics or sums are
// merged afterwards.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// Vectors of columns whose sums a column reduction keeps in registers while it walks down the rows.
constexpr int64_t kTile = 4;
// Rows of an (R, C) matrix that one chunk of the column reductions covers, at least.
constexpr int64_t kMinRowsPerChunk = 16;

// ---------------------------------------------------------------------------------------------
// Reductions over one contiguous run p[0..n) of a channel ("rows" layout)
// ---------------------------------------------------------------------------------------------

// sum(x), accumulated in T lanes per block and in double across blocks.
template <typename T>
double run_sum(const T* p, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  double total = 0;
  if (n < 2 * W) {  // short runs (small spatial extents): no vector set-up
    for (int64_t i = 0; i < n; ++i) total += p[i];
    return total;
  }
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec<T> acc0(0), acc1(0);
    int64_t i = start;
    for (; i + 2 * W <= end; i += 2 * W) {
      acc0 += Vec<T>::loadu(p + i);
      acc1 += Vec<T>::loadu(p + i + W);
    }
    for (; i + W <= end; i += W) acc0 += Vec<T>::loadu(p + i);
    T lanes[W];
    (acc0 + acc1).store(lanes);
    double block = 0;
    for (int64_t k = 0; k < W; ++k) block += lanes[k];
    for (; i < end; ++i) block += p[i];
    total += block;
  }
  return total;
}

// sum(c) and sum(c^2) of c = x - m: the second pass of the corrected two-pass algorithm.
template <typename T>
void run_centred_sums(const T* p, int64_t n, T m, double& sum_c, double& sum_cc) {
  constexpr int64_t W = Vec<T>::size();
  if (n < 2 * W) {
    for (int64_t i = 0; i < n; ++i) {
      const T c = p[i] - m;  // c = x - m
      sum_c += c;
      sum_cc += static_cast<double>(c) * c;
    }
    return;
  }
  const Vec<T> vm(m);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec<T> acc_c(0), acc_cc(0);
    int64_t i = start;
    for (; i + W <= end; i += W) {
      const Vec<T> c = Vec<T>::loadu(p + i) - vm;  // c = x - m
      acc_c += c;
      acc_cc = at::vec::fmadd(c, c, acc_cc);  // c^2
    }
    T lanes_c[W], lanes_cc[W];
    acc_c.store(lanes_c);
    acc_cc.store(lanes_cc);
    double bc = 0, bcc = 0;
    for (int64_t k = 0; k < W; ++k) {
      bc += lanes_c[k];
      bcc += lanes_cc[k];
    }
    for (; i < end; ++i) {
      const T c = p[i] - m;
      bc += c;
      bcc += static_cast<double>(c) * c;
    }
    sum_c += bc;
    sum_cc += bcc;
  }
}

// s1 = sum(dy), s2 = sum(dy * (x - mu)): the backward's two reductions in one pass.
template <typename T>
void run_grad_sums(const T* dy, const T* x, int64_t n, T mu, double& s1, double& s2) {
  constexpr int64_t W = Vec<T>::size();
  if (n < 2 * W) {
    for (int64_t i = 0; i < n; ++i) {
      s1 += dy[i];                                      // dy
      s2 += static_cast<double>(dy[i]) * (x[i] - mu);  // dy * (x - mu)
    }
    return;
  }
  const Vec<T> vmu(mu);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec<T> acc1(0), acc2(0);
    int64_t i = start;
    for (; i + W <= end; i += W) {
      const Vec<T> g = Vec<T>::loadu(dy + i);
      acc1 += g;                                                 // dy
      acc2 = at::vec::fmadd(g, Vec<T>::loadu(x + i) - vmu, acc2);  // dy * (x - mu)
    }
    T lanes1[W], lanes2[W];
    acc1.store(lanes1);
    acc2.store(lanes2);
    double b1 = 0, b2 = 0;
    for (int64_t k = 0; k < W; ++k) {
      b1 += lanes1[k];
      b2 += lanes2[k];
    }
    for (; i < end; ++i) {
      b1 += dy[i];
      b2 += static_cast<double>(dy[i]) * (x[i] - mu);
    }
    s1 += b1;
    s2 += b2;
  }
}

// out = (x - mu) * a + shift: training forward's output (shift = beta), and with mu = 0 the
// inference output x * a + b.
template <typename T>
void run_affine(const T* x, T* out, int64_t n, T mu, T a, T shift) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vmu(mu), va(a), vs(shift);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(Vec<T>::loadu(x + i) - vmu, va, vs).store(out + i);
  for (; i < n; ++i) out[i] = (x[i] - mu) * a + shift;
}

// dx = dy * a + (x - mu) * p + q: training backward's input gradient (p = q = 0: inference).
template <typename T>
void run_input_grad(const T* dy, const T* x, T* dx, int64_t n, T mu, T a, T p, T q) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vmu(mu), va(a), vp(p), vq(q);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec<T> centred = Vec<T>::loadu(x + i) - vmu;
    at::vec::fmadd(Vec<T>::loadu(dy + i), va, at::vec::fmadd(centred, vp, vq)).store(dx + i);
  }
  for (; i < n; ++i) dx[i] = dy[i] * a + (x[i] - mu) * p + q;
}

// dx = dy * a (inference backward).
template <typename T>
void run_scale(const T* dy, T* dx, int64_t n, T a) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> va(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vec<T>::loadu(dy + i) * va).store(dx + i);
  for (; i < n; ++i) dx[i] = dy[i] * a;
}

// ---------------------------------------------------------------------------------------------
// Reductions over the rows of an (R, C) matrix ("columns" layout), vectorized across channels
// ---------------------------------------------------------------------------------------------

// Adds `term(row)` (a per-row, per-channel value) over rows [r0, r1) into acc (C,) in double,
// through float lanes per block of rows. `term` writes its C values into a T buffer.
template <typename T>
void flush(const std::vector<T>& lanes, double* acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += lanes[c];
}

// Moments of one contiguous run p[0..n) ("rows" layout), kBlock values at a time: per block the
// corrected two-pass algorithm on data still in L1 (as columns_moments), blocks merged.
template <typename T>
void run_moments(const T* p, int64_t n, Moments& moments) {
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const double n_b = static_cast<double>(len);
    const T m = static_cast<T>(run_sum(p + start, len) / n_b);  // m_b = sum(x) / n_b
    double sum_c = 0, sum_cc = 0;
    run_centred_sums(p + start, len, m, sum_c, sum_cc);  // sum(c), sum(c^2), c = x - m_b
    // mean_b = m_b + sum(c) / n_b,  M2_b = sum(c^2) - sum(c)^2 / n_b
    moments.merge(n_b, static_cast<double>(m) + sum_c / n_b, std::max(sum_cc - sum_c * sum_c / n_b, 0.0));
  }
}

// Moments of `count` runs of L values, run n at x + n * stride (one channel's runs in the (N, C, L)
// view): runs shorter than kBlock are taken in groups of about kBlock values, each group by the
// corrected two-pass algorithm on data in L1, so that short runs (L = 4) do not pay a merge each.
template <typename T>
void strided_runs_moments(const T* x, int64_t count, int64_t stride, int64_t L, Moments& moments) {
  if (L >= kBlock) {
    for (int64_t n = 0; n < count; ++n) run_moments(x + n * stride, L, moments);
    return;
  }
  const int64_t group = std::max<int64_t>(1, kBlock / std::max<int64_t>(L, 1));
  for (int64_t n0 = 0; n0 < count; n0 += group) {
    const int64_t n1 = std::min(count, n0 + group);
    const double n_b = static_cast<double>(n1 - n0) * L;
    double sum = 0;
    for (int64_t n = n0; n < n1; ++n) sum += run_sum(x + n * stride, L);  // sum(x)
    const T m = static_cast<T>(sum / n_b);                                // m_b = sum(x) / n_b
    double sum_c = 0, sum_cc = 0;
    for (int64_t n = n0; n < n1; ++n) run_centred_sums(x + n * stride, L, m, sum_c, sum_cc);  // sum(c), sum(c^2)
    // mean_b = m_b + sum(c) / n_b,  M2_b = sum(c^2) - sum(c)^2 / n_b
    moments.merge(n_b, static_cast<double>(m) + sum_c / n_b, std::max(sum_cc - sum_c * sum_c / n_b, 0.0));
  }
}

// Statistics of rows [r0, r1) of an (R, C) matrix into moments (C,), one cache-sized block of
// rows at a time. Per block, the corrected two-pass algorithm on data still in cache:
//   m_b = sum(x) / n_b,  c = x - m_b,  mean_b = m_b + sum(c) / n_b,  M2_b = sum(c^2) - sum(c)^2 / n_b,
// then the block is merged into the running moments (Moments::merge). Every value is read from
// memory once; never E[x^2] - E[x]^2.
template <typename T>
void columns_moments(const T* x, int64_t r0, int64_t r1, int64_t C, Moments* moments) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t block_rows = std::clamp<int64_t>(65536 / std::max<int64_t>(C, 1), 1, 512);
  std::vector<T> sum(C), m(C), sum_c(C), sum_cc(C);
  for (int64_t start = r0; start < r1; start += block_rows) {
    const int64_t end = std::min(r1, start + block_rows);
    const double n_b = static_cast<double>(end - start);
    // sum(x): (n_b, C) -> (C,), a tile of columns at a time down the rows (sums in registers).
    int64_t c = 0;
    for (; c + kTile * W <= C; c += kTile * W) {
      Vec<T> acc[kTile];
      for (int64_t k = 0; k < kTile; ++k) acc[k] = Vec<T>(T(0));
      for (int64_t r = start; r < end; ++r) {
        const T* row = x + r * C + c;
        for (int64_t k = 0; k < kTile; ++k) acc[k] = acc[k] + Vec<T>::loadu(row + k * W);
      }
      for (int64_t k = 0; k < kTile; ++k) acc[k].store(sum.data() + c + k * W);
    }
    for (; c < C; ++c) {
      T acc = T(0);
      for (int64_t r = start; r < end; ++r) acc += x[r * C + c];
      sum[c] = acc;
    }
    const double inv_nb = 1.0 / n_b;
    for (int64_t c = 0; c < C; ++c) m[c] = static_cast<T>(sum[c] * inv_nb);  // m_b = sum(x) / n_b
    // sum(c), sum(c^2), c = x - m_b, from cache, by the same tiles.
    for (c = 0; c + kTile * W <= C; c += kTile * W) {
      Vec<T> mk[kTile], acc_c[kTile], acc_cc[kTile];
      for (int64_t k = 0; k < kTile; ++k) {
        mk[k] = Vec<T>::loadu(m.data() + c + k * W);
        acc_c[k] = acc_cc[k] = Vec<T>(T(0));
      }
      for (int64_t r = start; r < end; ++r) {
        const T* row = x + r * C + c;
        for (int64_t k = 0; k < kTile; ++k) {
          const Vec<T> v = Vec<T>::loadu(row + k * W) - mk[k];
          acc_c[k] = acc_c[k] + v;
          acc_cc[k] = at::vec::fmadd(v, v, acc_cc[k]);
        }
      }
      for (int64_t k = 0; k < kTile; ++k) {
        acc_c[k].store(sum_c.data() + c + k * W);
        acc_cc[k].store(sum_cc.data() + c + k * W);
      }
    }
    for (; c < C; ++c) {
      T acc_c = T(0), acc_cc = T(0);
      for (int64_t r = start; r < end; ++r) {
        const T v = x[r * C + c] - m[c];
        acc_c += v;
        acc_cc += v * v;
      }
      sum_c[c] = acc_c;
      sum_cc[c] = acc_cc;
    }
    // Moments::merge for every column at once: the counts, and so the weights, are shared.
    const double n_a = C > 0 ? moments[0].n : 0, total = n_a + n_b;
    const double w_b = n_b / total, w_ab = n_a * n_b / total;
    for (int64_t c = 0; c < C; ++c) {
      const double sc = sum_c[c];
      const double mean_b = static_cast<double>(m[c]) + sc * inv_nb;       // mean_b = m_b + sum(c) / n_b
      const double m2_b = std::max(sum_cc[c] - sc * sc * inv_nb, 0.0);     // M2_b = sum(c^2) - sum(c)^2 / n_b
      const double d = mean_b - moments[c].mean;                           // d = mean_b - mean_a
      moments[c].mean += d * w_b;                                           // mean = mean_a + d n_b / n
      moments[c].m2 += m2_b + d * d * w_ab;                                 // M2 = M2_a + M2_b + d^2 n_a n_b / n
      moments[c].n = total;
    }
  }
}

// s1 += sum over rows of dy[r, c], s2 += sum of dy[r, c] * (x[r, c] - mu[c]).
template <typename T>
void columns_grad_sums(const T* dy, const T* x, int64_t r0, int64_t r1, int64_t C, const T* mu, double* s1,
                       double* s2) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t block_rows = std::max<int64_t>(1, kBlock / 8);
  std::vector<T> l1(C), l2(C);
  for (int64_t start = r0; start < r1; start += block_rows) {
    const int64_t end = std::min(r1, start + block_rows);
    // A tile of columns at a time down the rows, the sums in registers.
    int64_t c = 0;
    for (; c + kTile * W <= C; c += kTile * W) {
      Vec<T> muk[kTile], acc1[kTile], acc2[kTile];
      for (int64_t k = 0; k < kTile; ++k) {
        muk[k] = Vec<T>::loadu(mu + c + k * W);
        acc1[k] = acc2[k] = Vec<T>(T(0));
      }
      for (int64_t r = start; r < end; ++r) {
        for (int64_t k = 0; k < kTile; ++k) {
          const Vec<T> g = Vec<T>::loadu(dy + r * C + c + k * W);
          acc1[k] = acc1[k] + g;                                                        // dy
          acc2[k] = at::vec::fmadd(g, Vec<T>::loadu(x + r * C + c + k * W) - muk[k], acc2[k]);  // dy * (x - mu)
        }
      }
      for (int64_t k = 0; k < kTile; ++k) {
        acc1[k].store(l1.data() + c + k * W);
        acc2[k].store(l2.data() + c + k * W);
      }
    }
    for (; c < C; ++c) {
      T acc1 = T(0), acc2 = T(0);
      for (int64_t r = start; r < end; ++r) {
        acc1 += dy[r * C + c];
        acc2 += dy[r * C + c] * (x[r * C + c] - mu[c]);
      }
      l1[c] = acc1;
      l2[c] = acc2;
    }
    flush(l1, s1, C);
    flush(l2, s2, C);
  }
}

// Runs `body(chunk, r0, r1)` over chunks of [0, R) in parallel, each with its own (C,) partial
// sums; returns the number of chunks.
template <typename F>
int64_t parallel_row_chunks(int64_t R, const F& body) {
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / kMinRowsPerChunk));
  const int64_t per = (R + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) body(k, std::min(R, k * per), std::min(R, (k + 1) * per));
  });
  return chunks;
}

// Sums the per-chunk partials (chunks, C) -> (C,).
std::vector<double> reduce_chunks(const std::vector<double>& partial, int64_t chunks, int64_t C) {
  std::vector<double> out(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) out[c] += partial[k * C + c];
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------

struct View {
  Tensor data;    // contiguous in the chosen layout's sense
  bool columns;   // an (R, width) matrix; else (N, C, L)
  int64_t N, C, L, R;
  int64_t per = 1;    // columns: adjacent columns per channel (1; L for short runs)
  int64_t width = 0;  // columns: C * per
};

// Runs shorter than this are walked as an (N, C * L) matrix instead: vectorized across a row
// rather than one short run at a time.
constexpr int64_t kShortRun = 16;

View view_of(const Tensor& x) {
  const int64_t C = x.size(1);
  const int64_t N = x.size(0);
  const int64_t L = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  bool channels_last = false;
  if (x.dim() == 4) channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  if (x.dim() == 2 && x.is_contiguous()) return {x, true, N, C, 1, N, 1, C};
  const Tensor data = x.is_contiguous() || channels_last ? x : x.contiguous();  // any other strides
  if (channels_last && !x.is_contiguous()) return {data, true, N, C, L, N * L, 1, C};
  if (L < kShortRun) return {data, true, N, C, L, N, L, C * L};  // (N, C, L) as (N, C * L)
  return {data, false, N, C, L, N * C, 1, 0};
}

// A per-channel vector (C,) repeated for each of a channel's `per` columns: (C,) -> (C * per,).
template <typename T>
std::vector<T> expand(const T* v, int64_t C, int64_t per) {
  std::vector<T> out(C * per);
  for (int64_t c = 0; c < C; ++c) std::fill(out.begin() + c * per, out.begin() + (c + 1) * per, v[c]);
  return out;
}

// Parallel over channels when every thread gets a few; over rows otherwise.
bool by_channel(const View& v) { return v.C >= 4 * at::get_num_threads() || v.N == 1; }

// ---------------------------------------------------------------------------------------------
// Training forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_train_kernel(const View& v, const T* gamma, const T* beta, double eps, T* y, T* mean, T* var, T* invstd) {
  const T* x = v.data.const_data_ptr<T>();
  const int64_t C = v.C, L = v.L, N = v.N;
  // Per channel, from its moments over all M values: mu = mean, var = M2 / M, r = 1/sqrt(var + eps).
  auto finish = [&](int64_t c, const Moments& total) {
    mean[c] = static_cast<T>(total.mean);                                             // mu
    var[c] = static_cast<T>(std::max(total.m2 / total.n, 0.0));  // var = M2 / M (max(v, 0) keeps a NaN v)
    invstd[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps));  // r = 1/sqrt(var + eps)
  };
  if (!v.columns && by_channel(v)) {
    // One channel per task: statistics run by run (each read once from memory, twice from L1),
    // then the output while the channel's slice is still in cache where it fits.
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments total;
        strided_runs_moments(x + c * L, N, C * L, L, total);  // (N, L) -> moments
        finish(c, total);
        const T a = gamma[c] * invstd[c];  // a = gamma * r
        for (int64_t n = 0; n < N; ++n)    // y = (x - mu) * a + beta
          run_affine(x + (n * C + c) * L, y + (n * C + c) * L, L, mean[c], a, beta[c]);
      }
    });
    return;
  }
  if (!v.columns) {
    // Few channels: each channel's N runs split in groups, the groups' moments in parallel and
    // merged per channel after, then the output.
    const int64_t group = std::max<int64_t>(1, kBlock / std::max<int64_t>(L, 1));
    const int64_t groups = (N + group - 1) / group;
    std::vector<Moments> parts(C * groups);
    at::parallel_for(0, C * groups, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t c = t / groups, n0 = (t % groups) * group;
        strided_runs_moments(x + (n0 * C + c) * L, std::min(group, N - n0), C * L, L, parts[t]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      Moments total;
      for (int64_t j = 0; j < groups; ++j) {
        const Moments& part = parts[c * groups + j];
        total.merge(part.n, part.mean, part.m2);  // (groups,) -> channel
      }
      finish(c, total);
    }
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t c = k % C;
        run_affine(x + k * L, y + k * L, L, mean[c], gamma[c] * invstd[c], beta[c]);  // y = (x - mu) a + beta
      }
    });
    return;
  }
  // (R, width): row chunks in parallel, each with its own moments per column, merged after
  // over chunks and over a channel's columns.
  const int64_t R = v.R, width = v.width, per = v.per;
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Moments> partial(max_chunks * width);
  const int64_t chunks = parallel_row_chunks(R, [&](int64_t k, int64_t r0, int64_t r1) {
    columns_moments(x, r0, r1, width, partial.data() + k * width);
  });
  std::vector<T> a(C);
  for (int64_t c = 0; c < C; ++c) {
    Moments total;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t j = 0; j < per; ++j) {
        const Moments& part = partial[k * width + c * per + j];
        total.merge(part.n, part.mean, part.m2);  // (chunks, per) -> channel
      }
    finish(c, total);
    a[c] = gamma[c] * invstd[c];  // a = gamma * r
  }
  const std::vector<T> mu_w = expand(mean, C, per), a_w = expand(a.data(), C, per), beta_w = expand(beta, C, per);
  constexpr int64_t W = Vec<T>::size();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * width;
      T* yr = y + r * width;
      int64_t c = 0;
      for (; c + W <= width; c += W)  // y = (x - mu) * a + beta
        at::vec::fmadd(Vec<T>::loadu(xr + c) - Vec<T>::loadu(mu_w.data() + c), Vec<T>::loadu(a_w.data() + c),
                       Vec<T>::loadu(beta_w.data() + c))
            .store(yr + c);
      for (; c < width; ++c) yr[c] = (xr[c] - mu_w[c]) * a_w[c] + beta_w[c];
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& bias, double eps) {
  TORCH_CHECK(input.dim() >= 2, "batchnorm::forward_train: expected (N, C, *) input");
  const Tensor xw = widen(input);
  const View v = view_of(xw);
  const auto cdt = compute_type(input);
  const auto opts = at::TensorOptions().dtype(cdt);
  Tensor mean = at::empty({v.C}, opts), var = at::empty({v.C}, opts), invstd = at::empty({v.C}, opts);
  Tensor y = at::empty_like(v.data);
  if (v.N * v.L == 0) {  // no values: statistics undefined, as torch's
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y.to(input.scalar_type()), mean, var, invstd};
  }
  const Tensor gamma = param_or(weight, v.C, cdt, 1.0), beta = param_or(bias, v.C, cdt, 0.0);
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_forward_train", [&] {
    forward_train_kernel<scalar_t>(v, gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(), eps,
                                   y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
                                   var.mutable_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>());
  });
  return {y.to(input.scalar_type()), mean, var, invstd};
}

// ---------------------------------------------------------------------------------------------
// Inference forward: y = x * a + b, a = gamma * r, b = beta - mu * a
// ---------------------------------------------------------------------------------------------

template <typename T>
void affine_kernel(const View& v, const T* a, const T* b, const T* in, T* out) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t C = v.C, L = v.L;
  if (!v.columns) {
    at::parallel_for(0, v.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) run_affine(in + k * L, out + k * L, L, T(0), a[k % C], b[k % C]);
    });
    return;
  }
  const int64_t width = v.width;
  const std::vector<T> a_w = expand(a, C, v.per), b_w = expand(b, C, v.per);
  at::parallel_for(0, v.R, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = in + r * width;
      T* yr = out + r * width;
      int64_t c = 0;
      for (; c + W <= width; c += W)  // y = x * a + b
        at::vec::fmadd(Vec<T>::loadu(xr + c), Vec<T>::loadu(a_w.data() + c), Vec<T>::loadu(b_w.data() + c))
            .store(yr + c);
      for (; c < width; ++c) yr[c] = xr[c] * a_w[c] + b_w[c];
    }
  });
}

std::tuple<Tensor, Tensor> forward_eval(const Tensor& input, const Tensor& mean, const Tensor& var,
                                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                        double eps) {
  TORCH_CHECK(input.dim() >= 2, "batchnorm::forward_eval: expected (N, C, *) input");
  const Tensor xw = widen(input);
  const View v = view_of(xw);
  const auto cdt = compute_type(input);
  const Tensor mu = mean.to(cdt).contiguous(), sigma2 = var.to(cdt).contiguous();
  const Tensor gamma = param_or(weight, v.C, cdt, 1.0), beta = param_or(bias, v.C, cdt, 0.0);
  Tensor invstd = at::empty({v.C}, at::TensorOptions().dtype(cdt));
  Tensor y = at::empty_like(v.data);
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_forward_eval", [&] {
    // Per channel, in a plain loop (C values: a tensor op per step would cost more than the loop).
    const scalar_t *m = mu.const_data_ptr<scalar_t>(), *s2 = sigma2.const_data_ptr<scalar_t>();
    const scalar_t *g = gamma.const_data_ptr<scalar_t>(), *be = beta.const_data_ptr<scalar_t>();
    scalar_t* r = invstd.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> a(v.C), b(v.C);
    for (int64_t c = 0; c < v.C; ++c) {
      r[c] = scalar_t(1) / std::sqrt(s2[c] + static_cast<scalar_t>(eps));  // r = 1/sqrt(var + eps)
      a[c] = g[c] * r[c];                                                    // a = gamma * r
      b[c] = be[c] - m[c] * a[c];                                            // b = beta - mu * a
    }
    affine_kernel<scalar_t>(v, a.data(), b.data(), v.data.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
  });
  return {y.to(input.scalar_type()), invstd};
}

// ---------------------------------------------------------------------------------------------
// Backward: s1 = sum(dy), s2 = sum(dy * (x - mu)); dbeta = s1, dgamma = s2 * r;
// training dx = dy * a + (x - mu) * p + q, p = -a r^2 s2 / M, q = -a s1 / M; inference dx = dy * a
// ---------------------------------------------------------------------------------------------

template <typename T>
void grad_sums_kernel(const View& xv, const T* dy, const T* mu, double* s1, double* s2) {
  const T* x = xv.data.const_data_ptr<T>();
  const int64_t C = xv.C, L = xv.L, N = xv.N;
  if (!xv.columns) {
    std::vector<double> r1(N * C), r2(N * C);
    at::parallel_for(0, N * C, std::max<int64_t>(1, 8192 / std::max<int64_t>(L, 1)), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        r1[k] = r2[k] = 0;
        run_grad_sums(dy + k * L, x + k * L, L, mu[k % C], r1[k], r2[k]);  // per run
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = s2[c] = 0;
      for (int64_t n = 0; n < N; ++n) {  // (N, C) -> (C,)
        s1[c] += r1[n * C + c];
        s2[c] += r2[n * C + c];
      }
    }
    return;
  }
  const int64_t width = xv.width, per = xv.per;
  const std::vector<T> mu_w = expand(mu, C, per);
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> p1(max_chunks * width, 0.0), p2(max_chunks * width, 0.0);
  const int64_t chunks = parallel_row_chunks(xv.R, [&](int64_t k, int64_t r0, int64_t r1) {
    columns_grad_sums(dy, x, r0, r1, width, mu_w.data(), p1.data() + k * width, p2.data() + k * width);
  });
  const std::vector<double> a = reduce_chunks(p1, chunks, width), b = reduce_chunks(p2, chunks, width);
  for (int64_t c = 0; c < C; ++c) {
    s1[c] = s2[c] = 0;
    for (int64_t j = 0; j < per; ++j) {  // (C * per,) -> (C,)
      s1[c] += a[c * per + j];
      s2[c] += b[c * per + j];
    }
  }
}

template <typename T>
void backward_train_kernel(const View& xv, const T* dy, const T* gamma, const T* mu, const T* invstd,
                           bool need_dx, T* dx, T* dgamma, T* dbeta) {
  const T* x = xv.data.const_data_ptr<T>();
  const int64_t C = xv.C, L = xv.L, N = xv.N;
  const double M = static_cast<double>(N) * L;
  auto coefficients = [&](int64_t c, double s1, double s2, T& a, T& p, T& q) {
    dbeta[c] = static_cast<T>(s1);              // dbeta = s1
    dgamma[c] = static_cast<T>(s2 * invstd[c]);  // dgamma = s2 * r
    const double r = invstd[c];
    const double ad = static_cast<double>(gamma[c]) * r;  // a = gamma * r
    a = static_cast<T>(ad);
    p = static_cast<T>(-ad * r * r * s2 / M);  // p = -a r^2 s2 / M
    q = static_cast<T>(-ad * s1 / M);          // q = -a s1 / M
  };
  if (!xv.columns && by_channel(xv)) {
    // One channel per task: dy and x are read for the sums and again, from cache, for dx.
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * L;
          run_grad_sums(dy + o, x + o, L, mu[c], s1, s2);  // s1 = sum(dy), s2 = sum(dy (x - mu))
        }
        T a, p, q;
        coefficients(c, s1, s2, a, p, q);
        if (!need_dx) continue;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * L;
          run_input_grad(dy + o, x + o, dx + o, L, mu[c], a, p, q);  // dx = dy a + (x - mu) p + q
        }
      }
    });
    return;
  }
  std::vector<double> s1(C), s2(C);
  grad_sums_kernel(xv, dy, mu, s1.data(), s2.data());
  std::vector<T> a(C), p(C), q(C);
  for (int64_t c = 0; c < C; ++c) coefficients(c, s1[c], s2[c], a[c], p[c], q[c]);
  if (!need_dx) return;
  if (!xv.columns) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t c = k % C;
        run_input_grad(dy + k * L, x + k * L, dx + k * L, L, mu[c], a[c], p[c], q[c]);
      }
    });
    return;
  }
  constexpr int64_t W = Vec<T>::size();
  const int64_t width = xv.width, per = xv.per;
  const std::vector<T> mu_w = expand(mu, C, per), a_w = expand(a.data(), C, per), p_w = expand(p.data(), C, per),
                       q_w = expand(q.data(), C, per);
  at::parallel_for(0, xv.R, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *xr = x + r * width, *gr = dy + r * width;
      T* out = dx + r * width;
      int64_t c = 0;
      for (; c + W <= width; c += W) {  // dx = dy * a + (x - mu) * p + q
        const Vec<T> centred = Vec<T>::loadu(xr + c) - Vec<T>::loadu(mu_w.data() + c);
        at::vec::fmadd(Vec<T>::loadu(gr + c), Vec<T>::loadu(a_w.data() + c),
                       at::vec::fmadd(centred, Vec<T>::loadu(p_w.data() + c), Vec<T>::loadu(q_w.data() + c)))
            .store(out + c);
      }
      for (; c < width; ++c) out[c] = gr[c] * a_w[c] + (xr[c] - mu_w[c]) * p_w[c] + q_w[c];
    }
  });
}

// dy in x's layout (x's view): both are then walked with the same offsets.
Tensor same_layout(const Tensor& t, const View& xv) {
  if (t.strides() == xv.data.strides()) return t;
  Tensor out = at::empty_strided(xv.data.sizes(), xv.data.strides(), t.options());
  out.copy_(t);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> backward_train(const Tensor& grad_output, const Tensor& input,
                                                  const std::optional<Tensor>& weight, const Tensor& mean,
                                                  const Tensor& invstd, bool need_input_grad) {
  const Tensor xw = widen(input);
  const View xv = view_of(xw);
  const auto cdt = compute_type(input);
  const Tensor dy = same_layout(widen(grad_output).to(cdt), xv);
  const Tensor gamma = param_or(weight, xv.C, cdt, 1.0);
  const Tensor mu = mean.to(cdt).contiguous(), r = invstd.to(cdt).contiguous();
  const auto opts = at::TensorOptions().dtype(cdt);
  Tensor dgamma = at::zeros({xv.C}, opts), dbeta = at::zeros({xv.C}, opts);
  Tensor dx = need_input_grad ? at::empty_like(xv.data) : at::empty({0}, input.options());
  if (xv.N * xv.L == 0) return {need_input_grad ? dx.zero_().to(input.scalar_type()) : dx, dgamma, dbeta};
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_backward_train", [&] {
    backward_train_kernel<scalar_t>(xv, dy.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                                    mu.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), need_input_grad,
                                    need_input_grad ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                    dgamma.mutable_data_ptr<scalar_t>(), dbeta.mutable_data_ptr<scalar_t>());
  });
  return {need_input_grad ? dx.to(input.scalar_type()) : dx, dgamma, dbeta};
}

std::tuple<Tensor, Tensor, Tensor> backward_eval(const Tensor& grad_output, const Tensor& input,
                                                 const std::optional<Tensor>& weight, const Tensor& mean,
                                                 const Tensor& invstd, bool need_input_grad, bool need_param_grads) {
  const Tensor xw = widen(input);
  const View xv = view_of(xw);
  const auto cdt = compute_type(input);
  const Tensor dy = same_layout(widen(grad_output).to(cdt), xv);
  const Tensor mu = mean.to(cdt).contiguous(), r = invstd.to(cdt).contiguous();
  const Tensor a = (param_or(weight, xv.C, cdt, 1.0) * r).contiguous();  // a = gamma * r
  const auto opts = at::TensorOptions().dtype(cdt);
  Tensor dgamma = at::zeros({need_param_grads ? xv.C : 0}, opts), dbeta = at::zeros({need_param_grads ? xv.C : 0}, opts);
  Tensor dx = at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "batchnorm_backward_eval", [&] {
    if (need_param_grads && xv.N * xv.L > 0) {
      std::vector<double> s1(xv.C), s2(xv.C);
      grad_sums_kernel<scalar_t>(xv, dy.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(), s1.data(),
                                 s2.data());
      scalar_t* gb = dbeta.mutable_data_ptr<scalar_t>();
      scalar_t* gg = dgamma.mutable_data_ptr<scalar_t>();
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < xv.C; ++c) {
        gb[c] = static_cast<scalar_t>(s1[c]);          // dbeta = s1
        gg[c] = static_cast<scalar_t>(s2[c] * rp[c]);  // dgamma = s2 * r
      }
    }
    if (need_input_grad) {
      dx = at::empty_like(xv.data);
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* g = dy.const_data_ptr<scalar_t>();
      scalar_t* out = dx.mutable_data_ptr<scalar_t>();
      if (!xv.columns) {  // dx = dy * a
        const int64_t L = xv.L, C = xv.C;
        at::parallel_for(0, xv.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) run_scale(g + k * L, out + k * L, L, ap[k % C]);
        });
      } else {
        std::vector<scalar_t> zero(xv.C, scalar_t(0));
        affine_kernel<scalar_t>(xv, ap, zero.data(), g, out);  // dx = dy * a + 0
      }
      dx = dx.to(input.scalar_type());
    }
  });
  return {dx, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY(batchnorm, m) {
  m.def("forward_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("forward_eval(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  m.def(
      "backward_train(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, bool need_input_grad)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward_eval(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, bool need_input_grad,"
      " bool need_param_grads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward_train", &backward_train);
  m.impl("backward_eval", &backward_eval);
}

// A Python module with nothing in it: importing batchnorm._C loads the library, whose static
// initializers above register the ops with torch.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
