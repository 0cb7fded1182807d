//! PyTorch's zip checkpoint format: `<stem>/data.pkl` (pickled object) + `<stem>/data/<key>` storages.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use crate::pickle::{self, TensorRef, Value};
use crate::tensor::gather_strided;
use crate::{Checkpoint, Error, Layout, StateDict, TensorData};

/// An open `.pt` archive: the unpickled object plus lazy access to its storages.
pub struct PtArchive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
    storages: HashMap<String, Vec<u8>>,
    pub object: Value,
}

impl<'a> PtArchive<'a> {
    pub fn open(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
            Error::Format(format!(
                "not a readable zip archive ({e}); the checkpoint is corrupt or truncated"
            ))
        })?;
        let pkl_name = zip
            .file_names()
            .filter(|n| n.ends_with("data.pkl") && (n.len() == 8 || n.ends_with("/data.pkl")))
            .min_by_key(|n| n.len())
            .map(str::to_string);
        let pkl_name = match pkl_name {
            Some(n) => n,
            None => {
                let torchscript = zip.file_names().any(|n| n.ends_with("constants.pkl"));
                return Err(Error::Format(if torchscript {
                    "TorchScript archive without data.pkl; save `model.state_dict()` instead".into()
                } else {
                    "zip archive has no `data.pkl`: not a torch.save checkpoint".into()
                }));
            }
        };
        if zip.file_names().any(|n| n.ends_with("constants.pkl"))
            && zip.file_names().any(|n| n.contains("/code/"))
        {
            return Err(Error::Format(
                "this is a TorchScript archive (code/ + constants.pkl); load it in Python and save its \
                 state_dict() with torch.save"
                    .into(),
            ));
        }
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        let mut pkl = Vec::new();
        zip.by_name(&pkl_name)
            .map_err(|e| Error::Format(format!("cannot open {pkl_name}: {e}")))?
            .read_to_end(&mut pkl)
            .map_err(|e| {
                Error::Format(format!("cannot read {pkl_name}: {e} (truncated archive?)"))
            })?;
        let object = pickle::unpickle(&pkl).map_err(|e| match e {
            Error::Format(m) => Error::Format(format!("{pkl_name}: {m}")),
            other => other,
        })?;
        Ok(PtArchive {
            zip,
            prefix,
            storages: HashMap::new(),
            object,
        })
    }

    /// Materialises a tensor view as a contiguous tensor.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<TensorData, Error> {
        let key = &t.storage.key;
        if !self.storages.contains_key(key) {
            let name = format!("{}data/{}", self.prefix, key);
            let mut file = self.zip.by_name(&name).map_err(|e| {
                Error::Format(format!("storage `{name}` missing from the archive ({e})"))
            })?;
            let mut buf = Vec::with_capacity(file.size() as usize);
            file.read_to_end(&mut buf).map_err(|e| {
                Error::Format(format!(
                    "cannot read storage `{name}`: {e} (truncated archive?)"
                ))
            })?;
            let need = t.storage.numel * t.storage.dtype.size();
            if buf.len() < need {
                return Err(Error::Format(format!(
                    "storage `{name}` has {} bytes, the pickle declares {} {} elements ({need} bytes)",
                    buf.len(),
                    t.storage.numel,
                    t.storage.dtype
                )));
            }
            self.storages.insert(key.clone(), buf);
        }
        let storage = &self.storages[key];
        let bytes = gather_strided(storage, t.storage.dtype, t.offset, &t.shape, &t.stride)?;
        TensorData::new(t.storage.dtype, t.shape.clone(), bytes)
    }

    /// Reads every tensor of a dict (state dict) value, in order. Non-tensor entries are skipped.
    pub fn state_dict(&mut self, value: &Value) -> Result<StateDict, Error> {
        let items = match value {
            Value::Dict(items) => items,
            _ => return Err(Error::Format("state_dict is not a dict".into())),
        };
        let mut entries = Vec::with_capacity(items.len());
        for (k, v) in items {
            let name = match k {
                Value::Str(s) => s.clone(),
                _ => return Err(Error::Format("state_dict key is not a string".into())),
            };
            if let Value::Tensor(t) = v {
                let tensor = self
                    .tensor(t)
                    .map_err(|e| Error::Format(format!("entry `{name}`: {e}")))?;
                entries.push((name, tensor));
            }
        }
        Ok(StateDict { entries })
    }
}

fn is_tensor_dict(v: &Value) -> bool {
    match v {
        Value::Dict(items) => {
            !items.is_empty() && items.iter().any(|(_, v)| matches!(v, Value::Tensor(_)))
        }
        _ => false,
    }
}

pub(crate) fn read_checkpoint(bytes: &[u8]) -> Result<Checkpoint, Error> {
    let mut archive = PtArchive::open(bytes)?;
    let object = std::mem::replace(&mut archive.object, Value::None);
    if let Some(sd) = object.dict_get("state_dict") {
        let mut state_dict = archive.state_dict(sd)?;
        let module_prefix = crate::strip_module_prefix(&mut state_dict.entries);
        let layout = Layout::TrainingCheckpoint {
            epoch: object.dict_get("epoch").and_then(Value::as_int),
            name: object
                .dict_get("name")
                .and_then(|v| v.as_str().map(str::to_string)),
            has_optimizer: object.dict_get("optimizer").is_some(),
            module_prefix,
        };
        Ok(Checkpoint { layout, state_dict })
    } else if is_tensor_dict(&object) {
        let mut state_dict = archive.state_dict(&object)?;
        let module_prefix = crate::strip_module_prefix(&mut state_dict.entries);
        Ok(Checkpoint {
            layout: Layout::BareStateDict { module_prefix },
            state_dict,
        })
    } else {
        Err(Error::Format(
            "the pickled object is neither a state dict nor a dict with a `state_dict` entry"
                .into(),
        ))
    }
}
