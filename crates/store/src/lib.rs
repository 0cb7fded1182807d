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

mod flat;
mod folder;
mod identity;
mod loaded;

pub(crate) use flat::check_query;
pub use flat::{FlatStore, SearchError, VectorStore};
pub use folder::IndexDir;
pub use identity::{is_plain_absolute, Entry, GeoPoint, Identity, SceneSettings, Tile};
pub use loaded::{has_ann, remove_ann, update_ann, AnnConfig, AnnReport, LoadedIndex};

pub use ann::{AnnOptions, AnnStore, Quantization};
pub use ivf::{IvfOptions, IvfStore};
pub use pirclip_checkpoint::clip_text;

use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

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
