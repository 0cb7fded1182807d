//! Approximate search by a graph: an HNSW index from `usearch`, stored beside the parts as
//! `image.usearch` and memory-mapped when searched. The inverted lists of [`crate::ivf`] are the default
//! (`--ann-kind ivf`); the graph stays as `--ann-kind hnsw` (on real text queries both reached recall
//! 0.997 at their defaults, `bench/ann_real.sh`).
//!
//! Why usearch among graph crates (measured with `bench/ann.sh` and a throwaway hnsw_rs harness on the
//! same 1 M clustered 256-d unit vectors, 2 cores, M 32 / efConstruction 80 / efSearch 128; numbers in
//! the README): usearch built in 122 s (hnsw_rs 0.3.5: 554 s), reached recall@10 0.975-0.980 (hnsw_rs
//! 0.970) at a single-query p50 of 0.46 ms (hnsw_rs 1.44 ms), and stores vectors as float16 or int8
//! inside a graph file that it can search memory-mapped. faiss's HNSW answered at 0.35 ms with recall
//! 0.990; a faster distance kernel does not close that gap (a Rust AVX-512 float16 kernel swapped in
//! through `change_metric` gave the same 0.25-0.26 ms on 200 k vectors): it is the graph walk.
//!
//! usearch reads the graph file without checking it, and a damaged one crashes it (8 of 60 files with
//! 1-3 random bytes changed ended the process with SIGSEGV). So the sidecar records the file's CRC-32,
//! and a graph whose bytes do not match, or that has no checksum, is refused before usearch sees it;
//! `pirclip index add` then rebuilds it from the parts. This catches damage, not a graph crafted with a
//! matching sidecar, so the graph is also checked whole before usearch sees it ([`check_graph`]):
//! usearch's file layout (64-byte head, proximity-graph header, node levels, node tapes) is walked,
//! and every neighbour slot, node level, key and the entry point must lie within the graph. A checksum
//! proves integrity; this proves the graph cannot send usearch outside its own memory. The sidecar's
//! options are held to the CLI's ranges (an efSearch of 10^12 is refused, not searched).
//!
//! Rows are the keys (row `i` of the index is key `i`), so the graph needs no id map; the sidecar
//! `image.usearch.json` records how many rows the graph holds, and a graph that holds fewer rows than
//! the index is extended (`pirclip index add`) or ignored in favour of exact search, never trusted stale.

use std::path::{Path, PathBuf};

use crate::{invalid, Error, SearchError, VectorStore};

/// How vectors are stored inside the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    F32,
    F16,
    I8,
}

impl Quantization {
    fn scalar(self) -> usearch::ScalarKind {
        match self {
            Quantization::F32 => usearch::ScalarKind::F32,
            Quantization::F16 => usearch::ScalarKind::F16,
            Quantization::I8 => usearch::ScalarKind::I8,
        }
    }
}

/// Graph parameters, named as in faiss (M, efConstruction, efSearch) where they mean the same.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnnOptions {
    /// M: neighbours per node.
    pub connectivity: usize,
    /// efConstruction.
    pub expansion_add: usize,
    /// efSearch (changeable at search time).
    pub expansion_search: usize,
    pub quantization: Quantization,
}

impl Default for AnnOptions {
    fn default() -> Self {
        AnnOptions {
            connectivity: 32,
            expansion_add: 80,
            expansion_search: 128,
            quantization: Quantization::F16,
        }
    }
}

/// The CLI's ranges for the graph's options (`--ann-m`, `--ann-ef-construction`, `--ann-ef-search`).
const CONNECTIVITY: std::ops::RangeInclusive<usize> = 2..=512;
const EXPANSION: std::ops::RangeInclusive<usize> = 1..=4096;

impl AnnOptions {
    fn validate(&self) -> Result<(), String> {
        if !CONNECTIVITY.contains(&self.connectivity)
            || !EXPANSION.contains(&self.expansion_add)
            || !EXPANSION.contains(&self.expansion_search)
        {
            return Err(format!(
                "options M {}, efConstruction {}, efSearch {} are outside M {CONNECTIVITY:?}, ef {EXPANSION:?}",
                self.connectivity, self.expansion_add, self.expansion_search
            ));
        }
        Ok(())
    }
}

/// What the sidecar file records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sidecar {
    rows: usize,
    dim: usize,
    options: AnnOptions,
    /// CRC-32 of the graph file; absent in sidecars from before it was recorded.
    #[serde(default)]
    crc32: Option<u32>,
}

/// CRC-32 of a file's bytes, read in blocks.
fn file_crc32(path: &Path) -> std::io::Result<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut block)? {
            0 => return Ok(hasher.finalize()),
            n => hasher.update(&block[..n]),
        }
    }
}

