//! Shared helpers for the integration tests (and the bench's and soak's load generators):
//! privilege checks, payloads, hashing, and TCP pairs on loopback with ephemeral ports.

pub mod agent;
pub mod clients;
pub mod echo;
pub mod hub;
pub mod netns;
pub mod peers;
pub mod pki;
pub mod rawtcp;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// Routes the agent's tracing output to the test's captured output (RUST_LOG to tune).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "forwarder=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// These tests load real eBPF programs: without root they must fail, never skip.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn require_root() {
    init_logging();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load eBPF into the kernel and need root (run `cargo xtask test` as root)"
    );
}

/// Raises this process's soft limit of open descriptors to its hard limit: a test that
/// holds thousands of connections (client, agent and upstream sockets all in one process)
/// would otherwise hit a soft limit of 1,024 and fail with EMFILE. Returns the new limit.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the pointer, which outlives the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit(RLIMIT_NOFILE) failed");
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        assert_eq!(rc, 0, "setrlimit(RLIMIT_NOFILE) failed");
    }
    limit.rlim_cur
}

pub fn random_payload(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rand::rng().fill_bytes(&mut buf);
    buf
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A connected TCP pair on loopback: (the side a peer holds, the side the forwarder holds).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback listener");
    let addr = listener.local_addr().expect("listener address");
    let outer = TcpStream::connect(addr).expect("connect loopback");
    let (inner, _) = listener.accept().expect("accept loopback");
    (outer, inner)
}

/// Writes `payload` then half-closes, in a thread; returns the handle.
pub fn spawn_writer(mut stream: TcpStream, payload: Vec<u8>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        stream.write_all(&payload).expect("write payload");
        stream
            .shutdown(Shutdown::Write)
            .expect("half-close after payload");
    })
}

/// Reads until EOF with a deadline (so a lost byte fails the test instead of hanging it).
pub fn read_to_end_within(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream
        .set_read_timeout(Some(limit))
        .expect("set read timeout");
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .unwrap_or_else(|err| panic!("reading to EOF failed after {} bytes: {err}", out.len()));
    out
}

/// The process exists and has not exited: a zombie (exited, waiting for a parent that
/// may be gone, as an upgraded agent's is) counts as gone.
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// The `forwarder` binary itself (built by `cargo xtask test` before the tests run):
/// target/<profile>/deps/<test> -> target/<profile>/forwarder.
pub fn forwarder_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let binary = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join("forwarder"))
        .expect("target directory");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p forwarder; cargo xtask test does)",
        binary.display()
    );
    binary
}
