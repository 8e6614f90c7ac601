//! Writing RDB files from [`Entry`]s.

use std::io::{BufWriter, Write};

use crate::{op, Entry, Error, Header, CRC64};

/// Writes an RDB file: header and AUX fields, then entries, then the EOF opcode and CRC64.
pub struct Writer<W: Write> {
    out: BufWriter<W>,
    digest: crc::Digest<'static, u64>,
    db: Option<u32>,
    checksum: bool,
    scratch: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Writes the header and the given AUX fields (e.g. `redis-ver`, `ctime`) to `w`.
    ///
    /// The header must be one the [`Reader`](crate::Reader) accepts (`REDIS0001`..`REDIS0012`,
    /// `VALKEY080`, `VALKEY081`); entries are written as given, so their value types must be
    /// valid for that version.
    pub fn new(w: W, header: &Header, aux: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, Error> {
        let (_, version) = header.check()?;
        let mut this = Writer {
            out: BufWriter::with_capacity(64 * 1024, w),
            digest: CRC64.digest(),
            db: None,
            checksum: version >= 5,
            scratch: Vec::with_capacity(64),
        };
        this.put(&header.magic)?;
        for (k, v) in aux {
            let mut buf = vec![op::AUX];
            push_string(&mut buf, k);
            push_string(&mut buf, v);
            this.put(&buf)?;
        }
        Ok(this)
    }

    /// Writes one key: SELECTDB when `e.db` differs from the previous entry's, then
    /// EXPIRETIME_MS / IDLE / FREQ when set, then the type byte, the key and the value bytes.
    pub fn entry(&mut self, e: &Entry) -> Result<(), Error> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        if self.db != Some(e.db) {
            buf.push(op::SELECTDB);
            op::encode_len(&mut buf, u64::from(e.db));
            self.db = Some(e.db);
        }
        if let Some(ms) = e.expire_ms {
            buf.push(op::EXPIRETIME_MS);
            buf.extend_from_slice(&ms.to_le_bytes());
        }
        if let Some(idle) = e.idle {
            buf.push(op::IDLE);
            op::encode_len(&mut buf, idle);
        }
        if let Some(freq) = e.freq {
            buf.push(op::FREQ);
            buf.push(freq);
        }
        buf.push(e.value_type);
        push_string(&mut buf, &e.key);
        let r = self.put(&buf).and_then(|()| self.put(&e.value));
        self.scratch = buf;
        r
    }

    /// Writes the EOF opcode and the CRC64 (little-endian), flushes, and returns the inner
    /// writer.
    pub fn finish(mut self) -> Result<W, Error> {
        self.put(&[op::EOF])?;
        if self.checksum {
            let crc = self.digest.finalize();
            self.out.write_all(&crc.to_le_bytes())?;
        }
        self.out.into_inner().map_err(|e| Error::Io(e.into_error()))
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.digest.update(bytes);
        self.out.write_all(bytes)?;
        Ok(())
    }
}

/// Appends `s` as a plain (length-prefixed, not int- or LZF-encoded) RDB string.
fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    op::encode_len(out, s.len() as u64);
    out.extend_from_slice(s);
}
