//! EfficientNet-Lite as timm builds it (`tf_efficientnet_lite0` … `lite4`) and open_clip wraps it
//! (`vision_cfg.timm_model_name`, `TimmModel`): the trunk under `visual.trunk.*` in timm's names, global
//! average pooling, and the head `visual.head.proj` into the joint space.
//!
//! Lite is EfficientNet made for integer hardware: ReLU6 in place of SiLU, no squeeze-excitation, the
//! stem (32) and head (1280) widths fixed while the blocks scale. The `tf_` weights are TensorFlow's,
//! so convolutions pad as TensorFlow's "SAME" (more on the bottom/right where the stride leaves a
//! remainder) and BatchNorm uses eps 1e-3, momentum 0.01.

use std::cell::Cell;

use tch::Tensor;

use crate::layers::{BatchNorm, BnMode, Linear};
use crate::params::{Init, Registry};

const BN_EPS: f64 = 1e-3;
const BN_MOMENTUM: f64 = 0.01;

/// One stage of the base network (Lite0): `repeats` blocks of kernel `kernel`, the first with `stride`,
/// expansion `expand`, `out` channels. The first stage's blocks are depthwise-separable (`ds`), the
/// others inverted residuals (`ir`).
struct Stage {
    repeats: usize,
    kernel: i64,
    stride: i64,
    expand: i64,
    out: i64,
}

const LITE0: [Stage; 7] = [
    Stage {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 1,
        out: 16,
    },
    Stage {
        repeats: 2,
        kernel: 3,
        stride: 2,
        expand: 6,
        out: 24,
    },
    Stage {
        repeats: 2,
        kernel: 5,
        stride: 2,
        expand: 6,
        out: 40,
    },
    Stage {
        repeats: 3,
        kernel: 3,
        stride: 2,
        expand: 6,
        out: 80,
    },
    Stage {
        repeats: 3,
        kernel: 5,
        stride: 1,
        expand: 6,
        out: 112,
    },
    Stage {
        repeats: 4,
        kernel: 5,
        stride: 2,
        expand: 6,
        out: 192,
    },
    Stage {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 6,
        out: 320,
    },
];

/// timm's `tf_efficientnet_lite{0..4}` (width, depth) multipliers.
pub fn lite_multipliers(variant: u8) -> Option<(f64, f64)> {
    Some(match variant {
        0 => (1.0, 1.0),
        1 => (1.0, 1.1),
        2 => (1.1, 1.2),
        3 => (1.2, 1.4),
        4 => (1.4, 1.8),
        _ => return None,
    })
}

/// Channels scaled by `multiplier`, rounded to a multiple of 8 without losing more than 10 %
/// (timm's `round_channels`, TensorFlow's `round_filters`).
fn round_channels(channels: i64, multiplier: f64) -> i64 {
    let scaled = channels as f64 * multiplier;
    let rounded = (((scaled + 4.0) / 8.0) as i64 * 8).max(8);
    if (rounded as f64) < 0.9 * scaled {
        rounded + 8
    } else {
        rounded
    }
}

struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    stride: i64,
    groups: i64,
}

impl ConvBn {
    fn new(
        conv: &Registry,
        bn: &Registry,
        inp: i64,
        out: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
    ) -> Self {
        let fan_out = (out / groups) * kernel * kernel;
        ConvBn {
            weight: conv.param(
                "weight",
                &[out, inp / groups, kernel, kernel],
                Init::Normal((2.0 / fan_out as f64).sqrt()),
            ),
            bn: BatchNorm::with_eps_momentum(bn, out, Init::Ones, BN_EPS, BN_MOMENTUM),
            stride,
            groups,
        }
    }

    /// Convolution with TensorFlow's "SAME" padding, then BatchNorm, then ReLU6 when `relu`.
    fn forward(&self, x: &Tensor, bn: BnMode, relu: bool) -> Tensor {
        let k = self.weight.size()[2];
        let (h, w) = (x.size()[2], x.size()[3]);
        let pad = |size: i64| ((size + self.stride - 1) / self.stride - 1) * self.stride + k - size;
        let (ph, pw) = (pad(h).max(0), pad(w).max(0));
        let x = if ph > 0 || pw > 0 {
            x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
        } else {
            x.shallow_clone()
        };
        let y = x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [0, 0],
            [1, 1],
            self.groups,
        );
        let y = self.bn.forward(&y, bn);
        if relu {
            y.clamp(0.0, 6.0)
        } else {
            y
        }
    }
}

