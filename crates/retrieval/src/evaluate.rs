//! Retrieval evaluation exactly as the official retrieval.py (spec §7): the split's images sorted by file
//! name with all their captions, cosine similarity, R@k both ways and mean recall; plus what the official
//! script lacks: a bootstrap interval, ranks, a CLIP_benchmark-style JSON report and the embeddings.
//! `pirclip eval` and `pirclip demo` are this module with flags and printing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_data::metrics::{round2, Bootstrap, Metrics};
use pirclip_model::{ClipModel, EncodeOptions};
use serde_json::{json, Value};

use crate::{encode_set, EncodedSet, Progress};

/// Which test set, and how to score it.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Karpathy-style dataset JSON.
    pub json: PathBuf,
    pub images_dir: PathBuf,
    /// Splits, comma separated.
    pub split: String,
    /// Images per forward pass (with batch BatchNorm statistics it also fixes them: official 64).
    pub batch_size: usize,
    pub recall_k: Vec<usize>,
    /// Bootstrap draws of the test images (0: no interval).
    pub bootstrap: usize,
    /// Evaluate on the images present, dropping the missing ones and their captions.
    pub skip_missing: bool,
    pub allow_absolute_paths: bool,
}

impl EvalSpec {
    /// The split `split` of `json` with the official cut-offs 1, 5, 10 and 1,000 bootstrap draws.
    pub fn new(json: PathBuf, images_dir: PathBuf, split: &str) -> Self {
        EvalSpec {
            json,
            images_dir,
            split: split.into(),
            batch_size: 64,
            recall_k: vec![1, 5, 10],
            bootstrap: 1000,
            skip_missing: false,
            allow_absolute_paths: false,
        }
    }
}

/// The test set, checked against the image folder before any model is loaded.
pub struct TestSet {
    started: Instant,
    pub dataset_name: String,
    pub set: RetrievalSet,
    /// Images of the split missing from the folder (skipped with `skip_missing`).
    pub missing: Vec<String>,
}

/// Reads the split and checks its images are there; fails on missing images unless `skip_missing`,
/// naming the first few.
pub fn prepare(spec: &EvalSpec) -> Result<TestSet, String> {
    let started = Instant::now();
    if spec.recall_k.is_empty() || spec.recall_k.contains(&0) {
        return Err("--recall-k needs positive integers, e.g. 1,5,10".into());
    }
    let ds =
        Dataset::load_with(&spec.json, spec.allow_absolute_paths).map_err(|e| e.to_string())?;
    let splits: Vec<&str> = spec.split.split(',').map(str::trim).collect();
    let mut set = RetrievalSet::build(&ds, &splits);
    if set.images.is_empty() {
        return Err(format!(
            "{}: no images in split(s) {:?}",
            spec.json.display(),
            splits
        ));
    }
    let listed = set.images.len();
    let missing = set.retain_present(&spec.images_dir);
    if !missing.is_empty() && !spec.skip_missing {
        let first: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        return Err(format!(
            "{} of {listed} images of split {:?} are missing from {} (first: {}); pass --skip-missing to evaluate on the {} present ones",
            missing.len(),
            spec.split,
            spec.images_dir.display(),
            first.join(", "),
            listed - missing.len()
        ));
    }
    Ok(TestSet {
        started,
        dataset_name: ds.name,
        set,
        missing,
    })
}

/// The scores of one evaluation and what it took.
pub struct Evaluation {
    pub metrics: Metrics,
    pub bootstrap: Option<Bootstrap>,
    pub images: usize,
    pub texts: usize,
    pub image_seconds: f64,
    pub text_seconds: f64,
    /// From `prepare` to the metrics.
    pub seconds: f64,
    pub encoded: EncodedSet,
}

