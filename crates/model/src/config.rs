//! open_clip model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) and built-in presets.

use serde_json::Value;

use crate::pae::{HardVirConfig, LcaConfig};
use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub enum VisionTower {
    /// open_clip `VisionTransformer`.
    Vit {
        layers: usize,
        width: usize,
        patch_size: usize,
        head_width: usize,
    },
    /// open_clip `ModifiedResNet` (RN50 etc.): `layers` blocks per stage, base `width`.
    ModifiedResNet {
        layers: [usize; 4],
        width: usize,
        head_width: usize,
    },
    /// open_clip `TimmModel` (`timm_model_name`): timm's `tf_efficientnet_lite{variant}`, average-pooled,
    /// a linear projection (`timm_proj = "linear"`, bias with `timm_proj_bias`).
    TimmEfficientNetLite { variant: u8, proj_bias: bool },
}

/// The instruction encoder of PIR-CLIP: a ModifiedResNet whose attention pool outputs `embed_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    pub res_layers: [usize; 4],
    pub res_width: usize,
    /// `vision_cfg.vir = "hard"`: the hard-filter Spatial-PAE in place of the soft-belief VIR.
    pub hard_vir: Option<HardVirConfig>,
}

/// A Hugging Face BERT-family encoder's `config.json` numbers.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "bert_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}

/// open_clip's `hf_pooler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfPooler {
    /// `mean_pooler`: the mean of the last hidden states over the real tokens (sentence-transformers').
    Mean,
    /// `cls_pooler` without the model's pooling layer: the first token's last hidden state.
    Cls,
}

/// open_clip's `hf_proj_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfProj {
    Linear,
    /// Linear → GELU → Linear through (width + embed_dim) / 2, no biases.
    Mlp,
    None,
}

/// `text_cfg.hf_model_name` and its settings: an open_clip `HFTextEncoder` over a BERT-family model.
#[derive(Debug, Clone)]
pub struct HfTextConfig {
    pub model_name: String,
    pub bert: BertConfig,
    pub pooler: HfPooler,
    pub proj: HfProj,
    pub tokenizer: std::sync::Arc<pirclip_text::HfTokenizer>,
    /// `hf_model_pretrained` (open_clip's default true): training starts from the model's weights.
    pub pretrained: bool,
}

impl PartialEq for HfTextConfig {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.model_name,
            &self.bert,
            self.pooler,
            self.proj,
            &self.tokenizer.path,
        ) == (&o.model_name, &o.bert, o.pooler, o.proj, &o.tokenizer.path)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    /// `text_cfg.lca`: the Temporal-PAE on the text tower.
    pub lca: Option<LcaConfig>,
    /// `text_cfg.hf_model_name`: a Hugging Face encoder in place of CLIP's text transformer (whose
    /// numbers then fill `vocab_size`, `width`, `heads`, `layers`).
    pub hf: Option<HfTextConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub embed_dim: usize,
    pub quick_gelu: bool,
    pub image_size: usize,
    pub vision: VisionTower,
    pub vision_mlp_ratio: f64,
    /// Present for PIR-CLIP (`res_layers` + `res_width` in `vision_cfg`).
    pub instruction: Option<Instruction>,
    pub text: TextConfig,
}

