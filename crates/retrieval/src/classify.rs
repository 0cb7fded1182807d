//! Zero-shot scene classification: each class is the normalised mean of the normalised text embeddings
//! of its prompts (CLIP's zero-shot recipe); an image's class scores are cosine similarities.

use pirclip_model::ClipModel;

use crate::{encode_texts, similarity, Embeddings, Progress};

/// Prompt templates for overhead imagery; `{}` is replaced by the class name.
pub const REMOTE_SENSING_TEMPLATES: &[&str] = &[
    "a satellite photo of {}.",
    "an aerial image of {}.",
    "a remote sensing image of {}.",
    "a satellite image of {}.",
    "an aerial photograph of {}.",
    "a high-resolution satellite image of {}.",
    "an overhead view of {}.",
    "a picture of {} taken from above.",
];

/// Readable names of the AID / RSICD scene classes whose file-name prefixes run words together
/// (`denseresidential_12.jpg`); other names are used as they are.
pub fn readable_class_name(prefix: &str) -> String {
    let name = match prefix {
        "bareland" => "bare land",
        "baseballfield" => "baseball field",
        "denseresidential" => "dense residential area",
        "mediumresidential" => "medium residential area",
        "sparseresidential" => "sparse residential area",
        "railwaystation" => "railway station",
        "storagetanks" => "storage tanks",
        "parking" => "parking lot",
        "center" => "city center",
        "commercial" => "commercial area",
        "industrial" => "industrial area",
        "playground" => "playground",
        "school" => "school",
        "square" => "square",
        other => return other.replace(['_', '-'], " "),
    };
    name.to_string()
}

/// Class embeddings of a zero-shot classifier.
pub struct ZeroShot {
    pub classes: Vec<String>,
    /// `[classes, dim]`, rows L2-normalised.
    pub weights: Embeddings,
}

impl ZeroShot {
    /// Encodes `templates` × `classes` (each template holds `{}`) and averages per class.
    pub fn new(
        model: &ClipModel,
        classes: &[String],
        templates: &[String],
        progress: &dyn Progress,
    ) -> Self {
        let prompts: Vec<String> = classes
            .iter()
            .flat_map(|c| templates.iter().map(move |t| t.replace("{}", c)))
            .collect();
        let e = encode_texts(model, &prompts, 256, true, progress);
        let t = templates.len().max(1);
        let mut values = Vec::with_capacity(classes.len() * e.dim);
        for c in 0..classes.len() {
            let mut mean = vec![0f32; e.dim];
            for p in 0..t {
                let row = &e.values[(c * t + p) * e.dim..(c * t + p + 1) * e.dim];
                mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
            }
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            values.extend(mean.iter().map(|x| x / norm));
        }
        ZeroShot {
            classes: classes.to_vec(),
            weights: Embeddings {
                rows: classes.len(),
                dim: e.dim,
                values,
            },
        }
    }

    /// Cosine scores `[images, classes]` of normalised image embeddings.
    pub fn scores(&self, images: &Embeddings) -> Vec<f32> {
        similarity(&self.weights, images)
    }

    /// The `k` best classes of every image, best first (ties by class order).
    pub fn top_k(&self, scores: &[f32], k: usize) -> Vec<Vec<(usize, f32)>> {
        let c = self.classes.len();
        scores
            .chunks(c.max(1))
            .map(|row| {
                let mut ranked: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                ranked.truncate(k);
                ranked
            })
            .collect()
    }
}

/// Top-1 / top-5 accuracy and the confusion matrix (`confusion[truth][predicted]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Accuracy {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub confusion: Vec<Vec<usize>>,
}

