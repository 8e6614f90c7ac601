//! Floor servers for `bench/gateway.sh` (`BENCH_FLOOR=1`): the least CPU a RESP endpoint can
//! spend per request on this machine. They answer redis-benchmark's SET and GET with canned
//! replies (`+OK`, a 100-byte bulk string) and have no upstream at all, so their CPU time per
//! request is the client side's system calls and TCP work alone: what any proxy pays before
//! it does anything.
//!
//!   floor epoll PORT   one thread, edge-triggered epoll; one read and one write per request
//!                      (as twemproxy, Valkey and the gateway do unpipelined)
//!   floor uring PORT   one thread, io_uring (single issuer, deferred task work): the receives
//!                      and sends of every connection ready in one loop turn go to the kernel
//!                      in one io_uring_enter

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

const READ_BUFFER: usize = 16 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(port)) = (args.get(1), args.get(2).and_then(|p| p.parse::<u16>().ok())) else {
        eprintln!("usage: floor epoll|uring PORT");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let result = match mode.as_str() {
        "epoll" => serve_epoll(listener),
        "uring" => serve_uring(listener),
        _ => {
            eprintln!("unknown mode {mode}: epoll or uring");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("floor {mode}: {e}");
        std::process::exit(1);
    }
}

/// A connection's requests not yet answered in full: the tail of the last read, if a
/// command was split between reads.
#[derive(Default)]
struct Requests {
    pending: Vec<u8>,
}

impl Requests {
    /// Appends the replies to every whole command in `pending` + `input` to `out`.
    fn answer(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let owned;
        let bytes: &[u8] = if self.pending.is_empty() {
            input
        } else {
            self.pending.extend_from_slice(input);
            owned = std::mem::take(&mut self.pending);
            &owned
        };
        let mut at = 0;
        while let Some((name, len)) = command(&bytes[at..]) {
            out.extend_from_slice(reply_to(name));
            at += len;
        }
        self.pending.extend_from_slice(&bytes[at..]);
    }
}

fn reply_to(name: &[u8]) -> &'static [u8] {
    const BULK: &[u8] = b"$100\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";
    match name.first().map(u8::to_ascii_uppercase) {
        Some(b'G') => BULK,
        Some(b'P') => b"+PONG\r\n",
        Some(b'S') => b"+OK\r\n",
        // redis-benchmark's CONFIG GET at start: it carries on without the answer.
        _ => b"-ERR floor answers SET, GET and PING only\r\n",
    }
}

/// The first whole RESP array command in `bytes`: its name and its length in bytes.
fn command(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let (count, mut at) = header(bytes, b'*')?;
    let mut name: &[u8] = &[];
    for i in 0..count {
        let (len, start) = header(&bytes[at..], b'$')?;
        let end = at + start + len;
        if bytes.len() < end + 2 {
            return None;
        }
        if i == 0 {
            name = &bytes[at + start..end];
        }
        at = end + 2;
    }
    Some((name, at))
}

/// `<prefix><digits>\r\n` at the start of `bytes`: the number and where what follows starts.
fn header(bytes: &[u8], prefix: u8) -> Option<(usize, usize)> {
    if bytes.first() != Some(&prefix) {
        return None;
    }
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let digits = std::str::from_utf8(&bytes[1..newline.checked_sub(1)?]).ok()?;
    Some((digits.parse().ok()?, newline + 1))
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn serve_epoll(listener: TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let epoll = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    let watch = |fd: RawFd, events: u32| {
        let mut event = libc::epoll_event { events, u64: fd as u64 };
        check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) })
    };
    let listener_fd = listener.as_raw_fd();
    watch(listener_fd, libc::EPOLLIN as u32)?;
    let mut conns: HashMap<RawFd, (TcpStream, Requests)> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; READ_BUFFER];
    let mut out = Vec::with_capacity(READ_BUFFER);
    loop {
        let ready = check(unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 256, -1) })?;
        for event in &events[..ready as usize] {
            let fd = event.u64 as RawFd;
            if fd == listener_fd {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    let fd = stream.as_raw_fd();
                    watch(fd, (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLRDHUP) as u32)?;
                    conns.insert(fd, (stream, Requests::default()));
                }
                continue;
            }
            let Some((stream, requests)) = conns.get_mut(&fd) else { continue };
            let mut closed = false;
            // Edge-triggered: read until a read comes back short (as tokio does), then wait.
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        out.clear();
                        requests.answer(&buf[..n], &mut out);
                        if stream.write_all(&out).is_err() {
                            closed = true;
                            break;
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                conns.remove(&fd);
            }
        }
    }
}

