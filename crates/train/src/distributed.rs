//! Data-parallel training over a c10d process group, with open_clip's semantics (spec §5.4, §6.7).
//!
//! A step on W ranks, each holding B samples:
//! 1. every rank encodes its own batch (and, with the affiliation loss, the class centres of its own
//!    batch, as the official `get_aff_logits`);
//! 2. features and centres are all-gathered *detached* into leaves, and the loss is computed on them:
//!    the global loss (`[W·B, W·B]` logits) or, with `--local-loss`, this rank's rows;
//! 3. backward stops at the leaves. This rank's slice of their gradient goes back through its own towers.
//!    Without `--gather-with-grad` the slice is this rank's own loss gradient, as open_clip's plain
//!    `all_gather` with the local slice put back. With it, the slice is the sum over ranks of every
//!    rank's loss gradient, which is what the autograd all-gather's backward computes;
//! 4. parameter gradients are averaged over ranks by c10d's `Reducer`, DDP's own: bucket by bucket while
//!    backward is still running through the towers (only the last backward of an accumulated step
//!    reduces, as DDP's `no_sync`). The logit scale's gradient, which comes from the loss's backward
//!    alone, is averaged after it.
//!
//! Splitting backward at the gathered features gives the same gradients as an autograd-aware collective,
//! with only the plain collectives of the process group.

use pirclip_dist::{GradientReducer, ProcessGroup};
use pirclip_model::ClipModel;
use tch::Tensor;

use crate::optim::ParamState;

pub struct Distributed {
    pub group: ProcessGroup,
    /// open_clip `--local-loss`.
    pub local_loss: bool,
    /// open_clip `--gather-with-grad`.
    pub gather_with_grad: bool,
    /// The towers' parameters' reducer, attached after the first step (`attach_reducer`); until then
    /// gradients are averaged after backward in flat buckets.
    pub reducer: Option<TowerReducer>,
}

/// A reducer over the parameters that the towers' backward reaches, and the rest (the logit scale).
pub struct TowerReducer {
    reducer: GradientReducer,
    /// Parameters outside the reducer: their gradients are averaged after backward.
    others: Vec<Tensor>,
}

/// Gradient bytes per all-reduce after backward: DDP's bucket.
const BUCKET_BYTES: i64 = GradientReducer::BUCKET_BYTES;

impl Distributed {
    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world(&self) -> usize {
        self.group.world_size
    }

    /// Hooks DDP's reducer on the parameters the towers' backward reached in the first step (those with
    /// a gradient), all but `logit_scale`. Like DDP, which runs its first step with one bucket and then
    /// rebuilds its buckets from the order gradients arrived in, the first step is averaged after
    /// backward; afterwards every bucket goes as soon as it is full. Fixing the set from a real step keeps
    /// the reducer's strict accounting (every hooked parameter gets a gradient in every reduced
    /// backward) without DDP's per-step graph walk for unused parameters: a parameter that a
    /// configuration leaves idle simply stays outside.
    pub fn attach_reducer(
        &mut self,
        params: &[ParamState],
        logit_scale: &Tensor,
    ) -> Result<(), String> {
        let (towers, others): (Vec<&ParamState>, Vec<&ParamState>) = params.iter().partition(|p| {
            p.param.data_ptr() != logit_scale.data_ptr() && p.param.grad().defined()
        });
        let towers: Vec<&Tensor> = towers.iter().map(|p| &p.param).collect();
        self.reducer = Some(TowerReducer {
            reducer: GradientReducer::new(&self.group, &towers)?,
            others: others.iter().map(|p| p.param.shallow_clone()).collect(),
        });
        Ok(())
    }

    /// Arms the reducer (if any) for the next backward.
    pub fn prepare_reduction(&self) -> Result<(), String> {
        match &self.reducer {
            Some(r) => r.reducer.prepare(),
            None => Ok(()),
        }
    }

    /// After the step's last backward: the average over ranks of every gradient the reducer did not
    /// already average (all of them without a reducer).
    pub fn finish_reduction(&self, params: &[ParamState]) -> Result<(), String> {
        match &self.reducer {
            Some(r) => self.average_gradients_of(&r.others),
            None => self.average_gradients_of(
                &params
                    .iter()
                    .map(|p| p.param.shallow_clone())
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// The same weights and buffers on every rank: rank 0's (DDP does this when it wraps the model).
    pub fn broadcast_model(&self, model: &ClipModel) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        model.registry().with_entries(|entries| {
            entries
                .iter()
                .try_for_each(|e| self.group.broadcast(&e.tensor, 0))
        })
    }

    /// Every rank's `t` stacked in rank order, detached, as a leaf that collects the loss's gradient.
    pub fn gather_leaf(&self, t: &Tensor) -> Result<Tensor, String> {
        Ok(self.group.all_gather(&t.detach())?.set_requires_grad(true))
    }

    /// This rank's slice of a gathered leaf's gradient (summed over ranks with `--gather-with-grad`).
    pub fn own_gradient(&self, leaf: &Tensor, local_batch: usize) -> Result<Tensor, String> {
        let grad = leaf.grad();
        if !grad.defined() {
            return Ok(Tensor::zeros(
                leaf.size()[1..].to_vec().as_slice(),
                (leaf.kind(), leaf.device()),
            )
            .expand([local_batch as i64, -1], false));
        }
        if self.gather_with_grad {
            self.group.all_reduce_sum(&grad)?;
        }
        Ok(grad.narrow(0, (self.rank() * local_batch) as i64, local_batch as i64))
    }

    /// Gradient averaging after backward: sum over ranks in flat buckets, divided by the world size.
    fn average_gradients_of(&self, params: &[Tensor]) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let world = self.world() as f64;
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len() && (end == start || bytes < BUCKET_BYTES) {
                bytes += grads[end].numel() as i64 * grads[end].kind().elt_size_in_bytes() as i64;
                end += 1;
            }
            let mut flat = Tensor::cat(
                &grads[start..end]
                    .iter()
                    .map(|g| g.reshape([-1]))
                    .collect::<Vec<_>>(),
                0,
            );
            self.group.all_reduce_sum(&flat)?;
            let _ = flat.g_div_scalar_(world);
            let mut at = 0;
            for g in &grads[start..end] {
                let n = g.numel() as i64;
                g.view([-1]).copy_(&flat.narrow(0, at, n));
                at += n;
            }
            start = end;
        }
        Ok(())
    }
}
