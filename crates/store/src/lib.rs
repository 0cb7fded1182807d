//! An index folder in clip-retrieval's layout, and search over it. Engine-free: vectors are plain f32.
//!
//! ```text
//! INDEX/index.json                  model identity (config, checkpoint sha256), dimension, counts
//! INDEX/img_emb/img_emb_K.npy       part K: [n, dim] float16, rows L2-normalised
//! INDEX/metadata/metadata_K.parquet part K: image_path, size, mtime (one row per embedding row)
//! INDEX/image.ivf                   optional approximate index: inverted lists (ivf.rs), or
//! INDEX/image.usearch(.json)        an HNSW graph (ann.rs); used only while it covers every row
//! ```
//!
//! Parts are written whole and atomically, embeddings first and metadata last: a part counts only once
//! its metadata exists, so a build killed halfway leaves complete parts and resumes after them, and
//! `add` appends parts. The parquet file uses the `parquet` crate's column writers (no arrow needed).

pub mod ann;
pub mod ivf;

pub use ann::{AnnOptions, AnnStore, Quantization};
pub use ivf::{IvfOptions, IvfStore};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
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
    /// How images became rows: tiling and band choice. Every `add` must use the same, and the server
    /// renders tiles by it.
    #[serde(default)]
    pub scene: SceneSettings,
}

/// Tiling and band settings of an index (absent in indexes made before tiling existed: whole images,
/// default bands).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SceneSettings {
    /// Tile side in pixels; `None` = whole images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile_stride: Option<usize>,
    /// 1-based red, green, blue bands of TIFFs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bands: Option<[usize; 3]>,
}

/// One indexed image or tile of an image (one embedding row).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entry {
    pub image_path: String,
    pub size: i64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// The pixel window of a tile cut from a larger scene; `None` for a whole image.
    pub tile: Option<Tile>,
    /// The centre of the image or tile on the map, for georeferenced scenes.
    pub geo: Option<GeoPoint>,
}

/// A pixel window: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub x: i64,
    pub y: i64,
    pub width: i64,
    pub height: i64,
}

/// Map coordinates in the scene's reference system (`crs`, such as `EPSG:32633`; longitude and latitude
/// for geographic ones such as `EPSG:4326`).
#[derive(Debug, Clone, PartialEq)]
pub struct GeoPoint {
    pub x: f64,
    pub y: f64,
    pub crs: Option<String>,
}

impl Entry {
    /// Where the row lies, for people: `tile x,y w×h` and `EPSG:… (x, y)` when known; empty otherwise.
    pub fn location(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.tile {
            parts.push(format!("tile {},{} {}×{}", t.x, t.y, t.width, t.height));
        }
        if let Some(g) = &self.geo {
            let crs = g.crs.as_deref().unwrap_or("map");
            parts.push(format!("{crs} ({:.6}, {:.6})", g.x, g.y));
        }
        parts.join("  ")
    }

    /// The (path, size, mtime) key that says a file is already indexed, unchanged (all its tiles share it).
    pub fn key(&self) -> (String, i64, i64) {
        (self.image_path.clone(), self.size, self.mtime)
    }
}

pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

pub struct IndexDir {
    pub root: PathBuf,
    pub identity: Identity,
}

