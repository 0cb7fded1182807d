//! open_clip's `VisionTransformer`, with PIR-CLIP's VIR block (spec §3.5): the instruction token's
//! belief over the patch tokens re-weights them before the transformer, and the image embedding is read
//! from the instruction token's slot.

use tch::{Device, Kind, Tensor};

use crate::layers::{LayerNorm, Transformer, TransformerInit};
use crate::params::{Init, Registry};

/// The two historical VIR re-weightings (spec P1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BeliefMode {
    /// HEAD of the official code (commit 9554baf): `X·(b + 1/√(π+1))`, π = descending argsort of b,
    /// used positionally.
    #[default]
    BeliefPlusIndex,
    /// The code before 2024-10-16 (`X·b + X·b`), which the released checkpoint may have been trained with.
    BeliefOnly,
}

pub struct VisionTransformer {
    class_embedding: Tensor,
    positional_embedding: Tensor,
    proj: Tensor,
    conv1: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    patch_size: i64,
}

impl VisionTransformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        r: &Registry,
        image_size: i64,
        patch_size: i64,
        width: i64,
        layers: i64,
        heads: i64,
        mlp_width: i64,
        output_dim: i64,
        quick_gelu: bool,
    ) -> Self {
        let scale = Init::Normal((width as f64).powf(-0.5));
        let grid = image_size / patch_size;
        // Registration order = open_clip's state-dict order.
        let class_embedding = r.param("class_embedding", &[width], scale);
        let positional_embedding =
            r.param("positional_embedding", &[grid * grid + 1, width], scale);
        let proj = r.param("proj", &[width, output_dim], scale);
        let conv1 = r.param(
            "conv1.weight",
            &[width, 3, patch_size, patch_size],
            Init::Uniform(1.0 / ((3 * patch_size * patch_size) as f64).sqrt()),
        );
        let ln_pre = LayerNorm::new(&r.sub("ln_pre"), width);
        let transformer = Transformer::new(
            &r.sub("transformer"),
            width,
            layers,
            heads,
            mlp_width,
            quick_gelu,
            TransformerInit::PyTorchDefault,
        );
        let ln_post = LayerNorm::new(&r.sub("ln_post"), width);
        VisionTransformer {
            class_embedding,
            positional_embedding,
            proj,
            conv1,
            ln_pre,
            transformer,
            ln_post,
            patch_size,
        }
    }

    pub fn linears(&self) -> Vec<&crate::layers::Linear> {
        self.transformer.linears()
    }

    /// Patch embedding, class token, positions and `ln_pre`: `[N, 1 + grid², width]`.
    pub fn embed(&self, image: &Tensor) -> Tensor {
        let x = image.conv2d(
            &self.conv1,
            None::<Tensor>,
            [self.patch_size, self.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let (n, w, _, _) = x.size4().unwrap();
        let x = x.reshape([n, w, -1]).transpose(1, 2);
        let cls = self
            .class_embedding
            .view([1, 1, w])
            .expand([n, 1, w], true)
            .to_kind(x.kind());
        let x = Tensor::cat(&[cls, x], 1) + &self.positional_embedding;
        self.ln_pre.forward(&x)
    }

    /// The transformer, `ln_post` and the projection of token 0.
    fn head(&self, x: &Tensor) -> Tensor {
        let x = self.ln_post.forward(&self.transformer.forward(x, false));
        x.select(1, 0).matmul(&self.proj)
    }

    /// Plain CLIP image features.
    pub fn forward(&self, image: &Tensor) -> Tensor {
        self.head(&self.embed(image))
    }

    /// Every output token of the plain (uninstructed) tower projected into the joint space,
    /// `[N, 1 + grid², embed]`, class token first: what the hard-filter Spatial-PAE ranks.
    pub fn project_tokens(&self, image: &Tensor) -> Tensor {
        self.ln_post
            .forward(&self.transformer.forward(&self.embed(image), false))
            .matmul(&self.proj)
    }

    /// PIR-CLIP image features, instructed by `instruction` (`[N, width]`).
    pub fn forward_instructed(
        &self,
        image: &Tensor,
        instruction: &Tensor,
        mode: BeliefMode,
    ) -> Tensor {
        let x = self.embed(image);
        let y = instruction.unsqueeze(1);
        self.head(&Tensor::cat(&[&y, &vir(&x, &y, mode)], 1))
    }
}

/// What an explanation shows of one instructed forward pass.
pub struct Explanation {
    /// VIR's belief over the embedded tokens, `[N, L]` (class token first, then the patches row by row).
    pub belief: Tensor,
    /// Every output token projected into the joint space, `[N, 1 + L, embed]` (instruction token first,
    /// then the class token, then the patches): the patches' similarity to a text says where it matches.
    pub tokens: Tensor,
}

impl VisionTransformer {
    /// `forward_instructed`, keeping the belief and every projected output token.
    pub fn explain_instructed(
        &self,
        image: &Tensor,
        instruction: &Tensor,
        mode: BeliefMode,
    ) -> Explanation {
        let x = self.embed(image);
        let y = instruction.unsqueeze(1);
        let belief = x
            .matmul(&y.transpose(1, 2))
            .squeeze_dim(-1)
            .softmax(1, Kind::Float);
        let t = self.ln_post.forward(
            &self
                .transformer
                .forward(&Tensor::cat(&[&y, &vir(&x, &y, mode)], 1), false),
        );
        Explanation {
            belief,
            tokens: t.matmul(&self.proj),
        }
    }
}

/// VIR re-weighting of `x` `[N, L, W]` by the instruction token `y` `[N, 1, W]` (spec §3.5 steps 7–12).
pub fn vir(x: &Tensor, y: &Tensor, mode: BeliefMode) -> Tensor {
    // Belief: softmax over tokens of the raw dot products (no scaling). Only the last axis is squeezed so
    // that a batch of one works (the official `.squeeze()` crashes, P7).
    let belief = x
        .matmul(&y.transpose(1, 2))
        .squeeze_dim(-1)
        .softmax(1, Kind::Float)
        .to_kind(x.kind());
    let factor = match mode {
        BeliefMode::BeliefPlusIndex => {
            // π[n, j] is the index of the token ranked j-th; the weight at position j uses π[n, j] itself.
            // The logits are unscaled and often span > 100, so beliefs underflow to exactly 0 and tie
            // (bundled model: 79 of 256 test images). The spec gives no tie rule and PyTorch's unstable
            // sort orders ties differently on CPU and CUDA, so π is always sorted on the CPU: every device
            // then reproduces the CPU (reference) embeddings. [N, L] is tiny; the copy costs one sync.
            let order = match belief.device() {
                Device::Cpu => belief.argsort(1, true),
                device => belief
                    .to_device(Device::Cpu)
                    .argsort(1, true)
                    .to_device(device),
            };
            belief + (order + 1).to_kind(x.kind()).rsqrt()
        }
        BeliefMode::BeliefOnly => belief,
    };
    let z = x * factor.unsqueeze(-1);
    // L2 normalisation along the token axis (dim 1), per sample and channel (P3).
    let norm = z.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
    z / norm
}
