//! `pirclip`: a thin command-line layer over the library crates.

mod bench;
mod classify;
mod common;
mod dedup;
mod demo;
mod embed;
mod eval;
mod explain;
mod export;
mod index;
mod init;
mod inspect;
mod progress;
mod search;
mod serve;
mod shards;
mod tokenize;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pirclip", version, about = "PIR-CLIP remote-sensing image-text retrieval: embed, evaluate, train, search", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Largest image (width × height) any command decodes; larger ones are refused as decompression bombs
    /// (default: Pillow's limit, 178956970).
    #[arg(long, global = true, value_name = "PIXELS")]
    max_image_pixels: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on bundled data, offline: evaluation table and three example searches.
    Demo(demo::Args),
    /// Search images by text with the bundled model or your own.
    Search(search::Args),
    /// Index an image archive for search (`index build`, `index add`), in clip-retrieval's layout.
    Index(index::Args),
    /// Why did it match: VIR's belief over an image's patches and each patch's similarity to a text.
    Explain(explain::Args),
    /// Find test-set leaks: near-duplicate images and repeated captions across splits and datasets.
    Dedup(dedup::Args),
    /// Serve indexes by HTTP: clip-retrieval's API and a search page.
    Serve(serve::Args),
    /// Zero-shot scene classification (and its accuracy on a labelled dataset).
    Classify(classify::Args),
    /// Embed images and/or captions with a model and write .npy matrices.
    Embed(embed::Args),
    /// Retrieval evaluation (R@1/5/10 both ways, mean recall) exactly as the official retrieval.py.
    Eval(eval::Args),
    /// Train or fine-tune (contrastive + affiliation loss) from a JSON dataset or webdataset shards.
    // A repeated flag takes its last value, as in open_clip's argparse (scripts append overrides).
    #[command(args_override_self = true)]
    Train(Box<pirclip_train::params::Params>),
    /// Write webdataset tar shards from a Karpathy-style JSON.
    Shards(shards::Args),
    /// Print the 77 CLIP token ids of each caption.
    Tokenize(tokenize::Args),
    /// Convert a checkpoint's weights to safetensors (fp32, fp16 or bf16).
    Export(export::Args),
    /// Describe a checkpoint: layout, keys, parameters, dtypes, model family.
    Inspect(inspect::Args),
    /// Measure image/text encode speed, eval time and peak RSS of a model; prints JSON.
    Bench(bench::Args),
    /// Write a randomly initialised model (official initialisation distributions) as safetensors.
    Init(init::Args),
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`| head`) would panic; a command-line tool
    // should end quietly there, as other Unix tools do.
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("train") {
        if let Err(e) = train::reject_unsupported_open_clip_flags(&raw[2..]) {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
    let cli = Cli::parse();
    if let Some(p) = cli.max_image_pixels {
        pirclip_image::set_max_pixels(p);
    }
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Search(a) => search::run(a),
        Command::Classify(a) => classify::run(a),
        Command::Index(a) => index::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Dedup(a) => dedup::run(a),
        Command::Explain(a) => explain::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::run(*a),
        Command::Shards(a) => shards::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Export(a) => export::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Init(a) => init::run(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
