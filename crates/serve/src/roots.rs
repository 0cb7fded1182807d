//! An index as the server serves it: only files under its image folders, links resolved at each
//! request.

use super::*;

/// An index as served: its name in the API, and the folders its images may be read from.
pub struct ServedIndex {
    pub name: String,
    pub index: LoadedIndex,
    /// Canonical folders; a row's file is served only from under one of them.
    pub image_roots: Vec<PathBuf>,
}

/// Folders no index may name as its image root: the whole disk, or the system's own.
const FORBIDDEN_ROOTS: [&str; 13] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
    "/sys", "/usr",
];

impl ServedIndex {
    /// Loads the index folders `roots` for `model` (each must have been built with it), named in the
    /// API after their folders (`name`, `name-2`, … when two share a name), with their image roots as
    /// [`ServedIndex::new`] decides. Returns the indexes and the warnings to show.
    pub fn load_all(
        roots: &[PathBuf],
        model: &pirclip_store::Identity,
        explicit: &[PathBuf],
        allow_outside: bool,
    ) -> Result<(Vec<ServedIndex>, Vec<String>), String> {
        let (mut indices, mut warnings) = (Vec::<ServedIndex>::new(), Vec::new());
        for root in roots {
            let loaded = LoadedIndex::load(root)
                .map_err(|e| format!("loading index {}: {e}", root.display()))?;
            loaded.dir.identity.require_model(root, model)?;
            warnings.extend(loaded.warnings.iter().cloned());
            let base = root
                .file_name()
                .map_or_else(|| "index".into(), |n| n.to_string_lossy().to_string());
            let mut name = base.clone();
            for n in 2.. {
                if !indices.iter().any(|i| i.name == name) {
                    break;
                }
                name = format!("{base}-{n}");
            }
            let (served, notes) = ServedIndex::new(name, loaded, explicit, allow_outside)?;
            warnings.extend(notes);
            indices.push(served);
        }
        Ok((indices, warnings))
    }

    /// Decides where `index`'s images may be read from: the `explicit` folders when given (the person
    /// running the server names them), else the roots the index recorded when it was built, each of
    /// which must exist here and be no system folder. Every row must point under them, as a plain
    /// absolute path; with `allow_outside` the server starts anyway, and those rows' files are
    /// refused (403) when asked for.
    pub fn new(
        name: String,
        index: LoadedIndex,
        explicit: &[PathBuf],
        allow_outside: bool,
    ) -> Result<(Self, Vec<String>), String> {
        let mut notes = Vec::new();
        let from_index = explicit.is_empty();
        let given: Vec<PathBuf> = if from_index {
            index
                .dir
                .identity
                .image_roots
                .iter()
                .map(PathBuf::from)
                .collect()
        } else {
            explicit.to_vec()
        };
        let mut roots = Vec::new();
        for r in &given {
            match std::fs::canonicalize(r) {
                Ok(c) if c.is_dir() => {
                    if from_index && FORBIDDEN_ROOTS.iter().any(|f| c == FsPath::new(f)) {
                        return Err(format!(
                            "{}: its index.json names {} as an image root; a system folder is never served (name the image folders with --image-root)",
                            name, c.display()
                        ));
                    }
                    roots.push(c);
                }
                _ => notes.push(format!(
                    "{name}: image root {} is not a folder here; its images are not served",
                    r.display()
                )),
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "{name}: no image folder to serve from ({}); name them with --image-root DIR",
                if from_index && given.is_empty() {
                    "its index.json records none: it was built before pirclip recorded them, or elsewhere".to_string()
                } else {
                    "none of the folders exists here".to_string()
                }
            ));
        }
        // Rows as written, compared lexically (links are resolved per request).
        let lexical: Vec<PathBuf> = if from_index {
            given.clone()
        } else {
            roots.clone()
        };
        let outside: Vec<&str> = index
            .entries
            .iter()
            .map(|e| e.image_path.as_str())
            .filter(|p| {
                let p = FsPath::new(p);
                !pirclip_store::is_plain_absolute(p)
                    || !lexical.iter().chain(&roots).any(|r| p.starts_with(r))
            })
            .collect();
        if let Some(first) = outside.first() {
            let what = format!(
                "{name}: {} of {} rows point outside the image folders ({}), e.g. {:?}",
                outside.len(),
                index.entries.len(),
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                pirclip_store::clip_text(first, 120)
            );
            if !allow_outside {
                return Err(format!(
                    "{what}; refusing to serve it (--allow-outside-roots starts anyway and refuses those files)"
                ));
            }
            notes.push(format!("{what}; their files are refused"));
        }
        Ok((
            ServedIndex {
                name,
                index,
                image_roots: roots,
            },
            notes,
        ))
    }

    /// The file of a row, if it may be served: a plain absolute path whose real location (links
    /// resolved now) lies under an image root.
    pub(crate) fn file_of(&self, entry: &pirclip_store::Entry) -> Result<PathBuf, ApiError> {
        let p = FsPath::new(&entry.image_path);
        let refused = || {
            ApiError(
                StatusCode::FORBIDDEN,
                "this row's file lies outside the index's image folders".into(),
            )
        };
        if !pirclip_store::is_plain_absolute(p) {
            return Err(refused());
        }
        let real = std::fs::canonicalize(p).map_err(|e| ApiError::not_found(format!("{}", e)))?;
        if !self.image_roots.iter().any(|r| real.starts_with(r)) || !real.is_file() {
            return Err(refused());
        }
        Ok(real)
    }
}
