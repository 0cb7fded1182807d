//! open_clip's tower locks on the pretrained towers (issue #24): `--lock-text` on a Hugging Face tower
//! as `HFTextEncoder.lock`, `--lock-image` on a timm tower as `TimmModel.lock` (parameter groups, frozen
//! BatchNorm statistics). The weights are random here: which tensors train is what is tested.

use pirclip_model::{BnMode, ClipModel, EncodeOptions, ModelConfig};
use pirclip_train::{AdamWConfig, TrainOptions, Trainer};
use tch::{Device, Kind, Tensor};

fn trained(options: TrainOptions) -> (Trainer, Vec<String>) {
    let config = ModelConfig::from_name_or_path("Lite0-MiniLM-L6").unwrap();
    let model = ClipModel::new(&config, Device::Cpu);
    pirclip_model::init::initialize(model.registry(), 0);
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.2,
    };
    let t = Trainer::new(model, adamw, options);
    let names = t.optimizer.params.iter().map(|p| p.name.clone()).collect();
    (t, names)
}

fn has(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == name)
}

#[test]
fn lock_text_freezes_the_hf_transformer_as_open_clip() {
    let layer = |i: usize, rest: &str| format!("text.transformer.encoder.layer.{i}.{rest}");
    let base = TrainOptions {
        lock_text: true,
        ..Default::default()
    };
    let (_, n) = trained(base);
    assert!(!has(&n, &layer(5, "attention.self.query.weight")));
    assert!(!has(
        &n,
        "text.transformer.embeddings.word_embeddings.weight"
    ));
    assert!(
        has(&n, &layer(0, "output.LayerNorm.weight")),
        "LayerNorms train by default"
    );
    assert!(has(&n, "text.transformer.embeddings.LayerNorm.bias"));
    assert!(has(&n, "text.proj.weight"));
    assert!(has(&n, "visual.trunk.conv_stem.weight"));

    let (_, n) = trained(TrainOptions {
        lock_text_unlocked_layers: 2,
        ..base
    });
    assert!(has(&n, &layer(4, "attention.self.query.weight")));
    assert!(has(&n, &layer(5, "intermediate.dense.bias")));
    assert!(!has(&n, &layer(3, "attention.self.query.weight")));

    let (_, n) = trained(TrainOptions {
        lock_text_freeze_layer_norm: true,
        ..base
    });
    assert!(!has(&n, &layer(0, "output.LayerNorm.weight")));
    assert!(has(&n, "text.proj.weight"));
}

#[test]
fn lock_image_freezes_timm_groups_and_their_batchnorm_statistics() {
    let base = TrainOptions {
        lock_image: true,
        ..Default::default()
    };
    let (_, n) = trained(base);
    assert!(!n.iter().any(|n| n.starts_with("visual.trunk.")));
    assert!(has(&n, "visual.head.proj.weight"));
    assert!(has(
        &n,
        "text.transformer.embeddings.word_embeddings.weight"
    ));

    // 18 groups: stem, 16 blocks, head convolution; the last 4 are blocks 5.2, 5.3, 6.0 and the head.
    let (t, n) = trained(TrainOptions {
        lock_image_unlocked_groups: 4,
        lock_image_freeze_bn_stats: true,
        ..base
    });
    for trains in [
        "blocks.5.2.conv_pw.weight",
        "blocks.5.3.bn2.weight",
        "blocks.6.0.conv_pwl.weight",
        "conv_head.weight",
        "bn2.bias",
    ] {
        assert!(has(&n, &format!("visual.trunk.{trains}")), "{trains}");
    }
    for frozen in [
        "blocks.5.1.conv_dw.weight",
        "conv_stem.weight",
        "bn1.weight",
        "blocks.0.0.conv_dw.weight",
    ] {
        assert!(!has(&n, &format!("visual.trunk.{frozen}")), "{frozen}");
    }
    // A training forward: the frozen groups' running statistics stay, the trained ones move.
    let stat = |name: &str| {
        t.model
            .registry()
            .with_entries(|es| es.iter().find(|e| e.name == name).unwrap().tensor.copy())
    };
    let (frozen, live) = (
        "visual.trunk.blocks.5.1.bn3.running_mean",
        "visual.trunk.blocks.5.2.bn3.running_mean",
    );
    let (frozen0, live0) = (stat(frozen), stat(live));
    let x = Tensor::randn([4, 3, 160, 160], (Kind::Float, Device::Cpu));
    let opts = EncodeOptions {
        bn_mode: BnMode::Train,
        ..Default::default()
    };
    let _ = tch::no_grad(|| t.model.encode_image(&x, opts));
    assert_eq!(
        f64::try_from((stat(frozen) - frozen0).abs().max()).unwrap(),
        0.0
    );
    assert!(f64::try_from((stat(live) - live0).abs().max()).unwrap() > 0.0);
}
