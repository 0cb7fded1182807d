//! Writes PyTorch-readable `.pt` files: the zip layout of `torch.save` with a protocol-2 pickle that uses
//! only what `torch.load(weights_only=True)` allows (dicts, OrderedDicts, lists, tuples, scalars, strings,
//! tensors rebuilt by `torch._utils._rebuild_tensor_v2`).

use std::io::Write;
use std::path::Path;

use crate::{Error, StateDict, TensorData};

/// A tensor whose bytes are produced while the file is written (e.g. straight from a tensor engine's
/// memory): a checkpoint of a large model is then written without a copy of its weights in memory.
pub trait TensorSource: std::fmt::Debug {
    fn dtype(&self) -> crate::DType;
    fn shape(&self) -> Vec<usize>;
    /// Writes the tensor's contiguous little-endian bytes (`numel × dtype size` of them).
    fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()>;
}

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
    /// A tensor read from its source as the archive is written.
    Lazy(std::rc::Rc<dyn TensorSource>),
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

/// A storage to write after the pickle, borrowed from the value being written.
enum Storage<'a> {
    Bytes(&'a TensorData),
    Lazy(&'a dyn TensorSource),
}

struct Pickler<'a> {
    out: Vec<u8>,
    storages: Vec<Storage<'a>>,
}

impl<'a> Pickler<'a> {
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

    fn value(&mut self, v: &'a PyValue) {
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
                for chunk in items.chunks(1000) {
                    self.out.push(b'(');
                    for (k, v) in chunk {
                        self.value(k);
                        self.value(v);
                    }
                    self.out.push(b'u');
                }
            }
            PyValue::OrderedDict(items) => {
                self.empty_ordered_dict();
                for chunk in items.chunks(1000) {
                    self.out.push(b'(');
                    for (k, v) in chunk {
                        self.string(k);
                        self.value(v);
                    }
                    self.out.push(b'u');
                }
            }
            PyValue::Tensor(t) => {
                self.storages.push(Storage::Bytes(t));
                self.tensor(t.dtype, &t.shape);
            }
            PyValue::Lazy(source) => {
                self.storages.push(Storage::Lazy(source.as_ref()));
                self.tensor(source.dtype(), &source.shape());
            }
        }
    }

    /// The rebuild call of the storage pushed last.
    fn tensor(&mut self, dtype: crate::DType, shape: &[usize]) {
        let key = self.storages.len() - 1;
        let numel: usize = shape.iter().product();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // Persistent id: ("storage", torch.<Type>Storage, key, "cpu", numel)
        self.out.push(b'(');
        self.string("storage");
        self.global("torch", dtype.torch_storage_name());
        self.string(&key.to_string());
        self.string("cpu");
        self.int(numel as i64);
        self.out.push(b't');
        self.out.push(b'Q');
        self.int(0);
        self.int_tuple(shape.iter().map(|&d| d as i64));
        let mut stride = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1] as i64;
        }
        self.int_tuple(stride.into_iter());
        self.out.push(0x89); // requires_grad = False
        self.empty_ordered_dict(); // backward hooks
        self.out.push(b't');
        self.out.push(b'R');
    }

    fn int_tuple(&mut self, values: impl Iterator<Item = i64>) {
        self.out.push(b'(');
        for v in values {
            self.int(v);
        }
        self.out.push(b't');
    }
}

/// Writes `value` in torch.save's zip format under the top folder `stem`, storage by storage: nothing
/// but the pickle itself is buffered.
pub fn write_zip<W: Write + std::io::Seek>(
    out: W,
    value: &PyValue,
    stem: &str,
) -> Result<W, Error> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        storages: Vec::new(),
    };
    p.value(value);
    p.out.push(b'.');
    let mut zip = zip::ZipWriter::new(out);
    // torch aligns record data to 64 bytes (it mmaps them); the reader accepts either. Large storages
    // need zip64 sizes.
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64)
        .large_file(true);
    let small = opts.large_file(false);
    let zerr = |e: zip::result::ZipError| Error::Format(format!("writing zip: {e}"));
    zip.start_file(format!("{stem}/data.pkl"), small)
        .map_err(zerr)?;
    zip.write_all(&p.out)?;
    zip.start_file(format!("{stem}/byteorder"), small)
        .map_err(zerr)?;
    zip.write_all(b"little")?;
    for (i, s) in p.storages.iter().enumerate() {
        let bytes = match s {
            Storage::Bytes(t) => t.bytes.len(),
            Storage::Lazy(src) => crate::tensor::byte_size(src.dtype(), &src.shape())?,
        };
        let large = bytes as u64 >= u32::MAX as u64;
        zip.start_file(format!("{stem}/data/{i}"), if large { opts } else { small })
            .map_err(zerr)?;
        match s {
            Storage::Bytes(t) => zip.write_all(&t.bytes)?,
            Storage::Lazy(src) => src.write_to(&mut zip)?,
        }
    }
    zip.start_file(format!("{stem}/version"), small)
        .map_err(zerr)?;
    zip.write_all(b"3\n")?;
    zip.finish().map_err(zerr)
}

/// Serialises `value` in torch.save's zip format under the top folder `stem`, in memory.
pub fn to_bytes(value: &PyValue, stem: &str) -> Result<Vec<u8>, Error> {
    Ok(write_zip(std::io::Cursor::new(Vec::new()), value, stem)?.into_inner())
}

/// Writes atomically, streaming into the temporary file; the zip's top folder is the file stem, as
/// torch.save does.
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
    crate::write_atomic_with(path, |file| {
        let out = write_zip(std::io::BufWriter::new(file), value, &stem)?;
        out.into_inner().map_err(|e| Error::Io(e.into_error()))?;
        Ok(())
    })
}
