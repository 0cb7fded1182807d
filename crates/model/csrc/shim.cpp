// libtorch entry points that tch does not bind: autocast with a chosen dtype and device (tch only
// toggles CUDA autocast in its default fp16), cuDNN's TF32 switch, fbgemm's dynamic int8 linear
// (`quantized::` ops are registered with the dispatcher, not in ATen's generated API), and the
// multi-tensor `_foreach_` kernels of PyTorch's optimizer and GradScaler (tch binds no tensor-list
// in-place ops). Errors never cross the C boundary as exceptions: they come back as a malloc'ed message.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {
char *message(const std::exception &e) { return strdup(e.what()); }
at::DeviceType device_of(int device) { return device == 0 ? at::kCPU : at::kCUDA; }
std::vector<at::Tensor> list(at::Tensor *const *ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) v.push_back(*ts[i]);  // shares the TensorImpl: in-place ops reach the caller's
  return v;
}
}  // namespace

extern "C" {

void pirclip_free_message(char *m) { free(m); }

// Enables or disables autocast on a device type (0 CPU, 1 CUDA) with dtype 0 fp16 / 1 bf16.
// Returns whether it was enabled before.
int pirclip_autocast_set(int device, int enabled, int dtype) {
  at::DeviceType d = device_of(device);
  bool before = at::autocast::is_autocast_enabled(d);
  at::autocast::set_autocast_dtype(d, dtype == 0 ? at::kHalf : at::kBFloat16);
  at::autocast::set_autocast_enabled(d, enabled != 0);
  return before ? 1 : 0;
}

// cuDNN convolutions in TF32 (PyTorch's default, `torch.backends.cudnn.allow_tf32`) or full fp32.
void pirclip_set_cudnn_tf32(int allow) { at::globalContext().setAllowTF32CuDNN(allow != 0); }

void pirclip_autocast_enter() { at::autocast::increment_nesting(); }

void pirclip_autocast_exit() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
}

// Packs a quantized (qint8, per-tensor or per-channel) weight [out, in] and an optional fp32 bias for
// fbgemm. Returns an owned handle (free with pirclip_qlinear_free) or null and *err.
void *pirclip_qlinear_prepack(const at::Tensor *weight, const at::Tensor *bias, char **err) {
  try {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
    torch::jit::Stack stack;
    stack.emplace_back(*weight);
    if (bias)
      stack.emplace_back(*bias);
    else
      stack.emplace_back(c10::IValue());
    op.callBoxed(&stack);
    return new c10::IValue(std::move(stack.at(0)));
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

void pirclip_qlinear_free(void *packed) { delete static_cast<c10::IValue *>(packed); }

// y = x Wᵀ + b with x quantized per tensor on the fly (quint8; reduce_range keeps 7 bits so AVX2's
// 16-bit pair sums cannot saturate), int8 GEMM, fp32 out.
at::Tensor *pirclip_qlinear_dynamic(const at::Tensor *x, void *packed, int reduce_range,
                                    char **err) {
  try {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    torch::jit::Stack stack;
    stack.emplace_back(*x);
    stack.emplace_back(*static_cast<c10::IValue *>(packed));
    stack.emplace_back(reduce_range != 0);
    op.callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

// One AdamW update of n tensors as torch.optim.AdamW does it, in place. `multi_tensor`: the foreach
// path (`_multi_tensor_adamw`, not capturable; PyTorch's default when the parameters are on CUDA): one
// kernel per operation over all tensors. Otherwise `_single_tensor_adamw` (PyTorch's default on CPU):
// tensor by tensor, so the only temporaries are one tensor's sqrt and quotient. tch binds
// addcmul_/addcdiv_ without their `value`, which is why this lives here. Returns 0, or -1 and *err.
int pirclip_adamw(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *exp_avgs,
                  at::Tensor *const *exp_avg_sqs, int n, double lr, double beta1, double beta2,
                  double weight_decay, double eps, double bias_correction1,
                  double bias_correction2, int multi_tensor, char **err) {
  try {
    double step_size = lr / bias_correction1, bc2_sqrt = std::sqrt(bias_correction2);
    if (multi_tensor) {
      auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
      if (weight_decay != 0) at::_foreach_mul_(p, 1 - lr * weight_decay);
      at::_foreach_lerp_(m, g, 1 - beta1);
      at::_foreach_mul_(v, beta2);
      at::_foreach_addcmul_(v, g, g, 1 - beta2);
      auto denom = at::_foreach_sqrt(v);
      at::_foreach_div_(denom, bc2_sqrt);
      at::_foreach_add_(denom, eps);
      at::_foreach_addcdiv_(p, m, denom, -step_size);
      return 0;
    }
    for (int i = 0; i < n; i++) {
      at::Tensor &p = *params[i], &g = *grads[i], &m = *exp_avgs[i], &v = *exp_avg_sqs[i];
      if (weight_decay != 0) p.mul_(1 - lr * weight_decay);
      m.lerp_(g, 1 - beta1);
      v.mul_(beta2).addcmul_(g, g, 1 - beta2);
      at::Tensor denom = (v.sqrt() / bc2_sqrt).add_(eps);
      p.addcdiv_(m, denom, -step_size);
    }
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return -1;
  }
}

// L2 norm of each of n tensors (`torch._foreach_norm`), stacked into one 1-D tensor on their device.
at::Tensor *pirclip_norms_foreach(at::Tensor *const *ts, int n, char **err) {
  try {
    return new at::Tensor(at::stack(at::_foreach_norm(list(ts, n), 2)));
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

// GradScaler's unscale (`torch._amp_foreach_non_finite_check_and_unscale_`): multiplies n gradients by
// inv_scale and returns 1 when all were finite, 0 when one held inf/NaN, -1 and *err on failure. One
// device sync in all.
int pirclip_unscale_foreach(at::Tensor *const *grads, int n, double inv_scale, char **err) {
  try {
    auto g = list(grads, n);
    auto opts = g.at(0).options().dtype(at::kFloat);
    auto found_inf = at::zeros({1}, opts);
    at::_amp_foreach_non_finite_check_and_unscale_(g, found_inf, at::full({1}, inv_scale, opts));
    return found_inf.item<float>() == 0 ? 1 : 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return -1;
  }
}

// PyTorch's own operator profiler (what `torch.profiler.profile(activities=[CPU])` runs), so a pirclip
// step and a PyTorch step can be compared op by op from the same kind of Chrome trace.
int pirclip_profiler_start(char **err) {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true);
    std::set<ActivityType> activities{ActivityType::CPU};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return -1;
  }
}

// Stops the profiler started by pirclip_profiler_start and writes its Chrome trace to `path`.
int pirclip_profiler_stop(const char *path, char **err) {
  try {
    torch::autograd::profiler::disableProfiler()->save(path);
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return -1;
  }
}

}  // extern "C"
