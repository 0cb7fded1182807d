use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_model::clip::images_tensor;
use pirclip_model::ClipModel;

use crate::common::ModelArgs;
use crate::pipeline::{encode_set, encode_texts};

/// Measure a model on the first N test images of a Karpathy JSON and print one JSON line: image encode
/// images/s (model compute on already decoded batches, as open_clip's loop measures it), text encode
/// captions/s (real captions), end-to-end eval time (decode + encode + metrics, as `pirclip eval`), load
/// time and the peak RSS of loading + evaluating. With --model and no --checkpoint the model is randomly initialised (seed 0): speed
/// does not depend on the weights. bench/compare.sh runs this next to open_clip.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Karpathy-style dataset JSON; its test split is used.
    #[arg(long)]
    json: PathBuf,
    /// Folder holding the images named in the JSON.
    #[arg(long)]
    images_dir: PathBuf,
    /// Accept absolute image paths in the dataset file (by default names must stay inside the images
    /// folder: absolute names and `..` are refused).
    #[arg(long)]
    allow_absolute_paths: bool,
    /// Test images to use (sorted file names, first N), with all their captions.
    #[arg(long, default_value_t = 256)]
    images: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Timed repetitions of the image and text encodes (the median is reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn load(a: &ModelArgs) -> Result<(ClipModel, String)> {
    match (&a.model, &a.checkpoint) {
        (Some(name), None) => {
            let config = pirclip_model::ModelConfig::from_name_or_path(name)?;
            let model = ClipModel::new(&config, crate::common::parse_device(&a.device)?);
            pirclip_model::init::initialize(model.registry(), 0);
            Ok((a.ready_for_inference(model)?, "random init, seed 0".into()))
        }
        _ => {
            let (model, path) = a.load_resolved()?;
            Ok((model, path.display().to_string()))
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let t_start = Instant::now();
    let (model, weights) = load(&a.model)?;
    let load_s = t_start.elapsed().as_secs_f64();

    let ds = Dataset::load_with(&a.json, a.allow_absolute_paths)?;
    let mut set = RetrievalSet::build(&ds, &["test"]);
    let missing = set.retain_present(&a.images_dir);
    if !missing.is_empty() {
        bail!(
            "{} test images missing from {} (first: {})",
            missing.len(),
            a.images_dir.display(),
            missing[0]
        );
    }
    let n = a.images.min(set.images.len());
    set.retain_images(|i, _| i < n);
    let opts = a.model.options();

    // End to end, as `pirclip eval` runs it (decoding on worker threads overlapping the model).
    let t_eval = Instant::now();
    let metrics = encode_set(&model, &set, &a.images_dir, opts, a.batch_size, false)?
        .metrics(&set, &[1, 5, 10]);
    let eval_s = t_eval.elapsed().as_secs_f64();
    // What `pirclip eval` would have taken and held: start to metrics, peak before the timing runs below.
    let eval_wall_s = t_start.elapsed().as_secs_f64();
    let eval_peak_rss_mb = peak_rss_mb();

    // Model compute alone on decoded batches.
    let size = model.config.image_size;
    let batches: Vec<_> = pirclip_data::loader::eval_batches(
        set.image_paths(&a.images_dir),
        size,
        a.batch_size,
        2,
        2,
    )
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let mut image_s = Vec::new();
    let mut text_s = Vec::new();
    for _ in 0..a.reps.max(1) {
        let t = Instant::now();
        for b in &batches {
            let x = images_tensor(&b.pixels, b.len, size, model.device());
            let f = tch::no_grad(|| model.encode_image(&x, opts));
            let _ = f.double_value(&[0, 0]); // wait for the device
        }
        image_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        encode_texts(&model, &set.texts, 256, true, false)?;
        text_s.push(t.elapsed().as_secs_f64());
    }
    let (image_s, text_s) = (median(image_s), median(text_s));
    let report = serde_json::json!({
        "tool": "pirclip",
        "model": model.config.name,
        "weights": weights,
        "precision": a.model.precision.name(),
        "device": a.model.device,
        "threads": tch::get_num_threads(),
        "images": n,
        "captions": set.texts.len(),
        "reps": a.reps.max(1),
        "load_s": load_s,
        "eval_s": eval_s,
        "eval_wall_s": eval_wall_s,
        "image_encode_s": image_s,
        "text_encode_s": text_s,
        "images_per_s": n as f64 / image_s,
        "captions_per_s": set.texts.len() as f64 / text_s,
        "peak_rss_mb": eval_peak_rss_mb,
        "mean_recall": metrics.mean_recall,
    });
    println!("{report}");
    Ok(())
}
