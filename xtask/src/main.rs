//! Developer tasks: `setup`, `build`, `test`, `run`, `demo`, `bench`, `xdp-bench`, `fuzz`,
//! `soak`. `cargo xtask test` is the one command that takes a fresh machine to green tests;
//! `.ci/run` calls exactly that. `cargo xtask fuzz --seconds N` runs every cargo-fuzz
//! target (`fuzz/`, nightly) for N seconds; it is not part of `test`. `cargo xtask soak
//! --minutes N` (or `--seconds N`) runs mixed and hostile traffic through a real agent and
//! fails if its RSS, fds, map entries or kernel TCP memory grow; not part of `test` or CI.

mod bench;
mod fuzz;
mod setup;
mod soak;
mod xdp_bench;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "forwarder developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need and is missing (idempotent).
    Setup,
    /// Build the eBPF object and the agent that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, fmt check, clippy, then every unit and integration test (as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Setup, build, then run the agent (no arguments: the built-in demo).
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Packets per second dropped by the XDP guard vs the same rule in nftables (root).
    XdpBench,
    /// A newcomer's tour: a local stand-in hub, the forwarder in front, real MQTT, AMQP,
    /// HTTPS and WebSocket traffic through it, then the `conns` and `stats` tables (root).
    Demo,
    /// Throughput, latency, connection rate and CPU cost of the forwarder side by side with
    /// the direct path, HAProxy and nginx, on loopback and across namespaces (root).
    Bench(bench::Options),
    /// Every cargo-fuzz target in `fuzz/` for a bounded time each (nightly, ASan);
    /// fails on a crash and names the input. Installs cargo-fuzz if missing.
    Fuzz(fuzz::Options),
    /// Mixed MQTT, AMQP, HTTPS and WebSocket traffic plus waves of hostile clients for N
    /// minutes; samples the agent's RSS, fds, map entries and kernel TCP memory and fails
    /// if any grows or legitimate traffic fails (root; not in CI).
    Soak(soak::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => build(release),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::XdpBench => xdp_bench::run(),
        Task::Demo => {
            setup::run()?;
            run(cargo().args([
                "run",
                "--release",
                "--package",
                "forwarder-tests",
                "--bin",
                "demo",
            ]))
        }
        Task::Bench(options) => bench::run(&options),
        Task::Fuzz(options) => fuzz::run(&options),
        Task::Soak(options) => soak::run(&options),
        Task::Run { args } => {
            setup::run()?;
            build(true)?;
            let mut cmd = Command::new("target/release/forwarder");
            if args.is_empty() {
                cmd.arg("run");
            } else {
                cmd.args(&args);
            }
            run(&mut cmd)
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "forwarder"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(cargo_test_args: &[String]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if !setup::is_root() {
        bail!("the tests load eBPF programs and create network namespaces: run them as root");
    }
    setup::run()?;
    build(false)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "forwarder-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate is checked for its real target, where its code is compiled.
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "forwarder-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Zbuild-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "forwarder-ebpf"]);
    if !cargo_test_args.is_empty() {
        cmd.arg("--").args(cargo_test_args);
    }
    run(&mut cmd)?;
    eprintln!(
        "xtask: all checks and tests passed in {:.0?}",
        started.elapsed()
    );
    Ok(())
}
