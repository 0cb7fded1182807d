//! open_clip's text tower (spec §3.6): token + position embeddings, causal transformer, `ln_final`, and the
//! EOT token's features projected by `text_projection`.

use tch::{Kind, Tensor};

use crate::config::TextConfig;
use crate::layers::{LayerNorm, Transformer, TransformerInit};
use crate::params::{Init, Registry};

pub struct TextTower {
    pub positional_embedding: Tensor,
    pub text_projection: Tensor,
    transformer: Transformer,
    token_embedding: Tensor,
    ln_final: LayerNorm,
}

impl TextTower {
    /// Tensors live at the model's top level (`positional_embedding`, `transformer.*`, ...), as in open_clip.
    pub fn new(r: &Registry, cfg: &TextConfig, embed_dim: i64, quick_gelu: bool) -> Self {
        let w = cfg.width as i64;
        let positional_embedding = r.param(
            "positional_embedding",
            &[cfg.context_length as i64, w],
            Init::Normal(0.01),
        );
        let text_projection = r.param(
            "text_projection",
            &[w, embed_dim],
            Init::Normal((w as f64).powf(-0.5)),
        );
        let mlp = (w as f64 * cfg.mlp_ratio) as i64;
        let transformer = Transformer::new(
            &r.sub("transformer"),
            w,
            cfg.layers as i64,
            cfg.heads as i64,
            mlp,
            quick_gelu,
            TransformerInit::ClipText {
                layers: cfg.layers as i64,
            },
        );
        let token_embedding = r.param(
            "token_embedding.weight",
            &[cfg.vocab_size as i64, w],
            Init::Normal(0.02),
        );
        let ln_final = LayerNorm::new(&r.sub("ln_final"), w);
        TextTower {
            positional_embedding,
            text_projection,
            transformer,
            token_embedding,
            ln_final,
        }
    }

    pub fn linears(&self) -> Vec<&crate::layers::Linear> {
        self.transformer.linears()
    }

    /// Text features of `ids` `[N, context]`. With `truncate`, only positions up to the batch's last EOT are
    /// computed: the causal mask and EOT pooling make later positions irrelevant (spec §3.6), so the result
    /// is the same while short captions cost a fraction of 77 positions.
    pub fn forward(&self, ids: &Tensor, truncate: bool) -> Tensor {
        let (x, eot) = self.tokens(ids, truncate);
        let n = x.size()[0];
        let rows = Tensor::arange(n, (Kind::Int64, x.device()));
        x.index(&[Some(rows), Some(eot)])
            .matmul(&self.text_projection)
    }

    /// Every position's features projected into the joint space, `[N, L, embed]`, and each caption's EOT
    /// position `[N]` (what the Temporal-PAE cycles over). Positions after a caption's EOT are computed
    /// but meaningless: consumers mask them.
    pub fn project_tokens(&self, ids: &Tensor, truncate: bool) -> (Tensor, Tensor) {
        let (x, eot) = self.tokens(ids, truncate);
        (x.matmul(&self.text_projection), eot)
    }

    /// `ln_final` output `[N, L, width]` and the EOT positions.
    fn tokens(&self, ids: &Tensor, truncate: bool) -> (Tensor, Tensor) {
        let eot = ids.argmax(-1, false);
        let ids = if truncate {
            let len = eot.max().int64_value(&[]) + 1;
            ids.narrow(1, 0, len)
        } else {
            ids.shallow_clone()
        };
        let l = ids.size()[1];
        let x = Tensor::embedding(&self.token_embedding, &ids, -1, false, false)
            + self.positional_embedding.narrow(0, 0, l);
        (
            self.ln_final.forward(&self.transformer.forward(&x, true)),
            eot,
        )
    }
}
