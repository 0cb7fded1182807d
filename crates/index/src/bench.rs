//! `pirclip index bench`: the approximate index measured on given vectors, one JSON line per setting.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pirclip_model::ClipModel;
use pirclip_store::{AnnConfig, AnnStore, IvfStore, VectorStore};

/// What to measure.
pub struct BenchSpec {
    /// Base vectors, `[n, dim]` float .npy (normalised here).
    pub vectors: PathBuf,
    /// Query vectors, `[q, dim]`.
    pub queries: PathBuf,
    /// True neighbours, `[q, >=k]` integer .npy; computed exactly when absent.
    pub truth: Option<PathBuf>,
    pub k: usize,
    /// Build threads.
    pub threads: usize,
    /// Where to save the index (its size is reported); a temporary folder when absent.
    pub out: Option<PathBuf>,
    pub ann: AnnConfig,
    /// HNSW: more efSearch values measured on the same graph.
    pub sweep_ef_search: Vec<usize>,
    /// IVF: more probe counts measured on the same lists.
    pub sweep_probes: Vec<usize>,
}

fn read_matrix(path: &std::path::Path) -> Result<(usize, Vec<f32>)> {
    let t = pirclip_checkpoint::npy::read(path).with_context(|| path.display().to_string())?;
    if t.shape.len() != 2 || !t.dtype.is_float() {
        bail!(
            "{}: expected a 2-d float array, found {:?} {:?}",
            path.display(),
            t.dtype,
            t.shape
        );
    }
    let dim = t.shape[1];
    let mut v = t.to_f32_vec();
    for row in v.chunks_mut(dim.max(1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    Ok((dim, v))
}

/// Recall@k and the sorted single-query latencies (ms) of two passes over the queries: the first pays
/// the page faults of a freshly mapped file (what one `pirclip search --index` call sees), the second is
/// the steady state of a running server, comparable with an in-memory index such as faiss's.
fn measure(
    ann: &dyn VectorStore,
    queries: &[f32],
    dim: usize,
    k: usize,
    truth: &[Vec<usize>],
) -> Result<(f64, Vec<f64>, Vec<f64>)> {
    let mut passes = Vec::new();
    let mut found = 0usize;
    for _ in 0..2 {
        let mut lat = Vec::with_capacity(truth.len());
        found = 0;
        for (qv, t) in queries.chunks(dim).zip(truth) {
            let t0 = Instant::now();
            let hits = ann.search(qv, k)?;
            lat.push(t0.elapsed().as_secs_f64() * 1e3);
            found += hits.iter().filter(|h| t.contains(&h.0)).count();
        }
        lat.sort_by(|x, y| x.total_cmp(y));
        passes.push(lat);
    }
    let warm = passes.pop().unwrap();
    let cold = passes.pop().unwrap();
    Ok((found as f64 / (truth.len() * k) as f64, cold, warm))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The index under test.
enum Bench {
    Ivf(IvfStore),
    Hnsw(AnnStore),
}

impl Bench {
    /// Sets the search-time knob: probes for lists, efSearch for a graph.
    fn set(&mut self, value: usize) {
        match self {
            Bench::Ivf(s) => s.set_probes(value),
            Bench::Hnsw(s) => s.set_expansion_search(value),
        }
    }

    fn store(&self) -> &dyn VectorStore {
        match self {
            Bench::Ivf(s) => s,
            Bench::Hnsw(s) => s,
        }
    }
}

/// Builds the index, then measures recall and latency at each setting, one JSON object per setting
/// handed to `emit`. With `model` (and a description of its weights), a text query end to end too.
pub fn run(
    a: &BenchSpec,
    model: Option<(&ClipModel, String)>,
    emit: &mut dyn FnMut(serde_json::Value),
) -> Result<()> {
    let (dim, base) = read_matrix(&a.vectors)?;
    let (qdim, queries) = read_matrix(&a.queries)?;
    if qdim != dim {
        bail!("queries have dimension {qdim}, vectors {dim}");
    }
    let (n, q) = (base.len() / dim, queries.len() / dim);
    if n == 0 || q == 0 {
        bail!("no vectors or no queries");
    }
    let k = a.k.clamp(1, n);
    // A given truth file is checked before the (long) build.
    let given_truth = a.truth.as_ref().map(|p| read_truth(p, q, k)).transpose()?;
    let scratch = std::env::temp_dir().join(format!("pirclip-ann-bench-{}", std::process::id()));
    let root = a.out.clone().unwrap_or_else(|| scratch.clone());
    std::fs::create_dir_all(&root)?;
    let (mut index, build_s, bytes) = build(a, dim, &base, &root)?;
    // Exact search over the same rows: the ground truth when none is given, and its own latency.
    let flat = pirclip_store::FlatStore::new(dim, base).map_err(anyhow::Error::msg)?;
    let truth = match given_truth {
        Some(t) => t,
        None => queries
            .chunks(dim)
            .map(|qv| Ok(flat.search(qv, k)?.into_iter().map(|h| h.0).collect()))
            .collect::<Result<_>>()?,
    };
    let mut exact_lat: Vec<f64> = queries
        .chunks(dim)
        .take(20)
        .map(|qv| {
            let t0 = Instant::now();
            let _ = flat.search(qv, k);
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    exact_lat.sort_by(|x, y| x.total_cmp(y));
    drop(flat);

    // A text query end to end: tokenise + encode with the model, then search (with the given query
    // vectors when the model's dimension differs from the benchmark's).
    let settings: Vec<usize> = match &index {
        Bench::Ivf(s) => std::iter::once(s.options().probes)
            .chain(a.sweep_probes.iter().copied().filter(|&p| p > 0))
            .collect(),
        Bench::Hnsw(s) => std::iter::once(s.options().expansion_search)
            .chain(a.sweep_ef_search.iter().copied().filter(|&e| e > 0))
            .collect(),
    };
    for (i, setting) in settings.into_iter().enumerate() {
        index.set(setting);
        let ann = index.store();
        let (recall, cold, warm) = measure(ann, &queries, dim, k, &truth)?;
        let text_lat = match &model {
            Some((model, _)) => text_latency(model, ann, &queries, dim, k)?,
            None => Vec::new(),
        };
        let mut line = serde_json::json!({
            "vectors": n, "dim": dim, "queries": q, "k": k,
            "threads": a.threads,
            "build_s": (build_s * 10.0).round() / 10.0,
            "index_mb": (bytes as f64 / 1e6 * 10.0).round() / 10.0,
            "recall_at_k": recall,
            "p50_ms": percentile(&warm, 0.5), "p99_ms": percentile(&warm, 0.99),
            // Only the first pass over a freshly mapped file is cold.
            "cold_p50_ms": (i == 0).then(|| percentile(&cold, 0.5)),
            "cold_p99_ms": (i == 0).then(|| percentile(&cold, 0.99)),
            "text_query_p50_ms": text_lat.first().map(|_| percentile(&text_lat, 0.5)),
            "text_model": model.as_ref().map(|m| format!("{} ({})", m.0.config.name, m.1)),
            // pirclip's exact search (what an index without an approximate one uses), median of 20.
            "exact_p50_ms": percentile(&exact_lat, 0.5),
        });
        let fields = match &index {
            Bench::Ivf(s) => serde_json::json!({
                "engine": "pirclip IVF-Flat (numkong f16 kernels)",
                "lists": s.options().lists, "probes": s.options().probes,
                "trained_rows": s.trained_rows(), "quantization": "f16",
            }),
            Bench::Hnsw(s) => {
                let o = s.options();
                serde_json::json!({
                    "engine": "usearch HNSW",
                    "M": o.connectivity, "ef_construction": o.expansion_add,
                    "ef_search": o.expansion_search,
                    "quantization": format!("{:?}", o.quantization).to_lowercase(),
                })
            }
        };
        let line = line.as_object_mut().unwrap();
        let mut out = fields.as_object().unwrap().clone();
        out.append(line);
        emit(serde_json::Value::Object(out));
    }
    if a.out.is_none() {
        drop(index);
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// Ground-truth neighbours from an `.npy` of `[queries, >= k]` integers.
fn read_truth(p: &std::path::Path, q: usize, k: usize) -> Result<Vec<Vec<usize>>> {
    let t = pirclip_checkpoint::npy::read(p).with_context(|| p.display().to_string())?;
    if t.shape.len() != 2 || t.shape[0] != q || t.shape[1] < k || t.dtype.is_float() {
        bail!(
            "{}: expected [{q}, >={k}] integers, found {:?} {:?}",
            p.display(),
            t.dtype,
            t.shape
        );
    }
    Ok(t.to_i64_vec()
        .chunks(t.shape[1])
        .map(|r| r[..k].iter().map(|&i| i as usize).collect())
        .collect())
}

/// Builds the approximate index, saves it under `root` and opens it again memory-mapped, the way
/// `search` and `serve` search it; with the build's seconds and the file's bytes.
fn build(
    a: &BenchSpec,
    dim: usize,
    base: &[f32],
    root: &std::path::Path,
) -> Result<(Bench, f64, u64)> {
    let started = Instant::now();
    Ok(match a.ann.clone() {
        AnnConfig::Ivf(o) => {
            let built =
                IvfStore::build(dim, base, o, a.threads, &|_| {}).map_err(anyhow::Error::msg)?;
            let build_s = started.elapsed().as_secs_f64();
            built.save(root)?;
            drop(built);
            let bytes = std::fs::metadata(IvfStore::path(root))?.len();
            let ivf = IvfStore::open(root)?.context("the lists just saved")?;
            (Bench::Ivf(ivf), build_s, bytes)
        }
        AnnConfig::Hnsw(o) => {
            let built =
                AnnStore::build(dim, base, o, a.threads, &|_| {}).map_err(anyhow::Error::msg)?;
            let build_s = started.elapsed().as_secs_f64();
            built.save(root)?;
            drop(built);
            let bytes = std::fs::metadata(AnnStore::graph_path(root))?.len();
            let ann = AnnStore::open(root, true)?.context("the graph just saved")?;
            (Bench::Hnsw(ann), build_s, bytes)
        }
    })
}

/// Milliseconds of a text query end to end, sorted: tokenise and encode with the model, then search
/// (with the given query vectors when the model's dimension differs from the benchmark's).
fn text_latency(
    model: &ClipModel,
    ann: &dyn pirclip_store::VectorStore,
    queries: &[f32],
    dim: usize,
    k: usize,
) -> Result<Vec<f64>> {
    let texts = [
        "a stadium",
        "storage tanks next to a port",
        "flooded farmland",
    ];
    let mut lat = Vec::new();
    for (j, qv) in queries.chunks(dim).enumerate().take(200) {
        let t0 = Instant::now();
        let e = pirclip_retrieval::encode_texts(
            model,
            &[texts[j % texts.len()].to_string()],
            1,
            true,
            &pirclip_retrieval::Quiet,
        );
        let query = if e.dim == dim { &e.values[..] } else { qv };
        ann.search(query, k)?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(|x, y| x.total_cmp(y));
    Ok(lat)
}
