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
//!
//! Index folders are shared like clip-retrieval's, so every file in one is untrusted input: [`IndexDir::open`]
//! holds index.json to the ranges the CLI itself enforces, [`IndexDir::check`] checks every part (npy
//! dtype, shape and size, parquet row count, each row's fields) before anything is searched or added,
//! and the approximate indexes check their own files whole ([`ivf`], [`ann`]). Nothing read from a
//! folder can index memory unchecked, allocate by a declared size, or be echoed into a message whole.

pub mod ann;
pub mod ivf;
mod strict_read;

pub use ann::{AnnOptions, AnnStore, Quantization};
pub use ivf::{IvfOptions, IvfStore};
pub use pirclip_checkpoint::clip_text;

use std::collections::HashSet;
use std::io::Read;
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
    /// The folders the indexed images were found under, canonical (symlinks resolved): `pirclip serve`
    /// serves only files under them. Absent in indexes made before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_roots: Vec<String>,
}

impl Identity {
    /// Holds every field to the ranges pirclip itself writes: an index.json from elsewhere must not
    /// set a tile of 0, a band 0, a dimension of 10^12 or a 50 MB model name.
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.dim > limits::MAX_DIM {
            return Err(format!(
                "dim {} is outside 1..={}",
                self.dim,
                limits::MAX_DIM
            ));
        }
        for (name, value) in [
            ("model", &self.model),
            ("checkpoint", &self.checkpoint),
            ("checkpoint_sha256", &self.checkpoint_sha256),
        ] {
            if value.len() > limits::NAME_BYTES {
                return Err(format!("{name} is {} bytes long", value.len()));
            }
        }
        let sc = &self.scene;
        if let Some(t) = sc.tile {
            if !limits::TILE.contains(&t) {
                return Err(format!("scene.tile {t} is outside {:?}", limits::TILE));
            }
        }
        if let Some(t) = sc.tile_stride {
            if !limits::TILE_STRIDE.contains(&t) || sc.tile.is_none() {
                return Err(format!(
                    "scene.tile_stride {t}: outside {:?}, or without a tile",
                    limits::TILE_STRIDE
                ));
            }
        }
        if let Some(b) = sc.bands {
            if !b.iter().all(|b| limits::BAND.contains(b)) {
                return Err(format!("scene.bands {b:?}: bands are 1..=65535"));
            }
        }
        if self.image_roots.len() > limits::IMAGE_ROOTS {
            return Err(format!("{} image roots", self.image_roots.len()));
        }
        for r in &self.image_roots {
            if r.len() > limits::NAME_BYTES || !is_plain_absolute(Path::new(r)) {
                return Err(format!(
                    "image root {:?} is not a plain absolute path",
                    pirclip_checkpoint::clip_text(r, 200)
                ));
            }
        }
        Ok(())
    }

    /// Whether `other` made the same embeddings: same model, checkpoint and width.
    pub fn same_model(&self, other: &Identity) -> bool {
        self.checkpoint_sha256 == other.checkpoint_sha256
            && self.model == other.model
            && self.dim == other.dim
    }
}

/// An absolute path without `.` or `..` components (so that its meaning does not depend on what
/// the folders it names contain).
pub fn is_plain_absolute(p: &Path) -> bool {
    use std::path::Component;
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
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

/// Longest message an error about a file carries (a field of a hostile file can be megabytes long).
const MAX_MESSAGE_CHARS: usize = 400;

pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.display().to_string(),
        message: pirclip_checkpoint::clip_text(&message.into(), MAX_MESSAGE_CHARS),
    }
}