pub fn accuracy(top: &[Vec<(usize, f32)>], truth: &[usize], classes: usize) -> Accuracy {
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut hit1, mut hit5) = (0usize, 0usize);
    for (ranked, &t) in top.iter().zip(truth) {
        if let Some(&(p, _)) = ranked.first() {
            confusion[t][p] += 1;
            hit1 += (p == t) as usize;
        }
        hit5 += ranked.iter().take(5).any(|&(p, _)| p == t) as usize;
    }
    let n = truth.len().max(1) as f64;
    Accuracy {
        images: truth.len(),
        top1: 100.0 * hit1 as f64 / n,
        top5: 100.0 * hit5 as f64 / n,
        confusion,
    }
}

/// The class of an image file: its name's prefix before the first `_` (the affiliation loss's rule).
pub fn class_prefix(name: &str) -> &str {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.split('_').next().unwrap_or(base)
}

/// A labelled set: each image's class index (`truth`) into `classes`, the sorted file-name prefixes.
pub struct Labelled {
    pub paths: Vec<std::path::PathBuf>,
    pub truth: Vec<usize>,
    pub classes: Vec<String>,
}

/// The images of `set` under `images_dir`, labelled by file-name prefix.
pub fn labelled_by_prefix(
    set: &pirclip_data::karpathy::RetrievalSet,
    images_dir: &std::path::Path,
) -> Labelled {
    let mut prefixes: Vec<&str> = set.images.iter().map(|n| class_prefix(n)).collect();
    prefixes.sort();
    prefixes.dedup();
    let truth = set
        .images
        .iter()
        .map(|n| prefixes.binary_search(&class_prefix(n)).unwrap_or(0))
        .collect();
    Labelled {
        paths: set.image_paths(images_dir),
        truth,
        classes: prefixes.iter().map(|p| p.to_string()).collect(),
    }
}

