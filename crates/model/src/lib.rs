//! PIR-CLIP and open_clip CLIP models on libtorch (tch), loading official checkpoints exactly.
//!
//! One module per part, named like the spec: `vit` (with VIR), `resnet` (ModifiedResNet, used for RN50 and
//! as PIR's instruction encoder), `text`, `clip` (the full models), `params` (ordered state dict, strict
//! loading), `init` (official initialisation distributions), `config` (open_clip JSON + presets).

pub mod clip;
pub mod config;
pub mod efficientnet;
pub mod hf_text;
pub mod init;
pub mod inspect;
pub mod layers;
pub mod native;
pub mod pae;
pub mod params;
pub mod pretrained;
pub mod resnet;
pub mod resolve;
pub mod text;
pub mod vit;

pub use clip::{l2_normalize, ClipModel, EncodeOptions, Precision};
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
    let mut state_dict = ck.state_dict;
    if ck.layout == pirclip_checkpoint::Layout::Safetensors {
        // A checkpoint that leaves its package towers' unchanged tensors in the packages.
        let meta = pirclip_checkpoint::safetensors::read_metadata_file(checkpoint)?;
        if let Some((_, towers)) = meta
            .iter()
            .find(|(k, _)| k == pretrained::PACKAGE_TOWERS_KEY)
        {
            state_dict = pretrained::with_package_tensors(state_dict, towers)
                .map_err(|e| Error::Load(format!("{}: {e}", checkpoint.display())))?;
        }
    }
    let model = ClipModel::new(config, device);
    model.load(&state_dict, &checkpoint.display().to_string())?;
    Ok(model)
}

pub mod cuda {
    //! CUDA support is loaded on demand: `load` opens libtorch_cuda (next to the libtorch this binary was
    //! built against, or found through the usual library search path), whose static initialisers register
    //! the CUDA backend with libtorch.

    /// Opens libtorch_cuda once; returns whether a CUDA device is then visible.
    pub fn load() -> bool {
        static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ONCE.get_or_init(|| {
            let dir = option_env!("PIRCLIP_TORCH_LIB").unwrap_or("");
            for candidate in [
                format!("{dir}/libtorch_cuda.so"),
                "libtorch_cuda.so".to_string(),
            ] {
                let c = std::ffi::CString::new(candidate).unwrap();
                // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
                let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !h.is_null() {
                    break;
                }
            }
            tch::Cuda::is_available()
        })
    }
}