pub const PRESETS: [(&str, &str); 5] = [
    ("PIR", include_str!("../../../assets/PIR.json")),
    (
        "ViT-B-32",
        r#"{"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}"#,
    ),
    (
        "ViT-L-14",
        r#"{"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}}"#,
    ),
    // The pretrained towers pirclip can load (issue #24): ImageNet EfficientNet-Lite0 through timm's
    // tower, sentence-transformers' MiniLM-L6 through open_clip's HF tower.
    (
        "Lite0-MiniLM-L6",
        r#"{"embed_dim": 384,
            "vision_cfg": {"image_size": 224, "timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg", "timm_proj": "linear"},
            "text_cfg": {"hf_model_name": "sentence-transformers/all-MiniLM-L6-v2", "hf_tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2",
                         "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 77}}"#,
    ),
    (
        "RN50",
        r#"{"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": null},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}"#,
    ),
];

fn usize_field(v: &Value, key: &str, ctx: &str) -> Result<usize, Error> {
    v.get(key)
        .and_then(Value::as_u64)
        .filter(|x| *x > 0)
        .map(|x| x as usize)
        .ok_or_else(|| Error::Config(format!("{ctx}.{key} must be a positive integer")))
}

fn four(v: &Value, ctx: &str) -> Result<[usize; 4], Error> {
    let arr = v
        .as_array()
        .filter(|a| a.len() == 4)
        .ok_or_else(|| Error::Config(format!("{ctx} must be a list of 4 integers")))?;
    let mut out = [0; 4];
    for (o, x) in out.iter_mut().zip(arr) {
        *o = x
            .as_u64()
            .ok_or_else(|| Error::Config(format!("{ctx} must be a list of 4 integers")))?
            as usize;
    }
    Ok(out)
}

fn check_blocks(ctx: &str, embed_dim: usize, heads: usize, dropout: f64) -> Result<(), Error> {
    if heads == 0 || embed_dim % heads != 0 {
        return Err(Error::Config(format!(
            "{ctx}: embed_dim {embed_dim} is not a multiple of heads {heads}"
        )));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::Config(format!(
            "{ctx}: dropout {dropout} is not in [0, 1)"
        )));
    }
    Ok(())
}

/// `vision_cfg.vir` (`"soft"`, the default, or `"hard"`) and the hard filter's fields.
fn hard_vir(
    vc: &Value,
    embed_dim: usize,
    vision: &VisionTower,
    image_size: usize,
) -> Result<Option<HardVirConfig>, Error> {
    const FIELDS: [(&str, &str); 5] = [
        ("filter_size", "filter_size"),
        ("instruction_rounds", "instruction_rounds"),
        ("vir_heads", "heads"),
        ("vir_ffn_width", "ffn_width"),
        ("vir_dropout", "dropout"),
    ];
    match vc.get("vir").map(|v| v.as_str()) {
        None | Some(Some("soft")) => {
            if let Some((f, _)) = FIELDS.iter().find(|(f, _)| vc.get(*f).is_some()) {
                return Err(Error::Config(format!(
                    "vision_cfg.{f} is a field of the hard VIR; set vision_cfg.vir = \"hard\""
                )));
            }
            Ok(None)
        }
        Some(Some("hard")) => {
            let mut fields = serde_json::Map::new();
            for (from, to) in FIELDS {
                if let Some(v) = vc.get(from) {
                    fields.insert(to.to_string(), v.clone());
                }
            }
            let cfg: HardVirConfig = serde_json::from_value(Value::Object(fields))
                .map_err(|e| Error::Config(format!("vision_cfg (hard VIR): {e}")))?;
            check_blocks("vision_cfg (hard VIR)", embed_dim, cfg.heads, cfg.dropout)?;
            let patches = match vision {
                VisionTower::Vit { patch_size, .. } => (image_size / patch_size).pow(2),
                VisionTower::ModifiedResNet { .. } | VisionTower::TimmEfficientNetLite { .. } => 0,
            };
            if cfg.filter_size == 0 || cfg.filter_size > patches {
                return Err(Error::Config(format!(
                    "vision_cfg.filter_size {} must be between 1 and the {patches} patch tokens",
                    cfg.filter_size
                )));
            }
            Ok(Some(cfg))
        }
        _ => Err(Error::Config(
            "vision_cfg.vir must be \"soft\" or \"hard\"".into(),
        )),
    }
}

