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
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans from where it stopped. `Ok(Some(reply))` when a whole reply is at the front of
    /// `buf`; the caller then drops `reply.len` bytes before calling again.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Reply>, MalformedReply> {
        if self.pos == 0 && self.open.is_empty() {
            // Most replies are one line or one bulk string: measured in one pass.
            if let Some(len) = simple_len(buf) {
                return Ok(Some(Reply { len, push: false, error: buf[0] == b'-' }));
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
            // One element done: close every aggregate it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = std::mem::take(&mut self.pos);
                        return Ok(Some(Reply {
                            len,
                            push: buf[0] == b'>',
                            error: buf[0] == b'-' || buf[0] == b'!',
                        }));
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
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
    fn flags_errors() {
        let mut s = ReplyScanner::new();
        assert!(s.next(b"-ERR x\r\n").unwrap().unwrap().error);
        assert!(ReplyScanner::new().next(b"?\r\n").is_err());
    }
}
