//! PyTorch's zip checkpoint format: `<stem>/data.pkl` (pickled object) + `<stem>/data/<key>` storages.
//!
//! Entries are read straight from the file into buffers of their exact, validated size (a declared size
//! beyond the archive is refused before anything is allocated), their CRC-32 is checked, and a storage that
//! backs exactly one whole contiguous tensor becomes that tensor's bytes without a copy: reading a
//! checkpoint holds about one copy of its weights, not three.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use crate::pickle::{self, TensorRef, Value};
use crate::tensor::gather_strided;
use crate::{Checkpoint, Error, Layout, StateDict, TensorData};

/// An open `.pt` archive: the unpickled object plus lazy access to its storages.
pub struct PtArchive<R: Read + Seek> {
    zip: zip::ZipArchive<R>,
    /// Bytes in the archive: no entry can be longer.
    archive_len: u64,
    prefix: String,
    /// Storages read once and kept because several tensor views use them.
    storages: HashMap<String, Vec<u8>>,
    /// How many tensor views of the object use each storage key.
    uses: HashMap<String, usize>,
    pub object: Value,
}

impl<'a> PtArchive<Cursor<&'a [u8]>> {
    pub fn open(bytes: &'a [u8]) -> Result<Self, Error> {
        Self::from_reader(Cursor::new(bytes))
    }
}

impl PtArchive<BufReader<File>> {
    pub fn open_file(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|e| Error::Io(e).in_file(path))?;
        Self::from_reader(BufReader::new(file)).map_err(|e| e.in_file(path))
    }
}

/// Names of the central directory's entries, read directly: the zip crate keeps only the last of several
/// entries with one name, and an archive with two `data.pkl` must be refused, not read either way.
fn central_directory_names<R: Read + Seek>(
    reader: &mut R,
    start: u64,
    archive_len: u64,
) -> Result<Vec<Vec<u8>>, Error> {
    let mut names = Vec::new();
    let mut at = start;
    let mut header = [0u8; 46];
    loop {
        if at + 46 > archive_len {
            break;
        }
        reader.seek(SeekFrom::Start(at))?;
        reader.read_exact(&mut header)?;
        if header[..4] != [0x50, 0x4b, 0x01, 0x02] {
            break;
        }
        let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]) as u64;
        let (name_len, extra_len, comment_len) = (u16_at(28), u16_at(30), u16_at(32));
        let mut name = vec![0u8; name_len as usize];
        reader.read_exact(&mut name)?;
        names.push(name);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(names)
}

