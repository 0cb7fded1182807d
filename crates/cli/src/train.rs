use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_data::train::{samples_from_karpathy, LoaderConfig, Sample, ShardOrder, TrainLoader};
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::dist::ProcessGroup;
use pirclip_model::{ClipModel, EncodeOptions, ModelConfig};
use pirclip_train::checkpoint::{self, Position};
use pirclip_train::distributed::Distributed;
use pirclip_train::tensorboard::EventWriter;
use pirclip_train::{
    labels_from_names, labels_from_strings, learning_rate, optim::Foreach, AdamWConfig, Schedule,
    TrainOptions, TrainPrecision, Trainer,
};

use crate::common::{parse_device, BeliefModeArg};

#[derive(Debug, Clone, Copy, ValueEnum)]
#[clap(rename_all = "kebab-case")]
enum LrScheduler {
    Cosine,
    Const,
    ConstCooldown,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LabelSource {
    /// Official rule: file-name prefix before the first `_`, numbered per batch.
    Filename,
    /// The JSON's `label` field (needed for RSICD's numeric file names).
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ForeachArg {
    /// Multi-tensor kernels on CUDA, per tensor on the CPU (PyTorch's default).
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[clap(rename_all = "snake_case")]
enum Precision {
    Fp32,
    Amp,
    #[value(alias = "amp_bfloat16")]
    AmpBf16,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum DatasetType {
    /// By the --train-data name: .csv/.tsv is CSV, .json a Karpathy JSON, anything else shards.
    Auto,
    Webdataset,
    Csv,
}

/// open_clip `training.main` flags that pirclip does not implement, with what to do instead. Named in the
/// error rather than left to the argument parser's "unexpected argument".
const UNSUPPORTED_OPEN_CLIP_FLAGS: &[(&str, &str)] = &[
    ("--imagenet-val", "pirclip has no ImageNet zero-shot evaluation; PIR-CLIP validates retrieval with --val-data"),
    ("--imagenet-v2", "pirclip has no ImageNet zero-shot evaluation; PIR-CLIP validates retrieval with --val-data"),
    ("--train-data-upsampling-factors", "per-source shard upsampling is not implemented"),
    ("--val-num-samples", "validation uses the whole --val-data set"),
    ("--grad-checkpointing", "activation checkpointing is not implemented; lower --batch-size and raise --accum-freq to save memory"),
    ("--horovod", "launch with torchrun or srun instead"),
    ("--no-set-device-rank", "each rank uses cuda:LOCAL_RANK"),
    ("--torchscript", "pirclip runs its own engine; there is nothing to script"),
    ("--trace", "pirclip runs its own engine; there is nothing to trace"),
    ("--force-quick-gelu", "use a -quickgelu preset (e.g. ViT-B-32-quickgelu) or a JSON config"),
    ("--force-custom-text", "pass a JSON config with --model"),
    ("--force-patch-dropout", "patch dropout is not implemented"),
    ("--force-image-size", "pass a JSON config with --model"),
    ("--pretrained-image", "pass full weights with --pretrained"),
    ("--lock-image", "only --lock-text and --lock-instruction are implemented"),
    ("--lock-image-unlocked-groups", "only --lock-text and --lock-instruction are implemented"),
    ("--lock-image-freeze-bn-stats", "only --lock-text and --lock-instruction are implemented"),
    ("--lock-text-unlocked-layers", "--lock-text freezes the whole text tower"),
    ("--lock-text-freeze-layer-norm", "--lock-text freezes the whole text tower"),
    ("--image-mean", "the CLIP normalisation is fixed"),
    ("--image-std", "the CLIP normalisation is fixed"),
    ("--image-interpolation", "resizing is Pillow-exact bicubic"),
    ("--image-resize-mode", "resizing is the shortest side then a centre crop, as open_clip's default"),
    ("--aug-cfg", "augmentation is RandomResizedCrop(scale 0.9–1), as PIR-CLIP's"),
    ("--skip-scheduler", "use --lr-scheduler const"),
    ("--lr-cooldown-power", "the cool-down is linear (power 1)"),
    ("--delete-previous-checkpoint", "checkpoints are kept"),
    ("--remote-sync", "copy the run folder with your own tools"),
    ("--remote-sync-frequency", "copy the run folder with your own tools"),
    ("--remote-sync-protocol", "copy the run folder with your own tools"),
    ("--copy-codebase", "there is no Python code base to copy"),
    ("--wandb-notes", "only TensorBoard is written (--report-to tensorboard)"),
    ("--wandb-project-name", "only TensorBoard is written (--report-to tensorboard)"),
    ("--distill", "distillation is not adapted to PIR-CLIP (nor in the official code)"),
    ("--distill-model", "distillation is not adapted to PIR-CLIP (nor in the official code)"),
    ("--distill-pretrained", "distillation is not adapted to PIR-CLIP (nor in the official code)"),
    ("--siglip", "the SigLIP loss is not adapted to PIR-CLIP (nor in the official code)"),
    ("--coca-contrastive-loss-weight", "CoCa models are not supported"),
    ("--coca-caption-loss-weight", "CoCa models are not supported"),
    ("--use-bnb-linear", "bitsandbytes layers are not supported"),
    ("--debug", "there is no debug mode"),
];

/// open_clip precision values pirclip does not implement (pure half-precision weights).
const UNSUPPORTED_PRECISIONS: &[&str] = &["fp16", "bf16", "pure_fp16", "pure_bf16"];

/// Fails with a message naming an open_clip flag (or precision) that pirclip does not implement. Runs on
/// the raw arguments of `pirclip train`, before the parser, so the user reads why instead of clap's
/// generic "unexpected argument".
pub fn reject_unsupported_open_clip_flags(args: &[String]) -> Result<()> {
    for (i, arg) in args.iter().enumerate() {
        let flag = arg.split('=').next().unwrap_or(arg);
        let flag_dashes = flag.replace('_', "-");
        if let Some((name, why)) = UNSUPPORTED_OPEN_CLIP_FLAGS
            .iter()
            .find(|(n, _)| *n == flag_dashes)
        {
            bail!("open_clip's {name} is not implemented by pirclip: {why}");
        }
        if flag == "--precision" {
            let value = arg
                .split_once('=')
                .map(|(_, v)| v)
                .or(args.get(i + 1).map(String::as_str));
            if let Some(v) = value.filter(|v| UNSUPPORTED_PRECISIONS.contains(v)) {
                bail!(
                    "open_clip's --precision {v} (half-precision weights) is not implemented by pirclip: \
                     use amp or amp_bf16 (half-precision compute, fp32 weights)"
                );
            }
        }
    }
    Ok(())
}

/// Train or fine-tune with open_clip's recipe plus PIR-CLIP's affiliation loss. Run folder:
/// <logs>/<name>/{out.log, params.txt, checkpoints/, tensorboard/}; checkpoints are PyTorch-readable
/// (epoch_N.pt in open_clip's layout) with a .safetensors copy of the weights.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset or open_clip JSON config.
    #[arg(long, default_value = "PIR")]
    model: String,
    /// Start from these weights; keys that match are loaded, the rest is randomly initialised (reported).
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Training data: a Karpathy JSON (with --images-dir) or webdataset shards (`dir/shard-{000000..000007}.tar`).
    #[arg(long)]
    train_data: String,
    /// Images folder for a JSON --train-data.
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Accept absolute image paths in the dataset file (by default names must stay inside the images
    /// folder: absolute names and `..` are refused).
    #[arg(long)]
    allow_absolute_paths: bool,

    /// Splits of a JSON --train-data, comma separated.
    #[arg(long, default_value = "train")]
    train_split: String,
    /// Samples per epoch (default: all samples; with --dataset-resampled the shards' sizes.json total).
    #[arg(long)]
    train_num_samples: Option<usize>,
    /// Draw each epoch's shards with replacement (open_clip --dataset-resampled).
    #[arg(long)]
    dataset_resampled: bool,
    /// Shards: samples stream from disk through a shuffle buffer of this many samples (webdataset
    /// `shuffle(n)`, open_clip's 5000); shards themselves are shuffled every epoch.
    #[arg(long, default_value_t = 5000)]
    shuffle_buffer: usize,
    /// CSV --train-data: image path column (relative paths are taken against --images-dir or the CSV's folder).
    #[arg(long, default_value = "filepath")]
    csv_img_key: String,
    /// CSV --train-data: caption column.
    #[arg(long, default_value = "title")]
    csv_caption_key: String,
    /// CSV --train-data: field separator.
    #[arg(long, default_value = "\t")]
    csv_separator: String,
    /// Samples per micro-batch (per forward pass).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Accumulate this many micro-batches per optimizer step (open_clip --accum-freq): the contrastive
    /// loss sees batch-size × accum-freq samples while memory holds one micro-batch's activations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    accum_freq: u32,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.2)]
    wd: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Warm-up steps (linear from lr/warmup to lr).
    #[arg(long, default_value_t = 10000)]
    warmup: i64,
    #[arg(long, value_enum, default_value_t = LrScheduler::Cosine)]
    lr_scheduler: LrScheduler,
    /// const-cooldown: epochs of cool-down at the end.
    #[arg(long, default_value_t = 0)]
    epochs_cooldown: usize,
    /// const-cooldown: final learning rate.
    #[arg(long, default_value_t = 0.0)]
    lr_cooldown_end: f64,
    /// Clip the global gradient norm.
    #[arg(long)]
    grad_clip_norm: Option<f64>,
    /// AdamW's arithmetic as one kernel per operation over all tensors (on) or one per tensor (off);
    /// PyTorch's `foreach`. Same update either way, far fewer GPU launches with on.
    #[arg(long, value_enum, default_value_t = ForeachArg::Auto)]
    foreach: ForeachArg,
    /// Add the cluster-wise affiliation loss (PIR-CLIP's --is_aff_loss).
    #[arg(long, alias = "is_aff_loss")]
    aff_loss: bool,
    #[arg(long, value_enum, default_value_t = LabelSource::Filename)]
    label_source: LabelSource,
    /// Freeze the instruction encoder (res_visual + vision_proj_res, BatchNorm in eval mode).
    #[arg(long)]
    lock_instruction: bool,
    /// Freeze the text tower (not the Temporal-PAE on top of it: see --lock-temporal-pae).
    #[arg(long)]
    lock_text: bool,
    /// Freeze the hard-filter Spatial-PAE (`vision_cfg.vir = "hard"`).
    #[arg(long)]
    lock_spatial_pae: bool,
    /// Freeze the Temporal-PAE / LCA (`text_cfg.lca`).
    #[arg(long)]
    lock_temporal_pae: bool,
    #[arg(long, value_enum, default_value_t = BeliefModeArg::BeliefPlusIndex)]
    belief_mode: BeliefModeArg,
    /// fp32; amp = autocast to fp16 with a gradient scaler on CUDA, to bf16 on CPU (PyTorch's CPU
    /// autocast type; fast only on CPUs with AVX-512 BF16 / AMX); amp_bf16 = bf16 autocast everywhere.
    /// Weights, optimizer state and updates stay fp32.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Threads for the tensor engine (default: libtorch's choice, one per core).
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long, default_value = "./logs")]
    logs: PathBuf,
    /// Run name (default: date-model-lr-batch).
    #[arg(long)]
    name: Option<String>,
    /// Save every N epochs (and always at the end).
    #[arg(long, default_value_t = 1)]
    save_frequency: usize,
    /// Also keep checkpoints/epoch_latest.pt up to date.
    #[arg(long)]
    save_most_recent: bool,
    /// Resume: `latest` (this run's newest checkpoint) or a checkpoint file.
    #[arg(long)]
    resume: Option<String>,
    #[arg(long, default_value_t = 100)]
    log_every_n_steps: usize,
    /// Stop after this many optimizer steps in total (a checkpoint is written; resume continues exactly).
    #[arg(long)]
    max_steps: Option<i64>,
    /// Train on the eval transform (no RandomResizedCrop).
    #[arg(long)]
    no_augment: bool,
    /// Samples in order, every epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// Validation JSON (Karpathy) for the retrieval metric during training.
    #[arg(long)]
    val_data: Option<PathBuf>,
    #[arg(long)]
    val_images_dir: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    val_split: String,
    /// Validate every N epochs.
    #[arg(long, default_value_t = 1)]
    val_frequency: usize,

    /// open_clip's data switch: webdataset shards, a CSV, or auto (by the --train-data name).
    #[arg(long, value_enum, default_value_t = DatasetType::Auto)]
    dataset_type: DatasetType,
    /// Where training scalars go. TensorBoard event files are always written (`tensorboard/`); the flag
    /// is accepted so open_clip command lines run, and anything but `tensorboard` is refused.
    #[arg(long, default_value = "tensorboard")]
    report_to: String,
    /// open_clip's ImageNet zero-shot cadence; PIR-CLIP has no ImageNet evaluation, so it has nothing to
    /// schedule (retrieval validation follows --val-frequency).
    #[arg(long, default_value_t = 2)]
    zeroshot_frequency: usize,
    /// Distributed runs: each rank's loss over its own rows against all ranks' features (open_clip).
    #[arg(long)]
    local_loss: bool,
    /// Distributed runs: gather features with their gradients (open_clip).
    #[arg(long)]
    gather_with_grad: bool,
    /// Distributed runs: BatchNorm statistics synchronised across ranks (SyncBatchNorm).
    #[arg(long)]
    use_bn_sync: bool,
    /// Distributed runs: rendezvous (`env://`: MASTER_ADDR / MASTER_PORT, as torchrun sets them).
    #[arg(long, default_value = "env://")]
    dist_url: String,
    /// Distributed runs: nccl (CUDA) or gloo (CPU); default as open_clip: nccl on CUDA, gloo on CPU.
    #[arg(long)]
    dist_backend: Option<String>,
    /// Distributed runs: a performance hint for PyTorch's DDP; nothing to do here.
    #[arg(long)]
    ddp_static_graph: bool,
    /// Distributed runs: seconds a collective may wait for the other ranks before the run stops with an
    /// error (a rank that died never hangs the others forever; PyTorch's default, 30 min).
    #[arg(long, default_value_t = 1800)]
    dist_timeout: u64,
    /// Passed by `torch.distributed.launch`; the rank is read from the environment as open_clip does.
    #[arg(long, alias = "local_rank", hide = true)]
    local_rank: Option<usize>,
}

/// `out.log`; other ranks than 0 of a distributed run have none (open_clip logs on the master only).
struct Log(Option<std::fs::File>);

impl Log {
    fn line(&mut self, s: &str) {
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{s}");
            let _ = f.flush();
        }
    }
}

/// Samples, and the shard of each sample when the data are shards.
fn is_csv_name(name: &str) -> bool {
    name.ends_with(".csv") || name.ends_with(".tsv")
}

fn csv_separator(flag: &str) -> Result<char> {
    match flag {
        "\\t" | "\t" => Ok('\t'),
        s if s.chars().count() == 1 => Ok(s.chars().next().unwrap()),
        s => bail!("--csv-separator must be one character, got {s:?}"),
    }
}

fn load_samples(a: &Args) -> Result<(Vec<Sample>, Option<Vec<usize>>)> {
    let by_name_csv = is_csv_name(&a.train_data);
    let is_csv = match a.dataset_type {
        DatasetType::Csv => true,
        DatasetType::Webdataset => false,
        DatasetType::Auto => by_name_csv,
    };
    if is_csv {
        let path = Path::new(&a.train_data);
        let base = a
            .images_dir
            .clone()
            .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
        let sep = csv_separator(&a.csv_separator)?;
        let samples = pirclip_data::train::samples_from_csv(
            path,
            &a.csv_img_key,
            &a.csv_caption_key,
            sep,
            &base,
            a.allow_absolute_paths,
        )
        .map_err(anyhow::Error::msg)?;
        return Ok((samples, None));
    }
    if a.train_data.ends_with(".json") && a.dataset_type != DatasetType::Webdataset {
        let images = a
            .images_dir
            .as_ref()
            .context("--images-dir is needed with a JSON --train-data")?;
        let ds = Dataset::load_with(Path::new(&a.train_data), a.allow_absolute_paths)?;
        let splits: Vec<&str> = a.train_split.split(',').map(str::trim).collect();
        Ok((samples_from_karpathy(&ds, &splits, images), None))
    } else {
        let paths: Vec<PathBuf> = pirclip_data::shards::expand_braces(&a.train_data)?
            .into_iter()
            .map(PathBuf::from)
            .collect();
        let (samples, shard_of, skipped) = pirclip_data::shards::read_shards_indexed(&paths)?;
        if skipped > 0 {
            eprintln!("shards: skipped {skipped} samples lacking an image or a caption");
        }
        Ok((samples, Some(shard_of)))
    }
}

/// Joins the launch's process group when it has several ranks (torchrun, srun, mpirun: open_clip's
/// `world_info_from_env`, `env://` rendezvous).
fn join_group(
    a: &Args,
    world: pirclip_model::dist::WorldInfo,
    device: tch::Device,
) -> Result<Option<Distributed>> {
    if world.world_size <= 1 {
        return Ok(None);
    }
    if device.is_cuda() || a.dist_backend.as_deref() == Some("nccl") {
        bail!("distributed training on CUDA needs the NCCL backend, which this pirclip does not have yet: train on CPU ranks with gloo, or on one GPU");
    }
    if a.accum_freq > 1 {
        bail!("--accum-freq with several ranks is not implemented yet: raise the number of ranks or the batch size instead");
    }
    if a.dist_url != "env://" {
        bail!("--dist-url {}: pirclip rendezvous through env:// (MASTER_ADDR, MASTER_PORT), as torchrun and open_clip's srun setup provide", a.dist_url);
    }
    let (addr, port, is_server) =
        pirclip_model::dist::rendezvous_from_env(world.rank).map_err(anyhow::Error::msg)?;
    let group = ProcessGroup::gloo(
        &addr,
        port,
        world.rank,
        world.world_size,
        is_server,
        a.dist_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Some(Distributed {
        group,
        local_loss: a.local_loss,
        gather_with_grad: a.gather_with_grad,
    }))
}

pub fn run(a: Args) -> Result<()> {
    for target in a
        .report_to
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if target != "tensorboard" {
            bail!("--report-to {target} is not supported by pirclip (it works offline): TensorBoard event files are written to <logs>/<name>/tensorboard");
        }
    }
    if let Some(b) = a
        .dist_backend
        .as_deref()
        .filter(|b| !["nccl", "gloo"].contains(b))
    {
        bail!("--dist-backend {b}: pirclip speaks nccl (CUDA) and gloo (CPU)");
    }
    let world = pirclip_model::dist::world_info_from_env();
    let is_master = world.rank == 0;
    let device = parse_device(&a.device)?;
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let config = ModelConfig::from_name_or_path(&a.model)?;
    let name = a.name.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        format!(
            "{secs}-model_{}-lr_{}-b_{}-j_{}-p_{}",
            config.name,
            a.lr,
            a.batch_size,
            a.workers,
            crate::common::flag_name(&a.precision)
        )
    });
    let run_dir = a.logs.join(&name);
    let ckpt_dir = run_dir.join("checkpoints");
    let resume_path = match a.resume.as_deref() {
        None => {
            if run_dir.exists() {
                bail!("run folder {} exists: pick another --name, or continue it with --resume latest", run_dir.display());
            }
            None
        }
        Some("latest") => {
            let latest = ckpt_dir.join("epoch_latest.pt");
            if latest.exists() {
                Some(latest)
            } else {
                let mut best: Option<(usize, PathBuf)> = None;
                for e in std::fs::read_dir(&ckpt_dir).with_context(|| {
                    format!("--resume latest: no checkpoints in {}", ckpt_dir.display())
                })? {
                    let p = e?.path();
                    let n = p
                        .file_name()
                        .and_then(|f| f.to_str())
                        .and_then(|f| f.strip_prefix("epoch_"))
                        .and_then(|f| f.strip_suffix(".pt"))
                        .and_then(|f| f.parse().ok());
                    if let Some(n) = n {
                        if best.as_ref().map(|(b, _)| n > *b).unwrap_or(true) {
                            best = Some((n, p));
                        }
                    }
                }
                Some(
                    best.context(format!(
                        "--resume latest: no epoch_N.pt in {}",
                        ckpt_dir.display()
                    ))?
                    .1,
                )
            }
        }
        Some(f) => Some(PathBuf::from(f)),
    };
    // Every rank checked the run folder above; only now, once all have joined, does rank 0 create it.
    let dist = join_group(&a, world, device)?;
    let mut log = Log(None);
    if is_master {
        std::fs::create_dir_all(&ckpt_dir)?;
        log = Log(Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("out.log"))?,
        ));
        std::fs::write(run_dir.join("params.txt"), format!("{a:#?}\n"))?;
    }

    if a.lock_spatial_pae
        && !config
            .instruction
            .as_ref()
            .is_some_and(|i| i.hard_vir.is_some())
    {
        bail!("--lock-spatial-pae: model {} has no hard-filter Spatial-PAE (vision_cfg.vir = \"hard\")", a.model);
    }
    if a.lock_temporal_pae && config.text.lca.is_none() {
        bail!(
            "--lock-temporal-pae: model {} has no Temporal-PAE (text_cfg.lca)",
            a.model
        );
    }
    let model = ClipModel::new(&config, device);
    pirclip_model::init::initialize(model.registry(), a.seed as i64);
    if let Some(p) = &a.pretrained {
        let ck = pirclip_checkpoint::load(p)?;
        let report = pirclip_model::params::load_state_dict(model.registry(), &ck.state_dict);
        let msg = format!(
            "pretrained {}: loaded {} tensors; randomly initialised:{}",
            p.display(),
            report.loaded.len(),
            if report.is_clean() {
                " none".to_string()
            } else {
                report.describe()
            }
        );
        say(is_master, &msg);
        log.line(&msg);
    }
    let options = TrainOptions {
        affiliation_loss: a.aff_loss,
        belief_mode: match a.belief_mode {
            BeliefModeArg::BeliefPlusIndex => pirclip_model::BeliefMode::BeliefPlusIndex,
            BeliefModeArg::BeliefOnly => pirclip_model::BeliefMode::BeliefOnly,
        },
        lock_instruction: a.lock_instruction,
        lock_text: a.lock_text,
        sync_batchnorm: a.use_bn_sync,
        lock_spatial_pae: a.lock_spatial_pae,
        lock_temporal_pae: a.lock_temporal_pae,
        grad_clip_norm: a.grad_clip_norm,
        precision: match a.precision {
            Precision::Fp32 => TrainPrecision::Fp32,
            Precision::Amp => TrainPrecision::Amp,
            Precision::AmpBf16 => TrainPrecision::AmpBf16,
        },
    };
    let mut trainer = Trainer::new(
        model,
        AdamWConfig {
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.wd,
        },
        options,
    );
    trainer.optimizer.foreach = match a.foreach {
        ForeachArg::Auto => Foreach::Auto,
        ForeachArg::On => Foreach::On,
        ForeachArg::Off => Foreach::Off,
    };
    let mut pos = Position::default();
    if let Some(p) = &resume_path {
        pos = checkpoint::resume(p, &mut trainer).map_err(anyhow::Error::msg)?;
        let msg = format!(
            "resumed from {} at epoch {}, batch {}, step {}",
            p.display(),
            pos.epoch,
            pos.batch_in_epoch,
            pos.step
        );
        say(is_master, &msg);
        log.line(&msg);
    }

    if let Some(d) = dist {
        // DDP's start: every rank holds rank 0's weights and buffers.
        d.broadcast_model(&trainer.model)
            .map_err(anyhow::Error::msg)?;
        trainer.dist = Some(d);
    }

    let validation = match (&a.val_data, &a.val_images_dir) {
        (Some(json), Some(images)) => Some((
            RetrievalSet::build(
                &Dataset::load_with(json, a.allow_absolute_paths)?,
                &[a.val_split.as_str()],
            ),
            images.clone(),
        )),
        // open_clip's CSV validation: the CSV's own image paths (relative to its folder) and captions.
        (Some(csv), None) if is_csv_name(&csv.to_string_lossy()) => {
            let base = csv.parent().unwrap_or(Path::new(".")).to_path_buf();
            let samples = pirclip_data::train::samples_from_csv(
                csv,
                &a.csv_img_key,
                &a.csv_caption_key,
                csv_separator(&a.csv_separator)?,
                &base,
                a.allow_absolute_paths,
            )
            .map_err(anyhow::Error::msg)?;
            let paths: Vec<String> = samples
                .iter()
                .map(|s| match &s.image {
                    pirclip_data::train::ImageSource::File(p) => p.display().to_string(),
                    pirclip_data::train::ImageSource::TarMember { .. } => {
                        unreachable!("CSV samples are files")
                    }
                })
                .collect();
            let pairs: Vec<(&str, String)> = paths
                .iter()
                .zip(&samples)
                .map(|(p, s)| (p.as_str(), s.caption.clone()))
                .collect();
            Some((RetrievalSet::from_pairs(&pairs), PathBuf::new()))
        }
        (None, None) => None,
        _ => bail!(
            "--val-data needs --val-images-dir, unless it is a CSV (open_clip's --val-data=...csv)"
        ),
    };
    let (samples, shard_of) = load_samples(&a)?;
    let shard_order = match (a.dataset_resampled, shard_of) {
        (true, None) => bail!("--dataset-resampled needs webdataset shards as --train-data"),
        (_, None) => None,
        (resampled, Some(shard_of)) => {
            let resampled = if resampled {
                let paths: Vec<PathBuf> = pirclip_data::shards::expand_braces(&a.train_data)?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect();
                Some(
                    a.train_num_samples
                        .or_else(|| pirclip_data::shards::sizes_json_total(&paths))
                        .unwrap_or(samples.len()),
                )
            } else {
                None
            };
            Some(ShardOrder {
                shard_of,
                resampled,
                buffer: a.shuffle_buffer,
            })
        }
    };
    let mut loader = TrainLoader::new(
        samples,
        LoaderConfig {
            image_size: config.image_size,
            batch_size: a.batch_size,
            seed: a.seed,
            shuffle: !a.no_shuffle,
            augment: !a.no_augment,
            workers: a.workers,
            context_length: config.text.context_length,
            rank: world.rank,
            world: world.world_size,
        },
    );
    let resampled = matches!(
        &shard_order,
        Some(ShardOrder {
            resampled: Some(_),
            ..
        })
    );
    if let Some(order) = shard_order {
        loader = loader.with_shards(order);
    }
    if let (Some(n), false) = (a.train_num_samples, resampled) {
        // open_clip: the epoch length, not a cut of the data. Every sample stays in the pool.
        loader = loader.with_epoch_samples(n);
    }
    if loader.samples_per_epoch() < a.batch_size {
        bail!(
            "an epoch of {} samples is less than one batch of {}",
            loader.samples_per_epoch(),
            a.batch_size
        );
    }
    let pool = loader.len();
    let per_pass = loader.samples_per_epoch();
    let coverage = if resampled {
        format!("an epoch draws {per_pass} samples from shards chosen with replacement (pool of {pool})")
    } else if per_pass == pool {
        format!("an epoch is one pass over all {pool} samples")
    } else {
        format!(
            "an epoch is {per_pass} samples ({:.2} passes) of a stream of reshuffled passes over all {pool}; no sample is left out",
            per_pass as f64 / pool as f64
        )
    };
    say(is_master, &format!("data: {coverage}"));
    log.line(&format!("data: {coverage}"));
    let accum = a.accum_freq as usize;
    // Optimizer steps per epoch; micro-batches that cannot fill a last step are dropped, as in open_clip.
    let per_epoch = loader.batches_per_epoch() / accum;
    if per_epoch == 0 {
        bail!(
            "{} samples make {} batches of {}: fewer than one step of --accum-freq {accum}",
            loader.len(),
            loader.batches_per_epoch(),
            a.batch_size
        );
    }
    let total_steps = (per_epoch * a.epochs) as i64;
    let stop_at = a
        .max_steps
        .map(|m| m.min(total_steps))
        .unwrap_or(total_steps);
    let schedule = match a.lr_scheduler {
        LrScheduler::Cosine => Schedule::Cosine,
        LrScheduler::Const => Schedule::Const,
        LrScheduler::ConstCooldown => Schedule::ConstCooldown {
            cooldown_steps: (per_epoch * a.epochs_cooldown) as i64,
            end_lr: a.lr_cooldown_end,
        },
    };
    if let Some(kind) = trainer.autocast_kind() {
        crate::common::warn_slow_half_precision(device, kind);
    }
    let header = format!(
        "run {name}: model {} ({} parameters, {} trainable), {} samples, {} batches/epoch of {}{}, {} epochs, steps {}..{}, precision {}",
        config.name,
        crate::inspect::group_thousands(trainer.model.parameter_count()),
        crate::inspect::group_thousands(trainer.trainable_parameter_count()),
        loader.len(),
        per_epoch,
        a.batch_size,
        if accum > 1 { format!(" × {accum} accumulated") } else { String::new() }
            + &if world.world_size > 1 {
                format!(" on each of {} ranks (global batch {})", world.world_size, a.batch_size * world.world_size)
            } else {
                String::new()
            },
        a.epochs,
        pos.step,
        stop_at,
        match trainer.autocast_kind() {
            None => "fp32".to_string(),
            Some(k) => format!(
                "{k:?} autocast{}",
                if trainer.scaler.is_some() { " + gradient scaler" } else { "" }
            ),
        }
    );
    say(is_master, &header);
    log.line(&header);
    let mut tb = if is_master {
        Some(EventWriter::create(&run_dir.join("tensorboard"))?)
    } else {
        None
    };
    let pb = if is_master {
        crate::common::progress(stop_at as u64, "steps")
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>6} [{bar:25}] {pos}/{len} {msg} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb.set_position(pos.step as u64);
    let mut lr = a.lr;
    let mut skipped_total = 0usize;
    let mut step = pos.step;
    'epochs: for epoch in pos.epoch..a.epochs {
        let start = if epoch == pos.epoch {
            pos.batch_in_epoch
        } else {
            0
        };
        let mut t_data = Instant::now();
        let mut pending = Vec::with_capacity(accum);
        for batch in loader.stream(epoch, start) {
            let batch = batch.map_err(|e| {
                let msg =
                    format!("training data: {e}; {skipped_total} samples skipped before this");
                log.line(&msg);
                anyhow::anyhow!(msg)
            })?;
            if step >= stop_at {
                break 'epochs;
            }
            if batch.index >= per_epoch * accum {
                break; // micro-batches left over after the epoch's last full step
            }
            if !batch.skipped.is_empty() {
                skipped_total += batch.skipped.len();
                log.line(&format!(
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
            let names: Vec<String> = batches.iter().flat_map(|b| b.names.clone()).collect();
            let n = names.len();
            let labels = match a.label_source {
                LabelSource::Filename => labels_from_names(&names),
                LabelSource::Json => labels_from_strings(
                    &batches
                        .iter()
                        .flat_map(|b| b.labels.iter().zip(&b.names))
                        .map(|(l, n)| l.clone().unwrap_or_else(|| n.clone()))
                        .collect::<Vec<_>>(),
                ),
            };
            let micro: Vec<(tch::Tensor, tch::Tensor)> = batches
                .iter()
                .map(|b| {
                    let m = b.names.len();
                    (
                        images_tensor(&b.pixels, m, config.image_size, device),
                        ids_tensor(&b.ids, m, device),
                    )
                })
                .collect();
            let batch_index = batches.last().map(|b| b.index).unwrap_or(0);
            lr = learning_rate(schedule, a.lr, a.warmup, total_steps, step);
            let s = if trainer.dist.is_some() {
                let (images, ids) = &micro[0];
                trainer
                    .try_step_distributed(images, ids, &labels, lr)
                    .map_err(|e| anyhow::anyhow!("step {}: {e}", step + 1))?
            } else {
                trainer.step_accumulated(&micro, &labels, lr)
            };
            step += 1;
            let batch_time = t_batch.elapsed().as_secs_f64() + data_time;
            let sps = n as f64 / batch_time;
            pb.set_message(format!(
                "loss {:.4} (con {:.4}{}) lr {lr:.2e} {sps:.1} samples/s",
                s.total,
                s.contrastive,
                s.affiliation
                    .map(|x| format!(" aff {x:.4}"))
                    .unwrap_or_default()
            ));
            pb.set_position(step as u64);
            let done_in_epoch = (batch_index + 1) / accum;
            if step % a.log_every_n_steps as i64 == 0
                || done_in_epoch == per_epoch
                || step == stop_at
            {
                let mut scalars = vec![
                    ("train/data_time", data_time),
                    ("train/batch_time", batch_time),
                    ("train/samples_per_second", sps),
                    ("train/samples_per_second_per_gpu", sps),
                    ("train/scale", s.logit_scale.exp()),
                    ("train/lr", lr),
                    ("train/contrastive_loss", s.contrastive),
                    ("train/total_loss", s.total),
                    ("train/grad_norm", s.grad_norm),
                ];
                if let Some(aff) = s.affiliation {
                    scalars.push(("train/affiliation_loss", aff));
                }
                if let Some(tb) = &mut tb {
                    tb.scalars(step, &scalars)?;
                }
                log.line(&format!(
                    "Train Epoch: {epoch} [{done_in_epoch}/{per_epoch}] step {step} Data (t): {data_time:.3} Batch (t): {batch_time:.3}, {sps:.2}/s LR: {lr:.6} Logit Scale: {:.3} Contrastive_loss: {:.5}{} Loss: {:.5}",
                    s.logit_scale.exp(),
                    s.contrastive,
                    s.affiliation.map(|x| format!(" Affiliation_loss: {x:.5}")).unwrap_or_default(),
                    s.total
                ));
            }
            if step == stop_at && done_in_epoch < per_epoch {
                let p = Position {
                    epoch,
                    batch_in_epoch: done_in_epoch * accum,
                    step,
                };
                if is_master {
                    checkpoint::save(&ckpt_dir.join("epoch_latest.pt"), &trainer, &name, p, lr)?;
                }
                log.line(&format!("stopped at step {step} (--max-steps); checkpoints/epoch_latest.pt resumes here"));
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
        if is_master && (completed == a.epochs || completed % a.save_frequency == 0) {
            let path = ckpt_dir.join(format!("epoch_{completed}.pt"));
            checkpoint::save(&path, &trainer, &name, p, lr)?;
            pirclip_checkpoint::safetensors::write(
                &ckpt_dir.join(format!("epoch_{completed}.safetensors")),
                &trainer.model.state_dict(),
                &[("format", "pt"), ("pirclip_model", &config.name)],
            )?;
            log.line(&format!("saved {}", path.display()));
        }
        if is_master && (a.save_most_recent || step == stop_at) {
            checkpoint::save(&ckpt_dir.join("epoch_latest.pt"), &trainer, &name, p, lr)?;
        }
        if let (true, Some((set, images))) = (is_master, &validation) {
            if completed % a.val_frequency == 0 || completed == a.epochs {
                let official = crate::pipeline::encode_set(
                    &trainer.model,
                    set,
                    images,
                    EncodeOptions {
                        bn_mode: pirclip_model::BnMode::Running,
                        belief_mode: options.belief_mode,
                        dropout: false,
                    },
                    64,
                    false,
                )?
                .metrics(set, &[1, 5, 10])
                .official();
                let tags: Vec<(String, f64)> = official
                    .iter()
                    .map(|(k, v)| (format!("val/{k}"), *v))
                    .collect();
                tb.as_mut().expect("rank 0 writes TensorBoard").scalars(
                    step,
                    &tags
                        .iter()
                        .map(|(k, v)| (k.as_str(), *v))
                        .collect::<Vec<_>>(),
                )?;
                let line = format!(
                    "Eval Epoch: {completed} {}",
                    official
                        .iter()
                        .map(|(k, v)| format!("{k}: {v:.2}"))
                        .collect::<Vec<_>>()
                        .join("\t")
                );
                pb.println(&line);
                log.line(&line);
            }
        }
        if step >= stop_at {
            break;
        }
    }
    pb.finish();
    if let Some(d) = &trainer.dist {
        // Rank 0 writes the last checkpoint before any rank reports success.
        d.group.barrier().map_err(anyhow::Error::msg)?;
    }
    let msg = format!("done at step {step}; run folder {}", run_dir.display());
    say(is_master, &msg);
    log.line(&msg);
    Ok(())
}

/// Progress and information lines: from rank 0 only, as open_clip logs on the master.
fn say(is_master: bool, msg: &str) {
    if is_master {
        eprintln!("{msg}");
    }
}
