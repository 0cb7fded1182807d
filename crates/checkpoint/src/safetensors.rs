//! safetensors: `u64` little-endian header length, a JSON header, then raw tensor bytes.

use std::path::Path;

use crate::{DType, Error, StateDict, TensorData};

/// True when the bytes start with a plausible safetensors header.
pub fn looks_like(bytes: &[u8]) -> bool {
    if bytes.len() < 10 {
        return false;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    n >= 2 && n < 100_000_000 && bytes[8] == b'{'
}

pub fn read(bytes: &[u8]) -> Result<StateDict, Error> {
    if bytes.len() < 8 {
        return Err(Error::Format(
            "safetensors file shorter than its 8-byte header length".into(),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if 8 + n > bytes.len() {
        return Err(Error::Format(format!(
            "safetensors header claims {n} bytes but the file has {} (truncated?)",
            bytes.len()
        )));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| Error::Format(format!("safetensors header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| Error::Format("safetensors header is not an object".into()))?;
    let data = &bytes[8 + n..];
    let mut entries = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| Error::Format(format!("safetensors entry `{name}`: {what}"));
        let dtype_name = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let dtype = DType::from_safetensors_name(dtype_name)
            .ok_or_else(|| bad(&format!("unsupported dtype {dtype_name}")))?;
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| bad("shape is not a list of integers"))
            })
            .collect::<Result<_, _>>()?;
        let offs = info["data_offsets"]
            .as_array()
            .ok_or_else(|| bad("no data_offsets"))?;
        let (start, end) = match offs.as_slice() {
            [a, b] => (
                a.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
                b.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
            ),
            _ => return Err(bad("data_offsets must hold two integers")),
        };
        if start > end || end > data.len() {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] outside the {} data bytes (truncated?)",
                data.len()
            )));
        }
        let tensor = TensorData::new(dtype, shape, data[start..end].to_vec())
            .map_err(|e| bad(&e.to_string()))?;
        entries.push((name.clone(), tensor));
    }
    let mut sd = StateDict { entries };
    crate::strip_module_prefix(&mut sd.entries);
    Ok(sd)
}

/// Serialises tensors (in the given order) with optional string metadata.
pub fn write_bytes(sd: &StateDict, metadata: &[(&str, &str)]) -> Vec<u8> {
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
    // The format asks for 8-byte alignment of the data section.
    while (json.len() % 8) != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, t) in &sd.entries {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// Writes atomically (temporary file in the same folder, then rename).
pub fn write(path: &Path, sd: &StateDict, metadata: &[(&str, &str)]) -> Result<(), Error> {
    crate::write_atomic(path, &write_bytes(sd, metadata))
}
