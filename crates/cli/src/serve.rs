use std::path::PathBuf;

use anyhow::{Context, Result};
use pirclip_serve::{AppState, Encoder, Limits, ServedIndex};

use crate::common::ModelArgs;

/// Serve indexes over HTTP: clip-retrieval's back-end API (GET /indices-list, POST /knn-service,
/// POST /metadata), GET /image/<indice>/<id>, GET /health, and a search page at /. Binds 127.0.0.1
/// unless told otherwise; the model is loaded once.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// An index folder (`pirclip index build`); repeat for more. Its name in the API is the folder's name.
    #[arg(long, required = true, action = clap::ArgAction::Append)]
    index: Vec<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1234)]
    port: u16,
    /// Most results a query may ask for (num_images).
    #[arg(long, default_value_t = 1000)]
    max_results: usize,
    /// Queries that may wait for the model; more are answered 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes (images arrive base64-encoded); a larger declared body is
    /// answered 413 without being read.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// A folder whose images may be served (repeat for more): overrides the image folders an index
    /// recorded when it was built (needed for an index built elsewhere, or before they were recorded).
    #[arg(long, value_name = "DIR", action = clap::ArgAction::Append)]
    image_root: Vec<PathBuf>,
    /// Start even when rows of an index point outside its image folders; those files are refused
    /// (403). Without it such an index is not served.
    #[arg(long)]
    allow_outside_roots: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (config, weights, identity) = crate::index::resolved_identity(&a.model)?;
    let (indices, warnings) =
        ServedIndex::load_all(&a.index, &identity, &a.image_root, a.allow_outside_roots)
            .map_err(anyhow::Error::msg)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let addr: std::net::SocketAddr =
        format!("{}:{}", a.host, a.port).parse().with_context(|| {
            format!(
                "--host {} --port {} is not an address to bind",
                a.host, a.port
            )
        })?;
    let images: usize = indices.iter().map(|i| i.index.entries.len()).sum();
    let limits = Limits {
        max_body_bytes: a.max_body_bytes,
        max_results: a.max_results,
        queue: a.queue,
    };
    let name = config.name.clone();
    let device = a.model.device.clone();
    let encoder = Encoder::spawn(
        move || crate::common::load_model(&config, &weights, &device).map_err(|e| format!("{e:#}")),
        a.model.options(),
        limits.queue,
    )
    .map_err(anyhow::Error::msg)?;
    eprintln!(
        "serving {} index(es), {images} images, model {name}, on http://{addr}/",
        indices.len()
    );
    pirclip_serve::serve(addr, AppState::new(indices, encoder, name, limits))?;
    Ok(())
}