pub struct AnnStore {
    index: usearch::Index,
    dim: usize,
    rows: usize,
    options: AnnOptions,
}

fn ann_error(path: &Path, e: impl std::fmt::Display) -> Error {
    invalid(path, format!("usearch: {e}"))
}

fn new_index(dim: usize, o: &AnnOptions) -> Result<usearch::Index, String> {
    usearch::Index::new(&usearch::IndexOptions {
        dimensions: dim,
        metric: usearch::MetricKind::IP,
        quantization: o.quantization.scalar(),
        connectivity: o.connectivity,
        expansion_add: o.expansion_add,
        expansion_search: o.expansion_search,
        multi: false,
    })
    .map_err(|e| e.to_string())
}

impl AnnStore {
    /// The graph of `vectors` (`[n, dim]`, unit rows) built on `threads` threads; `progress(rows done)`
    /// is called now and then.
    pub fn build(
        dim: usize,
        vectors: &[f32],
        options: AnnOptions,
        threads: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Self, String> {
        let mut store = AnnStore {
            index: new_index(dim, &options)?,
            dim,
            rows: 0,
            options,
        };
        store.extend(vectors, threads, progress)?;
        Ok(store)
    }

    /// Adds `vectors` as the rows after those the graph holds.
    pub fn extend(
        &mut self,
        vectors: &[f32],
        threads: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<(), String> {
        let dim = self.dim;
        if dim == 0 || vectors.len() % dim != 0 {
            return Err(format!("{} values are not rows of {dim}", vectors.len()));
        }
        let n = vectors.len() / dim;
        let threads = threads.clamp(1, 64);
        self.index
            .reserve_capacity_and_threads(self.rows + n, threads)
            .map_err(|e| e.to_string())?;
        let first = self.rows;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::Mutex::new(None);
        const CHUNK: usize = 1024;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let start = next.fetch_add(CHUNK, std::sync::atomic::Ordering::Relaxed);
                    if start >= n || failed.lock().unwrap().is_some() {
                        return;
                    }
                    for i in start..(start + CHUNK).min(n) {
                        let row = &vectors[i * dim..(i + 1) * dim];
                        if let Err(e) = self.index.add((first + i) as u64, row) {
                            *failed.lock().unwrap() = Some(e.to_string());
                            return;
                        }
                    }
                    progress((start + CHUNK).min(n));
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e);
        }
        self.rows += n;
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn options(&self) -> AnnOptions {
        self.options
    }

    /// efSearch: more is slower and finds more of the true neighbours.
    /// For logs and /health: "HNSW M 32, efSearch 128, F16".
    pub fn describe(&self) -> String {
        let o = &self.options;
        format!(
            "HNSW M {}, efSearch {}, {:?}",
            o.connectivity, o.expansion_search, o.quantization
        )
    }

    pub fn set_expansion_search(&mut self, n: usize) {
        self.index.change_expansion_search(n.max(1));
        self.options.expansion_search = n.max(1);
    }

    /// Bytes of the graph file.
    pub fn serialized_len(&self) -> usize {
        self.index.serialized_length()
    }

    pub fn graph_path(root: &Path) -> PathBuf {
        root.join("image.usearch")
    }

    pub(crate) fn sidecar_path(root: &Path) -> PathBuf {
        root.join("image.usearch.json")
    }

    /// Writes the graph and its sidecar into the index folder `root`, each atomically (graph first: a
    /// sidecar never describes a graph that is not there).
    pub fn save(&self, root: &Path) -> Result<(), Error> {
        let graph = Self::graph_path(root);
        let tmp = root.join(".image.usearch.tmp");
        let tmp_str = tmp
            .to_str()
            .ok_or_else(|| invalid(&tmp, "path is not UTF-8"))?;
        self.index.save(tmp_str).map_err(|e| ann_error(&graph, e))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        let crc32 = file_crc32(&tmp)?;
        std::fs::rename(&tmp, &graph)?;
        let sidecar = Sidecar {
            rows: self.rows,
            dim: self.dim,
            options: self.options,
            crc32: Some(crc32),
        };
        pirclip_checkpoint::write_atomic(
            &Self::sidecar_path(root),
            serde_json::to_string_pretty(&sidecar).unwrap().as_bytes(),
        )?;
        Ok(())
    }

    /// The graph of the index folder `root`, if there is one: memory-mapped (`view`) for searching, or
    /// loaded into memory (`!view`) to be extended.
    pub fn open(root: &Path, view: bool) -> Result<Option<Self>, Error> {
        let (graph, side) = (Self::graph_path(root), Self::sidecar_path(root));
        if !graph.is_file() || !side.is_file() {
            return Ok(None);
        }
        if std::fs::metadata(&side)?.len() > 1 << 16 {
            return Err(invalid(&side, "larger than a sidecar pirclip writes"));
        }
        let sidecar: Sidecar = serde_json::from_str(&std::fs::read_to_string(&side)?)
            .map_err(|e| invalid(&side, e.to_string()))?;
        sidecar.options.validate().map_err(|e| invalid(&side, e))?;
        if sidecar.dim == 0
            || sidecar.dim > crate::limits::MAX_DIM
            || sidecar.rows >= u32::MAX as usize
        {
            return Err(invalid(
                &side,
                format!("{} rows of dimension {}", sidecar.rows, sidecar.dim),
            ));
        }
        let path = graph
            .to_str()
            .ok_or_else(|| invalid(&graph, "path is not UTF-8"))?;
        let rebuild =
            "rebuild it with `pirclip index add --index INDEX --images …` (any images: the \
                       graph is rebuilt from the index's embeddings)";
        match sidecar.crc32 {
            None => {
                return Err(invalid(
                    &graph,
                    format!("{} records no checksum; {rebuild}", side.display()),
                ))
            }
            Some(want) => {
                let got = file_crc32(&graph)?;
                if got != want {
                    return Err(invalid(
                        &graph,
                        format!(
                            "damaged: CRC-32 {got:08x}, but {} says {want:08x}; {rebuild}",
                            side.display()
                        ),
                    ));
                }
            }
        }
        check_graph(&graph, &sidecar).map_err(|e| invalid(&graph, format!("{e}; {rebuild}")))?;
        let meta = usearch::Index::metadata(path).map_err(|e| ann_error(&graph, e))?;
        if meta.dimensions as usize != sidecar.dim || meta.count_present as usize != sidecar.rows {
            return Err(invalid(
                &graph,
                format!(
                    "holds {} vectors of dimension {}, but {} says {} of {}",
                    meta.count_present,
                    meta.dimensions,
                    side.display(),
                    sidecar.rows,
                    sidecar.dim
                ),
            ));
        }
        let index = new_index(sidecar.dim, &sidecar.options).map_err(|e| ann_error(&graph, e))?;
        if view {
            index.view(path).map_err(|e| ann_error(&graph, e))?;
        } else {
            index.load(path).map_err(|e| ann_error(&graph, e))?;
        }
        index.change_expansion_search(sidecar.options.expansion_search);
        Ok(Some(AnnStore {
            index,
            dim: sidecar.dim,
            rows: sidecar.rows,
            options: sidecar.options,
        }))
    }
}

/// Walks a usearch `index_dense` file (usearch 2.x, 32-bit slots, vectors inside) as
/// `index_dense_gt::save_to_stream` and `index_gt::save_to_stream` lay it out, and checks that it is a
/// graph of exactly `sidecar.rows` nodes of `sidecar.dim` dimensions whose every reference stays inside
/// it. The layout, little-endian:
///
/// ```text
/// u32 rows, u32 bytes_per_vector; rows × bytes_per_vector    the vectors
/// 64-byte head: "usearch", u16 ×3 version, u8 metric, scalar, key kind, slot kind,
///               u64 present, deleted, dimensions, u8 multi
/// u64 size, connectivity, connectivity_base, max_level, entry_slot
/// i16 level × size
/// per node: u64 key, i16 level, then for level 0 and each level above it: u32 count and
///           connectivity_base (level 0) or connectivity slots of u32
/// ```
pub(crate) fn check_graph(path: &Path, sidecar: &Sidecar) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: read-only map of a file that is only ever replaced by rename.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    check_graph_bytes(&map, sidecar)
}

