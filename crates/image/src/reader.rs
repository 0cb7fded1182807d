//! The bounded scene reader: a TIFF read a strip or tile at a time, so that memory follows the window
//! asked for, not the scene. A 20,000 × 20,000 three-band 16-bit GeoTIFF is 2.4 GB of samples; tiling
//! it for an index, or cutting one tile out of it for a browser, holds one chunk of the file and the
//! window's RGB at a time.
//!
//! The display rule is the one of [`crate::scene`] (2–98 % nearest-rank stretch per band over the
//! whole scene, NaN and NoData excluded, 8-bit bands as they are), computed exactly without holding
//! the samples: each sample is mapped to an order-preserving 64-bit key, and the two ranks are found
//! by a radix select over 16-bit digits, one pass over the file per digit (one pass for 8- and 16-bit
//! bands, two for 32-bit, four for 64-bit), with a 65,536-bin histogram per band and rank.
//!
//! Streamed: grey, grey + alpha, RGB, RGBA and multiband TIFFs of 8, 16, 32 or 64 bits per sample.
//! Palette, CMYK, YCbCr, Lab and sub-byte TIFFs go through the whole-image decoder, which converts
//! them as Pillow does; the pixel limit bounds those.

use std::io::{Read, Seek};

use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;
use tiff::ColorType;

use crate::scene::{GeoRef, SceneOptions, Window};
use crate::{Error, RgbImage};

/// Largest strip or tile decoded at once (its samples, and its compressed bytes). A file whose chunks
/// are larger (one strip for the whole image) is refused with a hint to re-tile it.
pub const MAX_CHUNK_BYTES: usize = 256 << 20;

/// A TIFF opened for windowed reading, with its bands' display mapping computed.
pub struct SceneReader<R: Read + Seek> {
    decoder: Decoder<R>,
    name: String,
    pub width: usize,
    pub height: usize,
    samples: usize,
    planar: bool,
    chunk_w: usize,
    chunk_h: usize,
    /// Chunks across and down one plane.
    across: usize,
    down: usize,
    /// 0-based bands shown as red, green, blue.
    bands: [usize; 3],
    /// The stretch of each shown band; `None` for 8-bit unsigned bands, used as they are.
    maps: [Option<(f64, f64)>; 3],
    pub geo: Option<GeoRef>,
}

/// Whether a TIFF of this colour type is read by [`SceneReader`] (else by the whole-image decoder).
pub fn streamable(color: ColorType) -> bool {
    let depth = color.bit_depth();
    matches!(
        color,
        ColorType::Gray(_)
            | ColorType::GrayA(_)
            | ColorType::RGB(_)
            | ColorType::RGBA(_)
            | ColorType::Multiband { .. }
    ) && matches!(depth, 8 | 16 | 32 | 64)
}

impl SceneReader<std::io::BufReader<std::fs::File>> {
    /// Opens a TIFF file; `Ok(None)` when it is not one [`streamable`] reads.
    pub fn open(path: &std::path::Path, opts: &SceneOptions) -> Result<Option<Self>, Error> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::Decode {
            path: name.clone(),
            message: e.to_string(),
        })?;
        Self::new(std::io::BufReader::new(file), &name, opts)
    }
}

/// A sample as an order-preserving key (its significant bits at the top), or `None` when it is not a
/// valid sample (NaN, infinite, NoData).
type KeyFn = fn(&DecodingResult, usize, Option<f64>) -> Option<u64>;

fn valid(v: f64, nodata: Option<f64>) -> bool {
    v.is_finite() && Some(v) != nodata
}

