//! Training PIR-CLIP / CLIP models: one optimisation step exactly as open_clip's `train_one_epoch`
//! (spec §6.6) with PIR-CLIP's affiliation loss. Data loading, run management and the CLI live above.

pub mod checkpoint;
pub mod distributed;
pub mod ema;
pub mod loss;
mod model_setup;
pub mod optim;
pub mod params;
pub mod run;
pub mod setup;
pub mod tensorboard;

use pirclip_model::params::EntryKind;
use pirclip_model::{l2_normalize, BeliefMode, BnMode, ClipModel, EncodeOptions};
use tch::{Kind, Tensor};

pub use loss::{labels_from_names, labels_from_strings};
pub use optim::{learning_rate, AdamW, AdamWConfig, GradScaler, Schedule};

/// `--precision` of training, as open_clip: `amp` is autocast in the device's default half type (fp16
/// with a gradient scaler on CUDA, bf16 on CPU, where PyTorch's CPU autocast uses bf16), `amp_bf16` is
/// bf16 autocast everywhere. Parameters, optimizer state and the update stay fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainPrecision {
    #[default]
    Fp32,
    Amp,
    AmpBf16,
}

impl TrainPrecision {
    /// The autocast dtype of the forward pass on `device`, if any.
    pub fn autocast_kind(self, device: tch::Device) -> Option<Kind> {
        match self {
            TrainPrecision::Fp32 => None,
            TrainPrecision::AmpBf16 => Some(Kind::BFloat16),
            TrainPrecision::Amp if device.is_cuda() => Some(Kind::Half),
            TrainPrecision::Amp => Some(Kind::BFloat16),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    pub affiliation_loss: bool,
    pub belief_mode: BeliefMode,
    /// `--lock-instruction`: res_visual + vision_proj_res frozen, their BatchNorm in eval mode (P4).
    pub lock_instruction: bool,
    /// `--lock-text`: text tower frozen. A Hugging Face tower as open_clip's `HFTextEncoder.lock`: its
    /// transformer but the last `lock_text_unlocked_layers` layers, LayerNorms only with
    /// `lock_text_freeze_layer_norm`, the projection trained.
    pub lock_text: bool,
    pub lock_text_unlocked_layers: usize,
    pub lock_text_freeze_layer_norm: bool,
    /// `--lock-image`: image tower frozen; a timm tower as open_clip's `TimmModel.lock`: its trunk's
    /// parameter groups (stem, each block, head convolution) but the last `lock_image_unlocked_groups`,
    /// the projection trained; with `lock_image_freeze_bn_stats` the frozen groups' BatchNorm uses its
    /// running statistics (FrozenBatchNorm2d) instead of the batch's.
    pub lock_image: bool,
    pub lock_image_unlocked_groups: usize,
    pub lock_image_freeze_bn_stats: bool,
    /// `--use-bn-sync`: with several ranks, BatchNorm statistics over the global batch (SyncBatchNorm).
    pub sync_batchnorm: bool,
    /// `--lock-spatial-pae`: the hard-filter Spatial-PAE frozen.
    pub lock_spatial_pae: bool,
    /// `--lock-temporal-pae`: the Temporal-PAE (LCA) frozen.
    pub lock_temporal_pae: bool,
    pub grad_clip_norm: Option<f64>,
    pub precision: TrainPrecision,
    /// `--label-smoothing`: the contrastive targets put 1−ε on the own pair and spread ε over the batch
    /// (PyTorch's `cross_entropy(label_smoothing=ε)`). The affiliation term keeps hard targets.
    pub label_smoothing: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            affiliation_loss: true,
            belief_mode: BeliefMode::BeliefPlusIndex,
            lock_instruction: false,
            lock_text: false,
            lock_text_unlocked_layers: 0,
            lock_text_freeze_layer_norm: false,
            lock_image: false,
            lock_image_unlocked_groups: 0,
            lock_image_freeze_bn_stats: false,
            sync_batchnorm: false,
            lock_spatial_pae: false,
            lock_temporal_pae: false,
            grad_clip_norm: None,
            precision: TrainPrecision::Fp32,
            label_smoothing: 0.0,
        }
    }
}

