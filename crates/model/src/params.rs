//! The model's named tensors, kept in open_clip's `state_dict()` order, with strict loading.

use std::cell::RefCell;
use std::rc::Rc;

use pirclip_checkpoint::{DType, StateDict, TensorData};
use tch::{Device, Kind, Tensor};

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Parameter,
    /// BatchNorm running statistics and counters: saved, never trained.
    Buffer,
}

/// How a freshly created tensor is initialised (spec §3.10); `init::apply` draws the values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    Normal(f64),
    Uniform(f64),
}

pub struct Entry {
    pub name: String,
    pub tensor: Tensor,
    pub kind: EntryKind,
    pub init: Init,
}

/// Ordered registry shared by all modules of one model.
#[derive(Clone)]
pub struct Registry {
    entries: Rc<RefCell<Vec<Entry>>>,
    prefix: String,
    device: Device,
}

impl Registry {
    pub fn new(device: Device) -> Self {
        Registry {
            entries: Rc::new(RefCell::new(Vec::new())),
            prefix: String::new(),
            device,
        }
    }

    pub fn sub(&self, name: impl std::fmt::Display) -> Registry {
        Registry {
            entries: self.entries.clone(),
            prefix: format!("{}{}.", self.prefix, name),
            device: self.device,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn add(
        &self,
        name: &str,
        shape: &[i64],
        kind: Kind,
        entry_kind: EntryKind,
        init: Init,
    ) -> Tensor {
        let tensor = Tensor::zeros(shape, (kind, self.device));
        self.entries.borrow_mut().push(Entry {
            name: format!("{}{}", self.prefix, name),
            tensor: tensor.shallow_clone(),
            kind: entry_kind,
            init,
        });
        tensor
    }

    pub fn param(&self, name: &str, shape: &[i64], init: Init) -> Tensor {
        self.add(name, shape, Kind::Float, EntryKind::Parameter, init)
    }

    pub fn buffer(&self, name: &str, shape: &[i64], kind: Kind, init: Init) -> Tensor {
        self.add(name, shape, kind, EntryKind::Buffer, init)
    }

    /// Stable sort of all entries (used once to put top-level groups in open_clip's order).
    pub fn sort_entries_by_key<K: Ord>(&self, key: impl Fn(&str) -> K) {
        self.entries.borrow_mut().sort_by_key(|e| key(&e.name));
    }

    pub fn with_entries<R>(&self, f: impl FnOnce(&[Entry]) -> R) -> R {
        f(&self.entries.borrow())
    }
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

fn dtype_of(kind: Kind) -> DType {
    match kind {
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        _ => DType::F32,
    }
}

/// A tch tensor from engine-free tensor data (on CPU).
pub fn to_tch(t: &TensorData) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(&t.bytes, &shape, kind_of(t.dtype))
}

/// Engine-free tensor data from a tch tensor (copied to CPU, made contiguous).
pub fn from_tch(t: &Tensor) -> TensorData {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let dtype = dtype_of(t.kind());
    let t = if dtype == DType::F32 && t.kind() != Kind::Float {
        t.to_kind(Kind::Float)
    } else {
        t
    };
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel: usize = shape.iter().product();
    let mut bytes = vec![0u8; numel * dtype.size()];
    if numel > 0 {
        t.copy_data_u8(&mut bytes, numel);
    }
    TensorData {
        dtype,
        shape,
        bytes,
    }
}

/// A tensor written into a checkpoint straight from libtorch's memory (see `pt_write::TensorSource`):
/// a CPU tensor already contiguous in its saved dtype is not copied at all; others are converted one at a
/// time while they are written.
#[derive(Debug)]
pub struct TchSource(pub Tensor);

impl TchSource {
    fn prepared(&self) -> Tensor {
        let t = self.0.detach().to_device(Device::Cpu).contiguous();
        if dtype_of(t.kind()) == DType::F32 && t.kind() != Kind::Float {
            t.to_kind(Kind::Float)
        } else {
            t
        }
    }
}

impl pirclip_checkpoint::pt_write::TensorSource for TchSource {
    fn dtype(&self) -> DType {
        dtype_of(self.0.kind())
    }

    fn shape(&self) -> Vec<usize> {
        self.0.size().iter().map(|&d| d as usize).collect()
    }

    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let t = self.prepared();
        let n = t.numel() * self.dtype().size();
        if n == 0 {
            return Ok(());
        }
        // SAFETY: `t` is a contiguous CPU tensor of `n` bytes that stays alive for the borrow.
        let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
        out.write_all(bytes)
    }
}

/// Result of a non-strict load: what was missing from the file, and what the file had in excess.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<(String, Vec<i64>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut out = String::new();
        let list = |items: &[String]| -> String {
            let shown: Vec<&str> = items.iter().take(20).map(String::as_str).collect();
            let more = if items.len() > 20 {
                format!(", … ({} more)", items.len() - 20)
            } else {
                String::new()
            };
            format!("{}{more}", shown.join(", "))
        };
        if !self.missing.is_empty() {
            out += &format!(
                "\n  {} missing key(s): {}",
                self.missing.len(),
                list(&self.missing)
            );
        }
        if !self.unexpected.is_empty() {
            out += &format!(
                "\n  {} unexpected key(s): {}",
                self.unexpected.len(),
                list(&self.unexpected)
            );
        }
        for (name, want, got) in self.mismatched.iter().take(30) {
            out += &format!(
                "\n  shape mismatch for {name}: model expects {want:?}, checkpoint has {got:?}"
            );
        }
        if self.mismatched.len() > 30 {
            out += &format!("\n  … {} more shape mismatches", self.mismatched.len() - 30);
        }
        out
    }
}

/// Copies matching tensors from `sd` into the registry (casting dtype and moving to the model's device).
pub fn load_state_dict(reg: &Registry, sd: &StateDict) -> LoadReport {
    let mut report = LoadReport::default();
    let _guard = tch::no_grad_guard();
    reg.with_entries(|entries| {
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            seen.insert(e.name.as_str());
            match sd.get(&e.name) {
                None => report.missing.push(e.name.clone()),
                Some(t) => {
                    let want = e.tensor.size();
                    let got: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                    if want != got {
                        report
                            .mismatched
                            .push((e.name.clone(), want, t.shape.clone()));
                        continue;
                    }
                    let src = to_tch(t)
                        .to_kind(e.tensor.kind())
                        .to_device(e.tensor.device());
                    let mut dst = e.tensor.shallow_clone();
                    dst.copy_(&src);
                    report.loaded.push(e.name.clone());
                }
            }
        }
        for (name, _) in &sd.entries {
            if !seen.contains(name.as_str()) {
                report.unexpected.push(name.clone());
            }
        }
    });
    report
}

/// `load_state_dict(strict=True)`: one error listing every missing key, unexpected key and shape mismatch.
pub fn load_strict(reg: &Registry, sd: &StateDict, source: &str) -> Result<(), Error> {
    let report = load_state_dict(reg, sd);
    if report.is_clean() {
        Ok(())
    } else {
        Err(Error::Load(format!(
            "{source} does not fit the model:{}",
            report.describe()
        )))
    }
}

/// The registry's tensors as a state dict, in saved order.
pub fn state_dict(reg: &Registry) -> StateDict {
    reg.with_entries(|entries| StateDict {
        entries: entries
            .iter()
            .map(|e| (e.name.clone(), from_tch(&e.tensor)))
            .collect(),
    })
}
