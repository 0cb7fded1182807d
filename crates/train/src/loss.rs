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

fn symmetric_ce(a: &Tensor, b: &Tensor, smoothing: f64) -> Tensor {
    let n = a.size()[0];
    let targets = Tensor::arange(n, (Kind::Int64, a.device()));
    (ce_rows(a, &targets, smoothing) + ce_rows(b, &targets, smoothing)) / 2.0
}

/// ½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)] with targets = own index, label-smoothed by `smoothing` (0: open_clip).
/// `image`, `text` are L2-normalised `[B, E]`, `scale` = exp(logit_scale).
pub fn contrastive(image: &Tensor, text: &Tensor, scale: &Tensor, smoothing: f64) -> Tensor {
    let logits_per_image = scale * image.matmul(&text.tr());
    let logits_per_text = scale * text.matmul(&image.tr());
    symmetric_ce(&logits_per_image, &logits_per_text, smoothing)
}

/// Class centres of a batch: for every sample, the mean of the features of its class (neither
/// re-normalised nor detached), `[B, E]` for each modality.
pub fn class_centres(image: &Tensor, text: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let m = labels
        .unsqueeze(1)
        .eq_tensor(&labels.unsqueeze(0))
        .to_kind(image.kind());
    let counts = m.sum_dim_intlist(1, true, image.kind());
    (m.matmul(image) / &counts, m.matmul(text) / &counts)
}

/// Cluster-wise affiliation: class centres (mean of same-class features, neither re-normalised nor
/// detached) replace the other modality's features; targets stay "own column" (the loss has a floor).
pub fn affiliation(image: &Tensor, text: &Tensor, scale: &Tensor, labels: &Tensor) -> Tensor {
    let (image_centres, text_centres) = class_centres(image, text, labels);
    let i2t = scale * image.matmul(&text_centres.tr());
    let t2i = scale * text.matmul(&image_centres.tr());
    symmetric_ce(&i2t, &t2i, 0.0)
}

/// What one rank holds of a distributed batch: every rank's features (and class centres, each rank's
/// from its own batch, as the official `get_aff_logits`) stacked in rank order, `[W·B, E]`.
pub struct Gathered<'a> {
    pub image: &'a Tensor,
    pub text: &'a Tensor,
    /// (image centres, text centres).
    pub centres: Option<(&'a Tensor, &'a Tensor)>,
    pub rank: usize,
    pub local_batch: usize,
}

fn ce_rows(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, smoothing)
}

