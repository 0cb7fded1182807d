//! The reader against files written by real PyTorch (fixtures made by dev/make_checkpoint_fixtures.py and
//! the official code's parity set A).

use pirclip_checkpoint::{load, Error, Layout};
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(p)
}

#[test]
fn dtypes_strides_and_shared_storages_match_torch() {
    let ck = load(fixture("checkpoints/dtypes_strides.pt")).unwrap();
    assert_eq!(
        ck.layout,
        Layout::BareStateDict {
            module_prefix: false
        }
    );
    let expected = std::fs::read(fixture("checkpoints/dtypes_strides_expected.bin")).unwrap();
    let expected: Vec<f32> = expected
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut at = 0;
    let names: Vec<&str> = ck
        .state_dict
        .entries
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "f32",
            "f16",
            "bf16",
            "transposed",
            "sliced",
            "scalar",
            "count",
            "shared_a",
            "shared_b"
        ]
    );
    for (name, t) in &ck.state_dict.entries {
        let got = t.to_f32_vec();
        assert_eq!(
            got,
            expected[at..at + got.len()],
            "entry {name} ({}, {:?})",
            t.dtype,
            t.shape
        );
        at += got.len();
    }
    assert_eq!(at, expected.len());
    assert_eq!(ck.state_dict.get("transposed").unwrap().shape, vec![6, 4]);
    assert_eq!(ck.state_dict.get("sliced").unwrap().shape, vec![2, 3]);
    assert_eq!(
        ck.state_dict.get("scalar").unwrap().shape,
        Vec::<usize>::new()
    );
    assert_eq!(ck.state_dict.get("count").unwrap().to_i64_vec(), vec![7]);
}

#[test]
fn training_checkpoint_with_module_prefix_and_arbitrary_stem() {
    let ck = load(fixture("checkpoints/weird stem name.pt")).unwrap();
    match &ck.layout {
        Layout::TrainingCheckpoint {
            epoch,
            name,
            module_prefix,
            has_optimizer,
        } => {
            assert_eq!(*epoch, Some(2));
            assert_eq!(name.as_deref(), Some("x"));
            assert!(*module_prefix);
            assert!(!*has_optimizer);
        }
        other => panic!("layout {other:?}"),
    }
    let names: Vec<&str> = ck
        .state_dict
        .entries
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["f32", "f16", "bf16"]);
}

#[test]
fn malicious_pickle_is_refused_and_never_runs() {
    let _ = std::fs::remove_file("/tmp/pirclip_pwned");
    let err = load(fixture("checkpoints/malicious.pt")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("posix.system") || msg.contains("os.system"),
        "{msg}"
    );
    assert!(msg.contains("malicious.pt"), "error names the file: {msg}");
    assert!(!std::path::Path::new("/tmp/pirclip_pwned").exists());
}

#[test]
fn legacy_format_reads_as_torch_load_does() {
    // The same state dict saved both ways (views, offsets, fp16, int64, a 0-d tensor): equal tensors.
    let legacy = load(fixture("checkpoints/legacy_views.pth")).unwrap();
    let zip = load(fixture("checkpoints/legacy_views_zip.pt")).unwrap();
    assert_eq!(legacy.state_dict.len(), 7);
    assert_eq!(legacy.state_dict.entries, zip.state_dict.entries);
    let narrowed = legacy.state_dict.get("narrowed").unwrap();
    assert_eq!(narrowed.shape, vec![2, 3]);
    assert_eq!(narrowed.to_f32_vec(), vec![8., 9., 10., 14., 15., 16.]);
    let w = load(fixture("checkpoints/legacy.pt")).unwrap();
    assert_eq!(w.state_dict.get("w").unwrap().to_f32_vec(), vec![0., 0.]);
}

#[test]
fn hostile_legacy_files_are_refused() {
    let bytes = std::fs::read(fixture("checkpoints/legacy_views.pth")).unwrap();
    // Cut anywhere: within the pickles, the counts or the storages.
    for cut in [20, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
        let e = pirclip_checkpoint::load_bytes(&bytes[..cut])
            .unwrap_err()
            .to_string();
        assert!(!e.is_empty());
    }
    // A storage count of 2^62 elements: refused from the bytes left, nothing allocated.
    let tail = bytes.len() - 24 * 4 - 8; // the last storage (`base`'s 24 floats) and its count
    let mut huge = bytes.clone();
    huge[tail..tail + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = pirclip_checkpoint::load_bytes(&huge)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes are left"), "{e}");
    // The magic number wrong.
    let mut wrong = bytes.clone();
    wrong[5] ^= 0xff;
    assert!(pirclip_checkpoint::load_bytes(&wrong).is_err());
}

#[test]
fn truncated_and_corrupt_archives_are_refused() {
    let bytes = std::fs::read(fixture("parity/model_state_dict.pt")).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 30, 100] {
        let err = pirclip_checkpoint::load_bytes(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, Error::Format(_)), "cut at {cut}: {err}");
        assert!(
            err.to_string().contains("zip") || err.to_string().contains("truncated"),
            "{err}"
        );
    }
    // Flip bytes inside a storage: zip CRCs catch it.
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 64] {
        *b ^= 0x5a;
    }
    assert!(pirclip_checkpoint::load_bytes(&corrupt).is_err());
    // Garbage.
    let err = pirclip_checkpoint::load_bytes(b"hello world, not a checkpoint").unwrap_err();
    assert!(
        err.to_string().contains("not a PyTorch zip checkpoint"),
        "{err}"
    );
}

