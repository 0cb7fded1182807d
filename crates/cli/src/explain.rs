use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pirclip_model::clip::images_tensor;
use tch::Kind;

use crate::common::ModelArgs;

/// Why did it match? For a PIR model: the image (as the model sees it, resized and centre-cropped) with
/// VIR's belief over its patches (which tokens the instruction selects) beside the similarity of every
/// patch's output token to the text. Writes both overlays side by side as a PNG, and the raw maps with
/// --json.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    text: String,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write the belief and similarity maps (patch grid, row by row) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Pixels per side of each panel (16 to 4096).
    #[arg(long, default_value_t = 320, value_parser = clap::value_parser!(u32).range(16..=4096))]
    size: u32,
}

fn grid(values: &[f32], g: usize) -> Vec<Vec<f32>> {
    values.chunks(g).map(|r| r.to_vec()).collect()
}

/// Dark blue (low) → red → yellow (high), on values scaled to [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    if v < 0.5 {
        let t = v / 0.5;
        [20.0 + 180.0 * t, 20.0 + 20.0 * t, 90.0 - 50.0 * t]
    } else {
        let t = (v - 0.5) / 0.5;
        [200.0 + 55.0 * t, 40.0 + 190.0 * t, 40.0 + 10.0 * t]
    }
}

/// The image with `map` (g × g, scaled to its own min–max) blended over it.
fn panel(img: &pirclip_image::RgbImage, map: &[f32], g: usize, size: u32) -> image::RgbImage {
    let (lo, hi) = map
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (hi - lo).max(1e-12);
    let big = pirclip_image::resize_bicubic(img, size as usize, size as usize);
    image::RgbImage::from_fn(size, size, |x, y| {
        let (gx, gy) = (
            (x as usize * g) / size as usize,
            (y as usize * g) / size as usize,
        );
        let h = heat((map[gy * g + gx] - lo) / span);
        let p = &big.pixels[((y * size + x) * 3) as usize..((y * size + x) * 3 + 3) as usize];
        image::Rgb(
            [0, 1, 2].map(|c| (0.45 * p[c] as f32 + 0.55 * h[c]).round().clamp(0.0, 255.0) as u8),
        )
    })
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let size = model.config.image_size;
    let decoded = pirclip_image::decode_file(&a.image)?;
    let seen = pirclip_image::eval_resize_crop(&decoded, size);
    let mut px = Vec::new();
    pirclip_image::normalize_into(&seen, &mut px);
    let x = images_tensor(&px, 1, size, model.device());
    let _g = tch::no_grad_guard();
    let Some(e) = model.explain(&x, a.model.options()) else {
        bail!(
            "explain needs a PIR model (a ViT image tower instructed by a ResNet); {} is not one",
            model.config.name
        );
    };
    let belief: Vec<f32> = pirclip_retrieval::to_vec(&e.belief);
    let patches = belief.len() - 1;
    let g = (patches as f64).sqrt().round() as usize;
    if g * g != patches {
        bail!("{patches} patch tokens do not form a square grid");
    }
    let text = pirclip_retrieval::encode_texts(
        &model,
        std::slice::from_ref(&a.text),
        1,
        true,
        &pirclip_retrieval::Quiet,
    );
    let tokens = pirclip_model::l2_normalize(&e.tokens.squeeze_dim(0).to_kind(Kind::Float));
    let t = tch::Tensor::from_slice(&text.values)
        .view([-1, 1])
        .to_device(tokens.device());
    let sims: Vec<f32> = pirclip_retrieval::to_vec(&tokens.matmul(&t).squeeze_dim(-1));
    let image_score = sims[0];
    let patch_sims = &sims[2..];
    let patch_belief = &belief[1..];
    let s = a.size;
    // VIR's logits are unscaled, so its softmax is nearly one-hot: the belief is drawn on a log scale,
    // six decades below its peak, so that the ranking it induces stays visible.
    let peak = patch_belief
        .iter()
        .fold(f32::MIN, |a, &b| a.max(b))
        .max(1e-30)
        .log10();
    let log_belief: Vec<f32> = patch_belief
        .iter()
        .map(|&b| b.max(1e-30).log10().max(peak - 6.0))
        .collect();
    let mut out = image::RgbImage::from_pixel(2 * s + 8, s, image::Rgb([255, 255, 255]));
    for (i, map) in [&log_belief[..], patch_sims].into_iter().enumerate() {
        let p = panel(&seen, map, g, s);
        for (x, y, v) in p.enumerate_pixels() {
            out.put_pixel(i as u32 * (s + 8) + x, y, *v);
        }
    }
    out.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let top = |m: &[f32]| {
        let mut idx: Vec<usize> = (0..m.len()).collect();
        idx.sort_by(|&x, &y| m[y].total_cmp(&m[x]));
        idx.iter()
            .take(3)
            .map(|&i| format!("({}, {})", i / g, i % g))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("image–text cosine {image_score:.3}; {g}×{g} patches");
    println!(
        "left:  VIR belief (the instruction's choice of patches; log scale, peak {:.3}); highest at rows/cols {}",
        10f32.powf(peak),
        top(patch_belief)
    );
    println!(
        "right: patch-to-text similarity to {:?}; highest at {}",
        a.text,
        top(patch_sims)
    );
    println!("wrote {}", a.out.display());
    if let Some(j) = &a.json {
        let v = serde_json::json!({
            "image": a.image.display().to_string(),
            "text": a.text,
            "model": model.config.name,
            "image_text_cosine": image_score,
            "grid": g,
            "belief": grid(patch_belief, g),
            "class_token_belief": belief[0],
            "patch_text_similarity": grid(patch_sims, g),
        });
        pirclip_checkpoint::write_atomic(j, (serde_json::to_string_pretty(&v)? + "\n").as_bytes())?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
