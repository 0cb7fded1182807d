//! The progressive attention encoders of the PIR paper, on CLIP's towers: the hard-filter Spatial-PAE
//! (image side) and the Temporal-PAE, "language cycle attention" (LCA, text side).
//!
//! The released PIR-CLIP code has neither: its only spatial module is the soft-belief VIR of `vit.rs`.
//! Both come from PIR-ITR (`jaychempan/PIR`, `models/pir.py`), where they sit on Swin and BERT features;
//! here they sit on the projected output tokens of CLIP's towers, in the joint embedding space. Blocks
//! are PIR-ITR's: post-norm residual attention, and a feed-forward net `Linear(d, f) → LayerNorm(f) →
//! GELU → Linear(f, d)` (f = 2d there; configurable here).
//!
//! Adaptations to CLIP, each a choice the Swin/BERT code did not have to make:
//! - Text: BERT pools token 0; CLIP pools the EOT token, so LCA reads and writes the EOT slot. BERT's
//!   caller passes no mask (padding leaks into PIR-ITR's LCA); here keys beyond each caption's EOT are
//!   masked, so an embedding does not depend on the batch's padding or truncation.
//! - Image: the ranking covers the patch tokens only (PIR-ITR's slice `0:50` also ranks Swin's global
//!   token) and orders them by the belief's logits (softmax is monotonic, so the order is the belief's,
//!   without the ties that underflowed beliefs would create). The sort runs on the CPU with a stable
//!   algorithm, so every device picks the same tokens. The instruction is the ResNet's attention-pool
//!   output, already `embed_dim` wide, so PIR-ITR's `conv_proj` is not needed.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::layers::{LayerNorm, Linear};
use crate::params::Registry;

fn default_heads() -> usize {
    8
}

fn default_dropout() -> f64 {
    0.1
}

fn default_rounds() -> usize {
    1
}

/// `text_cfg.lca`: Temporal-PAE on the text tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LcaConfig {
    /// Cycles of self-attention then cross-attention (PIR-ITR's `cycle_num`).
    pub cycles: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    /// Hidden width of each block's feed-forward net (default 2·embed_dim, as PIR-ITR).
    #[serde(default)]
    pub ffn_width: Option<usize>,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

/// `vision_cfg.vir = "hard"` and its fields: the hard-filter Spatial-PAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardVirConfig {
    /// Patch tokens kept after ranking by belief.
    pub filter_size: usize,
    /// Rounds of self-attention then instruction cross-attention (PIR-ITR's `instru_num`).
    #[serde(default = "default_rounds")]
    pub instruction_rounds: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    #[serde(default)]
    pub ffn_width: Option<usize>,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

/// Multi-head attention with separate q/k/v projections and dropout on the attention map (PIR-ITR's
/// `MHAtt`). `allowed` `[N, Lk]` (true = may be attended) masks keys.
struct Attention {
    linear_v: Linear,
    linear_k: Linear,
    linear_q: Linear,
    linear_merge: Linear,
    heads: i64,
    dropout: f64,
}

impl Attention {
    fn new(r: &Registry, dim: i64, heads: i64, dropout: f64) -> Self {
        Attention {
            linear_v: Linear::new(&r.sub("linear_v"), dim, dim),
            linear_k: Linear::new(&r.sub("linear_k"), dim, dim),
            linear_q: Linear::new(&r.sub("linear_q"), dim, dim),
            linear_merge: Linear::new(&r.sub("linear_merge"), dim, dim),
            heads,
            dropout,
        }
    }

    fn forward(
        &self,
        query: &Tensor,
        kv: &Tensor,
        allowed: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let split = |t: Tensor| {
            let (n, l, d) = t.size3().unwrap();
            t.view([n, l, self.heads, d / self.heads]).transpose(1, 2)
        };
        let q = split(self.linear_q.forward(query));
        let k = split(self.linear_k.forward(kv));
        let v = split(self.linear_v.forward(kv));
        let mask = allowed.map(|a| a.unsqueeze(1).unsqueeze(1));
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            if train { self.dropout } else { 0.0 },
            false,
            None,
            false,
        );
        let (n, lq, d) = query.size3().unwrap();
        self.linear_merge
            .forward(&o.transpose(1, 2).reshape([n, lq, d]))
    }

    fn linears(&self) -> [&Linear; 4] {
        [
            &self.linear_v,
            &self.linear_k,
            &self.linear_q,
            &self.linear_merge,
        ]
    }
}

