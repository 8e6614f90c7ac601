//! Reading RDB files entry by entry.

use std::io::{BufReader, Read};

use crate::{op, Entry, Error, Flavor, Header, CRC64, MAX_ELEMENT_COUNT, MAX_STRING_LEN};

/// Bytes copied per step when skipping or collecting a long string.
const CHUNK: usize = 64 * 1024;

/// The byte source: counts what was consumed, feeds the CRC64, and, while a value is being
/// parsed, records the raw bytes it hands out.
struct Src<R: Read> {
    inner: BufReader<R>,
    digest: crc::Digest<'static, u64>,
    pos: u64,
    rec: Option<Vec<u8>>,
}

/// An RDB length, or the special string encoding that takes its place.
enum Len {
    Plain(u64),
    Encoded(u8),
}

impl<R: Read> Src<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.inner.read_exact(buf)?;
        self.digest.update(buf);
        self.pos += buf.len() as u64;
        if let Some(rec) = &mut self.rec {
            rec.extend_from_slice(buf);
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }

    /// Consumes `n` bytes (recorded if recording), without holding them all in memory.
    fn skip(&mut self, mut n: u64) -> Result<(), Error> {
        let mut buf = [0u8; 4096];
        while n > 0 {
            let step = n.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..step])?;
            n -= step as u64;
        }
        Ok(())
    }

    /// Reads `n` bytes into a vector that grows as data arrives (a lying length on a truncated
    /// file fails with `Truncated` before it allocates much).
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(n.min(CHUNK as u64) as usize);
        let mut left = n;
        while left > 0 {
            let step = left.min(CHUNK as u64) as usize;
            let start = out.len();
            out.resize(start + step, 0);
            self.read_exact(&mut out[start..])?;
            left -= step as u64;
        }
        Ok(out)
    }

    fn len_or_encoding(&mut self) -> Result<Len, Error> {
        let first = self.u8()?;
        Ok(match first >> 6 {
            0 => Len::Plain(u64::from(first & 0x3f)),
            1 => Len::Plain((u64::from(first & 0x3f) << 8) | u64::from(self.u8()?)),
            3 => Len::Encoded(first & 0x3f),
            _ => match first {
                0x80 => Len::Plain(u64::from(u32::from_be_bytes(self.array()?))),
                0x81 => Len::Plain(u64::from_be_bytes(self.array()?)),
                _ => return Err(corrupt(format!("unknown length encoding 0x{first:02x}"))),
            },
        })
    }

    /// A plain length (an encoded-string marker here is corruption).
    fn len(&mut self) -> Result<u64, Error> {
        match self.len_or_encoding()? {
            Len::Plain(n) => Ok(n),
            Len::Encoded(e) => Err(corrupt(format!("string encoding {e} where a length was expected"))),
        }
    }

    /// A length that counts elements to be read one by one.
    fn count(&mut self, what: &str) -> Result<u64, Error> {
        let n = self.len()?;
        if n > MAX_ELEMENT_COUNT {
            return Err(corrupt(format!("{what} count {n} is beyond any sane size")));
        }
        Ok(n)
    }

    fn string_len(&mut self, n: u64) -> Result<u64, Error> {
        if n > MAX_STRING_LEN {
            return Err(corrupt(format!("string length {n} exceeds 512 MiB")));
        }
        Ok(n)
    }

    /// Reads a string and decodes it (integer encodings become decimal text, LZF is expanded).
    fn string(&mut self) -> Result<Vec<u8>, Error> {
        match self.len_or_encoding()? {
            Len::Plain(n) => {
                let n = self.string_len(n)?;
                self.bytes(n)
            }
            Len::Encoded(0) => Ok((self.array::<1>()?[0] as i8).to_string().into_bytes()),
            Len::Encoded(1) => Ok(i16::from_le_bytes(self.array()?).to_string().into_bytes()),
            Len::Encoded(2) => Ok(i32::from_le_bytes(self.array()?).to_string().into_bytes()),
            Len::Encoded(3) => {
                let clen = self.len()?;
                let clen = self.string_len(clen)?;
                let ulen = self.len()?;
                let ulen = self.string_len(ulen)?;
                let data = self.bytes(clen)?;
                lzf_decompress(&data, ulen as usize)
            }
            Len::Encoded(e) => Err(corrupt(format!("unknown string encoding {e}"))),
        }
    }

    /// Consumes a string without decoding it.
    fn skip_string(&mut self) -> Result<(), Error> {
        match self.len_or_encoding()? {
            Len::Plain(n) => {
                let n = self.string_len(n)?;
                self.skip(n)
            }
            Len::Encoded(0) => self.skip(1),
            Len::Encoded(1) => self.skip(2),
            Len::Encoded(2) => self.skip(4),
            Len::Encoded(3) => {
                let clen = self.len()?;
                let clen = self.string_len(clen)?;
                let ulen = self.len()?;
                self.string_len(ulen)?;
                self.skip(clen)
            }
            Len::Encoded(e) => Err(corrupt(format!("unknown string encoding {e}"))),
        }
    }

    /// Consumes a double in the old text form (RDB_TYPE_ZSET): a length byte, with 253..=255
    /// meaning NaN / +inf / -inf and no bytes following.
    fn skip_text_double(&mut self) -> Result<(), Error> {
        let n = self.u8()?;
        if n < 253 {
            self.skip(u64::from(n))?;
        }
        Ok(())
    }

    /// Consumes module data framed by module opcodes, up to and including its EOF opcode.
    fn skip_module_values(&mut self) -> Result<(), Error> {
        loop {
            match self.len()? {
                0 => return Ok(()),
                1 | 2 => {
                    self.len()?;
                }
                3 => self.skip(4)?,
                4 => self.skip(8)?,
                5 => self.skip_string()?,
                other => return Err(corrupt(format!("unknown module value opcode {other}"))),
            }
        }
    }

    /// Consumes a stream object of type 15, 19 or 21.
    fn skip_stream(&mut self, t: u8) -> Result<(), Error> {
        for _ in 0..self.count("stream listpack")? {
            self.skip_string()?; // the node key: a 128-bit master entry ID
            self.skip_string()?; // the listpack
        }
        self.len()?; // number of entries
        self.len()?; // last ID, milliseconds
        self.len()?; // last ID, sequence
        if t >= 19 {
            // first ID, max deleted entry ID, entries added
            for _ in 0..5 {
                self.len()?;
            }
        }
        for _ in 0..self.count("stream consumer group")? {
            self.skip_string()?; // group name
            self.len()?; // last delivered ID
            self.len()?;
            if t >= 19 {
                self.len()?; // entries read
            }
            for _ in 0..self.count("stream pending entry")? {
                self.skip(16 + 8)?; // raw ID, delivery time
                self.len()?; // delivery count
            }
            for _ in 0..self.count("stream consumer")? {
                self.skip_string()?; // consumer name
                self.skip(8)?; // seen time
                if t >= 21 {
                    self.skip(8)?; // active time
                }
                let pel = self.count("stream consumer pending entry")?;
                self.skip(pel * 16)?;
            }
        }
        Ok(())
    }

    /// Consumes the value of an object of RDB type `t`.
    fn skip_value(&mut self, t: u8, flavor: Flavor) -> Result<(), Error> {
        match (t, flavor) {
            (0, _) => self.skip_string()?,
            // list, set (linked list / hash table): strings
            (1 | 2, _) => {
                for _ in 0..self.count("element")? {
                    self.skip_string()?;
                }
            }
            // sorted set with scores as text
            (3, _) => {
                for _ in 0..self.count("sorted set member")? {
                    self.skip_string()?;
                    self.skip_text_double()?;
                }
            }
            // hash table hash
            (4, _) => {
                for _ in 0..self.count("hash field")? {
                    self.skip_string()?;
                    self.skip_string()?;
                }
            }
            // sorted set with binary scores
            (5, _) => {
                for _ in 0..self.count("sorted set member")? {
                    self.skip_string()?;
                    self.skip(8)?;
                }
            }
            // module value: 64-bit module id, then opcode-framed values
            (7, _) => {
                self.len()?;
                self.skip_module_values()?;
            }
            // single blobs: zipmap, ziplist, intset, zset ziplist, hash ziplist, hash listpack,
            // zset listpack, set listpack
            (9..=13 | 16 | 17 | 20, _) => self.skip_string()?,
            // quicklist of ziplists
            (14, _) => {
                for _ in 0..self.count("quicklist node")? {
                    self.skip_string()?;
                }
            }
            (15 | 19 | 21, _) => self.skip_stream(t)?,
            // quicklist 2: container kind, then the node
            (18, _) => {
                for _ in 0..self.count("quicklist node")? {
                    self.len()?;
                    self.skip_string()?;
                }
            }
            // Valkey 9 hash with field expiration: field, value, expiry ms (-1 = none)
            (22, Flavor::Valkey) => {
                for _ in 0..self.count("hash field")? {
                    self.skip_string()?;
                    self.skip_string()?;
                    self.skip(8)?;
                }
            }
            // Redis 7.4 hash with field expiration (22 pre-GA, 24 with a min-expire prefix):
            // TTL as a length, field, value
            (22 | 24, Flavor::Redis) => {
                if t == 24 {
                    self.skip(8)?;
                }
                for _ in 0..self.count("hash field")? {
                    self.len()?;
                    self.skip_string()?;
                    self.skip_string()?;
                }
            }
            // Redis 7.4 listpack hash with field expiration (25 with a min-expire prefix)
            (23 | 25, Flavor::Redis) => {
                if t == 25 {
                    self.skip(8)?;
                }
                self.skip_string()?;
            }
            _ => return Err(Error::UnknownType(t)),
        }
        Ok(())
    }
}