/// The non-empty lines of a list file (classes, templates), trimmed.
pub fn read_list(path: &std::path::Path, what: &str) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The prompt templates of `file` (one per line), or [`REMOTE_SENSING_TEMPLATES`]; every template must
/// hold `{}` for the class name.
pub fn templates(file: Option<&std::path::Path>) -> Result<Vec<String>, String> {
    let templates = match file {
        Some(f) => read_list(f, "templates")?,
        None => REMOTE_SENSING_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    match templates.iter().find(|t| !t.contains("{}")) {
        Some(t) => Err(format!("template {t:?} has no `{{}}` for the class name")),
        None => Ok(templates),
    }
}

/// The split(s) of a Karpathy JSON, labelled by file-name prefix (the affiliation loss's classes).
pub fn labelled_split(
    json: &std::path::Path,
    images_dir: &std::path::Path,
    split: &str,
    allow_absolute_paths: bool,
) -> Result<Labelled, String> {
    let ds = pirclip_data::karpathy::Dataset::load_with(json, allow_absolute_paths)
        .map_err(|e| e.to_string())?;
    let splits: Vec<&str> = split.split(',').map(str::trim).collect();
    let set = pirclip_data::karpathy::RetrievalSet::build(&ds, &splits);
    if set.images.is_empty() {
        return Err(format!("{}: no images in split {split}", json.display()));
    }
    Ok(labelled_by_prefix(&set, images_dir))
}

/// A zero-shot evaluation's figures, in percent.
pub struct Evaluation {
    pub accuracy: Accuracy,
    /// Recall of each class (the confusion matrix's diagonal over its row).
    pub per_class: Vec<f64>,
    pub mean_per_class: f64,
    pub chance: f64,
}

impl Evaluation {
    pub fn new(top: &[Vec<(usize, f32)>], truth: &[usize], classes: usize) -> Self {
        let accuracy = accuracy(top, truth, classes);
        let per_class: Vec<f64> = accuracy
            .confusion
            .iter()
            .enumerate()
            .map(|(i, row)| 100.0 * row[i] as f64 / row.iter().sum::<usize>().max(1) as f64)
            .collect();
        Evaluation {
            mean_per_class: per_class.iter().sum::<f64>() / per_class.len().max(1) as f64,
            per_class,
            chance: 100.0 / classes.max(1) as f64,
            accuracy,
        }
    }

    /// The class most often predicted for class `i` other than itself, and how often (0: none).
    pub fn most_confused_with(&self, i: usize) -> (usize, usize) {
        self.accuracy.confusion[i]
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .max_by_key(|(_, n)| **n)
            .map_or((i, 0), |(j, n)| (j, *n))
    }

    /// The figures in lines: accuracy, chance, and every class's recall (best first) with the class it
    /// is most often taken for.
    pub fn summary(&self, names: &[String], templates: usize) -> String {
        let acc = &self.accuracy;
        let mut t = format!(
            "zero-shot classification: {} images, {} classes, {templates} templates\n",
            acc.images,
            names.len()
        );
        t += &format!("top-1 accuracy   {:6.2} %\n", acc.top1);
        t += &format!("top-5 accuracy   {:6.2} %\n", acc.top5);
        t += &format!("mean class recall{:6.2} %\n", self.mean_per_class);
        t += &format!(
            "chance           {:6.2} % (top-1), {:.2} % (top-5)\n",
            self.chance,
            (5.0 * self.chance).min(100.0)
        );
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&x, &y| self.per_class[y].total_cmp(&self.per_class[x]));
        for i in order {
            let (most, n) = self.most_confused_with(i);
            let confused = match n {
                0 => String::new(),
                n => format!("   most confused with {} ({n})", names[most]),
            };
            let count: usize = acc.confusion[i].iter().sum();
            t += &format!(
                "  {:<24} {:6.1} % of {count:>3}{confused}\n",
                names[i], self.per_class[i]
            );
        }
        t
    }

    /// CLIP_benchmark's zero-shot classification result (fractions, not percent) with the classes,
    /// templates and confusion matrix.
    pub fn report(&self, model: &str, names: &[String], templates: &[String]) -> serde_json::Value {
        let acc = &self.accuracy;
        serde_json::json!({
            "task": "zeroshot_classification",
            "model": model,
            "metrics": {"acc1": acc.top1 / 100.0, "acc5": acc.top5 / 100.0, "mean_per_class_recall": self.mean_per_class / 100.0},
            "chance_acc1": self.chance / 100.0,
            "classes": names,
            "templates": templates,
            "confusion_matrix": acc.confusion,
        })
    }

    /// The confusion matrix as an image, 16 pixels a cell, each row shaded by its share of the row.
    pub fn heat_map(&self) -> pirclip_image::RgbImage {
        const CELL: usize = 16;
        let confusion = &self.accuracy.confusion;
        let side = confusion.len() * CELL + 1;
        let mut img = pirclip_image::RgbImage {
            width: side,
            height: side,
            pixels: vec![200; side * side * 3],
        };
        for (i, row) in confusion.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f32;
            for (j, &v) in row.iter().enumerate() {
                let f = v as f32 / total;
                let color = [
                    (255.0 * (1.0 - f)) as u8,
                    (255.0 * (1.0 - 0.8 * f)) as u8,
                    (255.0 - 100.0 * f) as u8,
                ];
                for y in 1..CELL {
                    for x in 1..CELL {
                        let o = ((i * CELL + y) * side + j * CELL + x) * 3;
                        img.pixels[o..o + 3].copy_from_slice(&color);
                    }
                }
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_top1_top5_and_confusion() {
        let top = vec![
            vec![(0, 0.9), (1, 0.5)],
            vec![(1, 0.8), (0, 0.7)],
            vec![(1, 0.6), (2, 0.5), (0, 0.1)],
        ];
        let a = accuracy(&top, &[0, 0, 2], 3);
        assert_eq!(
            a.confusion,
            vec![vec![1, 1, 0], vec![0, 0, 0], vec![0, 1, 0]]
        );
        assert!((a.top1 - 100.0 / 3.0).abs() < 1e-9);
        assert!((a.top5 - 100.0).abs() < 1e-9);
        assert_eq!(readable_class_name("storagetanks"), "storage tanks");
        assert_eq!(readable_class_name("golf_course"), "golf course");
    }
}
