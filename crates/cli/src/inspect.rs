use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use pirclip_checkpoint::{is_buffer_name, StateDict};
use pirclip_model::config::{ModelConfig, VisionTower, PRESETS};

/// Describe a checkpoint without building a model: layout, entry and parameter counts, dtypes, and the
/// architecture its shapes imply (with the matching preset, if any).
#[derive(clap::Args)]
pub struct Args {
    /// A .pt or .safetensors file.
    checkpoint: PathBuf,
}

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
struct Arch {
    embed_dim: usize,
    image_size: usize,
    vision: String,
    instruction: Option<([usize; 4], usize)>,
    /// Progressive attention encoders: (steps, feed-forward width) of the hard-filter Spatial-PAE and of
    /// the Temporal-PAE (LCA). Heads, filter size and dropout leave no trace in the shapes.
    spatial_pae: Option<(usize, usize)>,
    temporal_pae: Option<(usize, usize)>,
    text: (usize, usize, usize, usize),
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

fn arch_of(sd: &StateDict) -> Option<Arch> {
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

fn arch_of_config(c: &ModelConfig) -> Arch {
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
            c.text.context_length,
            c.text.vocab_size,
            c.text.width,
            c.text.layers,
        ),
    }
}

pub fn run(a: Args) -> Result<()> {
    let size = std::fs::metadata(&a.checkpoint)?.len();
    let ck = pirclip_checkpoint::load(&a.checkpoint)?;
    let sd = &ck.state_dict;
    let buffers = sd.entries.iter().filter(|(k, _)| is_buffer_name(k)).count();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, t) in &sd.entries {
        *dtypes.entry(t.dtype.to_string()).or_default() += 1;
    }
    println!(
        "file:        {} ({:.1} MB)",
        a.checkpoint.display(),
        size as f64 / 1e6
    );
    println!("layout:      {}", ck.layout);
    println!(
        "entries:     {} ({} parameters, {} buffers)",
        sd.len(),
        sd.len() - buffers,
        buffers
    );
    println!("parameters:  {}", group_thousands(sd.parameter_count()));
    println!(
        "dtypes:      {}",
        dtypes
            .iter()
            .map(|(d, n)| format!("{d} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match arch_of(sd) {
        None => println!(
            "family:      unknown (no open_clip CLIP keys such as text_projection / visual.*)"
        ),
        Some(arch) => {
            let family = match (&arch.instruction, arch.vision.starts_with("ViT")) {
                (Some(_), _) if arch.spatial_pae.is_some() => {
                    "PIR-CLIP (CLIP ViT + instruction ResNet + hard-filter Spatial-PAE)"
                }
                (Some(_), _) => "PIR-CLIP (CLIP ViT + instruction ResNet + VIR)",
                (None, true) => "open_clip CLIP with a ViT image tower",
                (None, false) => "open_clip CLIP with a ModifiedResNet image tower",
            };
            println!("family:      {family}");
            println!("vision:      {}, image {}", arch.vision, arch.image_size);
            if let Some((layers, width)) = arch.instruction {
                println!("instruction: ModifiedResNet layers {layers:?} width {width}");
            }
            if let Some((rounds, ffn)) = arch.spatial_pae {
                println!(
                    "spatial PAE: hard-filter VIR, {rounds} instruction round(s), feed-forward {ffn}"
                );
            }
            if let Some((cycles, ffn)) = arch.temporal_pae {
                println!("temporal PAE: LCA, {cycles} cycle(s), feed-forward {ffn}");
            }
            let (ctx, vocab, width, layers) = arch.text;
            println!("text:        width {width} layers {layers} context {ctx} vocab {vocab}");
            println!("embed dim:   {}", arch.embed_dim);
            let preset = PRESETS.iter().find_map(|(name, _)| {
                let c = ModelConfig::from_name_or_path(name).ok()?;
                (arch_of_config(&c) == arch).then_some(*name)
            });
            match preset {
                Some(p) => println!("preset:      {p} (use --model {p})"),
                None => println!(
                    "preset:      none matches; pass an open_clip JSON config with --model"
                ),
            }
        }
    }
    Ok(())
}

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