#[test]
fn parity_set_a_three_layouts_hold_identical_weights() {
    let a = load(fixture("parity/model.safetensors")).unwrap();
    let b = load(fixture("parity/model_state_dict.pt")).unwrap();
    let c = load(fixture("parity/train_checkpoint.pt")).unwrap();
    assert_eq!(a.layout, Layout::Safetensors);
    assert_eq!(
        b.layout,
        Layout::BareStateDict {
            module_prefix: false
        }
    );
    assert!(matches!(
        c.layout,
        Layout::TrainingCheckpoint {
            epoch: Some(3),
            has_optimizer: true,
            module_prefix: true,
            ..
        }
    ));
    assert_eq!(b.state_dict.len(), 187);
    assert_eq!(b.state_dict.parameter_count(), 1_202_291);
    // Saved order is the model's state-dict order (state_dict_keys.tsv).
    let tsv = std::fs::read_to_string(fixture("parity/state_dict_keys.tsv")).unwrap();
    let keys: Vec<&str> = tsv
        .lines()
        .filter(|l| !l.starts_with("key\t") && !l.is_empty())
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    let got: Vec<&str> = b
        .state_dict
        .entries
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(got, keys);
    for (name, t) in &b.state_dict.entries {
        assert_eq!(
            Some(t),
            a.state_dict.get(name),
            "{name} differs between .pt and safetensors"
        );
        assert_eq!(
            Some(t),
            c.state_dict.get(name),
            "{name} differs in the training checkpoint"
        );
    }
}

#[test]
fn safetensors_round_trip() {
    let a = load(fixture("parity/model.safetensors"))
        .unwrap()
        .state_dict;
    let bytes = pirclip_checkpoint::safetensors::write_bytes(&a, &[("format", "pt")]);
    let back = pirclip_checkpoint::safetensors::read(&bytes).unwrap();
    assert_eq!(back, a);
}

#[test]
fn written_checkpoint_round_trips_through_our_reader() {
    use pirclip_checkpoint::pt_write::{self, PyValue};
    let sd = load(fixture("parity/model.safetensors"))
        .unwrap()
        .state_dict;
    let obj = PyValue::Dict(vec![
        (PyValue::str("epoch"), PyValue::Int(4)),
        (PyValue::str("name"), PyValue::str("run")),
        (PyValue::str("state_dict"), PyValue::state_dict(&sd)),
    ]);
    let bytes = pt_write::to_bytes(&obj, "epoch_4").unwrap();
    let ck = pirclip_checkpoint::load_bytes(&bytes).unwrap();
    assert!(matches!(
        ck.layout,
        Layout::TrainingCheckpoint {
            epoch: Some(4),
            module_prefix: false,
            ..
        }
    ));
    assert_eq!(ck.state_dict, sd);
}

/// PyTorch itself (the project's venv, set up by scripts/setup.sh) opens what we write with weights_only.
#[test]
fn written_checkpoint_opens_in_torch_load_weights_only() {
    use pirclip_checkpoint::pt_write::{self, PyValue};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "needs the project venv with torch: run scripts/setup.sh"
    );
    let sd = load(fixture("parity/model_state_dict.pt"))
        .unwrap()
        .state_dict;
    let obj = PyValue::Dict(vec![
        (PyValue::str("epoch"), PyValue::Int(1)),
        (PyValue::str("state_dict"), PyValue::state_dict(&sd)),
        (
            PyValue::str("extra"),
            PyValue::List(vec![
                PyValue::Float(0.5),
                PyValue::None,
                PyValue::Tuple(vec![PyValue::Bool(true), PyValue::Int(-3_000_000_000)]),
            ]),
        ),
    ]);
    let path = std::env::temp_dir().join(format!("pirclip-write-{}.pt", std::process::id()));
    pt_write::write(&path, &obj).unwrap();
    let script = format!(
        "import torch\n\
         ck = torch.load({p:?}, weights_only=True)\n\
         ref = torch.load({m:?}, weights_only=True)\n\
         sd = ck['state_dict']\n\
         assert type(sd).__name__ == 'OrderedDict', type(sd)\n\
         assert list(sd) == list(ref), 'key order'\n\
         assert all(torch.equal(sd[k], ref[k]) for k in ref)\n\
         assert ck['extra'] == [0.5, None, (True, -3000000000)], ck['extra']\n\
         print('torch.load ok', len(sd))",
        p = path.display().to_string(),
        m = fixture("parity/model_state_dict.pt").display().to_string()
    );
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("torch.load ok 187"));
}
