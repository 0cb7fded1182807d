//! `pirclip index`: an image archive → an index folder (`pirclip_store`'s layout). Walks folders
//! recursively, skips files already indexed unchanged (path + size + mtime), decodes on worker threads
//! while the model encodes, lists unreadable files instead of failing on them, and writes a part every
//! `part_size` images: a build that is killed resumes after its last complete part, and `add` is the same
//! walk over an existing index.

pub mod bench;

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

/// The model that `model` (a preset, a JSON config or `None`) and `checkpoint` (or the bundled weights)
/// resolve to, and the identity an index records for it, without loading the weights.
pub fn model_identity(
    model: Option<&str>,
    checkpoint: Option<&Path>,
) -> Result<(pirclip_model::ModelConfig, PathBuf, pirclip_store::Identity), String> {
    let (config, weights) = pirclip_model::resolve::resolve_model(model, checkpoint)?;
    let identity = pirclip_store::Identity {
        model: config.name.clone(),
        config: serde_json::json!({
            "model": model,
            "image_size": config.image_size,
            "embed_dim": config.embed_dim,
        }),
        checkpoint: std::fs::canonicalize(&weights)
            .unwrap_or(weights.clone())
            .display()
            .to_string(),
        checkpoint_sha256: sha256_file(&weights)
            .map_err(|e| format!("{}: {e}", weights.display()))?,
        dim: config.embed_dim,
        scene: SceneSettings::default(),
        image_roots: Vec::new(),
    };
    Ok((config, weights, identity))
}

/// When an index folder keeps an approximate index (inverted lists or a graph) beside its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnPolicy {
    /// From [`ANN_AUTO_ROWS`] rows on (exact search is fast enough below), or whenever the folder
    /// already has one.
    Auto,
    On,
    Off,
}

/// Rows from which [`AnnPolicy::Auto`] builds an approximate index.
pub const ANN_AUTO_ROWS: usize = 50_000;

/// What [`refresh_ann`] did.
pub enum AnnRefresh {
    Updated(pirclip_store::AnnReport),
    /// An approximate index that would no longer cover every row was removed (search ignores such
    /// an index, so keeping it would only cost disk).
    Removed,
    Unchanged,
}

/// Brings the approximate index of the index folder `root` (holding `rows` rows) up to date with its
/// rows as `policy` asks: built or extended with `config`, or removed. `progress(done, todo)`.
pub fn refresh_ann(
    root: &Path,
    rows: usize,
    policy: AnnPolicy,
    config: pirclip_store::AnnConfig,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<AnnRefresh, Error> {
    let has_ann = pirclip_store::has_ann(root);
    let wanted = match policy {
        AnnPolicy::On => true,
        AnnPolicy::Off => false,
        AnnPolicy::Auto => rows >= ANN_AUTO_ROWS || has_ann,
    };
    if wanted && rows > 0 {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(AnnRefresh::Updated(pirclip_store::update_ann(
            root, config, threads, progress,
        )?))
    } else if has_ann {
        pirclip_store::remove_ann(root)?;
        Ok(AnnRefresh::Removed)
    } else {
        Ok(AnnRefresh::Unchanged)
    }
}

/// Image files under `inputs` (folders walked recursively, hidden entries skipped), as absolute paths in
/// sorted order, duplicates removed, and the canonical folders they lie in (see [`Walk::roots`]).
/// Each folder is entered once by its canonical path, so symbolic links back up the tree (or between
/// two folders) cannot make the walk endless.
pub fn walk(inputs: &[PathBuf]) -> Result<Walk, Error> {
    let mut out = Vec::new();
    let mut roots = Vec::new();
    let mut pending: Vec<PathBuf> = Vec::new();
    let mut visited = std::collections::HashSet::new();
    for input in inputs {
        let abs = std::fs::canonicalize(input).map_err(|e| Error::Input {
            path: input.display().to_string(),
            message: e.to_string(),
        })?;
        if abs.is_dir() {
            roots.push(abs.clone());
            pending.push(abs);
        } else {
            roots.extend(abs.parent().map(Path::to_path_buf));
            out.push(abs);
        }
    }
    while let Some(dir) = pending.pop() {
        let Ok(canonical) = std::fs::canonicalize(&dir) else {
            continue;
        };
        if !visited.insert(canonical.clone()) {
            continue;
        }
        if !roots.iter().any(|r| canonical.starts_with(r)) {
            // A link to a folder elsewhere: its images are served from where they are.
            roots.push(canonical);
        }
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
                if p.is_symlink() {
                    if let Some(parent) = std::fs::canonicalize(&p)
                        .ok()
                        .and_then(|c| c.parent().map(Path::to_path_buf))
                    {
                        if !roots.iter().any(|r| parent.starts_with(r)) {
                            roots.push(parent);
                        }
                    }
                }
                out.push(p);
            }
        }
    }
    out.sort();
    out.dedup();
    // Component-wise order puts a folder right before everything inside it.
    roots.sort();
    let mut kept: Vec<PathBuf> = Vec::new();
    for r in roots {
        if !kept.last().is_some_and(|k| r.starts_with(k)) {
            kept.push(r);
        }
    }
    Ok(Walk {
        files: out,
        roots: kept,
    })
}

