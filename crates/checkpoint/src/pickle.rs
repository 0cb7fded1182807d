//! A restricted unpickler: it rebuilds only plain data (dicts, lists, tuples, scalars, strings) and
//! PyTorch tensors, like `torch.load(weights_only=True)`. Every GLOBAL is checked against an allow-list
//! and nothing is ever imported or executed; anything else is refused with the offending name.

use crate::Error;

/// A reference to a tensor storage inside a `.pt` archive (the pickle's persistent id).
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: crate::DType,
    pub location: String,
    pub numel: usize,
}

/// A tensor view described by the pickle: which storage, where it starts and how it is strided.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The allow-listed callables a pickle may name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(crate::DType),
    /// `torch._utils._rebuild_parameter_with_state` etc. are not needed for state dicts.
    Set,
    FrozenSet,
    CodecsEncode,
    TorchSize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion-ordered, like Python dicts.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    Mark,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn dict_get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global, Error> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("builtins", "set") | ("__builtin__", "set") => Global::Set,
        ("builtins", "frozenset") | ("__builtin__", "frozenset") => Global::FrozenSet,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch", "Size") => Global::TorchSize,
        ("torch", storage) => match crate::DType::from_torch_storage_name(storage) {
            Some(d) => Global::Storage(d),
            None => return Err(refused(module, name)),
        },
        _ => return Err(refused(module, name)),
    };
    Ok(g)
}

fn refused(module: &str, name: &str) -> Error {
    Error::Unsafe(format!(
        "the pickle asks for the global `{module}.{name}`, which is not on the allow-list of plain data and \
         tensors; refusing to load it (nothing was imported or executed)"
    ))
}

/// Resolves a persistent id (`("storage", torch.FloatStorage, key, location, numel)`).
fn persistent_load(pid: Value) -> Result<Value, Error> {
    let items = match pid {
        Value::Tuple(items) => items,
        other => {
            return Err(Error::Format(format!(
                "persistent id is a {}, expected a tuple",
                other.type_name()
            )))
        }
    };
    match items.as_slice() {
        // The legacy format adds view metadata, `None` for a storage that is no view of another.
        [kind, storage, key, location, numel, Value::None] => persistent_load(Value::Tuple(vec![
            kind.clone(),
            storage.clone(),
            key.clone(),
            location.clone(),
            numel.clone(),
        ])),
        [Value::Str(kind), Value::Global(Global::Storage(dtype)), key, Value::Str(location), numel]
            if kind == "storage" =>
        {
            let key = match key {
                Value::Str(s) if s.len() <= 256 => s.clone(),
                Value::Int(i) => i.to_string(),
                Value::Str(s) => {
                    return Err(Error::Format(format!("storage key of {} bytes", s.len())))
                }
                other => {
                    return Err(Error::Format(format!(
                        "storage key is a {}",
                        other.type_name()
                    )))
                }
            };
            let numel = numel.as_int().filter(|n| *n >= 0).ok_or_else(|| {
                Error::Format("storage element count is not a non-negative int".into())
            })?;
            if (numel as u64)
                .checked_mul(dtype.size() as u64)
                .is_none_or(|b| b > isize::MAX as u64)
            {
                return Err(Error::Format(format!(
                    "storage `{}` declares {numel} {dtype} elements, more than any file holds",
                    preview(&key, 64)
                )));
            }
            Ok(Value::Storage(StorageRef {
                key,
                dtype: *dtype,
                location: location.clone(),
                numel: numel as usize,
            }))
        }
        _ => Err(Error::Format(format!(
            "unsupported persistent id {}",
            preview(&items, 200)
        ))),
    }
}

fn usize_tuple(v: &Value, what: &str) -> Result<Vec<usize>, Error> {
    let items = match v {
        Value::Tuple(items) | Value::List(items) => items,
        other => {
            return Err(Error::Format(format!(
                "tensor {what} is a {}, expected a tuple",
                other.type_name()
            )))
        }
    };
    items
        .iter()
        .map(|x| {
            x.as_int()
                .filter(|i| *i >= 0)
                .map(|i| i as usize)
                .ok_or_else(|| Error::Format(format!("tensor {what} holds a non-integer")))
        })
        .collect()
}

