//! Flags and helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
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

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset (PIR, ViT-B-32, ViT-L-14, RN50; add -quickgelu for OpenAI weights) or an open_clip
    /// JSON config file.
    #[arg(long, default_value = "PIR")]
    pub model: String,
    /// Weights: PyTorch .pt (training checkpoint or state dict, `module.` prefix allowed) or .safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// BatchNorm statistics of the instruction ResNet / RN50 tower.
    #[arg(long, value_enum, default_value_t = BnModeArg::Running)]
    pub bn_mode: BnModeArg,
    /// VIR re-weighting variant (PIR models only).
    #[arg(long, value_enum, default_value_t = BeliefModeArg::BeliefPlusIndex)]
    pub belief_mode: BeliefModeArg,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
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
        }
    }

    pub fn load(&self) -> Result<ClipModel> {
        let config = ModelConfig::from_name_or_path(&self.model)?;
        let device = parse_device(&self.device)?;
        let model = pirclip_model::load_model(&config, &self.checkpoint, device)
            .with_context(|| {
                format!(
                    "loading {} as model {} (hint: `pirclip inspect {}` tells which model the file holds)",
                    self.checkpoint.display(),
                    config.name,
                    self.checkpoint.display()
                )
            })?;
        Ok(model)
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if !pirclip_model::cuda::load() {
                bail!("--device cuda: no CUDA device is visible to libtorch (driver missing, or a CPU-only torch build)");
            }
            Ok(Device::Cuda(0))
        }
        s if s.starts_with("cuda:") => {
            let i: usize = s[5..]
                .parse()
                .with_context(|| format!("bad device {s:?}"))?;
            pirclip_model::cuda::load();
            let n = tch::Cuda::device_count() as usize;
            if i >= n {
                bail!("--device {s}: only {n} CUDA device(s) visible");
            }
            Ok(Device::Cuda(i))
        }
        _ => bail!("unknown device {s:?}: use cpu, cuda or cuda:N"),
    }
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
