//! The fleet part of `cargo xtask bench`: thousands of IoT-shaped connections, which the
//! bench's thread-per-connection echo server and blocking clients cannot carry. One
//! program, run by xtask inside the right namespace:
//!
//!   fleet echo-server --listen ADDR [--tls CERT KEY]
//!   fleet fleet --target ADDR --conns N --rate R --size S --secs T
//!   fleet storm --target ADDR --conns N --tls-ca CA --sni NAME
//!
//! `fleet` prints `connected ok=N failed=F`, `measure-start` and `measure-end` as it
//! reaches each phase (xtask samples CPU and memory on those lines), then one JSON line.
//! `storm` prints one JSON line.

mod load;
mod stats;
mod storm;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "fleet load generator and echo servers for cargo xtask bench")]
struct Cli {
    /// Runtime worker threads (1: a current-thread runtime, the cheapest per message).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echoes every byte back, plain TCP or TLS (the stand-in hub).
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
        /// Certificate chain and key (PEM): terminate TLS and echo the plaintext.
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
        tls: Option<Vec<PathBuf>>,
    },
    /// N connections each sending S bytes R times a second and timing the echo.
    Fleet(load::Args),
    /// N TLS devices connecting at once, each sending one message and awaiting its echo.
    Storm(storm::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let wanted = match &cli.mode {
        Mode::EchoServer { .. } => 0,
        Mode::Fleet(args) => args.conns,
        Mode::Storm(args) => args.conns,
    };
    raise_nofile(wanted);
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;
    runtime.block_on(async move {
        match cli.mode {
            Mode::EchoServer { listen, tls } => {
                let tls = tls.and_then(|v| Some((v.first()?.clone(), v.get(1)?.clone())));
                forwarder_tests::echo::serve(listen, tls).await
            }
            Mode::Fleet(args) => load::run(args).await,
            Mode::Storm(args) => storm::run(args).await,
        }
    })
}

/// Thousands of sockets need thousands of descriptors: the soft limit goes to the hard
/// one, and (as root) the hard one up to what `connections` need, so an echo server or a
/// generator never fails on EMFILE halfway through a run. Failures are only reported: a
/// run that then lacks descriptors says so in its connection errors.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn raise_nofile(connections: usize) {
    let need = (connections as u64 * 2 + 1024).max(65_536);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: need.max(limit.rlim_max).min(nr_open),
        rlim_max: need.max(limit.rlim_max).min(nr_open),
    };
    // SAFETY: setrlimit reads the struct; raising the hard limit needs root, else we fall
    // back to the current hard limit below.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return;
    }
    let soft_only = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above; the soft limit may always go up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft_only) } != 0 {
        eprintln!("fleet: could not raise RLIMIT_NOFILE");
    } else if limit.rlim_max < connections as u64 + 256 {
        eprintln!(
            "fleet: RLIMIT_NOFILE {} is short of {connections} connections",
            limit.rlim_max
        );
    }
}