/// The view must lie inside its storage, with every size and index computed without overflow, and may
/// not expand a storage into a much larger tensor (a zero-stride `[40000, 40000]` view of 4 floats would be
/// materialised as 6.4 GB): beyond its storage's element count a view may hold at most 16 Mi elements.
fn check_view(
    storage: &StorageRef,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Result<(), Error> {
    let describe = || {
        format!(
            "tensor view (offset {offset}, size {}, stride {}) of a storage of {} elements",
            preview(&shape, 100),
            preview(&stride, 100),
            storage.numel
        )
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Format(format!("{}: element count overflows", describe())))?;
    if numel == 0 {
        return Ok(());
    }
    let last = shape
        .iter()
        .zip(stride)
        .try_fold(offset, |at, (&n, &s)| {
            at.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or_else(|| Error::Format(format!("{}: index overflows", describe())))?;
    if last >= storage.numel {
        return Err(Error::Format(format!(
            "{}: reaches element {last}, outside the storage",
            describe()
        )));
    }
    const EXPANSION_ALLOWANCE: usize = 16 << 20;
    if numel > storage.numel && numel > EXPANSION_ALLOWANCE {
        return Err(Error::Format(format!(
            "{}: would expand to {numel} elements; refusing views that repeat storage beyond {EXPANSION_ALLOWANCE} elements",
            describe()
        )));
    }
    Ok(())
}

fn call(func: Global, args: Value) -> Result<Value, Error> {
    let args = match args {
        Value::Tuple(a) => a,
        other => {
            return Err(Error::Format(format!(
                "REDUCE arguments are a {}",
                other.type_name()
            )))
        }
    };
    match func {
        Global::OrderedDict => {
            if args.is_empty() {
                Ok(Value::Dict(Vec::new()))
            } else {
                // OrderedDict([(k, v), ...])
                match args.into_iter().next().unwrap() {
                    Value::List(pairs) | Value::Tuple(pairs) => {
                        let mut out = Vec::new();
                        for p in pairs {
                            match p {
                                Value::Tuple(mut kv) if kv.len() == 2 => {
                                    let v = kv.pop().unwrap();
                                    let k = kv.pop().unwrap();
                                    out.push((k, v));
                                }
                                _ => {
                                    return Err(Error::Format(
                                        "OrderedDict item is not a pair".into(),
                                    ))
                                }
                            }
                        }
                        Ok(Value::Dict(out))
                    }
                    other => Err(Error::Format(format!(
                        "OrderedDict built from a {}",
                        other.type_name()
                    ))),
                }
            }
        }
        Global::RebuildTensorV2 => {
            if args.len() < 4 {
                return Err(Error::Format(format!(
                    "_rebuild_tensor_v2 got {} arguments",
                    args.len()
                )));
            }
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => {
                    return Err(Error::Format(format!(
                        "tensor storage is a {}",
                        other.type_name()
                    )))
                }
            };
            let offset = args[1].as_int().filter(|o| *o >= 0).ok_or_else(|| {
                Error::Format("tensor storage offset is not a non-negative int".into())
            })? as usize;
            let shape = usize_tuple(&args[2], "size")?;
            let stride = usize_tuple(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(Error::Format(format!(
                    "tensor size {} and stride {} differ in rank",
                    preview(&shape, 100),
                    preview(&stride, 100)
                )));
            }
            check_view(&storage, offset, &shape, &stride)?;
            Ok(Value::Tensor(TensorRef {
                storage,
                offset,
                shape,
                stride,
            }))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(Error::Format("_rebuild_parameter without a tensor".into())),
        },
        Global::Set | Global::FrozenSet => match args.into_iter().next() {
            Some(Value::List(items)) | Some(Value::Tuple(items)) => Ok(Value::List(items)),
            None => Ok(Value::List(Vec::new())),
            Some(other) => Err(Error::Format(format!(
                "set built from a {}",
                other.type_name()
            ))),
        },
        Global::CodecsEncode => match args.as_slice() {
            // Protocol-2 pickles encode bytes as _codecs.encode(str, "latin1").
            [Value::Str(s), Value::Str(enc)] if enc == "latin1" || enc == "latin-1" => {
                Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
            }
            _ => Err(Error::Format("unsupported _codecs.encode call".into())),
        },
        Global::TorchSize => match args.into_iter().next() {
            Some(Value::Tuple(items)) | Some(Value::List(items)) => Ok(Value::Tuple(items)),
            _ => Err(Error::Format("torch.Size without a tuple".into())),
        },
        Global::Storage(_) => Err(Error::Unsafe(
            "a storage class may only appear in a persistent id".into(),
        )),
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(Error::Format(format!(
                "pickle truncated: needed {n} bytes at offset {}, only {left} left",
                self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A 64-bit length field; one beyond the address space is as truncated as one beyond the data.
    fn len64(&mut self) -> Result<usize, Error> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| {
            Error::Format(format!(
                "pickle length {n} at offset {} exceeds the data",
                self.pos - 8
            ))
        })
    }
    fn line(&mut self) -> Result<&'a str, Error> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return Err(Error::Format("pickle truncated inside a text line".into()));
        }
        let s = std::str::from_utf8(&self.data[start..self.pos])
            .map_err(|_| Error::Format("pickle text line is not UTF-8".into()))?;
        self.pos += 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String, Error> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::Format("pickle string is not valid UTF-8".into()))
    }
}

fn long_from_le(bytes: &[u8]) -> Result<i64, Error> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        return Err(Error::Format(format!(
            "pickle integer of {} bytes does not fit in 64 bits",
            bytes.len()
        )));
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

/// Deepest nesting of containers accepted. `torch.save` output nests about 6 deep (training checkpoint →
/// optimizer → state → param → tensor → size); the limit keeps every recursive walk over a value (drop,
/// clone, comparison) far from the thread's stack size.
pub const MAX_DEPTH: u32 = 256;

/// Bytes that memo GETs and DUPs may copy in total: a fixed allowance plus 64 bytes per input byte.
/// Copies are the only way a pickle grows faster than its own length (a 70-byte pickle that doubles a
/// list through the memo 24 times would otherwise build 10 GB).
fn copy_budget(input_len: usize) -> usize {
    (64 << 20) + input_len.saturating_mul(64)
}

/// A value on the stack or in the memo, with the facts the limits need (kept so no check walks a value).
#[derive(Clone)]
struct Slot {
    value: Value,
    depth: u32,
    /// Approximate heap + inline bytes of the value.
    bytes: usize,
}

const NODE_BYTES: usize = std::mem::size_of::<Value>();

impl Slot {
    fn leaf(value: Value) -> Slot {
        let heap = match &value {
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 0,
        };
        Slot {
            value,
            depth: 0,
            bytes: NODE_BYTES + heap,
        }
    }

    /// A container built from `items` (already popped off the stack).
    fn container(items: Vec<Slot>, build: impl FnOnce(Vec<Value>) -> Value) -> Result<Slot, Error> {
        let depth = 1 + items.iter().map(|s| s.depth).max().unwrap_or(0);
        check_depth(depth)?;
        let bytes = NODE_BYTES + items.iter().map(|s| s.bytes).sum::<usize>();
        Ok(Slot {
            value: build(items.into_iter().map(|s| s.value).collect()),
            depth,
            bytes,
        })
    }

    /// Records that `item` now lives inside this (container) value.
    fn absorb(&mut self, depth: u32, bytes: usize) -> Result<(), Error> {
        self.depth = self.depth.max(depth + 1);
        check_depth(self.depth)?;
        self.bytes = self.bytes.saturating_add(bytes);
        Ok(())
    }
}

fn check_depth(depth: u32) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::Format(format!(
            "pickle nests containers more than {MAX_DEPTH} deep; no checkpoint does, refusing it"
        )));
    }
    Ok(())
}

