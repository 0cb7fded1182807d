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

/// Uncertainty of mean recall from the test sample: test images are drawn with replacement (each with
/// all its captions) and mean recall is recomputed on the draw, each query keeping the rank it has
/// against the whole gallery. The spread says how much a score depends on which images happened to be
/// in the test split, which is what a difference between two models must exceed.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub samples: usize,
    pub std: f64,
    /// 2.5th and 97.5th percentiles.
    pub low: f64,
    pub high: f64,
}

/// SplitMix64: a small, seeded, dependency-free generator; bootstrap draws need no more.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

impl Retrieval<'_> {
    /// `samples` bootstrap draws of mean recall at `ks` (seeded: the same inputs give the same interval).
    pub fn bootstrap(&self, ks: &[usize], samples: usize, seed: u64) -> Option<Bootstrap> {
        if samples < 2 || self.n_images == 0 || ks.is_empty() {
            return None;
        }
        let (i2t, t2i) = self.ranks();
        let mut captions: Vec<Vec<usize>> = vec![Vec::new(); self.n_images];
        for (t, &i) in self.text_to_image.iter().enumerate() {
            captions[i].push(t);
        }
        let mut rng = SplitMix(seed);
        let mut draws: Vec<f64> = (0..samples)
            .map(|_| {
                let (mut hits_i2t, mut hits_t2i, mut texts) =
                    (vec![0usize; ks.len()], vec![0usize; ks.len()], 0usize);
                for _ in 0..self.n_images {
                    let i = rng.below(self.n_images);
                    for (h, &k) in hits_i2t.iter_mut().zip(ks) {
                        *h += usize::from(i2t[i] < k);
                    }
                    for &t in &captions[i] {
                        texts += 1;
                        for (h, &k) in hits_t2i.iter_mut().zip(ks) {
                            *h += usize::from(t2i[t] < k);
                        }
                    }
                }
                let i2t_sum: f64 = hits_i2t
                    .iter()
                    .map(|&h| h as f64 / self.n_images as f64)
                    .sum();
                let t2i_sum: f64 = hits_t2i
                    .iter()
                    .map(|&h| h as f64 / texts.max(1) as f64)
                    .sum();
                100.0 * (i2t_sum + t2i_sum) / (2 * ks.len()) as f64
            })
            .collect();
        draws.sort_by(f64::total_cmp);
        let mean = draws.iter().sum::<f64>() / samples as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (samples - 1) as f64;
        let at = |q: f64| draws[((samples - 1) as f64 * q).round() as usize];
        Some(Bootstrap {
            samples,
            std: var.sqrt(),
            low: at(0.025),
            high: at(0.975),
        })
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

    #[test]
    fn bootstrap_brackets_the_score_and_is_seeded() {
        // 40 images with 2 captions each; image i is retrieved at rank i % 4 by both its captions and
        // finds a caption at rank i % 3: recalls differ between images, so draws vary.
        let (n_images, n_texts) = (40, 80);
        let mut scores = vec![0.0f32; n_texts * n_images];
        let text_to_image: Vec<usize> = (0..n_texts).map(|t| t / 2).collect();
        for t in 0..n_texts {
            let i = t / 2;
            for j in 0..n_images {
                // the own image sits below (i % 4) others
                scores[t * n_images + j] = if j == i {
                    0.5
                } else if (j + n_images - i) % n_images <= i % 4 && j != i {
                    0.9
                } else {
                    0.1
                };
            }
        }
        let r = Retrieval {
            scores: &scores,
            n_texts,
            n_images,
            text_to_image: &text_to_image,
        };
        let m = r.metrics(&[1, 5]);
        let b = r.bootstrap(&[1, 5], 500, 1).unwrap();
        assert!(
            b.low < m.mean_recall && m.mean_recall < b.high,
            "{b:?} vs {}",
            m.mean_recall
        );
        assert!(b.std > 0.5 && b.std < 10.0, "{b:?}");
        assert_eq!(r.bootstrap(&[1, 5], 500, 1), Some(b.clone()));
        assert_ne!(r.bootstrap(&[1, 5], 500, 2), Some(b));
        assert!(r.bootstrap(&[1, 5], 1, 1).is_none());
    }
}
