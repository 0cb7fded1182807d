//! Aerial scenes: GeoTIFFs of any bit depth and band count turned into RGB for the model, their
//! georeferencing, and tiling into model-sized windows.
//!
//! Display rule (documented in the README, applied to every band that is not 8-bit): each chosen band is
//! stretched linearly from its 2nd to its 98th percentile onto 0–255 and clipped (the "2–98 % cumulative
//! cut" of QGIS and GDAL-based viewers). Percentiles are nearest-rank over the band's valid samples (NaN and
//! the GDAL_NODATA value excluded), computed over the whole scene so that every tile of it shares one
//! mapping. 8-bit bands are used as they are.
//!
//! TIFF goes through the `tiff` crate directly (not the `image` crate) because the model needs what `image`
//! drops: bands beyond RGBA, the 16-bit range before rounding, and the GeoTIFF tags.

use crate::reader::SceneReader;
use crate::{Error, RgbImage};

/// How a scene's bands become RGB.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SceneOptions {
    /// 1-based band numbers for red, green and blue (GDAL's numbering); `None` = bands 1,2,3 of a
    /// three-or-more-band image, band 1 as grey otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bands: Option<[usize; 3]>,
}

impl SceneOptions {
    /// Parses `--bands 4,3,2`.
    pub fn parse_bands(s: &str) -> Result<[usize; 3], String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let numbers: Result<Vec<usize>, _> = parts.iter().map(|p| p.parse::<usize>()).collect();
        match numbers {
            Ok(n) if n.len() == 3 && n.iter().all(|&b| b >= 1) => Ok([n[0], n[1], n[2]]),
            _ => Err(format!(
                "--bands {s:?}: expected three 1-based band numbers for red,green,blue, such as 4,3,2"
            )),
        }
    }
}

/// Pixel → map coordinates: `x = a + b·col + c·row`, `y = d + e·col + f·row`, with (col, row) measured
/// from the raster's top-left corner (pixel centres at +0.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoTransform(pub [f64; 6]);

impl GeoTransform {
    pub fn apply(&self, col: f64, row: f64) -> (f64, f64) {
        let t = &self.0;
        (
            t[0] + t[1] * col + t[2] * row,
            t[3] + t[4] * col + t[5] * row,
        )
    }
}

/// A scene's georeferencing: the affine transform and its coordinate reference system.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoRef {
    pub transform: GeoTransform,
    /// `EPSG:<code>` from the GeoKey directory, when it names one.
    pub crs: Option<String>,
}

/// A decoded scene: its RGB rendering, and where it lies on Earth when the file says so.
#[derive(Debug, Clone)]
pub struct Scene {
    pub image: RgbImage,
    pub geo: Option<GeoRef>,
}

fn is_tiff(bytes: &[u8]) -> bool {
    bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
}

/// Decodes any image pirclip reads; TIFFs with their georeferencing, chosen bands and the stretch rule
/// above. Other formats decode as [`crate::decode`] does, with no georeferencing.
pub fn decode_scene(bytes: &[u8], name: &str, opts: &SceneOptions) -> Result<Scene, Error> {
    if !is_tiff(bytes) {
        check_not_banded(name, opts)?;
        return Ok(Scene {
            image: crate::decode(bytes, name)?,
            geo: None,
        });
    }
    match SceneReader::new(std::io::Cursor::new(bytes), name, opts)? {
        Some(mut r) => whole(&mut r),
        None => decode_tiff_whole(bytes, name, opts),
    }
}

fn check_not_banded(name: &str, opts: &SceneOptions) -> Result<(), Error> {
    if opts.bands.is_some() {
        return Err(Error::Decode {
            path: name.into(),
            message: "--bands applies to TIFF files only".into(),
        });
    }
    Ok(())
}

