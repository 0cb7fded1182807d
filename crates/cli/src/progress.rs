//! The command line's progress bar for `pirclip_retrieval`'s pipelines.

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

/// Normalised embeddings of `paths` with the model's options from the flags and a progress bar.
pub fn encode_images(
    model: &pirclip_model::ClipModel,
    paths: &[std::path::PathBuf],
    args: &crate::common::ModelArgs,
    batch_size: usize,
) -> anyhow::Result<pirclip_retrieval::Embeddings> {
    let bar = Bar::new(true);
    Ok(pirclip_retrieval::encode_images(
        model,
        paths,
        args.options(),
        batch_size,
        true,
        &bar,
    )?)
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
