//! The model side of a run's setup: which options the model's config allows, and the pretrained towers
//! it starts from.

use pirclip_model::ClipModel;

use crate::setup::RunConfig;

/// The pretrained towers a run starts from, as open_clip's `create_model` loads them: a Hugging Face
/// text tower's weights unless `hf_model_pretrained` is false, the image tower's with
/// `--pretrained-image`. A `--pretrained` checkpoint is loaded over them.
pub(crate) fn pretrained_towers(c: &RunConfig, model: &ClipModel) -> Result<Vec<String>, String> {
    use pirclip_model::resolve::{pretrained_file, pretrained_package, EFFICIENTNET_LITE0};
    let mut lines = Vec::new();
    let mut load =
        |p: pirclip_model::resolve::PretrainedPackage, what: &str| -> Result<(), String> {
            let n = pirclip_model::pretrained::load_tower(model, &p)
                .map_err(|e| format!("{what}: {e}"))?;
            lines.push(format!(
                "{what}: {} ({}, {n} tensors from {})",
                p.name,
                p.package,
                pretrained_file(&p)?.display()
            ));
            Ok(())
        };
    if let Some(hf) = c.model.text.hf.as_ref().filter(|h| h.pretrained) {
        let p = pretrained_package(&hf.model_name).map_err(|_| {
            format!(
                "text_cfg.hf_model_name {}: pirclip has no pretrained weights for it; set text_cfg.hf_model_pretrained to false (or give --pretrained)",
                hf.model_name
            )
        })?;
        load(p, "pretrained text tower")?;
    }
    if c.pretrained_image {
        if !matches!(
            c.model.vision,
            pirclip_model::config::VisionTower::TimmEfficientNetLite { variant: 0, .. }
        ) {
            return Err(format!(
                "--pretrained-image: pirclip has ImageNet weights for tf_efficientnet_lite0 towers only; model {} has another image tower",
                c.model.name
            ));
        }
        load(EFFICIENTNET_LITE0, "pretrained image tower")?;
    }
    Ok(lines)
}

pub(crate) fn check_model_options(c: &RunConfig) -> Result<(), String> {
    let o = &c.options;
    let timm = matches!(
        c.model.vision,
        pirclip_model::config::VisionTower::TimmEfficientNetLite { .. }
    );
    if (o.lock_image_unlocked_groups > 0 || o.lock_image_freeze_bn_stats) && !(o.lock_image && timm)
    {
        return Err(format!(
            "--lock-image-unlocked-groups / --lock-image-freeze-bn-stats go with --lock-image on a timm image tower (vision_cfg.timm_model_name); model {} has {}",
            c.model.name,
            if timm { "one, but --lock-image is missing" } else { "another tower" }
        ));
    }
    if (o.lock_text_unlocked_layers > 0 || o.lock_text_freeze_layer_norm)
        && !(o.lock_text && c.model.text.hf.is_some())
    {
        return Err(format!(
            "--lock-text-unlocked-layers / --lock-text-freeze-layer-norm go with --lock-text on a Hugging Face text tower (text_cfg.hf_model_name); model {} has {}",
            c.model.name,
            if c.model.text.hf.is_some() { "one, but --lock-text is missing" } else { "CLIP's text transformer" }
        ));
    }
    let hard_vir = c
        .model
        .instruction
        .as_ref()
        .is_some_and(|i| i.hard_vir.is_some());
    if c.options.lock_spatial_pae && !hard_vir {
        return Err(format!(
            "--lock-spatial-pae: model {} has no hard-filter Spatial-PAE (vision_cfg.vir = \"hard\")",
            c.model.name
        ));
    }
    if c.options.lock_temporal_pae && c.model.text.lca.is_none() {
        return Err(format!(
            "--lock-temporal-pae: model {} has no Temporal-PAE (text_cfg.lca)",
            c.model.name
        ));
    }
    Ok(())
}