/// `vision_cfg.timm_model_name` and its settings, for the timm towers pirclip implements.
fn timm_tower(vc: &Value) -> Result<VisionTower, Error> {
    let name = vc["timm_model_name"].as_str().unwrap_or_default();
    let variant = name
        .strip_prefix("tf_efficientnet_lite")
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|v| *v <= 4)
        .ok_or_else(|| {
            Error::Config(format!(
                "vision_cfg.timm_model_name {name:?}: pirclip implements timm's tf_efficientnet_lite0 … lite4"
            ))
        })?;
    let text_of = |key: &str, default: &str| -> String {
        vc.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    if text_of("timm_pool", "avg") != "avg" {
        return Err(Error::Config(
            "vision_cfg.timm_pool: pirclip implements \"avg\"".into(),
        ));
    }
    if text_of("timm_proj", "linear") != "linear" {
        return Err(Error::Config(
            "vision_cfg.timm_proj: pirclip implements \"linear\"".into(),
        ));
    }
    let proj_bias = vc
        .get("timm_proj_bias")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(VisionTower::TimmEfficientNetLite { variant, proj_bias })
}

/// `text_cfg.hf_*`: the encoder's numbers (`hf_model_config`, a folder's `config.json`, or those of a
/// model pirclip knows), its tokenizer, pooler and projection.
fn hf_text(tc: &Value, base: Option<&std::path::Path>) -> Result<HfTextConfig, Error> {
    let model_name = tc["hf_model_name"].as_str().unwrap_or_default().to_string();
    let local = |name: &str| {
        let p = std::path::Path::new(name);
        let p = match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        };
        p.exists().then_some(p)
    };
    let bert: BertConfig = if let Some(c) = tc.get("hf_model_config") {
        serde_json::from_value(c.clone())
            .map_err(|e| Error::Config(format!("text_cfg.hf_model_config: {e}")))?
    } else if let Some(dir) = local(&model_name).filter(|p| p.join("config.json").is_file()) {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| Error::Config(format!("{}: {e}", dir.join("config.json").display())))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", dir.join("config.json").display())))?
    } else {
        crate::resolve::known_hf_model(&model_name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "text_cfg.hf_model_name {model_name:?}: not a folder with config.json nor a model pirclip knows ({}); give its numbers as text_cfg.hf_model_config",
                    crate::resolve::KNOWN_HF_MODELS.join(", ")
                ))
            })?
    };
    if bert.hidden_act != "gelu" || bert.position_embedding_type != "absolute" {
        return Err(Error::Config(format!(
            "{model_name}: pirclip's BERT implements hidden_act \"gelu\" with absolute positions, not {:?} / {:?}",
            bert.hidden_act, bert.position_embedding_type
        )));
    }
    let sizes = [
        bert.vocab_size,
        bert.hidden_size,
        bert.num_hidden_layers,
        bert.intermediate_size,
        bert.max_position_embeddings,
        bert.type_vocab_size,
    ];
    if sizes.contains(&0) || !(bert.layer_norm_eps > 0.0 && bert.layer_norm_eps < 1.0) {
        return Err(Error::Config(format!(
            "{model_name}: sizes must be positive and layer_norm_eps in (0, 1)"
        )));
    }
    if bert.num_attention_heads == 0 || bert.hidden_size % bert.num_attention_heads != 0 {
        return Err(Error::Config(format!(
            "{model_name}: hidden_size {} is not a multiple of num_attention_heads {}",
            bert.hidden_size, bert.num_attention_heads
        )));
    }
    let tokenizer_name = tc
        .get("hf_tokenizer_name")
        .and_then(Value::as_str)
        .unwrap_or(&model_name)
        .to_string();
    let tokenizer_file = match local(&tokenizer_name) {
        Some(p) => p,
        None => crate::resolve::known_hf_tokenizer(&tokenizer_name).map_err(Error::Config)?,
    };
    let tokenizer = pirclip_text::HfTokenizer::from_file(&tokenizer_file).map_err(Error::Config)?;
    let pooler = match tc.get("hf_pooler_type").and_then(Value::as_str).unwrap_or("mean_pooler") {
        "mean_pooler" => HfPooler::Mean,
        "cls_last_hidden_state_pooler" => HfPooler::Cls,
        other => {
            return Err(Error::Config(format!(
                "text_cfg.hf_pooler_type {other:?}: pirclip implements mean_pooler and cls_last_hidden_state_pooler"
            )))
        }
    };
    let proj = match tc
        .get("hf_proj_type")
        .and_then(Value::as_str)
        .unwrap_or("mlp")
    {
        "linear" => HfProj::Linear,
        "mlp" => HfProj::Mlp,
        "none" => HfProj::None,
        other => {
            return Err(Error::Config(format!(
                "text_cfg.hf_proj_type {other:?}: expected linear, mlp or none"
            )))
        }
    };
    let pretrained = tc
        .get("hf_model_pretrained")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    Ok(HfTextConfig {
        model_name,
        bert,
        pooler,
        proj,
        tokenizer: std::sync::Arc::new(tokenizer),
        pretrained,
    })
}

