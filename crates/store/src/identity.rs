//! What an index folder records about itself and its rows: the model identity and settings
//! (index.json), and one entry per embedding row (the metadata parts' columns).

use std::path::Path;

use crate::limits;

/// What made the embeddings: an index is only ever extended with the same model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub model: String,
    pub config: serde_json::Value,
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    pub dim: usize,
    /// How images became rows: tiling and band choice. Every `add` must use the same, and the server
    /// renders tiles by it.
    #[serde(default)]
    pub scene: SceneSettings,
    /// The folders the indexed images were found under, canonical (symlinks resolved): `pirclip serve`
    /// serves only files under them. Absent in indexes made before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_roots: Vec<String>,
}

impl Identity {
    /// Holds every field to the ranges pirclip itself writes: an index.json from elsewhere must not
    /// set a tile of 0, a band 0, a dimension of 10^12 or a 50 MB model name.
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.dim > limits::MAX_DIM {
            return Err(format!(
                "dim {} is outside 1..={}",
                self.dim,
                limits::MAX_DIM
            ));
        }
        for (name, value) in [
            ("model", &self.model),
            ("checkpoint", &self.checkpoint),
            ("checkpoint_sha256", &self.checkpoint_sha256),
        ] {
            if value.len() > limits::NAME_BYTES {
                return Err(format!("{name} is {} bytes long", value.len()));
            }
        }
        let sc = &self.scene;
        if let Some(t) = sc.tile {
            if !limits::TILE.contains(&t) {
                return Err(format!("scene.tile {t} is outside {:?}", limits::TILE));
            }
        }
        if let Some(t) = sc.tile_stride {
            if !limits::TILE_STRIDE.contains(&t) || sc.tile.is_none() {
                return Err(format!(
                    "scene.tile_stride {t}: outside {:?}, or without a tile",
                    limits::TILE_STRIDE
                ));
            }
        }
        if let Some(b) = sc.bands {
            if !b.iter().all(|b| limits::BAND.contains(b)) {
                return Err(format!("scene.bands {b:?}: bands are 1..=65535"));
            }
        }
        if self.image_roots.len() > limits::IMAGE_ROOTS {
            return Err(format!("{} image roots", self.image_roots.len()));
        }
        for r in &self.image_roots {
            if r.len() > limits::NAME_BYTES || !is_plain_absolute(Path::new(r)) {
                return Err(format!(
                    "image root {:?} is not a plain absolute path",
                    pirclip_checkpoint::clip_text(r, 200)
                ));
            }
        }
        Ok(())
    }

    /// Whether `other` made the same embeddings: same model, checkpoint and width.
    pub fn same_model(&self, other: &Identity) -> bool {
        self.checkpoint_sha256 == other.checkpoint_sha256
            && self.model == other.model
            && self.dim == other.dim
    }

    /// Fails, naming the model the index `root` (of this identity) was built with, unless `model` is
    /// that model: an index is searched only with the model that made it.
    pub fn require_model(&self, root: &Path, model: &Identity) -> Result<(), String> {
        if self.same_model(model) {
            return Ok(());
        }
        Err(format!(
            "{} was built with {} ({}, {} dimensions); pass the same --model/--checkpoint to use it",
            root.display(),
            self.model,
            self.checkpoint,
            self.dim
        ))
    }
}

/// An absolute path without `.` or `..` components (so that its meaning does not depend on what
/// the folders it names contain).
pub fn is_plain_absolute(p: &Path) -> bool {
    use std::path::Component;
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Tiling and band settings of an index (absent in indexes made before tiling existed: whole images,
/// default bands).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SceneSettings {
    /// Tile side in pixels; `None` = whole images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile_stride: Option<usize>,
    /// 1-based red, green, blue bands of TIFFs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bands: Option<[usize; 3]>,
}

impl SceneSettings {
    /// What a build or an add uses: the settings `asked` for, or, when nothing was asked, those of
    /// the index being added to (`existing`); an index then refuses settings that differ from its own.
    pub fn asked_or_existing(
        asked: SceneSettings,
        existing: Option<&SceneSettings>,
    ) -> SceneSettings {
        match existing {
            Some(e) if asked.tile.is_none() && asked.bands.is_none() => e.clone(),
            _ => asked,
        }
    }
}

/// One indexed image or tile of an image (one embedding row).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Entry {
    pub image_path: String,
    pub size: i64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// The pixel window of a tile cut from a larger scene; `None` for a whole image.
    pub tile: Option<Tile>,
    /// The centre of the image or tile on the map, for georeferenced scenes.
    pub geo: Option<GeoPoint>,
}

/// A pixel window: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub x: i64,
    pub y: i64,
    pub width: i64,
    pub height: i64,
}

/// Map coordinates in the scene's reference system (`crs`, such as `EPSG:32633`; longitude and latitude
/// for geographic ones such as `EPSG:4326`).
#[derive(Debug, Clone, PartialEq)]
pub struct GeoPoint {
    pub x: f64,
    pub y: f64,
    pub crs: Option<String>,
}

impl Entry {
    /// Where the row lies, for people: `tile x,y w×h` and `EPSG:… (x, y)` when known; empty otherwise.
    pub fn location(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.tile {
            parts.push(format!("tile {},{} {}×{}", t.x, t.y, t.width, t.height));
        }
        if let Some(g) = &self.geo {
            let crs = g.crs.as_deref().unwrap_or("map");
            parts.push(format!("{crs} ({:.6}, {:.6})", g.x, g.y));
        }
        parts.join("  ")
    }

    /// The (path, size, mtime) key that says a file is already indexed, unchanged (all its tiles share it).
    pub fn key(&self) -> (String, i64, i64) {
        (self.image_path.clone(), self.size, self.mtime)
    }
}