/// Keys of each sample type, and back. Signed integers flip their sign bit; floats use IEEE total
/// order (negative: all bits flipped; positive: sign bit set).
fn key_of(r: &DecodingResult, k: usize, nodata: Option<f64>) -> Option<u64> {
    let f32_key = |b: u32| if b >> 31 == 1 { !b } else { b | 1 << 31 };
    let f64_key = |b: u64| if b >> 63 == 1 { !b } else { b | 1 << 63 };
    let (key, v) = match r {
        DecodingResult::U8(v) => ((v[k] as u64) << 56, v[k] as f64),
        DecodingResult::I8(v) => ((((v[k] as u8) ^ 0x80) as u64) << 56, v[k] as f64),
        DecodingResult::U16(v) => ((v[k] as u64) << 48, v[k] as f64),
        DecodingResult::I16(v) => ((((v[k] as u16) ^ 0x8000) as u64) << 48, v[k] as f64),
        DecodingResult::F16(v) => {
            let b = v[k].to_bits();
            let key = if b >> 15 == 1 { !b } else { b | 1 << 15 };
            ((key as u64) << 48, v[k].to_f64())
        }
        DecodingResult::U32(v) => ((v[k] as u64) << 32, v[k] as f64),
        DecodingResult::I32(v) => ((((v[k] as u32) ^ 1 << 31) as u64) << 32, v[k] as f64),
        DecodingResult::F32(v) => ((f32_key(v[k].to_bits()) as u64) << 32, v[k] as f64),
        DecodingResult::U64(v) => (v[k], v[k] as f64),
        DecodingResult::I64(v) => ((v[k] as u64) ^ 1 << 63, v[k] as f64),
        DecodingResult::F64(v) => (f64_key(v[k].to_bits()), v[k]),
    };
    valid(v, nodata).then_some(key)
}

/// The value of a key of the sample type of `r`.
fn value_of(r: &DecodingResult, key: u64) -> f64 {
    let f32_value = |k: u32| f32::from_bits(if k >> 31 == 1 { k & !(1 << 31) } else { !k });
    let f64_value = |k: u64| f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k });
    match r {
        DecodingResult::U8(_) => (key >> 56) as u8 as f64,
        DecodingResult::I8(_) => (((key >> 56) as u8) ^ 0x80) as i8 as f64,
        DecodingResult::U16(_) => (key >> 48) as u16 as f64,
        DecodingResult::I16(_) => (((key >> 48) as u16) ^ 0x8000) as i16 as f64,
        DecodingResult::F16(_) => {
            let k = (key >> 48) as u16;
            half::f16::from_bits(if k >> 15 == 1 { k & !(1 << 15) } else { !k }).to_f64()
        }
        DecodingResult::U32(_) => (key >> 32) as u32 as f64,
        DecodingResult::I32(_) => (((key >> 32) as u32) ^ 1 << 31) as i32 as f64,
        DecodingResult::F32(_) => f32_value((key >> 32) as u32) as f64,
        DecodingResult::U64(_) => key as f64,
        DecodingResult::I64(_) => (key ^ 1 << 63) as i64 as f64,
        DecodingResult::F64(_) => f64_value(key),
    }
}

fn significant_bits(r: &DecodingResult) -> u32 {
    match r {
        DecodingResult::U8(_) | DecodingResult::I8(_) => 8,
        DecodingResult::U16(_) | DecodingResult::I16(_) | DecodingResult::F16(_) => 16,
        DecodingResult::U32(_) | DecodingResult::I32(_) | DecodingResult::F32(_) => 32,
        _ => 64,
    }
}

fn len_of(r: &DecodingResult) -> usize {
    match r {
        DecodingResult::U8(v) => v.len(),
        DecodingResult::I8(v) => v.len(),
        DecodingResult::U16(v) => v.len(),
        DecodingResult::I16(v) => v.len(),
        DecodingResult::F16(v) => v.len(),
        DecodingResult::U32(v) => v.len(),
        DecodingResult::I32(v) => v.len(),
        DecodingResult::F32(v) => v.len(),
        DecodingResult::U64(v) => v.len(),
        DecodingResult::I64(v) => v.len(),
        DecodingResult::F64(v) => v.len(),
    }
}

/// One rank being searched for in one band: the key bits fixed so far, and the rank among the samples
/// that share them.
#[derive(Clone, Copy)]
struct Target {
    prefix: u64,
    rank: u64,
}

