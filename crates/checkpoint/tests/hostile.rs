//! Hostile files, built byte by byte: each must give an error (never a panic, a stack overflow, a hang or
//! a multi-gigabyte allocation). Every case here crashed, hung or exhausted memory in an earlier reader.

use pirclip_checkpoint::pickle::{unpickle, MAX_DEPTH};
use pirclip_checkpoint::{load, load_bytes, safetensors, Error};

/// Python's LONG1 opcode for any i64.
fn long1(v: i64) -> Vec<u8> {
    let mut out = vec![0x8a, 8];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn tuple(items: &[i64]) -> Vec<u8> {
    let mut out = vec![b'('];
    for &i in items {
        out.extend(long1(i));
    }
    out.push(b't');
    out
}

/// `{"w": _rebuild_tensor_v2(storage(float, "0", numel), offset, size, stride, False, OrderedDict())}`.
fn tensor_pickle(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu".to_vec();
    p.extend(long1(numel));
    p.extend_from_slice(b"tQ");
    p.extend(long1(offset));
    p.extend(tuple(size));
    p.extend(tuple(stride));
    // requires_grad False, backward hooks OrderedDict(); close the argument tuple, call, set item.
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

fn format_error(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::Format(_)) => e.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn a_valid_tensor_pickle_is_read() {
    let v = unpickle(&tensor_pickle(6, 0, &[2, 3], &[3, 1])).unwrap();
    assert!(
        matches!(
            v.dict_get("w"),
            Some(pirclip_checkpoint::pickle::Value::Tensor(_))
        ),
        "{v:?}"
    );
}

#[test]
fn eight_byte_lengths_near_2_pow_64_are_truncation_errors() {
    for op in [0x8du8, 0x8e] {
        let mut p = vec![0x80, 4, op];
        p.extend_from_slice(&(u64::MAX - 3).to_le_bytes());
        p.push(b'.');
        let msg = format_error(unpickle(&p));
        assert!(
            msg.contains("exceeds") || msg.contains("truncated"),
            "{msg}"
        );
    }
}

#[test]
fn deep_nesting_is_refused_before_it_can_overflow_the_stack() {
    // 1M nested lists through MARK ... LIST.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', 1_000_000));
    p.push(b']');
    p.extend(std::iter::repeat_n(b'l', 1_000_000));
    p.push(b'.');
    assert!(format_error(unpickle(&p)).contains("deep"));
    // 1M nested 1-tuples.
    let mut p = vec![0x80, 2, b'N'];
    p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    p.push(b'.');
    assert!(format_error(unpickle(&p)).contains("deep"));
    // A memo chain: x = (x,) stored back into memo 0, a million times.
    let mut p = vec![0x80, 2, b'N', b'q', 0];
    for _ in 0..1_000_000 {
        p.extend_from_slice(&[b'0', b'h', 0, 0x85, b'q', 0]);
    }
    p.push(b'.');
    assert!(format_error(unpickle(&p)).contains("deep"));
    // At the limit itself the value is fine.
    let mut p = vec![0x80, 2, b'N'];
    p.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize));
    p.push(b'.');
    unpickle(&p).unwrap();
}

#[test]
fn dup_and_memo_doubling_is_refused_within_the_copy_budget() {
    // DUP + APPEND: the list holds a copy of itself, 24 times (2^24 copies of the first list).
    let mut p = vec![0x80, 2, b']'];
    for _ in 0..24 {
        p.extend_from_slice(b"2a");
    }
    p.push(b'.');
    assert!(format_error(unpickle(&p)).contains("memo/DUP"));
    // Memo doubling: m = (m, m), 40 times.
    let mut p = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..40 {
        p.extend_from_slice(&[b'h', 0, 0x86, b'q', 0]);
    }
    p.push(b'.');
    assert!(p.len() < 250);
    assert!(format_error(unpickle(&p)).contains("memo/DUP"));
}

#[test]
fn a_dict_of_200k_keys_is_built_in_linear_time_with_python_semantics() {
    let mut p = vec![0x80, 2, b'}', b'('];
    for i in 0..200_000u32 {
        let k = format!("key.{i}");
        p.push(b'X');
        p.extend_from_slice(&(k.len() as u32).to_le_bytes());
        p.extend_from_slice(k.as_bytes());
        p.push(b'J');
        p.extend_from_slice(&i.to_le_bytes());
    }
    // Then `key.0` again: Python keeps its first position and takes the new value.
    p.extend_from_slice(b"X\x05\x00\x00\x00key.0K\x07u.");
    let started = std::time::Instant::now();
    let v = unpickle(&p).unwrap();
    // A bound on complexity, not a speed goal: the quadratic reader took over 60 s.
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    let pirclip_checkpoint::pickle::Value::Dict(items) = &v else {
        panic!()
    };
    assert_eq!(items.len(), 200_000);
    assert_eq!(items[0].0.as_str(), Some("key.0"));
    assert_eq!(items[0].1.as_int(), Some(7));
    assert_eq!(
        v.dict_get("key.199999").and_then(|v| v.as_int()),
        Some(199_999)
    );
}

