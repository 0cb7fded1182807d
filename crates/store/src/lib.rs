//! An index folder in clip-retrieval's layout, and search over it. Engine-free: vectors are plain f32.
//!
//! ```text
//! INDEX/index.json                  model identity (config, checkpoint sha256), dimension, counts
//! INDEX/img_emb/img_emb_K.npy       part K: [n, dim] float16, rows L2-normalised
//! INDEX/metadata/metadata_K.parquet part K: image_path, size, mtime (one row per embedding row)
//! ```
//!
//! Parts are written whole and atomically, embeddings first and metadata last: a part counts only once
//! its metadata exists, so a build killed halfway leaves complete parts and resumes after them, and
//! `add` appends parts. The parquet file uses the `parquet` crate's column writers (no arrow needed).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::RowAccessor;
use pirclip_checkpoint::{DType, TensorData};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Checkpoint(#[from] pirclip_checkpoint::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// What made the embeddings: an index is only ever extended with the same model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub model: String,
    pub config: serde_json::Value,
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    pub dim: usize,
}

/// One indexed image (one embedding row).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub image_path: String,
    pub size: i64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

impl Entry {
    /// The (path, size, mtime) key that says a file is already indexed, unchanged.
    pub fn key(&self) -> (String, i64, i64) {
        (self.image_path.clone(), self.size, self.mtime)
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

pub struct IndexDir {
    pub root: PathBuf,
    pub identity: Identity,
}

const METADATA_SCHEMA: &str = "message metadata { REQUIRED BYTE_ARRAY image_path (UTF8); REQUIRED INT64 size; REQUIRED INT64 mtime; }";

impl IndexDir {
    /// Opens an index folder, or creates it for `identity`; an existing index must have been made by the
    /// same model (config and checkpoint hash), or it is refused.
    pub fn open_or_create(root: &Path, identity: Identity) -> Result<Self, Error> {
        let meta = root.join("index.json");
        if meta.is_file() {
            let existing = Self::open(root)?;
            if existing.identity.checkpoint_sha256 != identity.checkpoint_sha256
                || existing.identity.model != identity.model
            {
                return Err(invalid(
                    &meta,
                    format!(
                        "made with {} (checkpoint sha256 {}), not with {} ({}): embeddings of two models cannot share an index",
                        existing.identity.model, existing.identity.checkpoint_sha256, identity.model, identity.checkpoint_sha256
                    ),
                ));
            }
            return Ok(existing);
        }
        std::fs::create_dir_all(root.join("img_emb"))?;
        std::fs::create_dir_all(root.join("metadata"))?;
        pirclip_checkpoint::write_atomic(
            &meta,
            serde_json::to_string_pretty(&identity).unwrap().as_bytes(),
        )?;
        Ok(IndexDir {
            root: root.to_path_buf(),
            identity,
        })
    }

    pub fn open(root: &Path) -> Result<Self, Error> {
        let meta = root.join("index.json");
        let text = std::fs::read_to_string(&meta)
            .map_err(|e| invalid(&meta, format!("not an index folder ({e})")))?;
        let identity: Identity =
            serde_json::from_str(&text).map_err(|e| invalid(&meta, e.to_string()))?;
        Ok(IndexDir {
            root: root.to_path_buf(),
            identity,
        })
    }

    fn emb_path(&self, k: usize) -> PathBuf {
        self.root.join(format!("img_emb/img_emb_{k}.npy"))
    }

    fn meta_path(&self, k: usize) -> PathBuf {
        self.root.join(format!("metadata/metadata_{k}.parquet"))
    }

    /// Complete parts, in order (a part whose metadata is missing was cut short and does not count).
    pub fn parts(&self) -> Vec<usize> {
        let mut parts: Vec<usize> = std::fs::read_dir(self.root.join("metadata"))
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().to_string();
                name.strip_prefix("metadata_")?
                    .strip_suffix(".parquet")?
                    .parse()
                    .ok()
            })
            .filter(|&k| self.emb_path(k).is_file())
            .collect();
        parts.sort_unstable();
        parts
    }

