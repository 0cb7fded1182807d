//! AdamW with PyTorch's exact update (amsgrad off; its single-tensor path on the CPU and multi-tensor
//! `foreach` path on CUDA, as PyTorch picks by default) and open_clip's two parameter groups (spec §6.4),
//! LR schedules (§6.5), global-norm clipping, the gradient scaler and the logit-scale clamp.

use pirclip_model::native::foreach;
use tch::{Kind, Tensor};

/// open_clip's rule: no weight decay for tensors with < 2 dims or whose name contains bn, ln, bias or
/// logit_scale (in effect: decay iff ndim ≥ 2).
pub fn excluded_from_decay(name: &str, ndim: usize) -> bool {
    ndim < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale")
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PIR defaults: open_clip picks the ResNet betas because "vit" is not in "PIR" (P12).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.2,
        }
    }
}

pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

/// Which implementation runs AdamW's arithmetic (PyTorch's `foreach` argument). Both compute the same
/// update; they differ in kernel launches, which matter on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Foreach {
    /// PyTorch's default: multi-tensor kernels when the parameters are on CUDA, per tensor on the CPU.
    #[default]
    Auto,
    /// One kernel per operation over all tensors (`_foreach_*`).
    On,
    /// One kernel per tensor and operation (`_single_tensor_adamw`).
    Off,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Group 0 (no decay) first, then group 1, each in parameter order: PyTorch's optimizer indices.
    pub params: Vec<ParamState>,
    pub step: i64,
    pub foreach: Foreach,
}

