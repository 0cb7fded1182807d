//! Safe wrappers over `csrc/shim.cpp`: autocast with a chosen dtype on CPU or CUDA, fbgemm's dynamic
//! int8 linear layer, and the multi-tensor (`_foreach_`) kernels PyTorch's optimizer and GradScaler use
//! on CUDA.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{Device, Kind, Tensor};

extern "C" {
    fn pirclip_free_message(m: *mut c_char);
    fn pirclip_profiler_start(err: *mut *mut c_char) -> c_int;
    fn pirclip_profiler_stop(path: *const c_char, err: *mut *mut c_char) -> c_int;
    fn pirclip_autocast_set(device: c_int, enabled: c_int, dtype: c_int) -> c_int;
    fn pirclip_set_cudnn_tf32(allow: c_int);
    fn pirclip_autocast_enter();
    fn pirclip_autocast_exit();
    fn pirclip_qlinear_prepack(
        weight: *const c_void,
        bias: *const c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pirclip_qlinear_free(packed: *mut c_void);
    fn pirclip_qlinear_dynamic(
        x: *const c_void,
        packed: *mut c_void,
        reduce_range: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pirclip_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        bias_correction1: f64,
        bias_correction2: f64,
        multi_tensor: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pirclip_norms_foreach(
        ts: *const *const c_void,
        n: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pirclip_unscale_foreach(
        grads: *const *const c_void,
        n: c_int,
        inv_scale: f64,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// A message the shim (or the dist crate's) allocated, taken and freed.
#[doc(hidden)]
pub fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown libtorch error".into();
    }
    // SAFETY: the shim returns a NUL-terminated strdup'ed string that we own.
    let s = unsafe { CStr::from_ptr(err) }.to_string_lossy().to_string();
    unsafe { pirclip_free_message(err) };
    s.lines().next().unwrap_or_default().to_string()
}

/// Runs `f` with autocast on `device`'s type in `kind` (Half or BFloat16), restoring the previous state.
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> T {
    let dev = if device.is_cuda() { 1 } else { 0 };
    let dtype = if kind == Kind::BFloat16 { 1 } else { 0 };
    // SAFETY: plain calls into libtorch's thread-local autocast state.
    let before = unsafe {
        pirclip_autocast_enter();
        pirclip_autocast_set(dev, 1, dtype)
    };
    let out = f();
    unsafe {
        pirclip_autocast_set(dev, before, dtype);
        pirclip_autocast_exit();
    }
    out
}

/// Whether cuDNN may run fp32 convolutions in TF32 (10-bit mantissa products), process-wide. PyTorch's
/// default is yes (`torch.backends.cudnn.allow_tf32`); off gives full-precision convolutions on CUDA.
pub fn set_cudnn_tf32(allow: bool) {
    // SAFETY: sets a flag in libtorch's global context.
    unsafe { pirclip_set_cudnn_tf32(allow as c_int) }
}

/// A linear layer with int8 weights (per output channel, symmetric) packed for fbgemm; activations are
/// quantized per call from their own range (dynamic quantization, as `torch.ao.quantization.quantize_dynamic`
/// with per-channel weights).
pub struct QuantizedLinear {
    packed: *mut c_void,
    pub in_features: i64,
    pub out_features: i64,
}

// SAFETY: the packed weights are immutable after packing; fbgemm reads them concurrently.
unsafe impl Send for QuantizedLinear {}
unsafe impl Sync for QuantizedLinear {}

impl QuantizedLinear {
    /// `weight` `[out, in]` fp32 (CPU), `bias` `[out]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self, String> {
        let w = weight.to_kind(Kind::Float).contiguous();
        let (out_features, in_features) = w.size2().map_err(|e| e.to_string())?;
        let scales = (w.abs().amax([1].as_slice(), false) / 127.0)
            .clamp_min(1e-12)
            .to_kind(Kind::Double);
        let zero = Tensor::zeros([out_features], (Kind::Int64, Device::Cpu));
        let q = w.quantize_per_channel(&scales, &zero, 0, Kind::QInt8);
        let bias = bias.map(|b| b.to_kind(Kind::Float).contiguous());
        let mut err = std::ptr::null_mut();
        // SAFETY: tch tensors are `at::Tensor*`; the shim copies what it keeps.
        let packed = unsafe {
            pirclip_qlinear_prepack(
                q.as_ptr() as *const c_void,
                bias.as_ref()
                    .map(|b| b.as_ptr() as *const c_void)
                    .unwrap_or(std::ptr::null()),
                &mut err,
            )
        };
        if packed.is_null() {
            return Err(format!("int8 packing failed: {}", take_message(err)));
        }
        Ok(QuantizedLinear {
            packed,
            in_features,
            out_features,
        })
    }

    /// `x` `[..., in]` fp32 → `[..., out]` fp32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float).contiguous();
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `new`; the result is a new heap `at::Tensor` whose ownership passes to tch.
        let y = unsafe {
            pirclip_qlinear_dynamic(x.as_ptr() as *const c_void, self.packed, 1, &mut err)
        };
        if y.is_null() {
            panic!("int8 linear failed: {}", take_message(err));
        }
        unsafe { Tensor::from_ptr(y as *mut _) }
    }
}

impl Drop for QuantizedLinear {
    fn drop(&mut self) {
        // SAFETY: `packed` came from pirclip_qlinear_prepack and is freed once.
        unsafe { pirclip_qlinear_free(self.packed) }
    }
}

/// The `at::Tensor*` of each tensor, for a C array argument of the shim.
#[doc(hidden)]
pub fn ptrs(ts: &[&Tensor]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.as_ptr() as *const c_void).collect()
}

