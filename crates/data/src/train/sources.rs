//! Where training samples come from: a Karpathy JSON with an image folder (every caption a sample),
//! an open_clip CSV, or webdataset shards (`crate::shards`); and reading a sample's image.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pirclip_image::{decode, RgbImage};

#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    /// `len` bytes at `offset` of a webdataset tar: read when the sample is loaded.
    TarMember {
        path: Arc<PathBuf>,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub image: ImageSource,
    pub caption: String,
    /// Original image file name: the official class label is its prefix before the first `_`.
    pub name: String,
    /// Scene label from the JSON, when present (`--label-source json`).
    pub label: Option<String>,
}

/// Every caption of the chosen splits is a sample, in JSON order.
pub fn samples_from_karpathy(
    ds: &crate::karpathy::Dataset,
    splits: &[&str],
    images_dir: &Path,
) -> Vec<Sample> {
    let mut out = Vec::new();
    for e in ds
        .entries
        .iter()
        .filter(|e| splits.contains(&e.split.as_str()))
    {
        for c in &e.captions {
            out.push(Sample {
                image: ImageSource::File(images_dir.join(&e.filename)),
                caption: c.clone(),
                name: e.filename.clone(),
                label: e.label.clone(),
            });
        }
    }
    out
}

/// Reads and decodes one sample's image (a file, or a member of a tar at its recorded offset).
pub fn load_image(s: &ImageSource) -> Result<RgbImage, String> {
    match s {
        ImageSource::File(p) => pirclip_image::decode_file(p).map_err(|e| e.to_string()),
        ImageSource::TarMember { path, offset, len } => {
            use std::io::{Read, Seek, SeekFrom};
            let mut bytes = vec![0u8; *len as usize];
            std::fs::File::open(path.as_path())
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(*offset))?;
                    f.read_exact(&mut bytes)
                })
                .map_err(|e| format!("{} at byte {offset}: {e}", path.display()))?;
            decode(&bytes, &path.display().to_string()).map_err(|e| e.to_string())
        }
    }
}

/// open_clip's CSV dataset: one row per sample; image paths are relative to `base` (absolute ones only
/// with `allow_absolute`; `..` never: see `check_dataset_name`). The label file name is the image's base name.
pub fn samples_from_csv(
    path: &Path,
    img_key: &str,
    caption_key: &str,
    separator: char,
    base: &Path,
    allow_absolute: bool,
) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{}: empty CSV", path.display()))?
        .split(separator)
        .collect();
    let col = |k: &str| {
        header.iter().position(|h| h.trim() == k).ok_or_else(|| {
            format!(
                "{}: no column {k:?} (columns: {})",
                path.display(),
                header.join(", ")
            )
        })
    };
    let (ic, cc) = (col(img_key)?, col(caption_key)?);
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(separator).collect();
        let (Some(img), Some(cap)) = (f.get(ic), f.get(cc)) else {
            return Err(format!(
                "{}: line {} has {} fields",
                path.display(),
                n + 2,
                f.len()
            ));
        };
        crate::check_dataset_name(img.trim(), allow_absolute)
            .map_err(|m| format!("{}: line {}: {m}", path.display(), n + 2))?;
        let p = base.join(img.trim());
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        out.push(Sample {
            image: ImageSource::File(p),
            caption: cap.to_string(),
            name,
            label: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_samples() {
        let dir = std::env::temp_dir().join(format!("pirclip-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("train.csv");
        std::fs::write(
            &f,
            "filepath\ttitle\nimgs/airport_1.jpg\ta caption\n/abs/beach_2.jpg\tanother one\n",
        )
        .unwrap();
        // An absolute name needs the explicit opt-in.
        let err = samples_from_csv(&f, "filepath", "title", '\t', &dir, false).unwrap_err();
        assert!(
            err.contains("line 3") && err.contains("/abs/beach_2.jpg") && err.contains("absolute"),
            "{err}"
        );
        let s = samples_from_csv(&f, "filepath", "title", '\t', &dir, true).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "airport_1.jpg");
        assert_eq!(s[1].caption, "another one");
        assert!(
            matches!(&s[1].image, ImageSource::File(p) if p == std::path::Path::new("/abs/beach_2.jpg"))
        );
        assert!(samples_from_csv(&f, "image", "title", '\t', &dir, true)
            .unwrap_err()
            .contains("no column \"image\""));
    }
}
