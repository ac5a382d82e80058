//! The reconnect storm: after a hub or network blip every device reconnects at once, with a
//! full TLS handshake each (devices hold no session tickets for a proxy they never knew),
//! through proxies that pass TLS through at L4 to the hub.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::stats::Sample;

/// The device's first message after connecting (a small MQTT CONNECT is about this size).
const MESSAGE: usize = 64;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// CA certificate (PEM) the devices trust.
    #[arg(long)]
    tls_ca: PathBuf,
    /// Server name the devices ask for and verify (the hub's, passed through).
    #[arg(long)]
    sni: String,
    /// Devices without their first echo after this many seconds count as failed.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let connector = tokio_rustls::TlsConnector::from(client_config(&args.tls_ca)?);
    let name = ServerName::try_from(args.sni.clone()).context("--sni")?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout);
    let mut devices = JoinSet::new();
    for _ in 0..args.conns {
        let (connector, name) = (connector.clone(), name.clone());
        devices.spawn(async move {
            let first = tokio::time::timeout_at(deadline, device(args.target, connector, name));
            match first.await {
                // Timed here, not when joined: the join may come later.
                Ok(result) => result.map(|tls| (tls, started.elapsed())),
                Err(_) => Err(anyhow::anyhow!("no echo within the timeout")),
            }
        });
    }
    // Connected devices stay connected until every one is done, as a real fleet would.
    let mut held: Vec<Tls> = Vec::with_capacity(args.conns);
    let (mut times, mut last, mut failed, mut first_error) =
        (Sample::default(), Duration::ZERO, 0, None);
    while let Some(joined) = devices.join_next().await {
        match joined.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((tls, took)) => {
                times.push(took);
                last = last.max(took);
                held.push(tls);
            }
            Err(err) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }
    report(&args, times, last, failed, first_error);
    drop(held);
    Ok(())
}

/// Connect, handshake, send one message, read its echo; returns the open connection.
async fn device(
    target: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect(target).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let out = [0x42_u8; MESSAGE];
    tls.write_all(&out).await.context("send")?;
    tls.flush().await.context("send")?;
    let mut back = [0_u8; MESSAGE];
    tls.read_exact(&mut back).await.context("echo")?;
    anyhow::ensure!(back == out, "the echo differs from the message sent");
    Ok(tls)
}

/// Trusts only `ca`; no session resumption: each device makes a full handshake.
fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut config = forwarder_tests::pki::client_config_trusting(ca)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// One JSON line: time until the last device had its first echo, and the rate that is.
fn report(args: &Args, times: Sample, last: Duration, failed: usize, first_error: Option<String>) {
    let ok = times.len();
    let all_ms = last.as_secs_f64() * 1e3;
    let sorted = times.sorted();
    let line = json!({
        "conns": args.conns,
        "ok": ok,
        "failed": failed,
        "all_first_echo_ms": all_ms,
        "per_second": if all_ms > 0.0 { ok as f64 / (all_ms / 1e3) } else { 0.0 },
        "p50_ms": sorted.quantile_us(0.5) / 1e3,
        "p99_ms": sorted.quantile_us(0.99) / 1e3,
        "first_error": first_error,
    });
    println!("{line}");
}
