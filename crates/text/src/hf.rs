//! open_clip's `HFTokenizer` for Hugging Face text towers (`text_cfg.hf_tokenizer_name`): the model's own
//! `tokenizer.json` through the `tokenizers` crate (Hugging Face's implementation, the one the Python
//! `transformers` fast tokenizers run), with open_clip's call: whitespace cleaning, special tokens added,
//! truncated and padded to the context length.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

/// A `tokenizer.json` larger than this is refused (MiniLM's is 0.5 MB; the largest multilingual ones
/// are ~20 MB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// A Hugging Face tokenizer loaded from its `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` set up for open_clip's call at the last context length asked for: a tokenizer (its
    /// vocabulary included) is cloned once per context length, not once per caption.
    configured: std::sync::Mutex<Option<(usize, Arc<tokenizers::Tokenizer>)>>,
    pad_id: u32,
    pub path: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HfTokenizer({})", self.path.display())
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json` (or the one inside the folder `path`).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let at = |e: &dyn std::fmt::Display| format!("tokenizer {}: {e}", file.display());
        let len = std::fs::metadata(&file).map_err(|e| at(&e))?.len();
        if len > MAX_TOKENIZER_BYTES {
            return Err(at(&format!(
                "{len} bytes, more than a tokenizer file holds"
            )));
        }
        let bytes = std::fs::read(&file).map_err(|e| at(&e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| at(&e))?;
        // The pad id of the file's own padding settings, else of its `[PAD]`/`<pad>` token, else 0
        // (transformers' default for BERT).
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        Ok(HfTokenizer {
            inner,
            configured: std::sync::Mutex::new(None),
            pad_id,
            path: file,
        })
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id as i64
    }

    /// Ids of `text` with the special tokens (`[CLS] … [SEP]`), cut to `max_length` as transformers'
    /// `truncation=True` does (the end tokens kept), without padding: what sentence-transformers feeds
    /// its model.
    pub fn encode_raw(&self, text: &str, max_length: usize) -> Result<Vec<i64>, String> {
        let mut t = self.inner.clone();
        t.with_padding(None);
        t.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
        let enc = t.encode(text, true).map_err(|e| e.to_string())?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// open_clip's `HFTokenizer(texts)`: whitespace-cleaned, special tokens added, truncated and padded
    /// with the pad id to exactly `context_length` ids.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let cleaned = crate::clean_whitespace(text);
        let t = self.configured(context_length);
        let ids_of = |s: &str| {
            t.encode(s, true)
                .map(|e| e.get_ids().iter().map(|&i| i as i64).collect::<Vec<_>>())
        };
        // A text this tokenizer.json cannot encode (none in BERT's; a regex that gives up in a user's)
        // is encoded as the empty caption, and as padding alone if even that fails.
        let mut ids = ids_of(&cleaned).or_else(|_| ids_of("")).unwrap_or_default();
        ids.resize(context_length, self.pad_id as i64);
        ids
    }

    fn configured(&self, context_length: usize) -> Arc<tokenizers::Tokenizer> {
        let mut cache = self.configured.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.as_ref().filter(|(ctx, _)| *ctx == context_length) {
            return t.clone();
        }
        let mut t = self.inner.clone();
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            pad_id: self.pad_id,
            ..Default::default()
        }));
        // Only fails for a stride not below max_length; the stride is 0.
        let _ = t.with_truncation(Some(TruncationParams {
            max_length: context_length,
            ..Default::default()
        }));
        let t = Arc::new(t);
        *cache = Some((context_length, t.clone()));
        t
    }
}

/// The tokenizer of a model's text tower.
#[derive(Debug, Clone)]
pub enum TextTokenizer {
    /// open_clip's CLIP BPE (`SimpleTokenizer`).
    Clip,
    Hf(Arc<HfTokenizer>),
}

impl TextTokenizer {
    /// `context_length` ids of `text`, as the tower's open_clip tokenizer gives them.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        match self {
            TextTokenizer::Clip => crate::Tokenizer::shared().tokenize(text, context_length),
            TextTokenizer::Hf(t) => t.tokenize(text, context_length),
        }
    }

    /// How many leading ids of a tokenized row the tower reads (CLIP: up to EOT; HF: up to the padding),
    /// for batching captions by length.
    pub fn content_length(&self, ids: &[i64]) -> usize {
        match self {
            TextTokenizer::Clip => crate::eot_position(ids) + 1,
            TextTokenizer::Hf(t) => ids
                .iter()
                .rposition(|&i| i != t.pad_id())
                .map_or(0, |p| p + 1),
        }
    }
}