fn check_graph_bytes(b: &[u8], sidecar: &Sidecar) -> Result<(), String> {
    let short = || "shorter than its own layout".to_string();
    let u64_at = |at: usize| -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            b.get(at..at + 8).ok_or_else(short)?.try_into().unwrap(),
        ))
    };
    let u32_at = |at: usize| -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            b.get(at..at + 4).ok_or_else(short)?.try_into().unwrap(),
        ))
    };
    let i16_at = |at: usize| -> Result<i16, String> {
        Ok(i16::from_le_bytes(
            b.get(at..at + 2).ok_or_else(short)?.try_into().unwrap(),
        ))
    };
    let (rows, dim) = (sidecar.rows, sidecar.dim);
    let scalar_bytes = match sidecar.options.quantization {
        Quantization::F32 => 4,
        Quantization::F16 => 2,
        Quantization::I8 => 1,
    };
    let (matrix_rows, matrix_cols) = (u32_at(0)? as usize, u32_at(4)? as usize);
    if matrix_rows != rows || matrix_cols != dim * scalar_bytes {
        return Err(format!(
            "holds {matrix_rows} vectors of {matrix_cols} bytes, not {rows} of {}",
            dim * scalar_bytes
        ));
    }
    let head = 8 + rows * matrix_cols;
    let h = b.get(head..head + 64).ok_or_else(short)?;
    let (major, slot_kind, key_kind) = (u16::from_le_bytes([h[7], h[8]]), h[16], h[15]);
    // usearch's scalar kinds: 14 = u64 (keys), 15 = u32 (slots).
    if &h[..7] != b"usearch" || major != 2 || key_kind != 14 || slot_kind != 15 {
        return Err("not a usearch 2 graph with 64-bit keys and 32-bit slots".into());
    }
    // usearch's metric kind 'i' (inner product) and scalar kinds 11 = f32, 12 = f16, 23 = i8: another
    // metric or scalar picks other kernels and casts (a fuzzed graph whose checksum was recomputed
    // crashed usearch through them), deleted slots and multi-key graphs are not pirclip's.
    let scalar = match sidecar.options.quantization {
        Quantization::F32 => 11,
        Quantization::F16 => 12,
        Quantization::I8 => 23,
    };
    let deleted = u64::from_le_bytes(h[25..33].try_into().unwrap());
    if h[13] != b'i' || h[14] != scalar || deleted != 0 || h[41] != 0 {
        return Err(format!(
            "metric {}, scalar kind {}, {deleted} deleted, multi {}: not the inner-product {:?} graph its sidecar describes",
            h[13], h[14], h[41], sidecar.options.quantization
        ));
    }
    let present = u64::from_le_bytes(h[17..25].try_into().unwrap());
    let dims = u64::from_le_bytes(h[33..41].try_into().unwrap());
    if present != rows as u64 || dims != dim as u64 {
        return Err(format!(
            "its head says {present} vectors of dimension {dims}, not {rows} of {dim}"
        ));
    }
    let g = head + 64;
    let (size, m, m0, max_level, entry) = (
        u64_at(g)?,
        u64_at(g + 8)?,
        u64_at(g + 16)?,
        u64_at(g + 24)?,
        u64_at(g + 32)?,
    );
    if size != rows as u64 {
        return Err(format!("a graph of {size} nodes for {rows} vectors"));
    }
    if rows == 0 {
        return Ok(());
    }
    let (m, m0) = (m as usize, m0 as usize);
    if !CONNECTIVITY.contains(&m) || m0 < m || m0 > 2 * *CONNECTIVITY.end() {
        return Err(format!("connectivity {m} / {m0} out of range"));
    }
    if max_level > i16::MAX as u64 || entry >= size {
        return Err(format!(
            "max level {max_level}, entry node {entry} out of range"
        ));
    }
    let levels_at = g + 40;
    let mut node = levels_at + 2 * rows;
    let node_bytes = |level: usize| 10 + (4 + 4 * m0) + level * (4 + 4 * m);
    let mut seen = vec![false; rows];
    for i in 0..rows {
        let level = i16_at(levels_at + 2 * i)?;
        if level < 0 || level as u64 > max_level {
            return Err(format!(
                "node {i} has level {level}, the graph's top is {max_level}"
            ));
        }
        let level = level as usize;
        if i as u64 == entry && level as u64 != max_level {
            return Err(format!("the entry node {i} is not on the top level"));
        }
        let end = node.checked_add(node_bytes(level)).ok_or_else(short)?;
        if end > b.len() {
            return Err(short());
        }
        let key = u64_at(node)?;
        match seen.get_mut(key as usize) {
            Some(s) if key < rows as u64 && !*s => *s = true,
            _ => return Err(format!("node {i} has key {key}: out of range or repeated")),
        }
        if i16_at(node + 8)? as usize != level {
            return Err(format!("node {i}'s level differs from the level table"));
        }
        let mut at = node + 10;
        for l in 0..=level {
            let capacity = if l == 0 { m0 } else { m };
            let count = u32_at(at)? as usize;
            if count > capacity {
                return Err(format!(
                    "node {i} has {count} neighbours on level {l}, room for {capacity}"
                ));
            }
            for j in 0..count {
                let slot = u32_at(at + 4 + 4 * j)?;
                if slot as usize >= rows {
                    return Err(format!("node {i} links to node {slot} of {rows}"));
                }
            }
            at += 4 + 4 * capacity;
        }
        node = end;
    }
    if node != b.len() {
        return Err(format!("{} bytes after the last node", b.len() - node));
    }
    Ok(())
}

