//! Approximate search by inverted lists (IVF-Flat): the rows are clustered around `lists` unit
//! centroids by spherical k-means, and a query scores only the rows of its `probes` nearest lists,
//! stored as float16. One file, `INDEX/image.ivf`, memory-mapped when searched.
//!
//! Why this and not a crate's graph: on issue #13's benchmark (`bench/ann.sh`: 1 M clustered unit
//! vectors, 2 cores, faiss's HNSW in the same run) usearch's HNSW, the best graph crate measured, stayed
//! below recall@10 0.98 and above faiss's p50, and hnsw_rs was slower still. These lists, at 2 probes,
//! reached 0.998 / 0.997 (256-d / 512-d) at a p50 of 0.14 / 0.36 ms against faiss's 0.990 / 0.987 at
//! 0.53 / 0.61 ms, built in 9.8 / 19.1 s against 136 / 211 s, in 0.4× the file. No kept Rust crate
//! offers an inverted-file index, so the bookkeeping is ours; the arithmetic is not: every product is
//! numkong's float16 kernel (the SIMD kernels usearch itself uses, chosen at run time for the CPU), one
//! vector at a time when searching and blocked when assigning rows to lists. On real embeddings queried
//! by text (`bench/ann_real.sh`) both kinds reach 0.997 at their defaults, so the graph stays as
//! `--ann-kind hnsw`.
//!
//! Layout, little-endian, each section starting on a 64-byte boundary so that it can be read in place
//! from the mapped file:
//!
//! ```text
//! header     64 bytes: b"PIRIVF01", dim u32, lists u32, rows u64, trained_rows u64, probes u32
//! centroids  [lists, dim] f16
//! offsets    [lists + 1] u64     list c holds positions offsets[c] .. offsets[c + 1]
//! ids        [rows] u32          the index row at each position
//! vectors    [rows, dim] f16     in position order
//! ```
//!
//! A file is checked whole when opened (sizes, offsets, ids a permutation of the rows), so a damaged or
//! hostile file is refused with a message, never searched.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{invalid, Error, SearchError, VectorStore};

const MAGIC: &[u8; 8] = b"PIRIVF01";
const HEADER_BYTES: usize = 64;
/// k-means rounds over the training sample, and sample rows per list (faiss trains on at most 256 per
/// list; 64 suffice for centroids that only route queries).
const KMEANS_ROUNDS: usize = 10;
const SAMPLE_PER_LIST: usize = 64;
/// `index add` assigns new rows to the trained centroids until the index has grown this many times
/// past the rows they were trained on; then the lists are trained again.
pub const RETRAIN_GROWTH: usize = 4;
/// Probes of new lists unless told otherwise.
pub const DEFAULT_PROBES: usize = 16;

/// Inverted-list parameters, named as in faiss (nlist, nprobe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IvfOptions {
    /// nlist; 0 picks √rows.
    pub lists: usize,
    /// nprobe: lists scored per query (changeable without rebuilding). For `update_ann`, 0 keeps the
    /// probes an index has ([`DEFAULT_PROBES`] for a new one).
    pub probes: usize,
}

impl Default for IvfOptions {
    fn default() -> Self {
        IvfOptions {
            lists: 0,
            probes: DEFAULT_PROBES,
        }
    }
}

/// √rows, the usual list count: lists and list lengths grow alike.
pub fn auto_lists(rows: usize) -> usize {
    ((rows as f64).sqrt().round() as usize)
        .clamp(1, 1 << 16)
        .min(rows)
}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// Where each section lies; `None` when the sizes overflow.
#[derive(Debug, Clone, Copy)]
struct Layout {
    dim: usize,
    lists: usize,
    rows: usize,
    centroids_at: usize,
    offsets_at: usize,
    ids_at: usize,
    vectors_at: usize,
    len: usize,
}

