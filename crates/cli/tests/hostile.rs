//! pirclip against index folders, folders of images and command lines that someone else crafted: each
//! case must end with a clear error (exit 1) or a correct answer, within seconds, never a panic (exit
//! 101), a crash (a signal), a hang or an allocation the size of a declared number.
//!
//! `PIRCLIP_BIN=/path/to/an/older/pirclip cargo test --release -p pirclip --test hostile` runs the
//! same cases against another build (how the closing notes show "before").

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pirclip_store::IndexDir;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> PathBuf {
    std::env::var_os("PIRCLIP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pirclip")))
}

/// How a run ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    seconds: f64,
}

impl Outcome {
    fn refused_with(&self, says: &str) -> bool {
        self.code == Some(1) && self.stderr.contains(says)
    }
}

/// Runs pirclip with `args`, killed after `limit`, under a 6 GB address-space limit (a memory bomb
/// then fails instead of taking the machine).
fn run(args: &[&str], limit: Duration) -> Outcome {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -v 6000000; exec \"$0\" \"$@\"")
        .arg(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = Outcome {
        code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout: String::from_utf8_lossy(&reader.join().unwrap()).to_string(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).to_string(),
        seconds: started.elapsed().as_secs_f64(),
    };
    println!(
        "{args:?}: exit {:?} signal {:?}{} in {:.1} s; stderr: {}",
        o.code,
        o.signal,
        if o.timed_out {
            " (killed: too long)"
        } else {
            ""
        },
        o.seconds,
        pirclip_store::clip_text(o.stderr.trim(), 300)
    );
    o
}

const LIMIT: Duration = Duration::from_secs(60);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn mini_images() -> PathBuf {
    root().join("data/rsicd-mini/images")
}

