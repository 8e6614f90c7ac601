//! Incremental parser of client requests.
//!
//! Keeps its place between reads: bulk payloads are skipped by length, never scanned, and a
//! partial request is resumed where it stopped. Limits are checked before anything is
//! allocated; a violation is a protocol error with Valkey's wording, after which the
//! session answers and closes.

use super::{find_crlf, parse_int};
use std::ops::Range;

/// Limits on what a client may send. Before AUTH they are Valkey's unauthenticated limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_args: usize,
    pub max_bulk: usize,
    /// Whether these are the limits before AUTH (they have their own error wording).
    pub unauthenticated: bool,
}

impl Limits {
    /// Valkey's limits for unauthenticated clients: 10 arguments, 16 KB per bulk string.
    pub const UNAUTHENTICATED: Limits = Limits { max_args: 10, max_bulk: 16 * 1024, unauthenticated: true };

    /// Limits for an authenticated client.
    pub const fn authenticated(max_args: usize, max_bulk: usize) -> Limits {
        Limits { max_args, max_bulk, unauthenticated: false }
    }
}

/// Longest header or inline line accepted (Valkey's PROTO_INLINE_MAX_SIZE).
pub const MAX_LINE: usize = 64 * 1024;

/// A protocol error; the text is what Valkey says after `-ERR `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn perr(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// One complete request at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Bytes the request occupies, including its final CRLF.
    pub len: usize,
    /// Whether it was an inline command (needs re-encoding before it goes upstream).
    pub inline: bool,
}

/// Parses one request at a time from the front of a buffer.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Bytes of the current request consumed so far.
    pos: usize,
    /// Arguments still expected; `None` until the `*<n>` header is read.
    remaining: Option<usize>,
    args: Vec<Range<usize>>,
    /// Arguments of the last inline command, unquoted and unescaped.
    inline_args: Vec<Vec<u8>>,
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Argument ranges (into the buffer) of the request last returned by [`Self::next`];
    /// empty for inline commands, whose arguments are in [`Self::inline_args`].
    pub fn args(&self) -> &[Range<usize>] {
        &self.args
    }

    /// Arguments of the inline command last returned by [`Self::next`].
    pub fn inline_args(&self) -> &[Vec<u8>] {
        &self.inline_args
    }

    /// Moves the argument ranges out (to use them while the parser is borrowed elsewhere);
    /// hand the vector back with [`Self::give_back`] to reuse its allocation.
    pub fn take_args(&mut self) -> Vec<Range<usize>> {
        std::mem::take(&mut self.args)
    }

    pub fn give_back(&mut self, mut args: Vec<Range<usize>>) {
        args.clear();
        self.args = args;
    }

    /// The request being read, when [`Self::next`] found it incomplete: its arguments read
    /// so far, and the rest of it as a [`Rest`] starting at the byte where parsing stopped.
    pub fn partial(&self) -> Option<(&[Range<usize>], usize, Rest)> {
        let left = self.remaining?;
        Some((&self.args, self.pos, Rest { args_left: left, bulk_left: 0 }))
    }

    /// Forgets the request being read (its rest is read with a [`Rest`] instead).
    pub fn abandon(&mut self) {
        self.remaining = None;
        self.pos = 0;
        self.args.clear();
    }

    /// Parses as far as `buf` allows. `Ok(Some(frame))` when a whole request is at the front:
    /// read its arguments with [`Self::args`], then drop `frame.len` bytes and call again.
    /// Empty requests (`*0`, blank lines) come back as frames with no arguments.
    pub fn next(&mut self, buf: &[u8], limits: Limits) -> Result<Option<Frame>, ProtocolError> {
        if self.remaining.is_none() {
            self.args.clear();
            self.pos = 0;
            match buf.first() {
                None => return Ok(None),
                Some(b'*') => {}
                Some(_) => return self.inline(buf),
            }
            let (n, cr) = match short_number(buf, 1) {
                Some((n, cr)) => (n as i64, cr),
                None => {
                    let Some(cr) = find_crlf(buf, 1) else {
                        if buf.len() > MAX_LINE {
                            return Err(perr("too big mbulk count string"));
                        }
                        return Ok(None);
                    };
                    if cr > MAX_LINE {
                        return Err(perr("too big mbulk count string"));
                    }
                    (parse_len(&buf[1..cr]).ok_or_else(|| perr("invalid multibulk length"))?, cr)
                }
            };
            self.pos = cr + 2;
            if n <= 0 {
                return Ok(Some(Frame { len: self.pos, inline: false }));
            }
            if n as usize > limits.max_args {
                return Err(perr(if limits.unauthenticated {
                    "unauthenticated multibulk length"
                } else {
                    "invalid multibulk length"
                }));
            }
            self.args.reserve((n as usize).min(1024));
            self.remaining = Some(n as usize);
        }
        while let Some(left) = self.remaining {
            if left == 0 {
                self.remaining = None;
                return Ok(Some(Frame { len: self.pos, inline: false }));
            }
            let Some(&first) = buf.get(self.pos) else { return Ok(None) };
            if first != b'$' {
                return Err(perr(format!("expected '$', got '{}'", first as char)));
            }
            let (len, cr) = match short_number(buf, self.pos + 1) {
                Some((len, cr)) => (len as i64, cr),
                None => {
                    let Some(cr) = find_crlf(buf, self.pos + 1) else {
                        if buf.len() - self.pos > MAX_LINE {
                            return Err(perr("too big bulk count string"));
                        }
                        return Ok(None);
                    };
                    (parse_len(&buf[self.pos + 1..cr]).ok_or_else(|| perr("invalid bulk length"))?, cr)
                }
            };
            if len < 0 || len as usize > limits.max_bulk {
                return Err(perr(if limits.unauthenticated && len >= 0 {
                    "unauthenticated bulk length"
                } else {
                    "invalid bulk length"
                }));
            }
            let start = cr + 2;
            let end = start + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(perr("invalid bulk format"));
            }
            self.args.push(start..end);
            self.pos = end + 2;
            self.remaining = Some(left - 1);
        }
        unreachable!("the loop returns when no argument is left")
    }

    fn inline(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > MAX_LINE {
                return Err(perr("too big inline request"));
            }
            return Ok(None);
        };
        if nl > MAX_LINE {
            return Err(perr("too big inline request"));
        }
        let line_end = if nl > 0 && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
        self.inline_args =
            split_args(&buf[..line_end]).ok_or_else(|| perr("unbalanced quotes in request"))?;
        Ok(Some(Frame { len: nl + 1, inline: true }))
    }
}

