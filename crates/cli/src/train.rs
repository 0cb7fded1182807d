use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_data::train::{
    samples_from_karpathy, Augmentation, LoaderConfig, Sample, ShardOrder, TrainLoader,
};
use pirclip_model::dist::ProcessGroup;
use pirclip_model::{ClipModel, EncodeOptions, ModelConfig};
use pirclip_train::checkpoint::{self, Position};
use pirclip_train::distributed::Distributed;
use pirclip_train::run::{self, RunLog, RunObserver, RunSettings, ScheduleKind, TrainingRun};
use pirclip_train::{optim::Foreach, AdamWConfig, TrainOptions, TrainPrecision, Trainer};

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
enum Recipe {
    Pirclip,
    Official,
    Aerial,
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

/// Train or fine-tune with open_clip's recipe plus PIR-CLIP's affiliation loss, keeping a weight average
/// (--recipe official for exactly the official run). Run folder:
/// <logs>/<name>/{out.log, params.txt, checkpoints/, tensorboard/}; checkpoints are PyTorch-readable
/// (epoch_N.pt in open_clip's layout) with a .safetensors copy of the (averaged) weights.
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
    /// Record PyTorch's operator profiler (as `torch.profiler`, CPU ops with input shapes) over every step
    /// after the first and write its Chrome trace to FILE (open it in Perfetto or chrome://tracing; rank 0
    /// only). For finding where step time goes, e.g. against a PyTorch run of the same model.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Train on the eval transform (no RandomResizedCrop).
    #[arg(long, conflicts_with_all = ["aug_cfg", "aug_rotate_flip"])]
    no_augment: bool,
    /// open_clip's augmentation settings, KEY=VALUE: `scale=(0.9,1.0)` (RandomResizedCrop area, the
    /// default) and `ratio=(0.75,1.333)` (aspect range). open_clip's other keys (colour jitter, random
    /// erasing, timm) are refused by name.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    aug_cfg: Vec<String>,
    /// After the crop, one of the eight 90° rotations and mirror images, uniformly (overhead images have
    /// no "up").
    #[arg(long)]
    aug_rotate_flip: bool,
    /// An epoch pass is one sample per image with a caption drawn anew each pass, instead of every
    /// caption once (JSON and CSV data; shards already hold one caption per sample).
    #[arg(long)]
    one_caption_per_image: bool,
    /// Keep an exponential moving average of the weights with this decay (warmed up as
    /// min(decay, (1+n)/(10+n)) at update n; 0 turns it off). Default 0.999, from --recipe pirclip: the
    /// optimisation is untouched, so epoch_N.pt's `state_dict` is what the official recipe trains; the
    /// .safetensors copy of each checkpoint and the validation use the average, and epoch_N.pt also holds
    /// it (`state_dict_ema`) and resumes it. Costs one more copy of the weights in memory (rank 0 only)
    /// and in each .pt checkpoint.
    #[arg(long, value_parser = parse_unit_closed_open)]
    ema_decay: Option<f64>,
    /// Label smoothing ε of the contrastive cross-entropy (targets 1−ε on the pair, ε spread over the
    /// batch); the affiliation loss keeps hard targets.
    #[arg(long, value_parser = parse_unit_closed_open)]
    label_smoothing: Option<f64>,
    /// `pirclip` (default): open_clip's recipe with PIR-CLIP's, plus a weight average (--ema-decay
    /// 0.999), the one change that trained better on both seeds without touching the optimisation
    /// (models/README.md). `official`: exactly what the seed's command lines run, nothing added.
    /// `aerial`: pirclip plus --aug-rotate-flip --label-smoothing 0.1. Flags given explicitly win.
    #[arg(long, value_enum, default_value_t = Recipe::Pirclip)]
    recipe: Recipe,
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

fn parse_unit_closed_open(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s}: expected a number in [0, 1)")),
    }
}