fn whole<R: std::io::Read + std::io::Seek>(r: &mut SceneReader<R>) -> Result<Scene, Error> {
    let image = r.read_window(Window {
        x: 0,
        y: 0,
        width: r.width,
        height: r.height,
    })?;
    Ok(Scene {
        image,
        geo: r.geo.clone(),
    })
}

pub fn decode_scene_file(path: &std::path::Path, opts: &SceneOptions) -> Result<Scene, Error> {
    match open_scene(path, opts)? {
        SceneSource::Tiff(mut r) => whole(&mut r),
        SceneSource::Whole(scene) => Ok(scene),
    }
}

/// A scene opened for reading windows of it: a TIFF through the bounded [`SceneReader`] (a window
/// costs the chunks it covers), anything else decoded whole (bounded by the pixel limit).
pub enum SceneSource {
    Tiff(SceneReader<std::io::BufReader<std::fs::File>>),
    Whole(Scene),
}

impl SceneSource {
    pub fn width(&self) -> usize {
        match self {
            SceneSource::Tiff(r) => r.width,
            SceneSource::Whole(s) => s.image.width,
        }
    }

    pub fn height(&self) -> usize {
        match self {
            SceneSource::Tiff(r) => r.height,
            SceneSource::Whole(s) => s.image.height,
        }
    }

    pub fn geo(&self) -> Option<&GeoRef> {
        match self {
            SceneSource::Tiff(r) => r.geo.as_ref(),
            SceneSource::Whole(s) => s.geo.as_ref(),
        }
    }

    /// The RGB pixels of `win`, which must lie inside the scene.
    pub fn read_window(&mut self, win: Window) -> Result<RgbImage, Error> {
        match self {
            SceneSource::Tiff(r) => r.read_window(win),
            SceneSource::Whole(s) => {
                let img = &s.image;
                if win.width == 0
                    || win.height == 0
                    || win.x + win.width > img.width
                    || win.y + win.height > img.height
                {
                    return Err(Error::Decode {
                        path: String::new(),
                        message: format!(
                            "window {},{} {}×{} is outside the {}×{} image",
                            win.x, win.y, win.width, win.height, img.width, img.height
                        ),
                    });
                }
                if win.width == img.width && win.height == img.height {
                    return Ok(img.clone());
                }
                Ok(crop(img, win))
            }
        }
    }
}

