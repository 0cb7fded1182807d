//! A training run as open_clip's `main` + `train_one_epoch` drive it: epochs of the loader's batches,
//! `--accum-freq` micro-batches per optimizer step, the learning-rate schedule, `out.log` and TensorBoard
//! scalars, checkpoints (`epoch_N.pt` + `.safetensors`, `epoch_latest.pt`), validation, `--max-steps`,
//! and exact resume from a [`Position`]. The CLI only configures it and shows progress through
//! [`RunObserver`]; validation is a callback, so this crate does not depend on the retrieval crate.
//!
//! Rank 0 of a distributed run writes every file; the other ranks train and stay silent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pirclip_data::train::{TrainBatch, TrainLoader};
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::ClipModel;

use crate::checkpoint::{self, Position};
use crate::tensorboard::EventWriter;
use crate::{labels_from_names, labels_from_strings, learning_rate, Schedule, StepStats, Trainer};

/// Where the class of a sample comes from, for the affiliation loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelSource {
    /// The official rule: the file-name prefix before the first `_`, numbered per batch.
    FileName,
    /// The dataset's `label` field (needed for RSICD's numeric file names); the file name where absent.
    Json,
}

/// The learning-rate schedule by name; `ConstCooldown` counts its cool-down in epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    Cosine,
    Const,
    ConstCooldown { epochs: usize, end_lr: f64 },
}

#[derive(Debug, Clone)]
pub struct RunSettings {
    pub name: String,
    pub epochs: usize,
    pub accum_freq: usize,
    pub lr: f64,
    pub warmup: i64,
    pub schedule: ScheduleKind,
    /// Stop after this many optimizer steps in total (a checkpoint is written; resume continues exactly).
    pub max_steps: Option<i64>,
    /// Write a PyTorch profiler Chrome trace of every step after the run's first to this file.
    pub profile: Option<PathBuf>,
    pub log_every_n_steps: usize,
    /// Save every N epochs (and always at the end).
    pub save_frequency: usize,
    /// Keep `epoch_latest.pt` up to date after every epoch.
    pub save_most_recent: bool,
    /// Validate every N epochs (and at the end).
    pub val_frequency: usize,
    pub label_source: LabelSource,
    /// Write every step's inputs here (see [`dump_batch`]): `PIRCLIP_DUMP_BATCHES` in the CLI.
    pub dump_batches: Option<PathBuf>,
}

/// `out.log` of the run folder (rank 0 only: other ranks hold none and write nothing).
pub struct RunLog(Option<std::fs::File>);

impl RunLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(RunLog(Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )))
    }

    pub fn none() -> Self {
        RunLog(None)
    }

    pub fn line(&mut self, s: &str) {
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{s}");
            let _ = f.flush();
        }
    }
}

/// What the user sees while a run goes (a progress bar, in the CLI). Every method is optional.
pub trait RunObserver {
    /// Steps `first..stop_at` are about to run.
    fn started(&mut self, _first: i64, _stop_at: i64) {}
    /// Optimizer step `step` (1-based) is done.
    fn stepped(&mut self, _step: i64, _stats: &StepStats, _samples_per_second: f64) {}
    /// A line worth showing beside the progress (validation results).
    fn line(&mut self, _line: &str) {}
}

/// Validation of the current weights: `(metric name, value)` pairs, logged as `val/<name>`.
pub type Validate<'a> = dyn FnMut(&ClipModel) -> Result<Vec<(String, f64)>, String> + 'a;

pub struct TrainingRun {
    pub trainer: Trainer,
    pub loader: TrainLoader,
    pub settings: RunSettings,
    pub run_dir: PathBuf,
    pub log: RunLog,
    tensorboard: Option<EventWriter>,
    is_master: bool,
}