impl Layout {
    fn new(dim: usize, lists: usize, rows: usize) -> Option<Layout> {
        let centroids_at = HEADER_BYTES;
        let offsets_at =
            align64(centroids_at.checked_add(lists.checked_mul(dim)?.checked_mul(2)?)?);
        let ids_at = align64(offsets_at.checked_add(lists.checked_add(1)?.checked_mul(8)?)?);
        let vectors_at = align64(ids_at.checked_add(rows.checked_mul(4)?)?);
        let len = vectors_at.checked_add(rows.checked_mul(dim)?.checked_mul(2)?)?;
        Some(Layout {
            dim,
            lists,
            rows,
            centroids_at,
            offsets_at,
            ids_at,
            vectors_at,
            len,
        })
    }
}

/// The file's bytes: built in memory (8-byte aligned through `u64`s) or mapped from disk (page
/// aligned). Either way every section is aligned for its element type.
enum Bytes {
    Owned(Vec<u64>, usize),
    Mapped(memmap2::Mmap),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(words, len) => &bytemuck::cast_slice(words)[..*len],
            Bytes::Mapped(m) => m,
        }
    }
}

pub struct IvfStore {
    bytes: Bytes,
    layout: Layout,
    trained_rows: usize,
    probes: usize,
    /// Row → position, built on the first `vector` call.
    positions: OnceLock<Vec<u32>>,
}

