//! The model behind the server: text, image and embedding queries encoded on one thread, queued
//! with a bound.

use super::*;

pub(crate) enum Job {
    Text(String, oneshot::Sender<Result<Vec<f32>, String>>),
    Image(Vec<u8>, oneshot::Sender<Result<Vec<f32>, String>>),
}

/// The model on its own thread, fed through a bounded queue.
pub struct Encoder {
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl Encoder {
    /// Starts the model thread; `load` builds the model there (libtorch modules stay on one thread).
    /// Returns once the model is loaded, or with the load error.
    pub fn spawn(
        load: impl FnOnce() -> Result<ClipModel, String> + Send + 'static,
        opts: EncodeOptions,
        queue: usize,
    ) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let model = match load() {
                Ok(m) => {
                    let _ = ready_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let size = model.config.image_size;
            for job in rx {
                match job {
                    Job::Text(text, reply) => {
                        let e = pirclip_retrieval::encode_texts(
                            &model,
                            &[text],
                            1,
                            true,
                            &pirclip_retrieval::Quiet,
                        );
                        let _ = reply.send(Ok(e.values));
                    }
                    Job::Image(bytes, reply) => {
                        let r = pirclip_image::decode(&bytes, "uploaded image")
                            .map_err(|e| e.to_string())
                            .map(|img| {
                                let px = pirclip_image::preprocess_eval(&img, size);
                                let x = images_tensor(&px, 1, size, model.device());
                                pirclip_retrieval::to_vec(&tch::no_grad(|| {
                                    l2_normalize(&model.encode_image(&x, opts))
                                }))
                            });
                        let _ = reply.send(r);
                    }
                }
            }
        });
        ready
            .recv()
            .map_err(|_| "the model thread stopped while loading".to_string())??;
        Ok(Encoder { tx })
    }

    pub(crate) async fn run(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<Vec<f32>, String>>) -> Job,
    ) -> Result<Vec<f32>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(job(reply)).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => ApiError::busy(),
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                ApiError::internal("the model thread stopped")
            }
        })?;
        answer
            .await
            .map_err(|_| ApiError::internal("the model thread stopped"))?
            .map_err(|e| ApiError::bad(format!("image: {e}")))
    }
}
