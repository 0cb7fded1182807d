//! open_clip's `HFTextEncoder` for BERT-family encoders (`text_cfg.hf_model_name`): a Hugging Face
//! `BertModel` without its pooling layer under `text.transformer.*`, open_clip's pooler over the last
//! hidden states (mean over the real tokens, or the first token), and the projection `text.proj.*` into
//! the joint space. Post-LayerNorm blocks, exact (erf) GELU, absolute positions, one token type.

use tch::{Kind, Tensor};

use crate::config::{BertConfig, HfPooler, HfProj, HfTextConfig};
use crate::layers::{multi_head_attention_masked, LayerNorm, Linear};
use crate::params::{Init, Registry};

/// BERT's dropout on hidden states and attention probabilities while training.
const BERT_DROPOUT: f64 = 0.1;

struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

fn bert_linear(r: &Registry, inp: i64, out: i64) -> Linear {
    Linear::with_init(r, inp, out, Init::Normal(0.02), Init::Zeros)
}

impl BertLayer {
    fn new(r: &Registry, c: &BertConfig) -> Self {
        let (w, i) = (c.hidden_size as i64, c.intermediate_size as i64);
        let eps = c.layer_norm_eps;
        BertLayer {
            query: bert_linear(&r.sub("attention.self.query"), w, w),
            key: bert_linear(&r.sub("attention.self.key"), w, w),
            value: bert_linear(&r.sub("attention.self.value"), w, w),
            attention_output: bert_linear(&r.sub("attention.output.dense"), w, w),
            attention_norm: LayerNorm::with_eps(&r.sub("attention.output.LayerNorm"), w, eps),
            intermediate: bert_linear(&r.sub("intermediate.dense"), w, i),
            output: bert_linear(&r.sub("output.dense"), i, w),
            output_norm: LayerNorm::with_eps(&r.sub("output.LayerNorm"), w, eps),
        }
    }

    fn forward(&self, x: &Tensor, keep: &Tensor, heads: i64, dropout: f64) -> Tensor {
        let attended = multi_head_attention_masked(
            &self.query.forward(x),
            &self.key.forward(x),
            &self.value.forward(x),
            heads,
            keep,
            dropout,
        );
        let drop = |t: Tensor| {
            if dropout > 0.0 {
                t.dropout(dropout, true)
            } else {
                t
            }
        };
        let x = self
            .attention_norm
            .forward(&(drop(self.attention_output.forward(&attended)) + x));
        let hidden = self.intermediate.forward(&x).gelu("none");
        self.output_norm
            .forward(&(drop(self.output.forward(&hidden)) + &x))
    }

    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }
}

/// The text tower of an open_clip model with `text_cfg.hf_model_name`.
pub struct HfTextEncoder {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    heads: i64,
    pad_id: i64,
    pooler: HfPooler,
    proj: Vec<Linear>,
}

impl HfTextEncoder {
    /// Tensors under `r` = the model's `text.` (`transformer.*`, `proj.*`).
    pub fn new(r: &Registry, cfg: &HfTextConfig, embed_dim: i64) -> Self {
        let c = &cfg.bert;
        let w = c.hidden_size as i64;
        let t = r.sub("transformer");
        let e = t.sub("embeddings");
        let normal = Init::Normal(0.02);
        let word_embeddings = e.param("word_embeddings.weight", &[c.vocab_size as i64, w], normal);
        let position_embeddings = e.param(
            "position_embeddings.weight",
            &[c.max_position_embeddings as i64, w],
            normal,
        );
        let token_type_embeddings = e.param(
            "token_type_embeddings.weight",
            &[c.type_vocab_size as i64, w],
            normal,
        );
        let embeddings_norm = LayerNorm::with_eps(&e.sub("LayerNorm"), w, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| BertLayer::new(&t.sub(format!("encoder.layer.{i}")), c))
            .collect();
        let no_bias = |r: &Registry, inp: i64, out: i64| {
            let bound = 1.0 / (inp as f64).sqrt();
            Linear::from_tensors(r.param("weight", &[out, inp], Init::Uniform(bound)), None)
        };
        let proj = match cfg.proj {
            HfProj::Linear => vec![no_bias(&r.sub("proj"), w, embed_dim)],
            HfProj::Mlp => {
                let hidden = (w + embed_dim) / 2;
                vec![
                    no_bias(&r.sub("proj.0"), w, hidden),
                    no_bias(&r.sub("proj.2"), hidden, embed_dim),
                ]
            }
            HfProj::None => Vec::new(),
        };
        HfTextEncoder {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            heads: c.num_attention_heads as i64,
            pad_id: cfg.tokenizer.pad_id(),
            pooler: cfg.pooler,
            proj,
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self.layers.iter().flat_map(|l| l.linears()).collect();
        out.extend(self.proj.iter());
        out
    }

    /// The pooled last hidden states `[N, width]` of ids `[N, L]` (padding = the tokenizer's pad id),
    /// before the projection: a sentence-transformers embedding before its normalisation. Positions
    /// after the batch's longest caption are not computed (they are padding, masked out anyway).
    pub fn pooled(&self, ids: &Tensor, dropout: bool) -> Tensor {
        let keep_all = ids.ne(self.pad_id);
        // Padding is on the right: the longest caption's length covers every real token.
        let longest = keep_all
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
            .max()
            .int64_value(&[]);
        let l = longest.clamp(1, ids.size()[1]);
        let (ids, keep) = (ids.narrow(1, 0, l), keep_all.narrow(1, 0, l));
        let p = if dropout { BERT_DROPOUT } else { 0.0 };
        let positions = self.position_embeddings.narrow(0, 0, l);
        let x = Tensor::embedding(&self.word_embeddings, &ids, -1, false, false)
            + positions
            + self.token_type_embeddings.narrow(0, 0, 1);
        let mut x = self.embeddings_norm.forward(&x);
        if p > 0.0 {
            x = x.dropout(p, true);
        }
        for layer in &self.layers {
            x = layer.forward(&x, &keep, self.heads, p);
        }
        match self.pooler {
            HfPooler::Mean => {
                let m = keep.to_kind(x.kind()).unsqueeze(-1);
                // Clamped as sentence-transformers does: a row with no real token pools to zeros, not NaN.
                (&x * &m).sum_dim_intlist([1i64].as_slice(), false, x.kind())
                    / m.sum_dim_intlist([1i64].as_slice(), false, x.kind())
                        .clamp_min(1e-9)
            }
            HfPooler::Cls => x.select(1, 0),
        }
    }

    /// Unnormalised text features `[N, embed_dim]`.
    pub fn forward(&self, ids: &Tensor, dropout: bool) -> Tensor {
        let pooled = self.pooled(ids, dropout);
        match self.proj.as_slice() {
            [] => pooled,
            [linear] => linear.forward(&pooled),
            [first, second] => second.forward(&first.forward(&pooled).gelu("none")),
            _ => unreachable!("one or two projection layers"),
        }
    }
}
