use std::path::PathBuf;

use anyhow::Result;

/// Print the token ids (SOT ... EOT, zero-padded to 77) of each caption, space separated, one per line.
#[derive(clap::Args)]
pub struct Args {
    /// File with one caption per line (an empty line is an empty caption).
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Captions given on the command line.
    text: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    let mut captions = a.text;
    if let Some(f) = &a.texts {
        captions.extend(crate::common::read_captions(f)?);
    }
    if captions.is_empty() {
        anyhow::bail!("no captions: give TEXT arguments or --texts FILE");
    }
    let tok = pirclip_text::Tokenizer::new();
    let mut out = String::new();
    for c in &captions {
        let ids = tok.tokenize(c, pirclip_text::CONTEXT_LENGTH);
        out.push_str(
            &ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
