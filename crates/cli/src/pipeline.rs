//! Encoding pipelines shared by `embed` and `eval`: images decoded on worker threads while the model
//! runs; captions tokenised and batched by length so short captions run short sequences.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use pirclip_data::karpathy::RetrievalSet;
use pirclip_data::metrics::{Metrics, Retrieval};
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::{l2_normalize, ClipModel, EncodeOptions};
use tch::{Kind, Tensor};

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

fn to_vec(t: &Tensor) -> Vec<f32> {
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
    progress: bool,
) -> Result<Embeddings> {
    let size = model.config.image_size;
    let dim = model.config.embed_dim;
    let pb = crate::common::progress(paths.len() as u64, "images");
    if !progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut values = Vec::with_capacity(paths.len() * dim);
    let rx =
        pirclip_data::loader::eval_batches(paths.to_vec(), size, batch_size, decode_workers(), 2);
    for batch in rx {
        let batch = batch.context("preprocessing images")?;
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
        pb.inc(batch.len as u64);
    }
    pb.finish_and_clear();
    anyhow::ensure!(
        values.len() == paths.len() * dim,
        "image pipeline ended early"
    );
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
    progress: bool,
) -> Result<Embeddings> {
    let tok = pirclip_text::Tokenizer::new();
    let ctx = model.config.text.context_length;
    let dim = model.config.embed_dim;
    let ids: Vec<Vec<i64>> = captions.iter().map(|c| tok.tokenize(c, ctx)).collect();
    let mut order: Vec<usize> = (0..captions.len()).collect();
    order.sort_by_key(|&i| pirclip_text::eot_position(&ids[i]));
    let pb = crate::common::progress(captions.len() as u64, "texts");
    if !progress {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
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
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(Embeddings {
        rows: captions.len(),
        dim,
        values,
    })
}

/// Cosine similarities `texts × images` (row-major `[n_texts, n_images]`) of normalised embeddings.
pub fn similarity(img: &Embeddings, txt: &Embeddings) -> Vec<f32> {
    let it = Tensor::from_slice(&img.values).view([img.rows as i64, img.dim as i64]);
    let tt = Tensor::from_slice(&txt.values).view([txt.rows as i64, txt.dim as i64]);
    to_vec(&tt.matmul(&it.tr()))
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
    progress: bool,
) -> Result<EncodedSet> {
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
    let txt = encode_texts(model, &set.texts, 256, true, progress)?;
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
        let scores = similarity(&self.img, &self.txt);
        Retrieval {
            scores: &scores,
            n_texts: self.txt.rows,
            n_images: self.img.rows,
            text_to_image: &set.text_to_image,
        }
        .metrics(ks)
    }
}
