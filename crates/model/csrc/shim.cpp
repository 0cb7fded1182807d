// libtorch entry points that tch does not bind: autocast with a chosen dtype and device (tch only
// toggles CUDA autocast in its default fp16), and fbgemm's dynamic int8 linear (`quantized::` ops are
// registered with the dispatcher, not in ATen's generated API). Errors never cross the C boundary as
// exceptions: they come back as a malloc'ed message.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdlib>
#include <cstring>

namespace {
char *message(const std::exception &e) { return strdup(e.what()); }
at::DeviceType device_of(int device) { return device == 0 ? at::kCPU : at::kCUDA; }
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

}  // extern "C"
