//! Property tests of the RESP request parser and the reply boundary scanner.
//!
//! Both are checked against what a generator produced and against an independent decoder,
//! the `redis-protocol` crate, with input split at random points as it arrives from a socket.

use proptest::prelude::*;
use proptest::sample::Index;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use shoal_gateway::resp::reply::ReplyScanner;
use shoal_gateway::resp::request::{Limits, RequestParser};

const BIG: Limits = Limits::authenticated(1024, 1 << 20);

fn config() -> ProptestConfig {
    // 256 cases keep the file at a few seconds in debug builds; PROPTEST_CASES=10000 for a long run.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// Input arriving in chunks.

/// Cuts `len` bytes into chunks at the given points (any order, duplicates allowed).
fn chunk_ranges(len: usize, cuts: &[Index]) -> Vec<std::ops::Range<usize>> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| w[0]..w[1]).collect()
}

/// How input is cut: at random points, or one byte at a time.
fn cuts() -> impl Strategy<Value = Cuts> {
    prop_oneof![
        6 => prop::collection::vec(any::<Index>(), 0..24).prop_map(Cuts::At),
        1 => Just(Cuts::EveryByte),
    ]
}

#[derive(Debug, Clone)]
enum Cuts {
    At(Vec<Index>),
    EveryByte,
}

impl Cuts {
    fn ranges(&self, len: usize) -> Vec<std::ops::Range<usize>> {
        match self {
            Cuts::At(cuts) => chunk_ranges(len, cuts),
            Cuts::EveryByte => (0..len).map(|i| i..i + 1).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

type Command = Vec<Vec<u8>>;

/// A bulk string: mostly short, often full of CR, LF and RESP markers, sometimes a few KB.
fn bulk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..16),
        3 => prop::collection::vec(prop::sample::select(b"\r\n$*:+-0123\"' ".to_vec()), 0..32),
        1 => prop::collection::vec(any::<u8>(), 0..4096),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop::collection::vec(bulk(), 0..=20)
}

fn encode_command(out: &mut Vec<u8>, cmd: &Command) {
    out.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
    for arg in cmd {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// One parsed request: its arguments, its length and whether it was inline.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    args: Command,
    len: usize,
    inline: bool,
}

/// Feeds `input` to a parser as a session does: append a chunk, take every whole request at
/// the front, drop it. Returns the requests and what was left unparsed.
fn parse_in_chunks(input: &[u8], cuts: &Cuts, limits: Limits) -> (Vec<Parsed>, Vec<u8>) {
    let mut parser = RequestParser::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for range in cuts.ranges(input.len()) {
        buf.extend_from_slice(&input[range]);
        while let Some(frame) = parser.next(&buf, limits).expect("valid input must parse") {
            assert!(frame.len > 0 && frame.len <= buf.len(), "frame {frame:?} in {} bytes", buf.len());
            let args = if frame.inline {
                parser.inline_args().to_vec()
            } else {
                parser
                    .args()
                    .iter()
                    .map(|r| {
                        assert!(r.start <= r.end && r.end <= frame.len, "arg {r:?} outside {frame:?}");
                        buf[r.clone()].to_vec()
                    })
                    .collect()
            };
            out.push(Parsed { args, len: frame.len, inline: frame.inline });
            buf.drain(..frame.len);
        }
    }
    (out, buf)
}

/// The reference: `redis-protocol`'s RESP2 decoder over the whole input.
fn reference_frames(input: &[u8]) -> Vec<(OwnedFrame, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let (frame, len) = decode(&input[at..])
            .unwrap_or_else(|e| panic!("reference decoder failed at {at}: {e:?}"))
            .unwrap_or_else(|| panic!("reference decoder wants more at {at}"));
        out.push((frame, len));
        at += len;
    }
    out
}

fn reference_command(frame: OwnedFrame) -> Command {
    match frame {
        OwnedFrame::Array(items) => items
            .into_iter()
            .map(|item| match item {
                OwnedFrame::BulkString(b) => b,
                other => panic!("reference decoded a non-bulk argument: {other:?}"),
            })
            .collect(),
        other => panic!("reference decoded a non-array request: {other:?}"),
    }
}

/// Any bytes as a double-quoted inline argument, escaped as `valkey-cli` would.
fn double_quoted(arg: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in arg {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x07 => out.extend_from_slice(b"\\a"),
            0x08 => out.extend_from_slice(b"\\b"),
            b' '..=b'~' => out.push(b),
            _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    out.push(b'"');
    out
}

/// An inline argument as (what is sent, what it means): a bare word, or a quoted one.
fn inline_arg() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let word = "[A-Za-z0-9:_.{}$*+-]{1,12}";
    prop_oneof![
        3 => word.prop_map(|w| (w.clone().into_bytes(), w.into_bytes())),
        1 => "[A-Za-z0-9 :'_-]{0,12}".prop_map(|w| (format!("\"{w}\"").into_bytes(), w.into_bytes())),
        1 => "[A-Za-z0-9 :\"_-]{0,12}".prop_map(|w| (format!("'{w}'").into_bytes(), w.into_bytes())),
        // In single quotes only \' is an escape.
        1 => "[A-Za-z0-9 :'\"_-]{0,12}"
            .prop_map(|w| (format!("'{}'", w.replace('\'', "\\'")).into_bytes(), w.into_bytes())),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| (double_quoted(&b), b)),
    ]
}

