use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::common::{read_captions, write_lines, ModelArgs};
use crate::progress::Bar;
use pirclip_retrieval::{encode_images, encode_texts};

/// Embed images and/or captions. Writes <out>/img_emb.npy + images.txt and/or <out>/text_emb.npy +
/// texts.txt (float32, one row per input, rows L2-normalised unless --no-normalize). Nothing is written
/// unless every input was encoded.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files or directories (a directory is read in sorted file-name order): several after one
    /// flag (`--images imgs/*.jpg`), or the flag repeated.
    #[arg(long, num_args = 1.., action = clap::ArgAction::Append)]
    images: Vec<PathBuf>,
    /// Caption file: one caption per line; an empty line is an empty caption.
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Output directory (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass (with --bn-mode batch it also sets the BatchNorm statistics).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Keep raw (unnormalised) features.
    #[arg(long)]
    no_normalize: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.images.is_empty() && a.texts.is_none() {
        bail!("nothing to embed: give --images and/or --texts");
    }
    let images = pirclip_data::collect_images(&a.images)?;
    if !a.images.is_empty() && images.is_empty() {
        bail!(
            "no image files (jpg, png, tif, ...) found in {:?}",
            a.images
        );
    }
    let captions = match &a.texts {
        Some(f) => read_captions(f)?,
        None => Vec::new(),
    };
    let t0 = Instant::now();
    let model = a.model.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    let normalize = !a.no_normalize;
    let mut outputs = Vec::new();
    if !images.is_empty() {
        let t = Instant::now();
        let e = encode_images(
            &model,
            &images,
            a.model.options(),
            a.batch_size,
            normalize,
            &Bar::new(true),
        )?;
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "encoded {} images in {s:.2} s ({:.1} images/s)",
            e.rows,
            e.rows as f64 / s
        );
        outputs.push((
            "img_emb.npy",
            e,
            "images.txt",
            images
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
        ));
    }
    if !captions.is_empty() {
        let t = Instant::now();
        let e = encode_texts(&model, &captions, 256, normalize, &Bar::new(true));
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "encoded {} captions in {s:.2} s ({:.1} captions/s)",
            e.rows,
            e.rows as f64 / s
        );
        outputs.push(("text_emb.npy", e, "texts.txt", captions.clone()));
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for (npy_name, e, list_name, lines) in outputs {
        pirclip_checkpoint::npy::write(a.out.join(npy_name), &e.to_tensor_data())?;
        write_lines(&a.out.join(list_name), lines)?;
        eprintln!(
            "wrote {} ({} x {})",
            a.out.join(npy_name).display(),
            e.rows,
            e.dim
        );
    }
    eprintln!(
        "model load {load_s:.2} s, total {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
