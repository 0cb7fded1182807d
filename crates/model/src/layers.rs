//! Building blocks shared by the towers (spec §3.2): LayerNorm, Linear, multi-head attention with
//! `in_proj` weights, the pre-LN residual block, a transformer stack, and BatchNorm in both modes.

use tch::{Kind, Tensor};

use crate::params::{Init, Registry};

/// How BatchNorm layers normalise (spec §3.2, §7.3, P2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Running statistics (PyTorch eval mode); the right choice for deployment and new models.
    #[default]
    Running,
    /// Statistics of the current batch without touching the running ones: what the official `retrieval.py`
    /// computes, since it never calls `model.eval()`.
    Batch,
    /// Training: batch statistics, and the running statistics are updated (momentum 0.1, unbiased variance).
    Train,
    /// Training with statistics over the global batch of every rank (`--use-bn-sync`, PyTorch's
    /// SyncBatchNorm): sums are added up over the ranks, differentiably.
    TrainSync(RankSum),
}

/// How SyncBatchNorm adds a tensor up over the ranks of a data-parallel run: a differentiable
/// all-reduce that the data-parallel layer (`pirclip-dist`) hands in. The model knows nothing of process
/// groups; this is a borrowed handle (a context and a function) small enough to ride in a [`BnMode`].
#[derive(Clone, Copy)]
pub struct RankSum {
    context: *mut std::ffi::c_void,
    pub rank: usize,
    pub world_size: usize,
    sum: fn(&RankSum, &Tensor) -> Result<Tensor, String>,
}

// SAFETY: `RankSum::new`'s contract: the context is usable from any thread while the handle lives.
unsafe impl Send for RankSum {}
unsafe impl Sync for RankSum {}

impl RankSum {
    /// # Safety
    /// `context` must stay valid, and usable from any thread, for as long as the handle is used; `sum`
    /// must accept it.
    pub unsafe fn new(
        context: *mut std::ffi::c_void,
        rank: usize,
        world_size: usize,
        sum: fn(&RankSum, &Tensor) -> Result<Tensor, String>,
    ) -> Self {
        RankSum {
            context,
            rank,
            world_size,
            sum,
        }
    }

    pub fn context(&self) -> *mut std::ffi::c_void {
        self.context
    }

    /// The sum over ranks of `t`; the gradient reaching `t` is the sum of every rank's gradient.
    pub fn sum_over_ranks(&self, t: &Tensor) -> Result<Tensor, String> {
        (self.sum)(self, t)
    }
}

impl std::fmt::Debug for RankSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RankSum(rank {} of {})", self.rank, self.world_size)
    }
}

impl PartialEq for RankSum {
    fn eq(&self, other: &Self) -> bool {
        self.context == other.context
    }
}

impl Eq for RankSum {}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(r: &Registry, dim: i64) -> Self {
        Self::with_eps(r, dim, 1e-5)
    }

    /// With another epsilon than PyTorch's 1e-5 (BERT: 1e-12).
    pub fn with_eps(r: &Registry, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: r.param("weight", &[dim], Init::Ones),
            bias: r.param("bias", &[dim], Init::Zeros),
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Set by `quantize_int8` (inference only): the forward pass then runs fbgemm's int8 GEMM.
    int8: std::sync::OnceLock<crate::native::QuantizedLinear>,
}

impl Linear {
    /// PyTorch's default `nn.Linear` initialisation: U(±1/√fan_in) for weight and bias.
    pub fn new(r: &Registry, inp: i64, out: i64) -> Self {
        let bound = 1.0 / (inp as f64).sqrt();
        Self::from_tensors(
            r.param("weight", &[out, inp], Init::Uniform(bound)),
            Some(r.param("bias", &[out], Init::Uniform(bound))),
        )
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            int8: std::sync::OnceLock::new(),
        }
    }

    pub fn with_init(r: &Registry, inp: i64, out: i64, weight: Init, bias: Init) -> Self {
        Self::from_tensors(
            r.param("weight", &[out, inp], weight),
            Some(r.param("bias", &[out], bias)),
        )
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.int8.get() {
            Some(q) => q.forward(x),
            None => x.linear(&self.weight, self.bias.as_ref()),
        }
    }

    /// Switches this layer to int8 weights (per output channel) with dynamic int8 activations; the fp32
    /// weights stay, so `state_dict` is unchanged. CPU only, no gradients.
    pub fn quantize_int8(&self) -> Result<(), String> {
        if self.int8.get().is_none() {
            let q = crate::native::QuantizedLinear::new(&self.weight, self.bias.as_ref())?;
            let _ = self.int8.set(q);
        }
        Ok(())
    }
}

/// Scaled dot-product attention over `heads` heads: `q` `[N, Lq, D]`, `k`/`v` `[N, L, D]` → `[N, Lq, D]`.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    causal: bool,
) -> Tensor {
    let split = |t: &Tensor| {
        let (n, l, d) = t.size3().unwrap();
        t.view([n, l, heads, d / heads]).transpose(1, 2)
    };
    let o = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    );
    let (n, lq, d) = q.size3().unwrap();
    o.transpose(1, 2).reshape([n, lq, d])
}

