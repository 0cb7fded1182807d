use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pirclip_model::ClipModel;
use pirclip_retrieval::evaluate::{self as retrieval, prepare, EvalSpec, TestSet};
use serde_json::json;

use crate::common::{flag_name, ModelArgs};
use crate::progress::Bar;

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

impl Args {
    pub fn spec(&self) -> EvalSpec {
        EvalSpec {
            json: self.json.clone(),
            images_dir: self.images_dir.clone(),
            split: self.split.clone(),
            batch_size: self.batch_size,
            recall_k: self.recall_k.clone(),
            bootstrap: self.bootstrap,
            skip_missing: self.skip_missing,
            allow_absolute_paths: self.allow_absolute_paths,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let test = prepare(&a.spec()).map_err(anyhow::Error::msg)?;
    let (model, checkpoint) = a.model.load_resolved()?;
    evaluate(&a, &test, &model, &checkpoint)
}

/// Encodes the prepared set with `model` (loaded from `checkpoint`), prints and writes the metrics.
pub fn evaluate(a: &Args, test: &TestSet, model: &ClipModel, checkpoint: &Path) -> Result<()> {
    let (spec, margs) = (a.spec(), &a.model);
    if let Some(first) = test.missing.first() {
        eprintln!(
            "skipping {} missing images (first: {first}); evaluating {}",
            test.missing.len(),
            test.set.images.len()
        );
    }
    let e = retrieval::evaluate(&spec, test, model, margs.options(), &Bar::new(true))?;
    let skipped = match test.missing.len() {
        0 => String::new(),
        n => format!(" ({n} missing images skipped)"),
    };
    println!(
        "retrieval: {} split {} — {} images, {} texts{skipped}",
        a.json.display(),
        a.split,
        e.images,
        e.texts
    );
    println!("{}", e.table());
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!(
        "{:.1} s in all; encoding {:.1} s: images {:.1}/s, texts {:.1}/s",
        e.seconds,
        e.image_seconds + e.text_seconds,
        e.images as f64 / e.image_seconds,
        e.texts as f64 / e.text_seconds
    );
    if let Some(dir) = &a.embeddings_out {
        e.write_embeddings(dir, test).map_err(anyhow::Error::msg)?;
    }
    if let Some(out) = &a.out {
        let settings = json!({
            "model": model.config.name,
            "checkpoint": checkpoint.display().to_string(),
            "checkpoint_sha256": pirclip_index::sha256_file(checkpoint).context("hashing the checkpoint")?,
            "dataset": a.json.display().to_string(),
            "dataset_name": test.dataset_name,
            "images_dir": a.images_dir.display().to_string(),
            "split": a.split,
            "images": e.images,
            "texts": e.texts,
            "missing_images_skipped": test.missing.len(),
            "bn_mode": flag_name(&margs.bn_mode),
            "belief_mode": flag_name(&margs.belief_mode),
            "batch_size": a.batch_size,
            "device": margs.device,
            "precision": margs.precision.name(),
            "exact_fp32": margs.exact_fp32,
            "recall_k": a.recall_k,
            "seconds": e.seconds,
            "pirclip_version": env!("CARGO_PKG_VERSION"),
        });
        let text = serde_json::to_string_pretty(&e.report(settings))? + "\n";
        pirclip_checkpoint::write_atomic(out, text.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
