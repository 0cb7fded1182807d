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

/// Bias-free convolution (stride, padding symmetric) followed by BatchNorm.
fn conv_bn(
    x: &Tensor,
    weight: &Tensor,
    bn: &BatchNorm,
    stride: i64,
    padding: i64,
    mode: BnMode,
) -> Tensor {
    bn.forward(
        &x.conv2d(
            weight,
            None::<Tensor>,
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        ),
        mode,
    )
}

/// `nn.AvgPool2d(k)`: kernel = stride = k, no padding.
fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
}

struct Bottleneck {
    conv1: Tensor,
    bn1: BatchNorm,
    conv2: Tensor,
    bn2: BatchNorm,
    conv3: Tensor,
    bn3: BatchNorm,
    downsample: Option<(Tensor, BatchNorm)>,
    stride: i64,
}

impl Bottleneck {
    fn new(r: &Registry, inplanes: i64, planes: i64, stride: i64) -> Self {
        let conv1 = conv(r, "conv1.weight", inplanes, planes, 1);
        let bn1 = BatchNorm::new(&r.sub("bn1"), planes, Init::Ones);
        let conv2 = conv(r, "conv2.weight", planes, planes, 3);
        let bn2 = BatchNorm::new(&r.sub("bn2"), planes, Init::Ones);
        let conv3 = conv(r, "conv3.weight", planes, planes * 4, 1);
        // open_clip zero-initialises the last BN of every block so each block starts as identity.
        let bn3 = BatchNorm::new(&r.sub("bn3"), planes * 4, Init::Zeros);
        let downsample = (stride > 1 || inplanes != planes * 4).then(|| {
            let d = r.sub("downsample");
            (
                conv(&d, "0.weight", inplanes, planes * 4, 1),
                BatchNorm::new(&d.sub("1"), planes * 4, Init::Ones),
            )
        });
        Bottleneck {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            downsample,
            stride,
        }
    }

    fn forward(&self, x: &Tensor, bn: BnMode) -> Tensor {
        let o = conv_bn(x, &self.conv1, &self.bn1, 1, 0, bn).relu();
        let mut o = conv_bn(&o, &self.conv2, &self.bn2, 1, 1, bn).relu();
        if self.stride > 1 {
            o = avg_pool(&o, self.stride);
        }
        let o = conv_bn(&o, &self.conv3, &self.bn3, 1, 0, bn);
        let identity = match &self.downsample {
            None => x.shallow_clone(),
            Some((w, dbn)) => {
                let pooled = if self.stride > 1 {
                    avg_pool(x, self.stride)
                } else {
                    x.shallow_clone()
                };
                conv_bn(&pooled, w, dbn, 1, 0, bn)
            }
        };
        (o + identity).relu()
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
    conv1: Tensor,
    bn1: BatchNorm,
    conv2: Tensor,
    bn2: BatchNorm,
    conv3: Tensor,
    bn3: BatchNorm,
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
        let conv1 = conv(r, "conv1.weight", 3, width / 2, 3);
        let bn1 = BatchNorm::new(&r.sub("bn1"), width / 2, Init::Ones);
        let conv2 = conv(r, "conv2.weight", width / 2, width / 2, 3);
        let bn2 = BatchNorm::new(&r.sub("bn2"), width / 2, Init::Ones);
        let conv3 = conv(r, "conv3.weight", width / 2, width, 3);
        let bn3 = BatchNorm::new(&r.sub("bn3"), width, Init::Ones);
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
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            layers: stages,
            attnpool,
        }
    }

    /// The attention pool's projections (the convolutions are not linear layers).
    pub fn linears(&self) -> Vec<&Linear> {
        self.attnpool.linears().to_vec()
    }

    pub fn forward(&self, x: &Tensor, bn: BnMode) -> Tensor {
        let x = conv_bn(x, &self.conv1, &self.bn1, 2, 1, bn).relu();
        let x = conv_bn(&x, &self.conv2, &self.bn2, 1, 1, bn).relu();
        let x = conv_bn(&x, &self.conv3, &self.bn3, 1, 1, bn).relu();
        let mut x = avg_pool(&x, 2);
        for stage in &self.layers {
            for block in stage {
                x = block.forward(&x, bn);
            }
        }
        self.attnpool.forward(&x)
    }
}
