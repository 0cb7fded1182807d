//! The metric-only golden of fixture set A: official recalls from fixed embeddings.

use std::path::PathBuf;

use pirclip_checkpoint::npy;
use pirclip_data::metrics::{round2, Retrieval};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(p)
}

#[test]
fn metric_golden_matches_exactly() {
    let img = npy::read(fx("metric_img_emb.npy")).unwrap();
    let txt = npy::read(fx("metric_txt_emb.npy")).unwrap();
    let t2i: Vec<usize> = npy::read(fx("metric_txt_to_img.npy"))
        .unwrap()
        .to_i64_vec()
        .iter()
        .map(|&v| v as usize)
        .collect();
    let (ni, nt, d) = (img.shape[0], txt.shape[0], img.shape[1]);
    let (iv, tv) = (img.to_f32_vec(), txt.to_f32_vec());
    let mut scores = vec![0f32; nt * ni];
    for t in 0..nt {
        for i in 0..ni {
            scores[t * ni + i] = (0..d).map(|c| tv[t * d + c] * iv[i * d + c]).sum();
        }
    }
    let m = Retrieval {
        scores: &scores,
        n_texts: nt,
        n_images: ni,
        text_to_image: &t2i,
    }
    .metrics(&[1, 5, 10]);
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("metric_expected.json")).unwrap())
            .unwrap();
    for (key, value) in m.official() {
        assert_eq!(
            round2(value),
            want["metrics"][&key].as_f64().unwrap(),
            "{key}"
        );
        assert!(
            (value - want["unrounded"][&key].as_f64().unwrap()).abs() < 1e-4,
            "{key} unrounded"
        );
    }
}