impl VectorStore for AnnStore {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.rows
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError> {
        crate::check_query(query, self.dim)?;
        if k == 0 || self.rows == 0 {
            return Ok(Vec::new());
        }
        let m = self
            .index
            .search(query, k.min(self.rows))
            .map_err(|e| SearchError::Engine(e.to_string()))?;
        let mut out = Vec::with_capacity(m.keys.len());
        // usearch's inner-product distance is 1 - dot.
        for (&key, &d) in m.keys.iter().zip(&m.distances) {
            if key >= self.rows as u64 {
                return Err(SearchError::Engine(format!(
                    "the graph answered key {key}, beyond its {} rows",
                    self.rows
                )));
            }
            let score = 1.0 - d;
            if score.is_finite() {
                out.push((key as usize, score));
            }
        }
        Ok(out)
    }

    fn vector(&self, row: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.dim];
        match self.index.get(row as u64, &mut out) {
            Ok(n) if n > 0 => out,
            _ => vec![0f32; self.dim],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlatStore;

    /// Unit vectors around a few centres: the shape of real embedding sets.
    fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) as f32
        };
        let centres: Vec<f32> = (0..8 * dim).map(|_| uniform() - 0.5).collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = &centres[(i % 8) * dim..(i % 8 + 1) * dim];
            let row: Vec<f32> = c.iter().map(|v| v + 0.3 * (uniform() - 0.5)).collect();
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            out.extend(row.iter().map(|v| v / norm));
        }
        out
    }

    #[test]
    fn graph_finds_the_exact_neighbours_saves_views_and_extends() {
        let (dim, n) = (32, 3000);
        let vectors = clustered(n, dim, 7);
        let flat = FlatStore::new(dim, vectors.clone()).unwrap();
        let half = n / 2 * dim;
        let mut ann =
            AnnStore::build(dim, &vectors[..half], AnnOptions::default(), 1, &|_| {}).unwrap();
        // One thread: insertion order, and so the graph and its recall, are the same on every run
        // (with two, the graph depends on thread timing and recall varied from 0.92 to 0.99).
        ann.extend(&vectors[half..], 1, &|_| {}).unwrap();
        assert_eq!(ann.len(), n);
        let root = std::env::temp_dir().join(format!("pirclip-ann-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        ann.save(&root).unwrap();
        let viewed = AnnStore::open(&root, true).unwrap().expect("a saved graph");
        assert_eq!(viewed.len(), n);
        let queries = clustered(50, dim, 99);
        // Recall by score: float16 storage reorders near-ties, so a hit counts when it is as close as the
        // exact 10th neighbour (to float16 rounding).
        let mut found = 0;
        for q in queries.chunks(dim) {
            let truth = flat.search(q, 10).unwrap();
            let tenth = truth[9].1;
            let got = viewed.search(q, 10).unwrap();
            assert_eq!(got.len(), 10);
            assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
            for (row, score) in &got {
                let exact: f32 = flat.row(*row).iter().zip(q).map(|(a, b)| a * b).sum();
                assert!((exact - score).abs() < 2e-3, "float16 scores");
                found += (exact >= tenth - 1e-3) as usize;
            }
        }
        let recall = found as f64 / 500.0;
        // 0.984 here, the same on every run; the margin is for other CPUs' distance kernels.
        assert!(recall >= 0.95, "recall@10 {recall}");
        let back = viewed.vector(5);
        assert!(back
            .iter()
            .zip(flat.row(5))
            .all(|(a, b)| (a - b).abs() < 1e-3));
        // A sidecar that disagrees with the graph is refused, not trusted.
        let side = root.join("image.usearch.json");
        let mut sidecar: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&side).unwrap()).unwrap();
        let refusal = |sidecar: &serde_json::Value| {
            std::fs::write(&side, sidecar.to_string()).unwrap();
            AnnStore::open(&root, true).err().unwrap().to_string()
        };
        let crc = sidecar["crc32"].clone();
        sidecar["rows"] = (n + 1).into();
        assert!(refusal(&sidecar).contains("holds"));
        sidecar["rows"] = n.into();
        sidecar.as_object_mut().unwrap().remove("crc32");
        assert!(refusal(&sidecar).contains("records no checksum"));
        // A damaged graph is refused before usearch reads it.
        sidecar["crc32"] = crc;
        let graph = AnnStore::graph_path(&root);
        let mut bytes = std::fs::read(&graph).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&graph, bytes).unwrap();
        let e = refusal(&sidecar);
        assert!(
            e.contains("damaged: CRC-32") && e.contains("pirclip index add"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