/// `Linear(d, f) → LayerNorm(f) → GELU → Linear(f, d)`, keys `ffn.0`, `ffn.1`, `ffn.3` as PIR-ITR's
/// `nn.Sequential`.
struct FeedForward {
    fc: Linear,
    norm: LayerNorm,
    proj: Linear,
}

impl FeedForward {
    fn new(r: &Registry, dim: i64, hidden: i64) -> Self {
        FeedForward {
            fc: Linear::new(&r.sub(0), dim, hidden),
            norm: LayerNorm::new(&r.sub(1), hidden),
            proj: Linear::new(&r.sub(3), hidden, dim),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj
            .forward(&self.norm.forward(&self.fc.forward(x)).gelu("none"))
    }
}

/// Post-norm residual block around an attention whose residual stream is `stream`:
/// `s = norm1(s + drop(attn(query, s)))`, `s = norm2(s + drop(ffn(s)))`. Self-attention passes the
/// stream as its own query (PIR-ITR's `MHSA`); cross-attention a mapped query (`CroSA`).
struct AttentionBlock {
    attn: Attention,
    ffn: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    dropout: f64,
}

impl AttentionBlock {
    fn new(r: &Registry, attn_name: &str, dim: i64, heads: i64, ffn: i64, dropout: f64) -> Self {
        AttentionBlock {
            attn: Attention::new(&r.sub(attn_name), dim, heads, dropout),
            ffn: FeedForward::new(&r.sub("ffn"), dim, ffn),
            norm1: LayerNorm::new(&r.sub("norm1"), dim),
            norm2: LayerNorm::new(&r.sub("norm2"), dim),
            dropout,
        }
    }

    fn forward(
        &self,
        query: &Tensor,
        stream: &Tensor,
        allowed: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let attended = self.attn.forward(query, stream, allowed, train);
        let s = self
            .norm1
            .forward(&(stream + attended.dropout(self.dropout, train)));
        let f = self.ffn.forward(&s);
        self.norm2.forward(&(&s + f.dropout(self.dropout, train)))
    }

    fn self_attention(&self, x: &Tensor, allowed: Option<&Tensor>, train: bool) -> Tensor {
        self.forward(x, x, allowed, train)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut l = self.attn.linears().to_vec();
        l.extend([&self.ffn.fc, &self.ffn.proj]);
        l
    }
}

/// The shared shape of both encoders: per step a mapping, a self-attention block and a cross-attention
/// block, and a head on the result.
struct Progressive {
    mapping: Vec<Linear>,
    self_attn: Vec<AttentionBlock>,
    cross_attn: Vec<AttentionBlock>,
    head: Linear,
}

impl Progressive {
    fn new(
        r: &Registry,
        dim: i64,
        steps: usize,
        heads: usize,
        ffn: Option<usize>,
        dropout: f64,
    ) -> Self {
        let heads = heads as i64;
        let ffn = ffn.map(|f| f as i64).unwrap_or(2 * dim);
        let (m, s, c) = (r.sub("mapping"), r.sub("self_attn"), r.sub("cross_attn"));
        Progressive {
            mapping: (0..steps)
                .map(|i| Linear::new(&m.sub(i), dim, dim))
                .collect(),
            self_attn: (0..steps)
                .map(|i| AttentionBlock::new(&s.sub(i), "mhatt", dim, heads, ffn, dropout))
                .collect(),
            cross_attn: (0..steps)
                .map(|i| AttentionBlock::new(&c.sub(i), "mhatt_cross", dim, heads, ffn, dropout))
                .collect(),
            head: Linear::new(&r.sub("head"), dim, dim),
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut l: Vec<&Linear> = self.mapping.iter().collect();
        for (s, c) in self.self_attn.iter().zip(&self.cross_attn) {
            l.extend(s.linears());
            l.extend(c.linears());
        }
        l.push(&self.head);
        l
    }
}

/// Temporal-PAE: "the previous time step cyclically activates the current one". From the projected text
/// tokens t, each cycle computes a = SelfAttn(t), then t = CrossAttn(query = Mapping(t), stream = a); the
/// embedding is the pooled (EOT) token plus a head on the cycled EOT token.
pub struct Lca {
    steps: Progressive,
}

impl Lca {
    pub fn new(r: &Registry, embed_dim: i64, cfg: &LcaConfig) -> Self {
        Lca {
            steps: Progressive::new(
                r,
                embed_dim,
                cfg.cycles,
                cfg.heads,
                cfg.ffn_width,
                cfg.dropout,
            ),
        }
    }

