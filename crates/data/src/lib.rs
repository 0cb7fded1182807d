//! Engine-free data handling: image lists, threaded decode + preprocessing in order, retrieval datasets
//! and metrics.

pub mod dedup;
pub mod karpathy;
pub mod loader;
pub mod metrics;
pub mod shards;
pub mod train;

use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "tif", "tiff", "bmp", "webp", "gif"];

pub fn is_image_path(p: &Path) -> bool {
    p.extension()
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
        .unwrap_or(false)
}

/// Checks a file name read from a dataset (JSON, CSV) before it is joined onto the images folder: it
/// must stay inside that folder, so absolute names and `..` components are refused (a hostile
/// `../../etc/passwd` would otherwise be opened, and copied into shards). `allow_absolute` lets the
/// absolute paths through, for datasets that list them (open_clip CSVs often do); `..` stays refused.
/// The check is on the name, not the file system: links the user made inside the folder are followed.
pub fn check_dataset_name(name: &str, allow_absolute: bool) -> Result<(), String> {
    use std::path::Component;
    let shown: String = name.chars().take(200).collect();
    if name.is_empty() {
        return Err("an image file name is empty".into());
    }
    let path = Path::new(name);
    for c in path.components() {
        match c {
            Component::ParentDir => {
                return Err(format!(
                    "image file name {shown:?} contains `..`: dataset names must stay inside the images folder"
                ))
            }
            Component::RootDir | Component::Prefix(_) if !allow_absolute => {
                return Err(format!(
                    "image file name {shown:?} is absolute: dataset names must stay inside the images folder \
                     (pass --allow-absolute-paths if this dataset lists absolute paths on purpose)"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Expands files and directories into a list of image files; a directory contributes its image files
/// (non-recursive, hidden files skipped) in sorted file-name order.
pub fn collect_images(inputs: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", input.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image_path(p))
                .filter(|p| {
                    !p.file_name()
                        .map(|n| n.to_string_lossy().starts_with('.'))
                        .unwrap_or(true)
                })
                .collect();
            files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            out.extend(files);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no such file or directory", input.display()),
            ));
        }
    }
    Ok(out)
}

/// Applies `f` to every item on up to `workers` scoped threads (contiguous chunks), results in input order.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if items.is_empty() {
        return Vec::new();
    }
    let chunk = items.len().div_ceil(workers.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread panicked"))
            .collect()
    })
}
