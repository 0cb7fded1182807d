//! What a checkpoint holds, from its keys and shapes alone (no model is built): the architecture they
//! imply, its family, and the preset that matches it (`pirclip inspect`).

use pirclip_checkpoint::StateDict;

use crate::config::{ModelConfig, VisionTower, PRESETS};

/// Blocks `prefix0.`, `prefix1.`, … present without a gap, in one pass over the keys.
fn count_blocks(sd: &StateDict, prefix: &str) -> usize {
    let present: std::collections::HashSet<usize> = sd
        .entries
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    (0..).take_while(|n| present.contains(n)).count()
}

/// Size `i` of an entry's shape; `None` when the entry is absent or has fewer dimensions (a crafted
/// checkpoint may hold a scalar where a matrix belongs).
fn dim(sd: &StateDict, key: &str, i: usize) -> Option<usize> {
    sd.get(key)?.shape.get(i).copied()
}

/// Side of the square patch grid that `tokens` positions (class token included) imply.
fn grid_side(tokens: usize) -> usize {
    (tokens.saturating_sub(1) as f64).sqrt() as usize
}

/// The architecture numbers the shapes imply, in a form comparable with a config.
#[derive(Debug, PartialEq)]
pub struct Arch {
    pub embed_dim: usize,
    pub image_size: usize,
    pub vision: String,
    pub instruction: Option<([usize; 4], usize)>,
    /// Progressive attention encoders: (steps, feed-forward width) of the hard-filter Spatial-PAE and of
    /// the Temporal-PAE (LCA). Heads, filter size and dropout leave no trace in the shapes.
    pub spatial_pae: Option<(usize, usize)>,
    pub temporal_pae: Option<(usize, usize)>,
    pub text: (usize, usize, usize, usize),
}

fn pae_of(sd: &StateDict, prefix: &str) -> Option<(usize, usize)> {
    let steps = count_blocks(sd, &format!("{prefix}.mapping."));
    (steps > 0).then(|| {
        let ffn = dim(sd, &format!("{prefix}.self_attn.0.ffn.0.weight"), 0).unwrap_or(0);
        (steps, ffn)
    })
}

fn resnet_layers(sd: &StateDict, prefix: &str) -> [usize; 4] {
    [1, 2, 3, 4].map(|i| count_blocks(sd, &format!("{prefix}layer{i}.")))
}

/// The numbers of an open_clip `CustomTextCLIP` on pirclip's pretrained towers (a Hugging Face text
/// tower, a timm EfficientNet-Lite or CLIP image tower). Image size and context length leave no trace
/// in a convolutional trunk's and BERT's shapes: 0 and the position table's length stand for them.
fn custom_text_arch_of(sd: &StateDict) -> Option<Arch> {
    let hf = "text.transformer.";
    let width = dim(sd, &format!("{hf}embeddings.word_embeddings.weight"), 1)?;
    let embed_dim = dim(sd, "text.proj.weight", 0)
        .or_else(|| dim(sd, "text.proj.2.weight", 0))
        .unwrap_or(width);
    let text = (
        dim(sd, &format!("{hf}embeddings.position_embeddings.weight"), 0)?,
        dim(sd, &format!("{hf}embeddings.word_embeddings.weight"), 0)?,
        width,
        count_blocks(sd, &format!("{hf}encoder.layer.")),
    );
    let blocks: usize = (0..7)
        .map(|s| count_blocks(sd, &format!("visual.trunk.blocks.{s}.")))
        .sum();
    let variant = (0u8..=4).find(|&v| {
        crate::efficientnet::trunk_group("visual.trunk.conv_head.weight", &lite_config(v))
            .is_some_and(|(_, groups)| groups == blocks + 2)
    })?;
    Some(Arch {
        embed_dim,
        image_size: 0,
        vision: format!("timm tf_efficientnet_lite{variant}"),
        instruction: None,
        spatial_pae: None,
        temporal_pae: None,
        text,
    })
}

/// A config whose only use is to carry the EfficientNet-Lite variant.
fn lite_config(variant: u8) -> ModelConfig {
    let mut c = ModelConfig::from_name_or_path("ViT-B-32").expect("preset");
    c.vision = VisionTower::TimmEfficientNetLite {
        variant,
        proj_bias: false,
    };
    c
}

