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
//! 4. parameter gradients are averaged over ranks (DDP's all-reduce), in flat buckets.
//!
//! Splitting backward at the gathered features gives the same gradients as an autograd-aware collective,
//! with only the plain collectives of the process group.

use pirclip_model::dist::ProcessGroup;
use pirclip_model::ClipModel;
use tch::Tensor;

use crate::optim::ParamState;

pub struct Distributed {
    pub group: ProcessGroup,
    /// open_clip `--local-loss`.
    pub local_loss: bool,
    /// open_clip `--gather-with-grad`.
    pub gather_with_grad: bool,
}

/// Gradient bytes per all-reduce (PyTorch DDP's default bucket is 25 MB).
const BUCKET_BYTES: i64 = 25 << 20;

impl Distributed {
    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world(&self) -> usize {
        self.group.world_size
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

    /// DDP's gradient averaging: sum over ranks in flat buckets, divided by the world size.
    pub fn average_gradients(&self, params: &[ParamState]) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.param.grad())
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
