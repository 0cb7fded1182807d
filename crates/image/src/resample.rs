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

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
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
            weights[xx * ksize + x] = if v < 0.0 {
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
    let (w, h) = (img.width, img.height);
    let mut cur = img.clone();
    if out_w != w {
        let c = precompute(w, out_w);
        let mut out = vec![0u8; out_w * h * 3];
        for y in 0..h {
            let row = &cur.pixels[y * w * 3..(y + 1) * w * 3];
            for xx in 0..out_w {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (t, &kv) in k.iter().enumerate() {
                    let p = &row[(xmin + t) * 3..(xmin + t) * 3 + 3];
                    acc[0] += p[0] as i32 * kv;
                    acc[1] += p[1] as i32 * kv;
                    acc[2] += p[2] as i32 * kv;
                }
                let o = (y * out_w + xx) * 3;
                out[o] = clip8(acc[0]);
                out[o + 1] = clip8(acc[1]);
                out[o + 2] = clip8(acc[2]);
            }
        }
        cur = RgbImage::new(out_w, h, out);
    }
    if out_h != h {
        let c = precompute(h, out_h);
        let cw = cur.width;
        let mut out = vec![0u8; cw * out_h * 3];
        for yy in 0..out_h {
            let (ymin, n) = c.bounds[yy];
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            for xx in 0..cw {
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (t, &kv) in k.iter().enumerate() {
                    let o = ((ymin + t) * cw + xx) * 3;
                    acc[0] += cur.pixels[o] as i32 * kv;
                    acc[1] += cur.pixels[o + 1] as i32 * kv;
                    acc[2] += cur.pixels[o + 2] as i32 * kv;
                }
                let o = (yy * cw + xx) * 3;
                out[o] = clip8(acc[0]);
                out[o + 1] = clip8(acc[1]);
                out[o + 2] = clip8(acc[2]);
            }
        }
        cur = RgbImage::new(cw, out_h, out);
    }
    cur
}
