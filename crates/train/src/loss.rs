//! CLIP contrastive loss and PIR-CLIP's cluster-wise affiliation loss (spec §5.2–5.3).

use tch::{Kind, Reduction, Tensor};

/// Class ids from image file names (spec §5.1): the prefix before the first `_` (the whole name when it
/// has none), numbered 0, 1, 2, … in order of first appearance within the batch.
pub fn labels_from_names<S: AsRef<str>>(names: &[S]) -> Vec<i64> {
    let prefixes: Vec<&str> = names
        .iter()
        .map(|n| {
            let base = n.as_ref().rsplit('/').next().unwrap_or(n.as_ref());
            base.split('_').next().unwrap_or(base)
        })
        .collect();
    labels_from_strings(&prefixes)
}

/// Class ids numbered by first appearance of arbitrary label strings (for `--label-source json`).
pub fn labels_from_strings<S: AsRef<str>>(labels: &[S]) -> Vec<i64> {
    let mut seen: Vec<&str> = Vec::new();
    labels
        .iter()
        .map(|l| match seen.iter().position(|p| *p == l.as_ref()) {
            Some(i) => i as i64,
            None => {
                seen.push(l.as_ref());
                (seen.len() - 1) as i64
            }
        })
        .collect()
}

fn symmetric_ce(a: &Tensor, b: &Tensor) -> Tensor {
    let n = a.size()[0];
    let targets = Tensor::arange(n, (Kind::Int64, a.device()));
    (a.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0)
        + b.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0))
        / 2.0
}

/// ½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)] with targets = own index. `image`, `text` are L2-normalised `[B, E]`,
/// `scale` = exp(logit_scale).
pub fn contrastive(image: &Tensor, text: &Tensor, scale: &Tensor) -> Tensor {
    let logits_per_image = scale * image.matmul(&text.tr());
    let logits_per_text = scale * text.matmul(&image.tr());
    symmetric_ce(&logits_per_image, &logits_per_text)
}

/// Cluster-wise affiliation: class centres (mean of same-class features, neither re-normalised nor
/// detached) replace the other modality's features; targets stay "own column" (the loss has a floor).
pub fn affiliation(image: &Tensor, text: &Tensor, scale: &Tensor, labels: &Tensor) -> Tensor {
    let m = labels
        .unsqueeze(1)
        .eq_tensor(&labels.unsqueeze(0))
        .to_kind(image.kind());
    let counts = m.sum_dim_intlist(1, true, image.kind());
    let image_centres = m.matmul(image) / &counts;
    let text_centres = m.matmul(text) / &counts;
    let i2t = scale * image.matmul(&text_centres.tr());
    let t2i = scale * text.matmul(&image_centres.tr());
    symmetric_ce(&i2t, &t2i)
}

pub struct Losses {
    pub contrastive: Tensor,
    pub affiliation: Option<Tensor>,
}

impl Losses {
    pub fn total(&self) -> Tensor {
        match &self.affiliation {
            Some(a) => &self.contrastive + a,
            None => self.contrastive.shallow_clone(),
        }
    }
}

pub fn clip_losses(
    image: &Tensor,
    text: &Tensor,
    logit_scale_param: &Tensor,
    labels: Option<&Tensor>,
) -> Losses {
    let scale = logit_scale_param.exp();
    Losses {
        contrastive: contrastive(image, text, &scale),
        affiliation: labels.map(|l| affiliation(image, text, &scale, l)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_rule_of_the_spec() {
        let names = [
            "airport_1.jpg",
            "beach_2.jpg",
            "airport_3.jpg",
            "00001.jpg",
            "beach_7.jpg",
            "airport_9.jpg",
            "dense_residential_1.jpg",
            "00002.jpg",
        ];
        assert_eq!(labels_from_names(&names), vec![0, 1, 0, 2, 1, 0, 3, 4]);
    }
}
