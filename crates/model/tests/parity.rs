//! Parity with the official PIR-CLIP code on fixture set A (tests/fixtures/parity, README there): the tiny
//! PIR model in three checkpoint layouts, both BatchNorm modes and both VIR variants.

use std::path::PathBuf;

use pirclip_checkpoint::{npy, TensorData};
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::params::from_tch;
use pirclip_model::{BeliefMode, BnMode, ClipModel, EncodeOptions, ModelConfig};
use tch::{Device, Tensor};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(p)
}

fn config() -> ModelConfig {
    ModelConfig::from_name_or_path(fx("config.json").to_str().unwrap()).unwrap()
}

fn model_from(file: &str) -> ClipModel {
    let m = ClipModel::new(&config(), Device::Cpu);
    let ck = pirclip_checkpoint::load(fx(file)).unwrap();
    m.load(&ck.state_dict, file).unwrap();
    m
}

fn golden(name: &str) -> TensorData {
    npy::read(fx(name)).unwrap()
}

fn pixels() -> Tensor {
    let p = golden("pixels_eval.npy");
    images_tensor(&p.to_f32_vec(), 4, 64, Device::Cpu)
}

fn max_abs_diff(got: &Tensor, want: &TensorData) -> f32 {
    let g = from_tch(got);
    assert_eq!(g.shape, want.shape, "shape");
    g.to_f32_vec()
        .iter()
        .zip(want.to_f32_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn check(what: &str, got: &Tensor, want: &str, tol: f32) {
    let d = max_abs_diff(got, &golden(want));
    println!("{what}: max |Δ| = {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what} vs {want}: max |Δ| {d} > {tol}");
}

const LAYOUTS: [&str; 3] = [
    "model.safetensors",
    "model_state_dict.pt",
    "train_checkpoint.pt",
];

#[test]
fn state_dict_order_and_counts_match_the_official_model() {
    let m = ClipModel::new(&config(), Device::Cpu);
    let sd = m.state_dict();
    let tsv = std::fs::read_to_string(fx("state_dict_keys.tsv")).unwrap();
    let want: Vec<(String, String)> = tsv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[1].replace(' ', ""))
        })
        .collect();
    let got: Vec<(String, String)> = sd
        .entries
        .iter()
        .map(|(n, t)| (n.clone(), format!("{:?}", t.shape).replace(' ', "")))
        .collect();
    assert_eq!(got, want);
    assert_eq!(m.parameter_count(), 1_202_291);
}

#[test]
fn image_features_all_layouts_both_bn_modes_both_belief_variants() {
    let x = pixels();
    for file in LAYOUTS {
        let m = model_from(file);
        for (bn, belief, want) in [
            (
                BnMode::Running,
                BeliefMode::BeliefPlusIndex,
                "image_features_eval.npy",
            ),
            (
                BnMode::Running,
                BeliefMode::BeliefOnly,
                "image_features_eval_belief_only.npy",
            ),
            (
                BnMode::Batch,
                BeliefMode::BeliefPlusIndex,
                "image_features_trainbn.npy",
            ),
            (
                BnMode::Batch,
                BeliefMode::BeliefOnly,
                "image_features_trainbn_belief_only.npy",
            ),
        ] {
            let f = tch::no_grad(|| {
                m.encode_image(
                    &x,
                    EncodeOptions {
                        bn_mode: bn,
                        belief_mode: belief,
                        dropout: false,
                    },
                )
            });
            check(&format!("{file} {bn:?} {belief:?}"), &f, want, 1e-4);
        }
        let t = tch::no_grad(|| {
            m.encode_text(&ids_tensor(
                &golden("tokens.npy").to_i64_vec(),
                6,
                Device::Cpu,
            ))
        });
        check(&format!("{file} text"), &t, "text_features.npy", 1e-4);
    }
}