/// What [`walk`] found.
pub struct Walk {
    pub files: Vec<PathBuf>,
    /// Canonical folders every found file lies in (through symbolic links resolved), none inside
    /// another: what `pirclip serve` may serve files from.
    pub roots: Vec<PathBuf>,
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
    dir: &mut IndexDir,
    inputs: &[PathBuf],
    o: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildReport, Error> {
    let started = Instant::now();
    let Walk { files, roots } = walk(inputs)?;
    // The existing parts are checked whole first: an index that search would refuse is not added to.
    let indexed = dir.indexed_keys()?;
    dir.add_image_roots(&roots)?;
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
    let dim = dir.identity.dim;
    let scene_options = SceneOptions {
        bands: o.scene.bands,
    };
    let workers = o.workers.max(1);
    progress.start("images", todo.len() as u64);
    for part in todo.chunks(o.part_size.max(1)) {
        let (mut entries, mut values) = (Vec::new(), Vec::new());
        let mut pending = Pending::default();
        // Decoding runs ahead of the model on its own threads, a bounded step ahead: whole images a
        // model batch at a time, scenes a row of tiles at a time (never a whole scene's tiles).
        std::thread::scope(|s| -> Result<(), Error> {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (scene_options, scene) = (&scene_options, &o.scene);
            s.spawn(move || {
                let send = |d: Decoded| tx.send(d).is_ok();
                for batch in part.chunks(o.batch_size.max(1)) {
                    if scene.tile.is_some() {
                        for (p, e) in batch {
                            if !send(Decoded::Start) {
                                return;
                            }
                            let done =
                                tiles_of(p, e, scene_options, scene, size, workers, &|rows| {
                                    send(Decoded::Rows(rows))
                                });
                            let end = match done {
                                Ok(()) => Decoded::Files(1),
                                Err(err) => Decoded::Failed(err.to_string()),
                            };
                            if !send(end) {
                                return;
                            }
                        }
                        continue;
                    }
                    let decoded = pirclip_data::parallel_map(batch, workers, |(p, e)| {
                        whole_image(p, e, scene_options, size)
                    });
                    for row in decoded {
                        let sent = send(Decoded::Start)
                            && match row {
                                Ok(row) => {
                                    send(Decoded::Rows(vec![row])) && send(Decoded::Files(1))
                                }
                                Err(err) => send(Decoded::Failed(err.to_string())),
                            };
                        if !sent {
                            return;
                        }
                    }
                }
            });
            // Where the current file's rows begin (in `entries` then `pending`): a file that fails
            // halfway leaves none of its rows behind.
            let mut file_start = 0;
            for decoded in rx {
                match decoded {
                    Decoded::Start => file_start = entries.len() + pending.entries.len(),
                    Decoded::Rows(rows) => {
                        for (entry, pixels) in rows {
                            pending.entries.push(entry);
                            pending.pixels.extend(pixels);
                            if pending.entries.len() >= o.batch_size.max(1) {
                                pending.encode(model, opts, size, &mut entries, &mut values);
                            }
                        }
                    }
                    Decoded::Failed(err) => {
                        if file_start >= entries.len() {
                            pending.truncate(file_start - entries.len(), size);
                        } else {
                            pending.truncate(0, size);
                            entries.truncate(file_start);
                            values.truncate(file_start * dim);
                        }
                        report.unreadable.push(err);
                        progress.advance(1);
                    }
                    Decoded::Files(n) => progress.advance(n as u64),
                }
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

/// What the decoding thread hands the model, in order: each file's `Start`, its rows (one message for
/// a whole image, a row of tiles per message for a scene), then `Files` or `Failed`.
enum Decoded {
    Start,
    Rows(Vec<(Entry, Vec<f32>)>),
    /// The file failed: its rows since `Start` are dropped, the reason listed.
    Failed(String),
    Files(usize),
}

/// Model inputs waiting for a full batch.
#[derive(Default)]
struct Pending {
    entries: Vec<Entry>,
    pixels: Vec<f32>,
}

impl Pending {
    /// Keeps the first `n` rows.
    fn truncate(&mut self, n: usize, size: usize) {
        self.entries.truncate(n);
        self.pixels.truncate(n * 3 * size * size);
    }

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

/// The row of a whole image, preprocessed for the model, with its map position when it has one.
fn whole_image(
    path: &Path,
    entry: &Entry,
    options: &SceneOptions,
    size: usize,
) -> Result<(Entry, Vec<f32>), pirclip_image::Error> {
    let decoded = pirclip_image::decode_scene_file(path, options)?;
    let (w, h) = (decoded.image.width, decoded.image.height);
    let mut e = entry.clone();
    e.geo = decoded.geo.as_ref().map(|g| {
        let (x, y) = g.transform.apply(w as f64 / 2.0, h as f64 / 2.0);
        GeoPoint {
            x,
            y,
            crs: g.crs.clone(),
        }
    });
    Ok((e, pirclip_image::preprocess_eval(&decoded.image, size)))
}

/// The tiles of a scene, with their windows and map positions, preprocessed for the model and handed
/// to `emit` a row of tiles at a time (`emit` returns false to stop). The scene is read through the
/// bounded reader: a row of tiles reads the strips or tiles of the file it covers, nothing more.
fn tiles_of(
    path: &Path,
    entry: &Entry,
    options: &SceneOptions,
    scene: &SceneSettings,
    size: usize,
    workers: usize,
    emit: &dyn Fn(Vec<(Entry, Vec<f32>)>) -> bool,
) -> Result<(), pirclip_image::Error> {
    let tile = scene.tile.unwrap_or(size);
    let mut source = pirclip_image::open_scene(path, options)?;
    let (w, h) = (source.width(), source.height());
    let windows = pirclip_image::scene::tile_windows(w, h, tile, scene.tile_stride.unwrap_or(tile));
    let mut rest = &windows[..];
    while let Some(first) = rest.first() {
        let in_row = rest.iter().take_while(|win| win.y == first.y).count();
        let (row, next) = rest.split_at(in_row);
        rest = next;
        let band = source.read_window(Window {
            x: 0,
            y: first.y,
            width: w,
            height: first.height,
        })?;
        let geo = source.geo().cloned();
        let rows = pirclip_data::parallel_map(row, workers, |win| {
            let mut e = entry.clone();
            e.tile = Some(Tile {
                x: win.x as i64,
                y: win.y as i64,
                width: win.width as i64,
                height: win.height as i64,
            });
            e.geo = geo.as_ref().map(|g| {
                let (cx, cy) = win.center();
                let (x, y) = g.transform.apply(cx, cy);
                GeoPoint {
                    x,
                    y,
                    crs: g.crs.clone(),
                }
            });
            let pixels = pirclip_image::scene::crop(&band, Window { y: 0, ..*win });
            (e, pirclip_image::preprocess_eval(&pixels, size))
        });
        if !emit(rows) {
            break;
        }
    }
    Ok(())
}
