//! An index folder loaded for search (exact, or through its approximate index when that covers every
//! row), and building or extending its approximate index.

use std::path::{Path, PathBuf};

use crate::{
    invalid, ivf, AnnOptions, AnnStore, Entry, Error, FlatStore, IndexDir, IvfOptions, IvfStore,
    SearchError, VectorStore,
};

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