/// A depthwise-separable block (expansion 1) or an inverted residual (`expand` 1×1, depthwise, linear
/// 1×1 projection), with the identity added where shapes allow.
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl Block {
    fn new(r: &Registry, inp: i64, out: i64, kernel: i64, stride: i64, expand: i64) -> Self {
        let mid = inp * expand;
        let residual = stride == 1 && inp == out;
        // (conv, its BatchNorm) names, input and output channels, kernel, stride, groups.
        let conv = |names: (&str, &str), i: i64, o: i64, k: i64, s: i64, g: i64| {
            ConvBn::new(&r.sub(names.0), &r.sub(names.1), i, o, k, s, g)
        };
        if expand == 1 {
            // timm's DepthwiseSeparableConv: conv_dw/bn1, conv_pw/bn2.
            return Block {
                expand: None,
                depthwise: conv(("conv_dw", "bn1"), inp, inp, kernel, stride, inp),
                project: conv(("conv_pw", "bn2"), inp, out, 1, 1, 1),
                residual,
            };
        }
        // timm's InvertedResidual: conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3.
        Block {
            expand: Some(conv(("conv_pw", "bn1"), inp, mid, 1, 1, 1)),
            depthwise: conv(("conv_dw", "bn2"), mid, mid, kernel, stride, mid),
            project: conv(("conv_pwl", "bn3"), mid, out, 1, 1, 1),
            residual,
        }
    }

    fn forward(&self, x: &Tensor, bn: BnMode) -> Tensor {
        let h = match &self.expand {
            Some(e) => e.forward(x, bn, true),
            None => x.shallow_clone(),
        };
        let y = self
            .project
            .forward(&self.depthwise.forward(&h, bn, true), bn, false);
        if self.residual {
            y + x
        } else {
            y
        }
    }
}

/// The trunk: stem, stages, head convolution; `features` pools it to `[N, 1280]`.
pub struct EfficientNetLite {
    stem: ConvBn,
    /// Stage by stage (`blocks.{stage}.{block}`).
    blocks: Vec<Vec<Block>>,
    head: ConvBn,
    /// ImageNet logits (`classifier`), only in the standalone network (`with_classifier`).
    classifier: Option<Linear>,
    pub features: i64,
    /// Parameter groups (stem, blocks, head convolution: see [`trunk_group`]) whose BatchNorm uses its
    /// running statistics whatever the mode, counted from the stem: open_clip's `freeze_bn_stats`.
    frozen_bn_groups: Cell<usize>,
}

impl EfficientNetLite {
    /// timm's `tf_efficientnet_lite{variant}` under `r` (open_clip: `visual.trunk`).
    pub fn new(r: &Registry, variant: u8, classes: Option<i64>) -> Self {
        let (width, _) = lite_multipliers(variant).expect("variant 0..=4");
        let repeats = stage_repeats(variant).expect("variant 0..=4");
        let stem = ConvBn::new(&r.sub("conv_stem"), &r.sub("bn1"), 3, 32, 3, 2, 1);
        let mut inp = 32;
        let blocks = LITE0
            .iter()
            .zip(repeats)
            .enumerate()
            .map(|(s, (stage, repeats))| {
                let out = round_channels(stage.out, width);
                (0..repeats)
                    .map(|b| {
                        let stride = if b == 0 { stage.stride } else { 1 };
                        let block = Block::new(
                            &r.sub(format!("blocks.{s}.{b}")),
                            inp,
                            out,
                            stage.kernel,
                            stride,
                            stage.expand,
                        );
                        inp = out;
                        block
                    })
                    .collect()
            })
            .collect();
        let head = ConvBn::new(&r.sub("conv_head"), &r.sub("bn2"), inp, 1280, 1, 1, 1);
        let classifier = classes.map(|c| Linear::new(&r.sub("classifier"), 1280, c));
        EfficientNetLite {
            stem,
            blocks,
            head,
            classifier,
            features: 1280,
            frozen_bn_groups: Cell::new(0),
        }
    }

    /// From now on the first `groups` parameter groups normalise with their running statistics.
    pub fn freeze_bn_stats(&self, groups: usize) {
        self.frozen_bn_groups.set(groups);
    }

    /// Globally average-pooled features `[N, 1280]` of images `[N, 3, H, W]`.
    pub fn features(&self, images: &Tensor, bn: BnMode) -> Tensor {
        let frozen = self.frozen_bn_groups.get();
        let mode = |group: usize| if group < frozen { BnMode::Running } else { bn };
        let mut x = self.stem.forward(images, mode(0), true);
        for (i, block) in self.blocks.iter().flatten().enumerate() {
            x = block.forward(&x, mode(1 + i));
        }
        let x = self.head.forward(&x, mode(1 + self.block_count()), true);
        x.mean_dim([2i64, 3].as_slice(), false, x.kind())
    }

    pub fn block_count(&self) -> usize {
        self.blocks.iter().map(Vec::len).sum()
    }

    /// ImageNet logits (a network built `with_classifier`).
    pub fn logits(&self, images: &Tensor) -> Option<Tensor> {
        let c = self.classifier.as_ref()?;
        Some(c.forward(&self.features(images, BnMode::Running)))
    }
}