impl<R: Read + Seek> SceneReader<R> {
    /// Reads the header and, for bands deeper than 8 bits, the display mapping (passes over the file);
    /// `Ok(None)` when the TIFF is not one [`streamable`] reads.
    pub fn new(mut reader: R, name: &str, opts: &SceneOptions) -> Result<Option<Self>, Error> {
        let fail = |message: String| Error::Decode {
            path: name.to_string(),
            message,
        };
        crate::tiff_header::check_first_ifd(&mut reader).map_err(fail)?;
        let terr = |e: tiff::TiffError| fail(e.to_string());
        let mut d = Decoder::new(reader)
            .map_err(terr)?
            .with_limits(crate::scene::tag_limits());
        let (w, h) = d.dimensions().map_err(terr)?;
        crate::check_size(w as u64, h as u64, name)?;
        if w == 0 || h == 0 {
            return Err(fail("image has no pixels".into()));
        }
        let color = d.colortype().map_err(terr)?;
        if !streamable(color) {
            return Ok(None);
        }
        let samples = color.num_samples() as usize;
        let bands = match opts.bands {
            Some(b) => b,
            None if samples >= 3 => [1, 2, 3],
            None => [1, 1, 1],
        };
        if let Some(&bad) = bands.iter().find(|&&b| b == 0 || b > samples) {
            return Err(fail(format!(
                "--bands names band {bad}, but the image has {samples} band(s)"
            )));
        }
        let planar = d
            .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
            .ok()
            .flatten()
            == Some(2);
        let (cw, ch) = d.chunk_dimensions();
        let (cw, ch) = (cw as usize, ch as usize);
        if cw == 0 || ch == 0 {
            return Err(fail(format!("chunks of {cw}×{ch} pixels")));
        }
        let bytes_per_sample = (color.bit_depth() as usize).div_ceil(8);
        let chunk_bytes = cw
            .saturating_mul(ch)
            .saturating_mul(if planar { 1 } else { samples })
            .saturating_mul(bytes_per_sample);
        if chunk_bytes > MAX_CHUNK_BYTES {
            return Err(fail(format!(
                "its strips or tiles are {cw}×{ch} pixels ({chunk_bytes} bytes each, over {MAX_CHUNK_BYTES}); \
                 rewrite it tiled, e.g. gdal_translate -co TILED=YES"
            )));
        }
        let (w, h) = (w as usize, h as usize);
        let (across, down) = (w.div_ceil(cw), h.div_ceil(ch));
        let per_plane = across * down;
        let chunks = match d.get_chunk_type() {
            tiff::decoder::ChunkType::Strip => d.strip_count().map_err(terr)? as usize,
            tiff::decoder::ChunkType::Tile => d.tile_count().map_err(terr)? as usize,
        };
        let want = per_plane * if planar { samples } else { 1 };
        if chunks < want {
            return Err(fail(format!("{chunks} strips or tiles, {want} expected")));
        }
        let geo = crate::scene::read_georef(&mut d);
        let nodata: Option<f64> = d
            .find_tag(Tag::GdalNodata)
            .ok()
            .flatten()
            .and_then(|v| v.into_string().ok())
            .and_then(|s| s.trim().trim_end_matches('\0').parse().ok());
        // Tags are read; chunks may be larger than a tag may.
        let mut limits = Limits::default();
        limits.decoding_buffer_size = MAX_CHUNK_BYTES;
        limits.intermediate_buffer_size = MAX_CHUNK_BYTES;
        let d = d.with_limits(limits);
        let mut reader = SceneReader {
            decoder: d,
            name: name.to_string(),
            width: w,
            height: h,
            samples,
            planar,
            chunk_w: cw,
            chunk_h: ch,
            across,
            down,
            bands: bands.map(|b| b - 1),
            maps: [None; 3],
            geo,
        };
        reader.maps = reader.display_maps(nodata)?;
        Ok(Some(reader))
    }

    fn fail(&self, message: String) -> Error {
        Error::Decode {
            path: self.name.clone(),
            message,
        }
    }