/// Python's dict-key identity for the keys a checkpoint can hold (`True == 1 == 1.0` as keys).
#[derive(PartialEq, Eq, Hash)]
enum HashKey {
    None,
    Int(i64),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<HashKey>),
    /// Objects hashed by identity in Python (tensors, storages, globals): never equal to another key.
    Identity(usize),
}

fn hash_key(v: &Value, identity: &mut usize) -> Result<HashKey, Error> {
    Ok(match v {
        Value::None => HashKey::None,
        Value::Bool(b) => HashKey::Int(*b as i64),
        Value::Int(i) => HashKey::Int(*i),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => HashKey::Int(*f as i64),
        Value::Float(f) => HashKey::Float(f.to_bits()),
        Value::Str(s) => HashKey::Str(s.clone()),
        Value::Bytes(b) => HashKey::Bytes(b.clone()),
        Value::Tuple(items) => HashKey::Tuple(
            items
                .iter()
                .map(|x| hash_key(x, identity))
                .collect::<Result<_, _>>()?,
        ),
        Value::Global(_) | Value::Storage(_) | Value::Tensor(_) => {
            *identity += 1;
            HashKey::Identity(*identity)
        }
        Value::List(_) | Value::Dict(_) | Value::Mark => {
            return Err(Error::Format(format!(
                "unhashable dict key of type {}",
                v.type_name()
            )))
        }
    })
}

