//! numpy `.npy` (format 1.0/2.0, little-endian, C order) for embeddings and test goldens.

use std::path::Path;

use crate::{DType, Error, TensorData};

pub fn read(path: impl AsRef<Path>) -> Result<TensorData, Error> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Io(e).in_file(path))?;
    read_bytes(&bytes).map_err(|e| e.in_file(path))
}

pub fn read_bytes(bytes: &[u8]) -> Result<TensorData, Error> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::Format("not an .npy file (magic missing)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(Error::Format(format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + header_len)
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
        other => return Err(Error::Format(format!("unsupported .npy dtype {other}"))),
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
    let shape: Vec<usize> = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| Error::Format(format!("bad .npy shape {shape_str:?}")))
        })
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + header_len..];
    let need = shape.iter().product::<usize>() * dtype.size();
    if data.len() < need {
        return Err(Error::Format(format!(
            ".npy data truncated: {} of {need} bytes",
            data.len()
        )));
    }
    TensorData::new(dtype, shape, data[..need].to_vec())
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
}
