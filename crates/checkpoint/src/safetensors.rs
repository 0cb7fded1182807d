//! safetensors: `u64` little-endian header length, a JSON header, then raw tensor bytes.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::{DType, Error, StateDict, TensorData};

/// True when the bytes start with a plausible safetensors header.
pub fn looks_like(bytes: &[u8]) -> bool {
    if bytes.len() < 10 {
        return false;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (2..MAX_HEADER).contains(&n) && bytes[8] == b'{'
}

/// The safetensors library's own limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

pub fn read(bytes: &[u8]) -> Result<StateDict, Error> {
    read_from(std::io::Cursor::new(bytes))
}

/// Reads a file tensor by tensor: each tensor's bytes go straight from the file into its buffer.
pub fn read_file(path: &Path) -> Result<StateDict, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io(e).in_file(path))?;
    read_from(std::io::BufReader::new(file)).map_err(|e| e.in_file(path))
}

/// The string metadata (`__metadata__`) of a safetensors file, read from its header alone.
pub fn read_metadata_file(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let mut r = std::fs::File::open(path).map_err(|e| Error::Io(e).in_file(path))?;
    let file_len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)
        .map_err(|e| Error::Io(e).in_file(path))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len.saturating_sub(8) {
        return Err(Error::Format(format!("safetensors header claims {n} bytes")).in_file(path));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header)
        .map_err(|e| Error::Io(e).in_file(path))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        Error::Format(format!("safetensors header is not valid JSON: {e}")).in_file(path)
    })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

pub fn read_from<R: Read + Seek>(mut r: R) -> Result<StateDict, Error> {
    let file_len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    if file_len < 8 {
        return Err(Error::Format(
            "safetensors file shorter than its 8-byte header length".into(),
        ));
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(Error::Format(format!(
            "safetensors header claims {n} bytes but the file has {file_len} (truncated, or not safetensors)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header)?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::Format(format!("safetensors header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| Error::Format("safetensors header is not an object".into()))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut planned = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let shown: String = name.chars().take(200).collect();
        let bad = |what: &str| Error::Format(format!("safetensors entry `{shown}`: {what}"));
        let dtype_name = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| {
            bad(&format!(
                "unsupported dtype {}",
                dtype_name.chars().take(20).collect::<String>()
            ))
        })?;
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| bad("shape is not a list of integers"))
            })
            .collect::<Result<_, _>>()?;
        let need = crate::tensor::byte_size(dtype, &shape).map_err(|e| bad(&e.to_string()))?;
        let offs = info["data_offsets"]
            .as_array()
            .ok_or_else(|| bad("no data_offsets"))?;
        let (start, end) = match offs.as_slice() {
            [a, b] => (
                a.as_u64().ok_or_else(|| bad("bad data_offsets"))?,
                b.as_u64().ok_or_else(|| bad("bad data_offsets"))?,
            ),
            _ => return Err(bad("data_offsets must hold two integers")),
        };
        if start > end || end > data_len {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] outside the {data_len} data bytes (truncated?)"
            )));
        }
        if (end - start) as usize != need {
            return Err(bad(&format!(
                "{dtype} shape {shape:?} needs {need} bytes, data_offsets [{start}, {end}] hold {}",
                end - start
            )));
        }
        planned.push((name.clone(), dtype, shape, start, end));
    }
    // Each byte belongs to one tensor at most (as the safetensors library validates).
    let mut spans: Vec<(u64, u64, &str)> = planned
        .iter()
        .filter(|p| p.4 > p.3)
        .map(|p| (p.3, p.4, p.0.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            let short = |s: &str| s.chars().take(200).collect::<String>();
            return Err(Error::Format(format!(
                "safetensors entries `{}` [{}, {}] and `{}` [{}, {}] overlap",
                short(w[0].2),
                w[0].0,
                w[0].1,
                short(w[1].2),
                w[1].0,
                w[1].1
            )));
        }
    }
    let mut entries = Vec::with_capacity(planned.len());
    for (name, dtype, shape, start, end) in planned {
        let mut bytes = vec![0u8; (end - start) as usize];
        r.seek(SeekFrom::Start(data_start + start))?;
        r.read_exact(&mut bytes)?;
        entries.push((name, TensorData::new(dtype, shape, bytes)?));
    }
    let mut sd = StateDict { entries };
    crate::strip_module_prefix(&mut sd.entries);
    Ok(sd)
}

/// The JSON header (padded to 8 bytes, as the format asks for the data section's alignment).
fn header(sd: &StateDict, metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, t) in &sd.entries {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + t.bytes.len()],
            }),
        );
        offset += t.bytes.len();
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while (json.len() % 8) != 0 {
        json.push(b' ');
    }
    json
}

/// Serialises tensors (in the given order) with optional string metadata into `out`.
pub fn write_to(
    mut out: impl std::io::Write,
    sd: &StateDict,
    metadata: &[(&str, &str)],
) -> std::io::Result<()> {
    let json = header(sd, metadata);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for (_, t) in &sd.entries {
        out.write_all(&t.bytes)?;
    }
    out.flush()
}

/// Serialises tensors (in the given order) with optional string metadata.
pub fn write_bytes(sd: &StateDict, metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    write_to(&mut out, sd, metadata).expect("writing to memory");
    out
}

/// Writes atomically (temporary file in the same folder, then rename), streaming into the file.
pub fn write(path: &Path, sd: &StateDict, metadata: &[(&str, &str)]) -> Result<(), Error> {
    crate::write_atomic_with(path, |f| {
        Ok(write_to(std::io::BufWriter::new(f), sd, metadata)?)
    })
}
