//! open_clip command lines through the library: what `pirclip train` makes of a seed's flags, and the
//! example for a Rust program that launches such runs (`Params` flattened into its own parser).

use clap::Parser;

use pirclip_train::params::{reject_unsupported_open_clip_flags, Params};
use pirclip_train::setup::RunConfig;

#[derive(Parser)]
#[command(args_override_self = true)]
struct Line {
    #[command(flatten)]
    params: Params,
}

fn parse(args: &[&str]) -> Result<RunConfig, String> {
    let line = std::iter::once("train").chain(args.iter().copied());
    Line::try_parse_from(line)
        .map_err(|e| e.to_string())?
        .params
        .run_config()
}

#[test]
fn a_seed_command_line_means_the_official_run() {
    let c = parse(&[
        "--train-data",
        "data/rsitmd/train.csv",
        "--dataset-type",
        "csv",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--csv-separator",
        ",",
        "--batch-size",
        "100",
        "--lr",
        "5e-4",
        "--wd",
        "0.2",
        "--epochs",
        "20",
        "--warmup",
        "1000",
        "--model",
        "ViT-B-32",
        "--is_aff_loss",
        "--lock-instruction",
        "--recipe",
        "official",
        "--report-to",
        "tensorboard",
        "--lr",
        "3e-4",
    ])
    .unwrap();
    assert_eq!(c.data.csv.separator, ',');
    assert_eq!(c.data.batch_size, 100);
    assert_eq!(
        c.settings.lr, 3e-4,
        "a repeated flag takes its last value, as argparse"
    );
    assert_eq!((c.settings.epochs, c.settings.warmup), (20, 1000));
    assert!(c.options.affiliation_loss && c.options.lock_instruction);
    assert_eq!(
        c.ema_decay, None,
        "--recipe official adds no weight average"
    );
    assert_eq!(c.options.label_smoothing, 0.0);
    assert_eq!(c.recipe, "official");
    assert_eq!(c.model.name, "ViT-B-32");
    assert!(c.params.starts_with("Params {"), "{}", c.params);
}

#[test]
fn recipes_fill_only_what_the_flags_leave_open() {
    let c = parse(&["--train-data", "x.json", "--recipe", "aerial"]).unwrap();
    assert_eq!(c.ema_decay, Some(0.999));
    assert_eq!(c.options.label_smoothing, 0.1);
    assert!(c.data.augment.unwrap().rotate_flip);
    let c = parse(&[
        "--train-data",
        "x.json",
        "--recipe",
        "aerial",
        "--label-smoothing",
        "0",
        "--ema-decay",
        "0",
    ])
    .unwrap();
    assert_eq!((c.ema_decay, c.options.label_smoothing), (None, 0.0));
}

#[test]
fn settings_pirclip_cannot_run_are_refused_by_name() {
    for (args, needle) in [
        (
            &["--train-data", "x.json", "--report-to", "wandb"][..],
            "--report-to wandb",
        ),
        (
            &["--train-data", "x.json", "--aug-cfg", "color_jitter=0.4"][..],
            "color_jitter",
        ),
        (
            &["--train-data", "x.json", "--aug-cfg", "scale=(0.5,1.5)"][..],
            "high ≤ 1",
        ),
        (
            &["--train-data", "x.json", "--csv-separator", "ab"][..],
            "one character",
        ),
        (
            &["--train-data", "x.json", "--val-data", "v.json"][..],
            "--val-images-dir",
        ),
        (
            &["--train-data", "x.json", "--model", "no-such-model"][..],
            "--model",
        ),
    ] {
        let e = parse(args).unwrap_err();
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    let line: Vec<String> = ["--train-data", "x", "--grad-checkpointing"]
        .map(String::from)
        .into();
    let e = reject_unsupported_open_clip_flags(&line).unwrap_err();
    assert!(e.contains("--grad-checkpointing is not implemented"), "{e}");
    let line: Vec<String> = ["--precision", "pure_bf16"].map(String::from).into();
    assert!(reject_unsupported_open_clip_flags(&line)
        .unwrap_err()
        .contains("pure_bf16"));
    let fine: Vec<String> = ["--precision", "amp"].map(String::from).into();
    assert!(reject_unsupported_open_clip_flags(&fine).is_ok());
}