/// The same over keys where `keep` `[N, L]` is true (padding masked out), with dropout `p` on the
/// attention probabilities (training).
pub fn multi_head_attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    keep: &Tensor,
    p: f64,
) -> Tensor {
    let split = |t: &Tensor| {
        let (n, l, d) = t.size3().unwrap();
        t.view([n, l, heads, d / heads]).transpose(1, 2)
    };
    let (n, l) = keep.size2().unwrap();
    let mask = keep.view([n, 1, 1, l]);
    let o = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        Some(mask),
        p,
        false,
        None,
        false,
    );
    let (n, lq, d) = q.size3().unwrap();
    o.transpose(1, 2).reshape([n, lq, d])
}

/// `nn.MultiheadAttention` with packed q/k/v projection (rows q, k, v).
pub struct MultiHeadAttention {
    /// `in_proj_weight` / `in_proj_bias` (rows q, k, v).
    in_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl MultiHeadAttention {
    pub fn new(r: &Registry, width: i64, heads: i64, in_init: Init, out_init: Init) -> Self {
        let in_proj_weight = r.param("in_proj_weight", &[3 * width, width], in_init);
        let in_proj_bias = r.param("in_proj_bias", &[3 * width], Init::Zeros);
        let out_proj = Linear::with_init(&r.sub("out_proj"), width, width, out_init, Init::Zeros);
        MultiHeadAttention {
            in_proj: Linear::from_tensors(in_proj_weight, Some(in_proj_bias)),
            out_proj,
            heads,
        }
    }

    pub fn linears(&self) -> [&Linear; 2] {
        [&self.in_proj, &self.out_proj]
    }

    /// Self-attention over `[N, L, D]`; `causal` applies the text tower's mask.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let qkv = self.in_proj.forward(x).chunk(3, -1);
        self.out_proj.forward(&multi_head_attention(
            &qkv[0], &qkv[1], &qkv[2], self.heads, causal,
        ))
    }
}

pub fn gelu(x: &Tensor, quick: bool) -> Tensor {
    if quick {
        x * (x * 1.702).sigmoid()
    } else {
        x.gelu("none")
    }
}

/// Pre-LN residual block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
pub struct ResidualBlock {
    ln_1: LayerNorm,
    attn: MultiHeadAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    quick_gelu: bool,
}

/// Initialisation scheme of a transformer stack (spec §3.10: the ViT keeps PyTorch defaults, the text
/// tower uses CLIP's normal initialisation).
#[derive(Debug, Clone, Copy)]
pub enum TransformerInit {
    PyTorchDefault,
    ClipText { layers: i64 },
}

impl ResidualBlock {
    pub fn new(
        r: &Registry,
        width: i64,
        heads: i64,
        mlp_width: i64,
        quick_gelu: bool,
        init: TransformerInit,
    ) -> Self {
        let w = width as f64;
        let (in_init, out_init, fc_init, proj_init) = match init {
            TransformerInit::PyTorchDefault => (
                Init::Uniform((6.0 / (4.0 * w)).sqrt()), // xavier_uniform on [3D, D]
                Init::Uniform(1.0 / w.sqrt()),
                Init::Uniform(1.0 / w.sqrt()),
                Init::Uniform(1.0 / (mlp_width as f64).sqrt()),
            ),
            TransformerInit::ClipText { layers } => {
                let proj_std = w.powf(-0.5) * (2.0 * layers as f64).powf(-0.5);
                (
                    Init::Normal(w.powf(-0.5)),
                    Init::Normal(proj_std),
                    Init::Normal((2.0 * w).powf(-0.5)),
                    Init::Normal(proj_std),
                )
            }
        };
        let ln_1 = LayerNorm::new(&r.sub("ln_1"), width);
        let attn = MultiHeadAttention::new(&r.sub("attn"), width, heads, in_init, out_init);
        let ln_2 = LayerNorm::new(&r.sub("ln_2"), width);
        let mlp = r.sub("mlp");
        let c_fc = Linear::with_init(
            &mlp.sub("c_fc"),
            width,
            mlp_width,
            fc_init,
            Init::Uniform(1.0 / w.sqrt()),
        );
        let c_proj = Linear::with_init(
            &mlp.sub("c_proj"),
            mlp_width,
            width,
            proj_init,
            Init::Uniform(1.0 / (mlp_width as f64).sqrt()),
        );
        ResidualBlock {
            ln_1,
            attn,
            ln_2,
            c_fc,
            c_proj,
            quick_gelu,
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut l = self.attn.linears().to_vec();
        l.extend([&self.c_fc, &self.c_proj]);
        l
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), causal);
        let h = gelu(&self.c_fc.forward(&self.ln_2.forward(&x)), self.quick_gelu);
        x + self.c_proj.forward(&h)
    }
}

pub struct Transformer {
    blocks: Vec<ResidualBlock>,
}