#[test]
fn intermediate_tensors_match() {
    let m = model_from("model.safetensors");
    let x = pixels();
    let _g = tch::no_grad_guard();
    let rf = m.instruction_features(&x, BnMode::Running).unwrap();
    let scale = golden("resnet_features.npy")
        .to_f32_vec()
        .iter()
        .fold(1f32, |a, b| a.max(b.abs()));
    check("resnet features", &rf, "resnet_features.npy", 1e-4 * scale);
    let y = m.instruction_token(&x, BnMode::Running).unwrap();
    check(
        "instruction token (running BN)",
        &y.unsqueeze(1),
        "instruction_token.npy",
        1e-4,
    );
    let yb = m.instruction_token(&x, BnMode::Batch).unwrap();
    check(
        "instruction token (batch BN)",
        &yb.unsqueeze(1),
        "instruction_token_trainbn.npy",
        1e-4,
    );
    let vit = match &m.visual {
        pirclip_model::clip::Visual::Vit(v) => v,
        _ => unreachable!(),
    };
    let ln_pre = vit.embed(&x);
    check("vit ln_pre", &ln_pre, "vit_ln_pre.npy", 1e-5);
    let belief = ln_pre
        .matmul(&y.unsqueeze(2))
        .squeeze_dim(-1)
        .softmax(1, tch::Kind::Float);
    check("belief", &belief, "belief.npy", 1e-5);
    let order = belief.argsort(1, true);
    assert_eq!(
        from_tch(&order).to_i64_vec(),
        golden("belief_argsort.npy").to_i64_vec(),
        "belief argsort"
    );
    let yt = y.unsqueeze(1);
    check(
        "tokens after VIR",
        &pirclip_model::vit::vir(&ln_pre, &yt, BeliefMode::BeliefPlusIndex),
        "vit_tokens_after_vir.npy",
        1e-5,
    );
    check(
        "tokens after VIR (belief only)",
        &pirclip_model::vit::vir(&ln_pre, &yt, BeliefMode::BeliefOnly),
        "vit_tokens_after_vir_belief_only.npy",
        1e-5,
    );
    let lnb = vit.embed(&x);
    let bb = lnb
        .matmul(&yb.unsqueeze(2))
        .squeeze_dim(-1)
        .softmax(1, tch::Kind::Float);
    check("belief (batch BN)", &bb, "belief_trainbn.npy", 1e-5);
}

#[test]
fn batch_of_one_works_and_matches_the_batch() {
    let m = model_from("model.safetensors");
    let x = pixels();
    let _g = tch::no_grad_guard();
    let all = m.encode_image(&x, EncodeOptions::default());
    for i in 0..4 {
        let one = m.encode_image(&x.narrow(0, i, 1), EncodeOptions::default());
        let d = (one - all.narrow(0, i, 1)).abs().max().double_value(&[]);
        assert!(d < 1e-5, "image {i}: {d}");
    }
}