/// The rest of a request too big to hold whole: it is framed as it comes (argument headers
/// checked like [`RequestParser::next`] does, payloads counted, never held), so that a
/// session can pass it on piece by piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rest {
    args_left: usize,
    /// Bytes of the current argument's payload still to come, its final CRLF included.
    bulk_left: usize,
}

impl Rest {
    /// Takes what belongs to the request from the front of `buf`: how many bytes.
    pub fn advance(&mut self, buf: &[u8], limits: Limits) -> Result<usize, ProtocolError> {
        let mut i = 0;
        loop {
            if self.bulk_left > 0 {
                let take = self.bulk_left.min(buf.len() - i);
                // The payload's last two bytes must be its CRLF.
                for k in 0..take {
                    let left = self.bulk_left - k;
                    if (left == 2 && buf[i + k] != b'\r') || (left == 1 && buf[i + k] != b'\n') {
                        return Err(perr("invalid bulk format"));
                    }
                }
                i += take;
                self.bulk_left -= take;
                if self.bulk_left > 0 {
                    return Ok(i);
                }
            }
            if self.args_left == 0 || i == buf.len() {
                return Ok(i);
            }
            if buf[i] != b'$' {
                return Err(perr(format!("expected '$', got '{}'", buf[i] as char)));
            }
            let Some(cr) = find_crlf(buf, i + 1) else {
                if buf.len() - i > MAX_LINE {
                    return Err(perr("too big bulk count string"));
                }
                return Ok(i);
            };
            let len = parse_len(&buf[i + 1..cr]).ok_or_else(|| perr("invalid bulk length"))?;
            if len < 0 || len as usize > limits.max_bulk {
                return Err(perr("invalid bulk length"));
            }
            self.bulk_left = len as usize + 2;
            self.args_left -= 1;
            i = cr + 2;
        }
    }

    /// Whether the whole request has been taken.
    pub fn done(&self) -> bool {
        self.args_left == 0 && self.bulk_left == 0
    }
}

