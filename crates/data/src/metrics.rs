//! Retrieval metrics of the official evaluation (spec §7.4, clip_benchmark): recall@k both ways and mean
//! recall, plus median and mean rank (reported separately, not part of mean recall).

/// Scores are cosine similarities `texts × images` (row-major `[n_texts, n_images]`).
pub struct Retrieval<'a> {
    pub scores: &'a [f32],
    pub n_texts: usize,
    pub n_images: usize,
    pub text_to_image: &'a [usize],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub ks: Vec<usize>,
    /// Percentages per k.
    pub image_to_text: Vec<f64>,
    pub text_to_image: Vec<f64>,
    pub mean_recall: f64,
    /// 1-based ranks of the first correct item, per query.
    pub i2t_median_rank: f64,
    pub i2t_mean_rank: f64,
    pub t2i_median_rank: f64,
    pub t2i_mean_rank: f64,
}

fn median(v: &mut [usize]) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
}

impl Retrieval<'_> {
    /// 0-based rank of text `t` among all texts for image `i` (number of texts scoring strictly higher).
    fn text_rank(&self, i: usize, t: usize) -> usize {
        let s = self.scores[t * self.n_images + i];
        (0..self.n_texts)
            .filter(|&u| self.scores[u * self.n_images + i] > s)
            .count()
    }

    /// Ranks (0-based): per image the best rank among its texts; per text the rank of its image.
    pub fn ranks(&self) -> (Vec<usize>, Vec<usize>) {
        let mut i2t = vec![usize::MAX; self.n_images];
        // For each image, the best-ranked positive text: rank of the highest-scoring positive.
        let mut best_pos: Vec<Option<usize>> = vec![None; self.n_images];
        for (t, &i) in self.text_to_image.iter().enumerate() {
            let s = self.scores[t * self.n_images + i];
            match best_pos[i] {
                Some(b) if self.scores[b * self.n_images + i] >= s => {}
                _ => best_pos[i] = Some(t),
            }
        }
        for (i, b) in best_pos.iter().enumerate() {
            if let Some(t) = b {
                i2t[i] = self.text_rank(i, *t);
            }
        }
        let t2i = (0..self.n_texts)
            .map(|t| {
                let row = &self.scores[t * self.n_images..(t + 1) * self.n_images];
                let s = row[self.text_to_image[t]];
                row.iter().filter(|&&x| x > s).count()
            })
            .collect();
        (i2t, t2i)
    }

    pub fn metrics(&self, ks: &[usize]) -> Metrics {
        let (i2t, t2i) = self.ranks();
        let recall = |ranks: &[usize], k: usize| {
            100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
        };
        let image_to_text: Vec<f64> = ks.iter().map(|&k| recall(&i2t, k)).collect();
        let text_to_image: Vec<f64> = ks.iter().map(|&k| recall(&t2i, k)).collect();
        let all: Vec<f64> = image_to_text
            .iter()
            .chain(&text_to_image)
            .copied()
            .collect();
        let mean_recall = all.iter().sum::<f64>() / all.len() as f64;
        let mean = |v: &[usize]| v.iter().map(|&r| (r + 1) as f64).sum::<f64>() / v.len() as f64;
        let mut i2t1: Vec<usize> = i2t.iter().map(|r| r + 1).collect();
        let mut t2i1: Vec<usize> = t2i.iter().map(|r| r + 1).collect();
        Metrics {
            ks: ks.to_vec(),
            image_to_text,
            text_to_image,
            mean_recall,
            i2t_median_rank: median(&mut i2t1),
            i2t_mean_rank: mean(&i2t),
            t2i_median_rank: median(&mut t2i1),
            t2i_mean_rank: mean(&t2i),
        }
    }
}

/// Python's `round(x, 2)` (correctly rounded, ties to even on the exact binary value).
pub fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap()
}

impl Metrics {
    /// The official keys and rounded values, in the official order.
    pub fn official(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (k, v) in self.ks.iter().zip(&self.image_to_text) {
            out.push((format!("retrieval-image2text-R@{k}"), *v));
        }
        for (k, v) in self.ks.iter().zip(&self.text_to_image) {
            out.push((format!("retrieval-text2image-R@{k}"), *v));
        }
        out.push(("retrieval-mean-recall".into(), self.mean_recall));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_hand_example() {
        // 2 images, 4 texts (2 each). Text 1 prefers the wrong image.
        let scores = [0.9, 0.1, 0.2, 0.8, 0.1, 0.7, 0.3, 0.6];
        let r = Retrieval {
            scores: &scores,
            n_texts: 4,
            n_images: 2,
            text_to_image: &[0, 0, 1, 1],
        };
        let m = r.metrics(&[1, 2]);
        assert_eq!(m.text_to_image, vec![75.0, 100.0]);
        // Image 0: best text 0 (0.9) is rank 0. Image 1: texts score 0.1,0.8,0.7,0.6 → text 2 (0.7) is rank 1.
        assert_eq!(m.image_to_text, vec![50.0, 100.0]);
        assert_eq!(m.mean_recall, (75.0 + 100.0 + 50.0 + 100.0) / 4.0);
        assert_eq!(m.t2i_median_rank, 1.0);
        assert_eq!(round2(60.833333), 60.83);
    }
}
