//! A training run from its settings: what `pirclip train` does between parsing its flags and the first
//! step, as a library call. [`RunConfig`] says everything a run needs; [`TrainRun::from_config`] finds
//! the data, joins the launch's ranks, builds and initialises the model (and loads `pretrained`), makes
//! the trainer (AdamW, weight average), resumes, creates the run folder (rank 0), and
//! [`TrainRun::run`] trains. The example a Rust user copies is `crates/train/tests/library_run.rs`.

use std::path::{Path, PathBuf};

use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_data::train::{
    samples_from_csv, samples_from_karpathy, Augmentation, ImageSource, LoaderConfig, Sample,
    ShardOrder, TrainLoader,
};
use pirclip_dist::{ProcessGroup, Rendezvous, WorldInfo};
use pirclip_model::inspect::group_thousands;
use pirclip_model::{ClipModel, ModelConfig};

use crate::checkpoint::{self, Position};
use crate::distributed::Distributed;
use crate::model_setup::{check_model_options, pretrained_towers};
use crate::optim::Foreach;
use crate::run::{RunEnd, RunLog, RunObserver, RunSettings, TrainingRun, Validate};
use crate::{AdamWConfig, TrainOptions, TrainPrecision, Trainer};

/// How `train_data` is read (open_clip's `--dataset-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatasetType {
    /// By name: `.csv`/`.tsv` is CSV, `.json` a Karpathy JSON, anything else webdataset shards.
    #[default]
    Auto,
    Csv,
    Webdataset,
}

/// open_clip's CSV columns and separator.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    pub image_key: String,
    pub caption_key: String,
    pub separator: char,
}

impl Default for CsvColumns {
    fn default() -> Self {
        CsvColumns {
            image_key: "filepath".into(),
            caption_key: "title".into(),
            separator: '\t',
        }
    }
}

/// The training data and how batches are drawn from it.
#[derive(Debug, Clone)]
pub struct DataSpec {
    /// A Karpathy JSON, a CSV, or webdataset shards (`dir/shard-{000000..000007}.tar`).
    pub train_data: String,
    /// The images of a JSON (or the folder a CSV's paths are relative to).
    pub images_dir: Option<PathBuf>,
    /// A JSON's splits, comma-separated.
    pub train_split: String,
    pub dataset_type: DatasetType,
    pub csv: CsvColumns,
    pub allow_absolute_paths: bool,
    /// open_clip's `--train-num-samples`: the epoch length.
    pub train_num_samples: Option<usize>,
    pub dataset_resampled: bool,
    pub shuffle_buffer: usize,
    pub one_caption_per_image: bool,
    pub shuffle: bool,
    /// `None`: the eval transform (resize, centre crop).
    pub augment: Option<Augmentation>,
    pub workers: usize,
    /// Per rank.
    pub batch_size: usize,
}

/// Retrieval validation after epochs: a Karpathy JSON split with its images, or open_clip's CSV.
#[derive(Debug, Clone)]
pub enum ValidationSpec {
    Json {
        path: PathBuf,
        images_dir: PathBuf,
        split: String,
    },
    Csv {
        path: PathBuf,
    },
}

/// How the ranks of a launch meet (open_clip's `--dist-*`, `--local-loss`, `--gather-with-grad`).
#[derive(Debug, Clone)]
pub struct DistSpec {
    /// `nccl` or `gloo`; `None`: nccl on CUDA, gloo on the CPU.
    pub backend: Option<String>,
    pub url: String,
    pub timeout_s: u64,
    pub local_loss: bool,
    pub gather_with_grad: bool,
}

