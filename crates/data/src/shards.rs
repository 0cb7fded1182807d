//! webdataset tar shards. Members sharing a key (basename up to the first `.`) form a sample; the official
//! PIR-CLIP names are `<key>.img_content`, `<key>.caption`, `<key>.img_name`, and the common
//! `jpg|png|tif|…` / `txt` / `json` conventions are accepted too.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::train::{ImageSource, Sample};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Spec(String),
}

/// Expands `a-{000..003}.tar` (zero padding kept) and `x.tar::y.tar` lists.
pub fn expand_braces(spec: &str) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for part in spec.split("::").filter(|s| !s.is_empty()) {
        match (part.find('{'), part.find('}')) {
            (Some(a), Some(b)) if a < b => {
                let inner = &part[a + 1..b];
                let (lo, hi) = inner
                    .split_once("..")
                    .ok_or_else(|| Error::Spec(format!("bad brace range {inner:?} in {part:?}")))?;
                let width = lo.len();
                let (lo_n, hi_n): (u64, u64) = (
                    lo.parse()
                        .map_err(|_| Error::Spec(format!("bad brace range {inner:?}")))?,
                    hi.parse()
                        .map_err(|_| Error::Spec(format!("bad brace range {inner:?}")))?,
                );
                for n in lo_n..=hi_n {
                    let rest = format!("{}{:0width$}{}", &part[..a], n, &part[b + 1..]);
                    out.extend(expand_braces(&rest)?);
                }
            }
            _ => out.push(part.to_string()),
        }
    }
    Ok(out)
}

const IMAGE_MEMBERS: [&str; 9] = [
    "img_content",
    "jpg",
    "jpeg",
    "png",
    "tif",
    "tiff",
    "webp",
    "bmp",
    "image",
];

/// Indexes the samples of the shards; samples lacking an image or a caption are skipped and counted.
pub fn read_shards(paths: &[PathBuf]) -> Result<(Vec<Sample>, usize), Error> {
    read_shards_indexed(paths).map(|(s, _, k)| (s, k))
}

/// A member's bytes: image members are not read, only located (offset and length in the tar), so the
/// shards are streamed from disk during training and only captions and names stay in memory.
enum Member {
    Inline(Vec<u8>),
    Located { offset: u64, len: u64 },
}

/// Like `read_shards`, also returning the shard index of every sample.
pub fn read_shards_indexed(paths: &[PathBuf]) -> Result<(Vec<Sample>, Vec<usize>, usize), Error> {
    let mut samples = Vec::new();
    let mut shard_of = Vec::new();
    let mut skipped = 0;
    for (shard, path) in paths.iter().enumerate() {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
        let file_len = file.metadata()?.len();
        let shared_path = Arc::new(path.clone());
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        let mut groups: BTreeMap<String, BTreeMap<String, Member>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let entries = archive
            .entries()
            .map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::Spec(format!("{}: corrupt tar: {e}", path.display())))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default();
            let base = name.rsplit('/').next().unwrap_or(&name).to_string();
            let (key, ext) = match base.split_once('.') {
                Some((k, e)) => (
                    format!("{}{}", &name[..name.len() - base.len()], k),
                    e.to_ascii_lowercase(),
                ),
                None => continue,
            };
            let member = if IMAGE_MEMBERS.contains(&ext.as_str()) {
                let (offset, len) = (entry.raw_file_position(), entry.size());
                if offset + len > file_len {
                    return Err(Error::Spec(format!(
                        "{}: truncated member {name}: {len} bytes at offset {offset}, file has {file_len}",
                        path.display()
                    )));
                }
                Member::Located { offset, len }
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(|e| {
                    Error::Spec(format!("{}: truncated member {name}: {e}", path.display()))
                })?;
                Member::Inline(data)
            };
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().insert(ext, member);
        }
        let text = |g: &BTreeMap<String, Member>, ext: &str| match g.get(ext) {
            Some(Member::Inline(b)) => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        };
        for key in order {
            let g = &groups[&key];
            let image = IMAGE_MEMBERS.iter().find_map(|m| match g.get(*m) {
                Some(Member::Located { offset, len }) => Some((*offset, *len)),
                _ => None,
            });
            let caption = text(g, "caption")
                .or_else(|| text(g, "txt"))
                .map(|c| c.trim_end_matches(['\n', '\r']).to_string());
            let json: Option<serde_json::Value> =
                text(g, "json").and_then(|b| serde_json::from_str(&b).ok());
            let name = text(g, "img_name")
                .map(|b| b.trim().to_string())
                .or_else(|| {
                    json.as_ref().and_then(|j| {
                        j.get("filename")
                            .and_then(|f| f.as_str())
                            .map(str::to_string)
                    })
                })
                .unwrap_or_else(|| key.rsplit('/').next().unwrap_or(&key).to_string());
            let label = json.as_ref().and_then(|j| j.get("label")).map(|l| {
                l.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| l.to_string())
            });
            match (image, caption) {
                (Some((offset, len)), Some(caption)) => {
                    samples.push(Sample {
                        image: ImageSource::TarMember {
                            path: shared_path.clone(),
                            offset,
                            len,
                        },
                        caption,
                        name,
                        label,
                    });
                    shard_of.push(shard);
                }
                _ => skipped += 1,
            }
        }
    }
    Ok((samples, shard_of, skipped))
}