impl AdamW {
    /// `params` in the model's parameter order; frozen ones must be left out.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let mut no_decay = Vec::new();
        let mut decay = Vec::new();
        for (name, p) in params {
            let d = !excluded_from_decay(&name, p.dim());
            let st = ParamState {
                exp_avg: p.zeros_like(),
                exp_avg_sq: p.zeros_like(),
                name,
                param: p,
                decay: d,
            };
            if d {
                decay.push(st)
            } else {
                no_decay.push(st)
            }
        }
        no_decay.extend(decay);
        AdamW {
            config,
            params: no_decay,
            step: 0,
            foreach: Foreach::Auto,
        }
    }

    /// Whether the multi-tensor path runs (resolving `Auto` by the parameters' device).
    pub fn uses_foreach(&self) -> bool {
        match self.foreach {
            Foreach::On => true,
            Foreach::Off => false,
            Foreach::Auto => self
                .params
                .first()
                .is_some_and(|p| p.param.device().is_cuda()),
        }
    }

    /// `Optimizer.zero_grad(set_to_none=False)`: gradients are zeroed in place, so gradients that are
    /// views into the reducer's buckets stay views (detaching one in place is refused by libtorch).
    pub fn zero_grad(&mut self) {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                if g.requires_grad() {
                    let _ = g.detach_();
                }
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`: PyTorch's `_multi_tensor_adamw` or `_single_tensor_adamw`
    /// (see [`Foreach`]). Both run in libtorch with PyTorch's in-place kernels (addcmul_, addcdiv_), so
    /// the arithmetic is PyTorch's to the bit and the per-tensor path allocates only one tensor's
    /// temporaries at a time.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        let multi_tensor = self.uses_foreach();
        // Per parameter group, as PyTorch groups tensors by device, dtype and group.
        for decay in [false, true] {
            let group: Vec<(&ParamState, Tensor)> = self
                .params
                .iter()
                .filter(|p| p.decay == decay)
                .map(|p| (p, p.param.grad()))
                .filter(|(_, g)| g.defined())
                .collect();
            let params: Vec<&Tensor> = group.iter().map(|(p, _)| &p.param).collect();
            let grads: Vec<&Tensor> = group.iter().map(|(_, g)| g).collect();
            let exp_avgs: Vec<&Tensor> = group.iter().map(|(p, _)| &p.exp_avg).collect();
            let exp_avg_sqs: Vec<&Tensor> = group.iter().map(|(p, _)| &p.exp_avg_sq).collect();
            let step = foreach::AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                weight_decay: if decay { c.weight_decay } else { 0.0 },
                eps: c.eps,
                bias_correction1,
                bias_correction2,
            };
            foreach::adamw(multi_tensor, &params, &grads, &exp_avgs, &exp_avg_sqs, step)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn defined_grads(params: &[ParamState]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| p.param.grad())
        .filter(|g| g.defined())
        .collect()
}

/// √Σ g² over all parameters: per-tensor L2 norms in one multi-tensor kernel (`torch._foreach_norm`, as
/// `clip_grad_norm_`), combined in float64 on the device, one sync.
pub fn global_grad_norm(params: &[ParamState]) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads = defined_grads(params);
    if grads.is_empty() {
        return 0.0;
    }
    let grads: Vec<&Tensor> = grads.iter().collect();
    foreach::norms(&grads)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_kind(Kind::Double)
        .square()
        .sum(Kind::Double)
        .sqrt()
        .double_value(&[])
}

/// `clip_grad_norm_`: scales all gradients by max_norm / (norm + 1e-6) when the norm exceeds max_norm.
pub fn clip_grad_norm(params: &[ParamState], max_norm: f64) -> f64 {
    let norm = global_grad_norm(params);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let _guard = tch::no_grad_guard();
        for p in params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(coef);
            }
        }
    }
    norm
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Linear warm-up then cosine decay to 0 at the last step.
    Cosine,
    /// Linear warm-up then constant.
    Const,
    /// Linear warm-up, constant, then a linear cool-down over the last `cooldown_steps` to `end_lr`.
    ConstCooldown { cooldown_steps: i64, end_lr: f64 },
}

/// open_clip's schedules: LR for optimizer step `k` (0-based), set before the step.
pub fn learning_rate(schedule: Schedule, base: f64, warmup: i64, total: i64, k: i64) -> f64 {
    if k < warmup {
        return base * (k + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Const => base,
        Schedule::Cosine => {
            let e = (k - warmup) as f64;
            let es = (total - warmup).max(1) as f64;
            0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base
        }
        Schedule::ConstCooldown {
            cooldown_steps,
            end_lr,
        } => {
            let start_cooldown = total - cooldown_steps;
            if k < start_cooldown {
                base
            } else {
                let e = (k - start_cooldown) as f64;
                let es = (total - start_cooldown).max(1) as f64;
                // open_clip's cooldown power defaults to 1.0 (linear).
                let decay = 1.0 - e / es;
                decay * (base - end_lr) + end_lr
            }
        }
    }
}

/// Clamp of the temperature parameter after each step: [0, ln 100].
pub fn clamp_logit_scale(logit_scale: &Tensor) {
    let _guard = tch::no_grad_guard();
    let _ = logit_scale.shallow_clone().clamp_(0.0, 100f64.ln());
}

/// `torch.amp.GradScaler` for fp16 autocast: the loss is multiplied by `scale` before backward so small
/// gradients survive fp16; gradients are divided back before clipping and the step. A step whose
/// gradients hold inf/NaN is skipped and the scale halved; after `growth_interval` good steps in a row
/// it doubles (PyTorch's defaults).
#[derive(Debug, Clone)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    pub growth_tracker: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }
}

impl GradScaler {
    /// Divides the gradients by the scale; true when all of them are finite. PyTorch's
    /// `_amp_foreach_non_finite_check_and_unscale_`, as `GradScaler.unscale_`: one kernel, one sync.
    pub fn unscale(&self, params: &[ParamState]) -> bool {
        let _guard = tch::no_grad_guard();
        let grads = defined_grads(params);
        let grads: Vec<&Tensor> = grads.iter().collect();
        foreach::unscale(&grads, 1.0 / self.scale).unwrap_or_else(|e| panic!("{e}"))
    }

    /// After a step: back off (the step was skipped) or count towards growth.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        }
    }
}