impl ModelConfig {
    /// A preset name (`PIR`, `ViT-B-32`, `ViT-L-14`, `RN50`, with an optional `-quickgelu` suffix) or a
    /// path to an open_clip JSON config.
    pub fn from_name_or_path(spec: &str) -> Result<Self, Error> {
        let (base, quick) = match spec.strip_suffix("-quickgelu") {
            Some(b) => (b, true),
            None => (spec, false),
        };
        if let Some((name, json)) = PRESETS.iter().find(|(n, _)| n.eq_ignore_ascii_case(base)) {
            let mut cfg = Self::from_json(json, name)?;
            cfg.quick_gelu |= quick;
            if quick {
                cfg.name = format!("{name}-quickgelu");
            }
            return Ok(cfg);
        }
        let path = std::path::Path::new(spec);
        if path.exists() {
            let text =
                std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{spec}: {e}")))?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| spec.to_string());
            return Self::from_json_at(&text, &stem, path.parent())
                .map_err(|e| Error::Config(format!("{spec}: {e}")));
        }
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        Err(Error::Config(format!(
            "unknown model {spec:?}: not a preset ({}) nor an existing config file",
            names.join(", ")
        )))
    }

    pub fn from_json(text: &str, name: &str) -> Result<Self, Error> {
        Self::from_json_at(text, name, None)
    }

    /// The same for a config read from the folder `base`, against which relative paths in it (a
    /// tokenizer file) are taken.
    pub fn from_json_at(
        text: &str,
        name: &str,
        base: Option<&std::path::Path>,
    ) -> Result<Self, Error> {
        let config = Self::parse(text, name, base)?;
        config.check_size()?;
        Ok(config)
    }

    /// Refuses a config whose tensors no machine holds: a mistyped or hostile number (a width of 10^8)
    /// would otherwise reach the first allocation and abort the process. The count is an estimate
    /// (within a small factor of the real one); the largest CLIPs have about 5 billion parameters.
    fn check_size(&self) -> Result<(), Error> {
        const MAX_PARAMETERS: f64 = 20e9;
        const MAX_SIDE: usize = 16384;
        let f = |x: usize| x as f64;
        let e = f(self.embed_dim);
        let resnet = |layers: &[usize; 4], width: usize| {
            let blocks: usize = layers.iter().sum();
            // Bottlenecks up to 32·width channels, plus the attention pool.
            f(blocks + 1) * 64.0 * f(width).powi(2) + 4.0 * f(32 * width).powi(2)
        };
        let vision = match &self.vision {
            VisionTower::Vit {
                layers,
                width,
                patch_size,
                ..
            } => {
                12.0 * f(*layers) * f(*width).powi(2)
                    + (3.0 * f(*patch_size).powi(2)
                        + (f(self.image_size) / f(*patch_size)).powi(2)
                        + e)
                        * f(*width)
            }
            VisionTower::ModifiedResNet { layers, width, .. } => resnet(layers, *width),
            VisionTower::TimmEfficientNetLite { .. } => 2e7,
        };
        let instruction = self
            .instruction
            .as_ref()
            .map_or(0.0, |i| resnet(&i.res_layers, i.res_width));
        let t = &self.text;
        let text = match &t.hf {
            None => {
                f(t.vocab_size + t.context_length) * f(t.width)
                    + f(t.layers) * f(t.width).powi(2) * (4.0 + 2.0 * t.mlp_ratio)
            }
            Some(h) => {
                let b = &h.bert;
                f(b.vocab_size + b.max_position_embeddings + b.type_vocab_size) * f(b.hidden_size)
                    + f(b.num_hidden_layers)
                        * f(b.hidden_size)
                        * (4.0 * f(b.hidden_size) + 2.0 * f(b.intermediate_size))
            }
        };
        let paes = [
            self.instruction
                .as_ref()
                .and_then(|i| i.hard_vir.as_ref())
                .map(|h| (h.instruction_rounds, h.ffn_width)),
            t.lca.as_ref().map(|l| (l.cycles, l.ffn_width)),
        ];
        let pae: f64 = paes
            .iter()
            .flatten()
            .map(|(steps, ffn)| {
                f(*steps) * e * (8.0 * e + 2.0 * f(ffn.unwrap_or(2 * self.embed_dim)))
            })
            .sum();
        let total = vision + instruction + text + pae + e * f(t.width.max(self.vision_width()));
        if !(total <= MAX_PARAMETERS) {
            return Err(Error::Config(format!(
                "the config describes a model of about {:.3e} parameters, beyond any machine's memory (a mistyped width, layer count or vocabulary?)",
                total
            )));
        }
        if self.image_size > MAX_SIDE || t.context_length > MAX_SIDE {
            return Err(Error::Config(format!(
                "image_size {} / context_length {}: at most {MAX_SIDE}",
                self.image_size, t.context_length
            )));
        }
        Ok(())
    }

