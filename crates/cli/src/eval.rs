use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_data::metrics::round2;
use pirclip_model::ClipModel;
use serde_json::json;

use crate::common::{BeliefModeArg, ModelArgs};
use crate::pipeline::encode_set;

/// Retrieval evaluation exactly as the official retrieval.py (spec §7): test images sorted by file name,
/// all captions of each, cosine similarity, R@k image→text and text→image, mean recall.
///
/// To reproduce published numbers of the released checkpoint use `--bn-mode batch --batch-size 64` (the
/// official script never switches BatchNorm to eval mode); the default, running statistics, is the right
/// choice for models you train. The official flag names are accepted as aliases.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Karpathy-style dataset JSON (dataset_rsitmd.json, dataset_rsicd.json, ...).
    #[arg(long, alias = "retrieval-json-dir")]
    pub json: PathBuf,
    /// Folder holding the images named in the JSON.
    #[arg(long, alias = "retrieval-images-dir")]
    pub images_dir: PathBuf,
    /// Split(s) to evaluate, comma separated.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Images per forward pass; with --bn-mode batch it also fixes the BatchNorm statistics (official: 64).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Recall cut-offs, comma separated.
    #[arg(long, default_value = "1,5,10", value_delimiter = ',')]
    pub recall_k: Vec<usize>,
    /// Bootstrap draws of the test images for an interval around mean recall (0: none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Write the metrics (and the run's settings) as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Save img_emb.npy, text_emb.npy and text_to_image.npy here.
    #[arg(long)]
    pub embeddings_out: Option<PathBuf>,
    /// Evaluate on the images present in --images-dir, skipping the missing ones (and their captions).
    #[arg(long)]
    pub skip_missing: bool,
    /// Accept absolute image paths in the dataset file (by default names must stay inside the images
    /// folder: absolute names and `..` are refused).
    #[arg(long)]
    pub allow_absolute_paths: bool,
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(pirclip_index::sha256_file(path)?)
}

/// The test set, checked against the image folder before any model is loaded.
pub struct Prepared {
    started: Instant,
    dataset_name: String,
    set: RetrievalSet,
    missing: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    let prepared = prepare(&a)?;
    let (model, checkpoint) = a.model.load_resolved()?;
    evaluate(&a, prepared, &model, &checkpoint)
}

pub fn prepare(a: &Args) -> Result<Prepared> {
    let started = Instant::now();
    if a.recall_k.is_empty() || a.recall_k.contains(&0) {
        bail!("--recall-k needs positive integers, e.g. 1,5,10");
    }
    let ds = Dataset::load_with(&a.json, a.allow_absolute_paths)?;
    let splits: Vec<&str> = a.split.split(',').map(str::trim).collect();
    let mut set = RetrievalSet::build(&ds, &splits);
    if set.images.is_empty() {
        bail!("{}: no images in split(s) {:?}", a.json.display(), splits);
    }
    let listed = set.images.len();
    let missing = set.retain_present(&a.images_dir);
    if !missing.is_empty() {
        let first: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        if !a.skip_missing {
            bail!(
                "{} of {listed} images of split {:?} are missing from {} (first: {}); pass --skip-missing to evaluate on the {} present ones",
                missing.len(),
                a.split,
                a.images_dir.display(),
                first.join(", "),
                listed - missing.len()
            );
        }
        eprintln!(
            "skipping {} missing images (first: {}); evaluating {} of {listed}",
            missing.len(),
            first.join(", "),
            set.images.len()
        );
    }
    Ok(Prepared {
        started,
        dataset_name: ds.name,
        set,
        missing,
    })
}

