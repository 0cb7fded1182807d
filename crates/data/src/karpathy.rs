//! Karpathy-style caption datasets (`dataset_*.json`) and the official retrieval test set (spec §7.1–7.2).

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Json { path: String, message: String },
}

/// One image entry of the JSON.
#[derive(Debug, Clone)]
pub struct Entry {
    pub filename: String,
    pub split: String,
    pub captions: Vec<String>,
    pub label: Option<String>,
}

pub struct Dataset {
    pub name: String,
    pub entries: Vec<Entry>,
}

impl Dataset {
    /// Loads a dataset whose file names must be relative names inside the images folder.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_with(path, false)
    }

    /// As `load`; `allow_absolute` also accepts absolute file names (see `check_dataset_name`).
    pub fn load_with(path: &Path, allow_absolute: bool) -> Result<Self, Error> {
        let err = |m: String| Error::Json {
            path: path.display().to_string(),
            message: m,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let images = v
            .get("images")
            .and_then(Value::as_array)
            .ok_or_else(|| err("no `images` list (not a Karpathy-style dataset JSON)".into()))?;
        let mut entries = Vec::with_capacity(images.len());
        for (i, im) in images.iter().enumerate() {
            let filename = im
                .get("filename")
                .and_then(Value::as_str)
                .ok_or_else(|| err(format!("images[{i}] has no filename")))?;
            crate::check_dataset_name(filename, allow_absolute)
                .map_err(|m| err(format!("images[{i}]: {m}")))?;
            let split = im
                .get("split")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let captions = im
                .get("sentences")
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("images[{i}] ({filename}) has no sentences")))?
                .iter()
                .map(|s| {
                    s.get("raw")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| err(format!("a sentence of {filename} has no `raw`")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let label = im.get("label").and_then(|l| match l {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            entries.push(Entry {
                filename: filename.to_string(),
                split,
                captions,
                label,
            });
        }
        let name = v
            .get("dataset")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Ok(Dataset { name, entries })
    }
}

/// Python's `str.capitalize()`: first character upper-cased, the rest lower-cased.
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        None => String::new(),
        Some(c) => c
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
    }
}

/// The retrieval test set as `retrieval.py` builds it: images = unique file names of the chosen splits,
/// sorted lexicographically; each keeps all its captions (capitalised) in JSON order.
#[derive(Debug, Clone)]
pub struct RetrievalSet {
    pub images: Vec<String>,
    pub texts: Vec<String>,
    /// Image index of every text.
    pub text_to_image: Vec<usize>,
}

impl RetrievalSet {
    pub fn build(ds: &Dataset, splits: &[&str]) -> Self {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for e in ds
            .entries
            .iter()
            .filter(|e| splits.contains(&e.split.as_str()))
        {
            for c in &e.captions {
                pairs.push((&e.filename, py_capitalize(c)));
            }
        }
        Self::from_pairs(&pairs)
    }

    /// The set of (image, caption) pairs as given (open_clip's CSV validation): images unique and sorted,
    /// each with its captions in input order.
    pub fn from_pairs(pairs: &[(&str, String)]) -> Self {
        let mut images: Vec<String> = pairs.iter().map(|(f, _)| f.to_string()).collect();
        images.sort();
        images.dedup();
        let mut texts = Vec::with_capacity(pairs.len());
        let mut text_to_image = Vec::with_capacity(pairs.len());
        let mut by_image: std::collections::HashMap<&str, Vec<&String>> =
            std::collections::HashMap::new();
        for (f, c) in pairs {
            by_image.entry(f).or_default().push(c);
        }
        for (i, name) in images.iter().enumerate() {
            for c in &by_image[name.as_str()] {
                texts.push((*c).clone());
                text_to_image.push(i);
            }
        }
        RetrievalSet {
            images,
            texts,
            text_to_image,
        }
    }

    /// Drops images whose file is absent under `dir` (and their texts); returns the dropped names.
    pub fn retain_present(&mut self, dir: &Path) -> Vec<String> {
        self.retain_images(|_, f| dir.join(f).is_file())
    }

    /// Keeps the images for which `keep(index, name)` holds, with their texts; returns the dropped names.
    pub fn retain_images(&mut self, keep: impl Fn(usize, &str) -> bool) -> Vec<String> {
        let mut remap = vec![usize::MAX; self.images.len()];
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for (i, f) in std::mem::take(&mut self.images).into_iter().enumerate() {
            if keep(i, &f) {
                remap[i] = kept.len();
                kept.push(f);
            } else {
                dropped.push(f);
            }
        }
        self.images = kept;
        if dropped.is_empty() {
            return dropped;
        }
        let mut texts = Vec::new();
        let mut t2i = Vec::new();
        for (t, &i) in self.texts.iter().zip(&self.text_to_image) {
            if remap[i] != usize::MAX {
                texts.push(t.clone());
                t2i.push(remap[i]);
            }
        }
        self.texts = texts;
        self.text_to_image = t2i;
        dropped
    }

    pub fn image_paths(&self, dir: &Path) -> Vec<PathBuf> {
        self.images.iter().map(|f| dir.join(f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_must_stay_inside_the_images_folder() {
        let dir = std::env::temp_dir().join(format!("pirclip-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = |name: &str| {
            let p = dir.join("d.json");
            let doc = serde_json::json!({"images": [{"filename": name, "split": "test", "sentences": [{"raw": "x"}]}]});
            std::fs::write(&p, doc.to_string()).unwrap();
            p
        };
        for bad in ["../../etc/passwd", "a/../../b.jpg", "/etc/passwd", ""] {
            let msg = Dataset::load(&json(bad)).err().unwrap().to_string();
            assert!(
                msg.contains("images[0]") && msg.contains("images folder") || bad.is_empty(),
                "{bad}: {msg}"
            );
        }
        assert!(Dataset::load(&json("sub/airport_1.jpg")).is_ok());
        // The explicit opt-in takes absolute names, never `..`.
        assert!(Dataset::load_with(&json("/data/airport_1.jpg"), true).is_ok());
        assert!(Dataset::load_with(&json("../airport_1.jpg"), true).is_err());
    }

    #[test]
    fn capitalize_like_python() {
        assert_eq!(
            py_capitalize("many PLANES are here ."),
            "Many planes are here ."
        );
        assert_eq!(py_capitalize(""), "");
        assert_eq!(py_capitalize("ßx"), "SSx");
    }

    #[test]
    fn build_sorts_unique_names_and_keeps_caption_order() {
        let e = |f: &str, s: &str, c: &[&str]| Entry {
            filename: f.into(),
            split: s.into(),
            captions: c.iter().map(|x| x.to_string()).collect(),
            label: None,
        };
        let ds = Dataset {
            name: "t".into(),
            entries: vec![
                e("b_2.jpg", "test", &["b one", "b two"]),
                e("a_10.jpg", "test", &["a"]),
                e("c.jpg", "train", &["c"]),
                e("a_2.jpg", "test", &["a2"]),
            ],
        };
        let s = RetrievalSet::build(&ds, &["test"]);
        assert_eq!(s.images, ["a_10.jpg", "a_2.jpg", "b_2.jpg"]);
        assert_eq!(s.texts, ["A", "A2", "B one", "B two"]);
        assert_eq!(s.text_to_image, [0, 1, 2, 2]);
        // Dropping the middle image drops its text and renumbers the rest.
        let mut r = s.clone();
        assert_eq!(r.retain_images(|i, _| i != 1), ["a_2.jpg"]);
        assert_eq!(r.images, ["a_10.jpg", "b_2.jpg"]);
        assert_eq!(r.texts, ["A", "B one", "B two"]);
        assert_eq!(r.text_to_image, [0, 1, 1]);
    }
}