    fn parse(text: &str, name: &str, base: Option<&std::path::Path>) -> Result<Self, Error> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
        let embed_dim = usize_field(&v, "embed_dim", "config")?;
        let quick_gelu = v
            .get("quick_gelu")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let vc = v
            .get("vision_cfg")
            .ok_or_else(|| Error::Config("vision_cfg missing".into()))?;
        let tc = v
            .get("text_cfg")
            .ok_or_else(|| Error::Config("text_cfg missing".into()))?;
        let image_size = usize_field(vc, "image_size", "vision_cfg")?;
        let head_width = match vc.get("head_width") {
            None => 64,
            Some(_) => usize_field(vc, "head_width", "vision_cfg")?,
        };
        let vision = match vc.get("layers") {
            _ if vc.get("timm_model_name").is_some_and(|n| !n.is_null()) => timm_tower(vc)?,
            Some(l) if l.is_array() => VisionTower::ModifiedResNet {
                layers: four(l, "vision_cfg.layers")?,
                width: usize_field(vc, "width", "vision_cfg")?,
                head_width,
            },
            _ => {
                let width = usize_field(vc, "width", "vision_cfg")?;
                let patch_size = usize_field(vc, "patch_size", "vision_cfg")?;
                if image_size % patch_size != 0 {
                    return Err(Error::Config(format!(
                        "image_size {image_size} is not a multiple of patch_size {patch_size}"
                    )));
                }
                if width % head_width != 0 {
                    return Err(Error::Config(format!(
                        "vision width {width} is not a multiple of head_width {head_width}"
                    )));
                }
                VisionTower::Vit {
                    layers: usize_field(vc, "layers", "vision_cfg")?,
                    width,
                    patch_size,
                    head_width,
                }
            }
        };
        let hard_vir = hard_vir(vc, embed_dim, &vision, image_size)?;
        let instruction = match (vc.get("res_layers"), vc.get("res_width")) {
            (Some(l), Some(w)) => Some(Instruction {
                res_layers: four(l, "vision_cfg.res_layers")?,
                res_width: w.as_u64().ok_or_else(|| {
                    Error::Config("vision_cfg.res_width must be an integer".into())
                })? as usize,
                hard_vir,
            }),
            (None, None) if hard_vir.is_some() => return Err(Error::Config(
                "vision_cfg.vir = \"hard\" needs the instruction encoder (res_layers, res_width)"
                    .into(),
            )),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "vision_cfg needs both res_layers and res_width (PIR) or neither".into(),
                ))
            }
        };
        if instruction.is_some() && !matches!(vision, VisionTower::Vit { .. }) {
            return Err(Error::Config(
                "PIR's instruction encoder needs a ViT vision tower".into(),
            ));
        }
        let hf = match tc.get("hf_model_name") {
            Some(n) if !n.is_null() => Some(hf_text(tc, base)?),
            _ => None,
        };
        if let Some(hf) = hf {
            if tc.get("lca").is_some_and(|l| !l.is_null()) {
                return Err(Error::Config(
                    "text_cfg.lca (the Temporal-PAE) needs CLIP's text transformer, not hf_model_name"
                        .into(),
                ));
            }
            let context_length = tc
                .get("context_length")
                .and_then(Value::as_u64)
                .unwrap_or(77) as usize;
            if context_length < 2 || context_length > hf.bert.max_position_embeddings {
                return Err(Error::Config(format!(
                    "text_cfg.context_length {context_length} must be between 2 and {}'s {} positions",
                    hf.model_name, hf.bert.max_position_embeddings
                )));
            }
            return Ok(ModelConfig {
                name: name.to_string(),
                embed_dim,
                quick_gelu,
                image_size,
                vision,
                vision_mlp_ratio: 4.0,
                instruction,
                text: TextConfig {
                    context_length,
                    vocab_size: hf.bert.vocab_size,
                    width: hf.bert.hidden_size,
                    heads: hf.bert.num_attention_heads,
                    layers: hf.bert.num_hidden_layers,
                    mlp_ratio: hf.bert.intermediate_size as f64 / hf.bert.hidden_size as f64,
                    lca: None,
                    hf: Some(hf),
                },
            });
        }
        let text = TextConfig {
            hf: None,
            context_length: usize_field(tc, "context_length", "text_cfg")?,
            vocab_size: usize_field(tc, "vocab_size", "text_cfg")?,
            width: usize_field(tc, "width", "text_cfg")?,
            heads: usize_field(tc, "heads", "text_cfg")?,
            layers: usize_field(tc, "layers", "text_cfg")?,
            mlp_ratio: tc.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0),
            lca: match tc.get("lca") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let lca: LcaConfig = serde_json::from_value(v.clone())
                        .map_err(|e| Error::Config(format!("text_cfg.lca: {e}")))?;
                    check_blocks("text_cfg.lca", embed_dim, lca.heads, lca.dropout)?;
                    Some(lca)
                }
            },
        };
        if text.width % text.heads != 0 {
            return Err(Error::Config(format!(
                "text width {} is not a multiple of heads {}",
                text.width, text.heads
            )));
        }
        Ok(ModelConfig {
            name: name.to_string(),
            embed_dim,
            quick_gelu,
            image_size,
            vision,
            vision_mlp_ratio: vc.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0),
            instruction,
            text,
        })
    }

    /// The text tower's tokenizer, as open_clip's `get_tokenizer` gives it for this config.
    pub fn tokenizer(&self) -> pirclip_text::TextTokenizer {
        match &self.text.hf {
            None => pirclip_text::TextTokenizer::Clip,
            Some(hf) => pirclip_text::TextTokenizer::Hf(hf.tokenizer.clone()),
        }
    }

    pub fn vision_width(&self) -> usize {
        match self.vision {
            VisionTower::Vit { width, .. } | VisionTower::ModifiedResNet { width, .. } => width,
            VisionTower::TimmEfficientNetLite { .. } => 1280,
        }
    }

    pub fn vision_head_width(&self) -> usize {
        match self.vision {
            VisionTower::Vit { head_width, .. }
            | VisionTower::ModifiedResNet { head_width, .. } => head_width,
            VisionTower::TimmEfficientNetLite { .. } => 64,
        }
    }

    pub fn family(&self) -> &'static str {
        match (&self.instruction, &self.vision) {
            (Some(_), _) => "PIR-CLIP (ViT + instruction ResNet)",
            (None, VisionTower::Vit { .. }) => "CLIP ViT",
            (None, VisionTower::ModifiedResNet { .. }) => "CLIP ModifiedResNet",
            (None, VisionTower::TimmEfficientNetLite { .. }) => "CLIP EfficientNet-Lite (timm)",
        }
    }
}