/// Opens any image pirclip reads for windowed reading (see [`SceneSource`]).
pub fn open_scene(path: &std::path::Path, opts: &SceneOptions) -> Result<SceneSource, Error> {
    use std::io::Read;
    let name = path.display().to_string();
    let io = |e: std::io::Error| Error::Decode {
        path: name.clone(),
        message: e.to_string(),
    };
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(io)?;
    if is_tiff(&magic[..n]) {
        if let Some(r) = SceneReader::open(path, opts)? {
            return Ok(SceneSource::Tiff(r));
        }
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if is_tiff(&bytes) {
        return Ok(SceneSource::Whole(decode_tiff_whole(&bytes, &name, opts)?));
    }
    check_not_banded(&name, opts)?;
    Ok(SceneSource::Whole(Scene {
        image: crate::decode(&bytes, &name)?,
        geo: None,
    }))
}

/// TIFFs the bounded reader does not read (palette, CMYK, YCbCr, Lab, sub-byte samples): decoded whole
/// as Pillow converts them, with their georeferencing; band choice does not apply to them.
fn decode_tiff_whole(bytes: &[u8], name: &str, opts: &SceneOptions) -> Result<Scene, Error> {
    let fail = |message: String| Error::Decode {
        path: name.to_string(),
        message,
    };
    crate::tiff_header::check_first_ifd(&mut std::io::Cursor::new(bytes)).map_err(fail)?;
    let mut d = tiff::decoder::Decoder::new(std::io::Cursor::new(bytes))
        .map_err(|e| fail(e.to_string()))?
        .with_limits(tag_limits());
    let color = d.colortype().map_err(|e| fail(e.to_string()))?;
    if opts.bands.is_some() || color.bit_depth() > 8 || color.num_samples() > 4 {
        return Err(fail(format!(
            "a {color:?} TIFF: --bands and deep samples need grey, RGB(A) or multiband samples of 8-64 bits"
        )));
    }
    let geo = read_georef(&mut d);
    Ok(Scene {
        image: crate::decode(bytes, name)?,
        geo,
    })
}

/// The 2nd and 98th nearest-rank percentiles of the valid samples; `(0, 0)` when there are none (the
/// rule [`SceneReader`] computes without holding the samples; kept as the reference its test checks).
#[cfg(test)]
pub(crate) fn stretch_range(samples: impl Iterator<Item = f64>, nodata: Option<f64>) -> (f64, f64) {
    let mut valid: Vec<f64> = samples
        .filter(|v| v.is_finite() && Some(*v) != nodata)
        .collect();
    if valid.is_empty() {
        return (0.0, 0.0);
    }
    let rank = |q: f64| ((valid.len() - 1) as f64 * q).floor() as usize;
    let (lo_rank, hi_rank) = (rank(0.02), rank(0.98));
    let lo = *valid
        .select_nth_unstable_by(lo_rank, |a, b| a.total_cmp(b))
        .1;
    let hi = *valid
        .select_nth_unstable_by(hi_rank, |a, b| a.total_cmp(b))
        .1;
    (lo, hi)
}

pub(crate) fn stretch(v: f64, (lo, hi): (f64, f64)) -> u8 {
    if !v.is_finite() || hi <= lo {
        return 0;
    }
    ((v - lo) / (hi - lo) * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Limits for reading tags: the tiff crate sizes a tag's buffer by its declared count, up to the limit
/// for decoded pixels (256 MB by default), before it reads a byte of it. No tag read here is near 1 MB.
pub(crate) fn tag_limits() -> tiff::decoder::Limits {
    let mut limits = tiff::decoder::Limits::default();
    limits.decoding_buffer_size = 1 << 20;
    limits.ifd_value_size = 1 << 20;
    limits.intermediate_buffer_size = 1 << 20;
    limits
}

/// GeoTIFF: ModelTransformation, or ModelTiepoint + ModelPixelScale; raster type (PixelIsPoint shifts
/// by half a pixel) and the EPSG code from the GeoKey directory. Missing or malformed tags give `None`:
/// an image without georeferencing is still an image.
pub(crate) fn read_georef<R: std::io::Read + std::io::Seek>(
    d: &mut tiff::decoder::Decoder<R>,
) -> Option<GeoRef> {
    use tiff::tags::Tag;
    let doubles = |d: &mut tiff::decoder::Decoder<R>, tag| {
        d.find_tag(tag)
            .ok()
            .flatten()
            .and_then(|v| v.into_f64_vec().ok())
    };
    let keys: Vec<u16> = d
        .find_tag(Tag::GeoKeyDirectoryTag)
        .ok()
        .flatten()
        .and_then(|v| v.into_u16_vec().ok())
        .unwrap_or_default();
    let key = |id: u16| -> Option<u16> {
        keys.get(4..)?
            .chunks_exact(4)
            .find(|k| k[0] == id && k[1] == 0)
            .map(|k| k[3])
    };
    let mut transform = if let Some(m) = doubles(d, Tag::ModelTransformationTag) {
        (m.len() == 16).then(|| GeoTransform([m[3], m[0], m[1], m[7], m[4], m[5]]))?
    } else {
        let tie = doubles(d, Tag::ModelTiepointTag)?;
        let scale = doubles(d, Tag::ModelPixelScaleTag)?;
        if tie.len() < 6 || scale.len() < 2 {
            return None;
        }
        let (i, j, x, y) = (tie[0], tie[1], tie[3], tie[4]);
        let (sx, sy) = (scale[0], scale[1]);
        GeoTransform([x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy])
    };
    // GTRasterTypeGeoKey 2 = PixelIsPoint: the tie point is a pixel's centre, not its corner.
    if key(1025) == Some(2) {
        let (x, y) = transform.apply(-0.5, -0.5);
        transform.0[0] = x;
        transform.0[3] = y;
    }
    if !transform.0.iter().all(|v| v.is_finite()) {
        return None;
    }
    // ProjectedCSTypeGeoKey, else GeographicTypeGeoKey; 32767 means "user-defined" (no code).
    let crs = [3072, 2048]
        .into_iter()
        .filter_map(key)
        .find(|&c| c != 0 && c != 32767)
        .map(|c| format!("EPSG:{c}"));
    Some(GeoRef { transform, crs })
}

/// An 8-bit RGB GeoTIFF of `img` with `geo`'s georeferencing (tie point + pixel scale for north-up
/// transforms, ModelTransformation otherwise; the EPSG code as a projected or geographic GeoKey): a tile
/// a GIS opens in place.
pub fn encode_geotiff(img: &RgbImage, geo: Option<&GeoRef>) -> Result<Vec<u8>, String> {
    use tiff::encoder::{colortype::RGB8, TiffEncoder};
    use tiff::tags::Tag;
    let mut out = std::io::Cursor::new(Vec::new());
    let e = |e: tiff::TiffError| e.to_string();
    let mut enc = TiffEncoder::new(&mut out).map_err(e)?;
    let mut image = enc
        .new_image::<RGB8>(img.width as u32, img.height as u32)
        .map_err(e)?;
    if let Some(g) = geo {
        let t = g.transform.0;
        let dir = image.encoder();
        if t[2] == 0.0 && t[4] == 0.0 && t[5] < 0.0 {
            dir.write_tag(Tag::ModelPixelScaleTag, &[t[1], -t[5], 0.0][..])
                .map_err(e)?;
            dir.write_tag(Tag::ModelTiepointTag, &[0.0, 0.0, 0.0, t[0], t[3], 0.0][..])
                .map_err(e)?;
        } else {
            let m = [
                t[1], t[2], 0.0, t[0], t[4], t[5], 0.0, t[3], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                1.0,
            ];
            dir.write_tag(Tag::ModelTransformationTag, &m[..])
                .map_err(e)?;
        }
        // GeoKey directory: version 1.1.0; raster type PixelIsArea; the CRS code.
        let code = g
            .crs
            .as_deref()
            .and_then(|c| c.strip_prefix("EPSG:"))
            .and_then(|c| c.parse::<u16>().ok());
        let mut keys: Vec<u16> = vec![1, 1, 0, 0, 1025, 0, 1, 1];
        if let Some(code) = code {
            // 4326-like geographic codes go to GeographicTypeGeoKey, others to ProjectedCSTypeGeoKey.
            let geographic = (4000..5000).contains(&code);
            let model_type = if geographic { 2 } else { 1 };
            keys.extend([1024, 0, 1, model_type]);
            keys.extend([if geographic { 2048 } else { 3072 }, 0, 1, code]);
        }
        keys[3] = ((keys.len() - 4) / 4) as u16;
        // GeoKeys must be sorted by id.
        let mut entries: Vec<[u16; 4]> = keys[4..]
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        entries.sort_by_key(|k| k[0]);
        let sorted: Vec<u16> = keys[..4]
            .iter()
            .copied()
            .chain(entries.into_iter().flatten())
            .collect();
        dir.write_tag(Tag::GeoKeyDirectoryTag, &sorted[..])
            .map_err(e)?;
    }
    image.write_data(&img.pixels).map_err(e)?;
    Ok(out.into_inner())
}

/// Writes a `width × height` GeoTIFF of `bands` unsigned 16-bit bands, uncompressed, in 256 × 256 tiles,
/// one tile in memory at a time: `sample(x, y, band)` gives each value. For scenes larger than memory
/// (tests, benchmarks, and data converted from another form); `geo` as in [`encode_geotiff`] (north-up).
pub fn write_geotiff_u16(
    path: &std::path::Path,
    width: usize,
    height: usize,
    bands: usize,
    geo: Option<&GeoRef>,
    mut sample: impl FnMut(usize, usize, usize) -> u16,
) -> std::io::Result<()> {
    use std::io::Write;
    const TILE: usize = 256;
    let (across, down) = (width.div_ceil(TILE), height.div_ceil(TILE));
    let tile_bytes = TILE * TILE * bands * 2;
    let tiles = across * down;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    // Header with the IFD after the tiles.
    let ifd_at = 8 + (tiles * tile_bytes) as u64;
    let big = ifd_at + 4096 > u32::MAX as u64;
    if big {
        return Err(std::io::Error::other("over 4 GB: BigTIFF is not written"));
    }
    out.write_all(b"II*\0")?;
    out.write_all(&(ifd_at as u32).to_le_bytes())?;
    let mut tile = vec![0u8; tile_bytes];
    for ty in 0..down {
        for tx in 0..across {
            for y in 0..TILE {
                for x in 0..TILE {
                    let (ix, iy) = (tx * TILE + x, ty * TILE + y);
                    for b in 0..bands {
                        let v = if ix < width && iy < height {
                            sample(ix, iy, b)
                        } else {
                            0
                        };
                        let at = ((y * TILE + x) * bands + b) * 2;
                        tile[at..at + 2].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            out.write_all(&tile)?;
        }
    }
    let short = |v: u16| v.to_le_bytes().to_vec();
    let long = |v: u32| v.to_le_bytes().to_vec();
    let mut entries: Vec<(u16, u16, u32, Vec<u8>)> = vec![
        (256, 4, 1, long(width as u32)),
        (257, 4, 1, long(height as u32)),
        (
            258,
            3,
            bands as u32,
            (0..bands).flat_map(|_| short(16)).collect(),
        ),
        (259, 3, 1, short(1)),
        (262, 3, 1, short(if bands == 3 { 2 } else { 1 })),
        (277, 3, 1, short(bands as u16)),
        (284, 3, 1, short(1)),
        (322, 3, 1, short(TILE as u16)),
        (323, 3, 1, short(TILE as u16)),
        (
            324,
            4,
            tiles as u32,
            (0..tiles)
                .flat_map(|i| long((8 + i * tile_bytes) as u32))
                .collect(),
        ),
        (
            325,
            4,
            tiles as u32,
            (0..tiles).flat_map(|_| long(tile_bytes as u32)).collect(),
        ),
        (
            339,
            3,
            bands as u32,
            (0..bands).flat_map(|_| short(1)).collect(),
        ),
    ];
    if bands > 3 {
        entries.push((
            338,
            3,
            (bands - 3) as u32,
            (3..bands).flat_map(|_| short(0)).collect(),
        ));
    }
    if let Some(g) = geo {
        let t = g.transform.0;
        let doubles = |v: &[f64]| v.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<u8>>();
        entries.push((33550, 12, 3, doubles(&[t[1], -t[5], 0.0])));
        entries.push((33922, 12, 6, doubles(&[0.0, 0.0, 0.0, t[0], t[3], 0.0])));
        if let Some(code) = g
            .crs
            .as_deref()
            .and_then(|c| c.strip_prefix("EPSG:"))
            .and_then(|c| c.parse::<u16>().ok())
        {
            let keys: Vec<u16> = vec![1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, code];
            entries.push((
                34735,
                3,
                keys.len() as u32,
                keys.iter().flat_map(|k| k.to_le_bytes()).collect(),
            ));
        }
    }
    entries.sort_by_key(|e| e.0);
    let mut tail_at = ifd_at as usize + 2 + 12 * entries.len() + 4;
    let mut tail = Vec::new();
    out.write_all(&(entries.len() as u16).to_le_bytes())?;
    for (tag, typ, count, bytes) in &entries {
        out.write_all(&tag.to_le_bytes())?;
        out.write_all(&typ.to_le_bytes())?;
        out.write_all(&count.to_le_bytes())?;
        if bytes.len() <= 4 {
            let mut b = bytes.clone();
            b.resize(4, 0);
            out.write_all(&b)?;
        } else {
            out.write_all(&(tail_at as u32).to_le_bytes())?;
            tail.extend(bytes);
            tail_at += bytes.len();
        }
    }
    out.write_all(&0u32.to_le_bytes())?;
    out.write_all(&tail)?;
    out.flush()
}

/// A window of a scene, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

impl Window {
    pub fn center(&self) -> (f64, f64) {
        (
            self.x as f64 + self.width as f64 / 2.0,
            self.y as f64 + self.height as f64 / 2.0,
        )
    }
}

/// Window starts along one side: every `stride`, plus one flush with the far edge so nothing is left
/// uncovered; one window of the whole side when it is no longer than `tile`.
fn starts(len: usize, tile: usize, stride: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let mut s: Vec<usize> = (0..=len - tile).step_by(stride.max(1)).collect();
    if s.last() != Some(&(len - tile)) {
        s.push(len - tile);
    }
    s
}

/// The tiles of a `width`×`height` scene, row by row.
pub fn tile_windows(width: usize, height: usize, tile: usize, stride: usize) -> Vec<Window> {
    let (tw, th) = (tile.min(width), tile.min(height));
    let mut out = Vec::new();
    for y in starts(height, tile, stride) {
        for x in starts(width, tile, stride) {
            out.push(Window {
                x,
                y,
                width: tw,
                height: th,
            });
        }
    }
    out
}

/// The pixels of `w` (which must lie inside `img`).
pub fn crop(img: &RgbImage, w: Window) -> RgbImage {
    assert!(
        w.x + w.width <= img.width && w.y + w.height <= img.height,
        "window inside the image"
    );
    let mut out = Vec::with_capacity(w.width * w.height * 3);
    for row in w.y..w.y + w.height {
        let at = (row * img.width + w.x) * 3;
        out.extend_from_slice(&img.pixels[at..at + w.width * 3]);
    }
    RgbImage::new(w.width, w.height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_scene_with_the_last_flush_to_the_edge() {
        assert_eq!(starts(500, 224, 160), [0, 160, 276]);
        assert_eq!(starts(224, 224, 160), [0]);
        assert_eq!(starts(100, 224, 160), [0]);
        assert_eq!(starts(384, 224, 160), [0, 160]);
        let w = tile_windows(500, 100, 224, 160);
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|w| w.height == 100 && w.width == 224));
    }

    #[test]
    fn stretch_maps_the_2_98_percentiles_to_the_ends() {
        let values: Vec<f64> = (0..=1000).map(|v| v as f64).collect();
        let range = stretch_range(values.iter().copied(), None);
        assert_eq!(range, (20.0, 980.0));
        assert_eq!(stretch(20.0, range), 0);
        assert_eq!(stretch(980.0, range), 255);
        assert_eq!(stretch(5000.0, range), 255);
        assert_eq!(stretch(500.0, range), 128);
        // NoData is not a sample.
        let with_nodata = values.iter().copied().chain(std::iter::repeat_n(0.0, 5000));
        assert_eq!(stretch_range(with_nodata, Some(0.0)).0, 20.0);
    }

    #[test]
    fn bands_parse_one_based_triples() {
        assert_eq!(SceneOptions::parse_bands("4,3,2"), Ok([4, 3, 2]));
        assert!(SceneOptions::parse_bands("0,1,2").is_err());
        assert!(SceneOptions::parse_bands("1,2").is_err());
    }
}