/// The architecture a state dict's keys and shapes imply; `None` without open_clip CLIP keys.
pub fn arch_of(sd: &StateDict) -> Option<Arch> {
    if sd
        .get("text.transformer.embeddings.word_embeddings.weight")
        .is_some()
    {
        return custom_text_arch_of(sd);
    }
    let embed_dim = dim(sd, "text_projection", 1)?;
    let text = (
        dim(sd, "positional_embedding", 0)?,
        dim(sd, "token_embedding.weight", 0)?,
        dim(sd, "ln_final.weight", 0)?,
        count_blocks(sd, "transformer.resblocks."),
    );
    let conv1 = sd.get("visual.conv1.weight").map(|t| t.shape.as_slice());
    let (vision, image_size) = match conv1 {
        Some(&[width, 3, patch, _]) if patch > 3 => {
            let tokens = dim(sd, "visual.positional_embedding", 0)?;
            (
                format!(
                    "ViT width {width} layers {} patch {patch}",
                    count_blocks(sd, "visual.transformer.resblocks."),
                ),
                grid_side(tokens).checked_mul(patch)?,
            )
        }
        _ => {
            let width = dim(sd, "visual.conv3.weight", 0)?;
            let tokens = dim(sd, "visual.attnpool.positional_embedding", 0)?;
            (
                format!(
                    "ModifiedResNet layers {:?} width {width}",
                    resnet_layers(sd, "visual.")
                ),
                grid_side(tokens).checked_mul(32)?,
            )
        }
    };
    let instruction =
        dim(sd, "res_visual.conv3.weight", 0).map(|w| (resnet_layers(sd, "res_visual."), w));
    Some(Arch {
        embed_dim,
        image_size,
        vision,
        instruction,
        spatial_pae: pae_of(sd, "spatial_pae"),
        temporal_pae: pae_of(sd, "temporal_pae"),
        text,
    })
}

/// The same numbers for a config, to compare with [`arch_of`]'s.
pub fn arch_of_config(c: &ModelConfig) -> Arch {
    let vision = match &c.vision {
        VisionTower::Vit {
            layers,
            width,
            patch_size,
            ..
        } => format!("ViT width {width} layers {layers} patch {patch_size}"),
        VisionTower::ModifiedResNet { layers, width, .. } => {
            format!("ModifiedResNet layers {layers:?} width {width}")
        }
        VisionTower::TimmEfficientNetLite { variant, .. } => {
            format!("timm tf_efficientnet_lite{variant}")
        }
    };
    Arch {
        embed_dim: c.embed_dim,
        image_size: c.image_size,
        vision,
        instruction: c.instruction.as_ref().map(|i| (i.res_layers, i.res_width)),
        spatial_pae: c
            .instruction
            .as_ref()
            .and_then(|i| i.hard_vir.as_ref())
            .map(|h| (h.instruction_rounds, h.ffn_width.unwrap_or(2 * c.embed_dim))),
        temporal_pae: c
            .text
            .lca
            .as_ref()
            .map(|l| (l.cycles, l.ffn_width.unwrap_or(2 * c.embed_dim))),
        text: (
            c.text
                .hf
                .as_ref()
                .map_or(c.text.context_length, |h| h.bert.max_position_embeddings),
            c.text.vocab_size,
            c.text.width,
            c.text.layers,
        ),
    }
    .without_image_size_of_a_conv_trunk()
}

impl Arch {
    fn without_image_size_of_a_conv_trunk(mut self) -> Self {
        if self.vision.starts_with("timm") {
            self.image_size = 0;
        }
        self
    }

    /// The model family in words.
    pub fn family(&self) -> &'static str {
        match (&self.instruction, self.vision.starts_with("ViT")) {
            (Some(_), _) if self.spatial_pae.is_some() => {
                "PIR-CLIP (CLIP ViT + instruction ResNet + hard-filter Spatial-PAE)"
            }
            (Some(_), _) => "PIR-CLIP (CLIP ViT + instruction ResNet + VIR)",
            (None, true) => "open_clip CLIP with a ViT image tower",
            (None, false) if self.vision.starts_with("timm") => {
                "open_clip CLIP with a timm EfficientNet-Lite image tower and a Hugging Face text tower"
            }
            (None, false) => "open_clip CLIP with a ModifiedResNet image tower",
        }
    }

    /// The built-in preset with exactly these numbers, if any.
    pub fn matching_preset(&self) -> Option<&'static str> {
        PRESETS.iter().find_map(|(name, _)| {
            let c = ModelConfig::from_name_or_path(name).ok()?;
            (arch_of_config(&c) == *self).then_some(*name)
        })
    }
}

/// 1,202,291.
pub fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
