use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pirclip_data::karpathy::Dataset;
use pirclip_retrieval::dedup::{find, Report, Settings, Source};

use crate::common::ModelArgs;
use crate::pipeline::Bar;

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
    /// Embedding cosine that confirms a candidate pair as near-duplicates. On RSICD-AID150 (bundled
    /// model) the true duplicates found scored ≥ 0.9949 and distinct but alike beaches up to 0.9846.
    #[arg(long, default_value_t = 0.99)]
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
    print_report(&a, &r);
    if let Some(out) = &a.out {
        let json = report_json(&a, &r);
        pirclip_checkpoint::write_atomic(
            out,
            (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
        )?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(png) = &a.plot {
        contact_sheet(&r, png)?;
        eprintln!("wrote {}", png.display());
    }
    if let Some(clean) = &a.write_clean {
        let text = std::fs::read_to_string(&a.json[0])?;
        let mut v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| a.json[0].display().to_string())?;
        let list = v["images"].as_array_mut().context("no images list")?;
        let before = list.len();
        list.retain(|im| {
            let name = im["filename"].as_str().unwrap_or("").to_string();
            !(im["split"] == "test" && r.leaked.contains(&(0, name)))
        });
        let removed = before - list.len();
        pirclip_checkpoint::write_atomic(clean, serde_json::to_string(&v)?.as_bytes())?;
        println!(
            "wrote {} without {removed} leaked test images",
            clean.display()
        );
    }
    Ok(())
}

fn print_report(a: &Args, r: &Report) {
    println!(
        "images: {} hashed ({} unreadable), {} candidate pairs within {} bits, {} confirmed at cosine ≥ {}",
        r.images.len(),
        r.unreadable,
        r.candidates,
        a.max_hamming,
        r.pairs.len(),
        a.min_cosine
    );
    for (k, n) in &r.pairs_by_split {
        println!("  {k:<40} {n:>6} pairs");
    }
    for &(d, tests) in &r.test_images {
        let l = r.leaked.iter().filter(|(ds, _)| *ds == d).count();
        println!(
            "  {}: {l} of {tests} test images have a near-duplicate outside the test split",
            r.names[d]
        );
    }
    for c in &r.captions {
        let name = &r.names[c.source];
        println!(
            "captions: {name}: {} of {} distinct test captions also occur in its train/val",
            c.in_own_train_or_val, c.test_captions
        );
        for &(o, shared) in &c.in_others {
            println!(
                "          {name} test captions found in {}: {shared}",
                r.names[o]
            );
        }
    }
}

fn report_json(a: &Args, r: &Report) -> serde_json::Value {
    let mut captions = Vec::new();
    for c in &r.captions {
        let name = &r.names[c.source];
        captions.push(serde_json::json!({"dataset": name, "test_captions": c.test_captions, "in_own_train_or_val": c.in_own_train_or_val}));
        for &(o, shared) in &c.in_others {
            captions.push(serde_json::json!({"dataset": name, "other": r.names[o], "test_captions_in_other": shared}));
        }
    }
    let image = |i: usize| format!("{}:{}", r.place(i), r.images[i].filename);
    serde_json::json!({
        "max_hamming": a.max_hamming,
        "min_cosine": a.min_cosine,
        "images_hashed": r.images.len(),
        "candidate_pairs": r.candidates,
        "pairs_by_split": r.pairs_by_split,
        "leaked_test_images": r.leaked.iter().map(|(d, f)| format!("{}:{f}", r.names[*d])).collect::<Vec<_>>(),
        "captions": captions,
        "pairs": r.pairs.iter().map(|p| serde_json::json!({"a": image(p.a), "b": image(p.b), "hamming": p.hamming, "cosine": p.cosine})).collect::<Vec<_>>(),
    })
}

/// The 16 closest pairs, one per row: left | right at 128 px.
fn contact_sheet(r: &Report, path: &PathBuf) -> Result<()> {
    const S: usize = 128;
    let rows: Vec<_> = r.pairs.iter().take(16).collect();
    let mut sheet = image::RgbImage::from_pixel(
        (2 * S + 12) as u32,
        (rows.len().max(1) * (S + 6)) as u32,
        image::Rgb([255, 255, 255]),
    );
    for (row, p) in rows.iter().enumerate() {
        for (c, k) in [p.a, p.b].into_iter().enumerate() {
            let img = pirclip_image::decode_file(&r.images[k].path)?;
            let t = pirclip_image::resize_bicubic(&img, S, S);
            for y in 0..S {
                for x in 0..S {
                    let p = &t.pixels[(y * S + x) * 3..(y * S + x) * 3 + 3];
                    sheet.put_pixel(
                        (c * (S + 12) + x) as u32,
                        (row * (S + 6) + y) as u32,
                        image::Rgb([p[0], p[1], p[2]]),
                    );
                }
            }
        }
    }
    sheet
        .save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
