//! Pretrained towers into a CLIP model: the packages' weight files (see `resolve::PretrainedPackage`)
//! renamed to where open_clip keeps a tower's tensors, and loaded into a model whose config has that
//! tower.
//!
//! - MiniLM-L6 (`model.safetensors`, a transformers `BertModel`): `x` → `text.transformer.x`. The
//!   file's pooling layer (`pooler.*`) is left out, as open_clip builds the model without it for
//!   `mean_pooler`; `embeddings.position_ids` is a constant buffer transformers no longer saves.
//! - EfficientNet-Lite0 (a `.pth` state dict in EfficientNet-PyTorch's names): each tensor →
//!   `visual.trunk.<timm name>` (`efficientnet::timm_name_of_lukemelas`); the ImageNet classifier
//!   (`_fc.*`) is left out, as open_clip's `TimmModel` builds the trunk without one.

use pirclip_checkpoint::StateDict;

use crate::clip::{ClipModel, Text, Visual};
use crate::config::VisionTower;
use crate::efficientnet::timm_name_of_lukemelas;
use crate::resolve::{pretrained_file, PretrainedPackage, EFFICIENTNET_LITE0, MINILM_L6};

/// `p`'s tensors under the names open_clip gives them in a CLIP model.
pub fn tower_state_dict(p: &PretrainedPackage) -> Result<StateDict, String> {
    let file = pretrained_file(p)?;
    let sd = pirclip_checkpoint::load(&file)
        .map_err(|e| e.to_string())?
        .state_dict;
    let renamed: Vec<(String, pirclip_checkpoint::TensorData)> = if p.name == MINILM_L6.name {
        sd.entries
            .into_iter()
            .filter(|(n, _)| !n.starts_with("pooler.") && n != "embeddings.position_ids")
            .map(|(n, t)| (format!("text.transformer.{n}"), t))
            .collect()
    } else if p.name == EFFICIENTNET_LITE0.name {
        let mut out = Vec::new();
        for (n, t) in sd.entries {
            if n.starts_with("_fc.") {
                continue;
            }
            let timm = timm_name_of_lukemelas(&n, 0).ok_or_else(|| {
                format!(
                    "{}: tensor {n} is not part of EfficientNet-Lite0",
                    file.display()
                )
            })?;
            out.push((format!("visual.trunk.{timm}"), t));
        }
        out
    } else {
        return Err(format!("no tensor names known for {}", p.name));
    };
    Ok(StateDict { entries: renamed })
}

/// Loads `p`'s weights into the tower of `model` that has its architecture; returns how many tensors
/// were loaded. Fails unless every tensor of the file finds its place with its shape.
pub fn load_tower(model: &ClipModel, p: &PretrainedPackage) -> Result<usize, String> {
    let fits = match p.name {
        n if n == MINILM_L6.name => {
            matches!(&model.text, Text::Hf(_))
                && model.config.text.hf.as_ref().is_some_and(|h| {
                    crate::resolve::known_hf_model(&h.model_name).as_ref() == Some(&h.bert)
                })
        }
        n if n == EFFICIENTNET_LITE0.name => {
            matches!(&model.visual, Visual::Timm(_))
                && matches!(
                    model.config.vision,
                    VisionTower::TimmEfficientNetLite { variant: 0, .. }
                )
        }
        _ => false,
    };
    if !fits {
        return Err(format!(
            "{} is {}; model {} has no such tower (its config needs {})",
            p.name,
            p.model_name,
            model.config.name,
            if p.name == MINILM_L6.name {
                "text_cfg.hf_model_name \"sentence-transformers/all-MiniLM-L6-v2\""
            } else {
                "vision_cfg.timm_model_name \"tf_efficientnet_lite0\""
            }
        ));
    }
    let sd = tower_state_dict(p)?;
    let report = crate::params::load_state_dict(model.registry(), &sd);
    if !report.unexpected.is_empty() || !report.mismatched.is_empty() {
        let mut stray = report;
        stray.missing.clear();
        return Err(format!(
            "{} does not fit model {}:{}",
            p.name,
            model.config.name,
            stray.describe()
        ));
    }
    Ok(report.loaded.len())
}

/// The safetensors metadata key of a checkpoint that leaves out the tensors equal to a package
/// tower's: a JSON list of `{"name", "package", "file", "sha256", "tensors"}`, one per package.
pub const PACKAGE_TOWERS_KEY: &str = "pirclip.package_towers";

