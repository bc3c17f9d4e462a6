//! GGUF v2/v3 reader (memory-mapped) and a small writer.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, metadata
//! key/values, tensor infos (name, dims with ne0 fastest, type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. A tensor with dims [ne0, ne1] is
//! ne1 rows of ne0 elements: for a linear layer that is [out, in] row-major, as in PyTorch.
//! Every read is bounds-checked and turned into `Error::GgufFormat` with the byte offset.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use crate::quant::{dequantize_row, GgmlType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7 (one byte; any non-zero byte reads as true).
    Bool(bool),
    /// GGUF type 8: u64 length, then UTF-8 bytes.
    String(String),
    /// GGUF type 9: element type, u64 length, then the elements (all of one type; the reader
    /// accepts nesting up to three levels).
    Array(Vec<Value>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl Value {
    /// The value as u64 if it is an unsigned integer or a non-negative signed one; None for
    /// negative integers, floats, bools, strings and arrays.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as f64 if it is a float or an integer that [`Value::as_u64`] accepts.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn type_name(&self) -> &'static str {
        [
            "U8", "I8", "U16", "I16", "U32", "I32", "F32", "Bool", "String", "Array", "U64", "I64",
            "F64",
        ][self.type_id() as usize]
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml order: `dims[0]` is the fastest-varying (row length).
    pub dims: Vec<usize>,
    /// Element format of the data.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Size of the data in bytes (a whole number of `ty` blocks).
    pub n_bytes: usize,
}

impl TensorInfo {
    /// (rows, row length) viewing the tensor as a matrix; a vector is one row.
    pub fn matrix_shape(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1);
        // no `max(1)`: a zero dimension is zero rows (a vector already has one row), so a
        // zero-size tensor fails shape checks instead of reading a row it does not have
        let rows = self.dims.iter().skip(1).product::<usize>();
        (rows, cols)
    }
    /// Shape in PyTorch order (slowest first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A memory-mapped GGUF file. Tensor data stays in the page cache; dequantisation reads
/// straight from the mapping, so loading never holds two full copies of the weights.
pub struct GgufFile {
    /// The path the file was opened from.
    pub path: PathBuf,
    /// GGUF version of the file: 2 or 3.
    pub version: u32,
    /// Every metadata key/value (a key repeated in the file keeps its last value).
    pub metadata: BTreeMap<String, Value>,
    /// The tensor table by name, each entry checked to lie inside the file.
    pub tensors: BTreeMap<String, TensorInfo>,
    map: memmap2::Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> Error {
        Error::GgufFormat {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated: wanted {n} more bytes")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count that must be plausible: each element needs at least `min_elem_bytes`.
    fn count(&mut self, min_elem_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elem_bytes as u64) > left {
            return Err(self.err(format!("{what} count {n} exceeds the file size")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.count(1, "array length")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Map and parse a GGUF v2/v3 file: header, metadata and tensor table. The tensor data is
    /// not read, only checked to lie inside the file at aligned offsets. Errors: `Io`,
    /// `GgufFormat` (with the byte offset) for anything malformed or truncated, and
    /// `UnsupportedQuant` for a tensor type outside [`GgmlType`].
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only and we never write through the map; a
        // concurrent truncation by another process is outside what a reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path: &path,
        };
        if c.take(4)
            .map_err(|_| c.err("file shorter than the GGUF magic"))?
            != MAGIC
        {
            return Err(Error::GgufFormat {
                path: path.clone(),
                offset: 0,
                what: "bad magic: not a GGUF file".into(),
            });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!(
                "unsupported GGUF version {version} (2 or 3 expected)"
            )));
        }
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| c.err("general.alignment is not a power of two"))?,
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("tensor '{name}' has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                let d = c.u64()?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| c.err(format!("tensor '{name}' dimension {d} overflows")))?,
                );
            }
            let tid = c.u32()?;
            let off = c.u64()?;
            raw.push((name, dims, tid, off));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, tid, off) in raw {
            let ty = GgmlType::from_id(tid).map_err(|n| Error::UnsupportedQuant {
                tensor: name.clone(),
                ggml_type: tid,
                name: n,
            })?;
            let numel = dims
                .iter()
                .try_fold(1usize, |a, d| a.checked_mul(*d))
                .ok_or_else(|| c.err(format!("tensor '{name}' size overflows")))?;
            if numel % ty.block_elems() != 0 {
                return Err(c.err(format!(
                    "tensor '{name}' has {numel} elements, not a multiple of the {ty:?} block"
                )));
            }
            let n_bytes = ty
                .row_bytes(numel)
                .ok_or_else(|| c.err(format!("tensor '{name}' size in bytes overflows")))?;
            if dims[0] % ty.block_elems() != 0 {
                return Err(c.err(format!("tensor '{name}' rows are not whole {ty:?} blocks")));
            }
            if off % alignment != 0 {
                return Err(c.err(format!("tensor '{name}' offset {off} is not aligned")));
            }
            let offset = data_start.checked_add(off);
            let end = offset.and_then(|o| o.checked_add(u64::try_from(n_bytes).ok()?));
            let (Some(offset), Some(end)) = (offset, end) else {
                return Err(c.err(format!(
                    "tensor '{name}' offset {off} plus its {n_bytes} bytes overflows a file offset"
                )));
            };
            if end > map.len() as u64 {
                return Err(Error::GgufFormat {
                    path: path.clone(),
                    offset,
                    what: format!(
                        "tensor '{name}' data ({n_bytes} bytes) runs past the end of the file ({} bytes): truncated?",
                        map.len()
                    ),
                });
            }
            let info = TensorInfo {
                name: name.clone(),
                dims,
                ty,
                offset: offset as usize,
                n_bytes,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(c.err(format!("duplicate tensor '{name}'")));
            }
        }
        Ok(GgufFile {
            path,
            version,
            metadata,
            tensors,
            map,
        })
    }

    /// The metadata value of `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingMetadata {
            path: self.path.clone(),
            key: key.into(),
        }
    }
    /// `key` as u64 (see [`Value::as_u64`]); `MissingMetadata` when absent or not such a
    /// value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.missing(key))
    }
    /// `key` as f64 (see [`Value::as_f64`]); `MissingMetadata` when absent or not a number.
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.missing(key))
    }
    /// `key` as a string; `MissingMetadata` when absent or not a string.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.missing(key))
    }
    /// `key` as an array of strings; `MissingMetadata` when absent, not an array, or holding
    /// anything but strings.
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .meta(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.missing(key))?;
        arr.iter()
            .map(|v| v.as_str().ok_or_else(|| self.missing(key)))
            .collect()
    }

    /// The tensor table entry of `name`; `MissingTensor` when there is none.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.into()))
    }

    /// Raw bytes of a tensor, straight from the mapping.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset..t.offset + t.n_bytes]
    }

    /// Dequantise row `r` of a tensor viewed as a matrix into `out` (row length).
    pub fn dequantize_row(&self, t: &TensorInfo, r: usize, out: &mut [f32]) {
        let (rows, cols) = t.matrix_shape();
        assert!(r < rows && out.len() == cols, "row {r} of {}", t.name);
        let rb = t.ty.row_bytes(cols).expect("validated at open");
        let bytes = &self.tensor_bytes(t)[r * rb..(r + 1) * rb];
        dequantize_row(t.ty, bytes, out);
    }
}

