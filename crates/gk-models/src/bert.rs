//! BERT encoder in the Hugging Face key layout.
//!
//! Port of transformers `models/bert/modeling_bert.py`
//! (<https://github.com/huggingface/transformers/blob/v4.57.0/src/transformers/models/bert/modeling_bert.py>):
//! `BertEmbeddings`, `BertSelfAttention` + `BertSelfOutput`, `BertIntermediate` +
//! `BertOutput` (post-norm), `BertPooler`. Weights load with or without the `bert.` prefix
//! and with `weight/bias` or legacy `gamma/beta` layer-norm names. Checked against
//! transformers in `tests/bert_parity.rs`.

use crate::nn::{self, Activation, LayerNorm};
use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// `BertConfig` (field names and defaults as in transformers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self::base()
    }
}

impl BertConfig {
    /// bert-base-uncased.
    pub fn base() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
    /// all-MiniLM-L6-v2 (the BERT shipped offline in a PyPI wheel).
    pub fn minilm_l6() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 6,
            intermediate_size: 1536,
            ..Self::base()
        }
    }
    pub fn tiny() -> Self {
        Self {
            vocab_size: 1000,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 37,
            max_position_embeddings: 64,
            ..Self::base()
        }
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl BertLayer {
    fn new(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let att = vb.pp("attention");
        Ok(Self {
            query: candle_nn::linear(c, c, att.pp("self.query"))?,
            key: candle_nn::linear(c, c, att.pp("self.key"))?,
            value: candle_nn::linear(c, c, att.pp("self.value"))?,
            attn_out: candle_nn::linear(c, c, att.pp("output.dense"))?,
            attn_norm: LayerNorm::new(att.pp("output.LayerNorm"), c, eps)?,
            intermediate: candle_nn::linear(c, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            output: candle_nn::linear(cfg.intermediate_size, c, vb.pp("output.dense"))?,
            out_norm: LayerNorm::new(vb.pp("output.LayerNorm"), c, eps)?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (q, k, v) = (
            self.query.forward(x)?,
            self.key.forward(x)?,
            self.value.forward(x)?,
        );
        let a = nn::attention(&q, &k, &v, self.heads, Some(bias))?;
        let a = self.attn_norm.forward(&(self.attn_out.forward(&a)? + x)?)?;
        let h = self.act.forward(&self.intermediate.forward(&a)?)?;
        self.out_norm.forward(&(self.output.forward(&h)? + a)?)
    }
}

/// What [`Bert::forward`] returns.
#[derive(Debug, Clone)]
pub struct BertOutput {
    /// Embeddings then every layer's output: `num_hidden_layers + 1` tensors `[B, L, C]`.
    pub hidden_states: Vec<Tensor>,
    /// `[B, L, C]`.
    pub last_hidden_state: Tensor,
    /// `[B, C]`: `tanh(dense([CLS]))`, or `None` when the checkpoint has no pooler.
    pub pooled: Option<Tensor>,
}

/// `BertModel`.
#[derive(Debug, Clone)]
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<BertLayer>,
    pooler: Option<Linear>,
    cfg: BertConfig,
}

impl Bert {
    /// Builds from `vb`; a `bert.` prefix in the weights is detected and stripped.
    /// The pooler is loaded when its weights exist (always created for fresh models).
    pub fn new(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let c = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let fresh = !vb.contains_tensor("embeddings.word_embeddings.weight");
        let pooler = if fresh || vb.contains_tensor("pooler.dense.weight") {
            Some(candle_nn::linear(c, c, vb.pp("pooler.dense"))?)
        } else {
            None
        };
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, c, emb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                cfg.max_position_embeddings,
                c,
                emb.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(
                cfg.type_vocab_size,
                c,
                emb.pp("token_type_embeddings"),
            )?,
            emb_norm: LayerNorm::new(emb.pp("LayerNorm"), c, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::new(vb.pp(format!("encoder.layer.{i}")), cfg))
                .collect::<Result<_>>()?,
            pooler,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// `ids, mask: [B, L]` (mask 1 = token, 0 = pad); token types are all 0 unless given.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        token_types: Option<&Tensor>,
    ) -> Result<BertOutput> {
        let l = ids.dim(1)?;
        if l > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "text length {l} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let pos = Tensor::arange(0u32, l as u32, ids.device())?;
        let tt = match token_types {
            Some(t) => self.token_type.forward(t)?,
            None => self.token_type.forward(&ids.zeros_like()?)?,
        };
        let x = ((self.word.forward(ids)? + tt)?.broadcast_add(&self.position.forward(&pos)?))?;
        let mut x = self.emb_norm.forward(&x)?;
        let bias = nn::key_padding_bias(mask, x.dtype())?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
            hidden_states.push(x.clone());
        }
        let pooled = match &self.pooler {
            Some(p) => Some(p.forward(&x.i((.., 0))?)?.tanh()?),
            None => None,
        };
        Ok(BertOutput {
            hidden_states,
            last_hidden_state: x,
            pooled,
        })
    }
}