fn corrupt(msg: String) -> Error {
    Error::Corrupt(msg)
}

/// Expands LZF-compressed `input` to exactly `ulen` bytes.
fn lzf_decompress(input: &[u8], ulen: usize) -> Result<Vec<u8>, Error> {
    let bad = || corrupt("invalid LZF-compressed string".to_string());
    // LZF expands at most ~90x; a larger claim is corruption, not something to allocate.
    if ulen > input.len().saturating_mul(100) + 64 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(ulen);
    let mut i = 0;
    while i < input.len() {
        let ctrl = usize::from(input[i]);
        i += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            let lit = input.get(i..i + run).ok_or_else(bad)?;
            if out.len() + run > ulen {
                return Err(bad());
            }
            out.extend_from_slice(lit);
            i += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(i).ok_or_else(bad)?);
                i += 1;
            }
            len += 2;
            let back = ((ctrl & 0x1f) << 8) + usize::from(*input.get(i).ok_or_else(bad)?) + 1;
            i += 1;
            if back > out.len() || out.len() + len > ulen {
                return Err(bad());
            }
            let start = out.len() - back;
            for k in 0..len {
                let b = out[start + k];
                out.push(b);
            }
        }
    }
    if out.len() != ulen {
        return Err(bad());
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Done,
    Failed,
}

