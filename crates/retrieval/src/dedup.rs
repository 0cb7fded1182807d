//! Test-set leaks: near-duplicate images within and across the splits of one or more Karpathy datasets
//! (a 64-bit dHash within `max_hamming` bits, confirmed by embedding cosine), and identical captions
//! across splits and datasets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use pirclip_data::dedup::{dhash, near_pairs, normalize_caption};
use pirclip_data::karpathy::Dataset;
use pirclip_image::RgbImage;
use pirclip_model::{ClipModel, EncodeOptions};

use crate::Progress;

/// A dataset to compare: its name (in reports), entries, and images folder (without one, only its
/// captions are compared).
pub struct Source {
    pub name: String,
    pub dataset: Dataset,
    pub images_dir: Option<PathBuf>,
}

pub struct Settings {
    /// dHash bits (of 64) two images may differ in to be candidates.
    pub max_hamming: u32,
    /// Embedding cosine that confirms a candidate pair.
    pub min_cosine: f32,
    /// Most candidate pairs kept (identical images pair with the first of them).
    pub max_pairs: usize,
    pub batch_size: usize,
    pub encode: EncodeOptions,
}

/// One image of a source.
pub struct Image {
    pub source: usize,
    pub filename: String,
    pub split: String,
    pub path: PathBuf,
}

/// A confirmed pair of near-duplicates: indices into [`Report::images`].
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub a: usize,
    pub b: usize,
    pub hamming: u32,
    pub cosine: f32,
}

/// Test captions of one source found elsewhere.
pub struct CaptionOverlap {
    pub source: usize,
    pub test_captions: usize,
    pub in_own_train_or_val: usize,
    /// (other source, test captions of this one found in it).
    pub in_others: Vec<(usize, usize)>,
}

pub struct Report {
    pub names: Vec<String>,
    /// The images hashed (unreadable ones left out).
    pub images: Vec<Image>,
    pub unreadable: usize,
    pub candidates: usize,
    /// More than `max_pairs` candidates: only the first were confirmed.
    pub truncated: bool,
    /// Most similar first.
    pub pairs: Vec<Pair>,
    /// "a:split ~ b:split" → pairs.
    pub pairs_by_split: BTreeMap<String, usize>,
    /// (source, file name) of test images with a near-duplicate outside the test split.
    pub leaked: HashSet<(usize, String)>,
    /// (source, test images) for the sources with images.
    pub test_images: Vec<(usize, usize)>,
    pub captions: Vec<CaptionOverlap>,
}

impl Report {
    /// "name:split" of an image.
    pub fn place(&self, i: usize) -> String {
        place(&self.names, &self.images[i])
    }

    /// What was found, in lines: pairs per split pair, leaked test images, repeated captions.
    pub fn summary(&self, s: &Settings) -> String {
        let mut t = format!(
            "images: {} hashed ({} unreadable), {} candidate pairs within {} bits, {} confirmed at cosine ≥ {}\n",
            self.images.len(),
            self.unreadable,
            self.candidates,
            s.max_hamming,
            self.pairs.len(),
            s.min_cosine
        );
        for (k, n) in &self.pairs_by_split {
            t += &format!("  {k:<40} {n:>6} pairs\n");
        }
        for &(d, tests) in &self.test_images {
            let l = self.leaked.iter().filter(|(ds, _)| *ds == d).count();
            t += &format!(
                "  {}: {l} of {tests} test images have a near-duplicate outside the test split\n",
                self.names[d]
            );
        }
        for c in &self.captions {
            let name = &self.names[c.source];
            t += &format!(
                "captions: {name}: {} of {} distinct test captions also occur in its train/val\n",
                c.in_own_train_or_val, c.test_captions
            );
            for &(o, shared) in &c.in_others {
                t += &format!(
                    "          {name} test captions found in {}: {shared}\n",
                    self.names[o]
                );
            }
        }
        t
    }

