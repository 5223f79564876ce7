// Autograd for the native forward ops, and the running-statistics update as one op: the module's
// common call (batchnorm/modules.py, `_native_call`) is one native op per direction, with no
// Python in its bookkeeping or in its backward, as torch's own batch norm.
//
// Notation of docs/math.md: x̂ = (x - mu) * r, r = 1 / sqrt(var + eps), M values per channel.
//
//     training:  dx = r * (gamma * dy - mean(gamma * dy) - x̂ * mean(gamma * dy * x̂))
//     eval:      dx = gamma * r * dy                          (mu and r are constants)
//     both:      dgamma = sum(dy * x̂),   dbeta = sum(dy)      (sums and means per channel)
//
// A first backward calls the native backward kernels (batch_norm.cpp). A backward that is itself
// being differentiated (create_graph=True, grad mode on inside backward), or whose dy is batched
// by vmap, computes the same equations with differentiable ATen ops instead, recomputing mu and r
// from the saved x in training, so that second derivatives flow through mu(x) and r(x).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using batchnorm_native::compute_type;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardTrain = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                                const std::optional<Tensor>&, double);
using ForwardEval = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const std::optional<Tensor>&, const std::optional<Tensor>&, double);
using BackwardTrain = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                         const Tensor&, const Tensor&, bool);
using BackwardEval = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                        const Tensor&, const Tensor&, bool, bool);

// The ops of batch_norm.cpp, through the dispatcher (looked up on first use, after registration).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A gradient batched by vmap (gradcheck's batched-gradient check batches dy without any other
// sign of a transform): the native kernels read raw memory, so the ATen formulation runs.
bool is_batched(const Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched}));
}

std::optional<Tensor> optional_of(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// Every dimension but 1, and the shape (1, C, 1, ...) that broadcasts a (C,) vector against x.
std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

// The backward equations above with differentiable ops (for create_graph=True). `mean`/`invstd`
// are used in eval only; training recomputes them from x.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                           const Tensor& mean, const Tensor& invstd, double eps,
                                                           bool training) {
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  const Tensor xc = x.to(compute_type(x));
  const Tensor g = dy.to(xc.scalar_type());
  Tensor mu = mean.view(shape), r = invstd.view(shape);
  if (training) {
    mu = xc.mean(dims, /*keepdim=*/true);                                              // mu: (1, C, 1...)
    r = ((xc - mu).square().mean(dims, /*keepdim=*/true) + eps).rsqrt();               // r: (1, C, 1...)
  }
  const Tensor x_hat = (xc - mu) * r;                                                  // (N, C, *)
  const Tensor gy = weight.defined() ? g * weight.to(xc.scalar_type()).view(shape) : g;  // gamma * dy
  Tensor dx = training ? (gy - gy.mean(dims, true) - x_hat * (gy * x_hat).mean(dims, true)) * r : gy * r;
  return {dx.to(x.scalar_type()), (g * x_hat).sum(dims), g.sum(dims)};
}

// Parameter gradients in the parameters' dtype (float32 parameters of half input already are).
Tensor like_parameter(const Tensor& grad, const Tensor& parameter) {
  return (grad.defined() && parameter.defined()) ? grad.to(parameter.scalar_type()) : Tensor();
}

}  // namespace

// Named, so that a graph node reads torch::autograd::CppNode<batchnorm::BatchNormTrainFunction>.
namespace batchnorm {

struct BatchNormTrainFunction : public torch::autograd::Function<BatchNormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto forward_train = op<ForwardTrain>("batchnorm::forward_train");
    auto [y, mean, var, invstd] = forward_train.call(x, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var, invstd});
    return {y, mean, var, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const Tensor& dy = grads[0];
    if (!dy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    Tensor dx, dgamma, dbeta;
    if (at::GradMode::is_enabled() || is_batched(dy)) {
      std::tie(dx, dgamma, dbeta) =
          differentiable_backward(dy, x, weight, mean, invstd, ctx->saved_data["eps"].toDouble(), true);
    } else {
      static const auto backward_train = op<BackwardTrain>("batchnorm::backward_train");
      std::tie(dx, dgamma, dbeta) =
          backward_train.call(dy, x, optional_of(weight), mean, invstd, ctx->needs_input_grad(0));
    }
    return {ctx->needs_input_grad(0) ? dx : Tensor(), like_parameter(dgamma, weight), like_parameter(dbeta, bias),
            Tensor()};
  }
};

struct BatchNormEvalFunction : public torch::autograd::Function<BatchNormEvalFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var,
                               const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto forward_eval = op<ForwardEval>("batchnorm::forward_eval");
    auto [y, invstd] = forward_eval.call(x, mean, var, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, invstd});
    ctx->mark_non_differentiable({invstd});
    return {y, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const Tensor& dy = grads[0];
    const Tensor none;
    if (!dy.defined()) return {none, none, none, none, none, none};
    Tensor dx, dgamma, dbeta;
    if (at::GradMode::is_enabled() || is_batched(dy)) {
      std::tie(dx, dgamma, dbeta) = differentiable_backward(dy, x, weight, mean, invstd, 0.0, false);
    } else {
      static const auto backward_eval = op<BackwardEval>("batchnorm::backward_eval");
      std::tie(dx, dgamma, dbeta) =
          backward_eval.call(dy, x, optional_of(weight), mean, invstd, ctx->needs_input_grad(0), true);
    }
    return {ctx->needs_input_grad(0) ? dx : none, none, none, like_parameter(dgamma, weight),
            like_parameter(dbeta, bias), none};
  }
};

}  // namespace batchnorm

