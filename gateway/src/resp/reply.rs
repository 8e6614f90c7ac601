//! Incremental boundary scanner for replies from Valkey (RESP2 and RESP3).
//!
//! Valkey is trusted, so this only finds where each reply ends; it keeps its place across
//! reads so that a huge array or bulk string is scanned once.

use super::{find_crlf, parse_int};

/// What kind of reply was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub len: usize,
    /// A RESP3 push (`>`): out-of-band, answers no request.
    pub push: bool,
    /// An error reply (`-` or `!`).
    pub error: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed reply from upstream")]
pub struct MalformedReply;

#[derive(Debug, Default)]
pub struct ReplyScanner {
    pos: usize,
    /// Elements still expected by each open aggregate, innermost last.
    open: Vec<i64>,
    /// Bytes of a bulk payload (CRLF included) still to come after the caller took the
    /// start of the reply with [`ReplyScanner::take_partial`].
    skip: usize,
    /// The first byte of a reply whose start the caller already took (0: none taken).
    taken_kind: u8,
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans from where it stopped. `Ok(Some(reply))` when a whole reply is at the front of
    /// `buf`; the caller then drops `reply.len` bytes before calling again.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Reply>, MalformedReply> {
        if self.pos == 0 && self.open.is_empty() && self.taken_kind == 0 {
            // Most replies are one line or one bulk string: measured in one pass.
            if let Some(len) = simple_len(buf) {
                return Ok(Some(Reply { len, push: false, error: buf[0] == b'-' }));
            }
        }
        if self.skip > 0 {
            // The rest of a bulk payload whose start was taken.
            if buf.len() < self.pos + self.skip {
                return Ok(None);
            }
            self.pos += std::mem::take(&mut self.skip);
            if let Some(reply) = self.element_done(buf) {
                return Ok(Some(reply));
            }
        }
        loop {
            let Some(&kind) = buf.get(self.pos) else { return Ok(None) };
            let Some(cr) = find_crlf(buf, self.pos + 1) else { return Ok(None) };
            let line = &buf[self.pos + 1..cr];
            let after_line = cr + 2;
            let complete_at = match kind {
                b'+' | b'-' | b':' | b',' | b'(' | b'_' | b'#' => after_line,
                b'$' | b'!' | b'=' => {
                    let n = parse_int(line).ok_or(MalformedReply)?;
                    if n < 0 {
                        after_line
                    } else {
                        let end = after_line + n as usize + 2;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        end
                    }
                }
                b'*' | b'%' | b'~' | b'>' | b'|' => {
                    let n = parse_int(line).ok_or(MalformedReply)?;
                    let elements = match kind {
                        b'%' => n * 2,
                        // An attribute map is followed by the value it annotates.
                        b'|' => n * 2 + 1,
                        _ => n,
                    };
                    if elements > 0 {
                        self.pos = after_line;
                        self.open.push(elements);
                        continue;
                    }
                    after_line
                }
                _ => return Err(MalformedReply),
            };
            self.pos = complete_at;
            if let Some(reply) = self.element_done(buf) {
                return Ok(Some(reply));
            }
        }
    }

    /// One element ended at `pos`: closes every aggregate it completes; the reply if that
    /// was the last.
    fn element_done(&mut self, buf: &[u8]) -> Option<Reply> {
        loop {
            match self.open.last_mut() {
                None => {
                    let len = std::mem::take(&mut self.pos);
                    let kind = match std::mem::take(&mut self.taken_kind) {
                        0 => buf[0],
                        kind => kind,
                    };
                    return Some(Reply { len, push: kind == b'>', error: kind == b'-' || kind == b'!' });
                }
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        return None;
                    }
                    self.open.pop();
                }
            }
        }
    }

    /// After [`ReplyScanner::next`] found no whole reply in `buf`: how many bytes at its
    /// front belong to the unfinished reply and may be passed on now, so that a huge reply
    /// never has to be held whole. The caller drops them from the front of its buffer; the
    /// scanner goes on from there. The kind of the reply (push, error) is kept.
    pub fn take_partial(&mut self, buf: &[u8]) -> usize {
        let Some(&first) = buf.first() else { return 0 };
        let mut n = self.pos;
        if self.skip > 0 {
            n = buf.len();
            self.skip -= buf.len() - self.pos;
        } else if matches!(buf.get(self.pos), Some(b'$' | b'!' | b'=')) {
            // A bulk whose header is complete: its payload so far goes too.
            if let Some(cr) = find_crlf(buf, self.pos + 1) {
                if let Some(len) = parse_int(&buf[self.pos + 1..cr]).filter(|&l| l >= 0) {
                    let end = cr + 2 + len as usize + 2;
                    if end > buf.len() {
                        self.skip = end - buf.len();
                        n = buf.len();
                    }
                }
            }
        }
        if n > 0 && self.taken_kind == 0 {
            self.taken_kind = first;
        }
        self.pos -= n.min(self.pos);
        n
    }

    /// Whether part of the current reply was taken with [`ReplyScanner::take_partial`].
    pub fn in_partial(&self) -> bool {
        self.taken_kind != 0
    }
}