fn to_f16(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

fn as_nk(bits: &[u16]) -> &[numkong::f16] {
    // SAFETY: numkong::f16 is `#[repr(transparent)]` over u16, so the slices have the same layout.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
}

/// Float16 inner product, accumulated in f32 by numkong's kernel for this CPU. For one query against a
/// list this is faster than a blocked product of width 1 (measured: 2.0 against 2.9 ms for 16 lists of
/// 1,000 512-d rows).
fn dot(a: &[u16], b: &[u16]) -> f32 {
    use numkong::Dot;
    numkong::f16::dot(as_nk(a), as_nk(b)).unwrap_or(f32::NAN)
}

/// Rows of float16 values packed once for numkong's blocked products: `dots` then scores many rows
/// against all packed rows in one call, with the kernels numkong picks for this CPU (AVX-512 FP16 or
/// AMX where there are).
struct Packed {
    bytes: Vec<u8>,
    /// Where the 64-byte aligned buffer starts in `bytes`.
    start: usize,
    width: usize,
    dim: usize,
}

impl Packed {
    fn new(rows: &[u16], dim: usize) -> Packed {
        use numkong::Dots;
        let width = rows.len() / dim;
        let size = numkong::f16::dots_packed_size(width, dim);
        let bytes = vec![0u8; size + 64];
        let start = bytes.as_ptr().align_offset(64);
        let mut p = Packed {
            bytes,
            start,
            width,
            dim,
        };
        // SAFETY: `rows` holds width × dim values, rows dim × 2 bytes apart, and the buffer from
        // `start` has the size numkong asked for. numkong::f16 is `#[repr(transparent)]` over u16.
        unsafe {
            numkong::f16::dots_pack(
                rows.as_ptr().cast(),
                width,
                dim,
                dim * 2,
                p.bytes.as_mut_ptr().add(p.start),
            )
        };
        p
    }

    /// `out[i * width + j]` = row i of `a` · packed row j.
    fn dots(&self, a: &[u16], out: &mut [f32]) {
        use numkong::Dots;
        let height = a.len() / self.dim;
        assert!(
            out.len() >= height * self.width,
            "output of {height} x {}",
            self.width
        );
        if height == 0 || self.width == 0 {
            return;
        }
        // SAFETY: `a` holds height × dim values, rows dim × 2 bytes apart; `out` holds height × width
        // f32, rows width × 4 bytes apart; the packed buffer was filled by `dots_pack` for this dim.
        unsafe {
            numkong::f16::dots_packed(
                a.as_ptr().cast(),
                self.bytes.as_ptr().add(self.start),
                out.as_mut_ptr(),
                height,
                self.width,
                self.dim,
                self.dim * 2,
                self.width * 4,
            )
        };
    }
}

/// The index of the largest value (ties: the lower index).
fn argmax(scores: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (c, &s) in scores.iter().enumerate() {
        if s > best.0 {
            best = (s, c as u32);
        }
    }
    best.1
}

/// The nearest centroid of every row of `rows`, on `threads` threads; `progress(rows done)` now and
/// then.
fn assign(
    rows: &[u16],
    centroids: &[u16],
    dim: usize,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<u32> {
    let n = rows.len() / dim;
    let mut out = vec![0u32; n];
    let lists = centroids.len() / dim;
    if lists == 0 {
        return out;
    }
    let packed = Packed::new(centroids, dim);
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Rows scored per call: their scores against every centroid stay in cache.
    const BLOCK: usize = 256;
    std::thread::scope(|s| {
        let per = n.div_ceil(threads.max(1)).max(1);
        for (t, slot) in out.chunks_mut(per).enumerate() {
            let (done, packed, start) = (&done, &packed, t * per);
            s.spawn(move || {
                let mut scores = vec![0f32; BLOCK * lists];
                for (b, chunk) in slot.chunks_mut(BLOCK).enumerate() {
                    let first = start + b * BLOCK;
                    packed.dots(&rows[first * dim..(first + chunk.len()) * dim], &mut scores);
                    for (a, row_scores) in chunk.iter_mut().zip(scores.chunks_exact(lists)) {
                        *a = argmax(row_scores);
                    }
                    let d = done.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                    if (d / BLOCK) % 16 == 0 {
                        progress(d + chunk.len());
                    }
                }
            });
        }
    });
    progress(n);
    out
}

/// How many rows of `dim` `values` make, checked to fit beside `existing` rows (ids are u32).
fn rows_to_add(dim: usize, values: usize, existing: usize) -> Result<usize, String> {
    if dim == 0 || values % dim != 0 {
        return Err(format!("{values} values are not rows of {dim}"));
    }
    let n = values / dim;
    if existing + n >= u32::MAX as usize {
        return Err(format!(
            "{} rows: at most {} fit",
            existing + n,
            u32::MAX - 1
        ));
    }
    Ok(n)
}

/// splitmix64: a seeded, dependency-free stream for the training sample.
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Spherical k-means on a seeded sample of the rows: `lists` unit centroids, as f16. An emptied list
/// takes a member of the largest list, splitting it (faiss does the same).
fn train(rows16: &[u16], dim: usize, lists: usize, threads: usize) -> Vec<u16> {
    let n = rows16.len() / dim;
    let mut mix = Mix(0x5049_5243_4C49_50);
    let mut order: Vec<usize> = (0..n).collect();
    let take = (lists * SAMPLE_PER_LIST).min(n);
    for i in 0..take {
        let j = i + mix.below(n - i);
        order.swap(i, j);
    }
    let mut sample = Vec::with_capacity(take * dim);
    for &r in &order[..take] {
        sample.extend_from_slice(&rows16[r * dim..(r + 1) * dim]);
    }
    let mut centroids = sample[..lists * dim].to_vec();
    for _ in 0..KMEANS_ROUNDS {
        let owner = assign(&sample, &centroids, dim, threads, &|_| {});
        let mut sums = vec![0f32; lists * dim];
        let mut counts = vec![0usize; lists];
        for (i, &c) in owner.iter().enumerate() {
            let c = c as usize;
            counts[c] += 1;
            for (s, &x) in sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(&sample[i * dim..(i + 1) * dim])
            {
                *s += half::f16::from_bits(x).to_f32();
            }
        }
        for c in 0..lists {
            if counts[c] == 0 {
                let largest = (0..lists).max_by_key(|&l| (counts[l], l)).unwrap();
                let members: Vec<usize> = (0..owner.len())
                    .filter(|&i| owner[i] as usize == largest)
                    .collect();
                // Lists refilled this round have no members yet: then any sample row will do.
                let pick = match members.len() {
                    0 => mix.below(owner.len()),
                    m => members[mix.below(m)],
                };
                for (s, &x) in sums[c * dim..(c + 1) * dim]
                    .iter_mut()
                    .zip(&sample[pick * dim..(pick + 1) * dim])
                {
                    *s = half::f16::from_bits(x).to_f32();
                }
                counts[largest] -= 1;
                counts[c] = 1;
            }
            normalise(&mut sums[c * dim..(c + 1) * dim]);
        }
        centroids = to_f16(&sums);
    }
    centroids
}

/// The best `k` (score, row), kept in a min-heap: the worst kept hit is on top.
struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Hit>>,
}

#[derive(PartialEq)]
struct Hit(f32, u32);
impl Eq for Hit {}
impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Hit {
    /// Higher score is better; at equal scores the lower row is better, as in exact search.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl TopK {
    fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(std::cmp::Reverse(hit));
        } else if self.heap.peek().is_some_and(|w| hit > w.0) {
            self.heap.pop();
            self.heap.push(std::cmp::Reverse(hit));
        }
    }
}

