use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use pirclip_checkpoint::{is_buffer_name, DType};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    Fp32,
    Fp16,
    Bf16,
}

/// Write a checkpoint's weights (any readable layout; optimizer state dropped, DDP prefix stripped) as
/// safetensors, optionally in half precision. BatchNorm statistics stay float32.
#[derive(clap::Args)]
pub struct Args {
    /// Input checkpoint (.pt or .safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = DTypeArg::Fp32)]
    dtype: DTypeArg,
}

pub fn run(a: Args) -> Result<()> {
    let ck = pirclip_checkpoint::load(&a.checkpoint)?;
    let to = match a.dtype {
        DTypeArg::Fp32 => DType::F32,
        DTypeArg::Fp16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    };
    let mut sd = ck.state_dict;
    for (name, t) in sd.entries.iter_mut() {
        if t.dtype.is_float() && !is_buffer_name(name) {
            *t = t.cast_float(to);
        }
    }
    pirclip_checkpoint::safetensors::write(&a.out, &sd, &[("format", "pt")])
        .with_context(|| format!("writing {}", a.out.display()))?;
    let size = std::fs::metadata(&a.out)?.len();
    eprintln!(
        "wrote {} ({} entries, {:.1} MB, {:?})",
        a.out.display(),
        sd.len(),
        size as f64 / 1e6,
        a.dtype
    );
    Ok(())
}