/// Encodes the test set with `model` and scores it.
pub fn evaluate(
    spec: &EvalSpec,
    test: &TestSet,
    model: &ClipModel,
    opts: EncodeOptions,
    progress: &dyn Progress,
) -> Result<Evaluation, crate::Error> {
    let encoded = encode_set(
        model,
        &test.set,
        &spec.images_dir,
        opts,
        spec.batch_size,
        progress,
    )?;
    let metrics = encoded.metrics(&test.set, &spec.recall_k);
    let bootstrap = encoded.bootstrap(&test.set, &spec.recall_k, spec.bootstrap);
    Ok(Evaluation {
        metrics,
        bootstrap,
        images: encoded.img.rows,
        texts: encoded.txt.rows,
        image_seconds: encoded.image_seconds,
        text_seconds: encoded.text_seconds,
        seconds: test.started.elapsed().as_secs_f64(),
        encoded,
    })
}

impl Evaluation {
    /// The official metrics rounded to two decimals (`retrieval-image2text-R@1`, …, `retrieval-mean-recall`)
    /// in one JSON object as CLIP_benchmark writes its results, the unrounded values and the ranks under
    /// `raw`, and `settings` as given.
    pub fn report(&self, settings: Value) -> Value {
        let mut obj = serde_json::Map::new();
        let mut raw = serde_json::Map::new();
        for (k, v) in self.metrics.official() {
            obj.insert(k.clone(), json!(round2(v)));
            raw.insert(k, json!(v));
        }
        let m = &self.metrics;
        raw.insert("image2text-median-rank".into(), json!(m.i2t_median_rank));
        raw.insert("image2text-mean-rank".into(), json!(m.i2t_mean_rank));
        raw.insert("text2image-median-rank".into(), json!(m.t2i_median_rank));
        raw.insert("text2image-mean-rank".into(), json!(m.t2i_mean_rank));
        if let Some(b) = &self.bootstrap {
            raw.insert(
                "mean-recall-bootstrap".into(),
                json!({"samples": b.samples, "std": b.std, "ci95": [b.low, b.high]}),
            );
        }
        obj.insert("raw".into(), Value::Object(raw));
        obj.insert("settings".into(), settings);
        Value::Object(obj)
    }

    /// The metrics as a table: R@k both ways, mean recall, ranks and the interval.
    pub fn table(&self) -> String {
        let m = &self.metrics;
        let header: String =
            m.ks.iter()
                .map(|k| format!("{:>8}", format!("R@{k}")))
                .collect();
        let row = |v: &[f64]| -> String { v.iter().map(|x| format!("{x:>8.2}")).collect() };
        let mut t = format!("{:<14}{header}\n", "");
        t += &format!("{:<14}{}\n", "image→text", row(&m.image_to_text));
        t += &format!("{:<14}{}\n", "text→image", row(&m.text_to_image));
        t += &format!("{:<14}{:>8.2}\n", "mean recall", m.mean_recall);
        t += &format!(
            "median rank   image→text {:.1}, text→image {:.1}; mean rank {:.1} / {:.1}",
            m.i2t_median_rank, m.t2i_median_rank, m.i2t_mean_rank, m.t2i_mean_rank
        );
        if let Some(b) = &self.bootstrap {
            t += &format!(
                "\nmean recall 95% interval {:.2}–{:.2} (± {:.2} s.d.; {} bootstrap draws of the {} test images)",
                b.low, b.high, b.std, b.samples, self.images
            );
        }
        t
    }

    /// `img_emb.npy`, `text_emb.npy`, `text_to_image.npy` and `images.txt` in `dir`.
    pub fn write_embeddings(&self, dir: &Path, test: &TestSet) -> Result<(), String> {
        let io = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
        let npy = |name: &str, data: &pirclip_checkpoint::TensorData| {
            pirclip_checkpoint::npy::write(dir.join(name), data).map_err(|e| io(&e))
        };
        npy("img_emb.npy", &self.encoded.img.to_tensor_data())?;
        npy("text_emb.npy", &self.encoded.txt.to_tensor_data())?;
        let t2i: Vec<i64> = test.set.text_to_image.iter().map(|&i| i as i64).collect();
        npy(
            "text_to_image.npy",
            &pirclip_checkpoint::TensorData::from_i64(vec![t2i.len()], &t2i),
        )?;
        let names: String = test.set.images.iter().map(|n| format!("{n}\n")).collect();
        pirclip_checkpoint::write_atomic(&dir.join("images.txt"), names.as_bytes())
            .map_err(|e| io(&e))
    }
}
