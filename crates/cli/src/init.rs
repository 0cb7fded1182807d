use std::path::PathBuf;

use anyhow::{Context, Result};
use pirclip_model::{ClipModel, ModelConfig};

/// Write a randomly initialised model with the official initialisation distributions (spec §3.10):
/// the starting point for training from scratch, and a stand-in for benchmarks.
#[derive(clap::Args)]
pub struct Args {
    /// Model preset or open_clip JSON config.
    #[arg(long, default_value = "PIR")]
    model: String,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

pub fn run(a: Args) -> Result<()> {
    let config = ModelConfig::from_name_or_path(&a.model)?;
    let model = ClipModel::new(&config, tch::Device::Cpu);
    pirclip_model::init::initialize(model.registry(), a.seed);
    let sd = model.state_dict();
    let seed = a.seed.to_string();
    pirclip_checkpoint::safetensors::write(
        &a.out,
        &sd,
        &[
            ("format", "pt"),
            ("pirclip_model", &config.name),
            ("pirclip_init_seed", &seed),
        ],
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({} entries, {} parameters, model {}, seed {})",
        a.out.display(),
        sd.len(),
        pirclip_model::inspect::group_thousands(model.parameter_count()),
        config.name,
        a.seed
    );
    Ok(())
}
