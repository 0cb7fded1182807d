//! The bounded scene reader against the whole-scene rule, on TIFFs written here byte by byte: strips
//! and tiles (with partial edge tiles), chunky and planar samples, unsigned, signed and float types,
//! NaN and NoData; windows equal the same pixels of the whole scene.

use pirclip_image::{decode_scene, SceneOptions, SceneReader, Window};

/// Sample types written: TIFF SampleFormat (1 unsigned, 2 signed, 3 float) and bits.
#[derive(Clone, Copy, Debug)]
enum Kind {
    U16,
    I16,
    F32,
    F64,
    U8,
}

impl Kind {
    fn bits(self) -> u16 {
        match self {
            Kind::U8 => 8,
            Kind::U16 | Kind::I16 => 16,
            Kind::F32 => 32,
            Kind::F64 => 64,
        }
    }
    fn format(self) -> u16 {
        match self {
            Kind::U8 | Kind::U16 => 1,
            Kind::I16 => 2,
            Kind::F32 | Kind::F64 => 3,
        }
    }
    fn bytes(self, v: f64) -> Vec<u8> {
        match self {
            Kind::U8 => vec![v as u8],
            Kind::U16 => (v as u16).to_le_bytes().to_vec(),
            Kind::I16 => (v as i16).to_le_bytes().to_vec(),
            Kind::F32 => (v as f32).to_le_bytes().to_vec(),
            Kind::F64 => v.to_le_bytes().to_vec(),
        }
    }
}

/// An uncompressed little-endian TIFF of `values[band][y * w + x]`, in `chunk` = (width, height)
/// tiles, or strips of `chunk.1` rows when `tiled` is false; planar or chunky; with a NoData tag.
fn tiff(
    w: usize,
    h: usize,
    values: &[Vec<f64>],
    kind: Kind,
    tiled: bool,
    chunk: (usize, usize),
    planar: bool,
    nodata: Option<&str>,
) -> Vec<u8> {
    let bands = values.len();
    let (cw, ch) = if tiled { chunk } else { (w, chunk.1) };
    let (across, down) = (w.div_ceil(cw), h.div_ceil(ch));
    let planes = if planar { bands } else { 1 };
    // Chunk data: tiles are padded to full size, strips are cut at the bottom.
    let mut data: Vec<Vec<u8>> = Vec::new();
    for p in 0..planes {
        for ty in 0..down {
            for tx in 0..across {
                let rows = if tiled { ch } else { ch.min(h - ty * ch) };
                let mut chunk = Vec::new();
                for y in ty * ch..ty * ch + rows {
                    for x in tx * cw..tx * cw + cw {
                        let inside = x < w && y < h;
                        let bands_here: Vec<usize> = if planar {
                            vec![p]
                        } else {
                            (0..bands).collect()
                        };
                        for b in bands_here {
                            let v = if inside { values[b][y * w + x] } else { 0.0 };
                            chunk.extend(kind.bytes(v));
                        }
                    }
                }
                data.push(chunk);
            }
        }
    }
    let mut out = b"II*\0".to_vec();
    out.extend(0u32.to_le_bytes()); // IFD offset, set below
    let mut offsets = Vec::new();
    for c in &data {
        offsets.push(out.len() as u32);
        out.extend(c);
    }
    let mut entries: Vec<(u16, u16, u32, Vec<u8>)> = Vec::new();
    let short = |v: u16| v.to_le_bytes().to_vec();
    let long = |v: u32| v.to_le_bytes().to_vec();
    entries.push((256, 4, 1, long(w as u32)));
    entries.push((257, 4, 1, long(h as u32)));
    entries.push((
        258,
        3,
        bands as u32,
        (0..bands).flat_map(|_| short(kind.bits())).collect(),
    ));
    entries.push((259, 3, 1, short(1)));
    entries.push((262, 3, 1, short(if bands == 3 { 2 } else { 1 })));
    if !tiled {
        entries.push((
            273,
            4,
            offsets.len() as u32,
            offsets.iter().flat_map(|&o| long(o)).collect(),
        ));
    }
    entries.push((277, 3, 1, short(bands as u16)));
    if !tiled {
        entries.push((278, 4, 1, long(ch as u32)));
        entries.push((
            279,
            4,
            data.len() as u32,
            data.iter().flat_map(|c| long(c.len() as u32)).collect(),
        ));
    }
    entries.push((284, 3, 1, short(if planar { 2 } else { 1 })));
    if tiled {
        entries.push((322, 4, 1, long(cw as u32)));
        entries.push((323, 4, 1, long(ch as u32)));
        entries.push((
            324,
            4,
            offsets.len() as u32,
            offsets.iter().flat_map(|&o| long(o)).collect(),
        ));
        entries.push((
            325,
            4,
            data.len() as u32,
            data.iter().flat_map(|c| long(c.len() as u32)).collect(),
        ));
    }
    if bands > 3 {
        entries.push((
            338,
            3,
            (bands - 3) as u32,
            (3..bands).flat_map(|_| short(0)).collect(),
        ));
    }
    entries.push((
        339,
        3,
        bands as u32,
        (0..bands).flat_map(|_| short(kind.format())).collect(),
    ));
    if let Some(nd) = nodata {
        let mut s = nd.as_bytes().to_vec();
        s.push(0);
        entries.push((42113, 2, s.len() as u32, s));
    }
    pirclip_image::tiff_header::append_ifd(&mut out, &mut entries);
    out
}

