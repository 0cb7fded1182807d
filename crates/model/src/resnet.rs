//! open_clip's `ModifiedResNet` (spec §3.3): 3-conv stem, anti-aliased Bottlenecks (strided by average
//! pooling), and a QKV attention pool. It is CLIP's RN50 image tower and PIR-CLIP's instruction encoder.

use tch::Tensor;

use crate::layers::{multi_head_attention, BatchNorm, BnMode, Linear};
use crate::params::{Init, Registry};

fn conv(r: &Registry, name: &str, inp: i64, out: i64, k: i64) -> Tensor {
    // PyTorch's default conv init (kaiming_uniform, a = √5) is U(±1/√fan_in).
    r.param(
        name,
        &[out, inp, k, k],
        Init::Uniform(1.0 / ((inp * k * k) as f64).sqrt()),
    )
}

/// Bias-free convolution (stride, padding symmetric) followed by BatchNorm. For inference with running
/// statistics the BatchNorm can be folded into the convolution (`fold_batchnorm`): one pass over the
/// activations instead of two, equal up to float rounding.
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    stride: i64,
    padding: i64,
    /// Folded weight and bias, in channels-last layout (oneDNN's fast path on CPU).
    folded: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl ConvBn {
    fn new(
        r: &Registry,
        conv_name: &str,
        bn_name: &str,
        inp: i64,
        out: i64,
        k: i64,
        stride: i64,
        bn_init: Init,
    ) -> Self {
        ConvBn {
            weight: conv(r, conv_name, inp, out, k),
            bn: BatchNorm::new(&r.sub(bn_name), out, bn_init),
            stride,
            padding: k / 2,
            folded: std::sync::OnceLock::new(),
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let conv = |w: &Tensor, b: Option<&Tensor>| {
            x.conv2d(
                w,
                b,
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            )
        };
        match (mode, self.folded.get()) {
            (BnMode::Running, Some((w, b))) => conv(w, Some(b)),
            _ => self.bn.forward(&conv(&self.weight, None), mode),
        }
    }

    fn fold(&self) {
        let _guard = tch::no_grad_guard();
        let (scale, shift) = self.bn.affine_of_running_stats();
        let w = &self.weight * scale.view([-1, 1, 1, 1]);
        let _ = self.folded.set((channels_last(&w), shift));
    }
}

/// The same tensor laid out NHWC in memory (PyTorch's channels_last), which oneDNN convolutions prefer;
/// convolutions keep the layout of their input, so one conversion at the stem carries through.
fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// `nn.ReLU(inplace=True)` and the residual `out += identity`, as open_clip's ModifiedResNet: BatchNorm's
/// and the sum's outputs are not needed by their backward, and writing in place spares a fresh
/// activation-sized buffer per call, whose page faults cost more than the arithmetic on the CPU.
fn relu_in_place(mut x: Tensor) -> Tensor {
    let _ = x.relu_();
    x
}

/// `nn.AvgPool2d(k)`: kernel = stride = k, no padding.
fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
}

struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
    stride: i64,
}

impl Bottleneck {
    fn new(r: &Registry, inplanes: i64, planes: i64, stride: i64) -> Self {
        // Registration order = open_clip's state-dict order: conv1, bn1, conv2, bn2, conv3, bn3, downsample.
        let conv1 = ConvBn::new(r, "conv1.weight", "bn1", inplanes, planes, 1, 1, Init::Ones);
        let conv2 = ConvBn::new(r, "conv2.weight", "bn2", planes, planes, 3, 1, Init::Ones);
        // open_clip zero-initialises the last BN of every block so each block starts as identity.
        let conv3 = ConvBn::new(
            r,
            "conv3.weight",
            "bn3",
            planes,
            planes * 4,
            1,
            1,
            Init::Zeros,
        );
        let downsample = (stride > 1 || inplanes != planes * 4).then(|| {
            let d = r.sub("downsample");
            ConvBn::new(&d, "0.weight", "1", inplanes, planes * 4, 1, 1, Init::Ones)
        });
        Bottleneck {
            conv1,
            conv2,
            conv3,
            downsample,
            stride,
        }
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        [&self.conv1, &self.conv2, &self.conv3]
            .into_iter()
            .chain(self.downsample.as_ref())
    }

    fn forward(&self, x: &Tensor, bn: BnMode) -> Tensor {
        let o = relu_in_place(self.conv1.forward(x, bn));
        let mut o = relu_in_place(self.conv2.forward(&o, bn));
        if self.stride > 1 {
            o = avg_pool(&o, self.stride);
        }
        let mut o = self.conv3.forward(&o, bn);
        let identity = match &self.downsample {
            None => x.shallow_clone(),
            Some(d) => {
                let pooled = if self.stride > 1 {
                    avg_pool(x, self.stride)
                } else {
                    x.shallow_clone()
                };
                d.forward(&pooled, bn)
            }
        };
        let _ = o.g_add_(&identity);
        relu_in_place(o)
    }
}

