//! Token ids identical to open_clip's tokenizer (goldens made by dev/make_tokenizer_goldens.py).

use std::io::Read;
use std::path::PathBuf;

use pirclip_text::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn goldens() -> Vec<(String, Vec<i64>)> {
    let gz = std::fs::read(root().join("tests/fixtures/tokenizer_goldens.tsv.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|line| {
            let (cap, ids) = line.split_once('\t').unwrap();
            let cap: String = serde_json::from_str(cap).unwrap();
            (cap, ids.split(' ').map(|v| v.parse().unwrap()).collect())
        })
        .collect()
}

#[test]
fn identical_to_open_clip_on_all_golden_captions() {
    let tok = Tokenizer::new();
    let goldens = goldens();
    assert!(goldens.len() > 60_000);
    let mut wrong = Vec::new();
    for (cap, want) in &goldens {
        let got = tok.tokenize(cap, 77);
        let mut want_padded = want.clone();
        want_padded.resize(77, 0);
        if got != want_padded {
            wrong.push(format!(
                "{cap:?}\n  want {want:?}\n  got  {:?}",
                &got[..want.len().min(77)]
            ));
        }
    }
    println!(
        "{} of {} golden captions identical",
        goldens.len() - wrong.len(),
        goldens.len()
    );
    assert!(
        wrong.is_empty(),
        "{} mismatches, first: {}",
        wrong.len(),
        wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn parity_fixture_tokens() {
    let captions: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/parity/captions.json")).unwrap(),
    )
    .unwrap();
    let want =
        pirclip_checkpoint::npy::read(root().join("tests/fixtures/parity/tokens.npy")).unwrap();
    assert_eq!(want.shape, vec![captions.len(), 77]);
    let got = Tokenizer::new().tokenize_batch(&captions, 77);
    assert_eq!(got, want.to_i64_vec());
}

/// Needs ../shared: every caption of the four annotation sets is covered by the goldens (so the test above
/// really is "identical on all annotation captions").
#[test]
fn needs_shared_every_annotation_caption_is_in_the_goldens() {
    let dir = root().join("../shared/data/annotations");
    if !dir.exists() {
        panic!("needs ../shared/data/annotations (the shared data folder beside the repository)");
    }
    let tok = Tokenizer::new();
    let golden: std::collections::HashMap<String, Vec<i64>> = goldens().into_iter().collect();
    let mut count = 0;
    for f in [
        "dataset_RSITMD.json",
        "dataset_rsicd.json",
        "dataset_sydney.json",
        "dataset_ucm.json",
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap();
        for im in v["images"].as_array().unwrap() {
            for s in im["sentences"].as_array().unwrap() {
                let raw = s["raw"].as_str().unwrap();
                let want = golden
                    .get(raw)
                    .unwrap_or_else(|| panic!("caption {raw:?} of {f} missing from goldens"));
                let got = tok.tokenize(raw, 77);
                assert_eq!(&got[..want.len()], &want[..], "{raw:?}");
                count += 1;
            }
        }
    }
    println!("{count} annotation captions tokenised identically to open_clip");
    assert_eq!(count, 91_885);
}