/// open_clip's `--aug-cfg KEY=VALUE …` for the keys pirclip implements (`scale`, `ratio`: a pair written
/// `(a,b)`, `(a, b)`, `[a,b]` or `a,b`).
fn augmentation(a: &Args) -> Result<Option<Augmentation>> {
    if a.no_augment {
        return Ok(None);
    }
    let mut aug = Augmentation {
        rotate_flip: a.aug_rotate_flip || a.recipe == Recipe::Aerial,
        ..Augmentation::default()
    };
    for item in &a.aug_cfg {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--aug-cfg {item}: expected KEY=VALUE"))?;
        let pair = || -> Result<(f64, f64)> {
            let inner = value
                .trim()
                .trim_matches(|c| matches!(c, '(' | ')' | '[' | ']'));
            let parts: Vec<f64> = inner
                .split(',')
                .map(|p| p.trim().parse::<f64>())
                .collect::<std::result::Result<_, _>>()
                .ok()
                .filter(|v: &Vec<f64>| v.len() == 2)
                .with_context(|| {
                    format!("--aug-cfg {key}={value}: expected a pair like (0.5,1.0)")
                })?;
            let (lo, hi) = (parts[0], parts[1]);
            if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
                bail!("--aug-cfg {key}={value}: expected 0 < low ≤ high");
            }
            Ok((lo, hi))
        };
        match key.trim() {
            "scale" => {
                aug.scale = pair()?;
                if aug.scale.1 > 1.0 {
                    bail!("--aug-cfg scale={value}: the crop cannot exceed the image (high ≤ 1)");
                }
            }
            "ratio" => aug.ratio = pair()?,
            other => bail!(
                "--aug-cfg {other}: open_clip's {other} augmentation is not implemented by pirclip (implemented: scale, ratio; and --aug-rotate-flip)"
            ),
        }
    }
    Ok(Some(aug))
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
    // One rank joins a group only when a backend is named under a launcher (e.g. to check NCCL with
    // `torchrun --nproc_per_node 1 … --dist-backend nccl`); otherwise it trains alone, as open_clip does.
    let launched_alone = world.world_size == 1
        && a.dist_backend.is_some()
        && std::env::var_os("MASTER_ADDR").is_some();
    if world.world_size <= 1 && !launched_alone {
        return Ok(None);
    }
    let backend =
        a.dist_backend
            .as_deref()
            .unwrap_or(if device.is_cuda() { "nccl" } else { "gloo" });
    if backend == "nccl" && !device.is_cuda() {
        bail!("--dist-backend nccl reduces GPU tensors: add --device cuda (each rank takes cuda:LOCAL_RANK), or use gloo on CPU");
    }
    if a.dist_url != "env://" {
        bail!("--dist-url {}: pirclip rendezvous through env:// (MASTER_ADDR, MASTER_PORT), as torchrun and open_clip's srun setup provide", a.dist_url);
    }
    let (addr, port, is_server) =
        pirclip_model::dist::rendezvous_from_env(world.rank).map_err(anyhow::Error::msg)?;
    let rendezvous = pirclip_model::dist::Rendezvous {
        host: &addr,
        port,
        rank: world.rank,
        world_size: world.world_size,
        is_server,
        timeout_s: a.dist_timeout,
    };
    let group = match (backend, device) {
        ("nccl", tch::Device::Cuda(i)) => ProcessGroup::nccl(&rendezvous, i),
        _ => ProcessGroup::gloo(&rendezvous),
    }
    .map_err(anyhow::Error::msg)?;
    Ok(Some(Distributed {
        group,
        local_loss: a.local_loss,
        gather_with_grad: a.gather_with_grad,
        reducer: None,
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
    // Checked before anything is loaded: a typo in a setting fails at once.
    let augment = augmentation(&a)?;
    let world = pirclip_model::dist::world_info_from_env();
    let is_master = world.rank == 0;
    let mut device = parse_device(&a.device)?;
    if world.world_size > 1 && matches!(a.device.as_str(), "cuda" | "gpu") {
        // open_clip's device for a rank: cuda:LOCAL_RANK (an explicit cuda:N is kept, e.g. to put
        // several ranks on one GPU).
        let visible = tch::Cuda::device_count() as usize;
        if world.local_rank >= visible {
            bail!("rank {} has LOCAL_RANK {} but only {visible} CUDA device(s) are visible: launch at most {visible} ranks per node", world.rank, world.local_rank);
        }
        device = tch::Device::Cuda(world.local_rank);
    }
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    if let Some(p) = &a.profile {
        // Kineto only logs a file it cannot write; fail now, not after the training.
        std::fs::File::create(p).with_context(|| format!("--profile {}", p.display()))?;
        if std::env::var_os("KINETO_LOG_LEVEL").is_none() {
            // Kineto logs an error when it finds no GPU; level 5 silences its log, not the trace. Set
            // before the loader's threads start, as the environment must be.
            std::env::set_var("KINETO_LOG_LEVEL", "5");
        }
    }
    // Before the first tensor: steps reuse freed activation memory instead of faulting in new pages.
    pirclip_model::native::retain_freed_memory();
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
    let mut log = RunLog::none();
    if is_master {
        std::fs::create_dir_all(&ckpt_dir)?;
        log = RunLog::open(&run_dir.join("out.log"))?;
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
        label_smoothing: a.label_smoothing.unwrap_or(match a.recipe {
            Recipe::Pirclip | Recipe::Official => 0.0,
            Recipe::Aerial => 0.1,
        }),
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
    let ema_decay = a.ema_decay.unwrap_or(match a.recipe {
        Recipe::Official => 0.0,
        Recipe::Pirclip | Recipe::Aerial => 0.999,
    });
    let ema_decay = (ema_decay > 0.0).then_some(ema_decay);
    // Only rank 0 saves and validates, so only rank 0 keeps the average (a copy of the weights).
    if let (Some(decay), true) = (ema_decay, is_master) {
        trainer.ema = Some(pirclip_train::ema::Ema::new(&trainer.model, decay));
    }
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
        trainer.join(d).map_err(anyhow::Error::msg)?;
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
    if a.one_caption_per_image && shard_of.is_some() {
        bail!("--one-caption-per-image is for JSON and CSV data: webdataset shards hold one caption per sample");
    }
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
            augment,
            one_caption_per_image: a.one_caption_per_image,
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
    let pass = loader.pass_len();
    let per_epoch_samples = loader.samples_per_epoch();
    let pass_is = if a.one_caption_per_image {
        format!("a pass is one caption, drawn anew each pass, of each of {pass} images ({pool} captions)")
    } else {
        format!("a pass is all {pool} samples")
    };
    let coverage = if resampled {
        format!("an epoch draws {per_epoch_samples} samples from shards chosen with replacement (pool of {pool})")
    } else if per_epoch_samples == pass {
        format!("an epoch is one pass; {pass_is}")
    } else {
        format!(
            "an epoch is {per_epoch_samples} samples ({:.2} passes) of a stream of reshuffled passes; {pass_is}; no sample is left out",
            per_epoch_samples as f64 / pass as f64
        )
    };
    say(is_master, &format!("data: {coverage}"));
    log.line(&format!("data: {coverage}"));
    if let Some(kind) = trainer.autocast_kind() {
        crate::common::warn_slow_half_precision(device, kind);
    }
    let precision = match trainer.autocast_kind() {
        None => "fp32".to_string(),
        Some(k) => format!(
            "{k:?} autocast{}",
            if trainer.scaler.is_some() {
                " + gradient scaler"
            } else {
                ""
            }
        ),
    };
    let settings = RunSettings {
        name: name.clone(),
        epochs: a.epochs,
        accum_freq: a.accum_freq as usize,
        lr: a.lr,
        warmup: a.warmup,
        schedule: match a.lr_scheduler {
            LrScheduler::Cosine => ScheduleKind::Cosine,
            LrScheduler::Const => ScheduleKind::Const,
            LrScheduler::ConstCooldown => ScheduleKind::ConstCooldown {
                epochs: a.epochs_cooldown,
                end_lr: a.lr_cooldown_end,
            },
        },
        max_steps: a.max_steps,
        profile: if is_master { a.profile.clone() } else { None },
        log_every_n_steps: a.log_every_n_steps,
        save_frequency: a.save_frequency,
        save_most_recent: a.save_most_recent,
        val_frequency: a.val_frequency,
        label_source: match a.label_source {
            LabelSource::Filename => run::LabelSource::FileName,
            LabelSource::Json => run::LabelSource::Json,
        },
    };
    let mut training = TrainingRun::new(trainer, loader, settings, run_dir.clone(), log, is_master)
        .map_err(anyhow::Error::msg)?;
    let accum = a.accum_freq as usize;
    let header = format!(
        "run {name}: model {} ({} parameters, {} trainable), {} samples, {} batches/epoch of {}{}, {} epochs, steps {}..{}, precision {precision}",
        config.name,
        crate::inspect::group_thousands(training.trainer.model.parameter_count()),
        crate::inspect::group_thousands(training.trainer.trainable_parameter_count()),
        training.loader.len(),
        training.steps_per_epoch(),
        a.batch_size,
        if accum > 1 { format!(" × {accum} accumulated") } else { String::new() }
            + &if world.world_size > 1 {
                format!(
                    " on each of {} ranks (global batch {})",
                    world.world_size,
                    a.batch_size * accum * world.world_size
                )
            } else {
                String::new()
            },
        a.epochs,
        pos.step,
        training.stop_at(),
    );
    say(is_master, &header);
    training.log.line(&header);
    let recipe = format!(
        "recipe {}: augmentation {}; label smoothing {}; weight average {}",
        crate::common::flag_name(&a.recipe),
        match augment {
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
        },
        training.trainer.options.label_smoothing,
        match &training.trainer.ema {
            Some(e) => format!("decay {}", e.decay),
            None => "off".to_string(),
        }
    );
    say(is_master, &recipe);
    training.log.line(&recipe);
    let mut validate = validation.map(|(set, images)| {
        let (bn_mode, belief_mode) = (pirclip_model::BnMode::Running, options.belief_mode);
        move |model: &ClipModel| -> std::result::Result<Vec<(String, f64)>, String> {
            let encoded = crate::pipeline::encode_set(
                model,
                &set,
                &images,
                EncodeOptions {
                    bn_mode,
                    belief_mode,
                    dropout: false,
                },
                64,
                false,
            )
            .map_err(|e| format!("{e:#}"))?;
            Ok(encoded.metrics(&set, &[1, 5, 10]).official())
        }
    });
    let mut progress = Progress::new(is_master);
    let end = training
        .run(
            pos,
            validate.as_mut().map(|v| v as &mut run::Validate),
            &mut progress,
        )
        .map_err(anyhow::Error::msg)?;
    progress.bar.finish();
    let msg = format!(
        "done at step {}; run folder {}",
        end.step,
        run_dir.display()
    );
    say(is_master, &msg);
    training.log.line(&msg);
    Ok(())
}

/// The progress bar of a run (rank 0 only; hidden elsewhere).
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(is_master: bool) -> Self {
        let bar = if is_master {
            crate::common::progress(0, "steps")
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>6} [{bar:25}] {pos}/{len} {msg} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        Progress { bar }
    }
}

impl RunObserver for Progress {
    fn started(&mut self, first: i64, stop_at: i64) {
        self.bar.set_length(stop_at as u64);
        self.bar.set_position(first as u64);
    }

    fn stepped(&mut self, step: i64, s: &pirclip_train::StepStats, samples_per_second: f64) {
        self.bar.set_message(format!(
            "loss {:.4} (con {:.4}{}) lr {:.2e} {samples_per_second:.1} samples/s",
            s.total,
            s.contrastive,
            s.affiliation
                .map(|x| format!(" aff {x:.4}"))
                .unwrap_or_default(),
            s.lr
        ));
        self.bar.set_position(step as u64);
    }

    fn line(&mut self, line: &str) {
        self.bar.println(line);
    }
}

/// Progress and information lines: from rank 0 only, as open_clip logs on the master.
fn say(is_master: bool, msg: &str) {
    if is_master {
        eprintln!("{msg}");
    }
}