/// The length of the complete reply at the front of `buf` when it is a line (`+`, `-`, `:` …)
/// or a bulk string (`$`): the common case, measured without the scanner's state. None for
/// anything else, or if it is not complete.
fn simple_len(buf: &[u8]) -> Option<usize> {
    let line_end = |buf: &[u8]| buf.iter().position(|&b| b == b'\n').map(|i| i + 1);
    match *buf.first()? {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => line_end(buf),
        b'$' if buf.get(1) == Some(&b'-') => line_end(buf),
        b'$' => {
            let (mut n, mut i) = (0usize, 1);
            loop {
                match *buf.get(i)? {
                    b'\r' => break,
                    d @ b'0'..=b'9' => n = n.checked_mul(10)?.checked_add(usize::from(d - b'0'))?,
                    _ => return None,
                }
                i += 1;
            }
            let end = (i + 2).checked_add(n)?.checked_add(2)?;
            (end <= buf.len()).then_some(end)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(input: &[u8]) -> Vec<usize> {
        let mut s = ReplyScanner::new();
        let mut buf = input;
        let mut out = vec![];
        while let Some(r) = s.next(buf).unwrap() {
            out.push(r.len);
            buf = &buf[r.len..];
        }
        assert!(buf.is_empty(), "left over: {:?}", String::from_utf8_lossy(buf));
        out
    }

    #[test]
    fn simple_replies_measure_like_the_scanner() {
        for input in [
            &b"+OK\r\n"[..],
            b":12\r\n",
            b"$-1\r\n",
            b"$3\r\nabc\r\n",
            b"$0\r\n\r\n",
            b"-ERR x\r\n",
            b"_\r\n",
        ] {
            let mut extra = input.to_vec();
            extra.extend_from_slice(b"+next\r\n");
            assert_eq!(simple_len(&extra), Some(lens(input)[0]), "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(simple_len(b"$3\r\nab"), None, "incomplete");
        assert_eq!(simple_len(b"*1\r\n+a\r\n"), None, "aggregates go to the scanner");
        assert_eq!(simple_len(b"$99999999999999999999999\r\n"), None, "overflow");
        assert_eq!(simple_len(b"$1x\r\n"), None);
    }

    #[test]
    fn scans_resp2_and_resp3_replies() {
        assert_eq!(lens(b"+OK\r\n:1\r\n$-1\r\n*-1\r\n"), vec![5, 4, 5, 5]);
        assert_eq!(lens(b"*2\r\n$1\r\na\r\n*1\r\n:2\r\n"), vec![19]);
        assert_eq!(lens(b"%1\r\n+k\r\n~2\r\n_\r\n#t\r\n"), vec![19]);
        assert_eq!(lens(b"|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n"), vec![21]);
        assert_eq!(lens(b"*0\r\n=7\r\ntxt:abc\r\n"), vec![4, 13]);
    }

    #[test]
    fn resumes_across_partial_reads() {
        let input = b"*3\r\n$3\r\nfoo\r\n*2\r\n:1\r\n:2\r\n+x\r\n>2\r\n+a\r\n+b\r\n";
        let mut s = ReplyScanner::new();
        for end in 0..29 {
            assert_eq!(s.next(&input[..end]).unwrap(), None, "at {end}");
        }
        let r = s.next(input).unwrap().unwrap();
        assert_eq!(r.len, 29);
        assert!(!r.push);
        let r = s.next(&input[29..]).unwrap().unwrap();
        assert!(r.push);
    }

    #[test]
    fn a_reply_taken_in_parts_adds_up_to_the_whole() {
        let input: &[u8] = b"*3\r\n$5\r\nhello\r\n*2\r\n:1\r\n$10\r\n0123456789\r\n+x\r\n+next\r\n";
        let whole = input.len() - b"+next\r\n".len();
        // Feed it a few bytes at a time, taking what may go each time.
        for step in 1..12 {
            let mut s = ReplyScanner::new();
            let (mut buf, mut fed, mut taken) = (Vec::new(), 0, 0);
            let reply = loop {
                let end = (fed + step).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
                if let Some(r) = s.next(&buf).unwrap() {
                    break r;
                }
                let n = s.take_partial(&buf);
                buf.drain(..n);
                taken += n;
            };
            assert_eq!(taken + reply.len, whole, "step {step}");
            assert!(!reply.push && !reply.error);
            assert!(!s.in_partial());
            buf.drain(..reply.len);
            assert_eq!(s.next(&buf).unwrap().map(|r| r.len), (buf.len() == 7).then_some(7), "step {step}");
        }
    }

    #[test]
    fn a_big_bulk_goes_on_as_it_comes() {
        let mut s = ReplyScanner::new();
        let mut buf = b"$100\r\n0123456789".to_vec();
        assert_eq!(s.next(&buf).unwrap(), None);
        assert_eq!(s.take_partial(&buf), buf.len(), "the header and the payload so far");
        buf.clear();
        buf.extend_from_slice(&[b'x'; 50]);
        assert_eq!(s.next(&buf).unwrap(), None);
        assert_eq!(s.take_partial(&buf), 50);
        buf.clear();
        buf.extend_from_slice(&[b'y'; 40]);
        buf.extend_from_slice(b"\r\n-ERR next\r\n");
        let r = s.next(&buf).unwrap().unwrap();
        assert_eq!(r.len, 42);
        assert!(!r.error, "the kind is the taken reply's");
        assert!(s.next(&buf[42..]).unwrap().unwrap().error);
    }

    #[test]
    fn flags_errors() {
        let mut s = ReplyScanner::new();
        assert!(s.next(b"-ERR x\r\n").unwrap().unwrap().error);
        assert!(ReplyScanner::new().next(b"?\r\n").is_err());
    }
}
