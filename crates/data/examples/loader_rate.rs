//! How many training images per second the loader prepares (decode, RandomResizedCrop, bicubic resize,
//! normalise, tokenise), by decode workers: what one CPU core feeds a GPU. No model runs.
//!   cargo run --release -p pirclip-data --example loader_rate -- JSON IMAGES_DIR [SIZE=224] [BATCH=128] [BATCHES=20] [WORKERS=1,2]
use std::path::Path;
use std::time::Instant;

use pirclip_data::karpathy::Dataset;
use pirclip_data::train::{samples_from_karpathy, Augmentation, LoaderConfig, TrainLoader};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!(
            "usage: loader_rate JSON IMAGES_DIR [SIZE=224] [BATCH=128] [BATCHES=20] [WORKERS=1,2]"
        );
        std::process::exit(2);
    }
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let size: usize = arg(3, "224").parse().expect("SIZE");
    let batch: usize = arg(4, "128").parse().expect("BATCH");
    let batches: usize = arg(5, "20").parse().expect("BATCHES");
    let ds = Dataset::load(Path::new(&args[1])).unwrap_or_else(|e| panic!("{e}"));
    let samples = samples_from_karpathy(&ds, &["train"], Path::new(&args[2]));
    for workers in arg(6, "1,2")
        .split(',')
        .map(|w| w.parse::<usize>().expect("WORKERS"))
    {
        let loader = TrainLoader::new(
            samples.clone(),
            LoaderConfig {
                image_size: size,
                batch_size: batch,
                seed: 0,
                shuffle: true,
                augment: Some(Augmentation::default()),
                one_caption_per_image: false,
                workers,
                context_length: 77,
                tokenizer: pirclip_text::TextTokenizer::Clip,
                rank: 0,
                world: 1,
            },
        );
        let rx = loader.stream(0, 0);
        rx.recv().expect("first batch").expect("decodable"); // thread start-up and first fill
        let started = Instant::now();
        let mut images = 0;
        for b in rx.iter().take(batches) {
            images += b.expect("decodable").names.len();
        }
        let s = started.elapsed().as_secs_f64();
        println!(
            "{{\"workers\": {workers}, \"image_size\": {size}, \"batch\": {batch}, \"images\": {images}, \"images_per_s\": {:.1}, \"images_per_s_per_worker\": {:.1}}}",
            images as f64 / s,
            images as f64 / s / workers as f64
        );
    }
}