impl IvfStore {
    pub fn path(root: &Path) -> PathBuf {
        root.join("image.ivf")
    }

    /// The lists of `vectors` (`[n, dim]`, unit rows) on `threads` threads; `progress(rows assigned)`
    /// is called now and then.
    pub fn build(
        dim: usize,
        vectors: &[f32],
        options: IvfOptions,
        threads: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Self, String> {
        let n = rows_to_add(dim, vectors.len(), 0)?;
        let rows16 = to_f16(vectors);
        let lists = match options.lists {
            0 => auto_lists(n),
            l => l.min(n),
        };
        let centroids = train(&rows16, dim, lists, threads);
        let owner = assign(&rows16, &centroids, dim, threads, progress);
        let mut members = vec![Vec::new(); lists];
        for (r, &c) in owner.iter().enumerate() {
            members[c as usize].push(r as u32);
        }
        let probes = match options.probes {
            0 => DEFAULT_PROBES,
            p => p,
        };
        let row = |r: usize| &rows16[r * dim..(r + 1) * dim];
        Ok(Self::lay_out(dim, &centroids, &members, &row, n, probes))
    }

    /// Adds `vectors` as the rows after those the lists hold, each to its nearest trained centroid.
    pub fn extend(
        &mut self,
        vectors: &[f32],
        threads: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<(), String> {
        let (dim, old) = (self.layout.dim, self.layout.rows);
        let added = rows_to_add(dim, vectors.len(), old)?;
        if self.layout.lists == 0 {
            *self = Self::build(dim, vectors, self.options(), threads, progress)?;
            return Ok(());
        }
        let new16 = to_f16(vectors);
        let owner = assign(&new16, self.centroids(), dim, threads, progress);
        let mut members: Vec<Vec<u32>> = (0..self.layout.lists)
            .map(|c| self.list(c).0.to_vec())
            .collect();
        for (i, &c) in owner.iter().enumerate() {
            members[c as usize].push((old + i) as u32);
        }
        // Old rows are copied from where they lie in the current lists, new ones from `new16`.
        let row = |r: usize| match r.checked_sub(old) {
            None => {
                let pos = self.position(r);
                &self.vectors()[pos * dim..(pos + 1) * dim]
            }
            Some(i) => &new16[i * dim..(i + 1) * dim],
        };
        let mut grown = Self::lay_out(
            dim,
            self.centroids(),
            &members,
            &row,
            old + added,
            self.probes,
        );
        grown.trained_rows = self.trained_rows;
        *self = grown;
        Ok(())
    }

    /// These lists in the file's layout (the header is written by `save`): `members[c]` are list c's
    /// rows, `row(r)` is row r's f16 vector. The centroids count as trained on all `rows`.
    fn lay_out<'a>(
        dim: usize,
        centroids: &[u16],
        members: &[Vec<u32>],
        row: &dyn Fn(usize) -> &'a [u16],
        rows: usize,
        probes: usize,
    ) -> Self {
        let lists = members.len();
        let layout = Layout::new(dim, lists, rows).expect("sizes of vectors held in memory");
        let mut words = vec![0u64; layout.len.div_ceil(8)];
        {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            let put16 = |bytes: &mut [u8], at: usize, v: &[u16]| {
                bytes[at..at + v.len() * 2].copy_from_slice(bytemuck::cast_slice(v))
            };
            put16(bytes, layout.centroids_at, centroids);
            let mut at = 0u64;
            let mut offsets = Vec::with_capacity(lists + 1);
            offsets.push(0u64);
            for m in members {
                at += m.len() as u64;
                offsets.push(at);
            }
            bytes[layout.offsets_at..layout.offsets_at + offsets.len() * 8]
                .copy_from_slice(bytemuck::cast_slice(&offsets));
            let mut pos = 0usize;
            for m in members {
                bytes[layout.ids_at + pos * 4..layout.ids_at + (pos + m.len()) * 4]
                    .copy_from_slice(bytemuck::cast_slice(m));
                for &r in m {
                    put16(bytes, layout.vectors_at + pos * dim * 2, row(r as usize));
                    pos += 1;
                }
            }
        }
        IvfStore {
            bytes: Bytes::Owned(words, layout.len),
            layout,
            trained_rows: rows,
            probes: probes.max(1),
            positions: OnceLock::new(),
        }
    }

    /// The file's header, from the fields (the bytes held in memory or mapped are not kept current).
    fn header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        let l = &self.layout;
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&(l.dim as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(l.lists as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(l.rows as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(self.trained_rows as u64).to_le_bytes());
        h[32..36].copy_from_slice(&(self.probes as u32).to_le_bytes());
        h
    }

    /// Where row `row` lies in the lists (built on first use).
    fn position(&self, row: usize) -> usize {
        let positions = self.positions.get_or_init(|| {
            let mut p = vec![0u32; self.layout.rows];
            for (pos, &id) in self.ids().iter().enumerate() {
                p[id as usize] = pos as u32;
            }
            p
        });
        positions[row] as usize
    }

    fn centroids(&self) -> &[u16] {
        let l = &self.layout;
        bytemuck::cast_slice(
            &self.bytes.as_slice()[l.centroids_at..l.centroids_at + l.lists * l.dim * 2],
        )
    }

    fn offsets(&self) -> &[u64] {
        let l = &self.layout;
        bytemuck::cast_slice(&self.bytes.as_slice()[l.offsets_at..l.offsets_at + (l.lists + 1) * 8])
    }

    fn ids(&self) -> &[u32] {
        let l = &self.layout;
        bytemuck::cast_slice(&self.bytes.as_slice()[l.ids_at..l.ids_at + l.rows * 4])
    }

    fn vectors(&self) -> &[u16] {
        let l = &self.layout;
        bytemuck::cast_slice(&self.bytes.as_slice()[l.vectors_at..l.len])
    }

    /// List `c`'s rows and their vectors.
    fn list(&self, c: usize) -> (&[u32], &[u16]) {
        let o = self.offsets();
        let (a, b) = (o[c] as usize, o[c + 1] as usize);
        let dim = self.layout.dim;
        (&self.ids()[a..b], &self.vectors()[a * dim..b * dim])
    }

    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    pub fn lists(&self) -> usize {
        self.layout.lists
    }

    /// Rows the centroids were trained on.
    pub fn trained_rows(&self) -> usize {
        self.trained_rows
    }

    pub fn options(&self) -> IvfOptions {
        IvfOptions {
            lists: self.layout.lists,
            probes: self.probes,
        }
    }

    /// For logs and /health: "IVF 1000 lists, 16 probes, F16".
    pub fn describe(&self) -> String {
        format!(
            "IVF {} lists, {} probes, F16",
            self.layout.lists, self.probes
        )
    }

    pub fn set_probes(&mut self, probes: usize) {
        self.probes = probes.max(1);
    }

    pub fn serialized_len(&self) -> usize {
        self.layout.len
    }

    /// Writes the file into the index folder `root` atomically.
    pub fn save(&self, root: &Path) -> Result<(), Error> {
        let path = Self::path(root);
        let tmp = root.join(".image.ivf.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.header())?;
            f.write_all(&self.bytes.as_slice()[HEADER_BYTES..])?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The lists of the index folder `root`, if it has them, memory-mapped and checked whole.
    pub fn open(root: &Path) -> Result<Option<Self>, Error> {
        let path = Self::path(root);
        if !path.is_file() {
            return Ok(None);
        }
        if cfg!(target_endian = "big") {
            return Err(invalid(
                &path,
                "inverted lists are little-endian; this machine is not",
            ));
        }
        let file = std::fs::File::open(&path)?;
        // SAFETY: the file is only ever replaced by rename, never written in place, so the mapped
        // bytes do not change while they are read.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let bad = |m: String| invalid(&path, m);
        if map.len() < HEADER_BYTES || &map[0..8] != MAGIC {
            return Err(bad("not a pirclip inverted-list file (bad magic)".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().unwrap()) as usize;
        let u64_at = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().unwrap());
        let (dim, lists, rows) = (u32_at(8), u32_at(12), u64_at(16));
        let (trained_rows, probes) = (u64_at(24), u32_at(32));
        if dim == 0
            || dim > 1 << 16
            || rows >= u32::MAX as u64
            || lists as u64 > rows
            || trained_rows > rows
        {
            return Err(bad(format!(
                "header: dim {dim}, lists {lists}, rows {rows}, trained on {trained_rows}"
            )));
        }
        let layout = Layout::new(dim, lists, rows as usize)
            .filter(|l| l.len == map.len())
            .ok_or_else(|| {
                bad(format!(
                    "{} bytes, not the size of {rows} rows of {dim} in {lists} lists",
                    map.len()
                ))
            })?;
        let store = IvfStore {
            bytes: Bytes::Mapped(map),
            layout,
            trained_rows: trained_rows as usize,
            probes: probes.max(1),
            positions: OnceLock::new(),
        };
        let offsets = store.offsets();
        if offsets[0] != 0 || offsets[lists] != rows || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad(
                "list offsets are not an ordered split of the rows".into()
            ));
        }
        let mut seen = vec![false; rows as usize];
        for &id in store.ids() {
            match seen.get_mut(id as usize) {
                Some(s) if !*s => *s = true,
                _ => return Err(bad(format!("row id {id} is out of range or repeated"))),
            }
        }
        Ok(Some(store))
    }
}

impl VectorStore for IvfStore {
    fn dim(&self) -> usize {
        self.layout.dim
    }

    fn len(&self) -> usize {
        self.layout.rows
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>, SearchError> {
        let dim = self.layout.dim;
        crate::check_query(query, dim)?;
        let lists = self.layout.lists;
        // The heap holds k + 1 at most: k beyond the rows would only reserve memory for nothing.
        let k = k.min(self.layout.rows);
        if k == 0 || lists == 0 {
            return Ok(Vec::new());
        }
        let q = to_f16(query);
        let mut near: Vec<(f32, usize)> = self
            .centroids()
            .chunks_exact(dim)
            .map(|c| dot(&q, c))
            .zip(0..)
            .collect();
        let probes = self.probes.min(lists);
        if probes < lists {
            near.select_nth_unstable_by(probes - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            near.truncate(probes);
        }
        let mut top = TopK {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
        };
        for &(_, c) in &near {
            let (ids, vecs) = self.list(c);
            for (&id, v) in ids.iter().zip(vecs.chunks_exact(dim)) {
                let score = dot(&q, v);
                // A row of a crafted file may hold NaN or infinities: never a result.
                if score.is_finite() {
                    top.push(Hit(score, id));
                }
            }
        }
        let mut hits: Vec<Hit> = top.heap.into_iter().map(|r| r.0).collect();
        hits.sort_by(|a, b| b.cmp(a));
        Ok(hits.into_iter().map(|h| (h.1 as usize, h.0)).collect())
    }

    fn vector(&self, row: usize) -> Vec<f32> {
        let dim = self.layout.dim;
        if row >= self.layout.rows {
            return vec![0f32; dim];
        }
        let pos = self.position(row);
        self.vectors()[pos * dim..(pos + 1) * dim]
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlatStore;

    /// Unit vectors around `centres` random centres: the shape of real embedding sets.
    fn clustered(n: usize, dim: usize, centres: usize, seed: u64) -> Vec<f32> {
        let mut mix = Mix(seed);
        let mut gauss = || {
            // Box-Muller from two uniforms.
            let u = (mix.next() >> 11) as f64 / (1u64 << 53) as f64;
            let v = (mix.next() >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * (u + 1e-12).ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        let c: Vec<f32> = (0..centres * dim).map(|_| gauss()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let centre = &c[(i * 7919 % centres) * dim..][..dim];
            let mut row: Vec<f32> = centre.iter().map(|&x| x + 0.5 * gauss()).collect();
            normalise(&mut row);
            out.extend(row);
        }
        out
    }

    fn recall(store: &dyn VectorStore, flat: &FlatStore, queries: &[f32], dim: usize) -> f64 {
        let mut found = 0;
        for q in queries.chunks(dim) {
            let truth: Vec<usize> = flat
                .search(q, 10)
                .unwrap()
                .into_iter()
                .map(|h| h.0)
                .collect();
            found += store
                .search(q, 10)
                .unwrap()
                .iter()
                .filter(|h| truth.contains(&h.0))
                .count();
        }
        found as f64 / (queries.len() / dim * 10) as f64
    }

    #[test]
    fn lists_find_the_exact_neighbours_save_map_and_extend() {
        let dim = 32;
        // Queries drawn around the same centres, as in the benchmark.
        let mut data = clustered(6050, dim, 40, 1);
        let queries = data.split_off(6000 * dim);
        let flat = FlatStore::new(dim, data.clone()).unwrap();
        let opts = IvfOptions {
            lists: 0,
            probes: 4,
        };
        let built = IvfStore::build(dim, &data, opts, 2, &|_| {}).unwrap();
        assert_eq!((built.rows(), built.lists()), (6000, 77));
        let r = recall(&built, &flat, &queries, dim);
        assert!(r >= 0.95, "recall {r}");
        // Probing every list is exact search, but for float16 rounding of near-ties.
        let mut all = IvfStore::build(dim, &data, opts, 1, &|_| {}).unwrap();
        all.set_probes(10_000);
        assert!(recall(&all, &flat, &queries, dim) >= 0.99);
        // Scores are the float16 inner products, best first.
        let hits = built.search(&queries[..dim], 10).unwrap();
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1));
        let exact: f32 = data[hits[0].0 * dim..][..dim]
            .iter()
            .zip(&queries[..dim])
            .map(|(a, b)| a * b)
            .sum();
        assert!((hits[0].1 - exact).abs() < 2e-3, "{} vs {exact}", hits[0].1);
        assert!((built.vector(hits[0].0)[3] - data[hits[0].0 * dim + 3]).abs() < 1e-3);

        let root = std::env::temp_dir().join(format!("pirclip-ivf-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        built.save(&root).unwrap();
        let mapped = IvfStore::open(&root).unwrap().unwrap();
        assert_eq!(mapped.search(&queries[..dim], 10).unwrap(), hits);
        assert_eq!(mapped.options(), built.options());

        // Extending with the second half equals (in recall) the lists built on all rows.
        let mut grown = IvfStore::build(dim, &data[..3000 * dim], opts, 2, &|_| {}).unwrap();
        grown.extend(&data[3000 * dim..], 2, &|_| {}).unwrap();
        assert_eq!((grown.rows(), grown.trained_rows()), (6000, 3000));
        // Old rows moved into the new layout intact, new rows stored as given (to float16).
        for r in [17, 2999, 3000, 5999] {
            let v = grown.vector(r);
            assert!(
                v.iter()
                    .zip(&data[r * dim..])
                    .all(|(a, b)| (a - b).abs() < 1e-3),
                "row {r}"
            );
        }
        assert!(recall(&grown, &flat, &queries, dim) >= 0.95);
        grown.save(&root).unwrap();
        let reopened = IvfStore::open(&root).unwrap().unwrap();
        assert_eq!(reopened.trained_rows(), 3000);
        assert_eq!(reopened.vector(5999), grown.vector(5999));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let dim = 8;
        let data = clustered(300, dim, 5, 3);
        let store = IvfStore::build(dim, &data, IvfOptions::default(), 1, &|_| {}).unwrap();
        let root = std::env::temp_dir().join(format!("pirclip-ivf-bad-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        store.save(&root).unwrap();
        let good = std::fs::read(IvfStore::path(&root)).unwrap();
        let l = store.layout;
        let damage = |f: &dyn Fn(&mut Vec<u8>), expect: &str| {
            let mut b = good.clone();
            f(&mut b);
            std::fs::write(IvfStore::path(&root), &b).unwrap();
            let e = IvfStore::open(&root).err().expect(expect).to_string();
            assert!(e.contains(expect), "{e}");
            assert!(e.contains("image.ivf"), "{e}");
        };
        damage(&|b| b.truncate(b.len() - 2), "bytes, not the size");
        damage(&|b| b[0] = b'X', "bad magic");
        damage(
            &|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()),
            "header",
        );
        damage(
            &|b| b[12..16].copy_from_slice(&u32::MAX.to_le_bytes()),
            "header",
        );
        damage(
            &|b| b[24..32].copy_from_slice(&301u64.to_le_bytes()),
            "trained on 301",
        );
        damage(
            &|b| b[l.offsets_at + 8..l.offsets_at + 16].copy_from_slice(&10_000u64.to_le_bytes()),
            "offsets",
        );
        let other = (store.ids()[0] + 1) % 300;
        damage(
            &|b| b[l.ids_at..l.ids_at + 4].copy_from_slice(&other.to_le_bytes()),
            "repeated",
        );
        damage(
            &|b| b[l.ids_at..l.ids_at + 4].copy_from_slice(&7_000u32.to_le_bytes()),
            "out of range",
        );
        // Random damage anywhere before the vectors: refused, or searched without a panic.
        let mut mix = Mix(9);
        let (mut refused, mut searched) = (0, 0);
        for _ in 0..400 {
            let mut b = good.clone();
            for _ in 0..1 + mix.below(3) {
                let at = mix.below(b.len().min(l.vectors_at + 64));
                b[at] = mix.next() as u8;
            }
            std::fs::write(IvfStore::path(&root), &b).unwrap();
            match IvfStore::open(&root) {
                Err(_) => refused += 1,
                Ok(s) => {
                    let s = s.unwrap();
                    for q in data.chunks(dim).take(5) {
                        assert!(s.search(q, 10).unwrap().len() <= 10);
                    }
                    assert_eq!(s.vector(299).len(), dim);
                    searched += 1;
                }
            }
        }
        println!("random damage: {refused} files refused, {searched} searched");
        assert!(
            refused > 100 && searched > 20,
            "{refused} refused, {searched} searched"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
