//! Tensor files without a tensor engine: PyTorch `.pt` checkpoints (zip archive + restricted
//! unpickler), safetensors and numpy `.npy`. Nothing here imports or executes code from a file.

pub mod npy;
pub mod pickle;
pub mod pt;
pub mod pt_legacy;
pub mod pt_write;
pub mod safetensors;
mod tensor;

use std::path::Path;

pub use tensor::{DType, TensorData};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed file: {0}")]
    Format(String),
    #[error("unsafe content: {0}")]
    Unsafe(String),
    /// `error` is deliberately not a `source`: its text is already part of this message, and error
    /// reporters that print the chain would show it twice.
    #[error("{path}: {error}")]
    InFile { path: String, error: Box<Error> },
}

impl Error {
    pub fn in_file(self, path: &Path) -> Error {
        match self {
            already @ Error::InFile { .. } => already,
            error => Error::InFile {
                path: path.display().to_string(),
                error: Box::new(error),
            },
        }
    }
}

/// `text` cut to at most `max` characters for an error message, with how much was left out: a
/// field of a hostile file can be megabytes long, and a message must not echo it.
pub fn clip_text(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((at, _)) => format!("{}… ({} more bytes)", &text[..at], text.len() - at),
    }
}

/// An ordered state dict: names in saved order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    pub entries: Vec<(String, TensorData)>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: TensorData) {
        let name = name.into();
        if let Some(slot) = self.entries.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = tensor;
        } else {
            self.entries.push((name, tensor));
        }
    }

    /// Elements of all floating-point entries except BatchNorm buffers, i.e. what PyTorch counts as parameters.
    pub fn parameter_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|(n, t)| t.dtype.is_float() && !is_buffer_name(n))
            .map(|(_, t)| t.numel())
            .sum()
    }
}

/// BatchNorm buffers: saved in the state dict, but not parameters.
pub fn is_buffer_name(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// How the weights were stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// open_clip training output: `{"epoch", "name", "state_dict", "optimizer", ...}`.
    TrainingCheckpoint {
        epoch: Option<i64>,
        name: Option<String>,
        has_optimizer: bool,
        module_prefix: bool,
    },
    /// `torch.save(model.state_dict())`.
    BareStateDict {
        module_prefix: bool,
    },
    Safetensors,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::TrainingCheckpoint {
                epoch,
                name,
                has_optimizer,
                module_prefix,
            } => {
                write!(f, "PyTorch training checkpoint (state_dict")?;
                if let Some(e) = epoch {
                    write!(f, ", epoch {e}")?;
                }
                if let Some(n) = name {
                    write!(f, ", run name {n:?}")?;
                }
                if *has_optimizer {
                    write!(f, ", optimizer state")?;
                }
                if *module_prefix {
                    write!(f, ", DDP `module.` prefix stripped")?;
                }
                write!(f, ")")
            }
            Layout::BareStateDict { module_prefix } => {
                write!(f, "PyTorch state dict")?;
                if *module_prefix {
                    write!(f, " (DDP `module.` prefix stripped)")?;
                }
                Ok(())
            }
            Layout::Safetensors => write!(f, "safetensors"),
        }
    }
}

/// Weights read from any supported file, with the layout they came in.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub layout: Layout,
    pub state_dict: StateDict,
}

/// Reads a checkpoint, choosing the format from the file's first bytes (not its extension). Tensors are
/// read from the file one by one; the file is never held in memory whole.
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint, Error> {
    use std::io::Read;
    let path = path.as_ref();
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| Error::Io(e).in_file(path))?;
    match sniff(&head) {
        Kind::Pt => {
            pt::read_checkpoint(pt::PtArchive::open_file(path)?).map_err(|e| e.in_file(path))
        }
        Kind::PtLegacy => pt_legacy::read_file(path),
        Kind::Safetensors => Ok(Checkpoint {
            layout: Layout::Safetensors,
            state_dict: safetensors::read_file(path)?,
        }),
        Kind::Unknown(e) => Err(e.in_file(path)),
    }
}

enum Kind {
    Pt,
    PtLegacy,
    Safetensors,
    Unknown(Error),
}

fn sniff(head: &[u8]) -> Kind {
    if head.starts_with(b"PK") {
        Kind::Pt
    } else if head.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        Kind::PtLegacy
    } else if safetensors::looks_like(head) {
        Kind::Safetensors
    } else {
        Kind::Unknown(Error::Format(
            "not a PyTorch zip checkpoint (no `PK` signature) nor a safetensors file (no valid JSON header); \
             the file may be truncated or of another kind"
                .into(),
        ))
    }
}

pub fn load_bytes(bytes: &[u8]) -> Result<Checkpoint, Error> {
    match sniff(bytes) {
        Kind::Pt => pt::read_checkpoint(pt::PtArchive::open(bytes)?),
        Kind::PtLegacy => pt_legacy::read(bytes),
        Kind::Safetensors => Ok(Checkpoint {
            layout: Layout::Safetensors,
            state_dict: safetensors::read(bytes)?,
        }),
        Kind::Unknown(e) => Err(e),
    }
}

/// Strips the DDP `module.` prefix exactly as the official loader does: only when the first key starts
/// with `module`, and then from every key (7 characters).
pub(crate) fn strip_module_prefix(entries: &mut [(String, TensorData)]) -> bool {
    let strip = entries
        .first()
        .map(|(k, _)| k.starts_with("module"))
        .unwrap_or(false);
    if strip {
        for (k, _) in entries.iter_mut() {
            *k = k.chars().skip(7).collect();
        }
    }
    strip
}

/// Writes a file atomically: a temporary sibling is written and synced, then renamed over `path`, so a
/// crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    write_atomic_with(path, |f| Ok(f.write_all(bytes)?))
}

/// As `write_atomic`, with the content streamed into the temporary file by `write`.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), Error>,
) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the folder is synced.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e: Error| e.in_file(path))
}