    /// Chunk `(cx, cy)` of the plane holding `band` (the only plane of a chunky file).
    fn read_chunk(&mut self, cx: usize, cy: usize, band: usize) -> Result<DecodingResult, Error> {
        let plane = if self.planar { band } else { 0 };
        let index = plane * self.across * self.down + cy * self.across + cx;
        let index = u32::try_from(index).map_err(|_| self.fail("chunk index over 2^32".into()))?;
        let chunk = self
            .decoder
            .read_chunk(index)
            .map_err(|e| self.fail(format!("strip/tile {index}: {e}")))?;
        let (w, h) = self.chunk_extent(cx, cy);
        let need = w * h * if self.planar { 1 } else { self.samples };
        if len_of(&chunk) < need {
            return Err(self.fail(format!(
                "strip/tile {index} decoded to {} samples, {need} expected",
                len_of(&chunk)
            )));
        }
        Ok(chunk)
    }

    /// The pixels of chunk `(cx, cy)` inside the image (edge chunks are cut short).
    fn chunk_extent(&self, cx: usize, cy: usize) -> (usize, usize) {
        (
            self.chunk_w.min(self.width - cx * self.chunk_w),
            self.chunk_h.min(self.height - cy * self.chunk_h),
        )
    }

    /// Index in a chunk's samples of band `band` of the chunk's pixel `i`.
    fn sample_index(&self, i: usize, band: usize) -> usize {
        if self.planar {
            i
        } else {
            i * self.samples + band
        }
    }