    /// Writes part `next` (the number after the last complete part): `embeddings` is `[entries, dim]`.
    pub fn append_part(&self, entries: &[Entry], embeddings: &[f32]) -> Result<usize, Error> {
        let dim = self.identity.dim;
        if embeddings.len() != entries.len() * dim {
            return Err(invalid(
                &self.root,
                format!(
                    "{} values for {} entries of dimension {dim}",
                    embeddings.len(),
                    entries.len()
                ),
            ));
        }
        let k = self.parts().last().map(|k| k + 1).unwrap_or(0);
        let halves: Vec<u8> = embeddings
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let t = TensorData::new(DType::F16, vec![entries.len(), dim], halves)?;
        pirclip_checkpoint::npy::write(self.emb_path(k), &t)?;
        let schema = Arc::new(parquet::schema::parser::parse_message_type(
            METADATA_SCHEMA,
        )?);
        let props = Arc::new(WriterProperties::builder().build());
        pirclip_checkpoint::write_atomic_with(&self.meta_path(k), |file| {
            let mut w = SerializedFileWriter::new(file.try_clone()?, schema, props)
                .map_err(|e| pirclip_checkpoint::Error::Format(e.to_string()))?;
            let perr = |e: parquet::errors::ParquetError| {
                pirclip_checkpoint::Error::Format(format!("parquet: {e}"))
            };
            let mut rg = w.next_row_group().map_err(perr)?;
            let paths: Vec<ByteArray> = entries
                .iter()
                .map(|e| ByteArray::from(e.image_path.as_str()))
                .collect();
            let mut col = rg.next_column().map_err(perr)?.expect("image_path column");
            col.typed::<ByteArrayType>()
                .write_batch(&paths, None, None)
                .map_err(perr)?;
            col.close().map_err(perr)?;
            for values in [
                entries.iter().map(|e| e.size).collect::<Vec<_>>(),
                entries.iter().map(|e| e.mtime).collect(),
            ] {
                let mut col = rg.next_column().map_err(perr)?.expect("int64 column");
                col.typed::<Int64Type>()
                    .write_batch(&values, None, None)
                    .map_err(perr)?;
                col.close().map_err(perr)?;
            }
            rg.close().map_err(perr)?;
            w.close().map_err(perr)?;
            Ok(())
        })?;
        Ok(k)
    }

    /// The entries of part `k`, in row order.
    pub fn entries(&self, k: usize) -> Result<Vec<Entry>, Error> {
        let path = self.meta_path(k);
        let reader = SerializedFileReader::new(std::fs::File::open(&path)?)?;
        let mut out = Vec::new();
        for row in reader.get_row_iter(None)? {
            let row = row?;
            out.push(Entry {
                image_path: row
                    .get_string(0)
                    .map_err(|e| invalid(&path, e.to_string()))?
                    .clone(),
                size: row.get_long(1).map_err(|e| invalid(&path, e.to_string()))?,
                mtime: row.get_long(2).map_err(|e| invalid(&path, e.to_string()))?,
            });
        }
        Ok(out)
    }

    /// The `[n, dim]` embeddings of part `k`, as f32.
    pub fn embeddings(&self, k: usize) -> Result<Vec<f32>, Error> {
        let path = self.emb_path(k);
        let t = pirclip_checkpoint::npy::read(&path)?;
        if t.shape.len() != 2 || t.shape[1] != self.identity.dim {
            return Err(invalid(
                &path,
                format!("shape {:?}, expected [n, {}]", t.shape, self.identity.dim),
            ));
        }
        Ok(t.to_f32_vec())
    }

    /// Keys (path, size, mtime) of everything indexed.
    pub fn indexed_keys(&self) -> Result<HashSet<(String, i64, i64)>, Error> {
        let mut keys = HashSet::new();
        for k in self.parts() {
            keys.extend(self.entries(k)?.iter().map(Entry::key));
        }
        Ok(keys)
    }
}

