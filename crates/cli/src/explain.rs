use std::path::PathBuf;

use anyhow::Result;

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

pub fn run(a: Args) -> Result<()> {
    // VIR's belief map needs a PIR model: without weights, the bundled PIR model.
    let (model, _) = a
        .model
        .load_resolved_or(pirclip_model::resolve::BUNDLED_PIR_MODEL)?;
    let e = pirclip_retrieval::explain::explain(&model, &a.image, &a.text, a.model.options())
        .map_err(anyhow::Error::msg)?;
    let png = pirclip_image::encode_png(&e.render(a.size as usize));
    pirclip_checkpoint::write_atomic(&a.out, &png)?;
    let (g, (_, peak)) = (e.grid, e.log_belief());
    let cells = |m: &[f32]| -> String {
        let cells = e
            .top_cells(m)
            .into_iter()
            .map(|(r, c)| format!("({r}, {c})"));
        cells.collect::<Vec<_>>().join(" ")
    };
    println!(
        "image–text cosine {:.3}; {g}×{g} patches",
        e.image_text_cosine
    );
    println!(
        "left:  VIR belief (the instruction's choice of patches; log scale, peak {peak:.3}); highest at rows/cols {}",
        cells(&e.belief)
    );
    println!(
        "right: patch-to-text similarity to {:?}; highest at {}",
        a.text,
        cells(&e.patch_text_similarity)
    );
    println!("wrote {}", a.out.display());
    if let Some(j) = &a.json {
        let mut v = e.to_json();
        v["image"] = a.image.display().to_string().into();
        v["text"] = a.text.clone().into();
        v["model"] = model.config.name.clone().into();
        pirclip_checkpoint::write_atomic(j, (serde_json::to_string_pretty(&v)? + "\n").as_bytes())?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
