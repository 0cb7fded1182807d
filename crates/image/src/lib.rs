//! Image decoding and CLIP preprocessing compatible with the official torchvision + Pillow pipeline
//! (spec §6.2): `Resize(shortest side, bicubic)` → `CenterCrop` → RGB → `/255` → normalise.

mod reader;
mod resample;
pub mod scene;
#[doc(hidden)]
pub mod tiff_header;

use std::path::Path;

use image::ImageEncoder;

pub use reader::{SceneReader, MAX_CHUNK_BYTES};
pub use resample::{resize_bicubic, resize_bicubic_window};
pub use scene::{
    decode_scene, decode_scene_file, open_scene, GeoRef, Scene, SceneOptions, SceneSource, Window,
};

/// OpenAI CLIP normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read image: {message}")]
    Decode { path: String, message: String },
}

/// Pillow's decompression-bomb error threshold (`2 * Image.MAX_IMAGE_PIXELS`, 178,956,970 pixels): Pillow
/// warns above half of it and refuses above it; pirclip refuses above it.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// The pixel limit in force for every decoder, process-wide like Pillow's `Image.MAX_IMAGE_PIXELS`
/// (a policy of the run, set once from `--max-image-pixels`, not a property of one call).
static MAX_PIXELS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_PIXELS);

/// Sets the largest image (width × height) any decode accepts.
pub fn set_max_pixels(pixels: u64) {
    MAX_PIXELS.store(pixels, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Refuses an image by its header's size, before anything of its size is allocated.
fn check_size(width: u64, height: u64, name: &str) -> Result<(), Error> {
    let limit = max_pixels();
    let pixels = width.saturating_mul(height);
    if pixels > limit {
        return Err(Error::Decode {
            path: name.to_string(),
            message: format!(
                "{width}×{height} = {pixels} pixels is over the limit of {limit} (Pillow's decompression-bomb \
                 limit); if the file is trusted, raise it with --max-image-pixels"
            ),
        });
    }
    Ok(())
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Self {
        assert_eq!(pixels.len(), width * height * 3, "RGB buffer size");
        RgbImage {
            width,
            height,
            pixels,
        }
    }
}

/// Decodes jpg/png/tif/bmp/webp from memory into RGB. Grayscale is replicated, palette images are
/// expanded, alpha is dropped (as PIL's `convert("RGB")`), 16-bit samples are rounded to 8 bits.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage, Error> {
    if bytes.starts_with(&[0xff, 0xd8]) {
        if let Some(img) = decode_jpeg_libjpeg(bytes, name)? {
            return Ok(img);
        }
        // CMYK or otherwise unusual JPEGs fall through to the pure-Rust decoder.
    }
    let fail = |message: String| Error::Decode {
        path: name.to_string(),
        message,
    };
    tiff_header::check_first_ifd(&mut std::io::Cursor::new(bytes)).map_err(fail)?;
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(e.to_string()))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| fail(e.to_string()))?;
    check_size(w as u64, h as u64, name)?;
    let mut reader = reader()?;
    // A backstop for what the header does not tell (frames, planes): 16-bit RGBA of the limit's pixels.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels().saturating_mul(8).max(64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| fail(e.to_string()))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(fail("image has no pixels".into()));
    }
    Ok(RgbImage::new(w as usize, h as usize, rgb.into_raw()))
}

/// libjpeg-turbo's default decode (ISLOW IDCT, fancy upsampling), as Pillow does it. `Ok(None)` when the
/// stream is not something it turns into RGB; libjpeg errors surface as panics in the binding, caught here.
/// The header's size is checked against the pixel limit before libjpeg allocates anything of that size.
fn decode_jpeg_libjpeg(bytes: &[u8], name: &str) -> Result<Option<RgbImage>, Error> {
    let header = std::panic::catch_unwind(|| {
        mozjpeg::Decompress::new_mem(bytes)
            .ok()
            .map(|d| (d.width() as u64, d.height() as u64))
    })
    .ok()
    .flatten();
    let Some((w, h)) = header else {
        return Ok(None);
    };
    check_size(w, h, name)?;
    Ok(std::panic::catch_unwind(|| -> Option<RgbImage> {
        let d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        if !matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_YCbCr
                | mozjpeg::ColorSpace::JCS_GRAYSCALE
                | mozjpeg::ColorSpace::JCS_RGB
        ) {
            return None;
        }
        let mut rgb = d.rgb().ok()?;
        let (w, h) = (rgb.width(), rgb.height());
        let mut pixels = vec![0u8; w.checked_mul(h)?.checked_mul(3)?];
        rgb.read_scanlines_into(&mut pixels).ok()?;
        rgb.finish().ok()?;
        (w > 0 && h > 0).then(|| RgbImage::new(w, h, pixels))
    })
    .ok()
    .flatten())
}

