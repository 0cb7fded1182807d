use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use pirclip_model::ClipModel;
use pirclip_retrieval::speed::{measure, SpeedSpec};

use crate::common::ModelArgs;

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
    let spec = SpeedSpec {
        json: a.json,
        images_dir: a.images_dir,
        allow_absolute_paths: a.allow_absolute_paths,
        images: a.images,
        batch_size: a.batch_size,
        reps: a.reps,
    };
    let s = measure(&model, a.model.options(), &spec).map_err(anyhow::Error::msg)?;
    let report = serde_json::json!({
        "tool": "pirclip",
        "model": model.config.name,
        "weights": weights,
        "precision": a.model.precision.name(),
        "device": a.model.device,
        "threads": tch::get_num_threads(),
        "images": s.images,
        "captions": s.captions,
        "reps": s.reps,
        "load_s": load_s,
        "eval_s": s.eval_s,
        // What `pirclip eval` would have taken: start to metrics.
        "eval_wall_s": load_s + s.setup_s + s.eval_s,
        "image_encode_s": s.image_encode_s,
        "text_encode_s": s.text_encode_s,
        "images_per_s": s.images as f64 / s.image_encode_s,
        "captions_per_s": s.captions as f64 / s.text_encode_s,
        "peak_rss_mb": s.peak_rss_mb,
        "mean_recall": s.mean_recall,
    });
    println!("{report}");
    Ok(())
}
