//! The command line's view of `pirclip_retrieval`: the same functions with an indicatif progress bar.

use std::path::{Path, PathBuf};

use anyhow::Result;
use pirclip_data::karpathy::RetrievalSet;
use pirclip_model::{ClipModel, EncodeOptions};
pub use pirclip_retrieval::{similarity, Embeddings, EncodedSet};

/// An indicatif bar behind `pirclip_retrieval::Progress`; hidden when `show` is false.
pub struct Bar {
    bar: std::cell::RefCell<Option<indicatif::ProgressBar>>,
    show: bool,
}

impl Bar {
    pub fn new(show: bool) -> Self {
        Bar {
            bar: std::cell::RefCell::new(None),
            show,
        }
    }
}

impl pirclip_retrieval::Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        let pb = crate::common::progress(total, what);
        if !self.show {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        *self.bar.borrow_mut() = Some(pb);
    }
    fn advance(&self, n: u64) {
        if let Some(pb) = &*self.bar.borrow() {
            pb.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(pb) = self.bar.borrow_mut().take() {
            pb.finish_and_clear();
        }
    }
}

pub fn encode_images(
    model: &ClipModel,
    paths: &[PathBuf],
    opts: EncodeOptions,
    batch_size: usize,
    normalize: bool,
    progress: bool,
) -> Result<Embeddings> {
    Ok(pirclip_retrieval::encode_images(
        model,
        paths,
        opts,
        batch_size,
        normalize,
        &Bar::new(progress),
    )?)
}

pub fn encode_texts(
    model: &ClipModel,
    captions: &[String],
    batch_size: usize,
    normalize: bool,
    progress: bool,
) -> Result<Embeddings> {
    Ok(pirclip_retrieval::encode_texts(
        model,
        captions,
        batch_size,
        normalize,
        &Bar::new(progress),
    ))
}

pub fn encode_set(
    model: &ClipModel,
    set: &RetrievalSet,
    images_dir: &Path,
    opts: EncodeOptions,
    batch_size: usize,
    progress: bool,
) -> Result<EncodedSet> {
    Ok(pirclip_retrieval::encode_set(
        model,
        set,
        images_dir,
        opts,
        batch_size,
        &Bar::new(progress),
    )?)
}