/// The MIME type of `bytes` when they are an image whose header reads (JPEG, PNG, WebP, GIF, BMP,
/// TIFF), without decoding its pixels; `None` for anything else.
pub fn probe(bytes: &[u8]) -> Option<&'static str> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let kind = match reader.format()? {
        image::ImageFormat::Jpeg => "image/jpeg",
        image::ImageFormat::Png => "image/png",
        image::ImageFormat::WebP => "image/webp",
        image::ImageFormat::Gif => "image/gif",
        image::ImageFormat::Bmp => "image/bmp",
        image::ImageFormat::Tiff => "image/tiff",
        _ => return None,
    };
    let (w, h) = reader.into_dimensions().ok()?;
    (w > 0 && h > 0).then_some(kind)
}

pub fn decode_file(path: &Path) -> Result<RgbImage, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::Decode {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    decode(&bytes, &path.display().to_string())
}

/// PNG bytes of `img` (tiles and TIFF scenes served to browsers, which cannot show TIFF).
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &img.pixels,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .expect("PNG encoding into memory");
    out
}

/// torchvision `Resize(size)` with an int size: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`; an image whose shorter side already equals `size` is returned unchanged.
pub fn resize_shortest_side(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == size {
        return img.clone();
    }
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    resize_bicubic(img, nw, nh)
}

/// torchvision `CenterCrop(size)`: offsets `round((H - size) / 2)`; smaller images are zero-padded first
/// (torchvision pads `(size - W) // 2` left/top and the rest right/bottom).
pub fn center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let mut img = img.clone();
    if img.width < size || img.height < size {
        let pw = size.saturating_sub(img.width);
        let ph = size.saturating_sub(img.height);
        let (left, top) = (pw / 2, ph / 2);
        let (nw, nh) = (img.width + pw, img.height + ph);
        let mut out = vec![0u8; nw * nh * 3];
        for y in 0..img.height {
            let src = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
            let at = ((y + top) * nw + left) * 3;
            out[at..at + src.len()].copy_from_slice(src);
        }
        img = RgbImage::new(nw, nh, out);
    }
    // Python's round() on a .5 value rounds half to even.
    let offset =
        |total: usize| -> usize { ((total - size) as f64 / 2.0).round_ties_even() as usize };
    let (top, left) = (offset(img.height), offset(img.width));
    let mut out = Vec::with_capacity(size * size * 3);
    for y in top..top + size {
        let row = &img.pixels[(y * img.width + left) * 3..(y * img.width + left + size) * 3];
        out.extend_from_slice(row);
    }
    RgbImage::new(size, size, out)
}

/// The eval transform's geometric part: resize shortest side, then center crop. Only the crop is
/// computed (bit-identical to resizing whole and cropping), so an image of extreme aspect ratio costs
/// `size × size` pixels, not its resized size.
pub fn eval_resize_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == size || short == 0 {
        return center_crop(img, size);
    }
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    if nw < size || nh < size {
        return center_crop(&resize_bicubic(img, nw, nh), size);
    }
    let offset = |total: usize| ((total - size) as f64 / 2.0).round_ties_even() as usize;
    resample::resize_bicubic_window(img, nw, nh, offset(nw), offset(nh), size, size)
}

/// `ToTensor` + `Normalize` into a CHW float buffer (appended to `out`).
pub fn normalize_into(img: &RgbImage, out: &mut Vec<f32>) {
    let n = img.width * img.height;
    out.reserve(3 * n);
    for c in 0..3 {
        let (mean, std) = (CLIP_MEAN[c], CLIP_STD[c]);
        out.extend(
            img.pixels
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| (v as f32 / 255.0 - mean) / std),
        );
    }
}

/// Full eval preprocessing of one decoded image: `[3, size, size]` floats.
pub fn preprocess_eval(img: &RgbImage, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * size * size);
    normalize_into(&eval_resize_crop(img, size), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_offsets_round_half_even() {
        // 5 wide, crop 2: (5-2)/2 = 1.5 rounds to 2 in Python.
        let img = RgbImage::new(5, 2, (0..30).collect());
        let c = center_crop(&img, 2);
        assert_eq!(&c.pixels[..3], &[6, 7, 8]);
    }

    #[test]
    fn center_crop_pads_small_images() {
        let img = RgbImage::new(1, 1, vec![9, 9, 9]);
        let c = center_crop(&img, 3);
        assert_eq!(c.pixels[(3 + 1) * 3], 9);
        assert_eq!(c.pixels.iter().filter(|&&v| v == 9).count(), 3);
    }

    /// The cropped-only path equals resizing whole and cropping, for tall, wide and extreme images.
    #[test]
    fn eval_crop_equals_resize_then_crop() {
        for (w, h) in [
            (300, 200),
            (200, 300),
            (1, 900),
            (900, 3),
            (224, 500),
            (225, 225),
        ] {
            let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 253) as u8).collect();
            let img = RgbImage::new(w, h, pixels);
            let slow = center_crop(&resize_shortest_side(&img, 224), 224);
            assert_eq!(eval_resize_crop(&img, 224), slow, "{w}x{h}");
        }
    }

    #[test]
    fn resize_keeps_aspect_like_torchvision() {
        let img = RgbImage::new(300, 200, vec![128; 300 * 200 * 3]);
        let r = resize_shortest_side(&img, 224);
        assert_eq!((r.width, r.height), (336, 224));
        assert!(
            r.pixels.iter().all(|&v| v == 128),
            "a constant image stays constant"
        );
    }
}
