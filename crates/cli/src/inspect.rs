use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use pirclip_checkpoint::is_buffer_name;
use pirclip_model::inspect::{arch_of, group_thousands};

/// Describe a checkpoint without building a model: layout, entry and parameter counts, dtypes, and the
/// architecture its shapes imply (with the matching preset, if any).
#[derive(clap::Args)]
pub struct Args {
    /// A .pt or .safetensors file.
    checkpoint: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let size = std::fs::metadata(&a.checkpoint)?.len();
    let ck = pirclip_checkpoint::load(&a.checkpoint)?;
    let towers = pirclip_model::pretrained::package_towers_of(&a.checkpoint);
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
    // The architecture of the whole model: with the tensors it takes from the packages.
    let whole = towers.as_ref().map(|t| {
        println!("towers:      the other tensors come from the installed packages: {t}");
        let whole = pirclip_model::pretrained::with_package_tensors(sd.clone(), t);
        whole.inspect_err(|e| println!("             (not readable here: {e})"))
    });
    match arch_of(whole.as_ref().and_then(|w| w.as_ref().ok()).unwrap_or(sd)) {
        None => println!(
            "family:      unknown (no open_clip CLIP keys such as text_projection / visual.*)"
        ),
        Some(arch) => {
            println!("family:      {}", arch.family());
            match arch.image_size {
                // A convolutional trunk's weights fit any image size: the config sets it.
                0 => println!("vision:      {} (image size from the config)", arch.vision),
                size => println!("vision:      {}, image {size}", arch.vision),
            }
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
            let positions = if arch.vision.starts_with("timm") {
                "positions"
            } else {
                "context"
            };
            println!("text:        width {width} layers {layers} {positions} {ctx} vocab {vocab}");
            println!("embed dim:   {}", arch.embed_dim);
            match arch.matching_preset() {
                Some(p) => println!("preset:      {p} (use --model {p})"),
                None => println!(
                    "preset:      none matches; pass an open_clip JSON config with --model"
                ),
            }
        }
    }
    Ok(())
}
