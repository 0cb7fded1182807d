use std::path::PathBuf;

use anyhow::{bail, Result};
use pirclip_retrieval::classify::{
    labelled_split, read_list, readable_class_name, templates, Evaluation, ZeroShot,
};

use crate::common::ModelArgs;
use crate::progress::Bar;

/// Zero-shot scene classification: each class is the mean text embedding of its prompts; prints the top-k
/// classes of every image. With --json it evaluates instead: the label of an image is its file-name prefix
/// (before the first `_`, as the affiliation loss's classes), and it reports top-1/top-5 accuracy, chance
/// and a confusion matrix.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files or directories to classify: several after one flag (`--images imgs/*.jpg`), or the
    /// flag repeated.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    images: Vec<PathBuf>,
    /// Class names, comma separated (e.g. "airport,beach,storage tanks").
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// Class names, one per line.
    #[arg(long)]
    classes_file: Option<PathBuf>,
    /// Prompt templates, one per line, each with `{}` for the class name (default: remote-sensing
    /// templates such as "a satellite photo of {}." — see the README).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Classes printed per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Evaluate on a Karpathy-style JSON: its images of --split under --images-dir, labelled by file-name prefix.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    images_dir: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    split: String,
    /// Write the evaluation as JSON (CLIP_benchmark's fields plus classes and confusion matrix).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the row-normalised confusion matrix as a PNG heat-map.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Accept absolute image paths in the --json file.
    #[arg(long)]
    allow_absolute_paths: bool,
}

pub fn run(a: Args) -> Result<()> {
    let templates = templates(a.templates.as_deref()).map_err(anyhow::Error::msg)?;
    let (paths, truth, classes) = match (&a.json, &a.images_dir) {
        (Some(json), Some(dir)) => {
            if !a.classes.is_empty() || a.classes_file.is_some() || !a.images.is_empty() {
                bail!("--json evaluates on the dataset's own images and file-name classes: drop --images/--classes");
            }
            let l = labelled_split(json, dir, &a.split, a.allow_absolute_paths)
                .map_err(anyhow::Error::msg)?;
            (l.paths, Some(l.truth), l.classes)
        }
        (Some(_), None) | (None, Some(_)) => bail!("--json and --images-dir go together"),
        (None, None) => {
            let mut classes: Vec<String> = a
                .classes
                .iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect();
            if let Some(f) = &a.classes_file {
                classes.extend(read_list(f, "classes file").map_err(anyhow::Error::msg)?);
            }
            if classes.len() < 2 {
                bail!("give at least two classes with --classes a,b,… or --classes-file");
            }
            let paths = pirclip_data::collect_images(&a.images)?;
            if paths.is_empty() {
                bail!("no images: give --images <dir or file> (repeatable), or --json/--images-dir to evaluate");
            }
            (paths, None, classes)
        }
    };
    let model = a.model.load()?;
    // Prompts read better with words than with run-together file-name prefixes.
    let names: Vec<String> = classes.iter().map(|c| readable_class_name(c)).collect();
    let zs = ZeroShot::new(&model, &names, &templates, &Bar::new(false));
    let img = crate::progress::encode_images(&model, &paths, &a.model, a.batch_size)?;
    let scores = zs.scores(&img);
    let top = zs.top_k(&scores, a.top_k.max(5));
    let Some(truth) = truth else {
        for (p, ranked) in paths.iter().zip(&top) {
            let shown: Vec<String> = ranked
                .iter()
                .take(a.top_k)
                .map(|(c, s)| format!("{} {s:.3}", names[*c]))
                .collect();
            println!("{}\t{}", p.display(), shown.join("\t"));
        }
        return Ok(());
    };
    let e = Evaluation::new(&top, &truth, classes.len());
    print!("{}", e.summary(&names, templates.len()));
    if let Some(out) = &a.out {
        let mut report = e.report(&model.config.name, &names, &templates);
        report["dataset"] = a.json.as_ref().map(|j| j.display().to_string()).into();
        report["split"] = a.split.clone().into();
        let text = serde_json::to_string_pretty(&report)? + "\n";
        pirclip_checkpoint::write_atomic(out, text.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(png) = &a.plot {
        pirclip_checkpoint::write_atomic(png, &pirclip_image::encode_png(&e.heat_map()))?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}
