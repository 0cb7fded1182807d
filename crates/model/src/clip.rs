//! The CLIP model of open_clip, and PIR-CLIP = CLIP ViT + instruction encoder `res_visual` + instruction
//! mapping `vision_proj_res` + VIR (spec §1, §3).

use pirclip_checkpoint::StateDict;
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, VisionTower};
use crate::efficientnet::TimmVisual;
use crate::hf_text::HfTextEncoder;
use crate::layers::{BnMode, Linear};
use crate::pae::{HardVir, Lca};
use crate::params::{self, Init, Registry};
use crate::resnet::ModifiedResNet;
use crate::text::TextTower;
use crate::vit::{BeliefMode, VisionTransformer};
use crate::Error;

/// Inference switches that change numbers (spec P1, P2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    pub bn_mode: BnMode,
    pub belief_mode: BeliefMode,
    /// Training forward: the progressive attention encoders apply their dropout.
    pub dropout: bool,
}

/// Inference arithmetic (`--precision`). Training has its own switch (autocast in the train crate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    Fp32,
    /// Autocast to fp16 (CUDA; on CPU only where the hardware has fp16 arithmetic).
    Fp16,
    /// Autocast to bf16.
    Bf16,
    /// Dynamic int8 linear layers (CPU).
    Int8,
}

pub enum Visual {
    Vit(VisionTransformer),
    ResNet(ModifiedResNet),
    /// open_clip's `TimmModel` over timm's EfficientNet-Lite.
    Timm(TimmVisual),
}

/// The text tower: CLIP's transformer (tensors at the model's top level) or a Hugging Face encoder
/// (under `text.`).
pub enum Text {
    Clip(TextTower),
    Hf(HfTextEncoder),
}

impl Text {
    /// Unnormalised features of token ids `[N, L]` (see `TextTower::forward` for `truncate`; the HF
    /// encoder always skips trailing padding).
    pub fn forward(&self, ids: &Tensor, truncate: bool) -> Tensor {
        match self {
            Text::Clip(t) => t.forward(ids, truncate),
            Text::Hf(t) => t.forward(ids, false),
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Text::Clip(t) => t.linears(),
            Text::Hf(t) => t.linears(),
        }
    }
}

/// PIR-CLIP's instruction path: scene-prior ResNet, and either the mapping of its output to one
/// ViT-width token (soft VIR) or the hard-filter Spatial-PAE, which uses it in the joint space.
pub struct InstructionEncoder {
    pub res_visual: ModifiedResNet,
    pub spatial: Spatial,
}

/// How the instruction selects patch tokens.
pub enum Spatial {
    /// Soft-belief VIR, through the instruction token `vision_proj_res(res_visual(x))`.
    Soft { vision_proj_res: Linear },
    /// Hard-filter Spatial-PAE (`vision_cfg.vir = "hard"`).
    Hard(HardVir),
}

pub struct ClipModel {
    pub config: ModelConfig,
    registry: Registry,
    pub visual: Visual,
    pub instruction: Option<InstructionEncoder>,
    pub text: Text,
    /// Temporal-PAE (`text_cfg.lca`).
    pub lca: Option<Lca>,
    pub logit_scale: Tensor,
    /// Autocast dtype of `encode_image` / `encode_text` (set by `prepare_for_inference`).
    autocast: Option<Kind>,
}

/// open_clip's `state_dict()` order of the top-level groups.
fn group_rank(name: &str) -> usize {
    const ORDER: [&str; 11] = [
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "vision_proj_res.",
        "visual.",
        "res_visual.",
        "spatial_pae.",
        "transformer.",
        "token_embedding.",
        "ln_final.",
        "temporal_pae.",
    ];
    ORDER
        .iter()
        .position(|p| {
            if p.ends_with('.') {
                name.starts_with(p)
            } else {
                name == *p
            }
        })
        .unwrap_or(ORDER.len())
}