/// Writes GGUF v3 files: used by tests to build small models and corrupt variants, and by
/// anyone who wants to export a distilled model.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append a metadata key/value (written in the order added). An array's elements must all
    /// be of one type, written as the array's element type (U32 if empty): `to_bytes` refuses
    /// an array that mixes types.
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.into(), v));
        self
    }
    /// `dims` in ggml order (row length first). `data` must already be in format `ty`.
    pub fn tensor(&mut self, name: &str, dims: &[usize], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensor_raw(name, dims, ty.id(), data)
    }
    /// Like `tensor`, with a raw ggml type id (tests use it to write unsupported types).
    pub fn tensor_raw(
        &mut self,
        name: &str,
        dims: &[usize],
        type_id: u32,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.into(), dims.to_vec(), type_id, data));
        self
    }
    /// The whole file: GGUF v3 header, metadata and tensor table in the order added, then each
    /// tensor's data padded to the default alignment of 32 bytes. `InvalidArgument` for a
    /// metadata array whose elements are not all of one type (GGUF cannot store it).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        }
        fn put_val(b: &mut Vec<u8>, v: &Value, key: &str) -> Result<()> {
            match v {
                Value::U8(x) => b.push(*x),
                Value::I8(x) => b.push(*x as u8),
                Value::U16(x) => b.extend(x.to_le_bytes()),
                Value::I16(x) => b.extend(x.to_le_bytes()),
                Value::U32(x) => b.extend(x.to_le_bytes()),
                Value::I32(x) => b.extend(x.to_le_bytes()),
                Value::F32(x) => b.extend(x.to_le_bytes()),
                Value::Bool(x) => b.push(*x as u8),
                Value::String(s) => put_str(b, s),
                Value::Array(a) => {
                    let ety = a.first().map(Value::type_id).unwrap_or(4);
                    if let Some(i) = a.iter().position(|e| e.type_id() != ety) {
                        return Err(Error::InvalidArgument(format!(
                            "GGUF metadata '{key}': array element {i} is {}, element 0 is {}; an array holds one type",
                            a[i].type_name(),
                            a[0].type_name()
                        )));
                    }
                    b.extend(ety.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for e in a {
                        put_val(b, e, key)?;
                    }
                }
                Value::U64(x) => b.extend(x.to_le_bytes()),
                Value::I64(x) => b.extend(x.to_le_bytes()),
                Value::F64(x) => b.extend(x.to_le_bytes()),
            }
            Ok(())
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend(v.type_id().to_le_bytes());
            put_val(&mut b, v, k)?;
        }
        let mut off = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| b.extend((*d as u64).to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend((off as u64).to_le_bytes());
            off += data.len().div_ceil(align) * align;
        }
        b.resize(b.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend(data);
            b.resize(b.len().div_ceil(align) * align, 0);
        }
        Ok(b)
    }
    /// Write [`GgufWriter::to_bytes`] to `path` (plainly, not atomically); its error, or `Io`
    /// on failure.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        std::fs::write(path.as_ref(), self.to_bytes()?).map_err(|e| Error::io(path.as_ref(), e))
    }
}