    /// `tokens` `[N, L, E]` (projected), `eot` `[N]` → text features `[N, E]`.
    pub fn forward(&self, tokens: &Tensor, eot: &Tensor, train: bool) -> Tensor {
        let (n, l, _) = tokens.size3().unwrap();
        let positions = Tensor::arange(l, (Kind::Int64, tokens.device())).unsqueeze(0);
        let allowed = positions.le_tensor(&eot.unsqueeze(1));
        let rows = Tensor::arange(n, (Kind::Int64, tokens.device()));
        let at_eot = |t: &Tensor| t.index(&[Some(rows.shallow_clone()), Some(eot.shallow_clone())]);
        let pooled = at_eot(tokens);
        let mut t = tokens.shallow_clone();
        for ((mapping, sa), ca) in self
            .steps
            .mapping
            .iter()
            .zip(&self.steps.self_attn)
            .zip(&self.steps.cross_attn)
        {
            let a = sa.self_attention(&t, Some(&allowed), train);
            t = ca.forward(&mapping.forward(&t), &a, Some(&allowed), train);
        }
        pooled + self.steps.head.forward(&at_eot(&t))
    }

    pub fn linears(&self) -> Vec<&Linear> {
        self.steps.linears()
    }
}

/// Hard-filter Spatial-PAE: rank the patch tokens by the instruction's belief, keep the top
/// `filter_size`, then per round a = SelfAttn(tokens), tokens = CrossAttn(query = Mapping(instruction),
/// stream = a); the embedding is the class token plus a head on the first kept token.
pub struct HardVir {
    steps: Progressive,
    filter_size: i64,
}

/// One hard-VIR pass with what it selected.
pub struct HardVirOutput {
    /// Image features `[N, E]`.
    pub features: Tensor,
    /// Belief over the patch tokens `[N, L]`.
    pub belief: Tensor,
}

impl HardVir {
    pub fn new(r: &Registry, embed_dim: i64, cfg: &HardVirConfig) -> Self {
        HardVir {
            steps: Progressive::new(
                r,
                embed_dim,
                cfg.instruction_rounds,
                cfg.heads,
                cfg.ffn_width,
                cfg.dropout,
            ),
            filter_size: cfg.filter_size as i64,
        }
    }

    /// `tokens` `[N, 1 + L, E]`: the ViT's projected output tokens, class token first; `instruction`
    /// `[N, E]`.
    pub fn forward(&self, tokens: &Tensor, instruction: &Tensor, train: bool) -> HardVirOutput {
        let (n, len, e) = tokens.size3().unwrap();
        let class = tokens.select(1, 0);
        let patches = tokens.narrow(1, 1, len - 1);
        let logits = patches.matmul(&instruction.unsqueeze(-1)).squeeze_dim(-1);
        let (_, order) = tch::no_grad(|| {
            logits
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .sort_stable(true, 1, true)
        });
        let keep = order
            .narrow(1, 0, self.filter_size)
            .to_device(tokens.device())
            .unsqueeze(-1)
            .expand([n, self.filter_size, e], true);
        let mut kept = patches.gather(1, &keep, false);
        for ((mapping, sa), ca) in self
            .steps
            .mapping
            .iter()
            .zip(&self.steps.self_attn)
            .zip(&self.steps.cross_attn)
        {
            let a = sa.self_attention(&kept, None, train);
            let query = mapping
                .forward(instruction)
                .unsqueeze(1)
                .expand([n, self.filter_size, e], true);
            kept = ca.forward(&query, &a, None, train);
        }
        HardVirOutput {
            features: class + self.steps.head.forward(&kept.select(1, 0)),
            belief: logits.softmax(1, Kind::Float),
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        self.steps.linears()
    }
}
