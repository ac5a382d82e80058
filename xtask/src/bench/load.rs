//! Load generators: iperf3 for one-way bulk, and small blocking-socket clients for echo
//! bulk, 64-byte ping-pong and connection setup, against our own echo server. Clients and
//! servers run on threads moved into their namespace (see `Topology::enter`).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::topology::{Role, Topology};

/// Every socket operation gives up after this: a stalled path ends the run, not the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(4);

/// Echoes whatever arrives, one thread per connection, until the process ends.
pub fn start_echo_server(topology: &Topology, addr: SocketAddr) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let enter = topology.enter_fn(Role::Server);
    std::thread::spawn(move || {
        let listener = enter().and_then(|()| Ok(TcpListener::bind(addr)?));
        let listener = match listener {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(err) => {
                let _ = ready_tx.send(Err(err));
                return;
            }
        };
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || echo(stream));
        }
    });
    ready_rx
        .recv()
        .context("echo server thread ended")?
        .context("starting the echo server")
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Runs `f` on a thread inside `role`'s namespace.
fn in_ns<T: Send + 'static>(
    topology: &Topology,
    role: Role,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let enter = topology.enter_fn(role);
    std::thread::spawn(move || {
        enter()?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("load thread panicked"))?
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Bulk figures: payload bytes delivered to the receiving application, and over what time.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    pub bytes: u64,
    pub seconds: f64,
}

impl Bulk {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// iperf3 one way, client to server, `streams` parallel connections.
pub fn iperf(
    topology: &Topology,
    addr: SocketAddr,
    streams: usize,
    seconds: u64,
) -> anyhow::Result<Bulk> {
    let out = topology
        .command(Role::Client, "iperf3")
        .args([
            "-J",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
        ])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
        .output()
        .context("running iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(err) = json.get("error") {
        bail!("iperf3 to {addr}: {err}");
    }
    let received = &json["end"]["sum_received"];
    let bytes = received["bytes"]
        .as_u64()
        .context("iperf3: no received bytes")?;
    let seconds = received["seconds"].as_f64().context("iperf3: no seconds")?;
    Ok(Bulk { bytes, seconds })
}

/// `streams` connections each writing 128 KiB chunks as fast as they can while reading
/// the echo back; counts bytes echoed back within `duration`.
pub fn echo_bulk(
    topology: &Topology,
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
) -> anyhow::Result<Bulk> {
    in_ns(topology, Role::Client, move || {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..streams {
            let stream = connect(addr)?;
            let mut writer = stream.try_clone()?;
            let mut reader = stream;
            let stop_w = stop.clone();
            threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
                let chunk = vec![0x5au8; 128 * 1024];
                while !stop_w.load(Ordering::Relaxed) {
                    writer.write_all(&chunk)?;
                }
                writer.shutdown(Shutdown::Write)?;
                Ok(())
            }));
            let received = received.clone();
            threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(err) if err.kind() == ErrorKind::Interrupted => {}
                        Err(err) => return Err(err.into()),
                    }
                }
            }));
        }
        let started = Instant::now();
        let at_start = received.load(Ordering::Relaxed);
        std::thread::sleep(duration);
        let bytes = received.load(Ordering::Relaxed) - at_start;
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
                .context("echo bulk stream")?;
        }
        Ok(Bulk { bytes, seconds })
    })
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

fn percentiles(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Latency {
        p50_us: pick(0.5),
        p99_us: pick(0.99),
    }
}

/// 64-byte messages back and forth over one connection (after a warm-up), for `duration`.
pub fn ping_pong(
    topology: &Topology,
    addr: SocketAddr,
    duration: Duration,
) -> anyhow::Result<Latency> {
    in_ns(topology, Role::Client, move || {
        let mut s = connect(addr)?;
        s.set_nodelay(true)?;
        let mut buf = [7u8; 64];
        for _ in 0..500 {
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
        }
        let mut samples = Vec::with_capacity(100_000);
        let started = Instant::now();
        while started.elapsed() < duration {
            let t = Instant::now();
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            samples.push(t.elapsed());
        }
        Ok(percentiles(samples))
    })
}

/// Connection setup: `clients` threads each connect, send one byte, wait for its echo
/// (time to first byte, from before connect), then reset the connection (no TIME_WAIT on
/// the client), for `duration`.
pub fn connect_rate(
    topology: &Topology,
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Latency)> {
    in_ns(topology, Role::Client, move || {
        let started = Instant::now();
        let mut threads = Vec::new();
        for _ in 0..clients {
            threads.push(std::thread::spawn(
                move || -> anyhow::Result<Vec<Duration>> {
                    let mut samples = Vec::new();
                    while started.elapsed() < duration {
                        let t = Instant::now();
                        let mut s = connect(addr)?;
                        s.set_nodelay(true)?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        samples.push(t.elapsed());
                        set_linger_zero(&s);
                    }
                    Ok(samples)
                },
            ));
        }
        let mut all = Vec::new();
        for t in threads {
            all.extend(
                t.join()
                    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
                    .context("connection setup")?,
            );
        }
        let rate = all.len() as f64 / started.elapsed().as_secs_f64();
        Ok((rate, percentiles(all)))
    })
}

#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
}