const ACCEPT: u64 = u64::MAX;
const SEND_FLAG: u64 = 1 << 32;

struct UringConn {
    fd: RawFd,
    read: Box<[u8]>,
    /// The reply being sent (the kernel reads it until its completion) and its progress.
    sending: Vec<u8>,
    sent: usize,
    /// Replies made while a send was in flight.
    next: Vec<u8>,
    requests: Requests,
}

fn serve_uring(listener: TcpListener) -> io::Result<()> {
    use io_uring::{opcode, squeue, types, IoUring};
    let mut ring: IoUring = IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(4096)?;
    let listener_fd = listener.into_raw_fd();
    let mut conns: HashMap<RawFd, UringConn> = HashMap::new();
    let mut queue: Vec<squeue::Entry> =
        vec![opcode::AcceptMulti::new(types::Fd(listener_fd)).build().user_data(ACCEPT)];
    let recv = |conn: &mut UringConn| {
        opcode::Recv::new(types::Fd(conn.fd), conn.read.as_mut_ptr(), conn.read.len() as u32)
            .build()
            .user_data(conn.fd as u64)
    };
    let send = |conn: &UringConn| {
        let rest = &conn.sending[conn.sent..];
        opcode::Send::new(types::Fd(conn.fd), rest.as_ptr(), rest.len() as u32)
            .build()
            .user_data(SEND_FLAG | conn.fd as u64)
    };
    let mut completions = Vec::new();
    loop {
        {
            let mut sq = ring.submission();
            for entry in queue.drain(..) {
                // Safety: every buffer an entry points at lives in its connection, which is
                // kept until the connection closes.
                unsafe { sq.push(&entry) }.expect("submission queue holds the loop's entries");
            }
        }
        ring.submit_and_wait(1)?;
        completions.extend(ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        for (data, result, flags) in completions.drain(..) {
            if data == ACCEPT {
                if result >= 0 {
                    let stream = unsafe { TcpStream::from_raw_fd(result) };
                    stream.set_nodelay(true)?;
                    let fd = stream.into_raw_fd();
                    let mut conn = UringConn {
                        fd,
                        read: vec![0u8; READ_BUFFER].into_boxed_slice(),
                        sending: Vec::new(),
                        sent: 0,
                        next: Vec::new(),
                        requests: Requests::default(),
                    };
                    queue.push(recv(&mut conn));
                    conns.insert(fd, conn);
                }
                if !io_uring::cqueue::more(flags) {
                    queue.push(opcode::AcceptMulti::new(types::Fd(listener_fd)).build().user_data(ACCEPT));
                }
                continue;
            }
            let fd = (data & 0xffff_ffff) as RawFd;
            let Some(conn) = conns.get_mut(&fd) else { continue };
            if result == -libc::EAGAIN && data & SEND_FLAG == 0 {
                queue.push(recv(conn));
                continue;
            }
            if result <= 0 {
                unsafe { libc::close(fd) };
                conns.remove(&fd);
                continue;
            }
            if data & SEND_FLAG != 0 {
                conn.sent += result as usize;
                if conn.sent == conn.sending.len() {
                    conn.sending.clear();
                    conn.sent = 0;
                    if !conn.next.is_empty() {
                        std::mem::swap(&mut conn.sending, &mut conn.next);
                        queue.push(send(conn));
                    }
                } else {
                    queue.push(send(conn));
                }
                continue;
            }
            let UringConn { read, sending, next, requests, .. } = conn;
            let was_sending = !sending.is_empty();
            let out = if was_sending { next } else { sending };
            requests.answer(&read[..result as usize], out);
            if !was_sending && !conn.sending.is_empty() {
                queue.push(send(conn));
            }
            queue.push(recv(conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_whole_commands_and_keeps_a_split_one() {
        let mut requests = Requests::default();
        let mut out = Vec::new();
        requests.answer(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGE", &mut out);
        assert_eq!(out, b"+OK\r\n");
        out.clear();
        requests.answer(b"T\r\n$1\r\nk\r\n", &mut out);
        assert!(out.starts_with(b"$100\r\n"));
        assert!(requests.pending.is_empty());
    }
}
