//! `pirclip_index::bench` on small vectors: one line per setting, recall measured against exact search.

use pirclip_index::bench::{run, BenchSpec};
use pirclip_store::{AnnConfig, AnnOptions, IvfOptions};

fn unit_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let row: Vec<f32> = (0..dim)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        out.extend(row.iter().map(|v| v / norm));
    }
    out
}

#[test]
fn each_setting_is_one_line_with_its_recall() {
    let dir = std::env::temp_dir().join(format!("pirclip-index-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dim = 16;
    let write = |name: &str, n: usize, seed: u64| {
        let path = dir.join(name);
        let t = pirclip_checkpoint::TensorData::from_f32(vec![n, dim], &unit_rows(n, dim, seed));
        pirclip_checkpoint::npy::write(&path, &t).unwrap();
        path
    };
    let (vectors, queries) = (write("base.npy", 600, 1), write("queries.npy", 30, 2));
    for (ann, sweep) in [
        (AnnConfig::Hnsw(AnnOptions::default()), vec![16, 256]),
        (
            AnnConfig::Ivf(IvfOptions {
                lists: 0,
                probes: 0,
            }),
            vec![1, 1000],
        ),
    ] {
        let hnsw = matches!(ann, AnnConfig::Hnsw(_));
        let spec = BenchSpec {
            vectors: vectors.clone(),
            queries: queries.clone(),
            truth: None,
            k: 10,
            threads: 1,
            out: None,
            ann,
            sweep_ef_search: if hnsw { sweep.clone() } else { Vec::new() },
            sweep_probes: if hnsw { Vec::new() } else { sweep.clone() },
        };
        let mut lines = Vec::new();
        run(&spec, None, &mut |line| lines.push(line)).unwrap();
        assert_eq!(
            lines.len(),
            3,
            "the default setting and two more: {lines:?}"
        );
        let recall: Vec<f64> = lines
            .iter()
            .map(|l| l["recall_at_k"].as_f64().unwrap())
            .collect();
        assert!(recall.iter().all(|r| (0.0..=1.0).contains(r)), "{recall:?}");
        // The widest search (efSearch 256 over 600 rows, or every list probed) is exact.
        assert_eq!(recall[2], 1.0, "{lines:?}");
        assert_eq!(lines[0]["vectors"], 600);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
