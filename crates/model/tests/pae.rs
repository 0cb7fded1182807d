//! The progressive attention encoders (hard-filter Spatial-PAE, Temporal-PAE/LCA) on the fixture-sized
//! PIR model: key names, shapes, masking of padding, selection of tokens, gradient flow, config checks.

use pirclip_model::pae::{HardVir, HardVirConfig};
use pirclip_model::params::{EntryKind, Registry};
use pirclip_model::{l2_normalize, BnMode, ClipModel, EncodeOptions, ModelConfig};
use tch::{Device, Kind, Tensor};

const SOT: i64 = 49406;
const EOT: i64 = 49407;

/// The parity fixture's tiny PIR (embed 64, image 64, patch 16: 16 patches) with `vision` and `text`
/// spliced into its `vision_cfg` / `text_cfg`.
fn config_json(vision: &str, text: &str) -> String {
    format!(
        r#"{{"embed_dim": 64,
            "vision_cfg": {{"image_size": 64, "layers": 2, "width": 96, "patch_size": 16, "head_width": 32,
                            "res_layers": [1, 1, 1, 1], "res_width": 4 {vision}}},
            "text_cfg": {{"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2
                          {text}}}}}"#
    )
}

fn config(vision: &str, text: &str) -> ModelConfig {
    ModelConfig::from_json(&config_json(vision, text), "pae-test").unwrap()
}

const HARD: &str = r#", "vir": "hard", "filter_size": 4, "instruction_rounds": 2, "vir_heads": 4"#;
const LCA: &str = r#", "lca": {"cycles": 2, "heads": 4, "ffn_width": 96}"#;

fn model(vision: &str, text: &str) -> ClipModel {
    let m = ClipModel::new(&config(vision, text), Device::Cpu);
    pirclip_model::init::initialize(m.registry(), 7);
    m
}

fn images(n: i64) -> Tensor {
    tch::manual_seed(3);
    Tensor::randn([n, 3, 64, 64], (Kind::Float, Device::Cpu))
}

