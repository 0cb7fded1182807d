//! Mutation fuzzing of every parser a user's file reaches, on stable Rust: `.pt` (zip + pickle), the
//! pickle alone, safetensors, npy, webdataset tar, Karpathy JSON, CSV, JPEG and PNG decode, the
//! tokenizer, every file of an index folder (embedding part, metadata part, index.json, inverted lists,
//! HNSW graph with its checksum recomputed so that mutations reach the graph check, and its sidecar),
//! and scenes (TIFF/GeoTIFF in strips and tiles, PNG) through the bounded scene reader. Valid files are mutated (bit flips, interesting bytes, truncation, insertion, deletion,
//! duplicated chunks, length fields set to extreme values), seeded, for a time box per format. Every input
//! must return (Ok or Err) without a panic, within a time bound, and allocating within a bound (a counting
//! global allocator, per thread).
//!
//! CI runs a few seconds per format. The long run: `PIRCLIP_FUZZ_SECONDS=300 cargo test --release -p
//! pirclip-data --test fuzz -- --nocapture` (or `PIRCLIP_FUZZ_LONG=1 scripts/test.sh`, 120 s per format);
//! `PIRCLIP_FUZZ_EXECUTIONS=10000000` runs that many inputs per format instead of a time box, and
//! `PIRCLIP_FUZZ_FORMATS=ivf,hnsw` runs only those formats (a campaign split over processes).
//! A failing input is written to `target/fuzz-failures/` and named in the failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Counting;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = CURRENT.try_with(|c| {
        let v = c.get().saturating_add(n);
        c.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get().saturating_sub(n)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most a single input may allocate beyond what was live before it (Rust allocations of this thread).
const ALLOCATION_BOUND: usize = 256 << 20;
/// Longest a single input may take: a hang, not a slow path.
const TIME_BOUND: Duration = Duration::from_secs(5);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four random mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    const INTERESTING: [u64; 10] = [
        0,
        1,
        0x7f,
        0x80,
        0xff,
        0xffff,
        0x7fff_ffff,
        0xffff_ffff,
        1 << 63,
        u64::MAX,
    ];
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = m.len();
        match rng.below(8) {
            0 if len > 0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(len);
                    m[i] ^= 1 << rng.below(8);
                }
            }
            1 if len > 0 => {
                let i = rng.below(len);
                m[i] = INTERESTING[rng.below(5)] as u8;
            }
            2 => m.truncate(rng.below(len + 1)),
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                m.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                m.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(512));
                let chunk = m[at..at + n].to_vec();
                let to = rng.below(len + 1);
                m.splice(to..to, chunk);
            }
            6 | 7 if len >= 8 => {
                // A length/offset/size field: 2, 4 or 8 bytes, either endianness, set to an extreme.
                let width = [2, 4, 8][rng.below(3)];
                let at = rng.below(len - width + 1);
                let v = match rng.below(3) {
                    0 => INTERESTING[rng.below(INTERESTING.len())],
                    1 => len as u64 + rng.below(3) as u64 - 1,
                    _ => rng.next(),
                };
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let take = if bytes[0] == 0 && width < 8 {
                    &bytes[8 - width..]
                } else {
                    &bytes[..width]
                };
                m[at..at + width].copy_from_slice(take);
            }
            _ => {}
        }
    }
    m
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seconds_per_format() -> f64 {
    if let Some(s) = std::env::var("PIRCLIP_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    if std::env::var_os("PIRCLIP_FUZZ_LONG").is_some() {
        120.0
    } else {
        3.0
    }
}

/// Whether `format` is to be fuzzed in this run (`PIRCLIP_FUZZ_FORMATS`, all by default).
fn selected(format: &str) -> bool {
    std::env::var("PIRCLIP_FUZZ_FORMATS")
        .map(|list| list.split(',').any(|f| f.trim() == format))
        .unwrap_or(true)
}

