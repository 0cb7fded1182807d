//! Encoding pipelines on a PIR-CLIP model, shared by eval, bench, training validation, search, embed and
//! classify: images decoded on worker threads while the model runs; captions tokenised and batched by
//! length so short captions run short sequences; similarities and the official retrieval metrics.
//! Progress is reported through `Progress`, so command-line bars and servers are thin callers.

pub mod classify;
pub mod dedup;
pub mod evaluate;
pub mod explain;
pub mod speed;

use std::path::{Path, PathBuf};
use std::time::Instant;

use pirclip_data::karpathy::RetrievalSet;
use pirclip_data::metrics::{Metrics, Retrieval};
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::{l2_normalize, ClipModel, EncodeOptions};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("preprocessing images: {0}")]
    Image(String),
    #[error("the image pipeline ended after {done} of {total} images")]
    Incomplete { done: usize, total: usize },
}

/// Progress of a long encoding: `start` once per pass with its total, then `advance` as items finish.
pub trait Progress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}

/// No progress reporting.
pub struct Quiet;

impl Progress for Quiet {}

/// Row-major `[n, dim]` embeddings.
pub struct Embeddings {
    pub rows: usize,
    pub dim: usize,
    pub values: Vec<f32>,
}

impl Embeddings {
    pub fn to_tensor_data(&self) -> pirclip_checkpoint::TensorData {
        pirclip_checkpoint::TensorData::from_f32(vec![self.rows, self.dim], &self.values)
    }
}

/// A tensor's values as f32, on the host.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.copy_data(&mut v, n);
    v
}

fn decode_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
}

/// Encodes images in the given order (batches of `batch_size`, which matters for `--bn-mode batch`).
pub fn encode_images(
    model: &ClipModel,
    paths: &[PathBuf],
    opts: EncodeOptions,
    batch_size: usize,
    normalize: bool,
    progress: &dyn Progress,
) -> Result<Embeddings, Error> {
    let size = model.config.image_size;
    let dim = model.config.embed_dim;
    progress.start("images", paths.len() as u64);
    let mut values = Vec::with_capacity(paths.len() * dim);
    let rx =
        pirclip_data::loader::eval_batches(paths.to_vec(), size, batch_size, decode_workers(), 2);
    for batch in rx {
        let batch = batch.map_err(|e| Error::Image(e.to_string()))?;
        let x = images_tensor(&batch.pixels, batch.len, size, model.device());
        let f = tch::no_grad(|| {
            let f = model.encode_image(&x, opts);
            if normalize {
                l2_normalize(&f)
            } else {
                f
            }
        });
        values.extend(to_vec(&f));
        progress.advance(batch.len as u64);
    }
    progress.finish();
    if values.len() != paths.len() * dim {
        return Err(Error::Incomplete {
            done: values.len() / dim.max(1),
            total: paths.len(),
        });
    }
    Ok(Embeddings {
        rows: paths.len(),
        dim,
        values,
    })
}

/// Encodes captions; rows come back in input order. Captions are grouped by token length so each batch
/// runs only up to its longest caption's EOT.
pub fn encode_texts(
    model: &ClipModel,
    captions: &[String],
    batch_size: usize,
    normalize: bool,
    progress: &dyn Progress,
) -> Embeddings {
    let tok = model.tokenizer();
    let ctx = model.config.text.context_length;
    let dim = model.config.embed_dim;
    let ids: Vec<Vec<i64>> = captions.iter().map(|c| tok.tokenize(c, ctx)).collect();
    let mut order: Vec<usize> = (0..captions.len()).collect();
    order.sort_by_key(|&i| tok.content_length(&ids[i]));
    progress.start("texts", captions.len() as u64);
    let mut values = vec![0f32; captions.len() * dim];
    for chunk in order.chunks(batch_size.max(1)) {
        let flat: Vec<i64> = chunk.iter().flat_map(|&i| ids[i].iter().copied()).collect();
        let t = ids_tensor(&flat, chunk.len(), model.device());
        let f = tch::no_grad(|| {
            let f = model.encode_text(&t);
            if normalize {
                l2_normalize(&f)
            } else {
                f
            }
        });
        let v = to_vec(&f);
        for (row, &i) in chunk.iter().enumerate() {
            values[i * dim..(i + 1) * dim].copy_from_slice(&v[row * dim..(row + 1) * dim]);
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Embeddings {
        rows: captions.len(),
        dim,
        values,
    }
}

/// Cosine similarities `texts × images` (row-major `[n_texts, n_images]`) of normalised embeddings.
pub fn similarity(img: &Embeddings, txt: &Embeddings) -> Vec<f32> {
    let it = Tensor::from_slice(&img.values).view([img.rows as i64, img.dim as i64]);
    let tt = Tensor::from_slice(&txt.values).view([txt.rows as i64, txt.dim as i64]);
    to_vec(&tt.matmul(&it.tr()))
}

/// The `top_k` images of every text, best first (ties by image order), as (image row, cosine).
pub fn rank(img: &Embeddings, txt: &Embeddings, top_k: usize) -> Vec<Vec<(usize, f32)>> {
    let scores = similarity(img, txt);
    (0..txt.rows)
        .map(|q| {
            let row = &scores[q * img.rows..(q + 1) * img.rows];
            let mut scored: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            scored.truncate(top_k);
            scored
        })
        .collect()
}

/// A retrieval set encoded (normalised rows), with the seconds each side took.
pub struct EncodedSet {
    pub img: Embeddings,
    pub txt: Embeddings,
    pub image_seconds: f64,
    pub text_seconds: f64,
}

/// Encodes the images and captions of `set` as `pirclip eval` does.
pub fn encode_set(
    model: &ClipModel,
    set: &RetrievalSet,
    images_dir: &Path,
    opts: EncodeOptions,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<EncodedSet, Error> {
    let t = Instant::now();
    let img = encode_images(
        model,
        &set.image_paths(images_dir),
        opts,
        batch_size,
        true,
        progress,
    )?;
    let image_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let txt = encode_texts(model, &set.texts, 256, true, progress);
    Ok(EncodedSet {
        img,
        txt,
        image_seconds,
        text_seconds: t.elapsed().as_secs_f64(),
    })
}

impl EncodedSet {
    /// The official retrieval metrics at the recall cut-offs `ks`.
    pub fn metrics(&self, set: &RetrievalSet, ks: &[usize]) -> Metrics {
        self.retrieval(set, |r| r.metrics(ks))
    }

    /// Bootstrap interval of mean recall over the test images (`Retrieval::bootstrap`).
    pub fn bootstrap(
        &self,
        set: &RetrievalSet,
        ks: &[usize],
        samples: usize,
    ) -> Option<pirclip_data::metrics::Bootstrap> {
        self.retrieval(set, |r| r.bootstrap(ks, samples, 0))
    }

    fn retrieval<R>(&self, set: &RetrievalSet, f: impl FnOnce(&Retrieval) -> R) -> R {
        let scores = similarity(&self.img, &self.txt);
        f(&Retrieval {
            scores: &scores,
            n_texts: self.txt.rows,
            n_images: self.img.rows,
            text_to_image: &set.text_to_image,
        })
    }
}
