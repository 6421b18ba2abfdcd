//! The one safetensors header reader of the crate, shared by [`super::TensorFile`] (`fape op`)
//! and the weights loader ([`crate::pipeline::weights`]): it reads the 8-byte length and the JSON
//! header, and checks every tensor's claim against the file before any tensor data is read or
//! allocated.
//!
//! Checks, each a [`crate::FapeError::File`] naming the file (and the tensor, with what it claims):
//! the header length is at most [`MAX_HEADER_BYTES`] and inside the file; the header is a JSON
//! object of entries `{"dtype", "shape", "data_offsets": [start, end]}` (plus an optional
//! `__metadata__`); the dtype is one of safetensors' dtypes; `end - start` is exactly the
//! shape's elements times the dtype's size (computed without overflow); and `end` lies inside
//! the file. So a header that claims terabytes, or a tensor whose bytes run past the end, is an
//! error costing at most the header's own bytes.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;

use super::file_error;
use crate::error::Result;

/// The largest header read: 100 MiB, as the `safetensors` crate allows.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor of a header, checked against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    /// The tensor's name.
    pub name: String,
    /// The dtype as safetensors spells it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Extents, outermost first.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data: the shape's elements times the dtype's size.
    pub bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Bits per element of the safetensors dtype `name`.
fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F4" => 4,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Bytes as a person reads them (`4.0 TiB`).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Reads and checks the header of a safetensors file of `file_len` bytes from `reader`,
/// positioned at the file's start; `path` is what errors name. Entries come sorted by name.
///
/// # Errors
/// [`crate::FapeError::File`] naming `path` for each failed check of the module documentation, and
/// when the reader fails.
pub fn read_header(path: &str, reader: &mut impl Read, file_len: u64) -> Result<Vec<HeaderEntry>> {
    let mut len_bytes = [0u8; 8];
    reader
        .read_exact(&mut len_bytes)
        .map_err(|_| file_error(path, "not a safetensors file: shorter than 8 bytes (truncated?)"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = header_len.checked_add(8).filter(|&end| end <= file_len).ok_or_else(|| {
        file_error(
            path,
            format!(
                "not a safetensors file: header of {} claimed, but the file has {} (truncated?)",
                human_bytes(header_len),
                human_bytes(file_len)
            ),
        )
    })?;
    if header_len > MAX_HEADER_BYTES {
        return Err(file_error(
            path,
            format!(
                "not a safetensors file: header of {} claimed, over the {} limit",
                human_bytes(header_len),
                human_bytes(MAX_HEADER_BYTES)
            ),
        ));
    }
    // The header's length is checked against the file and the limit above, so this allocation
    // is bounded by bytes that exist.
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(|e| file_error(path, format!("cannot read the header: {e}")))?;
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| file_error(path, format!("not a safetensors file: bad header: {e}")))?;
    entries.remove("__metadata__");
    let data_len = file_len - data_start;
    entries.into_iter().map(|(name, value)| check_entry(path, name, value, data_start, data_len)).collect()
}

fn check_entry(
    path: &str,
    name: String,
    value: serde_json::Value,
    data_start: u64,
    data_len: u64,
) -> Result<HeaderEntry> {
    let raw: RawEntry = serde_json::from_value(value)
        .map_err(|e| file_error(path, format!("tensor `{name}`: bad header entry: {e}")))?;
    let bits = dtype_bits(&raw.dtype)
        .ok_or_else(|| file_error(path, format!("tensor `{name}` has unknown dtype `{}`", raw.dtype)))?;
    let [start, end] = raw.data_offsets;
    let elements = raw.shape.iter().try_fold(1u64, |a, &s| a.checked_mul(s));
    let needed = elements.and_then(|n| n.checked_mul(bits)).map(|b| b.div_ceil(8));
    let claim = match needed {
        Some(bytes) => format!("shape {:?} of {} claims {}", raw.shape, raw.dtype, human_bytes(bytes)),
        None => format!("shape {:?} of {} claims more than 2^64 bytes", raw.shape, raw.dtype),
    };
    if end < start || Some(end - start) != needed {
        return Err(file_error(path, format!("tensor `{name}`: {claim}, but its offsets [{start}, {end}) disagree")));
    }
    if end > data_len {
        return Err(file_error(
            path,
            format!(
                "tensor `{name}`: {claim} at [{start}, {end}), past the end of the file's {} of data (truncated?)",
                human_bytes(data_len)
            ),
        ));
    }
    let shape = raw
        .shape
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| file_error(path, format!("tensor `{name}`: {claim}, an extent past this machine's usize")))?;
    Ok(HeaderEntry { name, dtype: raw.dtype, shape, offset: data_start + start, bytes: end - start })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    fn read(bytes: &[u8]) -> Result<Vec<HeaderEntry>> {
        read_header("t.safetensors", &mut &bytes[..], bytes.len() as u64)
    }

    #[test]
    fn a_good_header_reads_and_bad_claims_are_named() {
        let good = file(r#"{"__metadata__":{"a":"b"},"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, 24);
        let entries = read(&good).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].shape.clone(), entries[0].bytes), (vec![2, 3], 24));
        assert_eq!(entries[0].offset, good.len() as u64 - 24);
        let cases = [
            (file(r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, 23), "past the end"),
            (file(r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, 24), "disagree"),
            (file(r#"{"x":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#, 8), "4.0 TiB"),
            (file(r#"{"x":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8), "2^64"),
            (file(r#"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#, 8), "unknown dtype"),
            (file(r#"{"x":[1,2]}"#, 0), "bad header entry"),
            (file("not json", 0), "bad header"),
            (vec![1, 2, 3], "shorter than 8 bytes"),
            ((1u64 << 40).to_le_bytes().to_vec(), "1.0 TiB claimed"),
        ];
        for (bytes, needle) in cases {
            let err = read(&bytes).unwrap_err().to_string();
            assert!(err.starts_with("t.safetensors: ") && err.contains(needle), "{needle}: {err}");
        }
    }
}
