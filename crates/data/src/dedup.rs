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

/// Candidate pairs (i < j) of images whose hashes differ in at most `max_hamming` bits, with that
/// distance, at most `max_pairs` of them (`truncated` says more were left out). Images with one hash
/// form a group whose members are each paired with its first member (n − 1 pairs, not n(n − 1)/2: ten
/// thousand copies of one image are 9,999 pairs, not 50 million); groups whose hashes are near are
/// paired through their first members. The distinct hashes are compared pairwise, each pair once.
pub fn near_pairs(hashes: &[u64], max_hamming: u32, max_pairs: usize) -> NearPairs {
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    let mut group_of: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, &h) in hashes.iter().enumerate() {
        let g = *group_of.entry(h).or_insert_with(|| {
            groups.push((h, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    let mut out = NearPairs::default();
    let push = |out: &mut NearPairs, i: usize, j: usize, d: u32| {
        if out.pairs.len() == max_pairs {
            out.truncated = true;
            return false;
        }
        out.pairs.push((i.min(j), i.max(j), d));
        true
    };
    'outer: for (_, members) in &groups {
        for &m in &members[1..] {
            if !push(&mut out, members[0], m, 0) {
                break 'outer;
            }
        }
    }
    if !out.truncated {
        'pairs: for a in 0..groups.len() {
            for b in a + 1..groups.len() {
                let d = (groups[a].0 ^ groups[b].0).count_ones();
                if d <= max_hamming && !push(&mut out, groups[a].1[0], groups[b].1[0], d) {
                    break 'pairs;
                }
            }
        }
    }
    out.pairs.sort_unstable();
    out
}

/// What [`near_pairs`] found.
#[derive(Debug, Default, PartialEq)]
pub struct NearPairs {
    pub pairs: Vec<(usize, usize, u32)>,
    /// More pairs were there than asked for.
    pub truncated: bool,
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
            near_pairs(&[a, resized, !a], 6, 100).pairs,
            vec![(0, 1, (a ^ resized).count_ones())]
        );
        assert_eq!(
            normalize_caption("  A river  with a Bridge . "),
            "a river with a bridge"
        );
    }

    /// Many identical images give a pair per copy, not per pair of copies, and the cap holds.
    #[test]
    fn identical_hashes_pair_with_their_first_and_the_cap_holds() {
        let hashes: Vec<u64> = (0..20_000)
            .map(|i| if i % 2 == 0 { 7 } else { 7 ^ 1 })
            .collect();
        let found = near_pairs(&hashes, 1, 1_000_000);
        // 9,999 + 9,999 within the groups, 1 between them.
        assert_eq!(found.pairs.len(), 19_999);
        assert!(!found.truncated);
        assert!(found.pairs.contains(&(0, 1, 1)));
        assert!(found.pairs.contains(&(0, 19_998, 0)));
        let capped = near_pairs(&hashes, 1, 100);
        assert_eq!((capped.pairs.len(), capped.truncated), (100, true));
    }
}
