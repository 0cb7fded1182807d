use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pirclip_data::dedup::{dhash, near_pairs, normalize_caption};
use pirclip_data::karpathy::Dataset;

use crate::common::ModelArgs;
use crate::pipeline::encode_images;

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

struct Img {
    dataset: usize,
    filename: String,
    split: String,
    path: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if a.images_dir.len() > a.json.len() {
        bail!(
            "{} --images-dir for {} --json: each folder belongs to the --json at the same position",
            a.images_dir.len(),
            a.json.len()
        );
    }
    let datasets: Vec<Dataset> = a
        .json
        .iter()
        .map(|j| Dataset::load(j))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = a
        .json
        .iter()
        .map(|j| {
            j.file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default()
        })
        .collect();
    let mut images = Vec::new();
    for (d, dir) in a.images_dir.iter().enumerate() {
        let mut seen = HashSet::new();
        for e in &datasets[d].entries {
            if seen.insert(e.filename.clone()) {
                images.push(Img {
                    dataset: d,
                    filename: e.filename.clone(),
                    split: e.split.clone(),
                    path: dir.join(&e.filename),
                });
            }
        }
    }
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let hashed = pirclip_data::parallel_map(&images, workers, |im| {
        pirclip_image::decode_file(&im.path).map(|img| dhash(&img))
    });
    let (mut hashes, mut kept, mut unreadable) = (Vec::new(), Vec::new(), 0usize);
    for (im, h) in images.into_iter().zip(hashed) {
        match h {
            Ok(h) => {
                hashes.push(h);
                kept.push(im);
            }
            Err(_) => unreadable += 1,
        }
    }
    let images = kept;
    let found = near_pairs(&hashes, a.max_hamming, a.max_pairs);
    if found.truncated {
        eprintln!(
            "warning: more than {} candidate pairs; only the first were confirmed (raise --max-pairs)",
            a.max_pairs
        );
    }
    let candidates = found.pairs;
    // Confirm candidates by embedding similarity (only the images in a candidate pair are encoded).
    let mut involved: Vec<usize> = candidates.iter().flat_map(|&(i, j, _)| [i, j]).collect();
    involved.sort_unstable();
    involved.dedup();
    let mut pairs: Vec<(usize, usize, u32, f32)> = Vec::new();
    if !involved.is_empty() {
        let model = a.model.load()?;
        let paths: Vec<PathBuf> = involved.iter().map(|&i| images[i].path.clone()).collect();
        let e = encode_images(&model, &paths, a.model.options(), a.batch_size, true, true)?;
        let row: HashMap<usize, usize> =
            involved.iter().enumerate().map(|(r, &i)| (i, r)).collect();
        for &(i, j, d) in &candidates {
            let (ri, rj) = (row[&i], row[&j]);
            let cos: f32 = e.values[ri * e.dim..(ri + 1) * e.dim]
                .iter()
                .zip(&e.values[rj * e.dim..(rj + 1) * e.dim])
                .map(|(x, y)| x * y)
                .sum();
            if cos >= a.min_cosine {
                pairs.push((i, j, d, cos));
            }
        }
    }
    pairs.sort_by(|x, y| y.3.total_cmp(&x.3));
    let place = |im: &Img| format!("{}:{}", names[im.dataset], im.split);
    let mut per_split: BTreeMap<String, usize> = BTreeMap::new();
    let mut leaked: HashSet<(usize, String)> = HashSet::new();
    for &(i, j, _, _) in &pairs {
        let (x, y) = (&images[i], &images[j]);
        let (p, q) = (place(x), place(y));
        let key = if p <= q {
            format!("{p} ~ {q}")
        } else {
            format!("{q} ~ {p}")
        };
        *per_split.entry(key).or_default() += 1;
        for (t, other) in [(x, y), (y, x)] {
            if t.split == "test" && other.split != "test" {
                leaked.insert((t.dataset, t.filename.clone()));
            }
        }
    }
    println!(
        "images: {} hashed ({unreadable} unreadable), {} candidate pairs within {} bits, {} confirmed at cosine ≥ {}",
        hashes.len(),
        candidates.len(),
        a.max_hamming,
        pairs.len(),
        a.min_cosine
    );
    for (k, n) in &per_split {
        println!("  {k:<40} {n:>6} pairs");
    }
    for (d, name) in names.iter().enumerate().take(a.images_dir.len()) {
        let tests = datasets[d]
            .entries
            .iter()
            .filter(|e| e.split == "test")
            .count();
        let l = leaked.iter().filter(|(ds, _)| *ds == d).count();
        println!(
            "  {name}: {l} of {tests} test images have a near-duplicate outside the test split"
        );
    }
    // Captions.
    let mut where_: HashMap<String, HashSet<(usize, String)>> = HashMap::new();
    for (d, ds) in datasets.iter().enumerate() {
        for e in &ds.entries {
            for c in &e.captions {
                where_
                    .entry(normalize_caption(c))
                    .or_default()
                    .insert((d, e.split.clone()));
            }
        }
    }
    let mut caption_report = Vec::new();
    for (d, name) in names.iter().enumerate() {
        let tests: HashSet<String> = datasets[d]
            .entries
            .iter()
            .filter(|e| e.split == "test")
            .flat_map(|e| e.captions.iter().map(|c| normalize_caption(c)))
            .collect();
        if tests.is_empty() {
            continue;
        }
        let in_train = tests
            .iter()
            .filter(|c| where_[*c].iter().any(|(od, s)| *od == d && s != "test"))
            .count();
        println!(
            "captions: {name}: {in_train} of {} distinct test captions also occur in its train/val",
            tests.len()
        );
        caption_report.push(serde_json::json!({"dataset": name, "test_captions": tests.len(), "in_own_train_or_val": in_train}));
        for (o, other) in names.iter().enumerate() {
            if o == d {
                continue;
            }
            let shared = tests
                .iter()
                .filter(|c| where_[*c].iter().any(|(od, _)| *od == o))
                .count();
            println!("          {name} test captions found in {other}: {shared}");
            caption_report.push(serde_json::json!({"dataset": name, "other": other, "test_captions_in_other": shared}));
        }
    }
    if let Some(out) = &a.out {
        let report = serde_json::json!({
            "max_hamming": a.max_hamming,
            "min_cosine": a.min_cosine,
            "images_hashed": hashes.len(),
            "candidate_pairs": candidates.len(),
            "pairs_by_split": per_split,
            "leaked_test_images": leaked.iter().map(|(d, f)| format!("{}:{f}", names[*d])).collect::<Vec<_>>(),
            "captions": caption_report,
            "pairs": pairs.iter().map(|&(i, j, d, c)| serde_json::json!({"a": format!("{}:{}", place(&images[i]), images[i].filename), "b": format!("{}:{}", place(&images[j]), images[j].filename), "hamming": d, "cosine": c})).collect::<Vec<_>>(),
        });
        pirclip_checkpoint::write_atomic(
            out,
            (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
        )?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(png) = &a.plot {
        contact_sheet(&images, &pairs, png)?;
        eprintln!("wrote {}", png.display());
    }
    if let Some(clean) = &a.write_clean {
        let text = std::fs::read_to_string(&a.json[0])?;
        let mut v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| a.json[0].display().to_string())?;
        let list = v["images"].as_array_mut().context("no images list")?;
        let before = list.len();
        list.retain(|im| {
            !(im["split"] == "test"
                && leaked.contains(&(0, im["filename"].as_str().unwrap_or("").to_string())))
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

/// The 16 closest pairs, one per row: left | right at 128 px.
fn contact_sheet(images: &[Img], pairs: &[(usize, usize, u32, f32)], path: &PathBuf) -> Result<()> {
    const S: usize = 128;
    let rows: Vec<_> = pairs.iter().take(16).collect();
    let mut sheet = image::RgbImage::from_pixel(
        (2 * S + 12) as u32,
        (rows.len().max(1) * (S + 6)) as u32,
        image::Rgb([255, 255, 255]),
    );
    for (r, &&(i, j, _, _)) in rows.iter().enumerate() {
        for (c, k) in [i, j].into_iter().enumerate() {
            let img = pirclip_image::decode_file(&images[k].path)?;
            let t = pirclip_image::resize_bicubic(&img, S, S);
            for y in 0..S {
                for x in 0..S {
                    let p = &t.pixels[(y * S + x) * 3..(y * S + x) * 3 + 3];
                    sheet.put_pixel(
                        (c * (S + 12) + x) as u32,
                        (r * (S + 6) + y) as u32,
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
