//! An engine-free tensor: dtype, shape and contiguous little-endian bytes.

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// The safetensors spelling (also used in messages).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        Some(match name {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// The legacy typed-storage class name PyTorch pickles (`torch.FloatStorage`, ...).
    pub fn torch_storage_name(self) -> &'static str {
        match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
        }
    }

    pub fn from_torch_storage_name(name: &str) -> Option<DType> {
        [
            DType::F64,
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::I32,
            DType::I16,
            DType::I8,
            DType::U8,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.torch_storage_name() == name)
    }

    /// numpy `descr` string (little-endian).
    pub fn npy_descr(self) -> &'static str {
        match self {
            DType::F64 => "<f8",
            DType::F32 => "<f4",
            DType::F16 => "<f2",
            DType::BF16 => "<V2",
            DType::I64 => "<i8",
            DType::I32 => "<i4",
            DType::I16 => "<i2",
            DType::I8 => "|i1",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        })
    }
}

/// A dense, row-major tensor held as raw little-endian bytes.
#[derive(Clone, PartialEq)]
pub struct TensorData {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorData({}, {:?})", self.dtype, self.shape)
    }
}

impl TensorData {
    pub fn new(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self, Error> {
        let expected = byte_size(dtype, &shape)?;
        if bytes.len() != expected {
            return Err(Error::Format(format!(
                "tensor of dtype {dtype} and shape {shape:?} needs {expected} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData {
            dtype: DType::F32,
            shape,
            bytes,
        }
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData {
            dtype: DType::I64,
            shape,
            bytes,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values converted to f32 (floats widen or narrow; integers cast).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = &self.bytes;
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            DType::I8 => b.iter().map(|&v| v as i8 as f32).collect(),
            DType::U8 | DType::Bool => b.iter().map(|&v| v as f32).collect(),
        }
    }

    /// Values as i64 (integer dtypes only; floats are truncated).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match self.dtype {
            DType::I64 => self
                .bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => self.to_f32_vec().into_iter().map(|v| v as i64).collect(),
        }
    }

    /// Copy of this tensor in another floating dtype (f32, f16 or bf16); integer tensors are returned as-is.
    pub fn cast_float(&self, to: DType) -> TensorData {
        if !self.dtype.is_float() || self.dtype == to {
            return self.clone();
        }
        let values = self.to_f32_vec();
        let bytes: Vec<u8> = match to {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::F64 => values
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            _ => panic!("cast_float target must be a float dtype, got {to}"),
        };
        TensorData {
            dtype: to,
            shape: self.shape.clone(),
            bytes,
        }
    }
}

/// Bytes of a dense tensor of this dtype and shape; an error when the product overflows.
pub fn byte_size(dtype: DType, shape: &[usize]) -> Result<usize, Error> {
    shape
        .iter()
        .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            Error::Format(format!(
                "a {dtype} tensor of shape {shape:?} would exceed the address space"
            ))
        })
}

/// Gathers a strided view of `storage` (element offset, sizes, strides in elements) into a contiguous tensor.
pub(crate) fn gather_strided(
    storage: &[u8],
    dtype: DType,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Result<Vec<u8>, Error> {
    let es = dtype.size();
    let overflow = || {
        Error::Format(format!(
            "tensor view (offset {offset}, shape {shape:?}, stride {stride:?}) overflows"
        ))
    };
    let numel = byte_size(dtype, shape)? / es;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let last = shape
        .iter()
        .zip(stride)
        .try_fold(offset, |at, (&n, &s)| {
            at.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or_else(overflow)?;
    if last >= storage.len() / es {
        return Err(Error::Format(format!(
            "tensor view (offset {offset}, shape {shape:?}, stride {stride:?}) reaches element {last} \
             but its storage holds only {} elements",
            storage.len() / es
        )));
    }
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&n, &s) in shape.iter().zip(stride).rev() {
            if n != 1 && s != expect {
                ok = false;
                break;
            }
            expect *= n;
        }
        ok
    };
    if contiguous {
        return Ok(storage[offset * es..(offset + numel) * es].to_vec());
    }
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let pos = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[pos * es..(pos + 1) * es]);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}
