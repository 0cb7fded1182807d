//! Tiles and whole scenes rendered for `/image`: each scene opened once however many requests ask for
//! it, at most [`RENDERS`] renders at once, whole-scene previews rendered once and kept.

use super::*;

/// An opened scene: a TIFF's bounded reader (its display mapping computed once), or a decoded image.
pub(crate) type OpenedScene = Arc<Mutex<pirclip_image::SceneSource>>;

/// The last [`SCENES_KEPT`] values by key, each made once however many requests ask for it at the same
/// time (the others wait for it rather than make it again): opened scenes, and whole-scene previews
/// (a preview of a 64-megapixel scene takes seconds; 24 requests for two scenes render it twice).
pub(crate) struct Kept<T> {
    slots: Mutex<Vec<(String, Slot<T>)>>,
}

type Slot<T> = Arc<tokio::sync::OnceCell<Result<T, String>>>;

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept {
            slots: Mutex::new(Vec::new()),
        }
    }
}

const SCENES_KEPT: usize = 2;

impl<T> Kept<T> {
    fn slot(&self, key: &str) -> Slot<T> {
        let mut slots = self.slots.lock().unwrap();
        if let Some(at) = slots.iter().position(|(k, _)| k == key) {
            let hit = slots.remove(at);
            let cell = hit.1.clone();
            slots.push(hit);
            return cell;
        }
        if slots.len() >= SCENES_KEPT {
            slots.remove(0);
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        slots.push((key.to_string(), cell.clone()));
        cell
    }
}

/// Longest side of a rendered scene or tile sent to a browser.
const MAX_RENDERED_SIDE: usize = 1024;

/// A tile cut from its scene, or a TIFF rendered with the index's bands: PNG, or with `geotiff` an 8-bit
/// GeoTIFF carrying the tile's own georeferencing (full resolution, for a GIS). At most [`RENDERS`] run
/// at once; a scene asked for by many requests is decoded once.
pub(crate) async fn render(
    s: &Arc<AppState>,
    path: PathBuf,
    tile: Option<pirclip_store::Tile>,
    bands: Option<[usize; 3]>,
    geotiff: bool,
) -> Result<Bytes, String> {
    // A file replaced on disk (another size or time) is another scene, not the cached one.
    let stamp = std::fs::metadata(&path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    let key = format!("{}\u{0}{bands:?}\u{0}{stamp:?}", path.display());
    if tile.is_some() || geotiff {
        return render_uncached(s, &key, path, tile, bands, geotiff)
            .await
            .map(Bytes::from);
    }
    // A whole-scene preview: rendered once, then served from memory (the last two kept).
    let cell = s.previews.slot(&key);
    cell.get_or_init(|| async {
        render_uncached(s, &key, path, None, bands, false)
            .await
            .map(Bytes::from)
    })
    .await
    .clone()
}

async fn render_uncached(
    s: &Arc<AppState>,
    key: &str,
    path: PathBuf,
    tile: Option<pirclip_store::Tile>,
    bands: Option<[usize; 3]>,
    geotiff: bool,
) -> Result<Vec<u8>, String> {
    let _permit = s.renders.acquire().await.map_err(|e| e.to_string())?;
    let cell = s.scenes.slot(key);
    let scene = cell
        .get_or_init(|| {
            let path = path.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    pirclip_image::open_scene(&path, &pirclip_image::SceneOptions { bands })
                        .map(|source| Arc::new(Mutex::new(source)))
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            }
        })
        .await
        .clone()?;
    tokio::task::spawn_blocking(move || cut(&mut scene.lock().unwrap(), tile, geotiff))
        .await
        .map_err(|e| e.to_string())?
}

/// The window `tile` of `scene` (the whole scene without one), read and encoded.
fn cut(
    scene: &mut pirclip_image::SceneSource,
    tile: Option<pirclip_store::Tile>,
    geotiff: bool,
) -> Result<Vec<u8>, String> {
    let (width, height) = (scene.width(), scene.height());
    let window = match tile {
        Some(t) => {
            let fits = t.x >= 0
                && t.y >= 0
                && t.width > 0
                && t.height > 0
                && t.x
                    .checked_add(t.width)
                    .is_some_and(|r| r as u64 <= width as u64)
                && t.y
                    .checked_add(t.height)
                    .is_some_and(|b| b as u64 <= height as u64);
            if !fits {
                return Err(format!(
                    "tile {},{} {}×{} is outside the {width}×{height} scene (has the file changed?)",
                    t.x, t.y, t.width, t.height
                ));
            }
            pirclip_image::Window {
                x: t.x as usize,
                y: t.y as usize,
                width: t.width as usize,
                height: t.height as usize,
            }
        }
        None => pirclip_image::Window {
            x: 0,
            y: 0,
            width,
            height,
        },
    };
    let long = window.width.max(window.height);
    if !geotiff && long > MAX_RENDERED_SIDE {
        return preview(scene, window).map(|img| pirclip_image::encode_png(&img));
    }
    if geotiff && window.width * window.height > MAX_GEOTIFF_PIXELS {
        return Err(format!(
            "{}×{} pixels is too large to send whole as GeoTIFF (at most {MAX_GEOTIFF_PIXELS}); index it with --tile and ask for tiles",
            window.width, window.height
        ));
    }
    let out = scene.read_window(window).map_err(|e| e.to_string())?;
    if geotiff {
        let geo = scene.geo().map(|g| {
            let (x, y) = g.transform.apply(window.x as f64, window.y as f64);
            let mut t = g.transform;
            t.0[0] = x;
            t.0[3] = y;
            pirclip_image::GeoRef {
                transform: t,
                crs: g.crs.clone(),
            }
        });
        return pirclip_image::scene::encode_geotiff(&out, geo.as_ref());
    }
    Ok(pirclip_image::encode_png(&out))
}

/// Largest window sent whole as a GeoTIFF.
const MAX_GEOTIFF_PIXELS: usize = 64 << 20;

/// `window` shrunk to at most [`MAX_RENDERED_SIDE`] on its long side by averaging blocks of f × f
/// pixels, read a band of f rows at a time: a preview of a 400-megapixel scene holds a few rows of it,
/// not the scene.
fn preview(
    scene: &mut pirclip_image::SceneSource,
    window: pirclip_image::Window,
) -> Result<pirclip_image::RgbImage, String> {
    let f = window.width.max(window.height).div_ceil(MAX_RENDERED_SIDE);
    let (ow, oh) = (window.width.div_ceil(f), window.height.div_ceil(f));
    let mut out = vec![0u8; ow * oh * 3];
    // Bands of about 256 rows (whole output rows of f each): a tiled file's chunks are read once,
    // not once per output row.
    let per_band = (256 / f).max(1);
    let mut band = pirclip_image::RgbImage::new(0, 0, Vec::new());
    let mut band_y = usize::MAX;
    for oy in 0..oh {
        let y = window.y + oy * f;
        let rows = f.min(window.y + window.height - y);
        if oy % per_band == 0 {
            band_y = y;
            let height = (per_band * f).min(window.y + window.height - y);
            band = scene
                .read_window(pirclip_image::Window {
                    x: window.x,
                    y,
                    width: window.width,
                    height,
                })
                .map_err(|e| e.to_string())?;
        }
        let top = y - band_y;
        for ox in 0..ow {
            let cols = f.min(window.width - ox * f);
            let mut sum = [0u64; 3];
            for r in 0..rows {
                for c in 0..cols {
                    let at = ((top + r) * window.width + ox * f + c) * 3;
                    for (k, v) in sum.iter_mut().enumerate() {
                        *v += band.pixels[at + k] as u64;
                    }
                }
            }
            let n = (rows * cols) as u64;
            for k in 0..3 {
                out[(oy * ow + ox) * 3 + k] = ((sum[k] + n / 2) / n) as u8;
            }
        }
    }
    Ok(pirclip_image::RgbImage::new(ow, oh, out))
}