/// Rewrites the front of `buf`, which starts with an inline command, into RESP in one pass:
/// every complete request there (inline commands re-encoded, RESP requests copied as they
/// are), then the rest of the buffer unchanged. It stops at the first request that is
/// incomplete or refused (the caller's parser reports that one). Afterwards every complete
/// request in the buffer is RESP, so a buffer full of inline commands costs one pass, not
/// one copy of the rest per command. Returns the bytes written.
pub fn inline_to_resp(buf: &mut bytes::BytesMut, limits: Limits) -> usize {
    let mut parser = RequestParser::new();
    let mut out = bytes::BytesMut::with_capacity(buf.len() * 2);
    let mut pos = 0;
    while pos < buf.len() {
        match parser.next(&buf[pos..], limits) {
            Ok(Some(frame)) if frame.inline => {
                let args: Vec<&[u8]> = parser.inline_args().iter().map(Vec::as_slice).collect();
                if !args.is_empty() {
                    super::command(&mut out, &args);
                }
                pos += frame.len;
            }
            Ok(Some(frame)) => {
                out.extend_from_slice(&buf[pos..pos + frame.len]);
                pos += frame.len;
            }
            Ok(None) | Err(_) => break,
        }
    }
    out.extend_from_slice(&buf[pos..]);
    *buf = out;
    buf.len()
}

/// Splits an inline command line exactly as Valkey's `sdssplitargs`: words end at space,
/// tab, CR, LF or NUL; a quote anywhere starts a quoted part; `"…"` understands
/// `\n \r \t \b \a \xHH` and `\<any>`, `'…'` understands `\'`; a closing quote must be
/// followed by whitespace or the end. A NUL ends the line. `None` for unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // C strings: the line ends at the first NUL.
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let (mut in_double, mut in_single) = (false, false);
        let mut arg = Vec::new();
        loop {
            if in_double {
                let c = *line.get(i)?;
                if c == b'\\'
                    && line.get(i + 1) == Some(&b'x')
                    && line.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                    && line.get(i + 3).is_some_and(u8::is_ascii_hexdigit)
                {
                    let hex = std::str::from_utf8(&line[i + 2..i + 4]).ok()?;
                    arg.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 4;
                    continue;
                } else if c == b'\\' && i + 1 < line.len() {
                    arg.push(match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    i += 2;
                    continue;
                } else if c == b'"' {
                    if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                        return None;
                    }
                    i += 1;
                    break;
                }
                arg.push(c);
            } else if in_single {
                let c = *line.get(i)?;
                if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
                    arg.push(b'\'');
                    i += 2;
                    continue;
                } else if c == b'\'' {
                    if line.get(i + 1).is_some_and(|&b| !is_space(b)) {
                        return None;
                    }
                    i += 1;
                    break;
                }
                arg.push(c);
            } else {
                match line.get(i) {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_double = true,
                    Some(b'\'') => in_single = true,
                    Some(&c) => arg.push(c),
                }
            }
            i += 1;
        }
        args.push(arg);
    }
}

/// The common length line, read in one pass: 1–9 digits without a leading zero (or a lone
/// `0`), then CRLF, starting at `at`. Returns the number and the index of the CR. `None`
/// leaves the line (incomplete, negative, odd) to the general path, which decides exactly
/// as before: this only takes lines that path accepts, with the same result.
#[inline]
fn short_number(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let line = buf.get(at..)?;
    let mut n = 0usize;
    for (i, &b) in line.iter().enumerate().take(10) {
        match b {
            b'0'..=b'9' if !(i == 1 && line[0] == b'0') => n = n * 10 + usize::from(b - b'0'),
            b'\r' if i > 0 && line.get(i + 1) == Some(&b'\n') => return Some((n, at + i)),
            _ => return None,
        }
    }
    None
}