/// Applies Python's `d[k] = v` semantics to every dict of the finished value: a repeated key keeps its
/// first position and its last value. Dicts are appended to while unpickling (no per-key search, which made
/// a 200k-key dict quadratic) and resolved here in one hashed pass each.
fn resolve_dict_keys(value: &mut Value) -> Result<(), Error> {
    let mut pending: Vec<&mut Value> = vec![value];
    let mut identity = 0usize;
    while let Some(v) = pending.pop() {
        match v {
            Value::Dict(items) => {
                let mut first: std::collections::HashMap<HashKey, usize> =
                    std::collections::HashMap::with_capacity(items.len());
                let mut keep = vec![true; items.len()];
                let mut moves: Vec<(usize, usize)> = Vec::new();
                for (i, (k, _)) in items.iter().enumerate() {
                    match first.entry(hash_key(k, &mut identity)?) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            keep[i] = false;
                            moves.push((i, *e.get()));
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(i);
                        }
                    }
                }
                if !moves.is_empty() {
                    for (from, to) in moves {
                        let value = std::mem::replace(&mut items[from].1, Value::None);
                        items[to].1 = value;
                    }
                    let mut i = 0;
                    items.retain(|_| {
                        i += 1;
                        keep[i - 1]
                    });
                }
                for (_, v) in items.iter_mut() {
                    pending.push(v);
                }
            }
            Value::List(items) | Value::Tuple(items) => pending.extend(items.iter_mut()),
            _ => {}
        }
    }
    Ok(())
}

/// At most `max` characters of a value's debug form, for error messages about hostile input.
fn preview(v: &impl std::fmt::Debug, max: usize) -> String {
    let s = format!("{v:?}");
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} characters)", &s[..i], s.len()),
        None => s,
    }
}

/// Unpickles `data` with the restricted rules described in the module docs.
pub fn unpickle(data: &[u8]) -> Result<Value, Error> {
    unpickle_prefix(data).map(|(v, _)| v)
}

