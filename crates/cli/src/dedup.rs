use std::path::PathBuf;

use anyhow::{bail, Result};
use pirclip_data::karpathy::Dataset;
use pirclip_retrieval::dedup::{find, Settings, Source};

use crate::common::ModelArgs;
use crate::progress::Bar;

/// Find test-set leaks: near-duplicate images within and across splits and datasets (a 64-bit dHash
/// within --max-hamming bits, confirmed by embedding cosine ≥ --min-cosine), and identical captions
/// across splits and datasets. Prints counts per split pair; --out writes the pairs as JSON, --plot a
/// contact sheet of the closest pairs, --write-clean the first --json without its leaked test images.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A Karpathy-style dataset JSON; repeat for more.
    #[arg(long, required = true, action = clap::ArgAction::Append)]
    json: Vec<PathBuf>,
    /// The images folder of the first, second, … --json (several after one flag, or the flag repeated);
    /// datasets without one are compared by captions.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    images_dir: Vec<PathBuf>,
    /// dHash bits (of 64) two images may differ in to be candidates.
    #[arg(long, default_value_t = 6)]
    max_hamming: u32,
    /// Embedding cosine that confirms a candidate pair as near-duplicates; it depends on the model. On
    /// RSICD-AID150 with the bundled lite0-minilm-aid150 the three true duplicates scored 0.961–1.000 and
    /// distinct but alike beaches 0.847; with pir-small-aid150 (use 0.99 there) ≥ 0.9949 and up to 0.9846.
    #[arg(long, default_value_t = 0.95)]
    min_cosine: f32,
    #[arg(long)]
    out: Option<PathBuf>,
    /// PNG contact sheet of the closest confirmed pairs (left | right, most similar first).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the first --json without the test images that have a near-duplicate outside the test split.
    #[arg(long)]
    write_clean: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Most candidate pairs kept (identical images pair with the first of them, so n copies are n − 1
    /// pairs); beyond it the rest are left out with a warning.
    #[arg(long, default_value_t = 1_000_000)]
    max_pairs: usize,
}

pub fn run(a: Args) -> Result<()> {
    if a.images_dir.len() > a.json.len() {
        bail!(
            "{} --images-dir for {} --json: each folder belongs to the --json at the same position",
            a.images_dir.len(),
            a.json.len()
        );
    }
    let sources = a
        .json
        .iter()
        .enumerate()
        .map(|(d, j)| -> Result<Source> {
            Ok(Source {
                name: j
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                dataset: Dataset::load(j)?,
                images_dir: a.images_dir.get(d).cloned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let settings = Settings {
        max_hamming: a.max_hamming,
        min_cosine: a.min_cosine,
        max_pairs: a.max_pairs,
        batch_size: a.batch_size,
        encode: a.model.options(),
    };
    let load = || a.model.load().map_err(|e| format!("{e:#}"));
    let r = find(&sources, load, &settings, &Bar::new(true)).map_err(anyhow::Error::msg)?;
    if r.truncated {
        eprintln!(
            "warning: more than {} candidate pairs; only the first were confirmed (raise --max-pairs)",
            a.max_pairs
        );
    }
    print!("{}", r.summary(&settings));
    if let Some(out) = &a.out {
        let json = r.to_json(&settings);
        pirclip_checkpoint::write_atomic(
            out,
            (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
        )?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(png) = &a.plot {
        let sheet = r.contact_sheet().map_err(anyhow::Error::msg)?;
        pirclip_checkpoint::write_atomic(png, &pirclip_image::encode_png(&sheet))?;
        eprintln!("wrote {}", png.display());
    }
    if let Some(clean) = &a.write_clean {
        let removed = r
            .write_clean(&a.json[0], clean)
            .map_err(anyhow::Error::msg)?;
        println!(
            "wrote {} without {removed} leaked test images",
            clean.display()
        );
    }
    Ok(())
}
