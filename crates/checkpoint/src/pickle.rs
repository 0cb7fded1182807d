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

    fn type_name(&self) -> &'static str {
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
        [Value::Str(kind), Value::Global(Global::Storage(dtype)), key, Value::Str(location), numel]
            if kind == "storage" =>
        {
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
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
            Ok(Value::Storage(StorageRef {
                key,
                dtype: *dtype,
                location: location.clone(),
                numel: numel as usize,
            }))
        }
        _ => Err(Error::Format(format!(
            "unsupported persistent id {items:?}"
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
                    "tensor size {shape:?} and stride {stride:?} differ in rank"
                )));
            }
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
        if self.pos + n > self.data.len() {
            return Err(Error::Format(format!(
                "pickle truncated: needed {n} bytes at offset {}, only {} left",
                self.pos,
                self.data.len() - self.pos
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

/// Unpickles `data` with the restricted rules described in the module docs.
pub fn unpickle(data: &[u8]) -> Result<Value, Error> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Value> = std::collections::HashMap::new();

    fn pop(stack: &mut Vec<Value>) -> Result<Value, Error> {
        stack
            .pop()
            .ok_or_else(|| Error::Format("pickle stack underflow".into()))
    }
    fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, Error> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| Error::Format("pickle MARK missing".into()))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn top_mut(stack: &mut [Value]) -> Result<&mut Value, Error> {
        stack
            .last_mut()
            .ok_or_else(|| Error::Format("pickle stack underflow".into()))
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> Result<(), Error> {
        match target {
            Value::Dict(d) => {
                if items.len() % 2 != 0 {
                    return Err(Error::Format("SETITEMS with an odd number of items".into()));
                }
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let Some(slot) = d.iter_mut().find(|(ek, _)| *ek == k) {
                        slot.1 = v;
                    } else {
                        d.push((k, v));
                    }
                }
                Ok(())
            }
            other => Err(Error::Format(format!("SETITEM on a {}", other.type_name()))),
        }
    }

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
            b'.' => return pop(&mut stack),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(Value::Int(long_from_le(r.take(n)?)?));
            }
            0x8b => {
                let n = r.u32()? as usize;
                stack.push(Value::Int(long_from_le(r.take(n)?)?));
            }
            b'I' => {
                let line = r.line()?;
                stack.push(match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| Error::Format(format!("bad INT {s:?}")))?),
                });
            }
            b'L' => {
                let line = r.line()?.trim_end_matches('L');
                stack.push(Value::Int(line.parse().map_err(|_| Error::Format(format!("bad LONG {line:?}")))?));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().unwrap()))),
            b'F' => {
                let line = r.line()?;
                stack.push(Value::Float(line.parse().map_err(|_| Error::Format(format!("bad FLOAT {line:?}")))?));
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = r.u64()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            0x8e => {
                let n = r.u64()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'q' => {
                let i = r.u8()? as u32;
                memo.insert(i, top_mut(&mut stack)?.clone());
            }
            b'r' => {
                let i = r.u32()?;
                memo.insert(i, top_mut(&mut stack)?.clone());
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(i, top_mut(&mut stack)?.clone());
            }
            b'h' => {
                let i = r.u8()? as u32;
                stack.push(memo.get(&i).cloned().ok_or_else(|| Error::Format(format!("memo {i} missing")))?);
            }
            b'j' => {
                let i = r.u32()?;
                stack.push(memo.get(&i).cloned().ok_or_else(|| Error::Format(format!("memo {i} missing")))?);
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(Value::Global(resolve_global(&module, &name)?));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(resolve_global(&m, &n)?)),
                    _ => return Err(Error::Format("STACK_GLOBAL needs two strings".into())),
                }
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85 => {
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b, c]));
            }
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut d = Value::Dict(Vec::new());
                set_items(&mut d, items)?;
                stack.push(d);
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match top_mut(&mut stack)? {
                    Value::List(l) => l.push(v),
                    other => return Err(Error::Format(format!("APPEND on a {}", other.type_name()))),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match top_mut(&mut stack)? {
                    Value::List(l) => l.extend(items),
                    other => return Err(Error::Format(format!("APPENDS on a {}", other.type_name()))),
                }
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
            0x8f => stack.push(Value::List(Vec::new())), // EMPTY_SET
            0x90 => {
                let items = pop_mark(&mut stack)?;
                match top_mut(&mut stack)? {
                    Value::List(l) => l.extend(items),
                    other => return Err(Error::Format(format!("ADDITEMS on a {}", other.type_name()))),
                }
            }
            0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            b'P' => return Err(Error::Format("text persistent ids are not used by torch.save".into())),
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                match func {
                    Value::Global(g) => stack.push(call(g, args)?),
                    other => return Err(Error::Unsafe(format!("REDUCE on a {}, not an allowed global", other.type_name()))),
                }
            }
            0x81 => {
                // NEWOBJ cls(*args): only the allowed containers.
                let args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                match cls {
                    Value::Global(g @ (Global::OrderedDict | Global::Set | Global::FrozenSet)) => stack.push(call(g, args)?),
                    _ => return Err(Error::Unsafe("NEWOBJ of a class that is not plain data".into())),
                }
            }
            b'b' => {
                // BUILD: state for the object below. OrderedDicts carry `_metadata`; plain data ignores it.
                let _state = pop(&mut stack)?;
                match top_mut(&mut stack)? {
                    Value::Dict(_) | Value::Tensor(_) | Value::List(_) => {}
                    other => return Err(Error::Unsafe(format!("BUILD on a {}", other.type_name()))),
                }
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'2' => {
                let v = top_mut(&mut stack)?.clone();
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