/// open_clip's `ClipLoss` over gathered features plus PIR-CLIP's affiliation term.
///
/// Global (default): logits `[W·B, W·B]`, targets `arange(W·B)`, the same loss on every rank.
/// `local_loss`: this rank's rows only, logits `[B, W·B]`, targets `arange(B) + B·rank`. The official code
/// cannot combine it with the affiliation loss (its `[W·B, W·B]` logits meet `[B]` targets); here the
/// affiliation term is generalised the same way as the contrastive one: own rows against every rank's
/// centres, targets `arange(B) + B·rank`. With one rank both modes are exactly `clip_losses`.
/// `smoothing` label-smooths the contrastive term only, as in `clip_losses`.
pub fn gathered_losses(
    g: &Gathered,
    logit_scale_param: &Tensor,
    local_loss: bool,
    smoothing: f64,
) -> Losses {
    let scale = logit_scale_param.exp();
    if !local_loss {
        return Losses {
            contrastive: contrastive(g.image, g.text, &scale, smoothing),
            affiliation: g.centres.map(|(ci, ct)| {
                let i2t = &scale * g.image.matmul(&ct.tr());
                let t2i = &scale * g.text.matmul(&ci.tr());
                symmetric_ce(&i2t, &t2i, 0.0)
            }),
        };
    }
    let (b, at) = (g.local_batch as i64, (g.rank * g.local_batch) as i64);
    let targets = Tensor::arange(b, (Kind::Int64, g.image.device())) + at;
    let own_image = g.image.narrow(0, at, b);
    let own_text = g.text.narrow(0, at, b);
    let pair = |rows_i: &Tensor, cols_t: &Tensor, rows_t: &Tensor, cols_i: &Tensor, eps: f64| {
        (ce_rows(&(&scale * rows_i.matmul(&cols_t.tr())), &targets, eps)
            + ce_rows(&(&scale * rows_t.matmul(&cols_i.tr())), &targets, eps))
            / 2.0
    };
    Losses {
        contrastive: pair(&own_image, g.text, &own_text, g.image, smoothing),
        affiliation: g
            .centres
            .map(|(ci, ct)| pair(&own_image, ct, &own_text, ci, 0.0)),
    }
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
    smoothing: f64,
) -> Losses {
    let scale = logit_scale_param.exp();
    Losses {
        contrastive: contrastive(image, text, &scale, smoothing),
        affiliation: labels.map(|l| affiliation(image, text, &scale, l)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_losses_with_one_rank_are_the_plain_losses() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        let norm = |t: Tensor| &t / t.norm_scalaropt_dim(2, [1], true);
        let (i, t) = (
            norm(Tensor::randn([6, 5], tch::kind::FLOAT_CPU)),
            norm(Tensor::randn([6, 5], tch::kind::FLOAT_CPU)),
        );
        let labels = Tensor::from_slice(&[0i64, 1, 0, 2, 1, 0]);
        let scale = Tensor::from(2.3f32);
        let plain = clip_losses(&i, &t, &scale, Some(&labels), 0.0);
        let (ci, ct) = class_centres(&i, &t, &labels);
        for local in [false, true] {
            let g = Gathered {
                image: &i,
                text: &t,
                centres: Some((&ci, &ct)),
                rank: 0,
                local_batch: 6,
            };
            let l = gathered_losses(&g, &scale, local, 0.0);
            assert!(
                (l.contrastive.double_value(&[]) - plain.contrastive.double_value(&[])).abs()
                    < 1e-6
            );
            let (a, b) = (
                l.affiliation.unwrap().double_value(&[]),
                plain.affiliation.as_ref().unwrap().double_value(&[]),
            );
            assert!((a - b).abs() < 1e-6, "{local}: {a} vs {b}");
        }
        // Two ranks, local loss: the mean of the two ranks' losses is the global loss.
        let g = |rank| Gathered {
            image: &i,
            text: &t,
            centres: None,
            rank,
            local_batch: 3,
        };
        let mean = (gathered_losses(&g(0), &scale, true, 0.0).contrastive
            + gathered_losses(&g(1), &scale, true, 0.0).contrastive)
            / 2.0;
        assert!((mean.double_value(&[]) - plain.contrastive.double_value(&[])).abs() < 1e-6);
    }

    #[test]
    fn label_smoothing_matches_its_definition() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let norm = |t: Tensor| &t / t.norm_scalaropt_dim(2, [1], true);
        let (i, t) = (
            norm(Tensor::randn([5, 4], tch::kind::DOUBLE_CPU)),
            norm(Tensor::randn([5, 4], tch::kind::DOUBLE_CPU)),
        );
        let scale = Tensor::from(3.0f64);
        let eps = 0.1;
        // By hand: −Σ_j q_j log softmax_j with q = (1−ε)·onehot + ε/B, both directions averaged.
        let by_hand = |logits: &Tensor| {
            let b = logits.size()[0];
            let logp = logits.log_softmax(1, Kind::Double);
            let q = Tensor::eye(b, tch::kind::DOUBLE_CPU) * (1.0 - eps) + eps / b as f64;
            -(q * logp).sum(Kind::Double).double_value(&[]) / b as f64
        };
        let li = &scale * i.matmul(&t.tr());
        let want = (by_hand(&li) + by_hand(&li.tr())) / 2.0;
        let got = contrastive(&i, &t, &scale, eps).double_value(&[]);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let hard = contrastive(&i, &t, &scale, 0.0).double_value(&[]);
        assert!((got - hard).abs() > 1e-3, "smoothing changes the loss");
    }

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