/// Sample count of the shards from a `sizes.json` beside them, if there is one.
pub fn sizes_json_total(paths: &[PathBuf]) -> Option<usize> {
    let dir = paths.first()?.parent()?;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sizes.json")).ok()?).ok()?;
    paths
        .iter()
        .map(|p| {
            v.get(p.file_name()?.to_str()?)?
                .as_u64()
                .map(|n| n as usize)
        })
        .sum()
}

fn tar_member(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    builder.append_data(&mut h, name, data)
}

/// One sample to write: the image file, its caption and its original name (and optional scene label).
pub struct ShardInput {
    pub image_path: PathBuf,
    pub caption: String,
    pub name: String,
    pub label: Option<String>,
}

impl ShardInput {
    /// One sample per caption of the images of `splits` in `ds` (images under `images_dir`), in the
    /// dataset's order, or shuffled with `shuffle_seed` (the same order for the same seed).
    pub fn from_karpathy(
        ds: &crate::karpathy::Dataset,
        images_dir: &Path,
        splits: &[&str],
        shuffle_seed: Option<u64>,
    ) -> Vec<ShardInput> {
        let mut inputs: Vec<ShardInput> = ds
            .entries
            .iter()
            .filter(|e| splits.contains(&e.split.as_str()))
            .flat_map(|e| {
                e.captions.iter().map(|c| ShardInput {
                    image_path: images_dir.join(&e.filename),
                    caption: c.clone(),
                    name: e.filename.clone(),
                    label: e.label.clone(),
                })
            })
            .collect();
        if let Some(seed) = shuffle_seed {
            use crate::train::{stream, Rng};
            Rng::keyed(seed, stream::SHARD_WRITE, 0).shuffle(&mut inputs);
        }
        inputs
    }
}

