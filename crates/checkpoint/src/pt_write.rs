//! Writes PyTorch-readable `.pt` files: the zip layout of `torch.save` with a protocol-2 pickle that uses
//! only what `torch.load(weights_only=True)` allows (dicts, OrderedDicts, lists, tuples, scalars, strings,
//! tensors rebuilt by `torch._utils._rebuild_tensor_v2`).

use std::io::Write;
use std::path::Path;

use crate::{Error, StateDict, TensorData};

/// A value to pickle.
#[derive(Debug, Clone)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    Dict(Vec<(PyValue, PyValue)>),
    /// `collections.OrderedDict` with string keys (what `state_dict()` returns).
    OrderedDict(Vec<(String, PyValue)>),
    Tensor(TensorData),
}

impl PyValue {
    pub fn str(s: impl Into<String>) -> PyValue {
        PyValue::Str(s.into())
    }

    pub fn state_dict(sd: &StateDict) -> PyValue {
        PyValue::OrderedDict(
            sd.entries
                .iter()
                .map(|(k, t)| (k.clone(), PyValue::Tensor(t.clone())))
                .collect(),
        )
    }
}

struct Pickler {
    out: Vec<u8>,
    storages: Vec<TensorData>,
}

impl Pickler {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn string(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.push(b'K');
            self.out.push(v as u8);
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.out.push(0x8a);
            self.out.push(8);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
    }

    fn value(&mut self, v: &PyValue) {
        match v {
            PyValue::None => self.out.push(b'N'),
            PyValue::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            PyValue::Int(i) => self.int(*i),
            PyValue::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            PyValue::Str(s) => self.string(s),
            PyValue::List(items) => {
                self.out.push(b']');
                if !items.is_empty() {
                    self.out.push(b'(');
                    for i in items {
                        self.value(i);
                    }
                    self.out.push(b'e');
                }
            }
            PyValue::Tuple(items) => {
                self.out.push(b'(');
                for i in items {
                    self.value(i);
                }
                self.out.push(b't');
            }
            PyValue::Dict(items) => {
                self.out.push(b'}');
                self.set_items(items.iter().map(|(k, v)| (k.clone(), v)));
            }
            PyValue::OrderedDict(items) => {
                self.empty_ordered_dict();
                self.set_items(items.iter().map(|(k, v)| (PyValue::Str(k.clone()), v)));
            }
            PyValue::Tensor(t) => self.tensor(t),
        }
    }

    fn set_items<'a>(&mut self, items: impl Iterator<Item = (PyValue, &'a PyValue)>) {
        let items: Vec<_> = items.collect();
        for chunk in items.chunks(1000) {
            self.out.push(b'(');
            for (k, v) in chunk {
                self.value(k);
                self.value(v);
            }
            self.out.push(b'u');
        }
    }

    fn tensor(&mut self, t: &TensorData) {
        let key = self.storages.len();
        self.storages.push(t.clone());
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // Persistent id: ("storage", torch.<Type>Storage, key, "cpu", numel)
        self.out.push(b'(');
        self.string("storage");
        self.global("torch", t.dtype.torch_storage_name());
        self.string(&key.to_string());
        self.string("cpu");
        self.int(t.numel() as i64);
        self.out.push(b't');
        self.out.push(b'Q');
        self.int(0);
        self.value(&PyValue::Tuple(
            t.shape.iter().map(|&d| PyValue::Int(d as i64)).collect(),
        ));
        let mut stride = vec![1i64; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1] as i64;
        }
        self.value(&PyValue::Tuple(
            stride.into_iter().map(PyValue::Int).collect(),
        ));
        self.out.push(0x89); // requires_grad = False
        self.empty_ordered_dict(); // backward hooks
        self.out.push(b't');
        self.out.push(b'R');
    }
}

/// Serialises `value` in torch.save's zip format under the top folder `stem`.
pub fn to_bytes(value: &PyValue, stem: &str) -> Result<Vec<u8>, Error> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        storages: Vec::new(),
    };
    p.value(value);
    p.out.push(b'.');
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let zerr = |e: zip::result::ZipError| Error::Format(format!("writing zip: {e}"));
    let put = |zip: &mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>,
               name: String,
               data: &[u8]|
     -> Result<(), Error> {
        // torch aligns record data to 64 bytes (it mmaps them); the reader accepts either.
        zip.start_file(name, opts.with_alignment(64))
            .map_err(zerr)?;
        zip.write_all(data)?;
        Ok(())
    };
    put(&mut zip, format!("{stem}/data.pkl"), &p.out)?;
    put(&mut zip, format!("{stem}/byteorder"), b"little")?;
    for (i, t) in p.storages.iter().enumerate() {
        put(&mut zip, format!("{stem}/data/{i}"), &t.bytes)?;
    }
    put(&mut zip, format!("{stem}/version"), b"3\n")?;
    Ok(zip.finish().map_err(zerr)?.into_inner())
}

/// Writes atomically; the zip's top folder is the file stem, as torch.save does.
pub fn write(path: &Path, value: &PyValue) -> Result<(), Error> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "archive".into());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    crate::write_atomic(path, &to_bytes(value, &stem)?)
}
