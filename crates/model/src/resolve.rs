//! Which model and device a command means: the bundled model when no weights are named, a preset or
//! an open_clip JSON config, a device by name, and a warning where half precision would be emulated.

use std::path::{Path, PathBuf};

use tch::Device;

use crate::config::ModelConfig;

/// The model pirclip trained itself and ships (models/README.md): the default when no weights are given.
pub const BUNDLED_MODEL: &str = "pir-small-aid150";

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
    let config = |name: &str| ModelConfig::from_name_or_path(name).map_err(|e| format!("{e:#}"));
    match checkpoint {
        Some(c) => Ok((config(model.unwrap_or("PIR"))?, c.to_path_buf())),
        None => {
            let weights = bundled_file(&format!("models/{BUNDLED_MODEL}.safetensors"))?;
            let config = match model {
                Some(m) => config(m)?,
                None => {
                    let path = bundled_file(&format!("models/{BUNDLED_MODEL}.json"))?;
                    let mut c = config(&path.to_string_lossy())?;
                    c.name = BUNDLED_MODEL.to_string();
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
