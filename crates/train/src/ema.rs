//! Exponential moving average of the weights (`--ema-decay`), as timm's `ModelEmaV2`: a shadow copy of
//! every floating tensor of the model (parameters and BatchNorm statistics) follows the trained one by
//! `shadow ← d·shadow + (1−d)·weight` after each optimizer step; integer buffers are copied.
//!
//! The decay is warmed up, d = min(decay, (1+n)/(10+n)) at the n-th update: a short run with a fixed
//! 0.999 would still hold 0.999^1000 ≈ 37 % of the random initialisation after 1,000 steps.

use pirclip_model::params::{from_tch, to_tch};
use pirclip_model::ClipModel;
use tch::Tensor;

pub struct Ema {
    pub decay: f64,
    /// Updates done (the optimizer steps since the shadow was taken).
    pub updates: i64,
    /// (name, shadow tensor) in model registry order.
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// A shadow equal to the model's current weights.
    pub fn new(model: &ClipModel, decay: f64) -> Self {
        let _guard = tch::no_grad_guard();
        let shadow = model.registry().with_entries(|entries| {
            entries
                .iter()
                .map(|e| (e.name.clone(), e.tensor.detach().copy()))
                .collect()
        });
        Ema {
            decay,
            updates: 0,
            shadow,
        }
    }

    /// The decay of the next update.
    pub fn current_decay(&self) -> f64 {
        let n = (self.updates + 1) as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    pub fn update(&mut self, model: &ClipModel) {
        let _guard = tch::no_grad_guard();
        let d = self.current_decay();
        model.registry().with_entries(|entries| {
            for (e, (name, s)) in entries.iter().zip(&mut self.shadow) {
                debug_assert_eq!(&e.name, name);
                if e.tensor.is_floating_point() {
                    // d·s + (1−d)·w in one kernel, without a temporary the size of the tensor.
                    let _ = s.lerp_(&e.tensor.detach(), 1.0 - d);
                } else {
                    s.copy_(&e.tensor);
                }
            }
        });
        self.updates += 1;
    }

    /// Exchanges the model's weights with the shadow (call twice to undo): validation and saving see the
    /// averaged weights without a second model in memory.
    pub fn swap(&mut self, model: &ClipModel) {
        let _guard = tch::no_grad_guard();
        model.registry().with_entries(|entries| {
            for (e, (_, s)) in entries.iter().zip(&mut self.shadow) {
                let held = e.tensor.detach().copy();
                let mut live = e.tensor.detach();
                live.copy_(s);
                s.copy_(&held);
            }
        });
    }

    /// The shadow as (name, tensor) pairs, for writing.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    pub fn state_dict(&self) -> pirclip_checkpoint::StateDict {
        pirclip_checkpoint::StateDict {
            entries: self
                .shadow
                .iter()
                .map(|(n, t)| (n.clone(), from_tch(t)))
                .collect(),
        }
    }

    /// Restores the shadow from saved tensors by name; every shadow tensor must be present with its shape.
    pub fn load(
        &mut self,
        saved: &[(String, pirclip_checkpoint::TensorData)],
        origin: &str,
    ) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for (name, s) in &mut self.shadow {
            let t = saved
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| format!("{origin}: the weight average lacks {name}"))?;
            let want: Vec<usize> = s.size().iter().map(|&d| d as usize).collect();
            if t.shape != want {
                return Err(format!(
                    "{origin}: the weight average's {name} has shape {:?}, the model has {want:?}",
                    t.shape
                ));
            }
            s.copy_(&to_tch(t).to_device(s.device()));
        }
        Ok(())
    }
}
