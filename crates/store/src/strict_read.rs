//! A metadata part as the parquet crate reads it, with the bounds the crate lacks. Ours rather than
//! the crate's because the crate trusts declared sizes where a hostile file lies:
//! - it skips unknown thrift fields of page headers with `io::copy(take(n))`, which treats the end of
//!   the input as success: a 2 KB page header declaring a list of 2^31 doubles was skipped one empty
//!   read at a time (42 s, found by the fuzzer, `tests/fixtures/fuzz/index-parquet-42s.bin`). Here the
//!   part is held in memory ([`StrictSource`]), the end of the input is an error, and all readers of
//!   one file share a budget of read calls proportional to its size;
//! - a collection may declare more elements than bytes remain (2^31 booleans: 3.4 s per header), and a
//!   known field may carry another wire type, which the crate reads by id anyway: every page header
//!   ([`check_page_headers`]) and the footer ([`check_footer`]) are walked by a strict compact-thrift
//!   reader first;
//! - it reserves each schema element's declared children up front ([`check_footer`]).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

/// Read calls allowed per byte of the file (plus a fixed allowance): a well-formed file needs about
/// one per value at worst, a crafted one is stopped here.
const READS_PER_BYTE: u64 = 8;
const READS_BASE: u64 = 1 << 16;

#[derive(Clone)]
pub(crate) struct StrictSource {
    bytes: Bytes,
    reads_left: Arc<AtomicU64>,
}

impl StrictSource {
    pub(crate) fn new(bytes: Vec<u8>) -> StrictSource {
        let budget = READS_BASE.saturating_add(READS_PER_BYTE.saturating_mul(bytes.len() as u64));
        StrictSource {
            bytes: Bytes::from(bytes),
            reads_left: Arc::new(AtomicU64::new(budget)),
        }
    }
}

impl Length for StrictSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl ChunkReader for StrictSource {
    type T = StrictReader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<StrictReader> {
        let start = usize::try_from(start)
            .ok()
            .filter(|s| *s <= self.bytes.len())
            .ok_or_else(|| ParquetError::EOF(format!("offset {start} is past the file's end")))?;
        Ok(StrictReader {
            rest: self.bytes.slice(start..),
            reads_left: self.reads_left.clone(),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let end = usize::try_from(start)
            .ok()
            .and_then(|s| Some((s, s.checked_add(length)?)))
            .filter(|(_, e)| *e <= self.bytes.len())
            .ok_or_else(|| {
                ParquetError::EOF(format!("{length} bytes at {start} are past the file's end"))
            })?;
        Ok(self.bytes.slice(end.0..end.1))
    }
}

pub(crate) struct StrictReader {
    rest: Bytes,
    reads_left: Arc<AtomicU64>,
}

impl Read for StrictReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let spent = self
            .reads_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if spent.is_err() {
            return Err(std::io::Error::other(
                "more read calls than a file of this size can need",
            ));
        }
        if self.rest.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = self.rest.slice(n..);
        Ok(n)
    }
}

/// Walks every page header of every column chunk with a strict thrift reader before the parquet crate
/// reads any: each collection may declare at most as many elements as bytes remain (every element of
/// the compact protocol takes at least one), which the crate's skipping of unknown fields does not
/// check (a page header listing 2^31 booleans cost it 3.4 s, and a part can hold many headers).
pub(crate) fn check_page_headers(
    source: &StrictSource,
    metadata: &parquet::file::metadata::ParquetMetaData,
) -> Result<(), String> {
    let file = &source.bytes[..];
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            let at = |what: String| format!("row group {g}, column {c}: {what}");
            let start = chunk
                .dictionary_page_offset()
                .map_or(chunk.data_page_offset(), |d| {
                    d.min(chunk.data_page_offset())
                });
            let range = usize::try_from(start)
                .ok()
                .zip(usize::try_from(chunk.compressed_size()).ok())
                .and_then(|(s, n)| Some(s..s.checked_add(n)?))
                .filter(|r| r.end <= file.len())
                .ok_or_else(|| {
                    at(format!(
                        "its pages ({} bytes at {start}) are not inside the file",
                        chunk.compressed_size()
                    ))
                })?;
            let mut pos = range.start;
            while pos < range.end {
                let mut input = Compact {
                    rest: &file[pos..range.end],
                };
                let body = input
                    .page_header()
                    .map_err(|e| at(format!("page at {pos}: {e}")))?;
                let header_end = range.end - input.rest.len();
                pos = header_end
                    .checked_add(body)
                    .filter(|end| *end <= range.end)
                    .ok_or_else(|| at(format!("page at {pos} runs past its column chunk")))?;
            }
        }
    }
    Ok(())
}