/// An inline command: its bytes and the arguments it holds.
fn inline_command() -> impl Strategy<Value = (Vec<u8>, Command)> {
    (
        // The first word must not start with '*', which would make it a multibulk request.
        "[A-Za-z][A-Za-z0-9]{0,7}",
        prop::collection::vec((inline_arg(), "[ \t]{1,3}"), 0..8),
        "[ \t]{0,2}",
        prop_oneof![Just("\r\n"), Just("\n")],
    )
        .prop_map(|(name, rest, trailing, eol)| {
            let mut bytes = name.clone().into_bytes();
            let mut args = vec![name.into_bytes()];
            for ((raw, arg), sep) in rest {
                bytes.extend_from_slice(sep.as_bytes());
                bytes.extend_from_slice(&raw);
                args.push(arg);
            }
            bytes.extend_from_slice(trailing.as_bytes());
            bytes.extend_from_slice(eol.as_bytes());
            (bytes, args)
        })
}

// ---------------------------------------------------------------------------------------------
// Replies (RESP2).

#[derive(Debug, Clone)]
enum Reply {
    Simple(Vec<u8>),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    NullBulk,
    NullArray,
    Array(Vec<Reply>),
}

fn reply() -> impl Strategy<Value = Reply> {
    let leaf = prop_oneof![
        // Simple strings and errors hold no CR or LF.
        prop::collection::vec(any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'), 0..24)
            .prop_map(Reply::Simple),
        "[ -~]{0,40}".prop_map(Reply::Error),
        any::<i64>().prop_map(Reply::Integer),
        bulk().prop_map(Reply::Bulk),
        Just(Reply::NullBulk),
        Just(Reply::NullArray),
    ];
    // Depth 4: arrays inside arrays inside arrays inside arrays.
    leaf.prop_recursive(4, 64, 6, |inner| prop::collection::vec(inner, 0..6).prop_map(Reply::Array))
}

fn encode_reply(out: &mut Vec<u8>, reply: &Reply) {
    match reply {
        Reply::Simple(s) => {
            out.push(b'+');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Error(s) => {
            out.push(b'-');
            out.extend_from_slice(s.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Reply::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Reply::Bulk(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Reply::NullBulk => out.extend_from_slice(b"$-1\r\n"),
        Reply::NullArray => out.extend_from_slice(b"*-1\r\n"),
        Reply::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                encode_reply(out, item);
            }
        }
    }
}

/// What the reference decoder must make of a generated reply.
fn expected_frame(reply: &Reply) -> OwnedFrame {
    match reply {
        Reply::Simple(s) => OwnedFrame::SimpleString(s.clone()),
        Reply::Error(s) => OwnedFrame::Error(s.clone()),
        Reply::Integer(n) => OwnedFrame::Integer(*n),
        Reply::Bulk(b) => OwnedFrame::BulkString(b.clone()),
        Reply::NullBulk | Reply::NullArray => OwnedFrame::Null,
        Reply::Array(items) => OwnedFrame::Array(items.iter().map(expected_frame).collect()),
    }
}

/// Feeds `input` to a scanner in chunks; returns (length, error flag) of each reply found.
fn scan_in_chunks(input: &[u8], cuts: &Cuts) -> (Vec<(usize, bool)>, Vec<u8>) {
    let mut scanner = ReplyScanner::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for range in cuts.ranges(input.len()) {
        buf.extend_from_slice(&input[range]);
        while let Some(r) = scanner.next(&buf).expect("valid replies must scan") {
            assert!(r.len > 0 && r.len <= buf.len(), "reply {r:?} in {} bytes", buf.len());
            assert!(!r.push, "RESP2 has no pushes: {r:?}");
            out.push((r.len, r.error));
            buf.drain(..r.len);
        }
    }
    (out, buf)
}

// ---------------------------------------------------------------------------------------------
// Arbitrary bytes.

/// Random bytes, often made of RESP's own characters so that parsing gets somewhere.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let resp_byte = prop::sample::select(b"*$+-:!=%~>|_#,(\r\n\r\n0123456789 \t\"'\\xA".to_vec());
    let piece = prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..64),
        4 => prop::collection::vec(resp_byte, 0..64),
        1 => (prop::sample::select(vec!["*", "$", "*-", "$-", ":", "%", "|", ">"]), any::<i64>())
            .prop_map(|(p, n)| format!("{p}{n}\r\n").into_bytes()),
        1 => prop::sample::select(vec![
            &b"*2147483648\r\n"[..], b"$99999999999999999999\r\n", b"*-1\r\n", b"$-5\r\n", b"*0\r\n",
            b"SET \"k\r\n", b"GET 'x\r\n", b"\n", b"*1\r\n$3\r\nabc", b"*1\r\n$3\r\nabcde\r\n",
            b"*x\r\n", b"$1a\r\n", b"*1\r\n$1\r\n", b"\r\n",
        ])
        .prop_map(|b| b.to_vec()),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

/// Feeds arbitrary bytes to a request parser until it errs or wants more; checks invariants.
fn request_parser_survives(input: &[u8], cuts: &Cuts, limits: Limits) {
    let mut parser = RequestParser::new();
    let mut buf = Vec::new();
    for range in cuts.ranges(input.len()) {
        buf.extend_from_slice(&input[range]);
        loop {
            match parser.next(&buf, limits) {
                Ok(Some(frame)) => {
                    assert!(
                        frame.len > 0 && frame.len <= buf.len(),
                        "frame {frame:?} in {} bytes",
                        buf.len()
                    );
                    assert!(frame.inline || parser.args().len() <= limits.max_args);
                    for r in parser.args() {
                        assert!(r.start <= r.end && r.end <= frame.len, "arg {r:?} outside {frame:?}");
                        if !frame.inline {
                            assert!(r.len() <= limits.max_bulk, "arg {r:?} over {limits:?}");
                        }
                    }
                    buf.drain(..frame.len);
                }
                Ok(None) => break,
                // The session answers the error and closes the connection.
                Err(_) => return,
            }
        }
    }
}

fn reply_scanner_survives(input: &[u8], cuts: &Cuts) {
    let mut scanner = ReplyScanner::new();
    let mut buf = Vec::new();
    for range in cuts.ranges(input.len()) {
        buf.extend_from_slice(&input[range]);
        loop {
            match scanner.next(&buf) {
                Ok(Some(r)) => {
                    assert!(r.len > 0 && r.len <= buf.len(), "reply {r:?} in {} bytes", buf.len());
                    buf.drain(..r.len);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// (a) A pipeline of commands parses back to the same commands, however it is split, and
    /// agrees frame by frame with the reference decoder.
    #[test]
    fn pipelines_parse_like_the_reference(
        commands in prop::collection::vec(command(), 1..8),
        cuts in cuts(),
    ) {
        let mut input = Vec::new();
        let mut lens = Vec::new();
        for cmd in &commands {
            let before = input.len();
            encode_command(&mut input, cmd);
            lens.push(input.len() - before);
        }

        let (parsed, left) = parse_in_chunks(&input, &cuts, BIG);
        prop_assert!(left.is_empty(), "left over: {:?}", left);
        prop_assert!(parsed.iter().all(|p| !p.inline));
        let got: Vec<&Command> = parsed.iter().map(|p| &p.args).collect();
        let want: Vec<&Command> = commands.iter().collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(parsed.iter().map(|p| p.len).collect::<Vec<_>>(), lens.clone());

        let reference = reference_frames(&input);
        prop_assert_eq!(reference.iter().map(|(_, len)| *len).collect::<Vec<_>>(), lens);
        let reference: Vec<Command> = reference.into_iter().map(|(f, _)| reference_command(f)).collect();
        prop_assert_eq!(got, reference.iter().collect::<Vec<_>>());
    }

    /// Inline commands mixed into a pipeline parse to their words, however they are split.
    #[test]
    fn inline_commands_parse_to_their_words(
        requests in prop::collection::vec(
            prop_oneof![
                inline_command().prop_map(|(b, args)| (b, args, true)),
                command().prop_map(|cmd| {
                    let mut b = Vec::new();
                    encode_command(&mut b, &cmd);
                    (b, cmd, false)
                }),
            ],
            1..8,
        ),
        cuts in cuts(),
    ) {
        let input: Vec<u8> = requests.iter().flat_map(|(b, _, _)| b.iter().copied()).collect();
        let (parsed, left) = parse_in_chunks(&input, &cuts, BIG);
        prop_assert!(left.is_empty(), "left over: {:?}", left);
        let want: Vec<Parsed> = requests
            .into_iter()
            .map(|(b, args, inline)| Parsed { args, len: b.len(), inline })
            .collect();
        prop_assert_eq!(parsed, want);
    }

    /// (b) Replies are cut where the reference decoder cuts them, however they are split.
    #[test]
    fn reply_boundaries_match_the_reference(
        replies in prop::collection::vec(reply(), 1..8),
        cuts in cuts(),
    ) {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for r in &replies {
            let before = input.len();
            encode_reply(&mut input, r);
            want.push((input.len() - before, matches!(r, Reply::Error(_))));
        }

        let (got, left) = scan_in_chunks(&input, &cuts);
        prop_assert!(left.is_empty(), "left over: {:?}", left);
        prop_assert_eq!(&got, &want);

        let reference = reference_frames(&input);
        let reference_lens: Vec<usize> = reference.iter().map(|(_, len)| *len).collect();
        prop_assert_eq!(got.iter().map(|(len, _)| *len).collect::<Vec<_>>(), reference_lens);
        // The generator's encoding is what the reference decoder thinks it is.
        let frames: Vec<OwnedFrame> = reference.into_iter().map(|(f, _)| f).collect();
        prop_assert_eq!(frames, replies.iter().map(expected_frame).collect::<Vec<_>>());
    }

    /// (c) Arbitrary bytes never make either parser panic or report a frame it doesn't hold.
    #[test]
    fn arbitrary_bytes_never_panic(input in noise(), cuts in cuts()) {
        request_parser_survives(&input, &cuts, BIG);
        request_parser_survives(&input, &cuts, Limits::UNAUTHENTICATED);
        reply_scanner_survives(&input, &cuts);
    }

    /// (c) The same with uniformly random bytes.
    #[test]
    fn uniform_random_bytes_never_panic(
        input in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in cuts(),
    ) {
        request_parser_survives(&input, &cuts, BIG);
        request_parser_survives(&input, &cuts, Limits::UNAUTHENTICATED);
        reply_scanner_survives(&input, &cuts);
    }
}

/// Lines longer than Valkey's 64 KB inline limit are refused, not buffered without end.
#[test]
fn overlong_lines_are_refused() {
    let long = vec![b'7'; 70 * 1024];
    for prefix in [&b"*"[..], b"*1\r\n$", b"PING "] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&long);
        let err = RequestParser::new().next(&input, BIG).expect_err("over the line limit");
        assert!(err.0.starts_with("too big"), "{prefix:?}: {err}");
    }
}
