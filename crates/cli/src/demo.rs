use anyhow::Result;
use pirclip_retrieval::Quiet;

use crate::common::ModelArgs;

/// The main job on bundled data, offline: retrieval evaluation of the bundled model on the bundled
/// 60-image RSICD set (held out from its training), then three example text searches.
#[derive(clap::Args)]
pub struct Args {
    /// Matches to print per query.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
}

pub const QUERIES: [&str; 3] = [
    "many planes parked at an airport",
    "a river with a bridge",
    "a baseball field",
];

pub fn run(a: Args) -> Result<()> {
    let dir =
        pirclip_model::resolve::bundled_file("data/rsicd-mini").map_err(anyhow::Error::msg)?;
    let model_args = ModelArgs::bundled_on_cpu();
    let eval_args = crate::eval::Args {
        model: model_args.clone(),
        json: dir.join("dataset_rsicd_mini.json"),
        images_dir: dir.join("images"),
        split: "test".into(),
        batch_size: 64,
        recall_k: vec![1, 5, 10],
        bootstrap: 1000,
        out: None,
        embeddings_out: None,
        skip_missing: false,
        allow_absolute_paths: false,
    };
    let test =
        pirclip_retrieval::evaluate::prepare(&eval_args.spec()).map_err(anyhow::Error::msg)?;
    let (model, weights) = model_args.load_resolved()?;
    println!(
        "pirclip demo — model {} ({}), images {}",
        model.config.name,
        weights.display(),
        dir.join("images").display()
    );
    println!();
    crate::eval::evaluate(&eval_args, &test, &model, &weights)?;
    let paths = pirclip_data::collect_images(&[dir.join("images")])?;
    let img =
        pirclip_retrieval::encode_images(&model, &paths, model_args.options(), 64, true, &Quiet)?;
    let queries: Vec<String> = QUERIES.iter().map(|q| q.to_string()).collect();
    let txt = pirclip_retrieval::encode_texts(&model, &queries, 256, true, &Quiet);
    println!();
    println!(
        "text search over the {} images (cosine similarity):",
        paths.len()
    );
    crate::search::print_results(
        &queries,
        &paths,
        &pirclip_retrieval::rank(&img, &txt, a.top_k),
    );
    Ok(())
}
