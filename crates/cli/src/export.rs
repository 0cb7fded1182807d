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
    /// Leave out the tensors that are bit for bit those of a pretrained tower's package (a tower
    /// trained locked, or its frozen parts): the file names the packages and their files' SHA-256, and
    /// loading takes those tensors from the installed packages (scripts/setup.sh).
    #[arg(long)]
    without_package_towers: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ck = pirclip_checkpoint::load(&a.checkpoint)?;
    let to = match a.dtype {
        DTypeArg::Fp32 => DType::F32,
        DTypeArg::Fp16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    };
    let mut sd = ck.state_dict;
    let mut metadata = vec![("format".to_string(), "pt".to_string())];
    if a.without_package_towers {
        let before = sd.len();
        let (kept, towers) =
            pirclip_model::pretrained::without_package_tensors(sd).map_err(anyhow::Error::msg)?;
        sd = kept;
        match towers {
            Some(t) => {
                eprintln!(
                    "left out {} tensors equal to the package towers': {t}",
                    before - sd.len()
                );
                metadata.push((pirclip_model::pretrained::PACKAGE_TOWERS_KEY.to_string(), t));
            }
            None => eprintln!("no tensor equals a package tower's; nothing left out"),
        }
    }
    for (name, t) in sd.entries.iter_mut() {
        if t.dtype.is_float() && !is_buffer_name(name) {
            *t = t.cast_float(to);
        }
    }
    let metadata: Vec<(&str, &str)> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pirclip_checkpoint::safetensors::write(&a.out, &sd, &metadata)
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
