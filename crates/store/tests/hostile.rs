//! Index folders as someone else may hand them over: every file of one crafted, and each refused with
//! a reason (or searched safely), never a panic, a crash, a hang or an allocation by a declared size.

use std::path::{Path, PathBuf};

use pirclip_store::{
    update_ann, AnnConfig, AnnOptions, Entry, Identity, IndexDir, IvfOptions, LoadedIndex,
    SceneSettings,
};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("pirclip-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const DIM: usize = 8;

fn identity() -> Identity {
    Identity {
        model: "m".into(),
        config: serde_json::json!({}),
        checkpoint: "c".into(),
        checkpoint_sha256: "aa".into(),
        dim: DIM,
        scene: SceneSettings::default(),
        image_roots: Vec::new(),
    }
}

/// Unit rows of dimension `DIM`, reproducible.
fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut out = Vec::new();
    for _ in 0..n {
        let row: Vec<f32> = (0..DIM)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 1000) as f32 / 500.0 - 1.0
            })
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        out.extend(row.iter().map(|v| v / norm));
    }
    out
}

/// A valid index of `n` rows in one part.
fn index(root: &Path, n: usize) {
    let dir = IndexDir::open_or_create(root, identity()).unwrap();
    let entries: Vec<Entry> = (0..n)
        .map(|i| Entry {
            image_path: format!("/images/{i}.jpg"),
            size: 1,
            mtime: 2,
            ..Default::default()
        })
        .collect();
    dir.append_part(&entries, &rows(n, 7)).unwrap();
}

