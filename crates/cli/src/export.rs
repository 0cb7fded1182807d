use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use pirclip_checkpoint::DType;

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
    let to = match a.dtype {
        DTypeArg::Fp32 => DType::F32,
        DTypeArg::Fp16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    };
    let r = pirclip_model::pretrained::export(&a.checkpoint, &a.out, to, a.without_package_towers)
        .map_err(anyhow::Error::msg)?;
    match (&r.package_towers, a.without_package_towers) {
        (Some(t), _) => eprintln!(
            "left out {} tensors equal to the package towers': {t}",
            r.left_out
        ),
        (None, true) => eprintln!("no tensor equals a package tower's; nothing left out"),
        (None, false) => {}
    }
    let mb = std::fs::metadata(&a.out)?.len() as f64 / 1e6;
    eprintln!(
        "wrote {} ({} entries, {mb:.1} MB, {:?})",
        a.out.display(),
        r.entries,
        a.dtype
    );
    Ok(())
}