/// Makes glibc's malloc keep memory that libtorch frees for the next allocation instead of handing it
/// back to the kernel: no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming of the heap's top
/// below 2 GiB free (`M_TRIM_THRESHOLD`). libtorch's CPU allocator has no cache of its own, and by default
/// glibc maps large blocks anew (threshold 128 KiB, rising to at most 32 MiB) and trims a freed heap top,
/// so activations fault in kernel-zeroed pages on first write, once per step: full-size PIR at batch 16
/// on 2 threads spent about a third of its step time there (bench/train_step.sh; README "Performance
/// (CPU, 2 threads …)"). A training step allocates the same sizes
/// every time, so the heap stops growing after the first steps. Returns whether glibc accepted both
/// settings (false on other C libraries, which are left as they are).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// PyTorch's operator profiler (`torch.profiler`, CPU activity, input shapes recorded) over this process:
/// `Profiler::start()` begins recording, `stop(path)` writes a Chrome trace of the same format as
/// `torch.profiler.profile(...).export_chrome_trace`, so traces of pirclip and PyTorch compare op by op.
pub struct Profiler(());

impl Profiler {
    pub fn start() -> Result<Profiler, String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: no pointers cross but the error message, which is freed by take_message.
        if unsafe { pirclip_profiler_start(&mut err) } != 0 {
            return Err(format!("profiler: {}", take_message(err)));
        }
        Ok(Profiler(()))
    }

    pub fn stop(self, path: &std::path::Path) -> Result<(), String> {
        let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| format!("profiler: path {} holds a NUL byte", path.display()))?;
        let mut err = std::ptr::null_mut();
        // SAFETY: `c_path` outlives the call; the shim copies it into a std::string.
        if unsafe { pirclip_profiler_stop(c_path.as_ptr(), &mut err) } != 0 {
            return Err(format!(
                "profiler: {}: {}",
                path.display(),
                take_message(err)
            ));
        }
        // Kineto reports a failed write only in its log.
        match std::fs::metadata(path) {
            Ok(m) if m.len() > 0 => Ok(()),
            _ => Err(format!(
                "profiler: nothing was written to {}",
                path.display()
            )),
        }
    }
}

/// Multi-tensor kernels over lists of same-device float tensors: one launch per operation for all of
/// them, which is what keeps an optimizer step of ~500 tensors cheap on a GPU.
pub mod foreach {
    use super::*;

