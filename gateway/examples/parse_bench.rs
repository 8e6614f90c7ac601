//! Request framing cost: Shoal's incremental parser vs the redis-protocol crate's decoder,
//! on what a proxy sees — requests arriving in 16 KiB reads. A decoder that cannot resume
//! must re-decode from the start of the buffer on every read; for a 64 MB value that is
//! quadratic. Run with `bench/parser.sh` (release build).

use redis_protocol::resp2::decode::decode;
use shoal_gateway::resp::request::{Limits, RequestParser};
use std::time::Instant;

const CHUNK: usize = 16 * 1024;
const LIMITS: Limits = Limits::authenticated(1 << 20, 512 << 20);

fn set_command(value_len: usize) -> Vec<u8> {
    let mut out = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${value_len}\r\n").into_bytes();
    out.resize(out.len() + value_len, b'x');
    out.extend_from_slice(b"\r\n");
    out
}

fn pipeline(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("*2\r\n$3\r\nGET\r\n${}\r\nkey:{i}\r\n", 4 + i.to_string().len()).into_bytes())
        .collect()
}

/// Feeds `input` in reads of CHUNK bytes; returns how many frames were found.
fn shoal(input: &[u8]) -> usize {
    let mut parser = RequestParser::new();
    let (mut start, mut end, mut frames) = (0, 0, 0);
    while end < input.len() {
        end = (end + CHUNK).min(input.len());
        while let Some(frame) = parser.next(&input[start..end], LIMITS).unwrap() {
            start += frame.len;
            frames += 1;
        }
    }
    frames
}

fn redis_protocol(input: &[u8]) -> usize {
    let (mut start, mut end, mut frames) = (0, 0, 0);
    while end < input.len() {
        end = (end + CHUNK).min(input.len());
        while let Some((_, len)) = decode(&input[start..end]).unwrap() {
            start += len;
            frames += 1;
        }
    }
    frames
}

fn time(f: impl Fn(&[u8]) -> usize, input: &[u8], rounds: u32) -> (f64, usize) {
    let started = Instant::now();
    let mut frames = 0;
    for _ in 0..rounds {
        frames = f(input);
    }
    (started.elapsed().as_secs_f64() / rounds as f64, frames)
}

fn main() {
    println!("{:<34} {:>14} {:>16} {:>8}", "input (16 KiB reads)", "shoal", "redis-protocol", "ratio");
    for (name, input, rounds) in [
        ("SET with a 1 MB value", set_command(1 << 20), 50),
        ("SET with a 64 MB value", set_command(64 << 20), 3),
        ("pipeline of 100,000 GETs", pipeline(100_000), 10),
    ] {
        let (ours, a) = time(shoal, &input, rounds);
        let (theirs, b) = time(redis_protocol, &input, rounds);
        assert_eq!(a, b, "both find the same frames");
        println!("{name:<34} {:>11.3} ms {:>13.3} ms {:>7.1}x", ours * 1e3, theirs * 1e3, theirs / ours);
    }
}