    /// The report as JSON: settings, counts, leaked test images, caption overlaps and every pair.
    pub fn to_json(&self, s: &Settings) -> serde_json::Value {
        let mut captions = Vec::new();
        for c in &self.captions {
            let name = &self.names[c.source];
            captions.push(serde_json::json!({"dataset": name, "test_captions": c.test_captions, "in_own_train_or_val": c.in_own_train_or_val}));
            for &(o, shared) in &c.in_others {
                captions.push(serde_json::json!({"dataset": name, "other": self.names[o], "test_captions_in_other": shared}));
            }
        }
        let image = |i: usize| format!("{}:{}", self.place(i), self.images[i].filename);
        let leaked: Vec<String> = self
            .leaked
            .iter()
            .map(|(d, f)| format!("{}:{f}", self.names[*d]))
            .collect();
        let pairs: Vec<serde_json::Value> = self
            .pairs
            .iter()
            .map(|p| serde_json::json!({"a": image(p.a), "b": image(p.b), "hamming": p.hamming, "cosine": p.cosine}))
            .collect();
        serde_json::json!({
            "max_hamming": s.max_hamming,
            "min_cosine": s.min_cosine,
            "images_hashed": self.images.len(),
            "candidate_pairs": self.candidates,
            "pairs_by_split": self.pairs_by_split,
            "leaked_test_images": leaked,
            "captions": captions,
            "pairs": pairs,
        })
    }

    /// The 16 most similar pairs side by side, 128 pixels per image, for a look at what was found.
    pub fn contact_sheet(&self) -> Result<RgbImage, String> {
        const S: usize = 128;
        let rows: Vec<&Pair> = self.pairs.iter().take(16).collect();
        let (width, height) = (2 * S + 12, rows.len().max(1) * (S + 6));
        let mut sheet = RgbImage {
            width,
            height,
            pixels: vec![255; width * height * 3],
        };
        for (row, p) in rows.iter().enumerate() {
            for (c, k) in [p.a, p.b].into_iter().enumerate() {
                let path = &self.images[k].path;
                let img = pirclip_image::decode_file(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let t = pirclip_image::resize_bicubic(&img, S, S);
                for y in 0..S {
                    let o = ((row * (S + 6) + y) * width + c * (S + 12)) * 3;
                    sheet.pixels[o..o + 3 * S]
                        .copy_from_slice(&t.pixels[y * S * 3..(y + 1) * S * 3]);
                }
            }
        }
        Ok(sheet)
    }

    /// Writes `json` (the first source's dataset file) to `out` without the test images this report
    /// found leaked; other fields are kept as they are. Returns how many images were removed.
    pub fn write_clean(&self, json: &Path, out: &Path) -> Result<usize, String> {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", json.display());
        let text = std::fs::read_to_string(json).map_err(|e| at(&e))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| at(&e))?;
        let list = v["images"]
            .as_array_mut()
            .ok_or_else(|| at(&"no images list"))?;
        let before = list.len();
        list.retain(|im| {
            let name = im["filename"].as_str().unwrap_or("").to_string();
            !(im["split"] == "test" && self.leaked.contains(&(0, name)))
        });
        let removed = before - list.len();
        let text = serde_json::to_string(&v).map_err(|e| at(&e))?;
        pirclip_checkpoint::write_atomic(out, text.as_bytes())
            .map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(removed)
    }
}

/// Hashes every image of the sources with a folder, confirms the candidate pairs with the model
/// (loaded only when there are candidates), and compares captions.
pub fn find(
    sources: &[Source],
    model: impl FnOnce() -> Result<ClipModel, String>,
    s: &Settings,
    progress: &dyn Progress,
) -> Result<Report, String> {
    let images = images_of(sources);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hashed = pirclip_data::parallel_map(&images, workers, |im| {
        pirclip_image::decode_file(&im.path).map(|img| dhash(&img))
    });
    let (mut hashes, mut kept, mut unreadable) = (Vec::new(), Vec::new(), 0usize);
    for (im, h) in images.into_iter().zip(hashed) {
        match h {
            Ok(h) => {
                hashes.push(h);
                kept.push(im);
            }
            Err(_) => unreadable += 1,
        }
    }
    let found = near_pairs(&hashes, s.max_hamming, s.max_pairs);
    let pairs = confirm(&kept, &found.pairs, model, s, progress)?;
    let names: Vec<String> = sources.iter().map(|x| x.name.clone()).collect();
    let (pairs_by_split, leaked) = tally(&names, &kept, &pairs);
    let test_images = sources
        .iter()
        .enumerate()
        .filter(|(_, x)| x.images_dir.is_some())
        .map(|(d, x)| {
            let tests = x.dataset.entries.iter().filter(|e| e.split == "test");
            (d, tests.count())
        })
        .collect();
    Ok(Report {
        names,
        images: kept,
        unreadable,
        candidates: found.pairs.len(),
        truncated: found.truncated,
        pairs,
        pairs_by_split,
        leaked,
        test_images,
        captions: caption_overlaps(sources),
    })
}