#[test]
fn text_truncation_at_eot_gives_the_same_features() {
    let m = model_from("model.safetensors");
    let ids = ids_tensor(&golden("tokens.npy").to_i64_vec(), 6, Device::Cpu);
    let _g = tch::no_grad_guard();
    let d = (m.encode_text(&ids) - m.encode_text_full(&ids))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn strict_load_lists_every_problem() {
    let m = ClipModel::new(&config(), Device::Cpu);
    let mut sd = pirclip_checkpoint::load(fx("model.safetensors"))
        .unwrap()
        .state_dict;
    sd.entries
        .retain(|(n, _)| n != "visual.proj" && n != "res_visual.bn1.running_var");
    sd.insert("extra.weight", TensorData::from_f32(vec![1], &[0.0]));
    let (_, lp) = sd
        .entries
        .iter_mut()
        .find(|(n, _)| n == "logit_scale")
        .unwrap();
    *lp = TensorData::from_f32(vec![2], &[0.0, 0.0]);
    let msg = m.load(&sd, "broken.safetensors").unwrap_err().to_string();
    for needle in [
        "broken.safetensors",
        "2 missing key(s)",
        "visual.proj",
        "res_visual.bn1.running_var",
        "1 unexpected key(s): extra.weight",
        "shape mismatch for logit_scale: model expects [], checkpoint has [2]",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in:\n{msg}");
    }
}

#[test]
fn presets_build_with_the_official_parameter_counts() {
    // Counts from open_clip / spec §4.1; construction only (zeros), no weights needed.
    for (name, params, entries) in [
        ("PIR", 188_939_105usize, 643usize),
        ("ViT-B-32", 151_277_313, 302),
        ("RN50", 102_007_137, 489),
    ] {
        let cfg = ModelConfig::from_name_or_path(name).unwrap();
        let m = ClipModel::new(&cfg, Device::Cpu);
        assert_eq!(m.parameter_count(), params, "{name} parameters");
        assert_eq!(
            m.registry().with_entries(|e| e.len()),
            entries,
            "{name} state-dict entries"
        );
    }
}

#[test]
fn pir_state_dict_keys_match_the_643_official_keys() {
    let m = ClipModel::new(&ModelConfig::from_name_or_path("PIR").unwrap(), Device::Cpu);
    let tsv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pir_state_dict_keys.tsv"),
    )
    .unwrap();
    let want: Vec<String> = tsv
        .lines()
        .filter(|l| !l.starts_with("key\t"))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            format!("{} {}", f[0], f[1].replace(' ', ""))
        })
        .collect();
    let got: Vec<String> = m.registry().with_entries(|es| {
        es.iter()
            .map(|e| format!("{} {:?}", e.name, e.tensor.size()).replace(", ", ","))
            .collect()
    });
    assert_eq!(got, want);
}

/// Plain open_clip models (no PIR parts): a ViT tower with QuickGELU and a ModifiedResNet tower, against
/// open_clip_torch's own outputs (tests/fixtures/openclip, made by dev/make_openclip_goldens.py).
#[test]
fn open_clip_vit_quickgelu_and_modified_resnet_match_open_clip() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/openclip");
    for name in ["tiny-vit-quickgelu", "tiny-rn"] {
        let cfg =
            ModelConfig::from_name_or_path(dir.join(format!("{name}.json")).to_str().unwrap())
                .unwrap();
        let m = ClipModel::new(&cfg, Device::Cpu);
        let sd = pirclip_checkpoint::load(dir.join(format!("{name}.safetensors")))
            .unwrap()
            .state_dict;
        m.load(&sd, name).unwrap();
        // Our state-dict order is open_clip's.
        let keys: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}_keys.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            m.state_dict()
                .entries
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>(),
            keys,
            "{name} key order"
        );
        let _g = tch::no_grad_guard();
        let f = m.encode_image(&pixels(), EncodeOptions::default());
        let d = max_abs_diff(
            &f,
            &npy::read(dir.join(format!("{name}_image_features.npy"))).unwrap(),
        );
        println!("{name} image features: max |Δ| {d:.2e}");
        assert!(d <= 1e-4, "{name} image {d}");
        let t = m.encode_text(&ids_tensor(
            &golden("tokens.npy").to_i64_vec(),
            6,
            Device::Cpu,
        ));
        let d = max_abs_diff(
            &t,
            &npy::read(dir.join(format!("{name}_text_features.npy"))).unwrap(),
        );
        println!("{name} text features: max |Δ| {d:.2e}");
        assert!(d <= 1e-4, "{name} text {d}");
    }
}

/// `explain` shows the forward pass itself: its belief is the official one and its first output token is
/// the image embedding.
#[test]
fn explain_belief_is_the_official_one_and_token_zero_is_the_embedding() {
    let m = model_from("model.safetensors");
    let x = pixels();
    let _g = tch::no_grad_guard();
    let opts = pirclip_model::EncodeOptions {
        bn_mode: BnMode::Running,
        belief_mode: pirclip_model::BeliefMode::BeliefPlusIndex,
        dropout: false,
    };
    let e = m.explain(&x, opts).unwrap();
    check("explain belief", &e.belief, "belief.npy", 1e-5);
    let embedding = m.encode_image(&x, opts);
    let diff = (e.tokens.select(1, 0) - &embedding)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "token 0 vs the embedding: {diff}");
}
