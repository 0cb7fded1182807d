//! A port of Pillow's `ImagingResample` for 8-bit images with the bicubic filter (a = −0.5): separable
//! two-pass convolution (horizontal, then vertical) with support scaled by the downscale factor,
//! coefficients in 22-bit fixed point, and the intermediate image clipped to 8 bits, so results are
//! bit-identical to `PIL.Image.resize(..., BICUBIC)`.

use crate::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, and fixed-point weights (`ksize` per pixel).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Coefficients of output pixels `outputs` (a range of `0..out_size`): entry `i` is output
/// `outputs.start + i`. Only the outputs asked for are computed, so cutting a window out of a huge
/// resize costs the window, not the resize.
fn precompute(in_size: usize, out_size: usize, outputs: std::ops::Range<usize>) -> Coeffs {
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(outputs.len());
    let mut weights = vec![0i32; outputs.len() * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in outputs.enumerate() {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for x in 0..xmax {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            weights[i * ksize + x] = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes to `out_w × out_h` exactly as Pillow's bicubic filter does.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_window(img, out_w, out_h, 0, 0, out_w, out_h)
}

/// The `width × height` window at (`left`, `top`) of [`resize_bicubic`]`(img, out_w, out_h)`, computed
/// without the rest of it: each output pixel of Pillow's separable filter depends only on its own taps,
/// so the window is bit-identical to the same pixels of the whole resize. A 1 × 65,500 image resized
/// to a 224 shortest side and centre-cropped costs 224 × 224 pixels, not 224 × 14.7 million.
pub fn resize_bicubic_window(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    left: usize,
    top: usize,
    width: usize,
    height: usize,
) -> RgbImage {
    assert!(
        left + width <= out_w && top + height <= out_h,
        "window inside the resized image"
    );
    let (w, h) = (img.width, img.height);
    // The input rows the vertical pass reads for the window's rows (all of them when there is none).
    let (vertical, row_range) = if out_h != h {
        let c = precompute(h, out_h, top..top + height);
        let first = c.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let last = c.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
        (Some(c), first..last.max(first))
    } else {
        (None, top..top + height)
    };
    // Horizontal pass over those rows only, for the window's columns.
    let rows = row_range.len();
    let mut cur = vec![0u8; width * rows * 3];
    if out_w != w {
        let c = precompute(w, out_w, left..left + width);
        for (r, y) in row_range.clone().enumerate() {
            let row = &img.pixels[y * w * 3..(y + 1) * w * 3];
            for xx in 0..width {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (t, &kv) in k.iter().enumerate() {
                    let p = &row[(xmin + t) * 3..(xmin + t) * 3 + 3];
                    acc[0] += p[0] as i32 * kv;
                    acc[1] += p[1] as i32 * kv;
                    acc[2] += p[2] as i32 * kv;
                }
                let o = (r * width + xx) * 3;
                cur[o] = clip8(acc[0]);
                cur[o + 1] = clip8(acc[1]);
                cur[o + 2] = clip8(acc[2]);
            }
        }
    } else {
        for (r, y) in row_range.clone().enumerate() {
            cur[r * width * 3..(r + 1) * width * 3]
                .copy_from_slice(&img.pixels[(y * w + left) * 3..(y * w + left + width) * 3]);
        }
    }
    let Some(c) = vertical else {
        return RgbImage::new(width, height, cur);
    };
    let first = row_range.start;
    let mut out = vec![0u8; width * height * 3];
    for yy in 0..height {
        let (ymin, n) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        for xx in 0..width {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (t, &kv) in k.iter().enumerate() {
                let o = ((ymin + t - first) * width + xx) * 3;
                acc[0] += cur[o] as i32 * kv;
                acc[1] += cur[o + 1] as i32 * kv;
                acc[2] += cur[o + 2] as i32 * kv;
            }
            let o = (yy * width + xx) * 3;
            out[o] = clip8(acc[0]);
            out[o + 1] = clip8(acc[1]);
            out[o + 2] = clip8(acc[2]);
        }
    }
    RgbImage::new(width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of the resize equals the same pixels of the whole resize, up and down, both axes.
    #[test]
    fn a_window_equals_the_same_pixels_of_the_whole_resize() {
        let (w, h) = (37, 23);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let img = RgbImage::new(w, h, pixels);
        for (ow, oh) in [(80, 50), (12, 9), (37, 60), (90, 23), (5, 5)] {
            let whole = resize_bicubic(&img, ow, oh);
            for (l, t, ww, wh) in [
                (0, 0, ow, oh),
                (1, 2, ow / 2, oh / 3),
                (ow - 3, oh - 2, 3, 2),
            ] {
                let win = resize_bicubic_window(&img, ow, oh, l, t, ww, wh);
                for y in 0..wh {
                    let a = &win.pixels[y * ww * 3..(y + 1) * ww * 3];
                    let b = &whole.pixels[((t + y) * ow + l) * 3..((t + y) * ow + l + ww) * 3];
                    assert_eq!(a, b, "{ow}x{oh} window {l},{t} {ww}x{wh} row {y}");
                }
            }
        }
    }
}