/// The torch generator's seed for optimizer step `step` of rank `rank` (SplitMix64 of the three).
fn forward_seed(seed: u64, rank: u64, step: i64) -> i64 {
    let mut z = seed ^ rank.rotate_left(32) ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEnd {
    pub step: i64,
    pub skipped_samples: usize,
}

impl TrainingRun {
    /// `is_master`: this process writes the run folder (rank 0, or the only process).
    pub fn new(
        trainer: Trainer,
        loader: TrainLoader,
        settings: RunSettings,
        run_dir: PathBuf,
        log: RunLog,
        is_master: bool,
    ) -> Result<Self, String> {
        if settings.accum_freq == 0 {
            return Err("accum_freq must be at least 1".into());
        }
        let tensorboard = if is_master {
            let dir = run_dir.join("tensorboard");
            Some(
                EventWriter::create(&dir)
                    .map_err(|e| format!("TensorBoard event file in {}: {e}", dir.display()))?,
            )
        } else {
            None
        };
        let run = TrainingRun {
            trainer,
            loader,
            settings,
            run_dir,
            log,
            tensorboard,
            is_master,
        };
        if run.steps_per_epoch() == 0 {
            return Err(format!(
                "{} samples make {} batches of {}: fewer than one step of --accum-freq {}",
                run.loader.len(),
                run.loader.batches_per_epoch(),
                run.loader.batch_size(),
                run.settings.accum_freq
            ));
        }
        Ok(run)
    }

    /// Optimizer steps per epoch; micro-batches that cannot fill a last step are dropped, as in open_clip.
    pub fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch() / self.settings.accum_freq
    }

    pub fn total_steps(&self) -> i64 {
        (self.steps_per_epoch() * self.settings.epochs) as i64
    }

    /// The step the run stops at: the end of the last epoch or `max_steps`.
    pub fn stop_at(&self) -> i64 {
        let total = self.total_steps();
        self.settings.max_steps.map_or(total, |m| m.min(total))
    }

    fn schedule(&self) -> Schedule {
        match self.settings.schedule {
            ScheduleKind::Cosine => Schedule::Cosine,
            ScheduleKind::Const => Schedule::Const,
            ScheduleKind::ConstCooldown { epochs, end_lr } => Schedule::ConstCooldown {
                cooldown_steps: (self.steps_per_epoch() * epochs) as i64,
                end_lr,
            },
        }
    }

    fn checkpoints(&self) -> PathBuf {
        self.run_dir.join("checkpoints")
    }

    fn labels(&self, batches: &[TrainBatch]) -> Vec<i64> {
        match self.settings.label_source {
            LabelSource::FileName => {
                let names: Vec<&String> = batches.iter().flat_map(|b| &b.names).collect();
                labels_from_names(&names)
            }
            LabelSource::Json => labels_from_strings(
                &batches
                    .iter()
                    .flat_map(|b| b.labels.iter().zip(&b.names))
                    .map(|(l, n)| l.clone().unwrap_or_else(|| n.clone()))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Trains from `pos` to the end (or `max_steps`), saving and validating on the way.
    pub fn run(
        &mut self,
        pos: Position,
        mut validate: Option<&mut Validate>,
        observer: &mut dyn RunObserver,
    ) -> Result<RunEnd, String> {
        let accum = self.settings.accum_freq;
        let per_epoch = self.steps_per_epoch();
        let total_steps = self.total_steps();
        let stop_at = self.stop_at();
        let schedule = self.schedule();
        let device = self.trainer.model.device();
        let image_size = self.trainer.model.config.image_size;
        observer.started(pos.step, stop_at);
        let mut lr = self.settings.lr;
        let mut skipped_total = 0usize;
        let mut step = pos.step;
        // The first step is left out of the profile: it warms allocators and autograd's graph caches.
        let mut profiler = None;
        'epochs: for epoch in pos.epoch..self.settings.epochs {
            let start = if epoch == pos.epoch {
                pos.batch_in_epoch
            } else {
                0
            };
            let mut t_data = Instant::now();
            let mut pending = Vec::with_capacity(accum);
            for batch in self.loader.stream(epoch, start) {
                let batch = batch.map_err(|e| {
                    let msg =
                        format!("training data: {e}; {skipped_total} samples skipped before this");
                    self.log.line(&msg);
                    msg
                })?;
                if step >= stop_at {
                    break 'epochs;
                }
                if batch.index >= per_epoch * accum {
                    break; // micro-batches left over after the epoch's last full step
                }
                if !batch.skipped.is_empty() {
                    skipped_total += batch.skipped.len();
                    self.log.line(&format!(
                        "skipped {} unreadable samples (total {skipped_total}): {}",
                        batch.skipped.len(),
                        batch.skipped.join("; ")
                    ));
                }
                pending.push(batch);
                if pending.len() < accum {
                    continue;
                }
                let batches = std::mem::take(&mut pending);
                let data_time = t_data.elapsed().as_secs_f64();
                let t_batch = Instant::now();
                let labels = self.labels(&batches);
                let n = labels.len();
                let micro: Vec<(tch::Tensor, tch::Tensor)> = batches
                    .iter()
                    .map(|b| {
                        let m = b.names.len();
                        (
                            images_tensor(&b.pixels, m, image_size, device),
                            ids_tensor(&b.ids, m, device),
                        )
                    })
                    .collect();
                let batch_index = batches.last().map_or(0, |b| b.index);
                if step == pos.step + 1 && self.settings.profile.is_some() {
                    profiler = Some(pirclip_model::native::Profiler::start()?);
                }
                lr = learning_rate(
                    schedule,
                    self.settings.lr,
                    self.settings.warmup,
                    total_steps,
                    step,
                );
                if let Some(dir) = &self.settings.dump_batches {
                    let rank = self.trainer.dist.as_ref().map_or(0, |d| d.rank());
                    dump_batch(dir, rank, step + 1, &batches, &labels, lr, image_size)?;
                }
                // The forward pass's random draws (dropout in a Hugging Face text tower or the PAEs)
                // depend on the seed, the rank and the step alone, so a resumed run draws exactly
                // what the uninterrupted one does (one torch generator state would not survive a
                // checkpoint).
                let rank = self.trainer.dist.as_ref().map_or(0, |d| d.rank()) as u64;
                tch::manual_seed(forward_seed(self.loader.seed(), rank, step));
                let s = if self.trainer.dist.is_some() {
                    self.trainer
                        .try_step_distributed(&micro, &labels, lr)
                        .map_err(|e| format!("step {}: {e}", step + 1))?
                } else {
                    self.trainer.step_accumulated(&micro, &labels, lr)
                };
                step += 1;
                let batch_time = t_batch.elapsed().as_secs_f64() + data_time;
                if step == stop_at {
                    self.write_profile(profiler.take())?;
                }
                let sps = n as f64 / batch_time;
                observer.stepped(step, &s, sps);
                let done_in_epoch = (batch_index + 1) / accum;
                if step % self.settings.log_every_n_steps.max(1) as i64 == 0
                    || done_in_epoch == per_epoch
                    || step == stop_at
                {
                    self.log_step(
                        epoch,
                        done_in_epoch,
                        per_epoch,
                        step,
                        &s,
                        data_time,
                        batch_time,
                        sps,
                    )?;
                }
                if step == stop_at && done_in_epoch < per_epoch {
                    let p = Position {
                        epoch,
                        batch_in_epoch: done_in_epoch * accum,
                        step,
                    };
                    self.save_latest(p, lr)?;
                    self.log.line(&format!(
                        "stopped at step {step} (--max-steps); checkpoints/epoch_latest.pt resumes here"
                    ));
                    break 'epochs;
                }
                t_data = Instant::now();
            }
            let completed = epoch + 1;
            let p = Position {
                epoch: completed,
                batch_in_epoch: 0,
                step,
            };
            if completed == self.settings.epochs
                || completed % self.settings.save_frequency.max(1) == 0
            {
                self.save_epoch(completed, p, lr)?;
            }
            if self.settings.save_most_recent || step == stop_at {
                self.save_latest(p, lr)?;
            }
            if let Some(v) = validate.as_deref_mut() {
                if completed % self.settings.val_frequency.max(1) == 0
                    || completed == self.settings.epochs
                {
                    self.validate(completed, step, v, observer)?;
                }
            }
            if step >= stop_at {
                break;
            }
        }
        self.write_profile(profiler.take())?;
        if let Some(d) = &self.trainer.dist {
            // Rank 0 writes the last checkpoint before any rank reports success.
            d.group.barrier()?;
        }
        Ok(RunEnd {
            step,
            skipped_samples: skipped_total,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn log_step(
        &mut self,
        epoch: usize,
        done_in_epoch: usize,
        per_epoch: usize,
        step: i64,
        s: &StepStats,
        data_time: f64,
        batch_time: f64,
        sps: f64,
    ) -> Result<(), String> {
        let mut scalars = vec![
            ("train/data_time", data_time),
            ("train/batch_time", batch_time),
            ("train/samples_per_second", sps),
            ("train/samples_per_second_per_gpu", sps),
            ("train/scale", s.logit_scale.exp()),
            ("train/lr", s.lr),
            ("train/contrastive_loss", s.contrastive),
            ("train/total_loss", s.total),
            ("train/grad_norm", s.grad_norm),
        ];
        if let Some(aff) = s.affiliation {
            scalars.push(("train/affiliation_loss", aff));
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, &scalars)
                .map_err(|e| format!("TensorBoard event file: {e}"))?;
        }
        self.log.line(&format!(
            "Train Epoch: {epoch} [{done_in_epoch}/{per_epoch}] step {step} Data (t): {data_time:.3} Batch (t): {batch_time:.3}, {sps:.2}/s LR: {:.6} Logit Scale: {:.3} Contrastive_loss: {:.5}{} Loss: {:.5}",
            s.lr,
            s.logit_scale.exp(),
            s.contrastive,
            s.affiliation.map(|x| format!(" Affiliation_loss: {x:.5}")).unwrap_or_default(),
            s.total
        ));
        Ok(())
    }

    fn write_profile(
        &mut self,
        profiler: Option<pirclip_model::native::Profiler>,
    ) -> Result<(), String> {
        let (Some(p), Some(path)) = (profiler, self.settings.profile.as_ref()) else {
            return Ok(());
        };
        p.stop(path)?;
        self.log.line(&format!(
            "profile of the steps after the first: {}",
            path.display()
        ));
        Ok(())
    }

    fn save_latest(&mut self, p: Position, lr: f64) -> Result<(), String> {
        if !self.is_master {
            return Ok(());
        }
        let path = self.checkpoints().join("epoch_latest.pt");
        checkpoint::save(&path, &self.trainer, &self.settings.name, p, lr)
            .map_err(|e| format!("saving {}: {e}", path.display()))
    }

    /// `epoch_N.pt` (training state) and `epoch_N.safetensors` (the weights to use: the average with
    /// `--ema-decay`).
    fn save_epoch(&mut self, completed: usize, p: Position, lr: f64) -> Result<(), String> {
        if !self.is_master {
            return Ok(());
        }
        let dir = self.checkpoints();
        let path = dir.join(format!("epoch_{completed}.pt"));
        checkpoint::save(&path, &self.trainer, &self.settings.name, p, lr)
            .map_err(|e| format!("saving {}: {e}", path.display()))?;
        let model = &self.trainer.model;
        let ema_decay = self.trainer.ema.as_ref().map(|e| e.decay.to_string());
        let mut meta = vec![
            ("format", "pt"),
            ("pirclip_model", model.config.name.as_str()),
        ];
        if let Some(d) = &ema_decay {
            meta.push(("pirclip_ema_decay", d));
        }
        let weights = dir.join(format!("epoch_{completed}.safetensors"));
        pirclip_checkpoint::safetensors::write(
            &weights,
            &match &self.trainer.ema {
                Some(ema) => ema.state_dict(),
                None => model.state_dict(),
            },
            &meta,
        )
        .map_err(|e| format!("saving {}: {e}", weights.display()))?;
        self.log.line(&format!("saved {}", path.display()));
        Ok(())
    }

    /// Validates the weights the checkpoint's .safetensors holds: the average when there is one.
    fn validate(
        &mut self,
        completed: usize,
        step: i64,
        validate: &mut Validate,
        observer: &mut dyn RunObserver,
    ) -> Result<(), String> {
        if !self.is_master {
            return Ok(());
        }
        if let Some(ema) = &mut self.trainer.ema {
            ema.swap(&self.trainer.model);
        }
        let metrics = validate(&self.trainer.model);
        if let Some(ema) = &mut self.trainer.ema {
            ema.swap(&self.trainer.model);
        }
        let metrics = metrics.map_err(|e| format!("validation after epoch {completed}: {e}"))?;
        let tags: Vec<(String, f64)> = metrics
            .iter()
            .map(|(k, v)| (format!("val/{k}"), *v))
            .collect();
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(
                step,
                &tags
                    .iter()
                    .map(|(k, v)| (k.as_str(), *v))
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| format!("TensorBoard event file: {e}"))?;
        }
        let line = format!(
            "Eval Epoch: {completed} {}",
            metrics
                .iter()
                .map(|(k, v)| format!("{k}: {v:.2}"))
                .collect::<Vec<_>>()
                .join("\t")
        );
        observer.line(&line);
        self.log.line(&line);
        Ok(())
    }
}

/// Writes a step's inputs, as the loss sees them, to `DIR/rank{r}-step{k}.safetensors`: `images`
/// [n,3,S,S], `tokens` [n,77], `labels` [n], the samples' `positions` [n] in the epoch's order, `lr` [1]
/// f64, and the samples' names in the metadata; so that a reference implementation (the PyTorch DDP
/// run of `tests/reference/ddp_train.py`) can train on exactly the same batches.
fn dump_batch(
    dir: &Path,
    rank: usize,
    step: i64,
    batches: &[TrainBatch],
    labels: &[i64],
    lr: f64,
    image_size: usize,
) -> Result<(), String> {
    use pirclip_checkpoint::{DType, StateDict, TensorData};
    let (n, s) = (labels.len(), image_size);
    let pixels: Vec<f32> = batches
        .iter()
        .flat_map(|b| b.pixels.iter().copied())
        .collect();
    let ids: Vec<i64> = batches.iter().flat_map(|b| b.ids.iter().copied()).collect();
    let positions: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.positions.iter().map(|&p| p as i64))
        .collect();
    let names: Vec<&str> = batches
        .iter()
        .flat_map(|b| b.names.iter().map(String::as_str))
        .collect();
    let lr = TensorData::new(DType::F64, vec![1], lr.to_le_bytes().to_vec())
        .map_err(|e| e.to_string())?;
    let sd = StateDict {
        entries: vec![
            (
                "images".into(),
                TensorData::from_f32(vec![n, 3, s, s], &pixels),
            ),
            (
                "tokens".into(),
                TensorData::from_i64(vec![n, ids.len() / n.max(1)], &ids),
            ),
            ("labels".into(), TensorData::from_i64(vec![n], labels)),
            (
                "positions".into(),
                TensorData::from_i64(vec![n], &positions),
            ),
            ("lr".into(), lr),
        ],
    };
    let path = dir.join(format!("rank{rank}-step{step}.safetensors"));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    pirclip_checkpoint::safetensors::write(&path, &sd, &[("names", &names.join("\n"))])
        .map_err(|e| format!("{}: {e}", path.display()))
}
