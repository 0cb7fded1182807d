//! numpy `.npy` (format 1.0/2.0, little-endian, C order) for embeddings and test goldens.

use std::path::Path;

use crate::{DType, Error, TensorData};

pub fn read(path: impl AsRef<Path>) -> Result<TensorData, Error> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Io(e).in_file(path))?;
    read_bytes(&bytes).map_err(|e| e.in_file(path))
}

pub fn read_bytes(bytes: &[u8]) -> Result<TensorData, Error> {
    let header = parse_header(bytes)?;
    let data = &bytes[header.data_offset..];
    let need = header.data_bytes;
    if data.len() < need {
        return Err(Error::Format(format!(
            ".npy data truncated: {} of {need} bytes",
            data.len()
        )));
    }
    TensorData::new(header.dtype, header.shape, data[..need].to_vec())
}

/// What an `.npy` header says, checked: the element count and byte size do not overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Where the data starts in the file.
    pub data_offset: usize,
    /// Bytes of data the shape and dtype call for.
    pub data_bytes: usize,
}

/// Reads only the header of an `.npy` file (a few KB however large the array): enough to check its
/// dtype, shape and size before the data is read.
pub fn read_header(path: impl AsRef<Path>) -> Result<Header, Error> {
    use std::io::Read;
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::Io(e).in_file(path))?;
    // Version 1 headers are at most 64 KiB; version 2/3 ones may be longer, but none that numpy
    // writes for a plain array is.
    let mut head = Vec::new();
    file.take(12 + (1 << 16))
        .read_to_end(&mut head)
        .map_err(|e| Error::Io(e).in_file(path))?;
    parse_header(&head).map_err(|e| e.in_file(path))
}

fn parse_header(bytes: &[u8]) -> Result<Header, Error> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::Format("not an .npy file (magic missing)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(Error::Format(format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start.saturating_add(header_len))
            .ok_or_else(|| Error::Format("truncated .npy header".into()))?,
    )
    .map_err(|_| Error::Format(".npy header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[i..].trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| Error::Format("npy header lacks descr".into()))?;
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "<i2" => DType::I16,
        "|i1" => DType::I8,
        "|u1" => DType::U8,
        "|b1" => DType::Bool,
        other => {
            return Err(Error::Format(format!(
                "unsupported .npy dtype {:?}",
                crate::clip_text(other, 40)
            )))
        }
    };
    if field("fortran_order")
        .map(|s| s.starts_with("True"))
        .unwrap_or(false)
    {
        return Err(Error::Format(
            "Fortran-ordered .npy arrays are not supported".into(),
        ));
    }
    let shape_str = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| Error::Format("npy header lacks shape".into()))?;
    let bad_shape = || {
        Error::Format(format!(
            "bad .npy shape {:?}",
            crate::clip_text(shape_str, 80)
        ))
    };
    let shape: Vec<usize> = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad_shape()))
        .collect::<Result<_, _>>()?;
    // A crafted shape must not overflow into a small size (or panic with overflow checks on).
    let data_bytes = shape
        .iter()
        .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            Error::Format(format!(
                ".npy shape {:?} is larger than memory can address",
                crate::clip_text(shape_str, 80)
            ))
        })?;
    Ok(Header {
        dtype,
        shape,
        data_offset: start + header_len,
        data_bytes,
    })
}

pub fn to_bytes(t: &TensorData) -> Vec<u8> {
    let shape = match t.shape.len() {
        1 => format!("({},)", t.shape[0]),
        _ => format!(
            "({})",
            t.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        t.dtype.npy_descr()
    );
    // Pad so that the data starts on a 64-byte boundary, newline-terminated, as numpy does.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.bytes.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.bytes);
    out
}

/// Writes atomically.
pub fn write(path: impl AsRef<Path>, t: &TensorData) -> Result<(), Error> {
    crate::write_atomic(path.as_ref(), &to_bytes(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = TensorData::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let back = read_bytes(&to_bytes(&t)).unwrap();
        assert_eq!(back, t);
        let v = TensorData::from_i64(vec![4], &[1, -2, 3, 4]);
        assert_eq!(read_bytes(&to_bytes(&v)).unwrap(), v);
        assert_eq!(to_bytes(&v).len() % 64, 32 % 64); // 64-byte header + 32 data bytes
    }

    /// A shape whose element count overflows is an error, not a panic or a small allocation.
    #[test]
    fn overflowing_shapes_are_refused() {
        let mut bytes = to_bytes(&TensorData::from_f32(vec![1, 1], &[1.0]));
        let at = bytes.windows(6).position(|w| w == b"(1, 1)").unwrap();
        let huge = b"(4294967296, 4294967296)";
        bytes.splice(at..at + 6, huge.iter().copied());
        let header_len = (bytes.len() - 10 - 4) as u16;
        bytes[8..10].copy_from_slice(&header_len.to_le_bytes());
        let e = read_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("larger than memory can address"), "{e}");
    }
}