/// A length in a request header, as strict as Valkey's `string2ll`: no leading zeros, no
/// `-0`, no sign but `-`.
fn parse_len(line: &[u8]) -> Option<i64> {
    let digits = line.strip_prefix(b"-").unwrap_or(line);
    if digits.len() > 1 && digits[0] == b'0' || line == b"-0" {
        return None;
    }
    parse_int(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_of_a_big_request_is_framed_as_it_comes() {
        let limits = Limits::authenticated(16, 1 << 20);
        let input: &[u8] = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n0123456789\r\n*1\r\n$4\r\nPING\r\n";
        let request = input.len() - 14;
        for cut in 12..request {
            for step in 1..6 {
                let mut p = RequestParser::new();
                assert_eq!(p.next(&input[..cut], limits).unwrap(), None);
                let (args, pos, mut rest) = p.partial().unwrap();
                assert!(!args.is_empty() || pos <= 4);
                let (mut at, mut fed) = (pos, cut);
                while !rest.done() {
                    fed = (fed + step).min(input.len());
                    at += rest.advance(&input[at..fed], limits).unwrap();
                    if fed == input.len() {
                        break;
                    }
                }
                assert!(rest.done());
                assert_eq!(at, request, "cut {cut} step {step}");
            }
        }
        let mut p = RequestParser::new();
        assert_eq!(p.next(b"*2\r\n$3\r\nGET\r\n$5\r\nab", limits).unwrap(), None);
        let (_, pos, mut rest) = p.partial().unwrap();
        assert_eq!(
            rest.advance(&b"*2\r\n$3\r\nGET\r\n$5\r\nabcdeXY"[pos..], limits),
            Err(perr("invalid bulk format"))
        );
        let mut rest2 = p.partial().unwrap().2;
        assert!(rest2.advance(b"$99999999\r\n", limits).is_err(), "over max_bulk");
    }

    const BIG: Limits = Limits::authenticated(1 << 20, 512 << 20);

    /// Handles a buffer as the session does (inline commands at the front are rewritten);
    /// the requests' arguments and the bytes the rewrites wrote.
    fn drain_like_a_session(input: &[u8], limits: Limits) -> (Vec<Vec<Vec<u8>>>, usize) {
        let mut buf = bytes::BytesMut::from(input);
        let (mut parser, mut requests, mut written) = (RequestParser::new(), Vec::new(), 0);
        while let Some(frame) = parser.next(&buf, limits).unwrap() {
            if frame.inline {
                written += inline_to_resp(&mut buf, limits);
                continue;
            }
            requests.push(parser.args().iter().map(|r| buf[r.clone()].to_vec()).collect());
            bytes::Buf::advance(&mut buf, frame.len);
        }
        (requests, written)
    }

    #[test]
    fn a_buffer_of_inline_commands_is_rewritten_in_linear_time() {
        let mut written = Vec::new();
        for mb in [1, 4] {
            let input = b"PING\r\n".repeat(mb * 1024 * 1024 / 6);
            let (requests, bytes) = drain_like_a_session(&input, Limits::UNAUTHENTICATED);
            assert_eq!(requests.len(), input.len() / 6);
            assert!(requests.iter().all(|r| r == &[b"PING".to_vec()]));
            written.push(bytes);
        }
        // Each inline PING becomes 14 bytes of RESP, written once.
        assert_eq!(written[0], 14 * (1024 * 1024 / 6));
        assert_eq!(written[1], 14 * (4 * 1024 * 1024 / 6));
    }

    #[test]
    fn inline_and_resp_requests_mixed_keep_their_order() {
        let mut input = Vec::new();
        for i in 0..1000 {
            input.extend_from_slice(format!("SET k{i} \"v {i}\"\r\n").as_bytes());
            input.extend_from_slice(
                format!("*2\r\n$3\r\nGET\r\n${}\r\nk{i}\r\n", format!("k{i}").len()).as_bytes(),
            );
            input.extend_from_slice(b"\r\n");
        }
        let (requests, written) = drain_like_a_session(&input, BIG);
        assert_eq!(requests.len(), 2000);
        for i in 0..1000 {
            let k = format!("k{i}").into_bytes();
            assert_eq!(requests[2 * i], vec![b"SET".to_vec(), k.clone(), format!("v {i}").into_bytes()]);
            assert_eq!(requests[2 * i + 1], vec![b"GET".to_vec(), k]);
        }
        assert!(written < 3 * input.len(), "{written} bytes written for {}", input.len());
        // An incomplete request at the end stays as it is, after the rewritten ones.
        let mut buf = bytes::BytesMut::from(&b"PING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk"[..]);
        inline_to_resp(&mut buf, BIG);
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk");
        // A request the parser refuses is left for the session's parser to report.
        let mut buf = bytes::BytesMut::from(&b"PING\r\n*99\r\nPING\r\n"[..]);
        inline_to_resp(&mut buf, Limits::UNAUTHENTICATED);
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPING\r\n*99\r\nPING\r\n");
    }

    #[test]
    fn the_short_length_path_agrees_with_the_general_one() {
        let lines: [&[u8]; 14] = [
            b"0\r\n",
            b"7\r\n",
            b"16\r\n",
            b"123456789\r\n",
            b"1234567890\r\n",
            b"05\r\n",
            b"-1\r\n",
            b"12\rx\r\n",
            b"12\r",
            b"12",
            b"\r\n",
            b"1a\r\n",
            b"+5\r\n",
            b"999999999\r\n",
        ];
        for line in lines {
            let general = find_crlf(line, 0).and_then(|cr| parse_len(&line[..cr]).map(|n| (n as usize, cr)));
            // Whatever it takes, it reads as the general path does; the rest is left to that.
            if let Some(found) = short_number(line, 0) {
                assert_eq!(Some(found), general, "{:?}", String::from_utf8_lossy(line));
            }
        }
        for common in [&b"0\r\n"[..], b"3\r\n", b"16\r\n", b"999999999\r\n"] {
            assert!(short_number(common, 0).is_some(), "{:?}", String::from_utf8_lossy(common));
        }
        assert_eq!(short_number(b"*16\r\n", 1), Some((16, 3)));
    }

    fn parse_all(input: &[u8], limits: Limits) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut p = RequestParser::new();
        let mut buf = input;
        let mut out = Vec::new();
        while let Some(frame) = p.next(buf, limits)? {
            if frame.inline {
                out.push(p.inline_args().to_vec());
            } else {
                out.push(p.args().iter().map(|r| buf[r.clone()].to_vec()).collect());
            }
            buf = &buf[frame.len..];
        }
        Ok(out)
    }

    #[test]
    fn parses_a_pipeline() {
        let got = parse_all(b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n", BIG).unwrap();
        assert_eq!(got, vec![vec![b"PING".to_vec()], vec![b"SET".to_vec(), b"k".to_vec(), b"".to_vec()]]);
    }

    #[test]
    fn resumes_partial_input_byte_by_byte() {
        let input = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        let mut p = RequestParser::new();
        for end in 0..input.len() {
            assert_eq!(p.next(&input[..end], BIG).unwrap(), None, "at {end}");
        }
        let frame = p.next(input, BIG).unwrap().unwrap();
        assert_eq!(frame.len, input.len());
        assert_eq!(&input[p.args()[1].clone()], b"hello");
    }

    #[test]
    fn inline_commands() {
        let got = parse_all(b"SET k  \"a b\"\r\nPING\n", BIG).unwrap();
        assert_eq!(got[0], vec![b"SET".to_vec(), b"k".to_vec(), b"a b".to_vec()]);
        assert_eq!(got[1], vec![b"PING".to_vec()]);
    }

    #[test]
    fn inline_quoting_follows_valkey() {
        let got = parse_all(b"SET k \"a\\x41\\n\\\"b\" 'it\\'s'\r\n", BIG).unwrap();
        assert_eq!(got[0], vec![b"SET".to_vec(), b"k".to_vec(), b"aA\n\"b".to_vec(), b"it's".to_vec()]);
        assert!(parse_all(b"SET k \"ab\"c\r\n", BIG).is_err(), "a closing quote must end the argument");
        // As sdssplitargs: a quote inside a word opens a quoted part; NUL ends the line;
        // vertical tab separates words, form feed inside a word does not end it.
        assert_eq!(parse_all(b"a\"b c\"\r\n", BIG).unwrap()[0], vec![b"ab c".to_vec()]);
        assert!(parse_all(b"a\"\r\n", BIG).is_err());
        assert_eq!(parse_all(b"GET k\0x\r\n", BIG).unwrap()[0], vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(parse_all(b"\x0bGET\r\n", BIG).unwrap()[0], vec![b"GET".to_vec()]);
        assert_eq!(parse_all(b"a\x0c\r\n", BIG).unwrap()[0], vec![b"a\x0c".to_vec()]);
        assert_eq!(parse_all(b"   \r\n", BIG).unwrap(), vec![Vec::<Vec<u8>>::new()]);
    }

    #[test]
    fn protocol_errors_use_valkeys_words() {
        let err = |input: &[u8], l| parse_all(input, l).unwrap_err().to_string();
        assert_eq!(err(b"*x\r\n", BIG), "Protocol error: invalid multibulk length");
        assert_eq!(err(b"*1\r\n+PING\r\n", BIG), "Protocol error: expected '$', got '+'");
        assert_eq!(err(b"*1\r\n$-5\r\n", BIG), "Protocol error: invalid bulk length");
        assert_eq!(
            err(b"*11\r\n", Limits::UNAUTHENTICATED),
            "Protocol error: unauthenticated multibulk length"
        );
        assert_eq!(
            err(b"*1\r\n$16385\r\n", Limits::UNAUTHENTICATED),
            "Protocol error: unauthenticated bulk length"
        );
        assert_eq!(err(b"*01\r\n", BIG), "Protocol error: invalid multibulk length");
        assert_eq!(err(b"*1\r\n$-0\r\n", BIG), "Protocol error: invalid bulk length");
        assert_eq!(err(b"SET \"k\r\n", BIG), "Protocol error: unbalanced quotes in request");
        assert_eq!(err(&vec![b'A'; MAX_LINE + 1], BIG), "Protocol error: too big inline request");
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_allocation() {
        let err = parse_all(b"*2147483648\r\n", Limits::authenticated(1 << 20, 1)).unwrap_err();
        assert_eq!(err.0, "invalid multibulk length");
        let err = parse_all(b"*1\r\n$99999999999\r\n", BIG).unwrap_err();
        assert_eq!(err.0, "invalid bulk length");
    }
}