/// image_path, size and mtime are always there; tile and geo columns are null for whole, unreferenced
/// images (indexes written before they existed have only the first three, and read the same).
const METADATA_SCHEMA: &str = "message metadata {
    REQUIRED BYTE_ARRAY image_path (UTF8); REQUIRED INT64 size; REQUIRED INT64 mtime;
    OPTIONAL INT64 tile_x; OPTIONAL INT64 tile_y; OPTIONAL INT64 tile_width; OPTIONAL INT64 tile_height;
    OPTIONAL DOUBLE center_x; OPTIONAL DOUBLE center_y; OPTIONAL BYTE_ARRAY crs (UTF8);
}";

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
            if existing.identity.scene != identity.scene {
                return Err(invalid(
                    &meta,
                    format!(
                        "made with tiling/bands {:?}, not {:?}: rows of one index are cut one way",
                        existing.identity.scene, identity.scene
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
            // Optional columns: the present values, and a definition level per row (1 present, 0 null).
            fn levels<T>(values: &[Option<T>]) -> Vec<i16> {
                values.iter().map(|v| v.is_some() as i16).collect()
            }
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
            let tile = |f: fn(&Tile) -> i64| -> Vec<Option<i64>> {
                entries.iter().map(|e| e.tile.as_ref().map(f)).collect()
            };
            for values in [
                tile(|t| t.x),
                tile(|t| t.y),
                tile(|t| t.width),
                tile(|t| t.height),
            ] {
                let present: Vec<i64> = values.iter().flatten().copied().collect();
                let mut col = rg.next_column().map_err(perr)?.expect("tile column");
                col.typed::<Int64Type>()
                    .write_batch(&present, Some(&levels(&values)), None)
                    .map_err(perr)?;
                col.close().map_err(perr)?;
            }
            let geo = |f: fn(&GeoPoint) -> f64| -> Vec<Option<f64>> {
                entries.iter().map(|e| e.geo.as_ref().map(f)).collect()
            };
            for values in [geo(|g| g.x), geo(|g| g.y)] {
                let present: Vec<f64> = values.iter().flatten().copied().collect();
                let mut col = rg.next_column().map_err(perr)?.expect("centre column");
                col.typed::<DoubleType>()
                    .write_batch(&present, Some(&levels(&values)), None)
                    .map_err(perr)?;
                col.close().map_err(perr)?;
            }
            let crs: Vec<Option<ByteArray>> = entries
                .iter()
                .map(|e| e.geo.as_ref()?.crs.as_deref().map(ByteArray::from))
                .collect();
            let present: Vec<ByteArray> = crs.iter().flatten().cloned().collect();
            let mut col = rg.next_column().map_err(perr)?.expect("crs column");
            col.typed::<ByteArrayType>()
                .write_batch(&present, Some(&levels(&crs)), None)
                .map_err(perr)?;
            col.close().map_err(perr)?;
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
            let mut e = Entry::default();
            let (mut tile, mut centre) = ([None; 4], [None; 2]);
            let mut crs = None;
            for (name, field) in row.get_column_iter() {
                use parquet::record::Field;
                match (name.as_str(), field) {
                    ("image_path", Field::Str(s)) => e.image_path = s.clone(),
                    ("size", Field::Long(v)) => e.size = *v,
                    ("mtime", Field::Long(v)) => e.mtime = *v,
                    ("tile_x", Field::Long(v)) => tile[0] = Some(*v),
                    ("tile_y", Field::Long(v)) => tile[1] = Some(*v),
                    ("tile_width", Field::Long(v)) => tile[2] = Some(*v),
                    ("tile_height", Field::Long(v)) => tile[3] = Some(*v),
                    ("center_x", Field::Double(v)) => centre[0] = Some(*v),
                    ("center_y", Field::Double(v)) => centre[1] = Some(*v),
                    ("crs", Field::Str(s)) => crs = Some(s.clone()),
                    _ => {}
                }
            }
            if e.image_path.is_empty() {
                return Err(invalid(&path, "a row without image_path"));
            }
            if let [Some(x), Some(y), Some(width), Some(height)] = tile {
                e.tile = Some(Tile {
                    x,
                    y,
                    width,
                    height,
                });
            }
            if let [Some(x), Some(y)] = centre {
                e.geo = Some(GeoPoint { x, y, crs });
            }
            out.push(e);
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
    /// Row `row`'s vector (as stored: float16-rounded in an index).
    fn vector(&self, row: usize) -> Vec<f32>;
}

/// Inner product by numkong's SIMD kernel for this CPU (accumulated in f64).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    use numkong::Dot;
    f32::dot(a, b).map_or(f32::NAN, |d| d as f32)
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
            .map(|row| dot_f32(row, query))
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

    fn vector(&self, row: usize) -> Vec<f32> {
        self.row(row).to_vec()
    }
}

/// An index folder loaded for search: every part's entries in part order, and its vectors behind the
/// approximate graph when one covers every row, else exact search.
pub struct LoadedIndex {
    pub dir: IndexDir,
    pub entries: Vec<Entry>,
    pub store: Box<dyn VectorStore + Send + Sync>,
    /// "approximate (HNSW …)" or "exact", for logs and /health.
    pub search_kind: String,
}

/// Every part's entries and `[n, dim]` vectors, concatenated.
fn read_all(dir: &IndexDir, with_vectors: bool) -> Result<(Vec<Entry>, Vec<f32>), Error> {
    let (mut entries, mut vectors) = (Vec::new(), Vec::new());
    for k in dir.parts() {
        let e = dir.entries(k)?;
        if with_vectors {
            let v = dir.embeddings(k)?;
            if v.len() != e.len() * dir.identity.dim {
                return Err(invalid(
                    &dir.root,
                    format!(
                        "part {k}: {} metadata rows but {} embeddings",
                        e.len(),
                        v.len() / dir.identity.dim.max(1)
                    ),
                ));
            }
            vectors.extend(v);
        }
        entries.extend(e);
    }
    Ok((entries, vectors))
}

impl LoadedIndex {
    pub fn load(root: &Path) -> Result<Self, Error> {
        let dir = IndexDir::open(root)?;
        let (entries, _) = read_all(&dir, false)?;
        let covers = |s: &dyn VectorStore| s.len() == entries.len() && s.dim() == dir.identity.dim;
        let approximate: Option<(String, Box<dyn VectorStore + Send + Sync>)> =
            match IvfStore::open(root)? {
                Some(ivf) if covers(&ivf) => Some((ivf.describe(), Box::new(ivf))),
                _ => match AnnStore::open(root, true)? {
                    Some(ann) if covers(&ann) => Some((ann.describe(), Box::new(ann))),
                    _ => None,
                },
            };
        if let Some((kind, store)) = approximate {
            return Ok(LoadedIndex {
                search_kind: format!("approximate ({kind}, memory-mapped)"),
                dir,
                entries,
                store,
            });
        }
        let (entries, vectors) = read_all(&dir, true)?;
        let store = FlatStore::new(dir.identity.dim, vectors);
        Ok(LoadedIndex {
            dir,
            entries,
            store: Box::new(store),
            search_kind: "exact".into(),
        })
    }
}

/// Which approximate index to keep beside the parts, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnnConfig {
    /// Inverted lists (`image.ivf`).
    Ivf(IvfOptions),
    /// An HNSW graph (`image.usearch`).
    Hnsw(AnnOptions),
}

/// The graph's files in `root` (the inverted lists are one file, [`IvfStore::path`]).
fn graph_files(root: &Path) -> [PathBuf; 2] {
    [AnnStore::graph_path(root), AnnStore::sidecar_path(root)]
}

/// Removes those of `paths` that exist; whether any did.
fn remove_present(paths: impl IntoIterator<Item = PathBuf>) -> Result<bool, Error> {
    let mut removed = false;
    for p in paths {
        if p.is_file() {
            std::fs::remove_file(&p)?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Whether `root` holds an approximate index of either kind.
pub fn has_ann(root: &Path) -> bool {
    IvfStore::path(root).is_file() || graph_files(root).iter().any(|p| p.is_file())
}

/// Removes any approximate index from `root` (exact search takes over); whether one was there.
pub fn remove_ann(root: &Path) -> Result<bool, Error> {
    remove_present(graph_files(root).into_iter().chain([IvfStore::path(root)]))
}

/// What [`update_ann`] did.
#[derive(Debug)]
pub struct AnnReport {
    pub rows_added: usize,
    /// The index as it now is, e.g. "IVF 100 lists, 16 probes, F16".
    pub kind: String,
    pub rows: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// Brings the index's approximate index up to date: extends it with the rows added since it was built,
/// or builds it (anew when `config` differs from what it was built with, or, for inverted lists, when
/// the rows have outgrown the trained centroids). An index of the other kind is removed. The
/// embeddings are read only when rows are to be added.
pub fn update_ann(
    root: &Path,
    config: AnnConfig,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<AnnReport, Error> {
    let started = std::time::Instant::now();
    let dir = IndexDir::open(root)?;
    let rows = read_all(&dir, false)?.0.len();
    let dim = dir.identity.dim;
    let vectors_from = |from: usize| -> Result<Vec<f32>, Error> {
        let mut v = read_all(&dir, true)?.1;
        v.drain(..from * dim);
        Ok(v)
    };
    let report = |rows_added: usize, kind: String, bytes: usize| AnnReport {
        rows_added,
        kind,
        rows,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    match config {
        AnnConfig::Ivf(options) => {
            remove_present(graph_files(root))?;
            // Lists that cannot be opened (damaged, or from another version) are rebuilt, not fatal:
            // they are derived from the parts.
            let opened = IvfStore::open(root).ok().flatten();
            let probes = match options.probes {
                0 => opened
                    .as_ref()
                    .map_or(ivf::DEFAULT_PROBES, |s| s.options().probes),
                p => p,
            };
            let existing = opened.filter(|s| {
                s.dim() == dim
                    && s.rows() <= rows
                    && (options.lists == 0 || options.lists == s.lists())
                    && rows <= ivf::RETRAIN_GROWTH.saturating_mul(s.trained_rows().max(1))
            });
            let (mut ivf, from) = match existing {
                Some(s) if s.rows() == rows && s.options().probes == probes => {
                    return Ok(report(0, s.describe(), s.serialized_len()));
                }
                Some(mut s) => {
                    let from = s.rows();
                    if from < rows {
                        s.extend(&vectors_from(from)?, threads, &|d| progress(d, rows - from))
                            .map_err(|e| invalid(root, e))?;
                    }
                    (s, from)
                }
                None => {
                    let options = IvfOptions { probes, ..options };
                    let built = IvfStore::build(dim, &vectors_from(0)?, options, threads, &|d| {
                        progress(d, rows)
                    })
                    .map_err(|e| invalid(root, e))?;
                    (built, 0)
                }
            };
            ivf.set_probes(probes);
            ivf.save(root)?;
            Ok(report(rows - from, ivf.describe(), ivf.serialized_len()))
        }
        AnnConfig::Hnsw(options) => {
            remove_present([IvfStore::path(root)])?;
            // A graph that cannot be opened (damaged, or without a checksum) is rebuilt.
            let existing = AnnStore::open(root, false).ok().flatten().filter(|a| {
                let (mine, theirs) = (a.options(), options);
                mine.connectivity == theirs.connectivity
                    && mine.expansion_add == theirs.expansion_add
                    && mine.quantization == theirs.quantization
                    && a.len() <= rows
            });
            let mut ann = match existing {
                Some(a) if a.len() == rows && a.options() == options => {
                    return Ok(report(0, a.describe(), a.serialized_len()));
                }
                Some(a) => a,
                None => AnnStore::build(dim, &[], options, threads, &|_| {})
                    .map_err(|e| invalid(root, e))?,
            };
            let from = ann.len();
            if from < rows {
                ann.extend(&vectors_from(from)?, threads, &|done| {
                    progress(done, rows - from)
                })
                .map_err(|e| invalid(root, e))?;
            }
            ann.set_expansion_search(options.expansion_search);
            ann.save(root)?;
            Ok(report(rows - from, ann.describe(), ann.serialized_len()))
        }
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
            scene: SceneSettings::default(),
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
            ..Default::default()
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

    /// `update_ann` with inverted lists: new rows join the trained lists until the index has grown
    /// `RETRAIN_GROWTH` times past the rows they were trained on, then the lists are trained anew;
    /// with nothing new nothing is redone.
    #[test]
    fn inverted_lists_extend_then_retrain_as_the_index_grows() {
        let root = std::env::temp_dir().join(format!("pirclip-store-ivf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = IndexDir::open_or_create(&root, identity("aa")).unwrap();
        let append = |from: usize, n: usize| {
            let entries: Vec<Entry> = (from..from + n)
                .map(|i| Entry {
                    image_path: format!("{i}.jpg"),
                    ..Default::default()
                })
                .collect();
            let angles = (from..from + n).map(|i| i as f32 * 0.1);
            let v: Vec<f32> = angles.flat_map(|a| [a.cos(), a.sin()]).collect();
            dir.append_part(&entries, &v).unwrap();
        };
        let update = || {
            update_ann(
                &root,
                AnnConfig::Ivf(IvfOptions {
                    lists: 0,
                    probes: 0,
                }),
                1,
                &|_, _| {},
            )
            .unwrap()
        };
        let trained = || IvfStore::open(&root).unwrap().unwrap().trained_rows();
        append(0, 100);
        let r = update();
        assert_eq!(
            (r.rows_added, r.kind.as_str()),
            (100, "IVF 10 lists, 16 probes, F16")
        );
        assert_eq!(trained(), 100);
        append(100, 200);
        assert_eq!(update().rows_added, 200);
        assert_eq!(trained(), 100, "300 rows: still the lists trained on 100");
        let r = update();
        assert_eq!((r.rows_added, r.rows), (0, 300));
        append(300, 200);
        let r = update();
        assert_eq!(
            (r.rows_added, r.rows),
            (500, 500),
            "500 > 4 x 100: trained anew"
        );
        assert_eq!(trained(), 500);
        assert_eq!(r.kind, "IVF 22 lists, 16 probes, F16");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn tile_and_geo_columns_round_trip_and_three_column_parts_still_read() {
        let root = std::env::temp_dir().join(format!("pirclip-store-geo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = IndexDir::open_or_create(&root, identity("aa")).unwrap();
        let tiled = Entry {
            image_path: "scene.tif".into(),
            size: 1,
            mtime: 2,
            tile: Some(Tile {
                x: 160,
                y: 320,
                width: 224,
                height: 224,
            }),
            geo: Some(GeoPoint {
                x: 500_163.6,
                y: 4_099_740.4,
                crs: Some("EPSG:32633".into()),
            }),
        };
        let unreferenced = Entry {
            geo: Some(GeoPoint {
                x: 1.5,
                y: -2.5,
                crs: None,
            }),
            ..tiled.clone()
        };
        let whole = Entry {
            image_path: "a.jpg".into(),
            ..Default::default()
        };
        let rows = [tiled.clone(), whole.clone(), unreferenced.clone()];
        dir.append_part(&rows, &[1.0, 0.0, 0.0, 1.0, 0.6, 0.8])
            .unwrap();
        assert_eq!(dir.entries(0).unwrap(), rows);
        assert_eq!(
            tiled.location(),
            "tile 160,320 224×224  EPSG:32633 (500163.600000, 4099740.400000)"
        );
        assert_eq!(whole.location(), "");
        // A part written before tiles existed: image_path, size, mtime only.
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message metadata { REQUIRED BYTE_ARRAY image_path (UTF8); REQUIRED INT64 size; REQUIRED INT64 mtime; }",
            )
            .unwrap(),
        );
        let file = std::fs::File::create(dir.meta_path(1)).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, Default::default()).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&[ByteArray::from("old.jpg")], None, None)
            .unwrap();
        col.close().unwrap();
        for v in [3i64, 4] {
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<Int64Type>()
                .write_batch(&[v], None, None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
        std::fs::copy(dir.emb_path(0), dir.emb_path(1)).unwrap();
        assert_eq!(
            dir.entries(1).unwrap(),
            [Entry {
                image_path: "old.jpg".into(),
                size: 3,
                mtime: 4,
                ..Default::default()
            }]
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
