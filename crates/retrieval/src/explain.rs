//! Why an image matched a text: VIR's belief over the image's patches (which patches the instruction
//! chose) beside each patch token's cosine similarity to the text, as numbers and as two heat-map panels.
//! Only PIR models have a belief map.

use std::path::Path;

use pirclip_image::RgbImage;
use pirclip_model::clip::images_tensor;
use pirclip_model::{ClipModel, EncodeOptions};
use tch::Kind;

use crate::{encode_texts, to_vec, Quiet};

/// The belief map and the patch similarities of one image and one text.
pub struct Explanation {
    /// Cosine of the image embedding and the text embedding.
    pub image_text_cosine: f32,
    /// Patches per side.
    pub grid: usize,
    /// The class token's belief.
    pub class_token_belief: f32,
    /// Per patch, row-major: VIR's belief and the patch token's cosine to the text.
    pub belief: Vec<f32>,
    pub patch_text_similarity: Vec<f32>,
    /// The image as the model saw it (resized, centre-cropped).
    pub seen: RgbImage,
}

/// Explains `text` against the image file `image` with a PIR model.
pub fn explain(
    model: &ClipModel,
    image: &Path,
    text: &str,
    opts: EncodeOptions,
) -> Result<Explanation, String> {
    let size = model.config.image_size;
    let decoded = pirclip_image::decode_file(image).map_err(|e| e.to_string())?;
    let seen = pirclip_image::eval_resize_crop(&decoded, size);
    let mut px = Vec::new();
    pirclip_image::normalize_into(&seen, &mut px);
    let x = images_tensor(&px, 1, size, model.device());
    let _g = tch::no_grad_guard();
    let Some(e) = model.explain(&x, opts) else {
        return Err(format!(
            "explain needs a PIR model (a ViT image tower instructed by a ResNet); {} is not one",
            model.config.name
        ));
    };
    let belief = to_vec(&e.belief);
    let patches = belief.len() - 1;
    let grid = (patches as f64).sqrt().round() as usize;
    if grid * grid != patches {
        return Err(format!("{patches} patch tokens do not form a square grid"));
    }
    let text = encode_texts(model, &[text.to_string()], 1, true, &Quiet);
    let tokens = pirclip_model::l2_normalize(&e.tokens.squeeze_dim(0).to_kind(Kind::Float));
    let t = tch::Tensor::from_slice(&text.values)
        .view([-1, 1])
        .to_device(tokens.device());
    // Rows: the pooled image embedding, the class token, then the patches.
    let sims = to_vec(&tokens.matmul(&t).squeeze_dim(-1));
    Ok(Explanation {
        image_text_cosine: sims[0],
        grid,
        class_token_belief: belief[0],
        belief: belief[1..].to_vec(),
        patch_text_similarity: sims[2..].to_vec(),
        seen,
    })
}

impl Explanation {
    /// VIR's logits are unscaled, so its softmax is nearly one-hot: the belief is drawn on a log scale,
    /// six decades below its peak, so that the ranking it induces stays visible. Returns the map and
    /// the peak belief.
    pub fn log_belief(&self) -> (Vec<f32>, f32) {
        let peak = self
            .belief
            .iter()
            .fold(f32::MIN, |a, &b| a.max(b))
            .max(1e-30)
            .log10();
        let map = self
            .belief
            .iter()
            .map(|&b| b.max(1e-30).log10().max(peak - 6.0))
            .collect();
        (map, 10f32.powf(peak))
    }

    /// Two `size`-pixel panels side by side over the image: the log belief, then the similarity.
    pub fn render(&self, size: usize) -> RgbImage {
        let (log_belief, _) = self.log_belief();
        let width = 2 * size + 8;
        let mut out = RgbImage {
            width,
            height: size,
            pixels: vec![255; width * size * 3],
        };
        let big = pirclip_image::resize_bicubic(&self.seen, size, size);
        for (i, map) in [&log_belief[..], &self.patch_text_similarity]
            .into_iter()
            .enumerate()
        {
            let (lo, hi) = map
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let span = (hi - lo).max(1e-12);
            for y in 0..size {
                for x in 0..size {
                    let (gx, gy) = (x * self.grid / size, y * self.grid / size);
                    let h = heat((map[gy * self.grid + gx] - lo) / span);
                    let p = &big.pixels[(y * size + x) * 3..][..3];
                    let o = (y * width + i * (size + 8) + x) * 3;
                    for c in 0..3 {
                        out.pixels[o + c] =
                            (0.45 * p[c] as f32 + 0.55 * h[c]).round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
        out
    }

    /// The three highest cells of a per-patch map as `(row, col)`.
    pub fn top_cells(&self, map: &[f32]) -> Vec<(usize, usize)> {
        let mut idx: Vec<usize> = (0..map.len()).collect();
        idx.sort_by(|&x, &y| map[y].total_cmp(&map[x]));
        idx.iter()
            .take(3)
            .map(|&i| (i / self.grid, i % self.grid))
            .collect()
    }

    /// The maps as JSON (grids as rows).
    pub fn to_json(&self) -> serde_json::Value {
        let grid =
            |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(self.grid).map(<[f32]>::to_vec).collect() };
        serde_json::json!({
            "image_text_cosine": self.image_text_cosine,
            "grid": self.grid,
            "belief": grid(&self.belief),
            "class_token_belief": self.class_token_belief,
            "patch_text_similarity": grid(&self.patch_text_similarity),
        })
    }
}

/// A dark-blue → red → yellow colour ramp over [0, 1].
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