impl Transformer {
    pub fn new(
        r: &Registry,
        width: i64,
        layers: i64,
        heads: i64,
        mlp_width: i64,
        quick_gelu: bool,
        init: TransformerInit,
    ) -> Self {
        let rb = r.sub("resblocks");
        let blocks = (0..layers)
            .map(|i| ResidualBlock::new(&rb.sub(i), width, heads, mlp_width, quick_gelu, init))
            .collect();
        Transformer { blocks }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        self.blocks.iter().flat_map(|b| b.linears()).collect()
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for b in &self.blocks {
            x = b.forward(&x, causal);
        }
        x
    }
}

/// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1) with the saved buffers, including `num_batches_tracked`.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    pub fn new(r: &Registry, channels: i64, weight_init: Init) -> Self {
        Self::with_eps_momentum(r, channels, weight_init, 1e-5, 0.1)
    }

    /// With TensorFlow-trained models' statistics settings (EfficientNet: eps 1e-3, momentum 0.01).
    pub fn with_eps_momentum(
        r: &Registry,
        channels: i64,
        weight_init: Init,
        eps: f64,
        momentum: f64,
    ) -> Self {
        BatchNorm {
            eps,
            momentum,
            weight: r.param("weight", &[channels], weight_init),
            bias: r.param("bias", &[channels], Init::Zeros),
            running_mean: r.buffer("running_mean", &[channels], Kind::Float, Init::Zeros),
            running_var: r.buffer("running_var", &[channels], Kind::Float, Init::Ones),
            num_batches_tracked: r.buffer("num_batches_tracked", &[], Kind::Int64, Init::Zeros),
        }
    }

    /// Per-channel `(scale, shift)` with `bn(x) = x·scale + shift` under the running statistics.
    pub fn affine_of_running_stats(&self) -> (Tensor, Tensor) {
        let scale = &self.weight * (&self.running_var + self.eps).rsqrt();
        let shift = &self.bias - &self.running_mean * &scale;
        (scale, shift)
    }

    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        if let BnMode::TrainSync(group) = mode {
            return self.forward_synchronised(x, group);
        }
        // Running: normalise with the stored statistics. Batch: batch statistics, stored ones untouched
        // (passing none). Train: batch statistics, stored ones updated in place by the kernel.
        let (stats, training) = match mode {
            BnMode::Running => (Some((&self.running_mean, &self.running_var)), false),
            BnMode::Batch => (None, true),
            BnMode::Train => {
                let _ = tch::no_grad(|| self.num_batches_tracked.shallow_clone().g_add_scalar_(1));
                (Some((&self.running_mean, &self.running_var)), true)
            }
            BnMode::TrainSync(_) => unreachable!("handled above"),
        };
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            stats.map(|s| s.0),
            stats.map(|s| s.1),
            training,
            self.momentum,
            self.eps,
            true,
        )
    }
}

impl BatchNorm {
    /// SyncBatchNorm: every rank normalises with the mean and (biased) variance of the global batch and
    /// stores the unbiased one, as one process holding the whole batch would. Two sums over the ranks:
    /// of x (with the element count) for the mean, then of the squared deviations from it for the
    /// variance. torch's SyncBatchNorm combines per-rank Welford statistics; a single sum of x² would
    /// lose the variance to cancellation where the mean is large against the spread (deep layers on
    /// small batches, where BatchNorm then amplifies the error). The sums go through a differentiable
    /// all-reduce, so gradients reach every rank's inputs through the shared statistics.
    fn forward_synchronised(&self, x: &Tensor, group: RankSum) -> Tensor {
        let channels = x.size()[1];
        let dims: &[i64] = &[0, 2, 3];
        let shape = [1, channels, 1, 1];
        let count = (x.numel() as i64 / channels) as f64;
        let sum_over_ranks = |t: &Tensor| {
            group
                .sum_over_ranks(t)
                .unwrap_or_else(|e| panic!("SyncBatchNorm: {e}"))
        };
        let local = Tensor::cat(
            &[
                x.sum_dim_intlist(dims, false, Kind::Float),
                Tensor::full([1], count, (Kind::Float, x.device())),
            ],
            0,
        );
        let global = sum_over_ranks(&local);
        let n = global.narrow(0, channels, 1);
        let mean = global.narrow(0, 0, channels) / &n;
        let centred = x.to_kind(Kind::Float) - mean.view(shape);
        let var =
            sum_over_ranks(&(&centred * &centred).sum_dim_intlist(dims, false, Kind::Float)) / &n;
        tch::no_grad(|| {
            let n = n.double_value(&[0]);
            let unbiased = &var * (n / (n - 1.0).max(1.0));
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            let m = self.momentum;
            let _ = self
                .running_mean
                .shallow_clone()
                .g_mul_scalar_(1.0 - m)
                .g_add_(&(&mean * m));
            let _ = self
                .running_var
                .shallow_clone()
                .g_mul_scalar_(1.0 - m)
                .g_add_(&(unbiased * m));
        });
        let scale = (var + self.eps).rsqrt() * &self.weight;
        (centred * scale.view(shape) + self.bias.view(shape)).to_kind(x.kind())
    }
}