/// Unpickles the pickle at the start of `data`; returns it and the bytes it took (through its STOP):
/// the legacy `torch.save` format writes several pickles and raw storages one after another.
pub fn unpickle_prefix(data: &[u8]) -> Result<(Value, usize), Error> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Slot> = std::collections::HashMap::new();
    let mut copy_left = copy_budget(data.len());

    fn pop(stack: &mut Vec<Slot>) -> Result<Slot, Error> {
        stack
            .pop()
            .ok_or_else(|| Error::Format("pickle stack underflow".into()))
    }
    fn pop_mark(stack: &mut Vec<Slot>) -> Result<Vec<Slot>, Error> {
        let at = stack
            .iter()
            .rposition(|s| matches!(s.value, Value::Mark))
            .ok_or_else(|| Error::Format("pickle MARK missing".into()))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn top_mut(stack: &mut [Slot]) -> Result<&mut Slot, Error> {
        stack
            .last_mut()
            .ok_or_else(|| Error::Format("pickle stack underflow".into()))
    }
    /// A copy of `slot`, charged to the copy budget.
    fn copy(slot: &Slot, left: &mut usize) -> Result<Slot, Error> {
        if slot.bytes > *left {
            return Err(Error::Format(
                "pickle copies values through its memo/DUP far beyond its own size (64 MB plus 64 bytes \
                 per pickle byte); no checkpoint does, refusing it"
                    .into(),
            ));
        }
        *left -= slot.bytes;
        Ok(slot.clone())
    }
    fn set_items(target: &mut Slot, items: Vec<Slot>) -> Result<(), Error> {
        if items.len() % 2 != 0 {
            return Err(Error::Format("SETITEMS with an odd number of items".into()));
        }
        let depth = items.iter().map(|s| s.depth).max().unwrap_or(0);
        let bytes = items.iter().map(|s| s.bytes).sum();
        match &mut target.value {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k.value, v.value));
                }
            }
            other => return Err(Error::Format(format!("SETITEM on a {}", other.type_name()))),
        }
        target.absorb(depth, bytes)
    }
    fn extend_list(target: &mut Slot, items: Vec<Slot>, op: &str) -> Result<(), Error> {
        let depth = items.iter().map(|s| s.depth).max().unwrap_or(0);
        let bytes = items.iter().map(|s| s.bytes).sum();
        match &mut target.value {
            Value::List(l) => l.extend(items.into_iter().map(|s| s.value)),
            other => return Err(Error::Format(format!("{op} on a {}", other.type_name()))),
        }
        if depth > 0 || bytes > 0 {
            target.absorb(depth, bytes)?;
        }
        Ok(())
    }
    let leaf = |v: Value| Slot::leaf(v);

    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(Error::Format(format!("pickle protocol {proto} is newer than 5")));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: framing is only a read-ahead hint
            }
            b'.' => {
                let mut v = pop(&mut stack)?.value;
                resolve_dict_keys(&mut v)?;
                return Ok((v, r.pos));
            }
            b'}' => stack.push(leaf(Value::Dict(Vec::new()))),
            b']' | 0x8f => stack.push(leaf(Value::List(Vec::new()))), // EMPTY_LIST, EMPTY_SET
            b')' => stack.push(leaf(Value::Tuple(Vec::new()))),
            b'(' => stack.push(leaf(Value::Mark)),
            b'N' => stack.push(leaf(Value::None)),
            0x88 => stack.push(leaf(Value::Bool(true))),
            0x89 => stack.push(leaf(Value::Bool(false))),
            b'J' => stack.push(leaf(Value::Int(r.u32()? as i32 as i64))),
            b'K' => stack.push(leaf(Value::Int(r.u8()? as i64))),
            b'M' => stack.push(leaf(Value::Int(r.u16()? as i64))),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(leaf(Value::Int(long_from_le(r.take(n)?)?)));
            }
            0x8b => {
                let n = r.u32()? as usize;
                stack.push(leaf(Value::Int(long_from_le(r.take(n)?)?)));
            }
            b'I' => {
                let line = r.line()?;
                stack.push(leaf(match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| Error::Format(format!("bad INT {}", preview(&s, 40))))?),
                }));
            }
            b'L' => {
                let line = r.line()?.trim_end_matches('L');
                stack.push(leaf(Value::Int(line.parse().map_err(|_| Error::Format(format!("bad LONG {}", preview(&line, 40))))?)));
            }
            b'G' => stack.push(leaf(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().unwrap())))),
            b'F' => {
                let line = r.line()?;
                stack.push(leaf(Value::Float(line.parse().map_err(|_| Error::Format(format!("bad FLOAT {}", preview(&line, 40))))?)));
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(leaf(Value::Str(r.string(n)?)));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(leaf(Value::Str(r.string(n)?)));
            }
            0x8d => {
                let n = r.len64()?;
                stack.push(leaf(Value::Str(r.string(n)?)));
            }
            b'T' | b'B' => {
                let n = r.u32()? as usize;
                stack.push(leaf(Value::Bytes(r.take(n)?.to_vec())));
            }
            b'U' | b'C' => {
                let n = r.u8()? as usize;
                stack.push(leaf(Value::Bytes(r.take(n)?.to_vec())));
            }
            0x8e => {
                let n = r.len64()?;
                stack.push(leaf(Value::Bytes(r.take(n)?.to_vec())));
            }
            b'q' | b'r' | 0x94 => {
                let i = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => memo.len() as u32,
                };
                let v = copy(top_mut(&mut stack)?, &mut copy_left)?;
                memo.insert(i, v);
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let slot = memo.get(&i).ok_or_else(|| Error::Format(format!("memo {i} missing")))?;
                stack.push(copy(slot, &mut copy_left)?);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(leaf(Value::Global(resolve_global(&module, &name)?)));
            }
            0x93 => {
                let name = pop(&mut stack)?.value;
                let module = pop(&mut stack)?.value;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(leaf(Value::Global(resolve_global(&m, &n)?))),
                    _ => return Err(Error::Format("STACK_GLOBAL needs two strings".into())),
                }
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::container(items, Value::Tuple)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(Error::Format("pickle stack underflow".into()));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Slot::container(items, Value::Tuple)?);
            }
            b'l' | 0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::container(items, Value::List)?);
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut d = leaf(Value::Dict(Vec::new()));
                set_items(&mut d, items)?;
                stack.push(d);
            }
            b'a' => {
                let v = pop(&mut stack)?;
                extend_list(top_mut(&mut stack)?, vec![v], "APPEND")?;
            }
            b'e' | 0x90 => {
                let items = pop_mark(&mut stack)?;
                extend_list(top_mut(&mut stack)?, items, "APPENDS")?;
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top_mut(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(top_mut(&mut stack)?, items)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(leaf(persistent_load(pid.value)?));
            }
            b'P' => return Err(Error::Format("text persistent ids are not used by torch.save".into())),
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                let g = match func.value {
                    // NEWOBJ cls(*args): only the allowed containers.
                    Value::Global(g @ (Global::OrderedDict | Global::Set | Global::FrozenSet)) if op == 0x81 => g,
                    _ if op == 0x81 => return Err(Error::Unsafe("NEWOBJ of a class that is not plain data".into())),
                    Value::Global(g) => g,
                    other => return Err(Error::Unsafe(format!("REDUCE on a {}, not an allowed global", other.type_name()))),
                };
                let (depth, bytes) = (args.depth + 1, args.bytes + NODE_BYTES);
                check_depth(depth)?;
                stack.push(Slot { value: call(g, args.value)?, depth, bytes });
            }
            b'b' => {
                // BUILD: state for the object below. OrderedDicts carry `_metadata`; plain data ignores it.
                let _state = pop(&mut stack)?;
                match &top_mut(&mut stack)?.value {
                    Value::Dict(_) | Value::Tensor(_) | Value::List(_) => {}
                    other => return Err(Error::Unsafe(format!("BUILD on a {}", other.type_name()))),
                }
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'2' => {
                let v = copy(top_mut(&mut stack)?, &mut copy_left)?;
                stack.push(v);
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'i' | 0x82 | 0x83 | 0x84 | b'o' | 0x92 => {
                return Err(Error::Unsafe(format!(
                    "pickle opcode 0x{op:02x} (INST/OBJ/EXT/NEWOBJ_EX) builds arbitrary objects; refused"
                )))
            }
            0x96..=0x98 => return Err(Error::Format("out-of-band pickle buffers are not supported".into())),
            _ => return Err(Error::Format(format!("unknown pickle opcode 0x{op:02x} at offset {}", r.pos - 1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        // pickle.dumps of a class whose __reduce__ returns (os.system, ("echo pwned",)), protocol 2.
        let mut p = vec![0x80, 2];
        p.extend_from_slice(
            b"cposix\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.",
        );
        let err = unpickle(&p).unwrap_err();
        assert!(matches!(err, Error::Unsafe(_)), "{err}");
        assert!(err.to_string().contains("posix.system"), "{err}");
    }

    #[test]
    fn refuses_stack_global_builtins_eval() {
        let mut p = vec![0x80, 4];
        p.extend_from_slice(b"\x8c\x08builtins\x8c\x04eval\x93\x8c\x061+1==2\x85R.");
        let err = unpickle(&p).unwrap_err();
        assert!(err.to_string().contains("builtins.eval"), "{err}");
    }

    #[test]
    fn plain_data_round() {
        // pickle.dumps({"a": [1, 2.5, "x"], "b": (True, None)}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x03eX\x01\x00\x00\x00bq\x04\x88N\x86q\x05u.";
        let v = unpickle(p).unwrap();
        assert_eq!(
            v.dict_get("a"),
            Some(&Value::List(vec![
                Value::Int(1),
                Value::Float(2.5),
                Value::Str("x".into())
            ]))
        );
        assert_eq!(
            v.dict_get("b"),
            Some(&Value::Tuple(vec![Value::Bool(true), Value::None]))
        );
    }

    #[test]
    fn truncated_pickle_is_an_error() {
        let p = b"\x80\x02}q\x00(X\x01\x00\x00";
        assert!(matches!(unpickle(p), Err(Error::Format(_))));
    }
}
