//! An index folder on disk: index.json, and parts of embeddings (npy) with their metadata (parquet),
//! written whole and atomically and checked from their headers before anything is read.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use pirclip_checkpoint::{DType, TensorData};

use crate::{invalid, limits, strict_read, Entry, Error, GeoPoint, Identity, Tile};

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
        let declared = declared_rows(&meta, rows)?;
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

    pub(crate) fn emb_path(&self, k: usize) -> PathBuf {
        self.root.join(format!("img_emb/img_emb_{k}.npy"))
    }

    pub(crate) fn meta_path(&self, k: usize) -> PathBuf {
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

/// The most bytes a metadata part of `rows` rows can take.
fn metadata_limit(rows: usize) -> u64 {
    limits::METADATA_BYTES_BASE
        .saturating_add(limits::METADATA_BYTES_PER_ROW.saturating_mul(rows as u64))
}

fn too_large(path: &Path, size: u64, rows: usize) -> Error {
    let most = metadata_limit(rows);
    invalid(
        path,
        format!("{size} bytes for {rows} rows: more than such rows can take ({most})"),
    )
}

/// The rows a metadata part of at most `rows` rows' size declares, from its footer alone (the part's
/// pages are read, and checked, by [`IndexDir::entries`]).
fn declared_rows(path: &Path, rows: usize) -> Result<i64, Error> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > metadata_limit(rows) {
        return Err(too_large(path, size, rows));
    }
    let not_parquet = || invalid(path, "not a parquet file (no footer)");
    let mut end = [0u8; 8];
    file.seek(SeekFrom::Start(
        size.checked_sub(8).ok_or_else(not_parquet)?,
    ))?;
    file.read_exact(&mut end)?;
    if &end[4..] != b"PAR1" {
        return Err(not_parquet());
    }
    let len = u64::from(u32::from_le_bytes([end[0], end[1], end[2], end[3]]));
    let start = size
        .checked_sub(8 + len)
        .ok_or_else(|| invalid(path, format!("a footer of {len} bytes in {size}")))?;
    // The footer and the 8 bytes after it: what `check_footer` and the crate read.
    let mut tail = vec![0u8; (len + 8) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut tail)?;
    strict_read::check_footer(&tail).map_err(|e| invalid(path, e))?;
    guarded(path, || {
        let metadata =
            parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&tail[..len as usize])?;
        Ok(metadata.file_metadata().num_rows())
    })
}

/// The bytes of a metadata part of `rows` rows, if its size is within what such rows can take.
fn metadata_source(path: &Path, rows: usize) -> Result<strict_read::StrictSource, Error> {
    let most = metadata_limit(rows);
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(most + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > most {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(too_large(path, size, rows));
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
