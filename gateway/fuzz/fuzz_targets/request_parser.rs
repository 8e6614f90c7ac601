//! Fuzzes the gateway's incremental RESP request parser as a session drives it.
//!
//! The first byte of the input picks how the rest is cut into reads; the rest is what a client
//! sent. The input is parsed twice under each of two limits (Valkey's unauthenticated ones and
//! large ones): once in those reads, once whole. Checked:
//! - no panic;
//! - every frame lies within the buffer, every argument within its frame;
//! - a multibulk frame's arguments respect the limits and each is followed by CRLF;
//! - an inline frame ends with LF (its arguments, unquoted, come from `inline_args`);
//! - cutting the input into reads changes nothing: the same requests, and an error in both or
//!   in neither.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_gateway::resp::request::{Limits, RequestParser};

const BIG: Limits = Limits::authenticated(1 << 20, 512 << 20);

/// One parsed request: length, inline, arguments.
type Request = (usize, bool, Vec<Vec<u8>>);

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else { return };
    for limits in [Limits::UNAUTHENTICATED, BIG] {
        let whole = parse(input, &[input.len()], limits);
        let chunked = parse(input, &chunk_sizes(seed, input.len()), limits);
        assert_eq!(whole.0, chunked.0, "requests differ when the input is cut ({limits:?})");
        assert_eq!(whole.1, chunked.1, "error in only one of whole/cut ({limits:?})");
    }
});

/// Read sizes drawn from a small PRNG seeded by `seed`. At most about 256 reads, so that a
/// 64 KB line read byte by byte does not turn every run into a quadratic scan.
fn chunk_sizes(seed: u8, len: usize) -> Vec<usize> {
    const MAX: [usize; 8] = [1, 2, 3, 7, 16, 64, 512, 4096];
    let max = MAX[(seed & 7) as usize];
    let min = (len / 256).max(1);
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < len {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (1 + state as usize % max).max(min);
        sizes.push(size);
        total += size;
    }
    sizes
}

/// Drives a parser like a session: append a read, take every whole request, drop it.
/// Returns the requests and whether it stopped on a protocol error.
fn parse(input: &[u8], sizes: &[usize], limits: Limits) -> (Vec<Request>, bool) {
    let mut parser = RequestParser::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut requests = Vec::new();
    let mut at = 0;
    for &size in sizes {
        let end = (at + size).min(input.len());
        buf.extend_from_slice(&input[at..end]);
        at = end;
        loop {
            let frame = match parser.next(&buf, limits) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return (requests, true),
            };
            assert!(frame.len > 0, "empty frame {frame:?}");
            assert!(frame.len <= buf.len(), "frame {frame:?} longer than the {} bytes read", buf.len());
            let args = parser.args();
            if frame.inline {
                assert_eq!(buf[frame.len - 1], b'\n', "inline frame {frame:?} does not end with LF");
                // Unquoting only shrinks: every argument byte comes from one or more line bytes.
                let unquoted: usize = parser.inline_args().iter().map(Vec::len).sum();
                assert!(unquoted < frame.len, "{unquoted} argument bytes from a {}-byte line", frame.len);
            } else {
                assert!(args.len() <= limits.max_args, "{} args over {limits:?}", args.len());
            }
            for r in args {
                assert!(r.start <= r.end && r.end <= frame.len, "arg {r:?} outside frame {frame:?}");
                if !frame.inline {
                    assert!(r.len() <= limits.max_bulk, "arg {r:?} over {limits:?}");
                    let after = buf.get(r.end..r.end + 2);
                    assert_eq!(after, Some(&b"\r\n"[..]), "arg {r:?} not followed by CRLF");
                }
            }
            let args = if frame.inline {
                parser.inline_args().to_vec()
            } else {
                args.iter().map(|r| buf[r.clone()].to_vec()).collect()
            };
            requests.push((frame.len, frame.inline, args));
            buf.drain(..frame.len);
        }
    }
    (requests, false)
}
