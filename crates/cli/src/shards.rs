use std::path::PathBuf;

use anyhow::{bail, Result};
use pirclip_data::karpathy::Dataset;
use pirclip_data::shards::{write_shards, ShardInput};

/// Write webdataset tar shards (official member names img_content / caption / img_name, plus a json with
/// the scene label) and sizes.json from a Karpathy-style JSON: every caption becomes one sample.
#[derive(clap::Args)]
pub struct Args {
    /// Karpathy-style dataset JSON.
    #[arg(long)]
    json: PathBuf,
    /// Folder with the images named in the JSON.
    #[arg(long)]
    images_dir: PathBuf,
    /// Split(s), comma separated.
    #[arg(long, default_value = "train")]
    split: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    shard_size: usize,
    /// Keep the JSON order. By default samples are shuffled (seeded) before writing, so that a shard
    /// mixes scenes and the captions of one image are spread out: a training shuffle buffer then sees a
    /// representative stream.
    #[arg(long)]
    no_shuffle: bool,
    /// Accept absolute image paths in the dataset file (by default names must stay inside the images
    /// folder: absolute names and `..` are refused).
    #[arg(long)]
    allow_absolute_paths: bool,

    /// Seed of the write-time shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let ds = Dataset::load_with(&a.json, a.allow_absolute_paths)?;
    let splits: Vec<&str> = a.split.split(',').map(str::trim).collect();
    let seed = (!a.no_shuffle).then_some(a.seed);
    let inputs = ShardInput::from_karpathy(&ds, &a.images_dir, &splits, seed);
    if inputs.is_empty() {
        bail!("{}: no samples in split(s) {:?}", a.json.display(), splits);
    }
    let pb = crate::common::progress(inputs.len() as u64, "samples");
    let (paths, unreadable) = write_shards(&inputs, &a.out, a.shard_size, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if !unreadable.is_empty() {
        eprintln!(
            "skipped {} samples whose image could not be read, first: {}",
            unreadable.len(),
            unreadable[0]
        );
    }
    println!(
        "wrote {} samples in {} shards to {} ({}shard-{{000000..{:06}}}.tar, sizes.json)",
        inputs.len() - unreadable.len(),
        paths.len(),
        a.out.display(),
        a.out
            .display()
            .to_string()
            .trim_end_matches('/')
            .to_string()
            + "/",
        paths.len() - 1
    );
    Ok(())
}