fn place(names: &[String], image: &Image) -> String {
    format!("{}:{}", names[image.source], image.split)
}

/// Confirmed pairs by the pair of places ("a:split ~ b:split"), and the test images with a
/// near-duplicate outside the test split.
fn tally(
    names: &[String],
    images: &[Image],
    pairs: &[Pair],
) -> (BTreeMap<String, usize>, HashSet<(usize, String)>) {
    let (mut by_split, mut leaked) = (BTreeMap::new(), HashSet::new());
    for p in pairs {
        let (x, y) = (place(names, &images[p.a]), place(names, &images[p.b]));
        let key = if x <= y {
            format!("{x} ~ {y}")
        } else {
            format!("{y} ~ {x}")
        };
        *by_split.entry(key).or_default() += 1;
        for (t, other) in [(&images[p.a], &images[p.b]), (&images[p.b], &images[p.a])] {
            if t.split == "test" && other.split != "test" {
                leaked.insert((t.source, t.filename.clone()));
            }
        }
    }
    (by_split, leaked)
}

/// Each image once per source (a Karpathy JSON lists an image once per caption group).
fn images_of(sources: &[Source]) -> Vec<Image> {
    let mut images = Vec::new();
    for (d, source) in sources.iter().enumerate() {
        let Some(dir) = &source.images_dir else {
            continue;
        };
        let mut seen = HashSet::new();
        for e in &source.dataset.entries {
            if seen.insert(e.filename.clone()) {
                images.push(Image {
                    source: d,
                    filename: e.filename.clone(),
                    split: e.split.clone(),
                    path: dir.join(&e.filename),
                });
            }
        }
    }
    images
}

/// The candidate pairs whose embeddings' cosine reaches `min_cosine` (only images in a candidate pair
/// are encoded), most similar first.
fn confirm(
    images: &[Image],
    candidates: &[(usize, usize, u32)],
    model: impl FnOnce() -> Result<ClipModel, String>,
    s: &Settings,
    progress: &dyn Progress,
) -> Result<Vec<Pair>, String> {
    let mut involved: Vec<usize> = candidates.iter().flat_map(|&(i, j, _)| [i, j]).collect();
    involved.sort_unstable();
    involved.dedup();
    if involved.is_empty() {
        return Ok(Vec::new());
    }
    let model = model()?;
    let paths: Vec<PathBuf> = involved.iter().map(|&i| images[i].path.clone()).collect();
    let e = crate::encode_images(&model, &paths, s.encode, s.batch_size, true, progress)
        .map_err(|e| e.to_string())?;
    let row: HashMap<usize, usize> = involved.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    let embedding = |i: usize| &e.values[row[&i] * e.dim..(row[&i] + 1) * e.dim];
    let mut pairs: Vec<Pair> = candidates
        .iter()
        .map(|&(a, b, hamming)| Pair {
            a,
            b,
            hamming,
            cosine: embedding(a)
                .iter()
                .zip(embedding(b))
                .map(|(x, y)| x * y)
                .sum(),
        })
        .filter(|p| p.cosine >= s.min_cosine)
        .collect();
    pairs.sort_by(|x, y| y.cosine.total_cmp(&x.cosine));
    Ok(pairs)
}

/// For each source with test captions: how many occur in its own train/val and in each other source.
fn caption_overlaps(sources: &[Source]) -> Vec<CaptionOverlap> {
    let mut where_: HashMap<String, HashSet<(usize, String)>> = HashMap::new();
    for (d, x) in sources.iter().enumerate() {
        for e in &x.dataset.entries {
            for c in &e.captions {
                where_
                    .entry(normalize_caption(c))
                    .or_default()
                    .insert((d, e.split.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for (d, x) in sources.iter().enumerate() {
        let tests: HashSet<String> = x
            .dataset
            .entries
            .iter()
            .filter(|e| e.split == "test")
            .flat_map(|e| e.captions.iter().map(|c| normalize_caption(c)))
            .collect();
        if tests.is_empty() {
            continue;
        }
        let count = |pred: &dyn Fn(&(usize, String)) -> bool| {
            tests.iter().filter(|c| where_[*c].iter().any(pred)).count()
        };
        out.push(CaptionOverlap {
            source: d,
            test_captions: tests.len(),
            in_own_train_or_val: count(&|(od, s)| *od == d && s != "test"),
            in_others: (0..sources.len())
                .filter(|&o| o != d)
                .map(|o| (o, count(&|(od, _)| *od == o)))
                .collect(),
        });
    }
    out
}