/// Just enough of thrift's compact protocol to walk a value without trusting any declared size.
struct Compact<'a> {
    rest: &'a [u8],
}

impl Compact<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self
            .rest
            .split_first()
            .ok_or("ends inside a thrift value")?;
        self.rest = rest;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.rest.len())
            .ok_or("a value runs past the end")?;
        self.rest = &self.rest[n..];
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint of more than 10 bytes".into())
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// A list's or set's header: its element type and its count, at most the bytes left.
    fn list_header(&mut self) -> Result<(u8, u64), String> {
        let head = self.byte()?;
        let n = match head >> 4 {
            15 => self.varint()?,
            n => u64::from(n),
        };
        Ok((head & 0x0f, self.count(n)?))
    }

    /// A declared element count, at most the bytes left.
    fn count(&mut self, declared: u64) -> Result<u64, String> {
        if declared > self.rest.len() as u64 {
            return Err(format!(
                "a collection of {declared} elements in {} bytes",
                self.rest.len()
            ));
        }
        Ok(declared)
    }

    /// Skips one value of compact type `kind`; `in_collection` because a boolean there takes a byte.
    fn value(&mut self, kind: u8, in_collection: bool, depth: u32) -> Result<(), String> {
        if depth > 64 {
            return Err("nested more than 64 deep".into());
        }
        match kind {
            1 | 2 if !in_collection => Ok(()),
            1..=3 => self.skip(1),
            4..=6 => self.varint().map(drop),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            9 | 10 => {
                let (kind, n) = self.list_header()?;
                for _ in 0..n {
                    self.value(kind, true, depth + 1)?;
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if self.count(n)? > 0 {
                    let kinds = self.byte()?;
                    for _ in 0..n {
                        self.value(kinds >> 4, true, depth + 1)?;
                        self.value(kinds & 0x0f, true, depth + 1)?;
                    }
                }
                Ok(())
            }
            12 => self.fields(&[], depth + 1, &mut |_, _| Ok(false)),
            13 => self.skip(16),
            other => Err(format!("unknown thrift type {other}")),
        }
    }

    /// Walks a struct's fields. The parquet crate matches a field by its id alone and reads it as its own
    /// schema says, whatever type the wire declares, so a known field of the wrong wire type would be
    /// read differently there than walked here: such a field is refused. `take(self, id)` reads a known
    /// field itself when it returns true.
    fn fields(
        &mut self,
        schema: &[(i64, Field)],
        depth: u32,
        take: &mut dyn FnMut(&mut Self, i64) -> Result<bool, String>,
    ) -> Result<(), String> {
        if depth > 64 {
            return Err("nested more than 64 deep".into());
        }
        let mut id = 0i64;
        loop {
            let head = self.byte()?;
            let kind = head & 0x0f;
            if kind == 0 {
                return Ok(());
            }
            id = match head >> 4 {
                0 => self.zigzag()?,
                delta => id + i64::from(delta),
            };
            match schema.iter().find(|(known, _)| *known == id) {
                Some((_, field)) if !field.accepts(kind) => {
                    return Err(format!(
                        "field {id} of wire type {kind} where the format has {field:?}"
                    ))
                }
                Some((_, Field::Struct(inner))) => {
                    if !take(self, id)? {
                        self.fields(inner, depth + 1, &mut |_, _| Ok(false))?;
                    }
                }
                _ => {
                    if !take(self, id)? {
                        self.value(kind, false, depth)?;
                    }
                }
            }
        }
    }

    /// A page header, returning the size of the page body that follows it (`compressed_page_size`).
    fn page_header(&mut self) -> Result<usize, String> {
        let mut body = None;
        self.fields(PAGE_HEADER, 1, &mut |input, id| {
            if id != 3 {
                return Ok(false);
            }
            body = Some(input.zigzag()?);
            Ok(true)
        })?;
        body.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| "no compressed_page_size, or a negative one".into())
    }
}

