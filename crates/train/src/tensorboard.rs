//! TensorBoard event files (TFRecord framing, hand-encoded `Event`/`Summary` protos) with scalar values.

use std::io::Write;
use std::path::{Path, PathBuf};

fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(tag: u8, data: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.0",
            now.as_secs(),
            host,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        let mut ev = Vec::new();
        ev.push(0x09);
        ev.extend_from_slice(&now.as_secs_f64().to_le_bytes());
        bytes_field(0x1a, b"brain.Event:2", &mut ev);
        w.record(&ev)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf)
    }

    /// Scalars sharing one step, in one event.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            bytes_field(0x0a, tag.as_bytes(), &mut value);
            value.push(0x15);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(0x0a, &value, &mut summary);
        }
        let mut ev = Vec::new();
        ev.push(0x09);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        ev.extend_from_slice(&now.as_secs_f64().to_le_bytes());
        ev.push(0x10);
        varint(step as u64, &mut ev);
        bytes_field(0x2a, &summary, &mut ev);
        self.record(&ev)?;
        self.file.flush()
    }
}

/// Reads back the scalars of an event file: (step, tag, value). Used by tests and reports.
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<(i64, String, f32)>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut pos = 0;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt event record");
    let read_varint = |d: &[u8], p: &mut usize| -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        while *p < d.len() {
            let b = d[*p];
            *p += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                break;
            }
            shift += 7;
        }
        v
    };
    while pos + 12 <= data.len() {
        let len = u64::from_le_bytes(data[pos..pos + 8].try_into().unwrap()) as usize;
        if masked_crc(&data[pos..pos + 8])
            != u32::from_le_bytes(data[pos + 8..pos + 12].try_into().unwrap())
        {
            return Err(bad());
        }
        let rec = data.get(pos + 12..pos + 12 + len).ok_or_else(bad)?;
        if masked_crc(rec)
            != u32::from_le_bytes(
                data.get(pos + 12 + len..pos + 16 + len)
                    .ok_or_else(bad)?
                    .try_into()
                    .unwrap(),
            )
        {
            return Err(bad());
        }
        pos += 16 + len;
        let (mut p, mut step) = (0usize, 0i64);
        while p < rec.len() {
            let tag = rec[p];
            p += 1;
            match tag {
                0x09 => p += 8,
                0x10 => step = read_varint(rec, &mut p) as i64,
                0x1a => {
                    let n = read_varint(rec, &mut p) as usize;
                    p += n;
                }
                0x2a => {
                    let n = read_varint(rec, &mut p) as usize;
                    let summary = &rec[p..p + n];
                    p += n;
                    let mut q = 0;
                    while q < summary.len() {
                        q += 1; // 0x0a
                        let vn = read_varint(summary, &mut q) as usize;
                        let value = &summary[q..q + vn];
                        q += vn;
                        let (mut r, mut name, mut val) = (0usize, String::new(), 0f32);
                        while r < value.len() {
                            let t = value[r];
                            r += 1;
                            match t {
                                0x0a => {
                                    let sn = read_varint(value, &mut r) as usize;
                                    name = String::from_utf8_lossy(&value[r..r + sn]).to_string();
                                    r += sn;
                                }
                                0x15 => {
                                    val = f32::from_le_bytes(value[r..r + 4].try_into().unwrap());
                                    r += 4;
                                }
                                _ => return Err(bad()),
                            }
                        }
                        out.push((step, name, val));
                    }
                }
                _ => return Err(bad()),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn write_and_read_back() {
        let dir = std::env::temp_dir().join(format!("pirclip-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(3, &[("train/total_loss", 1.5), ("train/lr", 0.001)])
            .unwrap();
        w.scalars(300, &[("train/total_loss", 0.5)]).unwrap();
        let got = read_scalars(&w.path).unwrap();
        assert_eq!(
            got,
            vec![
                (3, "train/total_loss".into(), 1.5),
                (3, "train/lr".into(), 0.001),
                (300, "train/total_loss".into(), 0.5)
            ]
        );
    }
}
