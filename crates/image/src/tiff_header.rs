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

/// Entries of one directory: a classic TIFF's count is 16-bit; a BigTIFF may declare more, which no
/// real file needs (a GeoTIFF has a few dozen tags).
const MAX_ENTRIES: u64 = 65_535;

/// Ok for anything that is not a TIFF (other decoders read it); the stream is left at its start.
pub(crate) fn check_first_ifd<R: Read + Seek>(r: &mut R) -> Result<(), String> {
    let len = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let outcome = walk(r, len);
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    outcome
}

fn walk<R: Read + Seek>(r: &mut R, len: u64) -> Result<(), String> {
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
    let here = if big { 16 } else { 8 };
    if ifd < here || ifd >= len {
        return Ok(()); // the tiff crate reports a directory outside the file itself
    }
    r.seek(SeekFrom::Start(ifd)).map_err(|e| e.to_string())?;
    let (count_bytes, entry_bytes) = if big { (8, 20) } else { (2, 12) };
    let mut count = [0u8; 8];
    if r.read_exact(&mut count[..count_bytes]).is_err() {
        return Ok(());
    }
    let entries = if big { u64_at(&count) } else { u16_at(&count) };
    if entries > MAX_ENTRIES || entries.saturating_mul(entry_bytes) > len {
        return Err(format!(
            "its first directory declares {entries} entries, more than the file's {len} bytes \
             hold (or over {MAX_ENTRIES})"
        ));
    }
    // The directory in one read (at most MAX_ENTRIES × 20 bytes), not one read per entry; a directory
    // cut short by the file's end is checked as far as it goes.
    let mut directory = Vec::new();
    r.take(entries * entry_bytes)
        .read_to_end(&mut directory)
        .map_err(|e| e.to_string())?;
    for entry in directory.chunks_exact(entry_bytes as usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8]) -> Result<(), String> {
        check_first_ifd(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn a_tag_declaring_more_values_than_the_file_holds_is_refused_wherever_the_directory_lies() {
        // 1 MB of pixels before the directory (writers such as the tiff crate put it last).
        let mut out = b"II*\0\0\0\0\0".to_vec();
        out.resize(8 + (1 << 20), 7);
        let mut entries = vec![
            (256, 4, 1, 512u32.to_le_bytes().to_vec()),
            (339, 3, 8 << 20, vec![1, 0]),
        ];
        append_ifd(&mut out, &mut entries);
        let e = check(&out).unwrap_err();
        assert!(e.contains("tag 339 declares 8388608 values"), "{e}");
        // The same directory with a sound count passes, and so does what is not a TIFF.
        entries[1].2 = 1;
        let mut ok = b"II*\0\0\0\0\0".to_vec();
        ok.resize(8 + (1 << 20), 7);
        append_ifd(&mut ok, &mut entries);
        assert_eq!(check(&ok), Ok(()));
        assert_eq!(check(b"\xff\xd8\xff\xe0 a jpeg"), Ok(()));
    }

    #[test]
    fn a_bigtiff_directory_of_too_many_entries_is_refused() {
        // BigTIFF: magic 43, offset size 8, directory at 16 declaring 2^32 entries.
        let mut out = b"II+\0\x08\0\0\0".to_vec();
        out.extend(16u64.to_le_bytes());
        out.extend((1u64 << 32).to_le_bytes());
        out.resize(1 << 16, 0);
        let e = check(&out).unwrap_err();
        assert!(e.contains("declares 4294967296 entries"), "{e}");
    }
}