/// CLIP's attention pooling: the mean token (plus positions) queries all tokens; output `[N, output_dim]`.
struct AttentionPool {
    positional_embedding: Tensor,
    k_proj: Linear,
    q_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: i64,
}

impl AttentionPool {
    fn new(r: &Registry, spatial: i64, dim: i64, heads: i64, output_dim: i64) -> Self {
        let std = (dim as f64).powf(-0.5);
        let bias = Init::Uniform(1.0 / (dim as f64).sqrt());
        AttentionPool {
            positional_embedding: r.param(
                "positional_embedding",
                &[spatial * spatial + 1, dim],
                Init::Normal(std),
            ),
            k_proj: Linear::with_init(&r.sub("k_proj"), dim, dim, Init::Normal(std), bias),
            q_proj: Linear::with_init(&r.sub("q_proj"), dim, dim, Init::Normal(std), bias),
            v_proj: Linear::with_init(&r.sub("v_proj"), dim, dim, Init::Normal(std), bias),
            c_proj: Linear::with_init(&r.sub("c_proj"), dim, output_dim, Init::Normal(std), bias),
            heads,
        }
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.c_proj]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, _, _) = x.size4().unwrap();
        let tokens = x.flatten(2, 3).transpose(1, 2); // [N, HW, C]
        let tokens =
            Tensor::cat(&[tokens.mean_dim(1, true, None), tokens], 1) + &self.positional_embedding;
        // Only the mean token's query matters (spec §3.3).
        let q = self.q_proj.forward(&tokens.narrow(1, 0, 1));
        let o = multi_head_attention(
            &q,
            &self.k_proj.forward(&tokens),
            &self.v_proj.forward(&tokens),
            self.heads,
            false,
        );
        self.c_proj.forward(&o.reshape([n, c]))
    }
}

pub struct ModifiedResNet {
    stem: [ConvBn; 3],
    layers: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool,
}

impl ModifiedResNet {
    /// `heads` of the attention pool is `width·32 / head_width` in open_clip (derived by the caller).
    pub fn new(
        r: &Registry,
        layers: [usize; 4],
        width: i64,
        heads: i64,
        output_dim: i64,
        image_size: i64,
    ) -> Self {
        let stem = [
            ConvBn::new(r, "conv1.weight", "bn1", 3, width / 2, 3, 2, Init::Ones),
            ConvBn::new(
                r,
                "conv2.weight",
                "bn2",
                width / 2,
                width / 2,
                3,
                1,
                Init::Ones,
            ),
            ConvBn::new(r, "conv3.weight", "bn3", width / 2, width, 3, 1, Init::Ones),
        ];
        let mut inplanes = width;
        let mut stages = Vec::new();
        for (i, &blocks) in layers.iter().enumerate() {
            let planes = width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let lr = r.sub(format!("layer{}", i + 1));
            let mut stage = vec![Bottleneck::new(&lr.sub(0), inplanes, planes, stride)];
            inplanes = planes * 4;
            for j in 1..blocks {
                stage.push(Bottleneck::new(&lr.sub(j), inplanes, planes, 1));
            }
            stages.push(stage);
        }
        let attnpool = AttentionPool::new(
            &r.sub("attnpool"),
            image_size / 32,
            width * 32,
            heads,
            output_dim,
        );
        ModifiedResNet {
            stem,
            layers: stages,
            attnpool,
        }
    }

    /// The attention pool's projections (the convolutions are not linear layers).
    pub fn linears(&self) -> Vec<&Linear> {
        self.attnpool.linears().to_vec()
    }

    /// Inference with running statistics: folds every BatchNorm into its convolution and switches the
    /// convolutions to channels-last. Call after loading weights and only on a model that is not trained
    /// afterwards (the folded copies do not follow later weight changes; other BN modes are unaffected).
    pub fn fold_batchnorm(&self) {
        for c in self
            .stem
            .iter()
            .chain(self.layers.iter().flatten().flat_map(|b| b.conv_bns()))
        {
            c.fold();
        }
    }

    pub fn forward(&self, x: &Tensor, bn: BnMode) -> Tensor {
        let folded = bn == BnMode::Running && self.stem[0].folded.get().is_some();
        let x = if folded {
            channels_last(x)
        } else {
            x.shallow_clone()
        };
        let mut x = x;
        for c in &self.stem {
            x = relu_in_place(c.forward(&x, bn));
        }
        let mut x = avg_pool(&x, 2);
        for stage in &self.layers {
            for block in stage {
                x = block.forward(&x, bn);
            }
        }
        self.attnpool.forward(&x)
    }
}