/// Encodes the prepared set with `model` (loaded from `checkpoint_path`), prints and writes the metrics.
pub fn evaluate(a: &Args, p: Prepared, model: &ClipModel, checkpoint_path: &Path) -> Result<()> {
    let Prepared {
        started: t0,
        dataset_name,
        set,
        missing,
    } = p;
    let margs = &a.model;
    let enc = encode_set(
        model,
        &set,
        &a.images_dir,
        margs.options(),
        a.batch_size,
        true,
    )?;
    let m = enc.metrics(&set, &a.recall_k);
    let boot = enc.bootstrap(&set, &a.recall_k, a.bootstrap);
    let (img, txt) = (&enc.img, &enc.txt);
    let (ni, nt) = (img.rows, txt.rows);
    let (img_s, txt_s) = (enc.image_seconds, enc.text_seconds);
    let enc_s = img_s + txt_s;
    let seconds = t0.elapsed().as_secs_f64();

    println!(
        "retrieval: {} split {} — {ni} images, {nt} texts{}",
        a.json.display(),
        a.split,
        if missing.is_empty() {
            String::new()
        } else {
            format!(" ({} missing images skipped)", missing.len())
        }
    );
    let header: String = a
        .recall_k
        .iter()
        .map(|k| format!("{:>8}", format!("R@{k}")))
        .collect();
    println!("{:<14}{header}", "");
    let row = |v: &[f64]| -> String { v.iter().map(|x| format!("{:>8.2}", x)).collect() };
    println!("{:<14}{}", "image→text", row(&m.image_to_text));
    println!("{:<14}{}", "text→image", row(&m.text_to_image));
    println!("{:<14}{:>8.2}", "mean recall", m.mean_recall);
    println!(
        "median rank   image→text {:.1}, text→image {:.1}; mean rank {:.1} / {:.1}",
        m.i2t_median_rank, m.t2i_median_rank, m.i2t_mean_rank, m.t2i_mean_rank
    );
    if let Some(b) = &boot {
        println!(
            "mean recall 95% interval {:.2}–{:.2} (± {:.2} s.d.; {} bootstrap draws of the {ni} test images)",
            b.low, b.high, b.std, b.samples
        );
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!(
        "{seconds:.1} s in all; encoding {enc_s:.1} s: images {:.1}/s, texts {:.1}/s",
        ni as f64 / img_s,
        nt as f64 / txt_s
    );

    if let Some(dir) = &a.embeddings_out {
        std::fs::create_dir_all(dir)?;
        pirclip_checkpoint::npy::write(dir.join("img_emb.npy"), &img.to_tensor_data())?;
        pirclip_checkpoint::npy::write(dir.join("text_emb.npy"), &txt.to_tensor_data())?;
        let t2i: Vec<i64> = set.text_to_image.iter().map(|&i| i as i64).collect();
        pirclip_checkpoint::npy::write(
            dir.join("text_to_image.npy"),
            &pirclip_checkpoint::TensorData::from_i64(vec![nt], &t2i),
        )?;
        crate::common::write_lines(&dir.join("images.txt"), set.images.clone())?;
    }
    if let Some(out) = &a.out {
        let mut obj = serde_json::Map::new();
        let mut raw = serde_json::Map::new();
        for (k, v) in m.official() {
            obj.insert(k.clone(), json!(round2(v)));
            raw.insert(k, json!(v));
        }
        raw.insert("image2text-median-rank".into(), json!(m.i2t_median_rank));
        raw.insert("image2text-mean-rank".into(), json!(m.i2t_mean_rank));
        raw.insert("text2image-median-rank".into(), json!(m.t2i_median_rank));
        raw.insert("text2image-mean-rank".into(), json!(m.t2i_mean_rank));
        if let Some(b) = &boot {
            raw.insert(
                "mean-recall-bootstrap".into(),
                json!({"samples": b.samples, "std": b.std, "ci95": [b.low, b.high]}),
            );
        }
        obj.insert("raw".into(), serde_json::Value::Object(raw));
        obj.insert(
            "settings".into(),
            json!({
                "model": model.config.name,
                "checkpoint": checkpoint_path.display().to_string(),
                "checkpoint_sha256": sha256_file(checkpoint_path).context("hashing the checkpoint")?,
                "dataset": a.json.display().to_string(),
                "dataset_name": dataset_name,
                "images_dir": a.images_dir.display().to_string(),
                "split": a.split,
                "images": ni,
                "texts": nt,
                "missing_images_skipped": missing.len(),
                "bn_mode": format!("{:?}", margs.bn_mode).to_lowercase(),
                "belief_mode": match margs.belief_mode { BeliefModeArg::BeliefPlusIndex => "belief_plus_index", BeliefModeArg::BeliefOnly => "belief_only" },
                "batch_size": a.batch_size,
                "device": margs.device,
                "precision": margs.precision.name(),
                "exact_fp32": margs.exact_fp32,
                "recall_k": a.recall_k,
                "seconds": seconds,
                "pirclip_version": env!("CARGO_PKG_VERSION"),
            }),
        );
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(obj))? + "\n";
        pirclip_checkpoint::write_atomic(out, text.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