    /// Parameters of one AdamW group, as `_multi_tensor_adamw` takes them.
    #[derive(Debug, Clone, Copy)]
    pub struct AdamWStep {
        pub lr: f64,
        pub beta1: f64,
        pub beta2: f64,
        pub weight_decay: f64,
        pub eps: f64,
        pub bias_correction1: f64,
        pub bias_correction2: f64,
    }

    /// torch.optim.AdamW's update of one parameter group, in place: with `multi_tensor` its foreach path
    /// (`_multi_tensor_adamw`, one kernel per operation over all tensors), else `_single_tensor_adamw`
    /// (PyTorch's default on CPU: tensor by tensor with in-place addcmul_/addcdiv_, so at most one
    /// tensor's temporaries are alive). Both are PyTorch's arithmetic to the bit.
    pub fn adamw(
        multi_tensor: bool,
        params: &[&Tensor],
        grads: &[&Tensor],
        exp_avgs: &[&Tensor],
        exp_avg_sqs: &[&Tensor],
        s: AdamWStep,
    ) -> Result<(), String> {
        let n = params.len();
        if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
            return Err("adamw: lists of different lengths".into());
        }
        if n == 0 {
            return Ok(());
        }
        let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
        let mut err = std::ptr::null_mut();
        // SAFETY: arrays of n live `at::Tensor*` borrowed for the call; the shim keeps no pointer.
        let rc = unsafe {
            pirclip_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                n as c_int,
                s.lr,
                s.beta1,
                s.beta2,
                s.weight_decay,
                s.eps,
                s.bias_correction1,
                s.bias_correction2,
                multi_tensor as c_int,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(format!("adamw: {}", take_message(err)));
        }
        Ok(())
    }

    /// The L2 norm of each tensor, as one 1-D tensor on their device (`torch._foreach_norm`).
    pub fn norms(ts: &[&Tensor]) -> Result<Tensor, String> {
        if ts.is_empty() {
            return Err("norms foreach: no tensors".into());
        }
        let p = ptrs(ts);
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `adamw`; the result is a new heap `at::Tensor` whose ownership passes to tch.
        let t = unsafe { pirclip_norms_foreach(p.as_ptr(), ts.len() as c_int, &mut err) };
        if t.is_null() {
            return Err(format!("norms foreach: {}", take_message(err)));
        }
        Ok(unsafe { Tensor::from_ptr(t as *mut _) })
    }

    /// Multiplies every gradient by `inv_scale` in place; true when all of them were finite
    /// (`torch._amp_foreach_non_finite_check_and_unscale_`, one device sync).
    pub fn unscale(grads: &[&Tensor], inv_scale: f64) -> Result<bool, String> {
        if grads.is_empty() {
            return Ok(true);
        }
        let p = ptrs(grads);
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `adamw`.
        let rc = unsafe {
            pirclip_unscale_foreach(p.as_ptr(), grads.len() as c_int, inv_scale, &mut err)
        };
        match rc {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(format!("unscale foreach: {}", take_message(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_linear_is_close_to_fp32() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([3, 10, 64], (Kind::Float, Device::Cpu));
        let q = QuantizedLinear::new(&w, Some(&b)).unwrap();
        let y = q.forward(&x);
        assert_eq!(y.size(), vec![3, 10, 96]);
        let want = x.linear(&w, Some(&b));
        let err = (&y - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        println!("int8 linear max |Δ| {err:.4} of max |y| {scale:.3}");
        assert!(err < 0.03 * scale, "{err} vs {scale}");
        assert!(err > 0.0, "really quantized");
    }

    #[test]
    fn cpu_autocast_bf16_runs_matmul_in_bf16_and_restores() {
        let a = Tensor::randn([8, 8], (Kind::Float, Device::Cpu));
        let y = autocast(Device::Cpu, Kind::BFloat16, || a.matmul(&a));
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(
            a.matmul(&a).kind(),
            Kind::Float,
            "autocast switched off again"
        );
    }
}