#[test]
fn tensor_geometry_that_overflows_or_leaves_the_storage_is_refused() {
    let cases: [(i64, i64, &[i64], &[i64], &str); 6] = [
        (4, i64::MAX, &[1], &[1], "outside"),
        (4, 0, &[4, 4], &[1 << 61, 1], "outside"),
        (4, 0, &[9, 4], &[1 << 61, 1], "overflow"),
        (4, 0, &[1 << 62, 4], &[4, 1], "overflow"),
        (16, 0, &[5, 4], &[4, 1], "outside"),
        (4, 0, &[40_000, 40_000], &[0, 0], "expand"),
    ];
    for (numel, offset, size, stride, why) in cases {
        let msg = format_error(unpickle(&tensor_pickle(numel, offset, size, stride)));
        assert!(msg.contains(why), "{size:?}/{stride:?}: {msg}");
    }
    // A storage whose byte count overflows.
    let msg = format_error(unpickle(&tensor_pickle(i64::MAX, 0, &[1], &[1])));
    assert!(msg.contains("more than any file"), "{msg}");
    // Broadcast views of a small storage stay allowed (torch.zeros(1).expand(1000)).
    unpickle(&tensor_pickle(1, 0, &[1000], &[0])).unwrap();
}

#[test]
fn an_unsupported_persistent_id_is_not_printed_whole() {
    let big = "x".repeat(1 << 20);
    let mut p = vec![0x80, 2, b'X'];
    p.extend_from_slice(&(big.len() as u32).to_le_bytes());
    p.extend_from_slice(big.as_bytes());
    p.extend_from_slice(&[0x85, b'Q', b'.']);
    let msg = format_error(unpickle(&p));
    assert!(msg.len() < 1000, "{} bytes of message", msg.len());
}

/// A stored zip; `declared` overrides an entry's size with a zip64 field (the data stay as given).
fn zip_stored(entries: &[(&str, &[u8], Option<u64>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data, declared) in entries {
        let offset = out.len() as u32;
        let (size32, extra) = match declared {
            Some(n) => {
                let mut e = vec![1, 0, 16, 0];
                e.extend_from_slice(&n.to_le_bytes());
                e.extend_from_slice(&n.to_le_bytes());
                (u32::MAX, e)
            }
            None => (data.len() as u32, Vec::new()),
        };
        let c = crc32fast::hash(data);
        out.extend_from_slice(&[0x50, 0x4b, 3, 4, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(data);
        central.extend_from_slice(&[0x50, 0x4b, 1, 2, 45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&c.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 10]); // comment length, disk, internal and external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
        central.extend_from_slice(&extra);
    }
    let dir_at = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&[0x50, 0x4b, 5, 6, 0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&dir_at.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

#[test]
fn the_hand_built_zip_is_a_valid_checkpoint() {
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let pkl = tensor_pickle(4, 0, &[2, 2], &[2, 1]);
    let z = zip_stored(&[("a/data.pkl", &pkl, None), ("a/data/0", &data, None)]);
    let ck = load_bytes(&z).unwrap();
    assert_eq!(
        ck.state_dict.get("w").unwrap().to_f32_vec(),
        [1.0, 2.0, 3.0, 4.0]
    );
}

#[test]
fn a_zip64_entry_declaring_a_terabyte_is_refused_before_allocating() {
    let pkl = tensor_pickle(4, 0, &[4], &[1]);
    for declared in [1u64 << 40, 1 << 63] {
        let z = zip_stored(&[
            ("a/data.pkl", &pkl, None),
            ("a/data/0", &[0u8; 16], Some(declared)),
        ]);
        let msg = load_bytes(&z).unwrap_err().to_string();
        assert!(
            msg.contains("declares") || msg.contains("zip"),
            "{declared}: {msg}"
        );
        let z = zip_stored(&[
            ("a/data.pkl", &pkl, Some(declared)),
            ("a/data/0", &[0u8; 16], None),
        ]);
        load_bytes(&z).unwrap_err();
    }
}

#[test]
fn duplicate_entry_names_are_ambiguous_and_refused() {
    let pkl = tensor_pickle(4, 0, &[4], &[1]);
    let other = tensor_pickle(4, 0, &[2, 2], &[2, 1]);
    let z = zip_stored(&[
        ("a/data.pkl", &pkl, None),
        ("a/data/0", &[0u8; 16], None),
        ("a/data.pkl", &other, None),
    ]);
    let msg = load_bytes(&z).unwrap_err().to_string();
    assert!(msg.contains("two entries named `a/data.pkl`"), "{msg}");
}

#[test]
fn a_file_error_names_the_file_once_and_its_cause_once() {
    let dir = tempdir();
    let path = dir.join("bad.pt");
    std::fs::write(&path, zip_stored(&[("a/data.pkl", b"\x80\x02\xff", None)])).unwrap();
    let err = load(&path).unwrap_err();
    let msg = err.to_string();
    assert_eq!(msg.matches("bad.pt").count(), 1, "{msg}");
    assert_eq!(msg.matches("opcode").count(), 1, "{msg}");
    // The message already holds the cause: it is not also a `source` that reporters would print again.
    assert!(std::error::Error::source(&err).is_none(), "{msg}");
}

#[test]
fn safetensors_with_overlapping_or_overflowing_entries_are_refused() {
    let file = |header: &str, data: usize| {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data));
        out
    };
    let ok = file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        16,
    );
    assert_eq!(safetensors::read(&ok).unwrap().len(), 2);
    let overlap = file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        16,
    );
    assert!(safetensors::read(&overlap)
        .unwrap_err()
        .to_string()
        .contains("overlap"));
    let overflow = file(
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}"#,
        0,
    );
    assert!(safetensors::read(&overflow)
        .unwrap_err()
        .to_string()
        .contains("address space"));
    let mut huge_header = (u64::MAX - 4).to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}  ");
    safetensors::read(&huge_header).unwrap_err();
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "pirclip-hostile-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