fn past_findings(format: &str) -> Vec<Vec<u8>> {
    let dir = root().join("tests/fixtures/fuzz");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(format)?.strip_prefix('-'))
            // No further '-': `hnsw-x.bin` is not a finding of `hnsw-sidecar`'s, nor the reverse.
            .is_some_and(|rest| rest.ends_with(".bin") && !rest.contains('-'))
    });
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `parse` on mutations of the seeds until the time box closes (or, with
/// `PIRCLIP_FUZZ_EXECUTIONS`, until that many inputs ran); returns the executions.
fn fuzz(format: &str, seeds: &[Vec<u8>], parse: impl Fn(&[u8])) -> usize {
    assert!(!seeds.is_empty());
    if !selected(format) {
        return 0;
    }
    // Inputs that once failed (tests/fixtures/fuzz/<format>-<name>.bin) run first, as seeds.
    let found = past_findings(format);
    let seeds = &[found, seeds.to_vec()].concat();
    let target: Option<usize> = std::env::var("PIRCLIP_FUZZ_EXECUTIONS")
        .ok()
        .and_then(|s| s.parse().ok());
    let budget = Duration::from_secs_f64(seconds_per_format());
    let mut rng = Rng(0x5eed_0000
        ^ format
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        | 1);
    let started = Instant::now();
    let mut executions = 0;
    // In a long campaign each input is kept until it returns, so that one that kills the process
    // (a crash inside a C++ library) is left behind to reproduce.
    let in_flight = target.map(|_| scratch(&format!("in-flight-{format}.bin")));
    // The seeds themselves first, then mutations.
    let inputs = seeds.iter().cloned().chain(std::iter::repeat_with(|| {
        let seed = &seeds[rng.below(seeds.len())];
        mutate(seed, &mut rng)
    }));
    for input in inputs {
        let done = match target {
            Some(n) => executions >= n.max(seeds.len()),
            None => executions >= seeds.len() && started.elapsed() > budget,
        };
        if done {
            break;
        }
        if target.is_some() && executions % 1_000_000 == 0 && executions > 0 {
            println!(
                "fuzz {format}: {executions} executions, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(path) = &in_flight {
            std::fs::write(path, &input).unwrap();
        }
        let live = CURRENT.with(Cell::get);
        PEAK.with(|p| p.set(live));
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input)));
        let took = t.elapsed();
        let peak = PEAK.with(Cell::get) - live;
        let failure = match outcome {
            Err(payload) => Some(format!(
                "panicked: {}",
                payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
            Ok(()) if took > TIME_BOUND => Some(format!("took {took:?}")),
            Ok(()) if peak > ALLOCATION_BOUND => Some(format!("allocated {} MB", peak >> 20)),
            Ok(()) => None,
        };
        if let Some(why) = failure {
            let dir = root().join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{format}-{executions}.bin"));
            let _ = std::fs::write(&path, &input);
            let message = format!(
                "{format}: input {executions} {why}; saved as {}",
                path.display()
            );
            // The quiet hook set for caught panics would swallow this one's message.
            eprintln!("{message}");
            panic!("{message}");
        }
        executions += 1;
    }
    println!(
        "fuzz {format}: {executions} executions in {:.1} s, no panic, none over {:?} or {} MB",
        started.elapsed().as_secs_f64(),
        TIME_BOUND,
        ALLOCATION_BOUND >> 20
    );
    executions
}

/// The bytes of a stored zip entry whose name ends with `suffix` (local header scan; fixtures only).
fn stored_entry(zip: &[u8], suffix: &str) -> Vec<u8> {
    let mut at = 0;
    while at + 30 <= zip.len() && zip[at..at + 4] == [0x50, 0x4b, 3, 4] {
        let u16_at = |i: usize| u16::from_le_bytes([zip[at + i], zip[at + i + 1]]) as usize;
        let size = u32::from_le_bytes(zip[at + 18..at + 22].try_into().unwrap()) as usize;
        let (name_len, extra_len) = (u16_at(26), u16_at(28));
        let name = &zip[at + 30..at + 30 + name_len];
        let data = at + 30 + name_len + extra_len;
        if name.ends_with(suffix.as_bytes()) {
            return zip[data..data + size].to_vec();
        }
        at = data + size;
    }
    panic!("no entry {suffix}")
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(root().join(p)).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    // Memory-backed where there is one: the index formats write a file per input.
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("pirclip-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Writes the input where a path-taking parser reads it.
fn via_file(name: &str, input: &[u8], parse: impl Fn(&Path)) {
    let path = scratch(name);
    std::fs::write(&path, input).unwrap();
    parse(&path);
}

/// A valid 8×6 RGB PNG with stored (uncompressed) deflate blocks.
fn small_png() -> Vec<u8> {
    let (w, h) = (8u32, 6u32);
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0); // filter: none
        for x in 0..w {
            raw.extend_from_slice(&[(x * 30) as u8, (y * 40) as u8, 128]);
        }
    }
    let mut z = vec![0x78, 0x01, 1];
    z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    z.extend_from_slice(&raw);
    let adler = {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    };
    z.extend_from_slice(&adler.to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}

#[test]
fn fuzz_every_parser_a_users_file_reaches() {
    // Caught panics are reported by the harness with their input; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    // Bound what a mutated image header may legitimately claim, so the allocation bound applies.
    pirclip_image::set_max_pixels(4 << 20);
    let mut total = 0;

    let pts: Vec<Vec<u8>> = [
        "tests/fixtures/checkpoints/dtypes_strides.pt",
        "tests/fixtures/checkpoints/weird stem name.pt",
        "tests/fixtures/checkpoints/malicious.pt",
        // The legacy (non-zip) format: pickles and raw storages one after another.
        "tests/fixtures/checkpoints/legacy_views.pth",
    ]
    .iter()
    .map(|p| read(p))
    .collect();
    total += fuzz("pt", &pts, |b| {
        let _ = pirclip_checkpoint::load_bytes(b);
    });
    let pickles: Vec<Vec<u8>> = pts[..3]
        .iter()
        .map(|z| stored_entry(z, "data.pkl"))
        .collect();
    total += fuzz("pickle", &pickles, |b| {
        let _ = pirclip_checkpoint::pickle::unpickle(b);
    });

    let mut sd = pirclip_checkpoint::StateDict::default();
    sd.insert(
        "a.weight",
        pirclip_checkpoint::TensorData::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]),
    );
    sd.insert(
        "b",
        pirclip_checkpoint::TensorData::from_i64(vec![2], &[7, 8]),
    );
    let st = pirclip_checkpoint::safetensors::write_bytes(&sd, &[("format", "pt")]);
    total += fuzz("safetensors", &[st], |b| {
        let _ = pirclip_checkpoint::load_bytes(b);
    });

    let npys: Vec<Vec<u8>> = [
        "tests/fixtures/parity/belief.npy",
        "tests/fixtures/parity/tokens.npy",
    ]
    .iter()
    .map(|p| read(p))
    .collect();
    total += fuzz("npy", &npys, |b| {
        let _ = pirclip_checkpoint::npy::read_bytes(b);
    });

    let jpeg = read("tests/fixtures/airport_224.jpg");
    let shard_dir = scratch("shard-seed");
    std::fs::create_dir_all(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("a_1.jpg"), &jpeg).unwrap();
    let inputs: Vec<pirclip_data::shards::ShardInput> = (0..2)
        .map(|i| pirclip_data::shards::ShardInput {
            image_path: shard_dir.join("a_1.jpg"),
            caption: format!("caption {i}"),
            name: "a_1.jpg".into(),
            label: Some("a".into()),
        })
        .collect();
    let (shards, _) =
        pirclip_data::shards::write_shards(&inputs, &shard_dir.join("out"), 10, |_| {}).unwrap();
    total += fuzz("tar", &[std::fs::read(&shards[0]).unwrap()], |b| {
        via_file("shard.tar", b, |p| {
            if let Ok((samples, _, _)) =
                pirclip_data::shards::read_shards_indexed(&[p.to_path_buf()])
            {
                for s in samples.iter().take(2) {
                    let _ = pirclip_data::train::load_image(&s.image);
                }
            }
        })
    });

    total += fuzz(
        "karpathy-json",
        &[read("data/rsicd-mini/dataset_rsicd_mini.json")],
        |b| {
            via_file("d.json", b, |p| {
                if let Ok(ds) = pirclip_data::karpathy::Dataset::load(p) {
                    let set = pirclip_data::karpathy::RetrievalSet::build(&ds, &["test", "train"]);
                    let _ = set.image_paths(Path::new("/nonexistent"));
                }
            })
        },
    );

    let csv =
        b"filepath\ttitle\nimgs/airport_1.jpg\ta caption\nb/beach_2.jpg\tanother one\n".to_vec();
    total += fuzz("csv", &[csv], |b| {
        via_file("t.csv", b, |p| {
            let _ = pirclip_data::train::samples_from_csv(
                p,
                "filepath",
                "title",
                '\t',
                Path::new("/x"),
                false,
            );
        })
    });

    total += fuzz(
        "jpeg",
        &[jpeg.clone(), read("tests/fixtures/franz-kafka.jpg")],
        |b| {
            if let Ok(img) = pirclip_image::decode(b, "fuzz.jpg") {
                let _ = pirclip_image::preprocess_eval(&img, 32);
            }
        },
    );
    total += fuzz("png", &[small_png()], |b| {
        if let Ok(img) = pirclip_image::decode(b, "fuzz.png") {
            let _ = pirclip_image::preprocess_eval(&img, 32);
        }
    });

    let tok = pirclip_text::Tokenizer::new();
    let captions: Vec<Vec<u8>> = [
        "Many planes are parked next to a long building in an airport.",
        "It's 3 storage-tanks &amp; a   pond",
        "Ünïcödé — “quotes” and emoji 🛩️ near the runway",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    total += fuzz("tokenizer", &captions, |b| {
        let _ = tok.tokenize(&String::from_utf8_lossy(b), 77);
    });
    total += fuzz_index_folders();
    total += fuzz_scenes();
    println!("fuzz: {total} executions over the formats run");
    let _ = std::fs::remove_dir_all(scratch("x").parent().unwrap());
}

/// A small index folder (`rows` rows of dimension 8) with inverted lists or a graph, as seeds.
fn seed_index(root: &Path, rows: usize, ann: Option<pirclip_store::AnnConfig>) {
    let _ = std::fs::remove_dir_all(root);
    let identity = pirclip_store::Identity {
        model: "m".into(),
        config: serde_json::json!({"embed_dim": 8}),
        checkpoint: "c".into(),
        checkpoint_sha256: "aa".into(),
        dim: 8,
        scene: pirclip_store::SceneSettings {
            tile: Some(224),
            tile_stride: Some(160),
            bands: Some([3, 2, 1]),
        },
        image_roots: vec!["/images".into()],
    };
    let dir = pirclip_store::IndexDir::open_or_create(root, identity).unwrap();
    let entries: Vec<pirclip_store::Entry> = (0..rows)
        .map(|i| pirclip_store::Entry {
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
    let values: Vec<f32> = (0..rows * 8)
        .map(|i| (i * 7919 % 97) as f32 / 48.0 - 1.0)
        .collect::<Vec<_>>()
        .chunks(8)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
            r.iter().map(move |v| v / n).collect::<Vec<_>>()
        })
        .collect();
    dir.append_part(&entries, &values).unwrap();
    if let Some(c) = ann {
        pirclip_store::update_ann(root, c, 1, &|_, _| {}).unwrap();
    }
}

/// Loads an index folder as search and serve do, and searches it.
fn load_and_search(root: &Path) {
    if let Ok(index) = pirclip_store::LoadedIndex::load(root) {
        let q = [0.35355338f32; 8];
        if let Ok(hits) = index.search(&q, 1 << 40) {
            for (row, _) in hits {
                let _ = &index.entries[row];
                let _ = index.store.vector(row);
            }
        }
    }
}

fn fuzz_index_folders() -> usize {
    use pirclip_store::{AnnConfig, AnnOptions, IvfOptions};
    let mut total = 0;
    let seeds = scratch("index-seeds");
    let (exact, ivf, hnsw) = (seeds.join("exact"), seeds.join("ivf"), seeds.join("hnsw"));
    seed_index(&exact, 6, None);
    seed_index(
        &ivf,
        40,
        Some(AnnConfig::Ivf(IvfOptions {
            lists: 0,
            probes: 0,
        })),
    );
    seed_index(&hnsw, 40, Some(AnnConfig::Hnsw(AnnOptions::default())));
    // Each input replaces one file of a copy of a seed folder, made once per format (loading
    // writes nothing, so the other files stay as the seed has them).
    let target = scratch("index");
    let copy_seed = |seed: &Path| {
        let _ = std::fs::remove_dir_all(&target);
        for f in [
            "index.json",
            "img_emb/img_emb_0.npy",
            "metadata/metadata_0.parquet",
            "image.ivf",
            "image.usearch",
            "image.usearch.json",
        ] {
            let from = seed.join(f);
            if from.is_file() {
                std::fs::create_dir_all(target.join(f).parent().unwrap()).unwrap();
                std::fs::copy(&from, target.join(f)).unwrap();
            }
        }
    };
    let with_file = |file: &str, input: &[u8], fix: &dyn Fn(&Path, &[u8])| {
        std::fs::write(target.join(file), input).unwrap();
        fix(&target, input);
        load_and_search(&target);
    };
    let none = |_: &Path, _: &[u8]| {};
    for (format, seed, file) in [
        ("index-npy", &exact, "img_emb/img_emb_0.npy"),
        ("index-parquet", &exact, "metadata/metadata_0.parquet"),
        ("index-json", &exact, "index.json"),
        ("ivf", &ivf, "image.ivf"),
        ("hnsw-sidecar", &hnsw, "image.usearch.json"),
    ] {
        let bytes = std::fs::read(seed.join(file)).unwrap();
        copy_seed(seed);
        total += fuzz(format, &[bytes], |b| with_file(file, b, &none));
    }
    // The graph with its checksum recomputed: a checksum proves integrity, not validity, so these
    // inputs reach the graph check and, past it, usearch itself.
    let graph = std::fs::read(hnsw.join("image.usearch")).unwrap();
    let recompute = |root: &Path, input: &[u8]| {
        let side = root.join("image.usearch.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&side).unwrap()).unwrap();
        v["crc32"] = crc32fast::hash(input).into();
        std::fs::write(&side, v.to_string()).unwrap();
    };
    copy_seed(&hnsw);
    total += fuzz("hnsw", &[graph], |b| {
        with_file("image.usearch", b, &recompute)
    });
    total
}

/// A `w × h` TIFF of `bands` 16-bit bands, in strips of `rows` rows or (with `tile`) 16 × 16 tiles,
/// with GeoTIFF tags and a NoData value: the headers and layouts the scene reader walks.
fn small_tiff(w: u32, h: u32, bands: u16, tile: bool, planar: bool) -> Vec<u8> {
    let (cw, ch) = if tile { (16, 16) } else { (w, 3) };
    let (across, down) = (w.div_ceil(cw), h.div_ceil(ch));
    let planes = if planar { bands as u32 } else { 1 };
    let per_chunk =
        (cw * if tile { ch } else { ch } * if planar { 1 } else { bands as u32 } * 2) as usize;
    let chunks = (across * down * planes) as usize;
    let mut out = b"II*\0".to_vec();
    let data_at = 8u32;
    out.extend(0u32.to_le_bytes()); // the directory's offset, set by append_ifd
    for c in 0..chunks {
        out.extend(
            (0..per_chunk / 2).flat_map(|i| (((c * 131 + i * 17) % 4000) as u16).to_le_bytes()),
        );
    }
    let s = |v: u16| v.to_le_bytes().to_vec();
    let l = |v: u32| v.to_le_bytes().to_vec();
    let offsets: Vec<u8> = (0..chunks)
        .flat_map(|c| l(data_at + (c * per_chunk) as u32))
        .collect();
    let counts: Vec<u8> = (0..chunks).flat_map(|_| l(per_chunk as u32)).collect();
    let doubles = |v: &[f64]| v.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<u8>>();
    let mut e: Vec<(u16, u16, u32, Vec<u8>)> = vec![
        (256, 4, 1, l(w)),
        (257, 4, 1, l(h)),
        (
            258,
            3,
            bands as u32,
            (0..bands).flat_map(|_| s(16)).collect(),
        ),
        (259, 3, 1, s(1)),
        (262, 3, 1, s(if bands == 3 { 2 } else { 1 })),
        (277, 3, 1, s(bands)),
        (284, 3, 1, s(if planar { 2 } else { 1 })),
        (
            339,
            3,
            bands as u32,
            (0..bands).flat_map(|_| s(1)).collect(),
        ),
        (33550, 12, 3, doubles(&[0.6, 0.6, 0.0])),
        (
            33922,
            12,
            6,
            doubles(&[0.0, 0.0, 0.0, 500000.0, 4100000.0, 0.0]),
        ),
        (
            34735,
            3,
            12,
            [1u16, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32633]
                .iter()
                .flat_map(|k| k.to_le_bytes())
                .collect(),
        ),
        (42113, 2, 2, b"0\0".to_vec()),
    ];
    if tile {
        e.extend([
            (322, 3, 1, s(cw as u16)),
            (323, 3, 1, s(ch as u16)),
            (324, 4, chunks as u32, offsets),
            (325, 4, chunks as u32, counts),
        ]);
    } else {
        e.extend([
            (273, 4, chunks as u32, offsets),
            (278, 3, 1, s(ch as u16)),
            (279, 4, chunks as u32, counts),
        ]);
    }
    if bands > 3 {
        e.push((
            338,
            3,
            (bands - 3) as u32,
            (3..bands).flat_map(|_| s(0)).collect(),
        ));
    }
    pirclip_image::tiff_header::append_ifd(&mut out, &mut e);
    out
}

fn fuzz_scenes() -> usize {
    let decode = |b: &[u8], opts: &pirclip_image::SceneOptions| {
        if let Ok(mut r) =
            pirclip_image::SceneReader::new(std::io::Cursor::new(b), "fuzz.tif", opts)
        {
            if let Some(r) = r.as_mut() {
                let (w, h) = (r.width, r.height);
                let _ = r.read_window(pirclip_image::Window {
                    x: w / 3,
                    y: h / 3,
                    width: (w / 2).max(1),
                    height: (h / 2).max(1),
                });
            }
        }
        if let Ok(scene) = pirclip_image::decode_scene(b, "fuzz.tif", opts) {
            let _ = pirclip_image::preprocess_eval(&scene.image, 32);
        }
    };
    let tiffs = vec![
        small_tiff(37, 29, 3, false, false),
        small_tiff(37, 29, 4, true, false),
        small_tiff(33, 17, 4, true, true),
        small_tiff(20, 9, 1, false, true),
    ];
    let mut total = fuzz("tiff-scene", &tiffs, |b| {
        decode(b, &Default::default());
        decode(
            b,
            &pirclip_image::SceneOptions {
                bands: Some([4, 3, 2]),
            },
        );
    });
    total += fuzz("png-scene", &[small_png()], |b| {
        decode(b, &Default::default())
    });
    total
}
