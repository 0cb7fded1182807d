//! Near-duplicate images and repeated captions across splits and datasets (the leaks that inflate
//! retrieval numbers: RSICD and RSITMD share images and captions).
//!
//! Images are compared by a 64-bit difference hash (dHash): the image in grayscale (ITU-R 601 luma, as
//! Pillow's `L`), resized bicubically to 9×8, one bit per horizontally adjacent pair (left brighter).
//! Two images whose hashes differ in at most `max_hamming` bits (default 6 of 64) are candidates; the
//! caller confirms them by embedding similarity. Captions are compared after `normalize_caption`.

use pirclip_image::{resize_bicubic, RgbImage};

/// The 64-bit difference hash of an image.
pub fn dhash(img: &RgbImage) -> u64 {
    let small = resize_bicubic(img, 9, 8);
    let luma: Vec<u32> = small
        .pixels
        .chunks_exact(3)
        .map(|p| (p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000)
        .collect();
    let mut h = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            h = (h << 1) | (luma[y * 9 + x] > luma[y * 9 + x + 1]) as u64;
        }
    }
    h
}

/// Pairs (i < j) whose hashes differ in at most `max_hamming` bits, with that distance.
pub fn near_pairs(hashes: &[u64], max_hamming: u32) -> Vec<(usize, usize, u32)> {
    let mut out = Vec::new();
    for i in 0..hashes.len() {
        for j in i + 1..hashes.len() {
            let d = (hashes[i] ^ hashes[j]).count_ones();
            if d <= max_hamming {
                out.push((i, j, d));
            }
        }
    }
    out
}

/// A caption for comparison: lower case, whitespace collapsed, a final period (and the space before it)
/// dropped. "A river ." and "a  river" are the same caption.
pub fn normalize_caption(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    let mut t = words.join(" ").to_lowercase();
    while t.ends_with('.') || t.ends_with(' ') {
        t.pop();
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhash_is_stable_under_small_changes_and_separates_different_images() {
        let grad = |w: usize, h: usize, flip: bool| {
            let mut px = Vec::new();
            for y in 0..h {
                for x in 0..w {
                    let v = ((x * 255 / w) as u8).wrapping_add((y % 7) as u8);
                    let v = if flip { 255 - v } else { v };
                    px.extend([v, v / 2, 255 - v]);
                }
            }
            RgbImage::new(w, h, px)
        };
        let a = dhash(&grad(150, 150, false));
        let resized = dhash(&resize_bicubic(&grad(150, 150, false), 120, 120));
        assert!(
            (a ^ resized).count_ones() <= 6,
            "{:064b} vs {:064b}",
            a,
            resized
        );
        assert!((a ^ dhash(&grad(150, 150, true))).count_ones() > 20);
        assert_eq!(
            near_pairs(&[a, resized, !a], 6),
            vec![(0, 1, (a ^ resized).count_ones())]
        );
        assert_eq!(
            normalize_caption("  A river  with a Bridge . "),
            "a river with a bridge"
        );
    }
}
