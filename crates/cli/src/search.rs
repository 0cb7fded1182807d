use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::common::ModelArgs;
use pirclip_retrieval::{encode_texts, Quiet};

/// Search images by text: embeds the images (a directory in sorted order, or files) and prints the best
/// matches of each query with their cosine similarity.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image file or directory to search; repeat the flag for more (`--images a --images b`): one
    /// value per flag, so that the queries that follow are not taken for images.
    #[arg(long, required_unless_present = "index", conflicts_with = "index", action = clap::ArgAction::Append)]
    pub images: Vec<PathBuf>,
    /// Search an index folder (`pirclip index build`) instead of encoding images now.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Matches to print per query.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Text queries.
    #[arg(required = true)]
    pub queries: Vec<String>,
}

pub fn print_results(queries: &[String], paths: &[PathBuf], ranked: &[Vec<(usize, f32)>]) {
    for (q, hits) in queries.iter().zip(ranked) {
        println!("\n\u{201c}{q}\u{201d}");
        for (r, (i, s)) in hits.iter().enumerate() {
            let name = paths[*i]
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            println!("  {}. {name:<28} {s:.3}", r + 1);
        }
    }
}

fn run_index(a: &Args, root: &std::path::Path) -> Result<()> {
    let index = pirclip_store::LoadedIndex::load(root)?;
    let (model, identity) = crate::index::identity_of(&a.model)?;
    index
        .dir
        .identity
        .require_model(root, &identity)
        .map_err(anyhow::Error::msg)?;
    for w in &index.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "{}: {} rows, {} search",
        root.display(),
        index.entries.len(),
        index.search_kind
    );
    let txt = encode_texts(&model, &a.queries, 256, true, &Quiet);
    for (q, row) in a.queries.iter().zip(txt.values.chunks(txt.dim)) {
        println!("\n\u{201c}{q}\u{201d}");
        let hits = index
            .search(row, a.top_k)
            .with_context(|| format!("searching {}", root.display()))?;
        for (r, (i, s)) in hits.into_iter().enumerate() {
            let e = &index.entries[i];
            println!("  {}. {:<40} {s:.3}  {}", r + 1, e.image_path, e.location());
        }
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(root) = &a.index {
        return run_index(&a, root);
    }
    let paths = pirclip_data::collect_images(&a.images)?;
    if paths.is_empty() {
        bail!("no image files found in {:?}", a.images);
    }
    let model = a.model.load()?;
    let img = crate::progress::encode_images(&model, &paths, &a.model, a.batch_size)?;
    let txt = encode_texts(&model, &a.queries, 256, true, &Quiet);
    print_results(
        &a.queries,
        &paths,
        &pirclip_retrieval::rank(&img, &txt, a.top_k),
    );
    Ok(())
}