/// What one step measured (losses before the update).
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub contrastive: f64,
    pub affiliation: Option<f64>,
    pub total: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub logit_scale: f64,
}

fn is_text_param(name: &str) -> bool {
    name == "positional_embedding"
        || name == "text_projection"
        || name.starts_with("transformer.")
        || name.starts_with("token_embedding.")
        || name.starts_with("ln_final.")
}

/// Whether `--lock-text` (with its settings) freezes the parameter `name`.
fn text_lock_freezes(name: &str, o: &TrainOptions, model: &ClipModel) -> bool {
    if !o.lock_text {
        return false;
    }
    if is_text_param(name) {
        return true;
    }
    let Some(rest) = name.strip_prefix("text.transformer.") else {
        return false; // the projection (`text.proj`) trains
    };
    // open_clip: modules [embeddings, layer 0, …, layer L-1], all but the last `unlocked` frozen.
    let module = match rest.strip_prefix("encoder.layer.") {
        Some(l) => {
            1 + l
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .unwrap_or(0)
        }
        None => 0,
    };
    let modules = 1 + model.config.text.layers;
    let locked = module + o.lock_text_unlocked_layers < modules;
    let layer_norm = name.split('.').any(|p| p == "LayerNorm");
    locked && (!layer_norm || o.lock_text_freeze_layer_norm)
}

/// Whether `--lock-image` freezes the parameter `name`.
fn image_lock_freezes(name: &str, o: &TrainOptions, model: &ClipModel) -> bool {
    if !o.lock_image {
        return false;
    }
    match pirclip_model::efficientnet::trunk_group(name, &model.config) {
        Some((group, groups)) => group + o.lock_image_unlocked_groups < groups,
        // Other towers: the whole tower (open_clip's lock with no group unlocked).
        None => name.starts_with("visual.") && !name.starts_with("visual.head."),
    }
}

fn is_instruction_param(name: &str) -> bool {
    name.starts_with("res_visual.") || name.starts_with("vision_proj_res.")
}

pub struct Trainer {
    pub model: ClipModel,
    pub optimizer: AdamW,
    pub options: TrainOptions,
    /// fp16 autocast only (`amp` on CUDA).
    pub scaler: Option<GradScaler>,
    /// Set for data-parallel training over several ranks (`distributed`).
    pub dist: Option<distributed::Distributed>,
    /// `--ema-decay`: the moving average of the weights, updated after every optimizer step.
    pub ema: Option<ema::Ema>,
}

impl Trainer {
    /// Marks the trainable parameters (`requires_grad`) and builds AdamW over them in model order.
    pub fn new(model: ClipModel, adamw: AdamWConfig, options: TrainOptions) -> Self {
        let params: Vec<(String, Tensor)> = model.registry().with_entries(|entries| {
            entries
                .iter()
                .filter(|e| e.kind == EntryKind::Parameter)
                .filter_map(|e| {
                    let frozen = text_lock_freezes(&e.name, &options, &model)
                        || image_lock_freezes(&e.name, &options, &model)
                        || (options.lock_instruction && is_instruction_param(&e.name))
                        || (options.lock_spatial_pae && e.name.starts_with("spatial_pae."))
                        || (options.lock_temporal_pae && e.name.starts_with("temporal_pae."));
                    let t = e.tensor.set_requires_grad(!frozen);
                    (!frozen).then(|| (e.name.clone(), t))
                })
                .collect()
        });
        if let (true, true, pirclip_model::clip::Visual::Timm(t)) = (
            options.lock_image,
            options.lock_image_freeze_bn_stats,
            &model.visual,
        ) {
            let groups = t.trunk.block_count() + 2;
            t.trunk
                .freeze_bn_stats(groups.saturating_sub(options.lock_image_unlocked_groups));
        }
        let scaler = (options.precision == TrainPrecision::Amp && model.device().is_cuda())
            .then(GradScaler::default);
        Trainer {
            optimizer: AdamW::new(params, adamw),
            model,
            options,
            scaler,
            dist: None,
            ema: None,
        }
    }

