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