/// Nearest-neighbour search over unit vectors by inner product. The index's one interface, so that an
/// approximate index or a remote vector database can stand behind it.
pub trait VectorStore {
    fn dim(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k` best rows for `query` (unit length), best first: (row, inner product).
    fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)>;
}

/// Exact search: every row scored, top-k kept. Right for archives up to a few hundred thousand images.
pub struct FlatStore {
    dim: usize,
    vectors: Vec<f32>,
}

impl FlatStore {
    pub fn new(dim: usize, vectors: Vec<f32>) -> Self {
        assert_eq!(vectors.len() % dim.max(1), 0, "vectors of dimension {dim}");
        FlatStore { dim, vectors }
    }
}

impl FlatStore {
    /// Row `i`'s vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

impl VectorStore for FlatStore {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.vectors.len() / self.dim.max(1)
    }

    fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        assert_eq!(query.len(), self.dim, "query dimension");
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim)
            .map(|row| row.iter().zip(query).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored
    }
}

/// An index folder loaded for search: every part's rows and entries, concatenated in part order.
pub struct LoadedIndex {
    pub dir: IndexDir,
    pub entries: Vec<Entry>,
    pub store: FlatStore,
}

impl LoadedIndex {
    pub fn load(root: &Path) -> Result<Self, Error> {
        let dir = IndexDir::open(root)?;
        let (mut entries, mut vectors) = (Vec::new(), Vec::new());
        for k in dir.parts() {
            let e = dir.entries(k)?;
            let v = dir.embeddings(k)?;
            if v.len() != e.len() * dir.identity.dim {
                return Err(invalid(
                    root,
                    format!(
                        "part {k}: {} metadata rows but {} embeddings",
                        e.len(),
                        v.len() / dir.identity.dim.max(1)
                    ),
                ));
            }
            entries.extend(e);
            vectors.extend(v);
        }
        let store = FlatStore::new(dir.identity.dim, vectors);
        Ok(LoadedIndex {
            dir,
            entries,
            store,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(sha: &str) -> Identity {
        Identity {
            model: "m".into(),
            config: serde_json::json!({"embed_dim": 2}),
            checkpoint: "c".into(),
            checkpoint_sha256: sha.into(),
            dim: 2,
        }
    }

    #[test]
    fn parts_round_trip_and_search() {
        let root = std::env::temp_dir().join(format!("pirclip-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = IndexDir::open_or_create(&root, identity("aa")).unwrap();
        let e = |p: &str| Entry {
            image_path: p.into(),
            size: 10,
            mtime: 7,
        };
        assert_eq!(
            dir.append_part(&[e("a.jpg"), e("b.jpg")], &[1.0, 0.0, 0.0, 1.0])
                .unwrap(),
            0
        );
        assert_eq!(dir.append_part(&[e("c.jpg")], &[0.6, 0.8]).unwrap(), 1);
        // A part cut short (embeddings without metadata) does not count.
        std::fs::copy(dir.emb_path(0), dir.emb_path(2)).unwrap();
        assert_eq!(dir.parts(), [0, 1]);
        let idx = LoadedIndex::load(&root).unwrap();
        assert_eq!(
            idx.entries
                .iter()
                .map(|e| e.image_path.as_str())
                .collect::<Vec<_>>(),
            ["a.jpg", "b.jpg", "c.jpg"]
        );
        let hits = idx.store.search(&[0.0, 1.0], 2);
        assert_eq!(hits[0].0, 1);
        assert_eq!(hits[1].0, 2);
        assert!((hits[1].1 - 0.8).abs() < 1e-3, "float16 storage");
        assert!(dir
            .indexed_keys()
            .unwrap()
            .contains(&("c.jpg".to_string(), 10, 7)));
        // Another model may not add to it.
        assert!(IndexDir::open_or_create(&root, identity("bb"))
            .err()
            .unwrap()
            .to_string()
            .contains("cannot share"));
    }
}