impl Default for DistSpec {
    fn default() -> Self {
        DistSpec {
            backend: None,
            url: "env://".into(),
            timeout_s: 1800,
            local_loss: false,
            gather_with_grad: false,
        }
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub model: ModelConfig,
    /// Weights to start from (any checkpoint layout pirclip reads); missing tensors keep their
    /// initialisation.
    pub pretrained: Option<PathBuf>,
    /// open_clip's `--pretrained-image`: the image tower starts from its ImageNet weights.
    pub pretrained_image: bool,
    pub seed: u64,
    pub data: DataSpec,
    pub validation: Option<ValidationSpec>,
    pub options: TrainOptions,
    pub adamw: AdamWConfig,
    pub foreach: Foreach,
    /// The weight average's decay; `None`: no average.
    pub ema_decay: Option<f64>,
    /// `settings.name` empty: open_clip's `<time>-model_…-lr_…` name.
    pub settings: RunSettings,
    pub logs: PathBuf,
    /// `latest` (the newest checkpoint of the run folder) or a checkpoint file.
    pub resume: Option<String>,
    /// This rank's device (with several ranks on CUDA: `cuda:LOCAL_RANK`, see [`rank_device`]).
    pub device: tch::Device,
    /// The launch (open_clip's `world_info_from_env`).
    pub world: WorldInfo,
    pub dist: DistSpec,
    /// What `params.txt` records (the CLI writes its parsed flags).
    pub params: String,
    /// The recipe's name, for the run's `recipe …` line.
    pub recipe: String,
}

/// open_clip's device for a rank: with several ranks and a plain `cuda`, `cuda:LOCAL_RANK`.
pub fn rank_device(
    device: tch::Device,
    asked_plain_cuda: bool,
    world: WorldInfo,
) -> Result<tch::Device, String> {
    if world.world_size <= 1 || !asked_plain_cuda {
        return Ok(device);
    }
    let visible = tch::Cuda::device_count() as usize;
    if world.local_rank >= visible {
        return Err(format!(
            "rank {} has LOCAL_RANK {} but only {visible} CUDA device(s) are visible: launch at most {visible} ranks per node",
            world.rank, world.local_rank
        ));
    }
    Ok(tch::Device::Cuda(world.local_rank))
}

/// A run ready to train.
pub struct TrainRun {
    pub training: TrainingRun,
    pub position: Position,
    /// The validation set and its image folder (empty for a CSV's own paths).
    pub validation: Option<(RetrievalSet, PathBuf)>,
    is_master: bool,
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl TrainRun {
    /// Sets the run up. Lines worth showing (rank 0 only) go to `observer.line` and `out.log`.
    pub fn from_config(c: RunConfig, observer: &mut dyn RunObserver) -> Result<TrainRun, String> {
        let is_master = c.world.rank == 0;
        let mut say = |log: &mut RunLog, line: &str| {
            if is_master {
                observer.line(line);
            }
            log.line(line);
        };
        check_model_options(&c)?;
        // Before the first tensor: steps reuse freed activation memory instead of faulting in new pages.
        pirclip_model::native::retain_freed_memory();
        let mut settings = c.settings.clone();
        if settings.name.is_empty() {
            settings.name = default_name(&c);
        }
        let run_dir = c.logs.join(&settings.name);
        let resume = resume_path(&run_dir, c.resume.as_deref())?;
        // Every rank checked the run folder; only once all have joined does rank 0 create it.
        let dist = join_group(&c.dist, c.world, c.device)?;
        let mut log = RunLog::none();
        if is_master {
            std::fs::create_dir_all(run_dir.join("checkpoints")).map_err(msg)?;
            log = RunLog::open(&run_dir.join("out.log")).map_err(msg)?;
            std::fs::write(run_dir.join("params.txt"), &c.params).map_err(msg)?;
        }
        let model = ClipModel::new(&c.model, c.device);
        pirclip_model::init::initialize(model.registry(), c.seed as i64);
        for line in pretrained_towers(&c, &model)? {
            say(&mut log, &line);
        }
        if let Some(p) = &c.pretrained {
            let ck = pirclip_checkpoint::load(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let report = pirclip_model::params::load_state_dict(model.registry(), &ck.state_dict);
            let fresh = if report.is_clean() {
                " none".to_string()
            } else {
                report.describe()
            };
            say(
                &mut log,
                &format!(
                    "pretrained {}: loaded {} tensors; randomly initialised:{fresh}",
                    p.display(),
                    report.loaded.len()
                ),
            );
        }
        let mut trainer = Trainer::new(model, c.adamw, c.options);
        trainer.optimizer.foreach = c.foreach;
        // Only rank 0 saves and validates, so only rank 0 keeps the average (a copy of the weights).
        if let (Some(decay), true) = (c.ema_decay, is_master) {
            trainer.ema = Some(crate::ema::Ema::new(&trainer.model, decay));
        }
        let mut position = Position::default();
        if let Some(p) = &resume {
            position = checkpoint::resume(p, &mut trainer)?;
            say(
                &mut log,
                &format!(
                    "resumed from {} at epoch {}, batch {}, step {}",
                    p.display(),
                    position.epoch,
                    position.batch_in_epoch,
                    position.step
                ),
            );
        }
        if let Some(d) = dist {
            trainer.join(d)?;
        }
        let validation = c
            .validation
            .as_ref()
            .map(|v| validation_set(v, &c.data))
            .transpose()?;
        let (loader, skipped) = loader(&c)?;
        if skipped > 0 {
            say(
                &mut log,
                &format!("shards: skipped {skipped} samples lacking an image or a caption"),
            );
        }
        say(&mut log, &format!("data: {}", coverage(&c.data, &loader)));
        let training = TrainingRun::new(trainer, loader, settings, run_dir, log, is_master)?;
        let mut run = TrainRun {
            training,
            position,
            validation,
            is_master,
        };
        for line in [run.header(&c), run.recipe_line(&c)] {
            if is_master {
                observer.line(&line);
            }
            run.training.log.line(&line);
        }
        Ok(run)
    }

    /// Trains from the position set up (a fresh start, or where `resume` left off) to the end.
    pub fn run(
        &mut self,
        validate: Option<&mut Validate>,
        observer: &mut dyn RunObserver,
    ) -> Result<RunEnd, String> {
        let end = self.training.run(self.position, validate, observer)?;
        let line = format!(
            "done at step {}; run folder {}",
            end.step,
            self.training.run_dir.display()
        );
        if self.is_master {
            observer.line(&line);
        }
        self.training.log.line(&line);
        Ok(end)
    }

    fn header(&self, c: &RunConfig) -> String {
        let t = &self.training;
        let accum = c.settings.accum_freq.max(1);
        let world = c.world.world_size;
        let mut per = String::new();
        if accum > 1 {
            per += &format!(" × {accum} accumulated");
        }
        if world > 1 {
            per += &format!(
                " on each of {world} ranks (global batch {})",
                c.data.batch_size * accum * world
            );
        }
        let precision = match t.trainer.autocast_kind() {
            None => "fp32".to_string(),
            Some(k) if t.trainer.scaler.is_some() => format!("{k:?} autocast + gradient scaler"),
            Some(k) => format!("{k:?} autocast"),
        };
        format!(
            "run {}: model {} ({} parameters, {} trainable), {} samples, {} batches/epoch of {}{per}, {} epochs, steps {}..{}, precision {precision}",
            t.settings.name,
            c.model.name,
            group_thousands(t.trainer.model.parameter_count()),
            group_thousands(t.trainer.trainable_parameter_count()),
            t.loader.len(),
            t.steps_per_epoch(),
            c.data.batch_size,
            c.settings.epochs,
            self.position.step,
            t.stop_at(),
        )
    }

    fn recipe_line(&self, c: &RunConfig) -> String {
        let augmentation = match &c.data.augment {
            None => "off".to_string(),
            Some(aug) => format!(
                "RandomResizedCrop(scale {}–{}, ratio {:.3}–{:.3}){}",
                aug.scale.0,
                aug.scale.1,
                aug.ratio.0,
                aug.ratio.1,
                if aug.rotate_flip {
                    " + 90° rotations and flips"
                } else {
                    ""
                }
            ),
        };
        let average = match &self.training.trainer.ema {
            Some(e) => format!("decay {}", e.decay),
            None => "off".to_string(),
        };
        format!(
            "recipe {}: augmentation {augmentation}; label smoothing {}; weight average {average}",
            c.recipe, c.options.label_smoothing
        )
    }
}

/// open_clip's run name: `<unix time>-model_<m>-lr_<lr>-b_<batch>-j_<workers>-p_<precision>`.
fn default_name(c: &RunConfig) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let precision = match c.options.precision {
        TrainPrecision::Fp32 => "fp32",
        TrainPrecision::Amp => "amp",
        TrainPrecision::AmpBf16 => "amp_bf16",
    };
    format!(
        "{secs}-model_{}-lr_{}-b_{}-j_{}-p_{precision}",
        c.model.name, c.settings.lr, c.data.batch_size, c.data.workers
    )
}

/// The checkpoint to resume from: `latest` is `epoch_latest.pt`, else the highest `epoch_N.pt`.
/// Without `resume` the run folder must not exist yet.
fn resume_path(run_dir: &Path, resume: Option<&str>) -> Result<Option<PathBuf>, String> {
    let ckpt_dir = run_dir.join("checkpoints");
    match resume {
        None if run_dir.exists() => Err(format!(
            "run folder {} exists: pick another --name, or continue it with --resume latest",
            run_dir.display()
        )),
        None => Ok(None),
        Some("latest") => {
            let latest = ckpt_dir.join("epoch_latest.pt");
            if latest.exists() {
                return Ok(Some(latest));
            }
            let entries = std::fs::read_dir(&ckpt_dir).map_err(|e| {
                format!(
                    "--resume latest: no checkpoints in {}: {e}",
                    ckpt_dir.display()
                )
            })?;
            let numbered = entries.flatten().filter_map(|e| {
                let p = e.path();
                let n: usize = p
                    .file_name()?
                    .to_str()?
                    .strip_prefix("epoch_")?
                    .strip_suffix(".pt")?
                    .parse()
                    .ok()?;
                Some((n, p))
            });
            numbered
                .max_by_key(|(n, _)| *n)
                .map(|(_, p)| Some(p))
                .ok_or_else(|| format!("--resume latest: no epoch_N.pt in {}", ckpt_dir.display()))
        }
        Some(f) => Ok(Some(PathBuf::from(f))),
    }
}

/// Joins the launch's process group when it has several ranks (torchrun, srun, mpirun: open_clip's
/// `world_info_from_env`, `env://` rendezvous).
fn join_group(
    d: &DistSpec,
    world: WorldInfo,
    device: tch::Device,
) -> Result<Option<Distributed>, String> {
    // One rank joins a group only when a backend is named under a launcher (e.g. to check NCCL with
    // `torchrun --nproc_per_node 1 … --dist-backend nccl`); otherwise it trains alone, as open_clip does.
    // A backend pirclip does not speak is refused single-process too: the flag is checked at once.
    if let Some(b) = d
        .backend
        .as_deref()
        .filter(|b| !["nccl", "gloo"].contains(b))
    {
        return Err(format!(
            "--dist-backend {b}: pirclip speaks nccl (CUDA) and gloo (CPU)"
        ));
    }
    let launched_alone =
        world.world_size == 1 && d.backend.is_some() && std::env::var_os("MASTER_ADDR").is_some();
    if world.world_size <= 1 && !launched_alone {
        return Ok(None);
    }
    let backend = d
        .backend
        .as_deref()
        .unwrap_or(if device.is_cuda() { "nccl" } else { "gloo" });
    if backend == "nccl" && !device.is_cuda() {
        return Err("--dist-backend nccl reduces GPU tensors: add --device cuda (each rank takes cuda:LOCAL_RANK), or use gloo on CPU".into());
    }
    if d.url != "env://" {
        return Err(format!("--dist-url {}: pirclip rendezvous through env:// (MASTER_ADDR, MASTER_PORT), as torchrun and open_clip's srun setup provide", d.url));
    }
    let (addr, port, is_server) = pirclip_dist::rendezvous_from_env(world.rank)?;
    let rendezvous = Rendezvous {
        host: &addr,
        port,
        rank: world.rank,
        world_size: world.world_size,
        is_server,
        timeout_s: d.timeout_s,
    };
    let group = match (backend, device) {
        ("nccl", tch::Device::Cuda(i)) => ProcessGroup::nccl(&rendezvous, i),
        _ => ProcessGroup::gloo(&rendezvous),
    }?;
    Ok(Some(Distributed {
        group,
        local_loss: d.local_loss,
        gather_with_grad: d.gather_with_grad,
        reducer: None,
    }))
}

fn is_csv_name(name: &str) -> bool {
    name.ends_with(".csv") || name.ends_with(".tsv")
}

/// Samples, the shard of each sample when the data are shards, and the shard members left out for
/// lacking an image or a caption.
fn load_samples(d: &DataSpec) -> Result<(Vec<Sample>, Option<Vec<usize>>, usize), String> {
    let is_csv = match d.dataset_type {
        DatasetType::Csv => true,
        DatasetType::Webdataset => false,
        DatasetType::Auto => is_csv_name(&d.train_data),
    };
    if is_csv {
        let path = Path::new(&d.train_data);
        let base = d
            .images_dir
            .clone()
            .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
        return Ok((csv_samples(path, &base, d)?, None, 0));
    }
    if d.train_data.ends_with(".json") && d.dataset_type != DatasetType::Webdataset {
        let images = d
            .images_dir
            .as_ref()
            .ok_or("--images-dir is needed with a JSON --train-data")?;
        let ds = Dataset::load_with(Path::new(&d.train_data), d.allow_absolute_paths)
            .map_err(|e| format!("{e:#}"))?;
        let splits: Vec<&str> = d.train_split.split(',').map(str::trim).collect();
        return Ok((samples_from_karpathy(&ds, &splits, images), None, 0));
    }
    let paths: Vec<PathBuf> = pirclip_data::shards::expand_braces(&d.train_data)
        .map_err(|e| format!("{e:#}"))?
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let (samples, shard_of, skipped) =
        pirclip_data::shards::read_shards_indexed(&paths).map_err(|e| format!("{e:#}"))?;
    Ok((samples, Some(shard_of), skipped))
}

/// A CSV's samples with the data's columns, separator and path rule; image paths relative to `base`.
fn csv_samples(path: &Path, base: &Path, d: &DataSpec) -> Result<Vec<Sample>, String> {
    samples_from_csv(
        path,
        &d.csv.image_key,
        &d.csv.caption_key,
        d.csv.separator,
        base,
        d.allow_absolute_paths,
    )
}

fn validation_set(v: &ValidationSpec, d: &DataSpec) -> Result<(RetrievalSet, PathBuf), String> {
    match v {
        ValidationSpec::Json {
            path,
            images_dir,
            split,
        } => {
            let ds =
                Dataset::load_with(path, d.allow_absolute_paths).map_err(|e| format!("{e:#}"))?;
            Ok((
                RetrievalSet::build(&ds, &[split.as_str()]),
                images_dir.clone(),
            ))
        }
        // open_clip's CSV validation: the CSV's own image paths (relative to its folder) and captions.
        ValidationSpec::Csv { path } => {
            let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let samples = csv_samples(path, &base, d)?;
            let paths: Vec<String> = samples
                .iter()
                .map(|s| match &s.image {
                    ImageSource::File(p) => p.display().to_string(),
                    ImageSource::TarMember { path, .. } => path.display().to_string(),
                })
                .collect();
            let pairs: Vec<(&str, String)> = paths
                .iter()
                .zip(&samples)
                .map(|(p, s)| (p.as_str(), s.caption.clone()))
                .collect();
            Ok((RetrievalSet::from_pairs(&pairs), PathBuf::new()))
        }
    }
}

/// The run's loader, and how many shard members were left out.
fn loader(c: &RunConfig) -> Result<(TrainLoader, usize), String> {
    let d = &c.data;
    let (samples, shard_of, skipped) = load_samples(d)?;
    if d.one_caption_per_image && shard_of.is_some() {
        return Err("--one-caption-per-image is for JSON and CSV data: webdataset shards hold one caption per sample".into());
    }
    let shard_order = match (d.dataset_resampled, shard_of) {
        (true, None) => {
            return Err("--dataset-resampled needs webdataset shards as --train-data".into())
        }
        (_, None) => None,
        (resampled, Some(shard_of)) => {
            let resampled = if resampled {
                let paths: Vec<PathBuf> = pirclip_data::shards::expand_braces(&d.train_data)
                    .map_err(|e| format!("{e:#}"))?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect();
                Some(
                    d.train_num_samples
                        .or_else(|| pirclip_data::shards::sizes_json_total(&paths))
                        .unwrap_or(samples.len()),
                )
            } else {
                None
            };
            Some(ShardOrder {
                shard_of,
                resampled,
                buffer: d.shuffle_buffer,
            })
        }
    };
    let resampled = matches!(&shard_order, Some(o) if o.resampled.is_some());
    let mut loader = TrainLoader::new(
        samples,
        LoaderConfig {
            image_size: c.model.image_size,
            batch_size: d.batch_size,
            seed: c.seed,
            shuffle: d.shuffle,
            augment: d.augment,
            one_caption_per_image: d.one_caption_per_image,
            workers: d.workers,
            context_length: c.model.text.context_length,
            tokenizer: c.model.tokenizer(),
            rank: c.world.rank,
            world: c.world.world_size,
        },
    );
    if let Some(order) = shard_order {
        loader = loader.with_shards(order);
    }
    if let (Some(n), false) = (d.train_num_samples, resampled) {
        // open_clip: the epoch length, not a cut of the data. Every sample stays in the pool.
        loader = loader.with_epoch_samples(n);
    }
    if loader.samples_per_epoch() < d.batch_size {
        return Err(format!(
            "an epoch of {} samples is less than one batch of {}",
            loader.samples_per_epoch(),
            d.batch_size
        ));
    }
    Ok((loader, skipped))
}

/// What an epoch covers, in words.
fn coverage(d: &DataSpec, loader: &TrainLoader) -> String {
    let (pool, pass, per_epoch) = (loader.len(), loader.pass_len(), loader.samples_per_epoch());
    let pass_is = if d.one_caption_per_image {
        format!("a pass is one caption, drawn anew each pass, of each of {pass} images ({pool} captions)")
    } else {
        format!("a pass is all {pool} samples")
    };
    if d.dataset_resampled {
        format!("an epoch draws {per_epoch} samples from shards chosen with replacement (pool of {pool})")
    } else if per_epoch == pass {
        format!("an epoch is one pass; {pass_is}")
    } else {
        format!(
            "an epoch is {per_epoch} samples ({:.2} passes) of a stream of reshuffled passes; {pass_is}; no sample is left out",
            per_epoch as f64 / pass as f64
        )
    }
}