/// The reference rule: nearest-rank 2nd and 98th percentiles of the valid samples, linear stretch.
fn reference(
    values: &[Vec<f64>],
    bands: [usize; 3],
    nodata: Option<f64>,
    eight_bit: bool,
) -> Vec<u8> {
    let n = values[0].len();
    let mut out = vec![0u8; n * 3];
    for (c, &b) in bands.iter().enumerate() {
        let v = &values[b - 1];
        let mut valid: Vec<f64> = v
            .iter()
            .copied()
            .filter(|x| x.is_finite() && Some(*x) != nodata)
            .collect();
        valid.sort_by(|a, b| a.total_cmp(b));
        let range = if valid.is_empty() {
            (0.0, 0.0)
        } else {
            let rank = |q: f64| ((valid.len() - 1) as f64 * q).floor() as usize;
            (valid[rank(0.02)], valid[rank(0.98)])
        };
        for i in 0..n {
            out[i * 3 + c] = if eight_bit {
                v[i] as u8
            } else if !v[i].is_finite() || range.1 <= range.0 {
                0
            } else {
                ((v[i] - range.0) / (range.1 - range.0) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            };
        }
    }
    out
}

fn values(w: usize, h: usize, bands: usize, kind: Kind, seed: u64) -> Vec<Vec<f64>> {
    let mut state = seed | 1;
    (0..bands)
        .map(|b| {
            (0..w * h)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let r = (state % 10_000) as f64;
                    match kind {
                        Kind::U8 => (r % 256.0).floor(),
                        Kind::U16 => (r * 3.0 + b as f64 * 500.0 + (i % w) as f64).floor(),
                        Kind::I16 => (r - 5000.0).floor(),
                        Kind::F32 => ((r - 5000.0) * 0.37) as f32 as f64,
                        Kind::F64 => (r - 5000.0) * 1e-3 + 1e-9 * i as f64,
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn windows_of_strips_and_tiles_equal_the_whole_scene_rule() {
    let (w, h) = (53, 41);
    for kind in [Kind::U16, Kind::I16, Kind::F32, Kind::F64, Kind::U8] {
        for (tiled, chunk, planar) in [
            (false, (0, 1), false),
            (false, (0, 7), true),
            (true, (16, 16), false),
            (true, (32, 16), true),
        ] {
            let mut v = values(w, h, 4, kind, 7 + kind.bits() as u64);
            let mut nodata = None;
            if matches!(kind, Kind::F32 | Kind::F64) {
                v[2][5] = f64::NAN;
                v[2][77] = f64::NAN;
            }
            if matches!(kind, Kind::U16) {
                for i in (0..w * h).step_by(5) {
                    v[3][i] = 0.0;
                }
                nodata = Some("0");
            }
            let bytes = tiff(w, h, &v, kind, tiled, chunk, planar, nodata);
            for bands in [[1, 2, 3], [4, 3, 2]] {
                let opts = SceneOptions { bands: Some(bands) };
                let what =
                    format!("{kind:?} tiled {tiled} {chunk:?} planar {planar} bands {bands:?}");
                let want = reference(&v, bands, nodata.map(|_| 0.0), matches!(kind, Kind::U8));
                let scene =
                    decode_scene(&bytes, "t.tif", &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!((scene.image.width, scene.image.height), (w, h));
                assert!(scene.image.pixels == want, "{what}: whole scene");
                let mut r = SceneReader::new(std::io::Cursor::new(&bytes[..]), "t.tif", &opts)
                    .unwrap()
                    .expect("streamable");
                for win in [
                    Window {
                        x: 0,
                        y: 0,
                        width: w,
                        height: 1,
                    },
                    Window {
                        x: 17,
                        y: 9,
                        width: 30,
                        height: 31,
                    },
                    Window {
                        x: w - 1,
                        y: h - 1,
                        width: 1,
                        height: 1,
                    },
                ] {
                    let got = r.read_window(win).unwrap();
                    for y in 0..win.height {
                        let a = &got.pixels[y * win.width * 3..(y + 1) * win.width * 3];
                        let at = ((win.y + y) * w + win.x) * 3;
                        assert_eq!(
                            a,
                            &want[at..at + win.width * 3],
                            "{what}: window {win:?} row {y}"
                        );
                    }
                }
                assert!(r
                    .read_window(Window {
                        x: w - 1,
                        y: 0,
                        width: 2,
                        height: 1
                    })
                    .is_err());
            }
        }
    }
}

/// A strip that is the whole of a big image is refused by its declared size, before its bytes are
/// allocated (the rule that bounds memory is the chunk, so the chunk must be bounded).
#[test]
fn a_single_strip_larger_than_the_chunk_limit_is_refused() {
    let (w, h) = (12_000usize, 12_000usize);
    // One strip of 12,000 rows: 12000 × 12000 × 2 bytes = 288 MB, over the 256 MB chunk limit. The
    // file holds only its header: the reader must refuse before reading data.
    let v = vec![vec![0.0; 1]];
    let mut bytes = tiff(1, 1, &v, Kind::U16, false, (0, 1), false, None);
    // Patch width, height and rows per strip (entries 256, 257, 278) to 12,000.
    let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let count = u16::from_le_bytes([bytes[ifd], bytes[ifd + 1]]) as usize;
    for e in 0..count {
        let at = ifd + 2 + 12 * e;
        let tag = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        if matches!(tag, 256 | 257 | 278) {
            bytes[at + 8..at + 12].copy_from_slice(&(w.max(h) as u32).to_le_bytes());
        }
    }
    let e = match SceneReader::new(
        std::io::Cursor::new(&bytes[..]),
        "big.tif",
        &SceneOptions::default(),
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };
    assert!(e.contains("rewrite it tiled"), "{e}");
}
