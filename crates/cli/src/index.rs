use std::path::PathBuf;

use anyhow::{bail, Result};
use pirclip_index::{build, BuildOptions};
use pirclip_store::{Identity, IndexDir};

use crate::common::ModelArgs;
use crate::pipeline::Bar;

/// Index an image archive for search: embeddings in clip-retrieval's layout (img_emb/img_emb_N.npy as
/// float16, metadata/metadata_N.parquet with image_path, size, mtime) plus index.json with the model's
/// identity. Resumable: a killed build continues after its last complete part.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: IndexCommand,
}

#[derive(clap::Subcommand)]
enum IndexCommand {
    /// Create an index (or continue an interrupted build) from image files and folders.
    Build(BuildArgs),
    /// Add the files an index does not hold yet (new, or changed since: path, size and mtime).
    Add(AddArgs),
}

#[derive(clap::Args)]
struct Common {
    #[command(flatten)]
    model: ModelArgs,
    /// An image file or a folder (walked recursively); repeat the flag for more.
    #[arg(long, required = true, action = clap::ArgAction::Append)]
    images: Vec<PathBuf>,
    /// Images per part: the unit written at once, and what a killed build may redo.
    #[arg(long, default_value_t = 2000)]
    part_size: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Decoding threads (default: one per core, at most 8).
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The index folder.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args)]
struct AddArgs {
    /// The index folder.
    #[arg(long)]
    index: PathBuf,
    #[command(flatten)]
    common: Common,
}

/// The model `args` resolve to (config, weights) and the identity an index records for it, without
/// loading the weights.
pub fn resolved_identity(
    args: &ModelArgs,
) -> Result<(pirclip_model::ModelConfig, PathBuf, Identity)> {
    let (config, weights) =
        crate::common::resolve_model(args.model.as_deref(), args.checkpoint.as_deref())?;
    let identity = Identity {
        model: config.name.clone(),
        config: serde_json::json!({
            "model": args.model,
            "image_size": config.image_size,
            "embed_dim": config.embed_dim,
        }),
        checkpoint: std::fs::canonicalize(&weights)
            .unwrap_or(weights.clone())
            .display()
            .to_string(),
        checkpoint_sha256: pirclip_index::sha256_file(&weights)?,
        dim: config.embed_dim,
    };
    Ok((config, weights, identity))
}

/// The loaded model and its index identity.
pub fn identity_of(args: &ModelArgs) -> Result<(pirclip_model::ClipModel, Identity)> {
    let (_, _, identity) = resolved_identity(args)?;
    Ok((args.load()?, identity))
}

fn run_build(out: &PathBuf, c: &Common, must_exist: bool) -> Result<()> {
    if must_exist && !out.join("index.json").is_file() {
        bail!(
            "{}: not an index folder (create one with `pirclip index build --out`)",
            out.display()
        );
    }
    let (model, identity) = identity_of(&c.model)?;
    let dir = IndexDir::open_or_create(out, identity)?;
    let workers = c.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(8)
    });
    let report = build(
        &model,
        c.model.options(),
        &dir,
        &c.images,
        &BuildOptions {
            part_size: c.part_size,
            batch_size: c.batch_size,
            workers,
        },
        &Bar::new(true),
    )?;
    for u in &report.unreadable {
        eprintln!("skipped {u}");
    }
    let total: usize = dir
        .parts()
        .iter()
        .map(|&k| dir.entries(k).map(|e| e.len()).unwrap_or(0))
        .sum();
    println!(
        "{}: {} images found, {} already indexed, {} added in {} parts, {} unreadable; {:.1} s ({:.1} images/s); index holds {total}",
        out.display(),
        report.found,
        report.already_indexed,
        report.added,
        report.parts_written,
        report.unreadable.len(),
        report.seconds,
        report.added as f64 / report.seconds.max(1e-9),
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        IndexCommand::Build(b) => run_build(&b.out, &b.common, false),
        IndexCommand::Add(b) => run_build(&b.index, &b.common, true),
    }
}