    /// The 2nd and 98th percentile of each shown band deeper than 8 bits (exact nearest rank).
    fn display_maps(&mut self, nodata: Option<f64>) -> Result<[Option<(f64, f64)>; 3], Error> {
        // The sample type, from the first chunk.
        let probe = self.read_chunk(0, 0, self.bands[0])?;
        if matches!(probe, DecodingResult::U8(_)) {
            return Ok([None; 3]);
        }
        let key: KeyFn = key_of;
        let bits = significant_bits(&probe);
        let mut distinct: Vec<usize> = self.bands.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        // Per distinct band: its two targets (2nd, 98th percentile); filled after the first pass.
        let mut targets: Vec<[Target; 2]> =
            vec![[Target { prefix: 0, rank: 0 }; 2]; distinct.len()];
        let passes = bits.div_ceil(16);
        for pass in 0..passes {
            let shift = 48 - 16 * pass;
            // Bits above this pass's digit must equal the target's prefix.
            let above = if pass == 0 {
                0
            } else {
                u64::MAX << (64 - 16 * pass)
            };
            let mut hist = vec![[vec![0u64; 1 << 16], vec![0u64; 1 << 16]]; distinct.len()];
            for cy in 0..self.down {
                for cx in 0..self.across {
                    // Decoded chunks are cut to the image: their rows are `w` pixels long.
                    let (w, h) = self.chunk_extent(cx, cy);
                    let mut planes: Vec<(usize, DecodingResult)> = Vec::new();
                    for (slot, &band) in distinct.iter().enumerate() {
                        if self.planar || planes.is_empty() {
                            planes.push((slot, self.read_chunk(cx, cy, band)?));
                        }
                    }
                    for (slot, &band) in distinct.iter().enumerate() {
                        let data = if self.planar {
                            &planes[slot].1
                        } else {
                            &planes[0].1
                        };
                        let t = targets[slot];
                        for row in 0..h {
                            for col in 0..w {
                                let i = self.sample_index(row * w + col, band);
                                let Some(k) = key(data, i, nodata) else {
                                    continue;
                                };
                                let digit = ((k >> shift) & 0xffff) as usize;
                                for (which, t) in t.iter().enumerate() {
                                    if pass == 0 || k & above == t.prefix {
                                        hist[slot][which][digit] += 1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for slot in 0..distinct.len() {
                if pass == 0 {
                    let n: u64 = hist[slot][0].iter().sum();
                    if n == 0 {
                        // No valid sample: the band renders black, as the whole-image rule does.
                        targets[slot] = [Target {
                            prefix: 0,
                            rank: u64::MAX,
                        }; 2];
                        continue;
                    }
                    let rank = |q: f64| ((n - 1) as f64 * q).floor() as u64;
                    targets[slot] = [
                        Target {
                            prefix: 0,
                            rank: rank(0.02),
                        },
                        Target {
                            prefix: 0,
                            rank: rank(0.98),
                        },
                    ];
                }
                for which in 0..2 {
                    let t = &mut targets[slot][which];
                    if t.rank == u64::MAX {
                        continue;
                    }
                    let mut below = 0u64;
                    for (digit, &count) in hist[slot][which].iter().enumerate() {
                        if below + count > t.rank {
                            t.prefix |= (digit as u64) << shift;
                            t.rank -= below;
                            break;
                        }
                        below += count;
                    }
                }
            }
        }
        let mut maps = [None; 3];
        for (c, band) in self.bands.iter().enumerate() {
            let slot = distinct.iter().position(|b| b == band).unwrap();
            let [lo, hi] = targets[slot];
            maps[c] = Some(if lo.rank == u64::MAX {
                (0.0, 0.0)
            } else {
                (value_of(&probe, lo.prefix), value_of(&probe, hi.prefix))
            });
        }
        Ok(maps)
    }

    /// The RGB pixels of `win` (which must lie inside the scene), reading only the chunks it covers.
    pub fn read_window(&mut self, win: Window) -> Result<RgbImage, Error> {
        if win.width == 0
            || win.height == 0
            || win.x + win.width > self.width
            || win.y + win.height > self.height
        {
            return Err(self.fail(format!(
                "window {},{} {}×{} is outside the {}×{} scene",
                win.x, win.y, win.width, win.height, self.width, self.height
            )));
        }
        let mut out = vec![0u8; win.width * win.height * 3];
        let (cx0, cx1) = (win.x / self.chunk_w, (win.x + win.width - 1) / self.chunk_w);
        let (cy0, cy1) = (
            win.y / self.chunk_h,
            (win.y + win.height - 1) / self.chunk_h,
        );
        for cy in cy0..=cy1 {
            for cx in cx0..=cx1 {
                let mut planes: Vec<(usize, DecodingResult)> = Vec::new();
                for band in self.bands {
                    if (self.planar && !planes.iter().any(|p| p.0 == band)) || planes.is_empty() {
                        planes.push((band, self.read_chunk(cx, cy, band)?));
                    }
                }
                // The part of this chunk inside the window, in image coordinates.
                let (x0, y0) = (cx * self.chunk_w, cy * self.chunk_h);
                let (w, h) = self.chunk_extent(cx, cy);
                let (ix0, ix1) = (win.x.max(x0), (win.x + win.width).min(x0 + w));
                let (iy0, iy1) = (win.y.max(y0), (win.y + win.height).min(y0 + h));
                for (c, &band) in self.bands.iter().enumerate() {
                    let data = if self.planar {
                        &planes.iter().find(|p| p.0 == band).unwrap().1
                    } else {
                        &planes[0].1
                    };
                    let map = self.maps[c];
                    for y in iy0..iy1 {
                        for x in ix0..ix1 {
                            let i = self.sample_index((y - y0) * w + (x - x0), band);
                            let v = sample(data, i);
                            out[((y - win.y) * win.width + (x - win.x)) * 3 + c] = match map {
                                None => v as u8,
                                Some(range) => crate::scene::stretch(v, range),
                            };
                        }
                    }
                }
            }
        }
        Ok(RgbImage::new(win.width, win.height, out))
    }
}

fn sample(r: &DecodingResult, k: usize) -> f64 {
    match r {
        DecodingResult::U8(v) => v[k] as f64,
        DecodingResult::U16(v) => v[k] as f64,
        DecodingResult::U32(v) => v[k] as f64,
        DecodingResult::U64(v) => v[k] as f64,
        DecodingResult::I8(v) => v[k] as f64,
        DecodingResult::I16(v) => v[k] as f64,
        DecodingResult::I32(v) => v[k] as f64,
        DecodingResult::I64(v) => v[k] as f64,
        DecodingResult::F16(v) => v[k].to_f64(),
        DecodingResult::F32(v) => v[k] as f64,
        DecodingResult::F64(v) => v[k],
    }
}
