use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pirclip_data::karpathy::{Dataset, RetrievalSet};
use pirclip_retrieval::classify::{
    labelled_by_prefix, readable_class_name, Evaluation, ZeroShot, REMOTE_SENSING_TEMPLATES,
};

use crate::common::ModelArgs;
use crate::pipeline::{encode_images, Bar};

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

fn lines(path: &PathBuf, what: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

pub fn run(a: Args) -> Result<()> {
    let templates: Vec<String> = match &a.templates {
        Some(f) => lines(f, "templates")?,
        None => REMOTE_SENSING_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    if let Some(t) = templates.iter().find(|t| !t.contains("{}")) {
        bail!("template {t:?} has no `{{}}` for the class name");
    }
    let (paths, truth, classes) = match (&a.json, &a.images_dir) {
        (Some(json), Some(dir)) => {
            if !a.classes.is_empty() || a.classes_file.is_some() || !a.images.is_empty() {
                bail!("--json evaluates on the dataset's own images and file-name classes: drop --images/--classes");
            }
            let ds = Dataset::load_with(json, a.allow_absolute_paths)?;
            let splits: Vec<&str> = a.split.split(',').map(str::trim).collect();
            let set = RetrievalSet::build(&ds, &splits);
            if set.images.is_empty() {
                bail!("{}: no images in split {}", json.display(), a.split);
            }
            let l = labelled_by_prefix(&set, dir);
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
                classes.extend(lines(f, "classes file")?);
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
    let img = encode_images(&model, &paths, a.model.options(), a.batch_size, true, true)?;
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
    print_evaluation(&e, &names, templates.len());
    let acc = &e.accuracy;
    if let Some(out) = &a.out {
        let report = serde_json::json!({
            "dataset": a.json.as_ref().map(|j| j.display().to_string()),
            "split": a.split,
            "task": "zeroshot_classification",
            "model": model.config.name,
            "metrics": {"acc1": acc.top1 / 100.0, "acc5": acc.top5 / 100.0, "mean_per_class_recall": e.mean_per_class / 100.0},
            "chance_acc1": e.chance / 100.0,
            "classes": names,
            "templates": templates,
            "confusion_matrix": acc.confusion,
        });
        pirclip_checkpoint::write_atomic(
            out,
            (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
        )?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(png) = &a.plot {
        heat_map(&acc.confusion, png)?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

fn print_evaluation(e: &Evaluation, names: &[String], templates: usize) {
    let acc = &e.accuracy;
    println!(
        "zero-shot classification: {} images, {} classes, {} templates",
        acc.images,
        names.len(),
        templates
    );
    println!("top-1 accuracy   {:6.2} %", acc.top1);
    println!("top-5 accuracy   {:6.2} %", acc.top5);
    println!("mean class recall{:6.2} %", e.mean_per_class);
    println!(
        "chance           {:6.2} % (top-1), {:.2} % (top-5)",
        e.chance,
        (5.0 * e.chance).min(100.0)
    );
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&x, &y| e.per_class[y].total_cmp(&e.per_class[x]));
    for i in order {
        let (most, n) = e.most_confused_with(i);
        let confused = if n > 0 {
            format!("   most confused with {} ({n})", names[most])
        } else {
            String::new()
        };
        let count: usize = acc.confusion[i].iter().sum();
        println!(
            "  {:<24} {:6.1} % of {count:>3}{confused}",
            names[i], e.per_class[i]
        );
    }
}

/// The confusion matrix, each row normalised by its count: white (0) to dark blue (1), 16 px cells,
/// rows = true class, columns = predicted, in class order.
fn heat_map(confusion: &[Vec<usize>], path: &PathBuf) -> Result<()> {
    const CELL: u32 = 16;
    let n = confusion.len() as u32;
    let mut img =
        image::RgbImage::from_pixel(n * CELL + 1, n * CELL + 1, image::Rgb([200, 200, 200]));
    for (i, row) in confusion.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f32;
        for (j, &v) in row.iter().enumerate() {
            let f = v as f32 / total;
            let color = image::Rgb([
                (255.0 * (1.0 - f)) as u8,
                (255.0 * (1.0 - 0.8 * f)) as u8,
                (255.0 - 100.0 * f) as u8,
            ]);
            for y in 1..CELL {
                for x in 1..CELL {
                    img.put_pixel(j as u32 * CELL + x, i as u32 * CELL + y, color);
                }
            }
        }
    }
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