/// timm's parameter group of the trunk tensor `name` (`visual.trunk.…`) of a model with a timm tower,
/// as `group_matcher(coarse=False)` numbers them for open_clip's `lock`: the stem 0, each block in
/// order, the head convolution last; with the number of groups.
pub fn trunk_group(name: &str, config: &crate::ModelConfig) -> Option<(usize, usize)> {
    let crate::config::VisionTower::TimmEfficientNetLite { variant, .. } = config.vision else {
        return None;
    };
    let repeats = stage_repeats(variant)?;
    let blocks: usize = repeats.iter().sum();
    let rest = name.strip_prefix("visual.trunk.")?;
    if rest.starts_with("conv_stem.") || rest.starts_with("bn1.") {
        return Some((0, blocks + 2));
    }
    if rest.starts_with("conv_head.") || rest.starts_with("bn2.") {
        return Some((blocks + 1, blocks + 2));
    }
    let mut parts = rest.strip_prefix("blocks.")?.split('.');
    let stage: usize = parts.next()?.parse().ok()?;
    let block: usize = parts.next()?.parse().ok()?;
    let before: usize = repeats.get(..stage)?.iter().sum();
    Some((1 + before + block, blocks + 2))
}

/// Blocks per stage of `tf_efficientnet_lite{variant}`: Lite keeps the first and last stages' depth,
/// the others scale, rounded up.
fn stage_repeats(variant: u8) -> Option<Vec<usize>> {
    let (_, depth) = lite_multipliers(variant)?;
    let last = LITE0.len() - 1;
    Some(
        LITE0
            .iter()
            .enumerate()
            .map(|(s, st)| {
                if s == 0 || s == last {
                    st.repeats
                } else {
                    (st.repeats as f64 * depth).ceil() as usize
                }
            })
            .collect(),
    )
}

/// open_clip's `TimmModel` with `timm_pool = "avg"`: the trunk's pooled features through the head's
/// projection (`head.proj`, no bias unless `timm_proj_bias`).
pub struct TimmVisual {
    pub trunk: EfficientNetLite,
    proj: Linear,
}

impl TimmVisual {
    pub fn new(r: &Registry, variant: u8, embed_dim: i64, proj_bias: bool) -> Self {
        let trunk = EfficientNetLite::new(&r.sub("trunk"), variant, None);
        let p = r.sub("head.proj");
        let bound = 1.0 / (trunk.features as f64).sqrt();
        let weight = p.param("weight", &[embed_dim, trunk.features], Init::Uniform(bound));
        let bias = proj_bias.then(|| p.param("bias", &[embed_dim], Init::Uniform(bound)));
        TimmVisual {
            trunk,
            proj: Linear::from_tensors(weight, bias),
        }
    }

    pub fn forward(&self, images: &Tensor, bn: BnMode) -> Tensor {
        self.proj.forward(&self.trunk.features(images, bn))
    }

    pub fn linears(&self) -> Vec<&Linear> {
        vec![&self.proj]
    }
}

/// The trunk's names (timm) of the tensors of an `efficientnet_lite_pytorch` / EfficientNet-PyTorch
/// checkpoint (`_conv_stem`, `_blocks.{i}._expand_conv`, …): blocks are numbered through, timm numbers
/// them per stage; a block's BatchNorms shift by one where it has no expansion. Names that are not part
/// of the network (none in the Lite0 file) give `None`.
pub fn timm_name_of_lukemelas(name: &str, variant: u8) -> Option<String> {
    let repeats = stage_repeats(variant)?;
    let top = |rest: &str| -> Option<String> {
        let map = [
            ("_conv_stem.", "conv_stem."),
            ("_bn0.", "bn1."),
            ("_conv_head.", "conv_head."),
            ("_bn1.", "bn2."),
            ("_fc.", "classifier."),
        ];
        map.iter()
            .find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))
    };
    let Some(rest) = name.strip_prefix("_blocks.") else {
        return top(name);
    };
    let (index, tail) = rest.split_once('.')?;
    let mut i: usize = index.parse().ok()?;
    let mut stage = 0;
    while stage < repeats.len() && i >= repeats[stage] {
        i -= repeats[stage];
        stage += 1;
    }
    if stage == repeats.len() {
        return None;
    }
    let expanded = LITE0[stage].expand != 1;
    let map: &[(&str, &str)] = if expanded {
        &[
            ("_expand_conv.", "conv_pw."),
            ("_bn0.", "bn1."),
            ("_depthwise_conv.", "conv_dw."),
            ("_bn1.", "bn2."),
            ("_project_conv.", "conv_pwl."),
            ("_bn2.", "bn3."),
        ]
    } else {
        &[
            ("_depthwise_conv.", "conv_dw."),
            ("_bn1.", "bn1."),
            ("_project_conv.", "conv_pw."),
            ("_bn2.", "bn2."),
        ]
    };
    let (from, to) = map.iter().find(|(from, _)| tail.starts_with(from))?;
    Some(format!("blocks.{stage}.{i}.{to}{}", &tail[from.len()..]))
}