/// The fields of parquet.thrift's structs that the parquet crate decodes, as it decodes them.
#[derive(Debug)]
enum Field {
    I32,
    I64,
    Bool,
    Binary,
    List,
    Struct(&'static [(i64, Field)]),
}

impl Field {
    fn accepts(&self, kind: u8) -> bool {
        match self {
            Field::I32 => kind == 5,
            Field::I64 => kind == 6,
            Field::Bool => kind == 1 || kind == 2,
            Field::Binary => kind == 8,
            Field::List => kind == 9,
            Field::Struct(_) => kind == 12,
        }
    }
}

const STATISTICS: &[(i64, Field)] = &[
    (1, Field::Binary),
    (2, Field::Binary),
    (3, Field::I64),
    (4, Field::I64),
    (5, Field::Binary),
    (6, Field::Binary),
    (7, Field::Bool),
    (8, Field::Bool),
];
const PAGE_HEADER: &[(i64, Field)] = &[
    (1, Field::I32),
    (2, Field::I32),
    (3, Field::I32),
    (4, Field::I32),
    (
        5,
        Field::Struct(&[
            (1, Field::I32),
            (2, Field::I32),
            (3, Field::I32),
            (4, Field::I32),
            (5, Field::Struct(STATISTICS)),
        ]),
    ),
    (6, Field::Struct(&[])),
    (
        7,
        Field::Struct(&[(1, Field::I32), (2, Field::I32), (3, Field::Bool)]),
    ),
    (
        8,
        Field::Struct(&[
            (1, Field::I32),
            (2, Field::I32),
            (3, Field::I32),
            (4, Field::I32),
            (5, Field::I32),
            (6, Field::I32),
            (7, Field::Bool),
            (8, Field::Struct(STATISTICS)),
        ]),
    ),
];
const SCHEMA_ELEMENT: &[(i64, Field)] = &[
    (1, Field::I32),
    (2, Field::I32),
    (3, Field::I32),
    (4, Field::Binary),
    (5, Field::I32),
    (6, Field::I32),
    (7, Field::I32),
    (8, Field::I32),
    (9, Field::I32),
];
const FILE_METADATA: &[(i64, Field)] = &[
    (1, Field::I32),
    (2, Field::List),
    (3, Field::I64),
    (4, Field::List),
    (5, Field::List),
    (6, Field::Binary),
    (7, Field::List),
];

/// Checks the footer's schema before the parquet crate decodes it: the crate reserves a vector of each
/// schema element's declared `num_children` up front, so a 2.4 KB part declaring 86 M children made it
/// reserve 692 MB (found by the fuzzer, `tests/fixtures/fuzz/index-parquet-692mb.bin`); 2^31 would be
/// 16 GB. A schema element can have no more children than the schema has elements.
pub(crate) fn check_footer(file: &[u8]) -> Result<(), String> {
    let n = file.len();
    if n < 12 || &file[n - 4..] != b"PAR1" {
        return Ok(()); // the crate says what is wrong with it
    }
    let len = u32::from_le_bytes(file[n - 8..n - 4].try_into().unwrap()) as usize;
    let Some(start) = (n - 8).checked_sub(len) else {
        return Ok(());
    };
    let mut input = Compact {
        rest: &file[start..n - 8],
    };
    let mut elements = 0u64;
    let mut most_children = 0u64;
    input
        .fields(FILE_METADATA, 0, &mut |input, id| {
            if id != 2 {
                return Ok(false);
            }
            let kind;
            (kind, elements) = input.list_header()?;
            if elements > 0 && kind != 12 {
                return Err("a schema that is not a list of elements".into());
            }
            for _ in 0..elements {
                input.fields(SCHEMA_ELEMENT, 1, &mut |input, id| {
                    if id != 5 {
                        return Ok(false);
                    }
                    // unsigned_abs: i64::MIN is a value a hostile footer can send.
                    most_children = most_children.max(input.zigzag()?.unsigned_abs());
                    Ok(true)
                })?;
            }
            Ok(true)
        })
        .map_err(|e| format!("footer: {e}"))?;
    if most_children > elements {
        return Err(format!(
            "footer: a schema element declares {most_children} children, but the schema has {elements} elements"
        ));
    }
    Ok(())
}
