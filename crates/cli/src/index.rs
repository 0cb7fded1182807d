use std::path::PathBuf;

use anyhow::{bail, Result};
use pirclip_index::{build, refresh_ann, AnnPolicy, AnnRefresh, BuildOptions};
use pirclip_model::ModelConfig;
use pirclip_store::{Identity, IndexDir, SceneSettings};

use crate::common::ModelArgs;
use crate::progress::Bar;

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
    /// Measure the approximate index against exact search on vectors from .npy files: build time, size,
    /// recall@k and per-query latency (bench/ann.sh runs it beside faiss on the same data).
    Bench(BenchArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AnnMode {
    /// Build the approximate index when the index holds at least 50,000 rows (exact search is fast
    /// enough below), or keep up to date the one it has.
    Auto,
    On,
    Off,
}

impl From<AnnMode> for AnnPolicy {
    fn from(m: AnnMode) -> Self {
        match m {
            AnnMode::Auto => AnnPolicy::Auto,
            AnnMode::On => AnnPolicy::On,
            AnnMode::Off => AnnPolicy::Off,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AnnKind {
    /// Inverted lists (IVF-Flat, float16): rows clustered by k-means, a query scores its nearest lists.
    Ivf,
    /// A graph (HNSW, usearch).
    Hnsw,
}

#[derive(clap::Args)]
struct AnnArgs {
    /// Approximate search index in INDEX/image.ivf (or image.usearch), memory-mapped by search/serve.
    #[arg(long, value_enum, default_value_t = AnnMode::Auto)]
    ann: AnnMode,
    /// Which approximate index. Default: the kind the index has, else ivf.
    #[arg(long, value_enum)]
    ann_kind: Option<AnnKind>,
    /// IVF: number of lists (faiss's nlist); 0 picks √rows, or keeps the lists an index has.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65536))]
    ann_lists: u32,
    /// IVF: lists scored per query (faiss's nprobe): more finds more true neighbours, slower. Default:
    /// 16, or what the index has; changing it rewrites the file without retraining.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    ann_probes: Option<u32>,
    /// HNSW: graph neighbours per node (faiss's M).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=512))]
    ann_m: u32,
    /// HNSW: candidates kept while inserting (faiss's efConstruction).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u32).range(1..=4096))]
    ann_ef_construction: u32,
    /// HNSW: candidates kept while searching (faiss's efSearch): higher finds more true neighbours,
    /// slower.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    ann_ef_search: u32,
    /// HNSW: how vectors are stored in the graph (inverted lists store float16).
    #[arg(long, value_enum, default_value_t = QuantArg::F16)]
    ann_quantization: QuantArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum QuantArg {
    F32,
    F16,
    I8,
}

impl AnnArgs {
    /// The approximate index asked for, for the index folder `root` (whose kind is kept unless
    /// `--ann-kind` says otherwise).
    fn config(&self, root: Option<&std::path::Path>) -> pirclip_store::AnnConfig {
        let has_graph = root.is_some_and(|r| pirclip_store::AnnStore::graph_path(r).is_file());
        let kind = self.ann_kind.unwrap_or(if has_graph {
            AnnKind::Hnsw
        } else {
            AnnKind::Ivf
        });
        match kind {
            AnnKind::Ivf => pirclip_store::AnnConfig::Ivf(pirclip_store::IvfOptions {
                lists: self.ann_lists as usize,
                probes: self.ann_probes.unwrap_or(0) as usize,
            }),
            AnnKind::Hnsw => pirclip_store::AnnConfig::Hnsw(pirclip_store::AnnOptions {
                connectivity: self.ann_m as usize,
                expansion_add: self.ann_ef_construction as usize,
                expansion_search: self.ann_ef_search as usize,
                quantization: match self.ann_quantization {
                    QuantArg::F32 => pirclip_store::Quantization::F32,
                    QuantArg::F16 => pirclip_store::Quantization::F16,
                    QuantArg::I8 => pirclip_store::Quantization::I8,
                },
            }),
        }
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Base vectors, `[n, dim]` float32 or float16 .npy (normalised here).
    #[arg(long)]
    vectors: PathBuf,
    /// Query vectors, `[q, dim]`.
    #[arg(long)]
    queries: PathBuf,
    /// True neighbours, `[q, >=k]` integer .npy (row numbers, best first); computed exactly when absent.
    #[arg(long)]
    truth: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Build threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where to save the graph (its size is reported); a temporary folder by default.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also time a text query end to end (tokenise + encode with this model + search).
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ann: AnnArgs,
    /// HNSW: also measure these efSearch values on the same graph (one JSON line each), e.g. 96,160,256.
    #[arg(long, value_delimiter = ',')]
    sweep_ef_search: Vec<usize>,
    /// IVF: also measure these probe counts on the same lists (one JSON line each), e.g. 1,2,4,16.
    #[arg(long, value_delimiter = ',')]
    sweep_probes: Vec<usize>,
}

#[derive(clap::Args)]
struct Common {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files or folders (walked recursively): several after one flag (`--images scenes/*.tif`),
    /// or the flag repeated.
    #[arg(long, required = true, num_args = 1.., action = clap::ArgAction::Append)]
    images: Vec<PathBuf>,
    /// Images per part: the unit written at once, and what a killed build may redo.
    #[arg(long, default_value_t = 2000)]
    part_size: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Decoding threads (default: one per core, at most 8).
    #[arg(long)]
    workers: Option<usize>,
    /// Cut each image into square tiles of this many pixels and index every tile with its pixel window
    /// (and map position for GeoTIFFs): big scenes become searchable by their parts.
    #[arg(long, value_name = "PIXELS", value_parser = clap::value_parser!(u32).range(8..=65536))]
    tile: Option<u32>,
    /// Distance between tile origins (default: the tile size; smaller overlaps tiles). The last tile of a
    /// row or column is flush with the scene's edge.
    #[arg(long, value_name = "PIXELS", requires = "tile", value_parser = clap::value_parser!(u32).range(1..=65536))]
    tile_stride: Option<u32>,
    /// TIFF bands shown as red,green,blue, 1-based as in GDAL (e.g. 4,3,2 for a Sentinel-2 true-colour
    /// stack). Bands deeper than 8 bits are stretched from their 2nd to 98th percentile onto 0–255.
    #[arg(long, value_name = "R,G,B", value_parser = pirclip_image::SceneOptions::parse_bands)]
    bands: Option<[usize; 3]>,
    #[command(flatten)]
    ann: AnnArgs,
}

impl Common {
    /// The tiling and bands asked for; for `add` to an index, what the index was made with unless the
    /// flags say otherwise (and then the index refuses the difference).
    fn scene(&self, existing: Option<&SceneSettings>) -> SceneSettings {
        let asked = SceneSettings {
            tile: self.tile.map(|t| t as usize),
            tile_stride: self.tile.map(|t| self.tile_stride.unwrap_or(t) as usize),
            bands: self.bands,
        };
        SceneSettings::asked_or_existing(asked, existing)
    }
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
pub fn resolved_identity(args: &ModelArgs) -> Result<(ModelConfig, PathBuf, Identity)> {
    let checkpoint = args.checkpoint.as_deref();
    pirclip_index::model_identity(args.model.as_deref(), checkpoint).map_err(anyhow::Error::msg)
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
    let (model, mut identity) = identity_of(&c.model)?;
    let existing = IndexDir::open(out).ok().map(|d| d.identity.scene);
    identity.scene = c.scene(existing.as_ref());
    let mut dir = IndexDir::open_or_create(out, identity)?;
    let workers = c.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(8)
    });
    let scene = dir.identity.scene.clone();
    let report = build(
        &model,
        c.model.options(),
        &mut dir,
        &c.images,
        &BuildOptions {
            part_size: c.part_size,
            batch_size: c.batch_size,
            workers,
            scene,
        },
        &Bar::new(true),
    )?;
    for u in &report.unreadable {
        eprintln!("skipped {u}");
    }
    let total: usize = dir.check()?.iter().map(|(_, rows)| rows).sum();
    let bar = indicatif::ProgressBar::new(0).with_message("approximate index");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} rows ({per_sec})")
            .unwrap(),
    );
    let config = c.ann.config(Some(out));
    let refresh = refresh_ann(out, total, c.ann.ann.into(), config, &|done, todo| {
        bar.set_length(todo as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    match refresh {
        AnnRefresh::Updated(r) => println!(
            "{}: approximate search index ({}): {} rows added, {} in all, {:.1} MB, {:.1} s",
            out.display(),
            r.kind,
            r.rows_added,
            r.rows,
            r.bytes as f64 / 1e6,
            r.seconds
        ),
        AnnRefresh::Removed => println!(
            "{}: removed the approximate search index (--ann off)",
            out.display()
        ),
        AnnRefresh::Unchanged => {}
    }
    let rows = if dir.identity.scene.tile.is_some() {
        "tiles"
    } else {
        "images"
    };
    println!(
        "{}: {} images found, {} already indexed, {} added in {} parts, {} unreadable; {:.1} s ({:.1} {rows}/s); index holds {total} {rows}",
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
        IndexCommand::Bench(b) => {
            let model = crate::bench::load(&b.model).ok();
            let spec = pirclip_index::bench::BenchSpec {
                vectors: b.vectors,
                queries: b.queries,
                truth: b.truth,
                k: b.k,
                threads: b.threads,
                out: b.out,
                ann: b.ann.config(None),
                sweep_ef_search: b.sweep_ef_search,
                sweep_probes: b.sweep_probes,
            };
            let model = model.as_ref().map(|(m, weights)| (m, weights.clone()));
            pirclip_index::bench::run(&spec, model, &mut |line| println!("{line}"))
        }
    }
}
