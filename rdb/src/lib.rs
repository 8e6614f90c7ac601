//! Streaming reader and writer of Valkey (and Redis 7.x) RDB files.
//!
//! The [`Reader`] walks an RDB file key by key and hands out each key's [`Entry`]: its database,
//! decoded key, expiry and LRU/LFU hints, and the object's serialized value bytes exactly as they
//! are in the file (the value is not decoded; it is parsed only far enough to know where it
//! ends). The [`Writer`] writes such entries back out as a valid RDB file, so a caller can
//! filter keys or renumber databases without understanding the value encodings, and
//! [`dump_payload`] turns an entry into a `DUMP`-style payload for `RESTORE`.
//!
//! The API is synchronous (`std::io::Read` / `Write`); async callers run it in
//! `spawn_blocking`.
//!
//! Formats read: `REDIS0001`..`REDIS0012` (Redis up to 7.4, Valkey 7.x/8.x) and `VALKEY080`,
//! `VALKEY081` (Valkey 9.x). Function libraries, module AUX data, RESIZEDB and slot hints are
//! skipped; AUX fields are recorded.

mod reader;
mod writer;

use std::io;

pub use reader::Reader;
pub use writer::Writer;

/// The largest string (key, value element, AUX field) the reader accepts: 512 MiB, Valkey's
/// default `proto-max-bulk-len`. A longer length is treated as corruption, never allocated.
pub const MAX_STRING_LEN: u64 = 512 * 1024 * 1024;

/// The largest element count (list length, set size, stream entries, ...) the reader accepts.
pub const MAX_ELEMENT_COUNT: u64 = u32::MAX as u64;

/// The CRC-64 variant RDB files and DUMP payloads use (Jones polynomial, reflected).
pub(crate) static CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_REDIS);

/// The 9-byte header of an RDB file: the magic string with its version number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// The header as read, e.g. `b"REDIS0011"` or `b"VALKEY080"`.
    pub magic: [u8; 9],
}

/// Which family of RDB formats a header belongs to (type bytes 22+ mean different things).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    Redis,
    Valkey,
}

impl Header {
    /// The header Valkey 9.0/9.1 writes: `VALKEY080`.
    pub const VALKEY_80: Header = Header { magic: *b"VALKEY080" };
    /// The header Redis 7.2 and Valkey 7.2/8.x write: `REDIS0011`.
    pub const REDIS_11: Header = Header { magic: *b"REDIS0011" };

    /// The RDB version number in the header (`11` for `REDIS0011`, `80` for `VALKEY080`), or 0
    /// when the magic is not a recognised RDB header.
    pub fn version(&self) -> u32 {
        self.parse().map(|(_, v)| v).unwrap_or(0)
    }

    /// The format family and version, if the magic is a well-formed `REDIS`/`VALKEY` header.
    pub(crate) fn parse(&self) -> Option<(Flavor, u32)> {
        let (flavor, digits) = if let Some(d) = self.magic.strip_prefix(b"REDIS") {
            (Flavor::Redis, d)
        } else if let Some(d) = self.magic.strip_prefix(b"VALKEY") {
            (Flavor::Valkey, d)
        } else {
            return None;
        };
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = digits.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        Some((flavor, v))
    }

    /// Checks the header is one this crate reads and writes, returning its flavor and version.
    pub(crate) fn check(&self) -> Result<(Flavor, u32), Error> {
        let (flavor, v) = self.parse().ok_or(Error::NotRdb)?;
        let ok = match flavor {
            Flavor::Redis => (1..=12).contains(&v),
            Flavor::Valkey => (80..=81).contains(&v),
        };
        if ok {
            Ok((flavor, v))
        } else {
            Err(Error::UnsupportedVersion(v))
        }
    }
}

/// One key of an RDB file, with its value left in serialized form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The database number (the SELECTDB in force when the key was read).
    pub db: u32,
    /// The key's bytes, decoded (int- and LZF-encoded keys are expanded).
    pub key: Vec<u8>,
    /// Absolute expiry in unix milliseconds (EXPIRETIME_MS, or EXPIRETIME seconds × 1000).
    pub expire_ms: Option<i64>,
    /// LRU idle time in seconds (the IDLE opcode), if present.
    pub idle: Option<u64>,
    /// LFU frequency (the FREQ opcode), if present.
    pub freq: Option<u8>,
    /// The RDB object type byte (e.g. 0 string, 18 quicklist, 21 stream, 22 Valkey hash with
    /// field TTLs).
    pub value_type: u8,
    /// The object's serialized bytes exactly as in the file, after the key (not decoded).
    pub value: Vec<u8>,
}

