//! How fast a model encodes, measured as `pirclip bench` reports it (and bench/compare.sh compares with
//! open_clip): the end-to-end evaluation of the first test images (decode, encode, metrics) with its peak
//! memory, then model compute alone on already decoded batches (as open_clip's loop measures it) and the
//! captions, each the median of `reps` runs.

use std::path::PathBuf;
use std::time::Instant;

use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_model::clip::images_tensor;
use pirclip_model::{ClipModel, EncodeOptions};

use crate::{encode_set, encode_texts, Quiet};

/// What to measure on.
pub struct SpeedSpec {
    /// A Karpathy JSON; its test split is used.
    pub json: PathBuf,
    pub images_dir: PathBuf,
    pub allow_absolute_paths: bool,
    /// The first this many test images (and their captions).
    pub images: usize,
    pub batch_size: usize,
    pub reps: usize,
}

/// The measurements, in seconds unless named otherwise.
pub struct Speed {
    pub images: usize,
    pub captions: usize,
    pub reps: usize,
    /// Reading the dataset and checking its images.
    pub setup_s: f64,
    /// The end-to-end evaluation (decode + encode + metrics) and its mean recall.
    pub eval_s: f64,
    pub mean_recall: f64,
    /// Peak resident memory of the process after the evaluation (MB; NaN where /proc is absent).
    pub peak_rss_mb: f64,
    pub image_encode_s: f64,
    pub text_encode_s: f64,
}

/// Measures `model` on `spec`'s images; fails if any of the test images is missing.
pub fn measure(model: &ClipModel, opts: EncodeOptions, spec: &SpeedSpec) -> Result<Speed, String> {
    let started = Instant::now();
    let ds =
        Dataset::load_with(&spec.json, spec.allow_absolute_paths).map_err(|e| e.to_string())?;
    let mut set = RetrievalSet::build(&ds, &["test"]);
    let missing = set.retain_present(&spec.images_dir);
    if let Some(first) = missing.first() {
        return Err(format!(
            "{} test images missing from {} (first: {first})",
            missing.len(),
            spec.images_dir.display()
        ));
    }
    let n = spec.images.min(set.images.len());
    set.retain_images(|i, _| i < n);
    let setup_s = started.elapsed().as_secs_f64();
    let t = Instant::now();
    let encoded = encode_set(model, &set, &spec.images_dir, opts, spec.batch_size, &Quiet)
        .map_err(|e| e.to_string())?;
    let mean_recall = encoded.metrics(&set, &[1, 5, 10]).mean_recall;
    let eval_s = t.elapsed().as_secs_f64();
    let peak_rss_mb = peak_rss_mb();

    let size = model.config.image_size;
    let paths = set.image_paths(&spec.images_dir);
    let batches = pirclip_data::loader::eval_batches(paths, size, spec.batch_size, 2, 2)
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let reps = spec.reps.max(1);
    let (mut image_s, mut text_s) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        for b in &batches {
            let x = images_tensor(&b.pixels, b.len, size, model.device());
            let f = tch::no_grad(|| model.encode_image(&x, opts));
            let _ = f.double_value(&[0, 0]); // wait for the device
        }
        image_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        encode_texts(model, &set.texts, 256, true, &Quiet);
        text_s.push(t.elapsed().as_secs_f64());
    }
    Ok(Speed {
        images: n,
        captions: set.texts.len(),
        reps,
        setup_s,
        eval_s,
        mean_recall,
        peak_rss_mb,
        image_encode_s: median(image_s),
        text_encode_s: median(text_s),
    })
}

/// The process's peak resident memory (VmHWM), MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