impl<R: Read + Seek> PtArchive<R> {
    pub fn from_reader(mut reader: R) -> Result<Self, Error> {
        let archive_len = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let zip = zip::ZipArchive::new(reader).map_err(|e| {
            Error::Format(format!(
                "not a readable zip archive ({e}); the checkpoint is corrupt or truncated"
            ))
        })?;
        let dir_start = zip.central_directory_start(); // absolute, prepended bytes included
        let mut reader = zip.into_inner();
        let names = central_directory_names(&mut reader, dir_start, archive_len)?;
        let mut seen = std::collections::HashSet::with_capacity(names.len());
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_slice())) {
            return Err(Error::Format(format!(
                "the archive holds two entries named `{}`; which one counts is ambiguous, refusing it",
                String::from_utf8_lossy(&dup[..dup.len().min(200)])
            )));
        }
        reader.seek(SeekFrom::Start(0))?;
        let zip = zip::ZipArchive::new(reader)
            .map_err(|e| Error::Format(format!("not a readable zip archive ({e})")))?;
        let mut pkl_candidates: Vec<String> = zip
            .file_names()
            .filter(|n| n.ends_with("data.pkl") && (n.len() == 8 || n.ends_with("/data.pkl")))
            .map(str::to_string)
            .collect();
        pkl_candidates.sort_by_key(|n| n.len());
        let pkl_name = match pkl_candidates.first() {
            Some(n) => n.clone(),
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
        let mut archive = PtArchive {
            zip,
            archive_len,
            prefix,
            storages: HashMap::new(),
            uses: HashMap::new(),
            object: Value::None,
        };
        let pkl = archive.read_entry(&pkl_name)?;
        archive.object = pickle::unpickle(&pkl).map_err(|e| match e {
            Error::Format(m) => Error::Format(format!("{pkl_name}: {m}")),
            other => other,
        })?;
        count_storage_uses(&archive.object, &mut archive.uses);
        Ok(archive)
    }

    /// One stored entry, whole, CRC-checked. Its declared size is checked against the archive before any
    /// allocation (a zip64 entry may claim terabytes in a few bytes).
    fn read_entry(&mut self, name: &str) -> Result<Vec<u8>, Error> {
        let archive_len = self.archive_len;
        let mut file = self
            .zip
            .by_name(name)
            .map_err(|e| Error::Format(format!("cannot open `{name}` in the archive ({e})")))?;
        if file.compression() != zip::CompressionMethod::Stored {
            return Err(Error::Format(format!(
                "`{name}` is compressed ({:?}); torch.save writes stored entries only",
                file.compression()
            )));
        }
        let size = file.size();
        if size > archive_len {
            return Err(Error::Format(format!(
                "`{name}` declares {size} bytes, more than the whole {archive_len}-byte archive (corrupt or crafted)"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        file.read_exact(&mut buf).map_err(|e| {
            Error::Format(format!("cannot read `{name}`: {e} (truncated archive?)"))
        })?;
        // Reading past the end makes the zip reader compare the CRC-32.
        let mut probe = [0u8; 1];
        match file.read(&mut probe) {
            Ok(0) => Ok(buf),
            Ok(_) => Err(Error::Format(format!(
                "`{name}` holds more bytes than it declares"
            ))),
            Err(e) => Err(Error::Format(format!("`{name}`: {e} (corrupt archive?)"))),
        }
    }

    /// Materialises a tensor view as a contiguous tensor.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<TensorData, Error> {
        let key = &t.storage.key;
        let name = format!("{}data/{}", self.prefix, key);
        let need = t.storage.numel * t.storage.dtype.size(); // bounded by the unpickler
        let read = |archive: &mut Self| -> Result<Vec<u8>, Error> {
            let buf = archive.read_entry(&name).map_err(|e| match e {
                Error::Format(m) if m.starts_with("cannot open") => {
                    Error::Format(format!("storage `{name}` missing from the archive ({m})"))
                }
                other => other,
            })?;
            if buf.len() < need {
                return Err(Error::Format(format!(
                    "storage `{name}` has {} bytes, the pickle declares {} {} elements ({need} bytes)",
                    buf.len(),
                    t.storage.numel,
                    t.storage.dtype
                )));
            }
            Ok(buf)
        };
        let whole = t.offset == 0 && is_contiguous(&t.shape, &t.stride) && {
            let numel: usize = t.shape.iter().product();
            numel == t.storage.numel
        };
        if whole
            && self.uses.get(key).copied().unwrap_or(0) <= 1
            && !self.storages.contains_key(key)
        {
            let mut buf = read(self)?;
            buf.truncate(need);
            return TensorData::new(t.storage.dtype, t.shape.clone(), buf);
        }
        if !self.storages.contains_key(key) {
            let buf = read(self)?;
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

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n);
    }
    true
}

fn count_storage_uses(v: &Value, uses: &mut HashMap<String, usize>) {
    let mut pending = vec![v];
    while let Some(v) = pending.pop() {
        match v {
            Value::Tensor(t) => *uses.entry(t.storage.key.clone()).or_default() += 1,
            Value::List(items) | Value::Tuple(items) => pending.extend(items.iter()),
            Value::Dict(items) => {
                for (k, v) in items {
                    pending.push(k);
                    pending.push(v);
                }
            }
            _ => {}
        }
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

pub(crate) fn read_checkpoint<R: Read + Seek>(
    mut archive: PtArchive<R>,
) -> Result<Checkpoint, Error> {
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
