// hnsw_rs on the vectors of `bench/ann.sh` (ANN_DATA=dir keeps them), at faiss's parameters: the measurement
// behind choosing usearch (crates/store/src/ann.rs). Standalone: `cargo run --release -- DIR` (target/ is
// its own; not part of the workspace).
use anndists::dist::DistDot;
use hnsw_rs::prelude::*;
use std::time::Instant;

/// A little-endian 2-d .npy of 4- or 8-byte elements (what bench/ann.py writes): shape and raw rows.
fn npy(path: &str) -> (usize, usize, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    let shape: Vec<usize> = h.split("'shape': (").nth(1).unwrap().split(')').next().unwrap()
        .split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    (shape[0], shape[1], b[10 + hl..].to_vec())
}
fn npy_f32(path: &str) -> (usize, usize, Vec<f32>) {
    let (n, d, raw) = npy(path);
    (n, d, raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}
fn npy_i64(path: &str) -> (usize, usize, Vec<i64>) {
    let (n, d, raw) = npy(path);
    (n, d, raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
}
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let (n, d, base) = npy_f32(&format!("{dir}/base.npy"));
    let (q, _, queries) = npy_f32(&format!("{dir}/queries.npy"));
    let (_, tk, truth) = npy_i64(&format!("{dir}/truth.npy"));
    rayon::ThreadPoolBuilder::new().num_threads(2).build_global().unwrap();
    let rows: Vec<(&[f32], usize)> = base.chunks(d).enumerate().map(|(i, r)| (r, i)).collect();
    let t = Instant::now();
    let hnsw = Hnsw::<f32, DistDot>::new(32, n, 16, 80, DistDot {});
    hnsw.parallel_insert_slice(&rows);
    let build = t.elapsed().as_secs_f64();
    let mut lat = vec![];
    let mut found = 0;
    for pass in 0..2 {
        lat.clear(); found = 0;
        for (i, qv) in queries.chunks(d).enumerate() {
            let t = Instant::now();
            let r = hnsw.search(qv, 10, 128);
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let tr = &truth[i * tk..i * tk + 10];
            found += r.iter().filter(|h| tr.contains(&(h.d_id as i64))).count();
        }
        let _ = pass;
    }
    lat.sort_by(f64::total_cmp);
    println!("{{\"engine\":\"hnsw_rs 0.3\",\"vectors\":{n},\"dim\":{d},\"build_s\":{build:.1},\"recall_at_k\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        found as f64 / (q * 10) as f64, lat[lat.len() / 2], lat[(lat.len() - 1) * 99 / 100]);
}