/// Token rows: SOT, `len` words, EOT, zeros.
fn ids(lens: &[i64]) -> Tensor {
    let rows: Vec<Tensor> = lens
        .iter()
        .map(|&len| {
            let mut v = vec![0i64; 77];
            v[0] = SOT;
            for (i, x) in v.iter_mut().enumerate().skip(1).take(len as usize) {
                *x = 320 + 17 * i as i64;
            }
            v[len as usize + 1] = EOT;
            Tensor::from_slice(&v)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn eval() -> EncodeOptions {
    EncodeOptions::default()
}

fn zero(m: &ClipModel, prefix: &str) {
    m.registry().with_entries(|es| {
        for e in es.iter().filter(|e| e.name.starts_with(prefix)) {
            let _ = tch::no_grad(|| e.tensor.shallow_clone().zero_());
        }
    });
}

#[test]
fn keys_and_shapes() {
    let m = model(HARD, LCA);
    let names: Vec<String> = m.state_dict().entries.into_iter().map(|(k, _)| k).collect();
    for key in [
        "spatial_pae.mapping.1.weight",
        "spatial_pae.self_attn.0.mhatt.linear_q.weight",
        "spatial_pae.self_attn.1.ffn.1.weight",
        "spatial_pae.cross_attn.1.mhatt_cross.linear_merge.bias",
        "spatial_pae.head.weight",
        "temporal_pae.mapping.0.bias",
        "temporal_pae.cross_attn.1.norm2.weight",
        "temporal_pae.self_attn.0.ffn.3.weight",
        "temporal_pae.head.bias",
    ] {
        assert!(names.iter().any(|n| n == key), "{key} missing");
    }
    // The hard VIR works in the joint space: no ViT-width instruction token.
    assert!(!names.iter().any(|n| n.starts_with("vision_proj_res.")));
    let sd = m.state_dict();
    assert_eq!(
        sd.get("temporal_pae.self_attn.0.ffn.0.weight")
            .unwrap()
            .shape,
        vec![96, 64]
    );
    assert_eq!(
        sd.get("spatial_pae.self_attn.0.ffn.0.weight")
            .unwrap()
            .shape,
        vec![128, 64],
        "feed-forward width defaults to 2·embed_dim"
    );
    assert_eq!(m.encode_image(&images(3), eval()).size(), vec![3, 64]);
    assert_eq!(m.encode_text(&ids(&[3, 9])).size(), vec![2, 64]);
    // Absent fields = today's PIR: same keys as the parity fixture's checkpoint.
    let plain = model("", "");
    let ck = pirclip_checkpoint::load(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/parity/model.safetensors"),
    )
    .unwrap();
    plain.load(&ck.state_dict, "parity model").unwrap();
}

#[test]
fn lca_ignores_padding_and_truncation() {
    let m = model("", LCA);
    let short = ids(&[3]);
    let alone = m.encode_text(&short);
    // In a batch with a longer caption, the short one is computed over 12 positions instead of 5.
    let batched = m.encode_text(&ids(&[3, 10])).narrow(0, 0, 1);
    // All 77 positions, and then with garbage in place of the padding.
    let full = m.encode_text_full(&short);
    let garbage = short.copy();
    let _ = garbage.narrow(1, 5, 72).copy_(&Tensor::randint_low(
        1,
        40000,
        [1, 72],
        (Kind::Int64, Device::Cpu),
    ));
    let noisy = m.encode_text_full(&garbage);
    for (what, t) in [("batched", &batched), ("full", &full), ("garbage", &noisy)] {
        let d = max_diff(&alone, t);
        assert!(d < 1e-5, "{what}: max |Δ| {d}");
    }
    // The cycles do change the embedding (the test above is not vacuous).
    assert!(max_diff(&alone, &m.text.forward(&short, true)) > 1e-3);
}

#[test]
fn a_zero_head_leaves_the_pooled_tokens() {
    let m = model(HARD, LCA);
    zero(&m, "temporal_pae.head.");
    zero(&m, "spatial_pae.head.");
    let t = ids(&[4, 7]);
    assert_eq!(max_diff(&m.encode_text(&t), &m.text.forward(&t, true)), 0.0);
    let x = images(2);
    let pirclip_model::clip::Visual::Vit(vit) = &m.visual else {
        unreachable!()
    };
    let d = max_diff(&m.encode_image(&x, eval()), &vit.forward(&x));
    assert!(d < 1e-5, "class token vs plain ViT: {d}");
}

/// Hand-built tokens whose dot products with the instruction are known: the filter keeps the top
/// patches in belief order, whatever their positions, and ignores the rest.
#[test]
fn hard_filter_keeps_the_top_patches_in_belief_order() {
    let r = Registry::new(Device::Cpu);
    let cfg = HardVirConfig {
        filter_size: 2,
        instruction_rounds: 1,
        heads: 2,
        ffn_width: None,
        dropout: 0.0,
    };
    let vir = HardVir::new(&r, 8, &cfg);
    pirclip_model::init::initialize(&r, 11);
    tch::manual_seed(5);
    let instruction = Tensor::zeros([1, 8], (Kind::Float, Device::Cpu));
    let _ = instruction.narrow(1, 0, 1).fill_(1.0);
    let token = |dot: f64| {
        let t = Tensor::randn([1, 1, 8], (Kind::Float, Device::Cpu));
        let _ = t.narrow(2, 0, 1).fill_(dot);
        t
    };
    let class = token(0.5);
    let (p1, p2, p3, p4) = (token(0.1), token(3.0), token(-1.0), token(2.0));
    let run = |patches: &[&Tensor]| {
        let mut all = vec![&class];
        all.extend(patches);
        vir.forward(&Tensor::cat(&all, 1), &instruction, false)
    };
    let out = run(&[&p1, &p2, &p3, &p4]);
    // belief = softmax(0.1, 3, -1, 2) by hand
    let e: Vec<f64> = [0.1f64, 3.0, -1.0, 2.0].iter().map(|x| x.exp()).collect();
    let sum: f64 = e.iter().sum();
    let belief = Vec::<f32>::try_from(out.belief.view([-1])).unwrap();
    for (b, e) in belief.iter().zip(&e) {
        assert!((*b as f64 - e / sum).abs() < 1e-6, "{belief:?}");
    }
    for (what, other) in [
        ("only the kept patches", run(&[&p2, &p4])),
        ("kept patches swapped", run(&[&p4, &p2])),
        (
            "other discarded patches",
            run(&[&token(-3.0), &p2, &token(1.0), &p4]),
        ),
    ] {
        let d = max_diff(&out.features, &other.features);
        assert!(d < 1e-6, "{what}: {d}");
    }
    let changed = run(&[&p1, &p2, &p3, &token(2.0)]);
    assert!(max_diff(&out.features, &changed.features) > 1e-4);
}

#[test]
fn gradients_reach_every_module_and_dropout_only_trains() {
    let m = model(
        HARD,
        r#", "lca": {"cycles": 2, "heads": 4, "dropout": 0.1}"#,
    );
    m.registry().with_entries(|es| {
        for e in es.iter().filter(|e| e.kind == EntryKind::Parameter) {
            let _ = e.tensor.set_requires_grad(true);
        }
    });
    let train = EncodeOptions {
        bn_mode: BnMode::Train,
        dropout: true,
        ..EncodeOptions::default()
    };
    let image = l2_normalize(&m.encode_image(&images(4), train));
    let text = l2_normalize(&m.encode_text_train(&ids(&[2, 5, 8, 3]), true));
    let logits = image.matmul(&text.tr()) * 10.0;
    let labels = Tensor::arange(4, (Kind::Int64, Device::Cpu));
    let loss = (logits.cross_entropy_for_logits(&labels)
        + logits.tr().cross_entropy_for_logits(&labels))
        / 2.0;
    loss.backward();
    let mut checked = 0;
    m.registry().with_entries(|es| {
        for e in es.iter().filter(|e| e.kind == EntryKind::Parameter) {
            // The instruction ResNet's blocks start with bn3 = 0 (open_clip's zero-init residuals), so
            // at initialisation only its stem path and attention pool receive gradients.
            if !["spatial_pae.", "temporal_pae.", "res_visual.attnpool."]
                .iter()
                .any(|p| e.name.starts_with(p))
            {
                continue;
            }
            let g = e.tensor.grad();
            assert!(g.defined(), "{}: no gradient", e.name);
            assert!(
                g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
                "{}: zero gradient",
                e.name
            );
            checked += 1;
        }
    });
    assert!(checked > 100, "{checked}");
    let t = ids(&[6]);
    let (a, b) = (m.encode_text_train(&t, true), m.encode_text_train(&t, true));
    assert!(max_diff(&a, &b) > 1e-6, "dropout is active in training");
    assert_eq!(max_diff(&m.encode_text(&t), &m.encode_text(&t)), 0.0);
}

#[test]
fn bad_module_configs_are_refused_by_name() {
    for (vision, text, want) in [
        (
            r#", "vir": "hard", "filter_size": 17"#,
            "",
            "filter_size 17",
        ),
        (r#", "vir": "hard""#, "", "filter_size"),
        (r#", "vir": "medium""#, "", "\"soft\" or \"hard\""),
        (r#", "filter_size": 4"#, "", "set vision_cfg.vir"),
        (
            r#", "vir": "hard", "filter_size": 4, "vir_heads": 5"#,
            "",
            "heads 5",
        ),
        ("", r#", "lca": {"cycles": 1, "heads": 3}"#, "heads 3"),
        (
            "",
            r#", "lca": {"cycles": 1, "dropout": 1.5}"#,
            "dropout 1.5",
        ),
        ("", r#", "lca": {"cycle": 1}"#, "text_cfg.lca"),
    ] {
        let err = ModelConfig::from_json(&config_json(vision, text), "bad")
            .err()
            .unwrap_or_else(|| panic!("{vision}{text} accepted"))
            .to_string();
        assert!(err.contains(want), "{vision}{text}: {err}");
    }
    let no_instruction = r#"{"embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "patch_size": 16, "head_width": 32,
                       "vir": "hard", "filter_size": 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}"#;
    let err = ModelConfig::from_json(no_instruction, "bad")
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs the instruction encoder"), "{err}");
}
