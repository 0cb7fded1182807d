//! Flags and helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::ValueEnum;
use pirclip_model::{BeliefMode, BnMode, ClipModel, EncodeOptions, ModelConfig};
use tch::Device;

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum BnModeArg {
    /// BatchNorm running statistics (eval mode): deterministic, independent of batching.
    #[default]
    Running,
    /// Statistics of each batch, as the official retrieval.py computes (reproduces published numbers
    /// together with --batch-size 64).
    Batch,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
#[clap(rename_all = "snake_case")]
pub enum BeliefModeArg {
    /// Official HEAD: belief + 1/sqrt(argsort index + 1).
    #[default]
    BeliefPlusIndex,
    /// Code before 2024-10-16 (the released checkpoint may predate the fix).
    BeliefOnly,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum PrecisionArg {
    #[default]
    Fp32,
    /// Autocast to fp16 (for CUDA).
    Fp16,
    /// Autocast to bf16 (CUDA; CPUs with AVX-512 BF16 / AMX).
    Bf16,
    /// Dynamic int8 linear layers (CPU, fbgemm): faster, embeddings within quantization error.
    Int8,
}

/// A value-enum flag as the user spells it (`fp32`, `amp_bf16`, ...), for logs and run settings.
pub fn flag_name(v: &impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

impl PrecisionArg {
    pub fn name(self) -> String {
        flag_name(&self)
    }
}

impl From<PrecisionArg> for pirclip_model::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Self::Fp32,
            PrecisionArg::Fp16 => Self::Fp16,
            PrecisionArg::Bf16 => Self::Bf16,
            PrecisionArg::Int8 => Self::Int8,
        }
    }
}

pub fn load_model(config: &ModelConfig, checkpoint: &Path, device: &str) -> Result<ClipModel> {
    let device = parse_device(device)?;
    pirclip_model::load_model(config, checkpoint, device).with_context(|| {
        format!(
            "loading {} as model {} (hint: `pirclip inspect {}` tells which model the file holds)",
            checkpoint.display(),
            config.name,
            checkpoint.display()
        )
    })
}

/// Defaults: bundled model, running BatchNorm statistics, HEAD belief mode, CPU.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Model preset (PIR, ViT-B-32, ViT-L-14, RN50; add -quickgelu for OpenAI weights) or an open_clip
    /// JSON config file. Default: PIR with --checkpoint, else the bundled model's config.
    #[arg(long, alias = "model-name")]
    pub model: Option<String>,
    /// Weights: PyTorch .pt (training checkpoint or state dict, `module.` prefix allowed) or .safetensors.
    /// Default: the bundled model pirclip trained on RSICD-AID150 (models/README.md).
    #[arg(long, alias = "remoteclip-path")]
    pub checkpoint: Option<PathBuf>,
    /// BatchNorm statistics of the instruction ResNet / RN50 tower.
    #[arg(long, value_enum, default_value_t = BnModeArg::Running)]
    pub bn_mode: BnModeArg,
    /// VIR re-weighting variant (PIR models only).
    #[arg(long, value_enum, default_value_t = BeliefModeArg::BeliefPlusIndex)]
    pub belief_mode: BeliefModeArg,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Inference arithmetic.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    /// Threads of the tensor engine (default: libtorch's choice, one per core).
    #[arg(long)]
    pub threads: Option<i32>,
    /// CUDA: convolutions in full fp32 instead of TF32 (PyTorch's default, which pirclip keeps). GPU
    /// embeddings then equal the CPU's to rounding; TF32's rounding in the convolutions, amplified by
    /// VIR's unscaled softmax, moves some PIR embeddings by up to ~1e-2 (mR within ±0.02).
    #[arg(long)]
    pub exact_fp32: bool,
}

impl ModelArgs {
    pub fn bundled_on_cpu() -> Self {
        ModelArgs {
            device: "cpu".into(),
            ..Default::default()
        }
    }

    pub fn options(&self) -> EncodeOptions {
        EncodeOptions {
            bn_mode: match self.bn_mode {
                BnModeArg::Running => BnMode::Running,
                BnModeArg::Batch => BnMode::Batch,
            },
            belief_mode: match self.belief_mode {
                BeliefModeArg::BeliefPlusIndex => BeliefMode::BeliefPlusIndex,
                BeliefModeArg::BeliefOnly => BeliefMode::BeliefOnly,
            },
            dropout: false,
        }
    }

    pub fn load(&self) -> Result<ClipModel> {
        Ok(self.load_resolved()?.0)
    }

    /// The model and the weights file it came from (the bundled one when no --checkpoint was given).
    pub fn load_resolved(&self) -> Result<(ClipModel, PathBuf)> {
        self.load_resolved_or(pirclip_model::resolve::BUNDLED_MODEL)
    }

    /// The same with another bundled model as the default.
    pub fn load_resolved_or(&self, bundled: &str) -> Result<(ClipModel, PathBuf)> {
        let (model, checkpoint) = (self.model.as_deref(), self.checkpoint.as_deref());
        let (config, checkpoint) =
            pirclip_model::resolve::resolve_model_or(model, checkpoint, bundled)
                .map_err(anyhow::Error::msg)?;
        let model = load_model(&config, &checkpoint, &self.device)?;
        Ok((self.ready_for_inference(model)?, checkpoint))
    }

    /// Applies --threads, --exact-fp32 and --precision to a loaded model and prepares it for inference.
    pub fn ready_for_inference(&self, model: ClipModel) -> Result<ClipModel> {
        let (model, warning) = pirclip_model::resolve::ready_for_inference(
            model,
            self.threads,
            self.exact_fp32,
            self.precision.into(),
        )
        .map_err(anyhow::Error::msg)?;
        if let Some(w) = warning {
            eprintln!("{w}");
        }
        Ok(model)
    }
}

pub fn warn_slow_half_precision(device: Device, kind: tch::Kind) {
    if let Some(w) = pirclip_model::resolve::slow_half_precision_warning(device, kind) {
        eprintln!("{w}");
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    pirclip_model::resolve::parse_device(s).map_err(anyhow::Error::msg)
}

pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Reads captions: one per line, an empty line is an empty caption; `\r\n` endings are accepted.
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading captions from {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect())
}

pub fn write_lines(path: &Path, lines: impl IntoIterator<Item = String>) -> Result<()> {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l);
        s.push('\n');
    }
    pirclip_checkpoint::write_atomic(path, s.as_bytes())?;
    Ok(())
}
