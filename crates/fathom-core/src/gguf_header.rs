//! The GGUF header (version 2 and 3): metadata key/values and the tensor table, read from the
//! mapped bytes with every length and count checked against what is left of the file, so a
//! truncated or corrupt header is an error naming what was being read, never a panic or a huge
//! allocation. Read here rather than by candle because candle's reader refuses tensor types it
//! has no kernel for (iq4_nl, iq4_xs, …), which Fathom's runtime multiplies.
//!
//! Layout (ggml's `gguf.cpp`, taken as facts): magic `GGUF`, u32 version, u64 tensor count, u64
//! key/value count; each key/value: string key, u32 type, value; each tensor: string name, u32
//! n_dims, u64 ne[n_dims] (innermost first), u32 ggml type, u64 offset into the data section;
//! the data section starts at the next multiple of `general.alignment` (default 32).

use candle_core::quantized::gguf_file::Value;
use fathom_runtime::Format;
use std::collections::HashMap;

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    F32,
    F16,
    BF16,
    Block(Format),
}

impl StoredType {
    pub fn from_ggml_type(id: u32) -> Option<StoredType> {
        match id {
            0 => Some(StoredType::F32),
            1 => Some(StoredType::F16),
            30 => Some(StoredType::BF16),
            other => Format::from_ggml_type(other).map(StoredType::Block),
        }
    }

    pub fn ggml_type(self) -> u32 {
        match self {
            StoredType::F32 => 0,
            StoredType::F16 => 1,
            StoredType::BF16 => 30,
            StoredType::Block(f) => f.ggml_type(),
        }
    }

    /// (elements, bytes) per block; floats are blocks of one.
    pub fn block(self) -> (usize, usize) {
        match self {
            StoredType::F32 => (1, 4),
            StoredType::F16 | StoredType::BF16 => (1, 2),
            StoredType::Block(f) => (f.block_elems(), f.block_bytes()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoredType::F32 => "f32",
            StoredType::F16 => "f16",
            StoredType::BF16 => "bf16",
            StoredType::Block(f) => f.name(),
        }
    }
}

impl std::fmt::Display for StoredType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub ty: StoredType,
    /// Row-major (outermost first: ggml's `ne` reversed).
    pub dims: Vec<usize>,
    /// Offset into the data section.
    pub offset: u64,
}

#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorEntry>,
    /// File offset of the data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() - self.at < n {
            return Err(format!(
                "{what}: needs {n} bytes at offset {}, the file has {} (truncated)",
                self.at,
                self.bytes.len()
            ));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A count of items each at least `min_bytes` long: bounded by the bytes left.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(format!(
                "{what}: count {n} cannot fit in the {left} bytes left"
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(format!("{what}: arrays nested too deep"));
                }
                let inner = self.u32(what)?;
                let n = self.count(1, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

/// Parse the header of a GGUF file's bytes; the error says what was being read.
pub fn read_header(bytes: &[u8]) -> Result<Header, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4, "magic")? != b"GGUF" {
        return Err("not a GGUF file (magic is not `GGUF`)".into());
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let n_tensors = r.count(24, "tensor count")?;
    let n_kv = r.count(12, "metadata count")?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r.u32(&format!("type of `{key}`"))?;
        let v = r.value(ty, &format!("metadata `{key}`"), 0)?;
        metadata.insert(key, v);
    }
    let mut tensors = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor name {i}"))?;
        let what = format!("tensor `{name}`");
        let n_dims = r.u32(&what)? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("{what}: {n_dims} dimensions (1 to 4 allowed)"));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = r.u64(&what)?;
            if d == 0 || d > (1 << 40) {
                return Err(format!("{what}: dimension {d} out of range"));
            }
            ne.push(d as usize);
        }
        let id = r.u32(&what)?;
        let ty = StoredType::from_ggml_type(id).ok_or_else(|| {
            format!(
                "{what}: ggml type {id} is not supported (supported: f32, f16, bf16, {})",
                Format::ALL.map(|f| f.name()).join(", ")
            )
        })?;
        let offset = r.u64(&what)?;
        ne.reverse();
        if tensors
            .insert(
                name.clone(),
                TensorEntry {
                    ty,
                    dims: ne,
                    offset,
                },
            )
            .is_some()
        {
            return Err(format!("{what}: listed twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
        Some(v) => return Err(format!("general.alignment: {v:?} is not a power of two")),
    };
    let data_offset = r.at.div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        data_offset: data_offset as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn tiny_file() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kv
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        string(&mut b, "xs");
        b.extend(9u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        b.extend(9u32.to_le_bytes());
        string(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(256u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(23u32.to_le_bytes()); // iq4_xs
        b.extend(0u64.to_le_bytes());
        b
    }

    #[test]
    fn reads_types_candle_does_not_know() {
        let h = read_header(&tiny_file()).unwrap();
        let t = &h.tensors["w"];
        assert_eq!(t.ty, StoredType::Block(Format::IQ4XS));
        assert_eq!(t.dims, vec![3, 256]);
        assert_eq!(h.data_offset % 32, 0);
        assert!(matches!(&h.metadata["xs"], Value::Array(v) if v.len() == 2));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = tiny_file();
        for n in 0..full.len() {
            assert!(
                read_header(&full[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        let mut huge = full.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_header(&huge).unwrap_err().contains("tensor count"));
        let mut bad_type = full.clone();
        let at = bad_type.len() - 12;
        bad_type[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(read_header(&bad_type).unwrap_err().contains("ggml type 99"));
    }
}