/// What can go wrong reading or writing an RDB file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error other than an unexpected end of input.
    #[error("I/O error on the RDB file: {0}")]
    Io(io::Error),
    /// The input does not start with a `REDIS`/`VALKEY` RDB header.
    #[error("not an RDB file")]
    NotRdb,
    /// The header is an RDB header of a version this crate cannot read.
    #[error("unsupported RDB version {0}")]
    UnsupportedVersion(u32),
    /// The input ended in the middle of the file.
    #[error("the RDB file is truncated")]
    Truncated,
    /// The file's structure is invalid (the message says where).
    #[error("the RDB file is corrupt: {0}")]
    Corrupt(String),
    /// The CRC64 at the end of the file does not match its contents.
    #[error("RDB checksum mismatch: the file is corrupt")]
    Checksum,
    /// An object type or opcode this crate does not know how to skip.
    #[error("unsupported RDB object type or opcode {0}")]
    UnknownType(u8),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Io(e)
        }
    }
}

/// A DUMP payload for RESTORE: type byte + value bytes + 2-byte RDB version (LE) + CRC64 (LE)
/// of all before.
pub fn dump_payload(e: &Entry, rdb_version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(e.value.len() + 11);
    out.push(e.value_type);
    out.extend_from_slice(&e.value);
    out.extend_from_slice(&rdb_version.to_le_bytes());
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// RDB opcodes and the encodings shared by reader and writer.
pub(crate) mod op {
    pub const SLOT_IMPORT: u8 = 243;
    pub const SLOT_INFO: u8 = 244;
    pub const FUNCTION2: u8 = 245;
    pub const FUNCTION_PRE_GA: u8 = 246;
    pub const MODULE_AUX: u8 = 247;
    pub const IDLE: u8 = 248;
    pub const FREQ: u8 = 249;
    pub const AUX: u8 = 250;
    pub const RESIZEDB: u8 = 251;
    pub const EXPIRETIME_MS: u8 = 252;
    pub const EXPIRETIME: u8 = 253;
    pub const SELECTDB: u8 = 254;
    pub const EOF: u8 = 255;

    /// Appends an RDB length encoding of `len` to `out`.
    pub fn encode_len(out: &mut Vec<u8>, len: u64) {
        if len < 1 << 6 {
            out.push(len as u8);
        } else if len < 1 << 14 {
            out.push(0x40 | (len >> 8) as u8);
            out.push(len as u8);
        } else if len <= u64::from(u32::MAX) {
            out.push(0x80);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        } else {
            out.push(0x81);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_versions() {
        assert_eq!(Header::VALKEY_80.version(), 80);
        assert_eq!(Header::REDIS_11.version(), 11);
        assert_eq!(Header { magic: *b"REDIS0012" }.check().unwrap().1, 12);
        assert!(matches!(Header { magic: *b"REDIS0013" }.check(), Err(Error::UnsupportedVersion(13))));
        assert!(matches!(Header { magic: *b"VALKEY011" }.check(), Err(Error::UnsupportedVersion(11))));
        assert!(matches!(Header { magic: *b"hello wor" }.check(), Err(Error::NotRdb)));
        assert_eq!(Header { magic: *b"REDIS00x1" }.version(), 0);
    }

    #[test]
    fn length_encoding() {
        let mut v = Vec::new();
        op::encode_len(&mut v, 5);
        op::encode_len(&mut v, 300);
        op::encode_len(&mut v, 70_000);
        op::encode_len(&mut v, 1 << 40);
        assert_eq!(v[0], 5);
        assert_eq!(&v[1..3], &[0x41, 0x2c]);
        assert_eq!(&v[3..8], &[0x80, 0, 1, 0x11, 0x70]);
        assert_eq!(v[8], 0x81);
    }

    #[test]
    fn dump_payload_layout() {
        let e = Entry {
            db: 0,
            key: b"k".to_vec(),
            expire_ms: None,
            idle: None,
            freq: None,
            value_type: 0,
            value: vec![0xc0, 7],
        };
        let p = dump_payload(&e, 80);
        assert_eq!(&p[..5], &[0, 0xc0, 7, 80, 0]);
        assert_eq!(p.len(), 13);
        assert_eq!(u64::from_le_bytes(p[5..].try_into().unwrap()), CRC64.checksum(&p[..5]));
    }
}
