//! PyTorch's legacy (before 1.6, non-zip) `torch.save` format, still how some published weights are
//! shipped (the EfficientNet-Lite0 package's `.pth`): five pickles and the raw storages one after
//! another —
//! the magic number, the protocol version (1001), the system's sizes, the object (storages as
//! persistent ids with view metadata), the list of storage keys — then, for each key in that order, its
//! element count as a little-endian int64 and its bytes.
//!
//! The pickles go through the same restricted unpickler as the zip format's. The file is read whole (the
//! storages follow the pickles without an index); every declared count is checked against the bytes
//! left before anything is copied, and every storage the object uses must be present with at least the
//! elements the object declares.

use std::collections::HashMap;
use std::path::Path;

use crate::pickle::{unpickle_prefix, TensorRef, Value};
use crate::tensor::gather_strided;
use crate::{Checkpoint, Error, Layout, StateDict, TensorData};

/// The first pickle of the format: protocol 2, the magic number 0x1950a86a20f9469cfc6c as a 10-byte
/// LONG1 (wider than the unpickler's 64-bit integers, so matched as bytes), STOP.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// A legacy file larger than this is refused (the format needs the whole file in memory).
const MAX_LEGACY_BYTES: u64 = 4 << 30;

/// Reads a legacy checkpoint file.
pub fn read_file(path: &Path) -> Result<Checkpoint, Error> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::Io(e).in_file(path))?
        .len();
    if len > MAX_LEGACY_BYTES {
        return Err(Error::Format(format!(
            "a legacy (non-zip) torch.save file of {len} bytes; re-save it in the zip format"
        ))
        .in_file(path));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Io(e).in_file(path))?;
    read(&bytes).map_err(|e| e.in_file(path))
}

/// Reads a legacy checkpoint from memory.
pub fn read(data: &[u8]) -> Result<Checkpoint, Error> {
    if !data.starts_with(&MAGIC_PICKLE) {
        return Err(Error::Format(
            "legacy torch.save format: wrong magic number".into(),
        ));
    }
    let mut at = MAGIC_PICKLE.len();
    let mut next = |what: &str| -> Result<Value, Error> {
        let (v, used) = unpickle_prefix(&data[at..])
            .map_err(|e| Error::Format(format!("legacy torch.save format, {what}: {e}")))?;
        at += used;
        Ok(v)
    };
    let protocol = next("protocol version")?;
    if protocol.as_int() != Some(1001) {
        return Err(Error::Format(format!(
            "legacy torch.save protocol {protocol:?}; only 1001 exists"
        )));
    }
    let sys_info = next("system information")?;
    if sys_info
        .dict_get("little_endian")
        .is_some_and(|v| matches!(v, Value::Bool(false)))
    {
        return Err(Error::Format("a big-endian legacy torch.save file".into()));
    }
    let object = next("object")?;
    let keys = match next("storage keys")? {
        Value::List(keys) => keys,
        other => {
            return Err(Error::Format(format!(
                "legacy torch.save format: the storage keys are a {}",
                other.type_name()
            )))
        }
    };
    let mut storages: HashMap<String, &[u8]> = HashMap::with_capacity(keys.len());
    for key in keys {
        let key = match key {
            Value::Str(s) => s,
            other => {
                return Err(Error::Format(format!(
                    "a storage key is a {}",
                    other.type_name()
                )))
            }
        };
        let Some(count) = data.get(at..at + 8) else {
            return Err(Error::Format(format!(
                "storage {key}: the file ends before its size"
            )));
        };
        let numel = u64::from_le_bytes(count.try_into().unwrap());
        at += 8;
        // The element size comes from the object's references; the bytes left bound them all.
        let left = (data.len() - at) as u64;
        let refs = storage_dtype_sizes(&object, &key);
        let elem = refs.first().copied().unwrap_or(1) as u64;
        let size = numel
            .checked_mul(elem)
            .filter(|s| *s <= left)
            .ok_or_else(|| {
                Error::Format(format!(
                    "storage {key} declares {numel} elements of {elem} bytes; {left} bytes are left"
                ))
            })?;
        storages.insert(key, &data[at..at + size as usize]);
        at += size as usize;
    }
    let tensor = |t: &TensorRef| -> Result<TensorData, Error> {
        let storage = storages.get(&t.storage.key).ok_or_else(|| {
            Error::Format(format!(
                "storage {} is missing from the file",
                t.storage.key
            ))
        })?;
        let need = t.storage.numel * t.storage.dtype.size();
        if storage.len() < need {
            return Err(Error::Format(format!(
                "storage {} has {} bytes, the object declares {need}",
                t.storage.key,
                storage.len()
            )));
        }
        let bytes = gather_strided(storage, t.storage.dtype, t.offset, &t.shape, &t.stride)?;
        TensorData::new(t.storage.dtype, t.shape.clone(), bytes)
    };
    let dict = object.dict_get("state_dict").unwrap_or(&object);
    let Value::Dict(items) = dict else {
        return Err(Error::Format(
            "the pickled object is neither a state dict nor a dict with a `state_dict` entry"
                .into(),
        ));
    };
    let mut entries = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(Error::Format("state_dict key is not a string".into()));
        };
        if let Value::Tensor(t) = v {
            entries.push((
                name.clone(),
                tensor(t).map_err(|e| Error::Format(format!("entry `{name}`: {e}")))?,
            ));
        }
    }
    if entries.is_empty() {
        return Err(Error::Format(
            "the legacy checkpoint holds no tensors".into(),
        ));
    }
    let mut state_dict = StateDict { entries };
    let module_prefix = crate::strip_module_prefix(&mut state_dict.entries);
    Ok(Checkpoint {
        layout: Layout::BareStateDict { module_prefix },
        state_dict,
    })
}

/// The element sizes the object's tensors give storage `key` (all the same in a valid file).
fn storage_dtype_sizes(v: &Value, key: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pending = vec![v];
    while let Some(v) = pending.pop() {
        match v {
            Value::Tensor(t) if t.storage.key == key => out.push(t.storage.dtype.size()),
            Value::List(items) | Value::Tuple(items) => pending.extend(items.iter()),
            Value::Dict(items) => pending.extend(items.iter().map(|(_, v)| v)),
            _ => {}
        }
    }
    out
}
