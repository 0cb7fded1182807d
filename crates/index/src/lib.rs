//! `pirclip index`: an image archive → an index folder (`pirclip_store`'s layout). Walks folders
//! recursively, skips files already indexed unchanged (path + size + mtime), decodes on worker threads
//! while the model encodes, lists unreadable files instead of failing on them, and writes a part every
//! `part_size` images: a build that is killed resumes after its last complete part, and `add` is the same
//! walk over an existing index.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pirclip_image::{SceneOptions, Window};
use pirclip_model::clip::images_tensor;
use pirclip_model::{l2_normalize, ClipModel, EncodeOptions};
use pirclip_retrieval::Progress;
use pirclip_store::{Entry, GeoPoint, IndexDir, SceneSettings, Tile};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] pirclip_store::Error),
    #[error("{path}: {message}")]
    Input { path: String, message: String },
}

/// SHA-256 of a file, hex (the model identity of an index, and eval's record of the weights).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Image files under `inputs` (folders walked recursively, hidden entries skipped), as absolute paths in
/// sorted order, duplicates removed.
pub fn walk(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut pending: Vec<PathBuf> = Vec::new();
    for input in inputs {
        let abs = std::fs::canonicalize(input).map_err(|e| Error::Input {
            path: input.display().to_string(),
            message: e.to_string(),
        })?;
        if abs.is_dir() {
            pending.push(abs);
        } else {
            out.push(abs);
        }
    }
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if p.is_dir() {
                pending.push(p);
            } else if pirclip_data::is_image_path(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub struct BuildOptions {
    /// Images per part (the unit of resumption).
    pub part_size: usize,
    pub batch_size: usize,
    pub workers: usize,
    /// Tiling and bands (recorded in the index's identity).
    pub scene: SceneSettings,
}

#[derive(Debug, Default)]
pub struct BuildReport {
    pub found: usize,
    pub already_indexed: usize,
    pub added: usize,
    pub parts_written: usize,
    /// `path: reason` of each file that could not be read or decoded (skipped, never fatal).
    pub unreadable: Vec<String>,
    pub seconds: f64,
}

fn entry_of(path: &Path) -> Option<Entry> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Some(Entry {
        image_path: path.display().to_string(),
        size: meta.len() as i64,
        mtime,
        ..Default::default()
    })
}

/// Adds every image under `inputs` that `dir` does not hold yet (unchanged).
pub fn build(
    model: &ClipModel,
    opts: EncodeOptions,
    dir: &IndexDir,
    inputs: &[PathBuf],
    o: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildReport, Error> {
    let started = Instant::now();
    let files = walk(inputs)?;
    let indexed = dir.indexed_keys()?;
    let mut report = BuildReport {
        found: files.len(),
        ..Default::default()
    };
    let mut todo: Vec<(PathBuf, Entry)> = Vec::new();
    for f in files {
        match entry_of(&f) {
            Some(e) if indexed.contains(&e.key()) => report.already_indexed += 1,
            Some(e) => todo.push((f, e)),
            None => report
                .unreadable
                .push(format!("{}: cannot read its metadata", f.display())),
        }
    }
    let size = model.config.image_size;
    let scene_options = SceneOptions {
        bands: o.scene.bands,
    };
    // Whole images decode a model batch at a time; scenes cut into tiles, a few at a time (one scene's
    // tiles can be hundreds of model inputs).
    let files_per_batch = if o.scene.tile.is_some() {
        o.workers.max(1)
    } else {
        o.batch_size.max(1)
    };
    progress.start("images", todo.len() as u64);
    for part in todo.chunks(o.part_size.max(1)) {
        let (mut entries, mut values) = (Vec::new(), Vec::new());
        let mut pending = Pending::default();
        // Decoding runs one batch ahead of the model on its own threads.
        std::thread::scope(|s| -> Result<(), Error> {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (scene_options, scene) = (&scene_options, &o.scene);
            s.spawn(move || {
                for batch in part.chunks(files_per_batch) {
                    let decoded = pirclip_data::parallel_map(batch, o.workers.max(1), |(p, e)| {
                        rows_of(p, e, scene_options, scene, size)
                    });
                    if tx.send((batch.len(), decoded)).is_err() {
                        return;
                    }
                }
            });
            for (files, decoded) in rx {
                for rows in decoded {
                    match rows {
                        Ok(rows) => {
                            for (entry, pixels) in rows {
                                pending.entries.push(entry);
                                pending.pixels.extend(pixels);
                                if pending.entries.len() >= o.batch_size.max(1) {
                                    pending.encode(model, opts, size, &mut entries, &mut values);
                                }
                            }
                        }
                        Err(err) => report.unreadable.push(err.to_string()),
                    }
                }
                progress.advance(files as u64);
            }
            pending.encode(model, opts, size, &mut entries, &mut values);
            Ok(())
        })?;
        if !entries.is_empty() {
            dir.append_part(&entries, &values)?;
            report.parts_written += 1;
            report.added += entries.len();
        }
    }
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Model inputs waiting for a full batch.
#[derive(Default)]
struct Pending {
    entries: Vec<Entry>,
    pixels: Vec<f32>,
}

impl Pending {
    fn encode(
        &mut self,
        model: &ClipModel,
        opts: EncodeOptions,
        size: usize,
        entries: &mut Vec<Entry>,
        values: &mut Vec<f32>,
    ) {
        if self.entries.is_empty() {
            return;
        }
        let x = images_tensor(&self.pixels, self.entries.len(), size, model.device());
        let f = tch::no_grad(|| l2_normalize(&model.encode_image(&x, opts)));
        values.extend(pirclip_retrieval::to_vec(&f));
        entries.append(&mut self.entries);
        self.pixels.clear();
    }
}

/// The rows one file gives: the whole image, or each tile of it, with its window and map position,
/// preprocessed for the model.
fn rows_of(
    path: &Path,
    entry: &Entry,
    options: &SceneOptions,
    scene: &SceneSettings,
    size: usize,
) -> Result<Vec<(Entry, Vec<f32>)>, pirclip_image::Error> {
    let decoded = pirclip_image::decode_scene_file(path, options)?;
    let (w, h) = (decoded.image.width, decoded.image.height);
    let whole = Window {
        x: 0,
        y: 0,
        width: w,
        height: h,
    };
    let windows = match scene.tile {
        Some(tile) => {
            pirclip_image::scene::tile_windows(w, h, tile, scene.tile_stride.unwrap_or(tile))
        }
        None => vec![whole],
    };
    Ok(windows
        .into_iter()
        .map(|win| {
            let mut e = entry.clone();
            if scene.tile.is_some() {
                e.tile = Some(Tile {
                    x: win.x as i64,
                    y: win.y as i64,
                    width: win.width as i64,
                    height: win.height as i64,
                });
            }
            e.geo = decoded.geo.as_ref().map(|g| {
                let (cx, cy) = win.center();
                let (x, y) = g.transform.apply(cx, cy);
                GeoPoint {
                    x,
                    y,
                    crs: g.crs.clone(),
                }
            });
            let pixels = if win == whole {
                pirclip_image::preprocess_eval(&decoded.image, size)
            } else {
                pirclip_image::preprocess_eval(
                    &pirclip_image::scene::crop(&decoded.image, win),
                    size,
                )
            };
            (e, pixels)
        })
        .collect())
}
