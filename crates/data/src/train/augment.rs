//! Training augmentation (spec §6.2): torchvision's RandomResizedCrop sampler and the eight symmetries
//! of the square, driven by a small keyed generator so that every random choice derives from (seed,
//! stream, index) and a resumed run draws exactly what it would have.

use pirclip_image::{resize_bicubic, RgbImage};

/// SplitMix64: small, fast, and its whole state is one integer.
#[derive(Debug, Clone)]
pub struct Rng(u64);

/// The independent random streams of a run (`Rng::keyed`'s `stream`). Augmentation takes one stream per
/// epoch, `AUGMENT + epoch`, so the fixed streams sit at the top of the range where no epoch reaches.
pub mod stream {
    pub const SAMPLE_SHUFFLE: u64 = 1;
    pub const AUGMENT: u64 = 2;
    pub const CAPTION_PICK: u64 = u64::MAX - 3;
    pub const SHARD_ORDER: u64 = u64::MAX;
    pub const SHUFFLE_BUFFER: u64 = u64::MAX - 1;
    pub const SHARD_WRITE: u64 = u64::MAX - 2;
}

impl Rng {
    /// A generator for one (seed, stream, index) triple.
    pub fn keyed(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.0 ^= r
            .next_u64()
            .wrapping_add(stream.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        r.0 ^= r
            .next_u64()
            .wrapping_add(index.wrapping_mul(0x94d0_49bb_1331_11eb));
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// torchvision `RandomResizedCrop(size, scale, ratio)` on a PIL image: sample a box (10 tries, then a
/// centre fallback), crop, bicubic resize to `size × size`.
pub fn random_resized_crop(
    img: &RgbImage,
    size: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> RgbImage {
    let (w_img, h_img) = (img.width as f64, img.height as f64);
    let area = w_img * h_img;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * rng.range(scale.0, scale.1);
        let aspect = rng.range(lr0, lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && w <= img.width && h > 0 && h <= img.height {
            let top = rng.below(img.height - h + 1);
            let left = rng.below(img.width - w + 1);
            crop = Some((top, left, h, w));
            break;
        }
    }
    let (top, left, h, w) = crop.unwrap_or_else(|| {
        let in_ratio = w_img / h_img;
        let (w, h) = if in_ratio < ratio.0 {
            (img.width, (w_img / ratio.0).round() as usize)
        } else if in_ratio > ratio.1 {
            ((h_img * ratio.1).round() as usize, img.height)
        } else {
            (img.width, img.height)
        };
        ((img.height - h) / 2, (img.width - w) / 2, h, w)
    });
    let mut px = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        px.extend_from_slice(
            &img.pixels[(y * img.width + left) * 3..(y * img.width + left + w) * 3],
        );
    }
    resize_bicubic(&RgbImage::new(w, h, px), size, size)
}

/// Train-time augmentation: torchvision's RandomResizedCrop, then optionally one of the eight symmetries
/// of the square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Crop area as a fraction of the image (open_clip `--aug-cfg scale=(lo,hi)`; PIR-CLIP's 0.9–1).
    pub scale: (f64, f64),
    /// Crop aspect ratio range (torchvision's 3/4–4/3).
    pub ratio: (f64, f64),
    /// After the crop, one of the 8 rotations by 90° and reflections, uniformly: an overhead image has no
    /// "up", so each of them is as likely a view of the scene as the original.
    pub rotate_flip: bool,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            scale: (0.9, 1.0),
            ratio: (0.75, 4.0 / 3.0),
            rotate_flip: false,
        }
    }
}

/// Element `k` (0..8) of the symmetry group of the rectangle-as-grid: bit 2 transposes, then bit 0
/// mirrors left-right and bit 1 top-bottom. On a square image the eight results are the four 90°
/// rotations and their mirror images.
pub fn rotate_flip(img: &RgbImage, k: usize) -> RgbImage {
    let (transpose, mirror_x, mirror_y) = (k & 4 != 0, k & 1 != 0, k & 2 != 0);
    let (w, h) = if transpose {
        (img.height, img.width)
    } else {
        (img.width, img.height)
    };
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let y1 = if mirror_y { h - 1 - y } else { y };
        for x in 0..w {
            let x1 = if mirror_x { w - 1 - x } else { x };
            let (sx, sy) = if transpose { (y1, x1) } else { (x1, y1) };
            let at = (sy * img.width + sx) * 3;
            px.extend_from_slice(&img.pixels[at..at + 3]);
        }
    }
    RgbImage::new(w, h, px)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pirclip_image::RgbImage;

    #[test]
    fn crop_stays_in_bounds_and_scale() {
        let img = RgbImage::new(
            150,
            150,
            (0..150 * 150 * 3).map(|i| (i % 251) as u8).collect(),
        );
        for i in 0..50 {
            let mut rng = Rng::keyed(7, 0, i);
            let out = random_resized_crop(&img, 64, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert_eq!((out.width, out.height), (64, 64));
        }
        // Deterministic per key.
        let crop = |key| {
            random_resized_crop(
                &img,
                32,
                (0.9, 1.0),
                (0.75, 4.0 / 3.0),
                &mut Rng::keyed(1, 2, key),
            )
        };
        let (a, b) = (crop(3), crop(3));
        assert_ne!(a, crop(4));
        assert_eq!(a, b);
    }

    #[test]
    fn rotate_flip_gives_the_eight_symmetries_of_the_square() {
        let n = 5;
        let img = RgbImage::new(n, n, (0..n * n * 3).map(|v| (v * 7 % 251) as u8).collect());
        let at = |im: &RgbImage, x: usize, y: usize| im.pixels[(y * im.width + x) * 3];
        // Rotation by 90° clockwise: out(x, y) = in(y, n-1-x).
        let rot = |im: &RgbImage| {
            let mut px = Vec::new();
            for y in 0..n {
                for x in 0..n {
                    let a = (((n - 1 - x) * n) + y) * 3;
                    px.extend_from_slice(&im.pixels[a..a + 3]);
                }
            }
            RgbImage::new(n, n, px)
        };
        let mirror = |im: &RgbImage| rotate_flip(im, 1);
        assert_eq!(rotate_flip(&img, 0).pixels, img.pixels);
        assert_eq!(at(&mirror(&img), 0, 2), at(&img, n - 1, 2));
        let mut expected = Vec::new();
        let mut r = img.clone();
        for _ in 0..4 {
            expected.push(r.pixels.clone());
            expected.push(mirror(&r).pixels);
            r = rot(&r);
        }
        let mut got: Vec<Vec<u8>> = (0..8).map(|k| rotate_flip(&img, k).pixels).collect();
        got.sort();
        expected.sort();
        assert_eq!(
            got, expected,
            "k = 0..8 are the 4 rotations and their mirror images"
        );
        got.dedup();
        assert_eq!(got.len(), 8);
        // Not square: the transposing half swaps the sides.
        let wide = RgbImage::new(3, 2, (0..18).collect());
        let t = rotate_flip(&wide, 4);
        assert_eq!((t.width, t.height), (2, 3));
        assert_eq!(at(&t, 1, 2), at(&wide, 2, 1));
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<usize> = (0..100).collect();
        Rng::keyed(3, 1, 0).shuffle(&mut a);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        let mut b: Vec<usize> = (0..100).collect();
        Rng::keyed(3, 1, 0).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
    }
}
