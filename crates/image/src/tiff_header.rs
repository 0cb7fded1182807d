//! A check of a TIFF's first directory before the `tiff` crate reads it.
//!
//! The crate sizes the vector for a tag's values by the declared count before reading them, bounded
//! only by its limit for decoded pixels (256 MB by default, and `Decoder::new` reads the strip and tile
//! tables before limits can be set): a 612-byte file declaring 8 M SampleFormat values made it reserve
//! 256 MB (found by the fuzzer, `tests/fixtures/fuzz/tiff-scene-sampleformat256mb.bin`). No value can be
//! longer than the file that holds it, so each entry's count is held to that, and to a table size no
//! real scene needs.

use std::io::{Read, Seek, SeekFrom};

/// The most values one tag may hold: 4 M strips or tiles is a 2-gigapixel scene in 1-row strips of
/// 2,000 pixels, or 16,000 bands × 256 tiles.
const MAX_VALUES: u64 = 4 << 20;

/// Ok for anything that is not a TIFF (other decoders read it); the stream is left at its start.
pub(crate) fn check_first_ifd<R: Read + Seek>(r: &mut R) -> Result<(), String> {
    let len = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let outcome = walk(r, len);
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    outcome
}

fn walk<R: Read>(r: &mut R, len: u64) -> Result<(), String> {
    let mut head = [0u8; 16];
    if r.read_exact(&mut head[..8]).is_err() {
        return Ok(());
    }
    let little = match &head[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return Ok(()),
    };
    let u16_at = |b: &[u8]| {
        let b = [b[0], b[1]];
        u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_at = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let u64_at = |b: &[u8]| {
        let b: [u8; 8] = b[..8].try_into().unwrap();
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let big = match u16_at(&head[2..4]) {
        42 => false,
        43 => true,
        _ => return Ok(()),
    };
    let ifd = if big {
        if r.read_exact(&mut head[8..16]).is_err() {
            return Ok(());
        }
        u64_at(&head[8..16])
    } else {
        u32_at(&head[4..8])
    };
    // Read the directory from where it is: skip to it without seeking (the reader is at 8 or 16).
    let here = if big { 16 } else { 8 };
    if ifd < here || ifd >= len {
        return Ok(()); // the tiff crate reports a directory outside the file itself
    }
    std::io::copy(&mut r.take(ifd - here), &mut std::io::sink()).map_err(|e| e.to_string())?;
    let (count_bytes, entry_bytes) = if big { (8, 20) } else { (2, 12) };
    let mut count = [0u8; 8];
    if r.read_exact(&mut count[..count_bytes]).is_err() {
        return Ok(());
    }
    let entries = if big { u64_at(&count) } else { u16_at(&count) };
    if entries.saturating_mul(entry_bytes) > len {
        return Err(format!(
            "its first directory declares {entries} entries, more than the file's {len} bytes hold"
        ));
    }
    let mut entry = [0u8; 20];
    for _ in 0..entries {
        if r.read_exact(&mut entry[..entry_bytes as usize]).is_err() {
            return Ok(());
        }
        let (tag, kind) = (u16_at(&entry[0..2]), u16_at(&entry[2..4]));
        let values = if big {
            u64_at(&entry[4..12])
        } else {
            u32_at(&entry[4..8])
        };
        let size = match kind {
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16..=18 => 8,
            _ => 1,
        };
        if values > MAX_VALUES || values.saturating_mul(size) > len {
            return Err(format!(
                "tag {tag} declares {values} values, more than the file's {len} bytes hold \
                 (or over {MAX_VALUES})"
            ));
        }
    }
    Ok(())
}

/// Appends a little-endian classic TIFF directory of `entries` (tag, type, count, value bytes) to
/// `out` (which starts with `II*\0` and four bytes for the directory's offset, patched here), values of
/// more than four bytes after it. For tests that build TIFFs field by field.
#[doc(hidden)]
pub fn append_ifd(out: &mut Vec<u8>, entries: &mut [(u16, u16, u32, Vec<u8>)]) {
    entries.sort_by_key(|e| e.0);
    let ifd_at = out.len() + out.len() % 2;
    out.resize(ifd_at, 0);
    out[4..8].copy_from_slice(&(ifd_at as u32).to_le_bytes());
    let mut tail_at = ifd_at + 2 + 12 * entries.len() + 4;
    let mut tail: Vec<u8> = Vec::new();
    out.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, count, bytes) in entries.iter() {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(count.to_le_bytes());
        if bytes.len() <= 4 {
            let mut b = bytes.clone();
            b.resize(4, 0);
            out.extend(b);
        } else {
            out.extend((tail_at as u32).to_le_bytes());
            tail.extend(bytes);
            tail_at += bytes.len();
        }
    }
    out.extend(0u32.to_le_bytes());
    out.extend(tail);
}
