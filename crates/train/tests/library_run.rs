//! A training run through the library, without the command line: the example a Rust user copies.
//! Four steps straight and two steps resumed for two more end with the same weights.

use std::path::{Path, PathBuf};

use pirclip_dist::WorldInfo;
use pirclip_model::ModelConfig;
use pirclip_train::optim::Foreach;
use pirclip_train::run::{LabelSource, RunObserver, RunSettings, ScheduleKind};
use pirclip_train::setup::{DataSpec, DistSpec, RunConfig, TrainRun};
use pirclip_train::{AdamWConfig, StepStats, TrainOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny parity PIR model on the bundled mini set, batch 4, the official recipe's optimiser.
fn config(logs: &Path, name: &str, max_steps: i64, resume: Option<&str>) -> RunConfig {
    let mini = root().join("data/rsicd-mini");
    RunConfig {
        model: ModelConfig::from_name_or_path(
            root()
                .join("tests/fixtures/parity/config.json")
                .to_str()
                .unwrap(),
        )
        .unwrap(),
        pretrained: None,
        pretrained_image: false,
        seed: 0,
        data: DataSpec {
            train_data: mini.join("dataset_rsicd_mini.json").display().to_string(),
            images_dir: Some(mini.join("images")),
            train_split: "test".into(),
            dataset_type: Default::default(),
            csv: Default::default(),
            allow_absolute_paths: false,
            train_num_samples: None,
            dataset_resampled: false,
            shuffle_buffer: 5000,
            one_caption_per_image: false,
            shuffle: true,
            augment: Some(Default::default()),
            workers: 1,
            batch_size: 4,
        },
        validation: None,
        options: TrainOptions::default(), // the affiliation loss on
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.2,
        },
        foreach: Foreach::Auto,
        ema_decay: None,
        settings: RunSettings {
            name: name.into(),
            epochs: 1,
            accum_freq: 1,
            lr: 1e-3,
            warmup: 2,
            schedule: ScheduleKind::Cosine,
            max_steps: Some(max_steps),
            profile: None,
            log_every_n_steps: 1,
            save_frequency: 1,
            save_most_recent: false,
            val_frequency: 1,
            label_source: LabelSource::FileName,
            dump_batches: None,
        },
        logs: logs.to_path_buf(),
        resume: resume.map(str::to_string),
        device: tch::Device::Cpu,
        world: WorldInfo {
            local_rank: 0,
            rank: 0,
            world_size: 1,
        },
        dist: DistSpec::default(),
        params: String::new(),
        recipe: "official".into(),
    }
}

/// Keeps what the run reports.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    losses: Vec<f64>,
}

impl RunObserver for Seen {
    fn stepped(&mut self, _step: i64, stats: &StepStats, _samples_per_second: f64) {
        self.losses.push(stats.total);
    }
    fn line(&mut self, line: &str) {
        self.lines.push(line.to_string());
    }
}

/// The tests of this file train one at a time: torch's generator (dropout) is one per process.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn train(c: RunConfig) -> Seen {
    let mut seen = Seen::default();
    let mut run = TrainRun::from_config(c, &mut seen).unwrap();
    run.run(None, &mut seen).unwrap();
    seen
}

fn weights(logs: &Path, name: &str) -> pirclip_checkpoint::StateDict {
    pirclip_checkpoint::load(logs.join(name).join("checkpoints/epoch_latest.pt"))
        .unwrap()
        .state_dict
}

#[test]
fn a_run_through_the_library_trains_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    let logs = std::env::temp_dir().join(format!("pirclip-library-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);

    let straight = train(config(&logs, "straight", 4, None));
    assert_eq!(straight.losses.len(), 4);
    assert!(straight.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    assert!(
        straight
            .lines
            .iter()
            .any(|l| l.starts_with("run straight: model config")),
        "{:?}",
        straight.lines
    );

    let first = train(config(&logs, "resumed", 2, None));
    let second = train(config(&logs, "resumed", 4, Some("latest")));
    assert_eq!(first.losses, straight.losses[..2]);
    assert_eq!(second.losses, straight.losses[2..]);
    assert!(second
        .lines
        .iter()
        .any(|l| l.contains("at epoch 0, batch 2, step 2")));
    let (a, b) = (weights(&logs, "straight"), weights(&logs, "resumed"));
    assert_eq!(a.entries.len(), b.entries.len());
    for ((name, x), (_, y)) in a.entries.iter().zip(&b.entries) {
        assert_eq!(x.bytes, y.bytes, "{name}");
    }
    std::fs::remove_dir_all(&logs).unwrap();
}

/// The same on the pretrained towers (issue #24): a 64-pixel Lite0 + MiniLM CLIP starting from both
/// packages, the image trunk locked with frozen BatchNorm statistics, the text embeddings locked; two
/// steps and two resumed end where four straight do, and the locked tensors are still the packages'.
#[test]
fn a_run_on_the_pretrained_towers_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    let logs = std::env::temp_dir().join(format!("pirclip-towers-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);
    let towers = |name: &str, steps: i64, resume: Option<&str>| {
        let mut c = config(&logs, name, steps, resume);
        c.model = ModelConfig::from_json(
            r#"{"embed_dim": 64,
                "vision_cfg": {"image_size": 64, "timm_model_name": "tf_efficientnet_lite0"},
                "text_cfg": {"hf_model_name": "sentence-transformers/all-MiniLM-L6-v2", "hf_proj_type": "linear", "context_length": 32}}"#,
            "towers-64",
        )
        .unwrap();
        c.pretrained_image = true;
        c.options = TrainOptions {
            lock_image: true,
            lock_image_freeze_bn_stats: true,
            lock_text: true,
            lock_text_unlocked_layers: 6,
            ..TrainOptions::default()
        };
        c.data.batch_size = 2;
        c
    };
    let straight = train(towers("straight", 4, None));
    assert!(straight
        .lines
        .iter()
        .any(|l| l.starts_with("pretrained image tower: efficientnet-lite0")));
    assert!(straight
        .lines
        .iter()
        .any(|l| l.starts_with("pretrained text tower: minilm-l6")));
    let first = train(towers("resumed", 2, None));
    assert_eq!(first.losses, straight.losses[..2]);
    let second = train(towers("resumed", 4, Some("latest")));
    assert_eq!(second.losses, straight.losses[2..]);
    let (a, b) = (weights(&logs, "straight"), weights(&logs, "resumed"));
    for ((name, x), (_, y)) in a.entries.iter().zip(&b.entries) {
        assert_eq!(x.bytes, y.bytes, "{name}");
    }
    let (kept, _) = pirclip_model::pretrained::without_package_tensors(a.clone()).unwrap();
    let left_out: Vec<&str> = a
        .entries
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| kept.get(n).is_none())
        .collect();
    assert!(
        left_out.contains(&"visual.trunk.blocks.3.1.bn2.running_var"),
        "frozen statistics"
    );
    assert!(left_out.contains(&"text.transformer.embeddings.word_embeddings.weight"));
    assert!(!left_out
        .iter()
        .any(|n| n.contains("encoder.layer") || n.starts_with("visual.head")));
    std::fs::remove_dir_all(&logs).unwrap();
}
