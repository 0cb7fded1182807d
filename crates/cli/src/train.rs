//! `pirclip train`: open_clip's `training.main` flags ([`pirclip_train::params::Params`]) → the run,
//! with a progress bar and retrieval validation through the encode pipeline.

use anyhow::{Context, Result};
use pirclip_model::{ClipModel, EncodeOptions};
use pirclip_train::params::Params;
use pirclip_train::run::{self, RunObserver};
use pirclip_train::setup::TrainRun;

pub use pirclip_train::params::reject_unsupported_open_clip_flags;

pub fn run(a: Params) -> Result<()> {
    let config = a.run_config().map_err(anyhow::Error::msg)?;
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    if let Some(p) = &a.profile {
        // Kineto only logs a file it cannot write; fail now, not after the training.
        std::fs::File::create(p).with_context(|| format!("--profile {}", p.display()))?;
        if std::env::var_os("KINETO_LOG_LEVEL").is_none() {
            // Kineto logs an error when it finds no GPU; level 5 silences its log, not the trace. Set
            // before the loader's threads start, as the environment must be.
            std::env::set_var("KINETO_LOG_LEVEL", "5");
        }
    }
    let belief_mode = config.options.belief_mode;
    if let Some(kind) = config.options.precision.autocast_kind(config.device) {
        crate::common::warn_slow_half_precision(config.device, kind);
    }
    let mut progress = Progress::new(config.world.rank == 0);
    let mut training = TrainRun::from_config(config, &mut progress).map_err(anyhow::Error::msg)?;
    let mut validate = training.validation.clone().map(|(set, images)| {
        move |model: &ClipModel| -> std::result::Result<Vec<(String, f64)>, String> {
            let opts = EncodeOptions {
                bn_mode: pirclip_model::BnMode::Running,
                belief_mode,
                dropout: false,
            };
            let encoded = pirclip_retrieval::encode_set(
                model,
                &set,
                &images,
                opts,
                64,
                &pirclip_retrieval::Quiet,
            )
            .map_err(|e| format!("{e:#}"))?;
            Ok(encoded.metrics(&set, &[1, 5, 10]).official())
        }
    });
    training
        .run(
            validate.as_mut().map(|v| v as &mut run::Validate),
            &mut progress,
        )
        .map_err(anyhow::Error::msg)?;
    progress.bar.finish();
    Ok(())
}

/// The progress bar of a run (rank 0 only; hidden elsewhere).
struct Progress {
    bar: indicatif::ProgressBar,
    is_master: bool,
}

impl Progress {
    fn new(is_master: bool) -> Self {
        let bar = if is_master {
            crate::common::progress(0, "steps")
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>6} [{bar:25}] {pos}/{len} {msg} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        Progress { bar, is_master }
    }
}

impl RunObserver for Progress {
    fn started(&mut self, first: i64, stop_at: i64) {
        self.bar.set_length(stop_at as u64);
        self.bar.set_position(first as u64);
    }

    fn stepped(&mut self, step: i64, s: &pirclip_train::StepStats, samples_per_second: f64) {
        self.bar.set_message(format!(
            "loss {:.4} (con {:.4}{}) lr {:.2e} {samples_per_second:.1} samples/s",
            s.total,
            s.contrastive,
            s.affiliation
                .map(|x| format!(" aff {x:.4}"))
                .unwrap_or_default(),
            s.lr
        ));
        self.bar.set_position(step as u64);
    }

    fn line(&mut self, line: &str) {
        // indicatif prints nothing beside a hidden bar (stderr not a terminal, or another rank's).
        if self.is_master && self.bar.is_hidden() {
            eprintln!("{line}");
        } else if self.is_master {
            self.bar.println(line);
        }
    }
}