namespace {

// Whether a call must record a graph node: grad mode on and an input that requires grad.
bool records(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  auto needs_grad = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return at::GradMode::is_enabled() && (x.requires_grad() || needs_grad(weight) || needs_grad(bias));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train_autograd(const Tensor& x, const std::optional<Tensor>& weight,
                                                                   const std::optional<Tensor>& bias, double eps) {
  if (!records(x, weight, bias)) {  // inference: the kernel alone, no node
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto forward_train = op<ForwardTrain>("batchnorm::forward_train");
    return forward_train.call(x, weight, bias, eps);
  }
  auto out = batchnorm::BatchNormTrainFunction::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor> forward_eval_autograd(const Tensor& x, const Tensor& mean, const Tensor& var,
                                                 const std::optional<Tensor>& weight,
                                                 const std::optional<Tensor>& bias, double eps) {
  if (!records(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto forward_eval = op<ForwardEval>("batchnorm::forward_eval");
    return forward_eval.call(x, mean, var, weight, bias, eps);
  }
  auto out = batchnorm::BatchNormEvalFunction::apply(x, mean, var, weight, bias, eps);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// Running statistics: running <- running + m * (batch - running), the variance unbiased by
// M / (M - 1), as batchnorm.functional.update_running_stats. m = momentum, or 1 / (n + 1) for
// the cumulative average (momentum None) over the n batches counted so far.
//
// skip_nonfinite: a channel whose batch statistics are NaN/Inf keeps its running statistics. With
// the cumulative average, a batch with any such channel is left out whole and not counted, so
// that every channel keeps averaging the same batches with the one shared counter.
// ---------------------------------------------------------------------------------------------

template <typename T>
T lerp(T start, T end, T weight) {  // as torch.lerp: exact at both ends
  return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

template <typename T>
void update_kernel(T* running_mean, T* running_var, const T* mean, const T* var, int64_t C, T unbias, T factor,
                   bool skip_nonfinite) {
  for (int64_t c = 0; c < C; ++c) {
    const T batch_var = var[c] * unbias;
    if (skip_nonfinite && !(std::isfinite(mean[c]) && std::isfinite(batch_var))) continue;
    running_mean[c] = lerp(running_mean[c], mean[c], factor);
    running_var[c] = lerp(running_var[c], batch_var, factor);
  }
}

void update_running_stats(Tensor& running_mean, Tensor& running_var, const std::optional<Tensor>& num_batches_tracked,
                          const Tensor& mean, const Tensor& var, int64_t count, std::optional<double> momentum,
                          bool skip_nonfinite) {
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_mean.scalar_type() == mean.scalar_type() &&
                  running_var.scalar_type() == var.scalar_type() && mean.scalar_type() == var.scalar_type(),
              "batchnorm::update_running_stats_: expected contiguous running statistics of the statistics' dtype");
  TORCH_CHECK(!num_batches_tracked.has_value() ||
                  (num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1 &&
                   num_batches_tracked->is_cpu()),
              "batchnorm::update_running_stats_: expected num_batches_tracked to be a CPU int64 scalar");
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value(),
              "batchnorm::update_running_stats_: the cumulative average (momentum None) needs num_batches_tracked");
  const Tensor mu = mean.contiguous(), v = var.contiguous();
  const int64_t C = mu.numel();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "batchnorm_update_running_stats", [&] {
    const scalar_t* mp = mu.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    // As the Python update: var * (M / (M - 1)) with the factor rounded to the statistics' dtype.
    const auto unbias = static_cast<scalar_t>(static_cast<double>(count) / static_cast<double>(count - 1));
    double factor = momentum.value_or(0.0);
    if (!momentum.has_value()) {
      if (skip_nonfinite) {
        for (int64_t c = 0; c < C; ++c) {
          if (!(std::isfinite(mp[c]) && std::isfinite(vp[c] * unbias))) return;  // the batch is left out
        }
      }
      factor = 1.0 / static_cast<double>(num_batches_tracked->item<int64_t>() + 1);  // the n-th batch: 1/n
    }
    update_kernel<scalar_t>(running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(), mp,
                            vp, C, unbias, static_cast<scalar_t>(factor), skip_nonfinite);
    // The counter in place, without a dispatched add_ (a CPU int64 scalar, checked above).
    if (num_batches_tracked.has_value()) ++*num_batches_tracked->mutable_data_ptr<int64_t>();
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(batchnorm, m) {
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
      " Tensor mean, Tensor var, int count, float? momentum, bool skip_nonfinite) -> ()");
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) { m.impl("update_running_stats_", &update_running_stats); }

TORCH_LIBRARY_IMPL(batchnorm, Autograd, m) {
  m.impl("forward_train", &forward_train_autograd);
  m.impl("forward_eval", &forward_eval_autograd);
}
