//! Decodes and preprocesses images on background threads, delivering batches in input order through a
//! bounded queue, so decoding overlaps with the model's compute.

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;

use pirclip_image::{decode_file, preprocess_eval};

/// A batch of preprocessed images: `pixels` is `[len, 3, size, size]` row-major.
pub struct ImageBatch {
    pub start: usize,
    pub len: usize,
    pub pixels: Vec<f32>,
}

pub type BatchResult = Result<ImageBatch, pirclip_image::Error>;

/// Streams `paths` as eval-preprocessed batches of `batch_size` from `workers` threads, at most `prefetch`
/// batches ahead. The first failing image ends the stream with its error.
pub fn eval_batches(
    paths: Vec<PathBuf>,
    size: usize,
    batch_size: usize,
    workers: usize,
    prefetch: usize,
) -> mpsc::Receiver<BatchResult> {
    let (tx, rx) = mpsc::sync_channel(prefetch.max(1));
    thread::spawn(move || {
        for (b, chunk) in paths.chunks(batch_size.max(1)).enumerate() {
            let per = 3 * size * size;
            let decoded = crate::parallel_map(chunk, workers, |f| {
                decode_file(f).map(|img| preprocess_eval(&img, size))
            });
            let mut pixels = Vec::with_capacity(chunk.len() * per);
            let result: Result<(), pirclip_image::Error> = decoded.into_iter().try_for_each(|d| {
                pixels.extend(d?);
                Ok(())
            });
            let item = result.map(|_| ImageBatch {
                start: b * batch_size,
                len: chunk.len(),
                pixels,
            });
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}