fn load_error(root: &Path) -> String {
    match LoadedIndex::load(root) {
        Ok(_) => panic!("{} was loaded", root.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn index_json_fields_are_held_to_the_clis_ranges() {
    let s = Scratch::new("json");
    let root = s.0.join("i");
    index(&root, 4);
    let meta = root.join("index.json");
    let good = std::fs::read(&meta).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("dim", serde_json::json!(0), "dim 0"),
        ("dim", serde_json::json!(1u64 << 40), "outside"),
        ("scene", serde_json::json!({"tile": 0}), "scene.tile 0"),
        ("scene", serde_json::json!({"tile": 1}), "scene.tile 1"),
        (
            "scene",
            serde_json::json!({"tile": 224, "tile_stride": 0}),
            "tile_stride 0",
        ),
        ("scene", serde_json::json!({"bands": [0, 1, 2]}), "bands"),
        (
            "image_roots",
            serde_json::json!(["relative/dir"]),
            "plain absolute",
        ),
        (
            "image_roots",
            serde_json::json!(["/a/../etc"]),
            "plain absolute",
        ),
    ];
    for (field, value, says) in cases {
        std::fs::write(&meta, &good).unwrap();
        edit_json(&meta, |v| v[field] = value.clone());
        let e = load_error(&root);
        assert!(e.contains(says), "{field} = {value}: {e}");
    }
    // A 50 MB name: refused, and the message does not echo it.
    std::fs::write(&meta, &good).unwrap();
    edit_json(&meta, |v| v["model"] = "x".repeat(50 << 20).into());
    let e = load_error(&root);
    assert!(e.len() < 1000, "a {} byte message", e.len());
    // A 50 MB wrong-typed field: serde's message would quote it whole.
    std::fs::write(&meta, &good).unwrap();
    edit_json(&meta, |v| v["dim"] = "9".repeat(3 << 20).into());
    let e = load_error(&root);
    assert!(e.len() < 1000, "a {} byte message", e.len());
    // A dimension that disagrees with the parts.
    std::fs::write(&meta, &good).unwrap();
    edit_json(&meta, |v| v["dim"] = 16.into());
    assert!(load_error(&root).contains("expected [n, 16]"));
}

#[test]
fn embedding_parts_must_be_float_rows_of_the_declared_size() {
    let s = Scratch::new("npy");
    let root = s.0.join("i");
    index(&root, 4);
    let npy = root.join("img_emb/img_emb_0.npy");
    let good = std::fs::read(&npy).unwrap();
    let write =
        |t: &pirclip_checkpoint::TensorData| pirclip_checkpoint::npy::write(&npy, t).unwrap();
    // int64 rows of the right shape were searched as if they were floats.
    write(&pirclip_checkpoint::TensorData::from_i64(
        vec![4, DIM],
        &[1; 4 * DIM],
    ));
    assert!(
        load_error(&root).contains("int64 embeddings"),
        "{}",
        load_error(&root)
    );
    // A shape whose size overflows.
    let mut bytes = good.clone();
    let at = bytes.windows(6).position(|w| w == b"(4, 8)").unwrap();
    bytes.splice(at..at + 6, b"(4611686018427387904, 8)".iter().copied());
    let header = (bytes.len() - 10 - 4 * DIM * 2) as u16;
    bytes[8..10].copy_from_slice(&header.to_le_bytes());
    std::fs::write(&npy, &bytes).unwrap();
    assert!(
        load_error(&root).contains("larger than memory"),
        "{}",
        load_error(&root)
    );
    // Truncated, or longer than its header says.
    std::fs::write(&npy, &good[..good.len() - 3]).unwrap();
    assert!(load_error(&root).contains("bytes, but its header calls for"));
    let mut long = good.clone();
    long.extend([0u8; 64]);
    std::fs::write(&npy, &long).unwrap();
    assert!(load_error(&root).contains("bytes, but its header calls for"));
    // More rows than the metadata has.
    write(&pirclip_checkpoint::TensorData::from_f32(
        vec![5, DIM],
        &rows(5, 1),
    ));
    assert!(
        load_error(&root).contains("has 5 embeddings"),
        "{}",
        load_error(&root)
    );
    std::fs::write(&npy, &good).unwrap();
    assert_eq!(LoadedIndex::load(&root).unwrap().entries.len(), 4);
}

#[test]
fn non_finite_rows_are_refused_when_written_and_skipped_when_found() {
    let s = Scratch::new("nan");
    let root = s.0.join("i");
    index(&root, 4);
    let dir = IndexDir::open(&root).unwrap();
    let mut bad = rows(2, 3);
    bad[DIM + 1] = f32::NAN;
    let two = |n: &str| Entry {
        image_path: n.into(),
        ..Default::default()
    };
    let e = dir
        .append_part(&[two("/a"), two("/b")], &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/b") && e.contains("not a number"), "{e}");
    assert_eq!(dir.parts(), [0], "nothing written");
    // A part written elsewhere with a NaN row: loaded with a warning, never a result.
    let mut values = rows(4, 7);
    values[2 * DIM] = f32::NAN;
    let halves: Vec<u8> = values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let t =
        pirclip_checkpoint::TensorData::new(pirclip_checkpoint::DType::F16, vec![4, DIM], halves)
            .unwrap();
    pirclip_checkpoint::npy::write(root.join("img_emb/img_emb_0.npy"), &t).unwrap();
    let loaded = LoadedIndex::load(&root).unwrap();
    assert!(loaded.warnings[0].contains("1 rows hold values that are not numbers"));
    for q in rows(5, 11).chunks(DIM) {
        let hits = loaded.search(q, 10).unwrap();
        assert_eq!(hits.len(), 3);
        assert!(hits.iter().all(|(row, s)| *row != 2 && s.is_finite()));
    }
    // And the approximate index refuses to be built over it.
    let e = update_ann(
        &root,
        AnnConfig::Ivf(IvfOptions {
            lists: 0,
            probes: 0,
        }),
        1,
        &|_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("row 2 holds values that are not numbers"), "{e}");
}

#[test]
fn huge_k_and_wrong_query_widths_cost_nothing_and_are_errors() {
    let s = Scratch::new("k");
    let root = s.0.join("i");
    index(&root, 40);
    for config in [
        None,
        Some(AnnConfig::Ivf(IvfOptions {
            lists: 0,
            probes: 0,
        })),
        Some(AnnConfig::Hnsw(AnnOptions::default())),
    ] {
        if let Some(c) = config {
            update_ann(&root, c, 1, &|_, _| {}).unwrap();
        }
        let loaded = LoadedIndex::load(&root).unwrap();
        let q = &rows(1, 5)[..];
        // 10^12 results asked for: 40 given, nothing reserved for the rest.
        assert_eq!(loaded.search(q, 1_000_000_000_000).unwrap().len(), 40);
        assert_eq!(loaded.store.search(q, usize::MAX).unwrap().len(), 40);
        let e = loaded.search(&q[..3], 5).unwrap_err().to_string();
        assert!(
            e.contains("3 values, the index 8"),
            "{}: {e}",
            loaded.search_kind
        );
    }
}

/// The parts of a usearch graph file this test edits, found as `check_graph` walks it.
fn graph_layout(bytes: &[u8], rows: usize, dim: usize) -> (usize, usize, usize) {
    let head = 8 + rows * dim * 2;
    let g = head + 64;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let m0 = u64_at(g + 16);
    let levels = g + 40;
    let first_node = levels + 2 * rows;
    (first_node, m0, levels)
}

fn rewrite_with_checksum(root: &Path, bytes: &[u8]) {
    std::fs::write(root.join("image.usearch"), bytes).unwrap();
    edit_json(&root.join("image.usearch.json"), |v| {
        v["crc32"] = crc32fast::hash(bytes).into()
    });
}

#[test]
fn a_crafted_graph_with_a_matching_checksum_is_refused_before_usearch_reads_it() {
    let s = Scratch::new("graph");
    let root = s.0.join("i");
    let n = 60;
    index(&root, n);
    update_ann(&root, AnnConfig::Hnsw(AnnOptions::default()), 1, &|_, _| {}).unwrap();
    let graph = root.join("image.usearch");
    let good = std::fs::read(&graph).unwrap();
    let (node, m0, _) = graph_layout(&good, n, DIM);
    assert!(LoadedIndex::load(&root).is_ok());
    let refused = |bytes: &[u8], says: &str| {
        rewrite_with_checksum(&root, bytes);
        let e = load_error(&root);
        assert!(e.contains(says), "{says}: {e}");
    };
    // A neighbour slot far outside the graph (usearch followed it: SIGSEGV in search and serve).
    let mut b = good.clone();
    let count = u32::from_le_bytes(b[node + 10..node + 14].try_into().unwrap());
    assert!(count > 0 && (count as usize) <= m0);
    b[node + 14..node + 18].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    refused(&b, "links to node 2147483632");
    // More neighbours than the node has room for.
    let mut b = good.clone();
    b[node + 10..node + 14].copy_from_slice(&(m0 as u32 + 1).to_le_bytes());
    refused(&b, "neighbours on level 0");
    // A key beyond the rows (search answered it; serve indexed its entries with it).
    let mut b = good.clone();
    b[node..node + 8].copy_from_slice(&(n as u64 + 5).to_le_bytes());
    refused(&b, "out of range or repeated");
    // A level that makes the node tapes run past the file.
    let (_, _, levels) = graph_layout(&good, n, DIM);
    let mut b = good.clone();
    b[levels..levels + 2].copy_from_slice(&i16::MAX.to_le_bytes());
    refused(&b, "level");
    // Bytes after the last node, and a file cut short.
    let mut b = good.clone();
    b.extend([0u8; 16]);
    refused(&b, "after the last node");
    refused(&good[..good.len() - 8], "shorter than its own layout");
    // The sidecar's search options: an efSearch of 10^12 was searched and gave nothing, exit 0.
    rewrite_with_checksum(&root, &good);
    edit_json(&root.join("image.usearch.json"), |v| {
        v["options"]["expansion_search"] = 1_000_000_000_000u64.into()
    });
    assert!(load_error(&root).contains("efSearch 1000000000000"));
}

#[test]
fn a_parquet_panic_is_an_error_naming_the_file() {
    let s = Scratch::new("parquet");
    let root = s.0.join("i");
    index(&root, 4);
    let meta = root.join("metadata/metadata_0.parquet");
    let good = std::fs::read(&meta).unwrap();
    // Every single-byte change of the file: refused or read, never a panic that escapes.
    let mut refused = 0;
    for at in 0..good.len() {
        for value in [0x00u8, 0xff, 0x7f] {
            let mut b = good.clone();
            b[at] = value;
            std::fs::write(&meta, &b).unwrap();
            match std::panic::catch_unwind(|| LoadedIndex::load(&root).map(|l| l.entries.len())) {
                Ok(Ok(4)) => {}
                Ok(Ok(n)) => panic!("byte {at} = {value}: {n} entries"),
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("byte {at} = {value}: a panic escaped"),
            }
        }
    }
    assert!(refused > 0);
}

#[test]
fn a_metadata_part_larger_than_its_rows_can_take_is_not_read() {
    let s = Scratch::new("bigmeta");
    let root = s.0.join("i");
    index(&root, 4);
    let meta = root.join("metadata/metadata_0.parquet");
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&meta)
        .unwrap();
    f.set_len(64 << 20).unwrap();
    assert!(load_error(&root).contains("more than such rows can take"));
}

/// The fuzz seed index: 6 rows with tile windows and map points.
fn tiled_index(root: &Path) {
    let dir = IndexDir::open_or_create(root, identity()).unwrap();
    let entries: Vec<Entry> = (0..6)
        .map(|i| Entry {
            image_path: format!("/images/{i}.tif"),
            size: 10,
            mtime: 20,
            tile: Some(pirclip_store::Tile {
                x: i as i64 * 160,
                y: 0,
                width: 224,
                height: 224,
            }),
            geo: Some(pirclip_store::GeoPoint {
                x: 1.5,
                y: 2.5,
                crs: Some("EPSG:32633".into()),
            }),
        })
        .collect();
    dir.append_part(&entries, &rows(6, 3)).unwrap();
}

/// Found by the fuzzer: a 2.2 KB part whose page header declares a list of 2^31 doubles, which the
/// parquet crate skipped one empty read at a time (42 s). Page headers are now walked strictly first.
#[test]
fn a_metadata_part_whose_pages_declare_more_than_they_hold_is_refused() {
    let s = Scratch::new("slowparquet");
    let root = s.0.join("i");
    tiled_index(&root);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/fuzz/index-parquet-42s.bin");
    std::fs::copy(&fixture, root.join("metadata/metadata_0.parquet")).unwrap();
    let e = load_error(&root);
    assert!(
        e.contains("metadata_0.parquet: row group 0, column 3: page at 226"),
        "{e}"
    );
}

/// A page header listing 2^31 − 1 booleans as an unknown field: 3.4 s of the crate's skipping per
/// header before; refused from the count now (a list element takes at least one byte).
#[test]
fn a_page_header_declaring_a_collection_larger_than_the_file_is_refused() {
    let s = Scratch::new("boollist");
    let root = s.0.join("i");
    tiled_index(&root);
    let meta = root.join("metadata/metadata_0.parquet");
    let mut b = std::fs::read(&meta).unwrap();
    // The first page of the first column starts after "PAR1": field 15, a list of bools, 2^31 − 1.
    b[4..11].copy_from_slice(&[0xf9, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07]);
    std::fs::write(&meta, &b).unwrap();
    let e = load_error(&root);
    assert!(e.contains("a collection of 2147483647 elements"), "{e}");
}

/// Found by the fuzzer: a 2.4 KB part whose last schema element's `num_children` is sent with a struct's
/// wire type; the parquet crate reads the field by its id as an i32 anyway and reserved 692 MB for the
/// children it declares. The same count sent as a proper i32 (2^31 − 1 children: 16 GB of reservation)
/// is refused too, as more children than the schema has elements.
#[test]
fn a_footer_declaring_more_schema_children_than_elements_is_refused() {
    let s = Scratch::new("children");
    let root = s.0.join("i");
    tiled_index(&root);
    let meta = root.join("metadata/metadata_0.parquet");
    let good = std::fs::read(&meta).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/fuzz/index-parquet-692mb.bin");
    std::fs::copy(&fixture, &meta).unwrap();
    let e = load_error(&root);
    assert!(e.contains("footer: field 5 of wire type 12"), "{e}");

    // The root element ("metadata", 10 children: zigzag 20) given 2^31 - 1 children, footer resized.
    let n = good.len();
    let len = u32::from_le_bytes(good[n - 8..n - 4].try_into().unwrap()) as usize;
    let footer = &good[n - 8 - len..n - 8];
    let at = footer
        .windows(11)
        .position(|w| w == b"\x48\x08metadata\x15")
        .unwrap()
        + 11;
    assert_eq!(footer[at], 20, "the root's num_children");
    let with_children = |zigzag: &[u8]| {
        let mut crafted = good[..n - 8 - len].to_vec();
        crafted.extend_from_slice(&footer[..at]);
        crafted.extend_from_slice(zigzag);
        crafted.extend_from_slice(&footer[at + 1..]);
        let grown = len + zigzag.len() - 1;
        crafted.extend_from_slice(&(grown as u32).to_le_bytes());
        crafted.extend_from_slice(b"PAR1");
        std::fs::write(&meta, &crafted).unwrap();
        load_error(&root)
    };
    let e = with_children(&[0xfe, 0xff, 0xff, 0xff, 0x0f]); // zigzag(2^31 - 1)
    assert!(
        e.contains("declares 2147483647 children, but the schema has 11 elements"),
        "{e}"
    );
    // zigzag(i64::MIN): a value whose absolute value overflows.
    let e = with_children(&[0xff; 9].iter().copied().chain([0x01]).collect::<Vec<u8>>());
    assert!(e.contains("declares 9223372036854775808 children"), "{e}");
}