/// Limits of an index folder, the same as the CLI's own where it has one.
pub mod limits {
    /// Embedding width.
    pub const MAX_DIM: usize = 1 << 16;
    /// Tile side and stride (`--tile`, `--tile-stride`).
    pub const TILE: std::ops::RangeInclusive<usize> = 8..=65_536;
    pub const TILE_STRIDE: std::ops::RangeInclusive<usize> = 1..=65_536;
    /// A TIFF has at most 65,535 samples per pixel.
    pub const BAND: std::ops::RangeInclusive<usize> = 1..=65_535;
    /// index.json: model identity and settings are small; a larger file is not one pirclip wrote.
    pub const INDEX_JSON_BYTES: u64 = 4 << 20;
    /// Length of the model name and checkpoint path in index.json, of an image path and of a CRS name.
    pub const NAME_BYTES: usize = 4096;
    /// Folders an index may name as its image roots.
    pub const IMAGE_ROOTS: usize = 4096;
    /// Bytes of a metadata part per row, at most (an image path of `NAME_BYTES`, its numbers and
    /// parquet's framing), and beyond that per part.
    pub const METADATA_BYTES_PER_ROW: u64 = 2 * NAME_BYTES as u64 + 256;
    pub const METADATA_BYTES_BASE: u64 = 1 << 20;
    /// Rows of one part (a part of 2^32 rows is not one pirclip wrote, and ids are u32 in the lists).
    pub const PART_ROWS: usize = u32::MAX as usize;
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
    /// same model (config, checkpoint hash and width), or it is refused.
    pub fn open_or_create(root: &Path, identity: Identity) -> Result<Self, Error> {
        identity
            .validate()
            .map_err(|e| invalid(&root.join("index.json"), e))?;
        let meta = root.join("index.json");
        if meta.is_file() {
            let existing = Self::open(root)?;
            if !existing.identity.same_model(&identity) {
                return Err(invalid(
                    &meta,
                    format!(
                        "made with {} (checkpoint sha256 {}, {} dimensions), not with {} ({}, {}): embeddings of two models cannot share an index",
                        existing.identity.model, existing.identity.checkpoint_sha256, existing.identity.dim,
                        identity.model, identity.checkpoint_sha256, identity.dim
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
        let dir = IndexDir {
            root: root.to_path_buf(),
            identity,
        };
        dir.write_identity()?;
        Ok(dir)
    }

    fn write_identity(&self) -> Result<(), Error> {
        pirclip_checkpoint::write_atomic(
            &self.root.join("index.json"),
            serde_json::to_string_pretty(&self.identity)
                .unwrap()
                .as_bytes(),
        )?;
        Ok(())
    }

    /// Records `roots` (canonical folders images were found under) beside those the index has,
    /// dropping any that lie inside another.
    pub fn add_image_roots(&mut self, roots: &[PathBuf]) -> Result<(), Error> {
        let mut all: Vec<PathBuf> = self
            .identity
            .image_roots
            .iter()
            .map(PathBuf::from)
            .chain(roots.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        let kept: Vec<String> = all
            .iter()
            .filter(|r| !all.iter().any(|o| o != *r && r.starts_with(o)))
            .map(|r| r.display().to_string())
            .collect();
        if kept != self.identity.image_roots {
            self.identity.image_roots = kept;
            self.identity
                .validate()
                .map_err(|e| invalid(&self.root.join("index.json"), e))?;
            self.write_identity()?;
        }
        Ok(())
    }

    /// Opens an index folder: index.json read (at most [`limits::INDEX_JSON_BYTES`]) and held to
    /// [`Identity::validate`]. The parts are checked by [`IndexDir::check`].
    pub fn open(root: &Path) -> Result<Self, Error> {
        use std::io::Read;
        let meta = root.join("index.json");
        let file = std::fs::File::open(&meta)
            .map_err(|e| invalid(&meta, format!("not an index folder ({e})")))?;
        let mut text = String::new();
        file.take(limits::INDEX_JSON_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| invalid(&meta, e.to_string()))?;
        if text.len() as u64 > limits::INDEX_JSON_BYTES {
            return Err(invalid(
                &meta,
                format!(
                    "larger than {} bytes: not an index.json pirclip wrote",
                    limits::INDEX_JSON_BYTES
                ),
            ));
        }
        let identity: Identity =
            serde_json::from_str(&text).map_err(|e| invalid(&meta, e.to_string()))?;
        identity.validate().map_err(|e| invalid(&meta, e))?;
        Ok(IndexDir {
            root: root.to_path_buf(),
            identity,
        })
    }

    /// Checks every part without reading its data: the embeddings are `[n, dim]` float16 or float32
    /// with exactly the bytes that shape calls for, and the metadata declares `n` rows within the
    /// size such rows can take. Returns the rows of each part. Search, serve, `index add` and the
    /// approximate indexes all start here, so a folder that one of them refuses is refused by all.
    pub fn check(&self) -> Result<Vec<(usize, usize)>, Error> {
        let mut out = Vec::new();
        for k in self.parts() {
            out.push((k, self.part_rows(k)?));
        }
        Ok(out)
    }

    /// Rows of part `k`, from its headers, checked as [`IndexDir::check`] says.
    fn part_rows(&self, k: usize) -> Result<usize, Error> {
        let path = self.emb_path(k);
        let h = pirclip_checkpoint::npy::read_header(&path)?;
        let dim = self.identity.dim;
        if !matches!(h.dtype, DType::F16 | DType::F32) {
            return Err(invalid(
                &path,
                format!(
                    "{} embeddings; an index holds float16 (or float32)",
                    h.dtype
                ),
            ));
        }
        if h.shape.len() != 2 || h.shape[1] != dim || h.shape[0] > limits::PART_ROWS {
            return Err(invalid(
                &path,
                format!("shape {:?}, expected [n, {dim}]", h.shape),
            ));
        }
        let size = std::fs::metadata(&path)?.len();
        if size != (h.data_offset + h.data_bytes) as u64 {
            return Err(invalid(
                &path,
                format!(
                    "{size} bytes, but its header calls for {} ({:?} {})",
                    h.data_offset + h.data_bytes,
                    h.shape,
                    h.dtype
                ),
            ));
        }
        let rows = h.shape[0];
        let meta = self.meta_path(k);
        let source = metadata_source(&meta, rows)?;
        let declared = guarded(&meta, || {
            let reader = SerializedFileReader::new(source)?;
            Ok(reader.metadata().file_metadata().num_rows())
        })?;
        if declared != rows as i64 {
            return Err(invalid(
                &meta,
                format!(
                    "{declared} rows, but {} has {rows} embeddings",
                    path.display()
                ),
            ));
        }
        Ok(rows)
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
        if let Some(bad) = embeddings.iter().position(|v| !v.is_finite()) {
            return Err(invalid(
                &self.root,
                format!(
                    "the embedding of {} holds a value that is not a number; nothing was written",
                    entries[bad / dim.max(1)].image_path
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

    /// The entries of part `k`, in row order: `rows` of them (from [`IndexDir::check`]), each with an
    /// image path of at most [`limits::NAME_BYTES`] and a tile window, if any, of positive size.
    pub fn entries(&self, k: usize, rows: usize) -> Result<Vec<Entry>, Error> {
        let path = self.meta_path(k);
        let source = metadata_source(&path, rows)?;
        let out = guarded(&path, || {
            let reader = SerializedFileReader::new(source.clone())?;
            strict_read::check_page_headers(&source, reader.metadata())
                .map_err(|e| invalid(&path, e))?;
            let mut out = Vec::new();
            for row in reader.get_row_iter(None)? {
                if out.len() == rows {
                    return Err(invalid(
                        &path,
                        format!("more than the {rows} rows it declares"),
                    ));
                }
                out.push(entry_of_row(&path, &row?)?);
            }
            Ok(out)
        })?;
        if out.len() != rows {
            return Err(invalid(
                &path,
                format!("{} rows, but the part has {rows} embeddings", out.len()),
            ));
        }
        Ok(out)
    }

    /// The `[n, dim]` embeddings of part `k`, as f32 (`rows` rows, from [`IndexDir::check`]).
    pub fn embeddings(&self, k: usize, rows: usize) -> Result<Vec<f32>, Error> {
        let path = self.emb_path(k);
        let t = pirclip_checkpoint::npy::read(&path)?;
        if !matches!(t.dtype, DType::F16 | DType::F32) || t.shape != [rows, self.identity.dim] {
            return Err(invalid(
                &path,
                format!(
                    "{} {:?}, expected float16 [{rows}, {}] (did it change while read?)",
                    t.dtype, t.shape, self.identity.dim
                ),
            ));
        }
        Ok(t.to_f32_vec())
    }

    /// Keys (path, size, mtime) of everything indexed.
    pub fn indexed_keys(&self) -> Result<HashSet<(String, i64, i64)>, Error> {
        let mut keys = HashSet::new();
        for (k, rows) in self.check()? {
            keys.extend(self.entries(k, rows)?.iter().map(Entry::key));
        }
        Ok(keys)
    }
}

/// The bytes of a metadata part of `rows` rows, if its size is within what such rows can take.
fn metadata_source(path: &Path, rows: usize) -> Result<strict_read::StrictSource, Error> {
    let most = limits::METADATA_BYTES_BASE
        .saturating_add(limits::METADATA_BYTES_PER_ROW.saturating_mul(rows as u64));
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(most + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > most {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(invalid(
            path,
            format!("{size} bytes for {rows} rows: more than such rows can take ({most})"),
        ));
    }
    strict_read::check_footer(&bytes).map_err(|e| invalid(path, e))?;
    Ok(strict_read::StrictSource::new(bytes))
}

/// Runs a parquet read, turning a panic inside the parquet crate (a crafted page can still reach one)
/// into an error naming the file.
fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(r) => r,
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(invalid(path, format!("malformed parquet ({why})")))
        }
    }
}

/// One metadata row, its fields checked.
fn entry_of_row(path: &Path, row: &parquet::record::Row) -> Result<Entry, Error> {
    use parquet::record::Field;
    let mut e = Entry::default();
    let (mut tile, mut centre) = ([None; 4], [None; 2]);
    let mut crs = None;
    for (name, field) in row.get_column_iter() {
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
    if e.image_path.is_empty()
        || e.image_path.len() > limits::NAME_BYTES
        || e.image_path.contains('\0')
    {
        return Err(invalid(
            path,
            format!(
                "a row whose image_path is empty, over {} bytes or holds NUL",
                limits::NAME_BYTES
            ),
        ));
    }
    if crs.as_ref().is_some_and(|c: &String| c.len() > 64) {
        return Err(invalid(path, "a crs name over 64 bytes"));
    }
    if let [Some(x), Some(y), Some(width), Some(height)] = tile {
        let side = 1..=(1i64 << 20);
        if x < 0
            || y < 0
            || !side.contains(&width)
            || !side.contains(&height)
            || x.checked_add(width).is_none()
            || y.checked_add(height).is_none()
        {
            return Err(invalid(
                path,
                format!("tile {x},{y} {width}×{height} is not a window"),
            ));
        }
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
    Ok(e)
}

/// Nearest-neighbour search over unit vectors by inner product. The index's one interface, so that an
/// approximate index or a remote vector database can stand behind it.
pub trait VectorStore {
    fn dim(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k` best rows for `query` (unit length), best first: (row, inner product). At most
    /// `min(k, len)` results are allocated whatever `k` is; rows whose score is not a number are never
    /// returned. An engine's failure is an error, never an empty result.
    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError>;
    /// Row `row`'s vector (as stored: float16-rounded in an index).
    fn vector(&self, row: usize) -> Vec<f32>;
}

/// Why a search could not be answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error("the query has {got} values, the index {want}")]
    Dimension { got: usize, want: usize },
    /// The approximate index failed or answered with rows it does not hold: its file is not what it
    /// claims to be.
    #[error("the approximate index failed: {0}")]
    Engine(String),
}

pub(crate) fn check_query(query: &[f32], dim: usize) -> Result<(), SearchError> {
    if query.len() != dim {
        return Err(SearchError::Dimension {
            got: query.len(),
            want: dim,
        });
    }
    Ok(())
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
    /// `vectors` is `[n, dim]`; a trailing partial row is an error.
    pub fn new(dim: usize, vectors: Vec<f32>) -> Result<Self, String> {
        if dim == 0 || vectors.len() % dim != 0 {
            return Err(format!("{} values are not rows of {dim}", vectors.len()));
        }
        Ok(FlatStore { dim, vectors })
    }

    /// Row `i`'s vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows holding a value that is not a finite number (search never returns them).
    pub fn non_finite_rows(&self) -> usize {
        self.vectors
            .chunks_exact(self.dim)
            .filter(|r| !r.iter().all(|v| v.is_finite()))
            .count()
    }
}

impl VectorStore for FlatStore {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.vectors.len() / self.dim
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError> {
        check_query(query, self.dim)?;
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .chunks_exact(self.dim)
            .map(|row| dot_f32(row, query))
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(scored)
    }

    fn vector(&self, row: usize) -> Vec<f32> {
        if row >= self.len() {
            return vec![0f32; self.dim];
        }
        self.row(row).to_vec()
    }
}

/// An index folder loaded for search: every part's entries in part order, and its vectors behind the
/// approximate index when one covers every row, else exact search.
pub struct LoadedIndex {
    pub dir: IndexDir,
    pub entries: Vec<Entry>,
    pub store: Box<dyn VectorStore + Send + Sync>,
    /// "approximate (HNSW …)" or "exact", for logs and /health.
    pub search_kind: String,
    /// What was wrong but not fatal (rows skipped), for the log.
    pub warnings: Vec<String>,
}

/// Every part's entries and `[n, dim]` vectors, concatenated (the parts checked first).
/// Every part's entries, concatenated (`parts` from [`IndexDir::check`]).
fn read_entries(dir: &IndexDir, parts: &[(usize, usize)]) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::new();
    for &(k, rows) in parts {
        entries.extend(dir.entries(k, rows)?);
    }
    Ok(entries)
}

/// Every part's `[n, dim]` vectors, concatenated.
fn read_vectors(dir: &IndexDir, parts: &[(usize, usize)]) -> Result<Vec<f32>, Error> {
    let mut vectors = Vec::new();
    for &(k, rows) in parts {
        vectors.extend(dir.embeddings(k, rows)?);
    }
    Ok(vectors)
}

impl LoadedIndex {
    pub fn load(root: &Path) -> Result<Self, Error> {
        let dir = IndexDir::open(root)?;
        let parts = dir.check()?;
        let entries = read_entries(&dir, &parts)?;
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
                warnings: Vec::new(),
            });
        }
        let vectors = read_vectors(&dir, &parts)?;
        let store = FlatStore::new(dir.identity.dim, vectors).map_err(|e| invalid(root, e))?;
        let mut warnings = Vec::new();
        match store.non_finite_rows() {
            0 => {}
            n => warnings.push(format!(
                "{}: {n} rows hold values that are not numbers; search skips them (rebuild the index)",
                root.display()
            )),
        }
        Ok(LoadedIndex {
            dir,
            entries,
            store: Box::new(store),
            search_kind: "exact".into(),
            warnings,
        })
    }

    /// The `k` best rows for `query`, each a row this index holds, with a finite score.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError> {
        let hits = self.store.search(query, k.min(self.entries.len()))?;
        if let Some(&(row, _)) = hits.iter().find(|(row, _)| *row >= self.entries.len()) {
            return Err(SearchError::Engine(format!(
                "it answered row {row} of an index of {} rows",
                self.entries.len()
            )));
        }
        Ok(hits.into_iter().filter(|(_, s)| s.is_finite()).collect())
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
    let parts = dir.check()?;
    let rows: usize = parts.iter().map(|(_, n)| n).sum();
    let dim = dir.identity.dim;
    let vectors_from = |from: usize| -> Result<Vec<f32>, Error> {
        let mut v = read_vectors(&dir, &parts)?;
        v.drain(..from * dim);
        if let Some(bad) = v
            .chunks_exact(dim)
            .position(|r| !r.iter().all(|x| x.is_finite()))
        {
            return Err(invalid(
                root,
                format!(
                    "row {} holds values that are not numbers: rebuild the index",
                    from + bad
                ),
            ));
        }
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
            image_roots: Vec::new(),
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
        let hits = idx.search(&[0.0, 1.0], 2).unwrap();
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
        assert_eq!(dir.entries(0, 3).unwrap(), rows);
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
            dir.entries(1, 1).unwrap(),
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