    /// Starts data-parallel training over `d`'s ranks as DDP does when it wraps a model: every rank takes
    /// rank 0's weights and buffers. From the second step on, gradients are averaged while backward runs
    /// (see `Distributed::attach_reducer`).
    pub fn join(&mut self, d: distributed::Distributed) -> Result<(), String> {
        d.broadcast_model(&self.model)?;
        self.dist = Some(d);
        Ok(())
    }

    pub fn trainable_parameter_count(&self) -> usize {
        self.optimizer.params.iter().map(|p| p.param.numel()).sum()
    }

    /// Forward in train mode, losses, backward, (clip), AdamW step at `lr`, clamp of logit_scale.
    pub fn step(&mut self, images: &Tensor, ids: &Tensor, labels: &[i64], lr: f64) -> StepStats {
        self.step_accumulated(&[(images.shallow_clone(), ids.shallow_clone())], labels, lr)
    }

    fn encode_normalized(&self, images: &Tensor, ids: &Tensor) -> (Tensor, Tensor) {
        let bn_mode = match &self.dist {
            _ if self.options.lock_instruction => BnMode::Running,
            Some(d) if self.options.sync_batchnorm && d.world() > 1 => {
                BnMode::TrainSync(d.group.handle().rank_sum())
            }
            _ => BnMode::Train,
        };
        let opts = EncodeOptions {
            bn_mode,
            belief_mode: self.options.belief_mode,
            dropout: true,
        };
        (
            l2_normalize(&self.model.encode_image(images, opts)),
            l2_normalize(&self.model.encode_text_train(ids, true)),
        )
    }

    /// The autocast dtype of the forward pass, if any.
    pub fn autocast_kind(&self) -> Option<Kind> {
        self.options.precision.autocast_kind(self.model.device())
    }

    fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.autocast_kind() {
            Some(kind) => pirclip_model::native::autocast(self.model.device(), kind, f),
            None => f(),
        }
    }

    /// One optimizer step over micro-batches, as open_clip's `--accum-freq`: the features of every
    /// micro-batch are first computed without gradients; then each micro-batch is recomputed with
    /// gradients and the loss of the whole accumulated batch (its fresh features in place of its cached
    /// ones) is back-propagated, so the summed gradient is the full batch's while only one micro-batch's
    /// activations are alive. `labels` number the samples of all micro-batches, in order. With
    /// BatchNorm in train mode, statistics are per micro-batch and the running statistics are updated
    /// by both passes, exactly as in open_clip.
    pub fn step_accumulated(
        &mut self,
        micro: &[(Tensor, Tensor)],
        labels: &[i64],
        lr: f64,
    ) -> StepStats {
        assert!(!micro.is_empty(), "no micro-batch");
        if self.dist.as_ref().is_some_and(|d| d.world() > 1) {
            return self.step_distributed(micro, labels, lr);
        }
        self.optimizer.zero_grad();
        let cached: Vec<(Tensor, Tensor)> = if micro.len() > 1 {
            tch::no_grad(|| {
                micro
                    .iter()
                    .map(|(i, t)| self.autocast(|| self.encode_normalized(i, t)))
                    .collect()
            })
        } else {
            Vec::new()
        };
        let device = micro[0].0.device();
        let labels_t = Tensor::from_slice(labels)
            .to_kind(Kind::Int64)
            .to_device(device);
        let mut last = None;
        for (j, (images, ids)) in micro.iter().enumerate() {
            let (losses, total) = self.autocast(|| {
                let (fresh_image, fresh_text) = self.encode_normalized(images, ids);
                let (image, text) = if micro.len() == 1 {
                    (fresh_image, fresh_text)
                } else {
                    let pick = |fresh: &Tensor, which: fn(&(Tensor, Tensor)) -> &Tensor| {
                        let parts: Vec<&Tensor> = cached
                            .iter()
                            .enumerate()
                            .map(|(k, c)| if k == j { fresh } else { which(c) })
                            .collect();
                        Tensor::cat(&parts, 0)
                    };
                    (pick(&fresh_image, |c| &c.0), pick(&fresh_text, |c| &c.1))
                };
                let losses = loss::clip_losses(
                    &image,
                    &text,
                    &self.model.logit_scale,
                    self.options.affiliation_loss.then_some(&labels_t),
                    self.options.label_smoothing,
                );
                let total = losses.total();
                (losses, total)
            });
            match &self.scaler {
                Some(s) => (&total * s.scale).backward(),
                None => total.backward(),
            }
            last = Some((losses, total));
        }
        let (losses, total) = last.expect("at least one micro-batch");
        self.finish_step(losses, total, lr)
    }

    /// One data-parallel step (see `distributed`): the loss over every rank's features, gradients
    /// through this rank's towers, averaged over ranks. Fails when a collective fails (a rank died, or
    /// the group's timeout passed).
    fn step_distributed(
        &mut self,
        micro: &[(Tensor, Tensor)],
        labels: &[i64],
        lr: f64,
    ) -> StepStats {
        self.try_step_distributed(micro, labels, lr)
            .unwrap_or_else(|e| panic!("distributed step failed: {e}"))
    }

    /// A data-parallel step over this rank's micro-batches (`--accum-freq` with several ranks). Their
    /// features make this rank's share of the global batch; the loss over all ranks' shares is computed
    /// once, on gathered leaves, and its gradient is carried back to this rank's features (through the
    /// class centres too). With one micro-batch the features keep their graph and one backward through
    /// the towers follows. With several, the features are first computed without gradients, and each
    /// micro-batch is then recomputed with gradients and back-propagated with its slice of the feature
    /// gradient, so only one micro-batch's activations are alive. open_clip recomputes the whole loss for
    /// every micro-batch and all-reduces after each backward; the summed gradient is the same, the
    /// all-reduce here runs once per step.
    pub fn try_step_distributed(
        &mut self,
        micro: &[(Tensor, Tensor)],
        labels: &[i64],
        lr: f64,
    ) -> Result<StepStats, String> {
        assert!(!micro.is_empty(), "no micro-batch");
        self.optimizer.zero_grad();
        let d = self.dist.as_ref().expect("a process group");
        let local_batch: usize = micro.iter().map(|(i, _)| i.size()[0] as usize).sum();
        let labels_t = Tensor::from_slice(labels)
            .to_kind(Kind::Int64)
            .to_device(micro[0].0.device());
        let accumulated = micro.len() > 1;
        let features = if accumulated {
            let cached: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
                micro
                    .iter()
                    .map(|(i, t)| self.autocast(|| self.encode_normalized(i, t)))
                    .collect()
            });
            let (images, texts): (Vec<Tensor>, Vec<Tensor>) = cached.into_iter().unzip();
            (
                Tensor::cat(&images, 0).set_requires_grad(true),
                Tensor::cat(&texts, 0).set_requires_grad(true),
            )
        } else {
            self.autocast(|| self.encode_normalized(&micro[0].0, &micro[0].1))
        };
        let (centres, leaves, losses, total) = self.autocast(|| -> Result<_, String> {
            let (image, text) = &features;
            let centres = self
                .options
                .affiliation_loss
                .then(|| loss::class_centres(image, text, &labels_t));
            let (gi, gt) = (d.gather_leaf(image)?, d.gather_leaf(text)?);
            let gc = match &centres {
                Some((ci, ct)) => Some((d.gather_leaf(ci)?, d.gather_leaf(ct)?)),
                None => None,
            };
            let gathered = loss::Gathered {
                image: &gi,
                text: &gt,
                centres: gc.as_ref().map(|(a, b)| (a, b)),
                rank: d.rank(),
                local_batch,
            };
            let losses = loss::gathered_losses(
                &gathered,
                &self.model.logit_scale,
                d.local_loss,
                self.options.label_smoothing,
            );
            let total = losses.total();
            Ok((centres, (gi, gt, gc), losses, total))
        })?;
        match &self.scaler {
            Some(s) => (&total * s.scale).backward(),
            None => total.backward(),
        }
        let (gi, gt, gc) = leaves;
        let mut surrogate = (&features.0 * d.own_gradient(&gi, local_batch)?).sum(Kind::Float)
            + (&features.1 * d.own_gradient(&gt, local_batch)?).sum(Kind::Float);
        if let (Some((ci, ct)), Some((gci, gct))) = (&centres, &gc) {
            surrogate = surrogate
                + (ci * d.own_gradient(gci, local_batch)?).sum(Kind::Float)
                + (ct * d.own_gradient(gct, local_batch)?).sum(Kind::Float);
        }
        // A collective that fails inside backward (the reducer's, SyncBatchNorm's) surfaces as its error.
        let backward = |t: &Tensor| {
            t.f_backward().map_err(|e| {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                format!("backward (rank {} of {}): {first}", d.rank(), d.world())
            })
        };
        if !accumulated {
            d.prepare_reduction()?;
        }
        backward(&surrogate)?;
        if accumulated {
            // The feature leaves now hold dLoss/dfeatures of this rank's share; send each micro-batch's
            // slice back through its towers. Only the last backward reduces over ranks.
            let (image_grad, text_grad) = (features.0.grad(), features.1.grad());
            let mut at = 0;
            for (k, (images, ids)) in micro.iter().enumerate() {
                let n = images.size()[0];
                let (fi, ft) = self.autocast(|| self.encode_normalized(images, ids));
                let tower = (&fi * image_grad.narrow(0, at, n)).sum(Kind::Float)
                    + (&ft * text_grad.narrow(0, at, n)).sum(Kind::Float);
                if k + 1 == micro.len() {
                    d.prepare_reduction()?;
                }
                backward(&tower)?;
                at += n;
            }
        }
        d.finish_reduction(&self.optimizer.params)?;
        let d = self.dist.as_mut().expect("a process group");
        if d.reducer.is_none() {
            d.attach_reducer(&self.optimizer.params, &self.model.logit_scale)?;
        }
        Ok(self.finish_step(losses, total, lr))
    }

    /// Unscale, clip or measure the gradient norm, update, clamp the logit scale, update the scaler.
    fn finish_step(&mut self, losses: loss::Losses, total: Tensor, lr: f64) -> StepStats {
        let finite = match &self.scaler {
            Some(s) => s.unscale(&self.optimizer.params),
            None => true,
        };
        let grad_norm = match self.options.grad_clip_norm {
            Some(max) if finite => optim::clip_grad_norm(&self.optimizer.params, max),
            _ => optim::global_grad_norm(&self.optimizer.params),
        };
        // An fp16 overflow skips the update, as GradScaler.step does.
        if finite {
            self.optimizer.step(lr);
            optim::clamp_logit_scale(&self.model.logit_scale);
            if let Some(ema) = &mut self.ema {
                ema.update(&self.model);
            }
        }
        if let Some(s) = &mut self.scaler {
            s.update(finite);
        }
        StepStats {
            contrastive: losses.contrastive.double_value(&[]),
            affiliation: losses.affiliation.as_ref().map(|a| a.double_value(&[])),
            total: total.double_value(&[]),
            grad_norm,
            lr,
            logit_scale: self.model.logit_scale.double_value(&[]),
        }
    }
}
