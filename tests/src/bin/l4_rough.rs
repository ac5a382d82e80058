//! A first rough round-trip measurement of the L4 path (not the benchmark): 64-byte
//! ping-pong over one connection, direct to an echo server, through the kernel splice,
//! and through the userspace copy. Loopback, one process: the ratios are the point.
//!
//! Usage: l4_rough [ROUND_TRIPS]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use forwarder::agent::{self, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};

fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = [0u8; 64];
                let mut s = stream;
                while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
            });
        }
    });
    Ok(addr)
}

fn ping_pong(addr: SocketAddr, round_trips: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    // Warm up (and let the splice settle) before measuring.
    for _ in 0..1_000 {
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
    }
    let mut samples = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let started = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples)
}

async fn forwarder(
    upstream: SocketAddr,
    no_ebpf: bool,
) -> anyhow::Result<(SocketAddr, impl Sized)> {
    let config = Config::new(
        format!("l4-rough-{}-{no_ebpf}", std::process::id()),
        vec![Frontend::new(
            "echo",
            "127.0.0.1:0".parse()?,
            Mode::Splice,
            "echo",
        )],
        vec![Backend::new("echo", &upstream.to_string())],
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let options = RunOptions {
        no_ebpf,
        ..Default::default()
    };
    let (running, datapath) = agent::start(&config, &options, stopped).await?;
    let addr = running[0].addr;
    // Keeps the agent (stop sender, eBPF data path, counters) alive while measuring.
    Ok((addr, (stop, datapath, running)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let round_trips: usize = std::env::args().nth(1).map_or(Ok(20_000), |s| s.parse())?;
    let echo = echo_server()?;
    let (kernel, _k) = forwarder(echo, false).await?;
    let (userspace, _u) = forwarder(echo, true).await?;
    println!("| path | round trips | p50 | p99 | mean |");
    println!("|---|---|---|---|---|");
    for round in 1..=2 {
        for (label, addr) in [
            ("direct", echo),
            ("forwarder, kernel splice", kernel),
            ("forwarder, userspace copy", userspace),
        ] {
            let samples =
                tokio::task::spawn_blocking(move || ping_pong(addr, round_trips)).await??;
            let pick =
                |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            println!(
                "| {label} (round {round}) | {round_trips} | {:.1} us | {:.1} us | {:.1} us |",
                pick(0.5).as_secs_f64() * 1e6,
                pick(0.99).as_secs_f64() * 1e6,
                mean.as_secs_f64() * 1e6
            );
        }
    }
    Ok(())
}
