//! RESP on the wire, for tests that read raw frames (pushes and replies in their order).

/// The length of the RESP frame (RESP2 or RESP3) at the start of `buf`, if it is complete.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let head = std::str::from_utf8(&buf[1..line_end]).expect("a RESP header");
    let after = line_end + 2;
    match buf[0] {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(after),
        b'$' | b'=' | b'!' => {
            let n: i64 = head.parse().expect("a bulk length");
            if n < 0 {
                return Some(after);
            }
            let end = after + n as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let mut n: i64 = head.parse().expect("an aggregate length");
            if n < 0 {
                return Some(after);
            }
            if matches!(buf[0], b'%' | b'|') {
                n *= 2;
            }
            let mut pos = after;
            for _ in 0..n {
                pos += frame_len(&buf[pos..])?;
            }
            Some(pos)
        }
        _ => panic!("not RESP: {:?}", String::from_utf8_lossy(&buf[..buf.len().min(64)])),
    }
}
