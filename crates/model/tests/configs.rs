//! Hostile or mistyped configs are refused with a message before any tensor exists: no panic, no
//! allocation the size of the mistake.

use pirclip_model::ModelConfig;

fn refused(json: &str) -> String {
    match ModelConfig::from_json(json, "x") {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e.to_string(),
    }
}

const TEXT: &str = r#""text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1}"#;

#[test]
fn configs_no_machine_could_hold_or_that_divide_by_zero_are_refused() {
    let vit = |fields: &str| format!(r#"{{"embed_dim": 4, "vision_cfg": {{{fields}}}, {TEXT}}}"#);
    let e = refused(&vit(
        r#""image_size": 32, "layers": 1, "width": 100000000, "patch_size": 16"#,
    ));
    assert!(e.contains("parameters"), "{e}");
    let e = refused(&vit(
        r#""image_size": 32, "layers": 1000000, "width": 4096, "patch_size": 16"#,
    ));
    assert!(e.contains("parameters"), "{e}");
    for zero in [
        r#""image_size": 32, "layers": 1, "width": 64, "patch_size": 0"#,
        r#""image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 0"#,
        r#""image_size": 0, "layers": 1, "width": 64, "patch_size": 16"#,
    ] {
        let e = refused(&vit(zero));
        assert!(e.contains("positive"), "{zero}: {e}");
    }
    let e = refused(&vit(
        r#""image_size": 32768, "layers": 1, "width": 64, "patch_size": 16"#,
    ));
    assert!(e.contains("at most"), "{e}");
    let e = refused(&format!(
        r#"{{"embed_dim": 4, "vision_cfg": {{"image_size": 32, "layers": [3, 4, 6, 3], "width": 10000000}}, {TEXT}}}"#
    ));
    assert!(e.contains("parameters"), "{e}");
    // A Hugging Face tower's numbers given in the config.
    let hf = |vocab: u64, hidden: u64| {
        format!(
            r#"{{"embed_dim": 4, "vision_cfg": {{"image_size": 32, "timm_model_name": "tf_efficientnet_lite0"}},
                "text_cfg": {{"hf_model_name": "x", "hf_tokenizer_name": "{}",
                              "hf_model_config": {{"vocab_size": {vocab}, "hidden_size": {hidden}, "num_hidden_layers": 1,
                                                   "num_attention_heads": 1, "intermediate_size": 4, "max_position_embeddings": 80}}}}}}"#,
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/towers/tokenizer-minimal.json"
            )
        )
    };
    let e = refused(&hf(1 << 40, 64));
    assert!(e.contains("parameters"), "{e}");
    let e = refused(&hf(100, 0));
    assert!(e.contains("positive"), "{e}");
    let e = refused(&vit(
        r#""image_size": 32, "timm_model_name": "efficientnet_b7""#,
    ));
    assert!(e.contains("tf_efficientnet_lite0"), "{e}");
}