/// An index of the mini set with the bundled model (`ann`: `off`, `ivf` or `hnsw`).
fn build(out: &Path, ann: &str) {
    let mut args = vec![
        "index",
        "build",
        "--images",
        mini_images().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    match ann {
        "off" => args.extend(["--ann".into(), "off".into()]),
        kind => args.extend([
            "--ann".into(),
            "on".into(),
            "--ann-kind".into(),
            kind.into(),
        ]),
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args, Duration::from_secs(300));
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

fn search(index: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec!["search", "--index", index.to_str().unwrap()];
    args.extend(extra);
    args.push("many planes are parked at the airport");
    run(&args, LIMIT)
}

fn npy_rows(index: &Path) -> (usize, usize) {
    let h = pirclip_checkpoint::npy::read_header(index.join("img_emb/img_emb_0.npy")).unwrap();
    (h.shape[0], h.shape[1])
}

fn write_f16(index: &Path, rows: usize, dim: usize, values: &[f32]) {
    let halves: Vec<u8> = values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let t = pirclip_checkpoint::TensorData::new(
        pirclip_checkpoint::DType::F16,
        vec![rows, dim],
        halves,
    )
    .unwrap();
    pirclip_checkpoint::npy::write(index.join("img_emb/img_emb_0.npy"), &t).unwrap();
}

/// Every field of an exact index folder crafted: search refuses each with the reason, or answers.
#[test]
fn search_and_index_add_refuse_crafted_index_folders() {
    let dir = common::TestDir::new("pirclip-hostile");
    let base = dir.join("base");
    build(&base, "off");
    let (n, dim) = npy_rows(&base);
    let case = |name: &str| {
        let p = dir.join(name);
        copy_dir(&base, &p);
        p
    };
    let mut failures = Vec::new();
    let index_add = |p: &Path| {
        let index = p.to_str().unwrap();
        let images = mini_images();
        run(
            &[
                "index",
                "add",
                "--index",
                index,
                "--images",
                images.to_str().unwrap(),
            ],
            LIMIT,
        )
    };
    let mut check = |what: &str, ok: bool, o: &Outcome| {
        if !ok {
            failures.push(format!("{what}: {o:?}"));
        }
    };

    // An npy part whose shape product overflows (was: a panic on the multiply, exit 101).
    let p = case("overflow");
    let npy = p.join("img_emb/img_emb_0.npy");
    let mut bytes = std::fs::read(&npy).unwrap();
    let shape = format!("({n}, {dim})");
    let at = bytes
        .windows(shape.len())
        .position(|w| w == shape.as_bytes())
        .unwrap();
    let huge = format!("(4611686018427387904, {dim})");
    bytes.splice(at..at + shape.len(), huge.bytes());
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + huge.len() - shape.len();
    bytes[8..10].copy_from_slice(&(header as u16).to_le_bytes());
    std::fs::write(&npy, bytes).unwrap();
    let o = search(&p, &[]);
    check(
        "npy shape overflow",
        o.refused_with("larger than memory can address"),
        &o,
    );

    // int64 rows (were searched as if they were floats, exit 0).
    let p = case("int64");
    let t = pirclip_checkpoint::TensorData::from_i64(vec![n, dim], &vec![1; n * dim]);
    pirclip_checkpoint::npy::write(p.join("img_emb/img_emb_0.npy"), &t).unwrap();
    let o = search(&p, &[]);
    check("int64 part", o.refused_with("int64 embeddings"), &o);
    // index add on it (exited 0, adding to an index search refuses).
    let o = index_add(&p);
    check(
        "index add on a damaged index",
        o.refused_with("int64 embeddings"),
        &o,
    );

    // index.json's dim made to agree with its parts but not with the model (an assert_eq! in exact
    // search: exit 101, and HTTP 500 on every query in serve).
    let p = case("dim");
    edit_json(&p.join("index.json"), |v| v["dim"] = 3.into());
    write_f16(&p, n, 3, &vec![0.5; n * 3]);
    let o = search(&p, &[]);
    check(
        "dim disagreeing with the model",
        o.refused_with("3 dimensions"),
        &o,
    );

    // Scene settings outside the CLI's ranges (bands 0 wrapped `band - 1`; tile 1 cut a 224-px image
    // into 50,176 rows).
    for (name, scene, says) in [
        (
            "bands0",
            serde_json::json!({"bands": [0, 1, 2]}),
            "scene.bands",
        ),
        ("tile1", serde_json::json!({"tile": 1}), "scene.tile 1"),
    ] {
        let p = case(name);
        edit_json(&p.join("index.json"), |v| v["scene"] = scene.clone());
        let o = index_add(&p);
        check(name, o.refused_with(says), &o);
    }

    // A 50 MB model name: refused without echoing it.
    let p = case("huge-field");
    edit_json(&p.join("index.json"), |v| {
        v["model"] = "x".repeat(50 << 20).into()
    });
    let o = search(&p, &[]);
    check(
        "50 MB field",
        o.code == Some(1) && o.stderr.len() < 2000,
        &o,
    );

    // NaN rows (ranked first with score NaN): skipped with a warning.
    let p = case("nan");
    let mut values = pirclip_store::IndexDir::open(&p)
        .unwrap()
        .embeddings(0, n)
        .unwrap();
    values[..dim].iter_mut().for_each(|v| *v = f32::NAN);
    write_f16(&p, n, dim, &values);
    let o = search(&p, &["--top-k", "5"]);
    check(
        "NaN rows",
        o.code == Some(0)
            && o.stderr.contains("1 rows hold values that are not numbers")
            && !o.stdout.contains("NaN")
            && o.stdout
                .lines()
                .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
                .count()
                == 5,
        &o,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The approximate indexes crafted: a graph whose checksum was recomputed after its neighbour slots
/// were changed, a sidecar asking for an efSearch of 10^12, and a top-k of 10^12.
#[test]
fn search_refuses_crafted_approximate_indexes_and_huge_k() {
    let dir = common::TestDir::new("pirclip-hostile-ann");
    let mut failures = Vec::new();
    let mut check = |what: &str, ok: bool, o: &Outcome| {
        if !ok {
            failures.push(format!("{what}: {o:?}"));
        }
    };
    let ivf = dir.join("ivf");
    build(&ivf, "ivf");
    let o = search(&ivf, &["--top-k", "1000000000000"]);
    check(
        "top-k 10^12 over inverted lists",
        o.code == Some(0) && o.stdout.contains("60."),
        &o,
    );

    let hnsw = dir.join("hnsw");
    build(&hnsw, "hnsw");
    let (n, dim) = npy_rows(&hnsw);
    let graph = hnsw.join("image.usearch");
    let good = std::fs::read(&graph).unwrap();
    let with_checksum = |bytes: &[u8]| {
        std::fs::write(&graph, bytes).unwrap();
        edit_json(&hnsw.join("image.usearch.json"), |v| {
            v["crc32"] = crc32fast::hash(bytes).into()
        });
    };
    let node = 8 + n * dim * 2 + 64 + 40 + 2 * n;
    // Every level-0 neighbour slot of every node pointed far outside the graph.
    let head = 8 + n * dim * 2 + 64;
    let word = |at: usize| u64::from_le_bytes(good[at..at + 8].try_into().unwrap()) as usize;
    let (m, m0) = (word(head + 8), word(head + 16));
    let levels = 8 + n * dim * 2 + 64 + 40;
    let mut b = good.clone();
    let mut at = node;
    for i in 0..n {
        let level = i16::from_le_bytes([good[levels + 2 * i], good[levels + 2 * i + 1]]) as usize;
        let count = u32::from_le_bytes(b[at + 10..at + 14].try_into().unwrap()) as usize;
        for j in 0..count {
            b[at + 14 + 4 * j..at + 18 + 4 * j]
                .copy_from_slice(&(0x4000_0000u32 + j as u32).to_le_bytes());
        }
        at += 10 + 4 + 4 * m0 + level * (4 + 4 * m);
    }
    with_checksum(&b);
    let o = search(&hnsw, &[]);
    check(
        "graph slots out of range",
        o.refused_with("links to node"),
        &o,
    );
    // Keys beyond the rows.
    let mut b = good.clone();
    b[node..node + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    with_checksum(&b);
    let o = search(&hnsw, &[]);
    check(
        "graph key out of range",
        o.refused_with("out of range or repeated"),
        &o,
    );
    // efSearch 10^12 in the sidecar (an empty result and exit 0).
    with_checksum(&good);
    edit_json(&hnsw.join("image.usearch.json"), |v| {
        v["options"]["expansion_search"] = 1_000_000_000_000u64.into()
    });
    let o = search(&hnsw, &[]);
    check(
        "efSearch 10^12",
        o.refused_with("efSearch 1000000000000"),
        &o,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A folder with symbolic links back up the tree (the walk never ended), and the shell-glob form of
/// `--images` (several values after one flag).
#[test]
fn folder_loops_end_and_images_take_several_values() {
    let dir = common::TestDir::new("pirclip-hostile-walk");
    let tree = dir.join("tree/a/b");
    std::fs::create_dir_all(&tree).unwrap();
    let images: Vec<PathBuf> = std::fs::read_dir(mini_images())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .take(3)
        .collect();
    std::fs::copy(&images[0], tree.join("x.jpg")).unwrap();
    std::os::unix::fs::symlink(dir.join("tree"), tree.join("loop")).unwrap();
    std::os::unix::fs::symlink(dir.join("tree/a"), dir.join("tree/a/up")).unwrap();
    let out = dir.join("idx");
    let o = run(
        &[
            "index",
            "build",
            "--images",
            dir.join("tree").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(
        o.code == Some(0) && o.stdout.contains("1 images found"),
        "{o:?}"
    );
    let roots = IndexDir::open(&out).unwrap().identity.image_roots;
    assert_eq!(
        roots,
        [std::fs::canonicalize(dir.join("tree"))
            .unwrap()
            .display()
            .to_string()]
    );

    let emb = dir.join("emb");
    let mut args = vec!["embed", "--images"];
    args.extend(images.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", emb.to_str().unwrap()]);
    let o = run(&args, LIMIT);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(emb.join("images.txt"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    // explain's panel size is bounded (0 panicked, 60000 allocated 21 GB).
    for size in ["0", "60000"] {
        let o = run(
            &[
                "explain",
                "--image",
                images[0].to_str().unwrap(),
                "--text",
                "a",
                "--out",
                "/dev/null",
                "--size",
                size,
            ],
            LIMIT,
        );
        assert!(o.code == Some(2) && o.stderr.contains("--size"), "{o:?}");
    }
}