/// The packages a safetensors checkpoint takes its unchanged tower tensors from (its
/// [`PACKAGE_TOWERS_KEY`] metadata), if it names any.
pub fn package_towers_of(checkpoint: &std::path::Path) -> Option<String> {
    let meta = pirclip_checkpoint::safetensors::read_metadata_file(checkpoint).ok()?;
    meta.into_iter()
        .find(|(k, _)| k == PACKAGE_TOWERS_KEY)
        .map(|(_, v)| v)
}

/// SHA-256 of a file, hex.
fn sha256_file(path: &std::path::Path) -> Result<String, String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `sd` without the tensors that are bit for bit a package tower's (a tower trained locked, or frozen
/// parts of one), and the metadata that names those packages (`None` when nothing was left out).
pub fn without_package_tensors(sd: StateDict) -> Result<(StateDict, Option<String>), String> {
    let mut kept = sd;
    let mut used = Vec::new();
    for p in crate::resolve::PRETRAINED_PACKAGES {
        let prefix = if p.name == MINILM_L6.name {
            "text.transformer."
        } else {
            "visual.trunk."
        };
        if !kept.entries.iter().any(|(n, _)| n.starts_with(prefix)) || pretrained_file(&p).is_err()
        {
            continue;
        }
        let tower = tower_state_dict(&p)?;
        let before = kept.entries.len();
        kept.entries
            .retain(|(n, t)| tower.get(n).is_none_or(|base| base != t));
        let dropped = before - kept.entries.len();
        if dropped > 0 {
            let file = pretrained_file(&p)?;
            used.push(serde_json::json!({
                "name": p.name,
                "package": p.package,
                "file": p.file,
                "sha256": sha256_file(&file)?,
                "tensors": dropped,
            }));
        }
    }
    let meta = (!used.is_empty()).then(|| serde_json::Value::Array(used).to_string());
    Ok((kept, meta))
}

/// `sd` completed with the package towers its metadata `meta` names (each package file checked
/// against the SHA-256 it was made with); the checkpoint's own tensors win.
pub fn with_package_tensors(sd: StateDict, meta: &str) -> Result<StateDict, String> {
    let list: Vec<serde_json::Value> = serde_json::from_str(meta)
        .map_err(|e| format!("{PACKAGE_TOWERS_KEY}: not a JSON list ({e})"))?;
    let mut out = sd;
    for entry in list {
        let name = entry["name"].as_str().unwrap_or_default();
        let p = crate::resolve::pretrained_package(name)?;
        let file = pretrained_file(&p)?;
        let want = entry["sha256"].as_str().unwrap_or_default();
        let have = sha256_file(&file)?;
        if have != want {
            return Err(format!(
                "this checkpoint takes its {name} tower from {} with sha256 {want}, but the installed file has {have}; reinstall {} (scripts/setup.sh)",
                file.display(),
                p.package
            ));
        }
        let names: std::collections::HashSet<String> =
            out.entries.iter().map(|(n, _)| n.clone()).collect();
        let tower = tower_state_dict(&p)?;
        out.entries.extend(
            tower
                .entries
                .into_iter()
                .filter(|(n, _)| !names.contains(n)),
        );
    }
    Ok(out)
}

/// What [`export`] wrote.
pub struct Exported {
    pub entries: usize,
    /// Tensors left out as equal to a package tower's, and the packages' metadata.
    pub left_out: usize,
    pub package_towers: Option<String>,
}

/// `pirclip export`: a checkpoint's weights (any readable layout; optimizer state dropped, DDP prefix
/// stripped) as safetensors, floating-point weights cast to `dtype` (BatchNorm statistics stay
/// float32), optionally without the tensors its package towers hold.
pub fn export(
    checkpoint: &std::path::Path,
    out: &std::path::Path,
    dtype: pirclip_checkpoint::DType,
    without_package_towers: bool,
) -> Result<Exported, String> {
    let mut sd = pirclip_checkpoint::load(checkpoint)
        .map_err(|e| e.to_string())?
        .state_dict;
    let before = sd.len();
    let mut metadata = vec![("format".to_string(), "pt".to_string())];
    let mut package_towers = None;
    if without_package_towers {
        let (kept, towers) = without_package_tensors(sd)?;
        sd = kept;
        if let Some(t) = &towers {
            metadata.push((PACKAGE_TOWERS_KEY.to_string(), t.clone()));
        }
        package_towers = towers;
    }
    for (name, t) in sd.entries.iter_mut() {
        if t.dtype.is_float() && !pirclip_checkpoint::is_buffer_name(name) {
            *t = t.cast_float(dtype);
        }
    }
    let metadata: Vec<(&str, &str)> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pirclip_checkpoint::safetensors::write(out, &sd, &metadata)
        .map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(Exported {
        entries: sd.len(),
        left_out: before - sd.len(),
        package_towers,
    })
}