impl ClipModel {
    /// Builds the model with zeroed tensors; load a checkpoint or call `init::initialize` next.
    pub fn new(config: &ModelConfig, device: Device) -> Self {
        let r = Registry::new(device);
        let embed = config.embed_dim as i64;
        let text = match &config.text.hf {
            None => Text::Clip(TextTower::new(&r, &config.text, embed, config.quick_gelu)),
            Some(hf) => Text::Hf(HfTextEncoder::new(&r.sub("text"), hf, embed)),
        };
        let logit_scale = r.param("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln()));
        let vision_width = config.vision_width() as i64;
        let visual = match &config.vision {
            VisionTower::Vit {
                layers,
                width,
                patch_size,
                head_width,
            } => Visual::Vit(VisionTransformer::new(
                &r.sub("visual"),
                config.image_size as i64,
                *patch_size as i64,
                *width as i64,
                *layers as i64,
                (*width / *head_width) as i64,
                (*width as f64 * config.vision_mlp_ratio) as i64,
                embed,
                config.quick_gelu,
            )),
            VisionTower::ModifiedResNet {
                layers,
                width,
                head_width,
            } => Visual::ResNet(ModifiedResNet::new(
                &r.sub("visual"),
                *layers,
                *width as i64,
                (*width * 32 / *head_width) as i64,
                embed,
                config.image_size as i64,
            )),
            VisionTower::TimmEfficientNetLite { variant, proj_bias } => Visual::Timm(
                TimmVisual::new(&r.sub("visual"), *variant, embed, *proj_bias),
            ),
        };
        let instruction = config.instruction.as_ref().map(|ins| {
            // The official code hard-codes Linear(512, 768) and res heads = res_width·32 // head_width; both
            // are derived from the config here (P9) and coincide for PIR.json.
            let heads = (ins.res_width * 32 / config.vision_head_width()) as i64;
            InstructionEncoder {
                res_visual: ModifiedResNet::new(
                    &r.sub("res_visual"),
                    ins.res_layers,
                    ins.res_width as i64,
                    heads,
                    embed,
                    config.image_size as i64,
                ),
                spatial: match &ins.hard_vir {
                    None => Spatial::Soft {
                        vision_proj_res: Linear::new(
                            &r.sub("vision_proj_res"),
                            embed,
                            vision_width,
                        ),
                    },
                    Some(h) => Spatial::Hard(HardVir::new(&r.sub("spatial_pae"), embed, h)),
                },
            }
        });
        let lca = config
            .text
            .lca
            .as_ref()
            .map(|c| Lca::new(&r.sub("temporal_pae"), embed, c));
        r.sort_entries_by_key(|name| group_rank(name));
        ClipModel {
            config: config.clone(),
            registry: r,
            visual,
            instruction,
            text,
            lca,
            logit_scale,
            autocast: None,
        }
    }

    /// For a model that only runs inference from now on: folds the ResNets' BatchNorm (running
    /// statistics) into their convolutions, laid out channels-last (`BnMode::Batch` / `Train` still use
    /// the unfolded layers), and sets the arithmetic of `encode_image` / `encode_text`, whose outputs stay
    /// fp32 tensors.
    pub fn prepare_for_inference(&mut self, precision: Precision) -> Result<(), Error> {
        if let Visual::ResNet(r) = &self.visual {
            r.fold_batchnorm();
        }
        if let Some(i) = &self.instruction {
            i.res_visual.fold_batchnorm();
        }
        self.autocast = match precision {
            Precision::Fp32 | Precision::Int8 => None,
            Precision::Fp16 => Some(Kind::Half),
            Precision::Bf16 => Some(Kind::BFloat16),
        };
        if precision == Precision::Int8 {
            self.quantize_int8()?;
        }
        Ok(())
    }

    fn with_precision(&self, f: impl FnOnce() -> Tensor) -> Tensor {
        match self.autocast {
            Some(kind) => crate::native::autocast(self.device(), kind, f).to_kind(Kind::Float),
            None => f(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn device(&self) -> Device {
        self.registry.device()
    }

    /// Strict load, as `load_state_dict(strict=True)`.
    pub fn load(&self, sd: &StateDict, source: &str) -> Result<(), Error> {
        params::load_strict(&self.registry, sd, source)
    }

    pub fn state_dict(&self) -> StateDict {
        params::state_dict(&self.registry)
    }

    /// Output of the instruction ResNet's attention pool, `[N, embed_dim]`.
    pub fn instruction_features(&self, images: &Tensor, bn: BnMode) -> Option<Tensor> {
        self.instruction
            .as_ref()
            .map(|i| i.res_visual.forward(images, bn))
    }

    /// The soft VIR's instruction token `y`, `[N, vision width]` (`None` without an instruction encoder
    /// or with the hard VIR, which has no such token).
    pub fn instruction_token(&self, images: &Tensor, bn: BnMode) -> Option<Tensor> {
        let i = self.instruction.as_ref()?;
        match &i.spatial {
            Spatial::Soft { vision_proj_res } => {
                Some(vision_proj_res.forward(&i.res_visual.forward(images, bn)))
            }
            Spatial::Hard(_) => None,
        }
    }

    /// Unnormalised image features `[N, embed_dim]` of preprocessed images `[N, 3, S, S]`.
    pub fn encode_image(&self, images: &Tensor, opts: EncodeOptions) -> Tensor {
        self.with_precision(|| match (&self.visual, &self.instruction) {
            (Visual::Vit(vit), Some(ins)) => {
                let c = ins.res_visual.forward(images, opts.bn_mode);
                match &ins.spatial {
                    Spatial::Hard(hard) => {
                        hard.forward(&vit.project_tokens(images), &c, opts.dropout)
                            .features
                    }
                    Spatial::Soft { vision_proj_res } => vit.forward_instructed(
                        images,
                        &vision_proj_res.forward(&c),
                        opts.belief_mode,
                    ),
                }
            }
            (Visual::Vit(vit), None) => vit.forward(images),
            (Visual::ResNet(rn), _) => rn.forward(images, opts.bn_mode),
            (Visual::Timm(t), _) => t.forward(images, opts.bn_mode),
        })
    }

    /// The VIR belief and the projected output tokens of a PIR model's image tower (`None` for models
    /// without an instruction encoder or a ViT image tower). With the hard VIR, token 0 is the image
    /// embedding and the class token's belief is 0 (only patches are ranked).
    pub fn explain(&self, images: &Tensor, opts: EncodeOptions) -> Option<crate::vit::Explanation> {
        let (Visual::Vit(vit), Some(ins)) = (&self.visual, &self.instruction) else {
            return None;
        };
        if let Spatial::Hard(hard) = &ins.spatial {
            let c = ins.res_visual.forward(images, opts.bn_mode);
            let tokens = vit.project_tokens(images);
            let out = hard.forward(&tokens, &c, false);
            let n = out.belief.size()[0];
            let class = Tensor::zeros([n, 1], (Kind::Float, out.belief.device()));
            return Some(crate::vit::Explanation {
                belief: Tensor::cat(&[class, out.belief], 1),
                tokens: Tensor::cat(&[out.features.unsqueeze(1), tokens], 1),
            });
        }
        let y = self.instruction_token(images, opts.bn_mode)?;
        Some(vit.explain_instructed(images, &y, opts.belief_mode))
    }

    /// Unnormalised text features `[N, embed_dim]` of token ids `[N, context]`.
    pub fn encode_text(&self, ids: &Tensor) -> Tensor {
        self.with_precision(|| self.text_features(ids, true, false))
    }

    /// The same in a training forward pass (`dropout` as `EncodeOptions::dropout`).
    pub fn encode_text_train(&self, ids: &Tensor, dropout: bool) -> Tensor {
        self.with_precision(|| self.text_features(ids, true, dropout))
    }

    /// The tokenizer of the text tower, as open_clip's `get_tokenizer` gives it for this config.
    pub fn tokenizer(&self) -> pirclip_text::TextTokenizer {
        self.config.tokenizer()
    }

    /// The same, computing all `context_length` positions like open_clip (for checks).
    pub fn encode_text_full(&self, ids: &Tensor) -> Tensor {
        self.text_features(ids, false, false)
    }

    fn text_features(&self, ids: &Tensor, truncate: bool, dropout: bool) -> Tensor {
        match (&self.text, &self.lca) {
            (Text::Hf(hf), _) => hf.forward(ids, dropout),
            (Text::Clip(text), None) => text.forward(ids, truncate),
            (Text::Clip(text), Some(lca)) => {
                let (tokens, eot) = text.project_tokens(ids, truncate);
                lca.forward(&tokens, &eot, dropout)
            }
        }
    }

    /// Every linear layer (transformer blocks, attention pool, instruction mapping), in model order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.visual {
            Visual::Vit(v) => v.linears(),
            Visual::ResNet(r) => r.linears(),
            Visual::Timm(t) => t.linears(),
        };
        if let Some(i) = &self.instruction {
            out.extend(i.res_visual.linears());
            match &i.spatial {
                Spatial::Soft { vision_proj_res } => out.push(vision_proj_res),
                Spatial::Hard(h) => out.extend(h.linears()),
            }
        }
        out.extend(self.text.linears());
        out.extend(self.lca.iter().flat_map(|l| l.linears()));
        out
    }

    /// `--precision int8`: dynamic int8 quantization of every linear layer (weights per output channel,
    /// activations per tensor at run time, fbgemm). Convolutions, attention products, LayerNorm and the
    /// final projections stay fp32. Inference on CPU only.
    pub fn quantize_int8(&self) -> Result<(), Error> {
        if self.device() != Device::Cpu {
            return Err(Error::Config(
                "int8 runs on the CPU (fbgemm); use fp16/bf16 on CUDA".into(),
            ));
        }
        for l in self.linears() {
            l.quantize_int8().map_err(Error::Config)?;
        }
        Ok(())
    }

    pub fn parameter_count(&self) -> usize {
        self.registry.with_entries(|es| {
            es.iter()
                .filter(|e| e.kind == params::EntryKind::Parameter)
                .map(|e| e.tensor.numel())
                .sum()
        })
    }
}

/// `F.normalize(x, dim=-1)`: L2 along features, norm clamped at 1e-12.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Images as a `[N, 3, S, S]` float tensor on `device` from a flat CHW buffer.
pub fn images_tensor(pixels: &[f32], n: usize, size: usize, device: Device) -> Tensor {
    let shape = [n as i64, 3, size as i64, size as i64];
    assert_eq!(
        pixels.len() as i64,
        shape.iter().product::<i64>(),
        "pixel buffer size"
    );
    if device == Device::Cpu {
        return Tensor::from_slice(pixels).view(shape);
    }
    // Straight from the buffer to the device: a host tensor copy first (`from_slice`) would add a fresh
    // allocation (150 MB for 256 images of 224 px), its page faults and a memcpy to every batch.
    // SAFETY: the blob borrows `pixels`, which outlives it: the blocking (pageable) copy to the device
    // has finished reading it when `to_device` returns, and the blob is dropped then.
    let blob = unsafe {
        Tensor::from_blob(
            pixels.as_ptr() as *const u8,
            &shape,
            &[],
            Kind::Float,
            Device::Cpu,
        )
    };
    blob.to_device(device)
}

/// Token ids as a `[N, context]` int64 tensor.
pub fn ids_tensor(ids: &[i64], n: usize, device: Device) -> Tensor {
    Tensor::from_slice(ids)
        .view([n as i64, -1])
        .to_kind(Kind::Int64)
        .to_device(device)
}