/// Reads an RDB file one key at a time.
///
/// Skipped (not returned): AUX fields (recorded, see [`Reader::aux`]), RESIZEDB, slot info and
/// slot import state, module AUX data, and function libraries.
pub struct Reader<R: Read> {
    src: Src<R>,
    header: Header,
    flavor: Flavor,
    version: u32,
    aux: Vec<(Vec<u8>, Vec<u8>)>,
    db: u32,
    state: State,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the 9-byte header (`NotRdb` / `UnsupportedVersion` if it is not one
    /// this crate reads). The source is buffered internally.
    pub fn new(r: R) -> Result<Self, Error> {
        let mut inner = BufReader::with_capacity(CHUNK, r);
        let mut magic = [0u8; 9];
        let mut got = 0;
        while got < magic.len() {
            match inner.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got < magic.len() {
            // A short input is a truncated RDB file only if what is there starts like one.
            let head = &magic[..got];
            let prefix_of = |m: &[u8]| got > 0 && m.starts_with(&head[..got.min(m.len())]);
            return Err(if prefix_of(b"REDIS") || prefix_of(b"VALKEY") {
                Error::Truncated
            } else {
                Error::NotRdb
            });
        }
        let header = Header { magic };
        let (flavor, version) = header.check()?;
        let mut digest = CRC64.digest();
        digest.update(&magic);
        Ok(Reader {
            src: Src { inner, digest, pos: 9, rec: None },
            header,
            flavor,
            version,
            aux: Vec::new(),
            db: 0,
            state: State::Reading,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The AUX fields seen so far (e.g. `redis-ver`, `valkey-ver`, `ctime`), in file order.
    pub fn aux(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.aux
    }

    /// The next key, or `None` at the EOF opcode once the CRC64 has been checked (a stored
    /// CRC64 of zero means the file was saved without a checksum and is accepted).
    ///
    /// After an error the reader is unusable: further calls fail with `Corrupt`.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        match self.state {
            State::Done => return Ok(None),
            State::Failed => {
                return Err(corrupt("reading stopped at an earlier error".to_string()));
            }
            State::Reading => {}
        }
        let r = self.read_entry();
        self.src.rec = None;
        match &r {
            Ok(None) => self.state = State::Done,
            Err(_) => self.state = State::Failed,
            Ok(Some(_)) => {}
        }
        r
    }

    /// How many bytes of the file have been consumed so far (the header included).
    pub fn bytes_read(&self) -> u64 {
        self.src.pos
    }

    fn read_entry(&mut self) -> Result<Option<Entry>, Error> {
        let src = &mut self.src;
        let (mut expire_ms, mut idle, mut freq) = (None, None, None);
        loop {
            let t = src.u8()?;
            match t {
                op::EOF => {
                    if self.version >= 5 {
                        let expected = src.digest.clone().finalize();
                        let stored = u64::from_le_bytes(src.array()?);
                        if stored != 0 && stored != expected {
                            return Err(Error::Checksum);
                        }
                    }
                    return Ok(None);
                }
                op::SELECTDB => {
                    let db = src.len()?;
                    self.db = u32::try_from(db)
                        .map_err(|_| corrupt(format!("database number {db} is out of range")))?;
                }
                op::EXPIRETIME => {
                    expire_ms = Some(i64::from(i32::from_le_bytes(src.array()?)) * 1000);
                }
                op::EXPIRETIME_MS => expire_ms = Some(i64::from_le_bytes(src.array()?)),
                op::RESIZEDB => {
                    src.len()?;
                    src.len()?;
                }
                op::AUX => {
                    let k = src.string()?;
                    let v = src.string()?;
                    self.aux.push((k, v));
                }
                op::FREQ => freq = Some(src.u8()?),
                op::IDLE => idle = Some(src.len()?),
                op::MODULE_AUX => {
                    src.len()?; // module id
                    let when_opcode = src.len()?;
                    if when_opcode != 2 {
                        return Err(corrupt(format!("module AUX has bad 'when' opcode {when_opcode}")));
                    }
                    src.len()?; // when
                    src.skip_module_values()?;
                }
                // Redis 7.0 release candidates: name, engine, optional description, code.
                op::FUNCTION_PRE_GA => {
                    src.skip_string()?;
                    src.skip_string()?;
                    if src.len()? != 0 {
                        src.skip_string()?;
                    }
                    src.skip_string()?;
                }
                op::FUNCTION2 => src.skip_string()?,
                op::SLOT_INFO => {
                    for _ in 0..3 {
                        src.len()?; // slot, keys in slot, expires in slot
                    }
                }
                op::SLOT_IMPORT if self.flavor == Flavor::Valkey => {
                    src.skip_string()?; // job name
                    for _ in 0..src.count("slot range")? {
                        src.len()?;
                        src.len()?;
                    }
                }
                t if is_object_type(t) => {
                    let key = src.string()?;
                    src.rec = Some(Vec::new());
                    src.skip_value(t, self.flavor)?;
                    let value = src.rec.take().unwrap_or_default();
                    return Ok(Some(Entry { db: self.db, key, expire_ms, idle, freq, value_type: t, value }));
                }
                t => return Err(Error::UnknownType(t)),
            }
        }
    }
}

/// Type bytes that introduce a key (as opposed to opcodes); unknown ones among these are
/// reported as `UnknownType` by the value parser.
fn is_object_type(t: u8) -> bool {
    t < 243
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lzf_round() {
        // "aaaaaaaaaa": literal 'a', then a back-reference of 9 bytes at distance 1.
        let input = [0x00, b'a', 0xe0, 0x00, 0x00];
        assert_eq!(lzf_decompress(&input, 10).unwrap(), b"aaaaaaaaaa");
        assert!(lzf_decompress(&input, 11).is_err());
        assert!(lzf_decompress(&[0x05, b'a'], 6).is_err());
        assert!(lzf_decompress(&[0x20, 0x05], 3).is_err());
    }

    #[test]
    fn short_inputs() {
        assert!(matches!(Reader::new(&b""[..]), Err(Error::NotRdb)));
        assert!(matches!(Reader::new(&b"REDI"[..]), Err(Error::Truncated)));
        assert!(matches!(Reader::new(&b"hello"[..]), Err(Error::NotRdb)));
        assert!(matches!(Reader::new(&b"hello world\n"[..]), Err(Error::NotRdb)));
    }

    #[test]
    fn minimal_file_and_absurd_lengths() {
        let mut w = crate::Writer::new(Vec::new(), &Header::REDIS_11, &[]).unwrap();
        let e = Entry {
            db: 2,
            key: b"k".to_vec(),
            expire_ms: Some(123),
            idle: Some(5),
            freq: None,
            value_type: 0,
            value: vec![0xc0, 7],
        };
        w.entry(&e).unwrap();
        let file = w.finish().unwrap();
        let mut r = Reader::new(&file[..]).unwrap();
        assert_eq!(r.next_entry().unwrap(), Some(e));
        assert_eq!(r.next_entry().unwrap(), None);
        assert_eq!(r.bytes_read(), file.len() as u64);

        // A string claiming 2^40 bytes is corrupt, not an allocation.
        let mut bad = b"REDIS0011".to_vec();
        bad.extend_from_slice(&[0, 1, b'k', 0x81, 0, 0, 1, 0, 0, 0, 0, 0]);
        let mut r = Reader::new(&bad[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(Error::Corrupt(_))));
        // A list claiming 2^40 elements likewise.
        let mut bad = b"REDIS0011".to_vec();
        bad.extend_from_slice(&[14, 1, b'k', 0x81, 0, 0, 1, 0, 0, 0, 0, 0]);
        let mut r = Reader::new(&bad[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(Error::Corrupt(_))));
        assert!(r.next_entry().is_err());
        // A string claiming 500 MiB on a short input is truncated.
        let mut bad = b"REDIS0011".to_vec();
        bad.extend_from_slice(&[0, 1, b'k', 0x80, 0x1f, 0, 0, 0, b'x']);
        let mut r = Reader::new(&bad[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(Error::Truncated)));
    }

    fn s(out: &mut Vec<u8>, bytes: &[u8]) {
        op::encode_len(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn finish(mut file: Vec<u8>) -> Vec<u8> {
        file.push(op::EOF);
        let crc = CRC64.checksum(&file);
        file.extend_from_slice(&crc.to_le_bytes());
        file
    }

    #[test]
    fn skips_opcodes_and_copies_module_values() {
        let mut f = b"VALKEY080".to_vec();
        f.push(op::AUX);
        s(&mut f, b"valkey-ver");
        s(&mut f, b"9.1.2");
        // Module AUX: id, when opcode (UINT) + when, then a UINT, a STRING, a DOUBLE, EOF.
        f.extend_from_slice(&[op::MODULE_AUX, 0x81, 1, 2, 3, 4, 5, 6, 7, 8, 2, 2]);
        f.extend_from_slice(&[2, 0x40, 0x80, 5]);
        s(&mut f, b"aux data");
        f.extend_from_slice(&[4, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0]);
        f.push(op::FUNCTION2);
        s(&mut f, b"#!lua name=x\n");
        f.extend_from_slice(&[op::SELECTDB, 7, op::RESIZEDB, 2, 1, op::SLOT_INFO, 0x41, 0, 5, 1]);
        f.push(op::SLOT_IMPORT);
        s(&mut f, &[b'n'; 40]);
        f.extend_from_slice(&[2, 0, 10, 20, 30]);
        // A module value with an expiry in seconds and an LFU frequency.
        f.push(op::EXPIRETIME);
        f.extend_from_slice(&1_700_000_000i32.to_le_bytes());
        f.extend_from_slice(&[op::FREQ, 9, 7]);
        s(&mut f, b"mod");
        let value_at = f.len();
        // 64-bit module id; SINT 3; FLOAT 1.0; STRING "payload"; EOF.
        f.extend_from_slice(&[0x81, 9, 8, 7, 6, 5, 4, 3, 2, 1, 3, 3, 0, 0, 0x80, 0x3f, 5]);
        s(&mut f, b"payload");
        f.push(0);
        let value = f[value_at..].to_vec();
        // An int-encoded key holding an LZF string.
        f.extend_from_slice(&[0, 0xc1, 0x39, 0x30, 0xc3, 5, 10, 0x00, b'a', 0xe0, 0x00, 0x00]);
        let file = finish(f);

        let mut r = Reader::new(&file[..]).unwrap();
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!((e.db, e.key.as_slice(), e.value_type), (7, &b"mod"[..], 7));
        assert_eq!(e.expire_ms, Some(1_700_000_000_000));
        assert_eq!((e.freq, e.idle), (Some(9), None));
        assert_eq!(e.value, value);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!((e.key.as_slice(), e.value_type), (&b"12345"[..], 0));
        assert_eq!(e.value, [0xc3, 5, 10, 0x00, b'a', 0xe0, 0x00, 0x00]);
        assert_eq!(r.next_entry().unwrap(), None);
        assert_eq!(r.aux(), &[(b"valkey-ver".to_vec(), b"9.1.2".to_vec())]);
    }

    #[test]
    fn redis_field_ttl_hashes_and_pre_ga_functions() {
        let mut f = b"REDIS0012".to_vec();
        // Redis 7.0 release-candidate function: name, engine, has description, description, code.
        f.push(op::FUNCTION_PRE_GA);
        s(&mut f, b"lib");
        s(&mut f, b"LUA");
        f.push(1);
        s(&mut f, b"desc");
        s(&mut f, b"code");
        f.extend_from_slice(&[op::SELECTDB, 0]);
        // Type 24: min expire, count, then (TTL, field, value).
        f.push(24);
        s(&mut f, b"h24");
        let v24_at = f.len();
        f.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        s(&mut f, b"f");
        s(&mut f, b"v");
        f.push(5);
        s(&mut f, b"g");
        s(&mut f, b"w");
        let v24 = f[v24_at..].to_vec();
        // Type 25: min expire, listpack.
        f.push(25);
        s(&mut f, b"h25");
        f.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        s(&mut f, b"listpack bytes");
        // In a REDIS file, type 22 is Redis's pre-GA field-TTL hash: (TTL, field, value).
        f.push(22);
        s(&mut f, b"h22");
        f.extend_from_slice(&[1, 0]);
        s(&mut f, b"f");
        s(&mut f, b"v");
        let file = finish(f);

        let mut r = Reader::new(&file[..]).unwrap();
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!((e.key.as_slice(), e.value_type), (&b"h24"[..], 24));
        assert_eq!(e.value, v24);
        assert_eq!(r.next_entry().unwrap().unwrap().value_type, 25);
        assert_eq!(r.next_entry().unwrap().unwrap().value.len(), 6);
        assert_eq!(r.next_entry().unwrap(), None);

        // Type 23 in a VALKEY file (Valkey 9.2's path hash) is not something this crate skips.
        let mut f = b"VALKEY081".to_vec();
        f.push(23);
        s(&mut f, b"k");
        let mut r = Reader::new(&f[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(Error::UnknownType(23))));
    }

    #[test]
    fn zero_checksum_is_accepted() {
        let w = crate::Writer::new(Vec::new(), &Header::VALKEY_80, &[(b"a".to_vec(), b"b".to_vec())]);
        let mut file = w.unwrap().finish().unwrap();
        let n = file.len();
        file[n - 8..].fill(0);
        let mut r = Reader::new(&file[..]).unwrap();
        assert_eq!(r.next_entry().unwrap(), None);
        assert_eq!(r.aux(), &[(b"a".to_vec(), b"b".to_vec())]);
        file[n - 1] = 1;
        let mut r = Reader::new(&file[..]).unwrap();
        assert!(matches!(r.next_entry(), Err(Error::Checksum)));
    }
}