/// Writes `shard-000000.tar`, … with `shard_size` samples each, plus `sizes.json`. Each shard is written
/// atomically. Returns the shard paths and, for each sample left out, why: its image could not be read or
/// does not decode as an image.
pub fn write_shards(
    inputs: &[ShardInput],
    out: &Path,
    shard_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<PathBuf>, Vec<String>), Error> {
    std::fs::create_dir_all(out)?;
    let mut sizes = serde_json::Map::new();
    let mut paths = Vec::new();
    let mut unreadable = Vec::new();
    for (s, chunk) in inputs.chunks(shard_size.max(1)).enumerate() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut count = 0;
        for (i, input) in chunk.iter().enumerate() {
            let bytes = match std::fs::read(&input.image_path) {
                Ok(b) => b,
                Err(e) => {
                    unreadable.push(format!("{}: {e}", input.image_path.display()));
                    continue;
                }
            };
            // Only bytes that decode as an image go into a shard as `img_content`.
            if let Err(e) = pirclip_image::decode(&bytes, &input.image_path.display().to_string()) {
                unreadable.push(e.to_string());
                continue;
            }
            let key = format!("{:06}{:06}", s, i);
            tar_member(&mut builder, &format!("{key}.img_content"), &bytes)?;
            tar_member(
                &mut builder,
                &format!("{key}.caption"),
                input.caption.as_bytes(),
            )?;
            tar_member(
                &mut builder,
                &format!("{key}.img_name"),
                input.name.as_bytes(),
            )?;
            if let Some(l) = &input.label {
                tar_member(
                    &mut builder,
                    &format!("{key}.json"),
                    serde_json::json!({ "label": l, "filename": input.name })
                        .to_string()
                        .as_bytes(),
                )?;
            }
            count += 1;
            progress(1);
        }
        let name = format!("shard-{s:06}.tar");
        let path = out.join(&name);
        let data = builder.into_inner()?;
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, &path)?;
        sizes.insert(name, serde_json::json!(count));
        paths.push(path);
    }
    std::fs::write(
        out.join("sizes.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(sizes)).unwrap() + "\n",
    )?;
    Ok((paths, unreadable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces() {
        assert_eq!(
            expand_braces("s-{000..002}.tar").unwrap(),
            ["s-000.tar", "s-001.tar", "s-002.tar"]
        );
        assert_eq!(
            expand_braces("a.tar::b-{8..10}.tar").unwrap(),
            ["a.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
        );
    }

    #[test]
    fn write_then_read_and_skip_incomplete() {
        let dir = std::env::temp_dir().join(format!("pirclip-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("airport_1.jpg");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/airport_224.jpg"),
            &img,
        )
        .unwrap();
        let not_an_image = dir.join("passwd.jpg");
        std::fs::write(&not_an_image, b"root:x:0:0:root:/root:/bin/bash\n").unwrap();
        let inputs: Vec<ShardInput> = (0..5)
            .map(|i| ShardInput {
                image_path: img.clone(),
                caption: format!("caption {i}"),
                name: "airport_1.jpg".into(),
                label: Some("airport".into()),
            })
            .chain(["missing.jpg", "passwd.jpg"].map(|name| ShardInput {
                image_path: dir.join(name),
                caption: "x".into(),
                name: name.into(),
                label: None,
            }))
            .collect();
        let (paths, bad) = write_shards(&inputs, &dir.join("out"), 2, |_| {}).unwrap();
        assert_eq!(paths.len(), 4);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[1].contains("passwd.jpg") && bad[1].contains("cannot read image"),
            "{bad:?}"
        );
        let sizes: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/sizes.json")).unwrap())
                .unwrap();
        assert_eq!(sizes["shard-000002.tar"], 1);
        assert_eq!(sizes["shard-000003.tar"], 0);
        // A shard with a caption-less sample.
        let mut b = tar::Builder::new(Vec::new());
        tar_member(&mut b, "k1.jpg", b"img").unwrap();
        tar_member(&mut b, "k2.jpg", b"img").unwrap();
        tar_member(&mut b, "k2.txt", b"a caption\n").unwrap();
        std::fs::write(dir.join("out/extra.tar"), b.into_inner().unwrap()).unwrap();
        let mut all = paths.clone();
        all.push(dir.join("out/extra.tar"));
        let (samples, skipped) = read_shards(&all).unwrap();
        assert_eq!(samples.len(), 6);
        assert_eq!(skipped, 1);
        assert_eq!(samples[0].caption, "caption 0");
        assert_eq!(samples[0].name, "airport_1.jpg");
        assert_eq!(samples[0].label.as_deref(), Some("airport"));
        assert_eq!(samples[5].caption, "a caption");
        assert_eq!(samples[5].name, "k2");
    }
}
