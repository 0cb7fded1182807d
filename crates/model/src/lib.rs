//! PIR-CLIP and open_clip CLIP models on libtorch (tch), loading official checkpoints exactly.
//!
//! One module per part, named like the spec: `vit` (with VIR), `resnet` (ModifiedResNet, used for RN50 and
//! as PIR's instruction encoder), `text`, `clip` (the full models), `params` (ordered state dict, strict
//! loading), `init` (official initialisation distributions), `config` (open_clip JSON + presets).

pub mod clip;
pub mod config;
pub mod init;
pub mod layers;
pub mod params;
pub mod resnet;
pub mod text;
pub mod vit;

pub use clip::{l2_normalize, ClipModel, EncodeOptions};
pub use config::ModelConfig;
pub use layers::BnMode;
pub use vit::BeliefMode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model config: {0}")]
    Config(String),
    #[error("{0}")]
    Load(String),
    #[error(transparent)]
    Checkpoint(#[from] pirclip_checkpoint::Error),
}

/// Builds a model from a preset or config and loads a checkpoint strictly.
pub fn load_model(
    config: &ModelConfig,
    checkpoint: &std::path::Path,
    device: tch::Device,
) -> Result<ClipModel, Error> {
    let ck = pirclip_checkpoint::load(checkpoint)?;
    let model = ClipModel::new(config, device);
    model.load(&ck.state_dict, &checkpoint.display().to_string())?;
    Ok(model)
}
