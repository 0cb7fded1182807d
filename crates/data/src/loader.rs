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
        let workers = workers.max(1);
        for (b, chunk) in paths.chunks(batch_size.max(1)).enumerate() {
            let per = 3 * size * size;
            let mut pixels = vec![0f32; chunk.len() * per];
            let per_worker = chunk.len().div_ceil(workers);
            let result: Result<(), pirclip_image::Error> = thread::scope(|s| {
                let handles: Vec<_> = pixels
                    .chunks_mut(per_worker * per)
                    .zip(chunk.chunks(per_worker))
                    .map(|(out, files)| {
                        s.spawn(move || -> Result<(), pirclip_image::Error> {
                            for (i, f) in files.iter().enumerate() {
                                let img = decode_file(f)?;
                                out[i * per..(i + 1) * per]
                                    .copy_from_slice(&preprocess_eval(&img, size));
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("decoder thread panicked"))
                    .collect()
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
