//! L4 passthrough (MQTT 8883, AMQP 5671, any TCP): accept, route (optionally by TLS SNI,
//! peeked, never consumed), connect the upstream, then splice the pair in the kernel or,
//! when that is impossible, copy in userspace. TLS bytes are never looked into beyond
//! the ClientHello's server name.

pub mod copy;
pub mod originate;
pub mod session;
pub mod sni;
pub mod upstream;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::ebpf::{Datapath, SpliceError};
use crate::metrics::{self, ActiveGuard, L4Metrics};
use crate::sys;
use sni::ClientHello;
use upstream::Pool;

/// Send buffer of spliced sockets. The kernel's redirect worker, finding the peer's send
/// buffer full, retries a jiffy later (4 ms at HZ=250) rather than on write space; with
/// autotuned buffers (<= tcp_wmem's 4 MiB) a fast flow drains the buffer well before
/// that, the path idles, the lag budget fills and the direction pauses in userspace. The
/// lag budget counts unacknowledged bytes, so this does not loosen its memory bound.
/// (Measured, veth, one stream: userspace share of bytes 40% -> 4%, proxy CPU per GiB
/// 0.5 -> 0.15 s.)
const SPLICE_SNDBUF: libc::c_int = 8 << 20;

/// Per-connection limits of the L4 path.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Close a connection with no byte in either direction for this long. IoT devices send
    /// MQTT keep-alives every 240-300 s, so the default is well above that.
    pub idle_timeout: Duration,
    /// Bytes a spliced direction may queue in the kernel for a peer that does not read
    /// before that direction moves to the userspace path (where TCP flow control holds).
    pub max_lag: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(15 * 60),
            max_lag: 32 << 20,
        }
    }
}

/// Which path carried a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Kernel,
    Userspace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (FIN both ways).
    Closed,
    IdleTimeout,
    Reset,
    /// The kernel path could not keep the byte stream exact (see
    /// `SockCounters::stream_errors`): both sides are reset.
    Broken,
    Error(String),
}

#[derive(Clone, Debug)]
pub struct SessionReport {
    pub path: Path,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Payload bytes that crossed userspace: 0 for a connection the kernel carried alone.
    pub userspace_bytes: u64,
    /// A direction moved to userspace because its peer fell behind.
    pub diverted: bool,
    pub end: End,
}

/// TCP keepalive towards both peers (seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: u32,
    pub interval: u32,
    pub probes: u32,
}

/// A configured L4 frontend, ready to serve.
#[derive(Debug)]
pub struct L4Frontend {
    pub name: String,
    /// Backend per lower-case SNI host name; empty: no SNI peeking at all.
    pub sni_routes: HashMap<String, Arc<Pool>>,
    /// Backend for connections without a matching SNI route (None: close them).
    pub default_backend: Option<Arc<Pool>>,
    pub session: SessionOptions,
    /// Splice in the kernel (false: userspace copy only, e.g. `--no-ebpf`).
    pub kernel: bool,
    pub client_hello_timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

/// Accepts until `shutdown` turns true. Each connection runs in its own task.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<L4Frontend>,
    datapath: Option<Arc<Datapath>>,
    metrics: Arc<L4Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Some(k) = frontend.keepalive {
        // Accepted sockets inherit the listener's keepalive: no per-connection syscalls.
        if let Err(err) = sys::set_keepalive(listener.as_fd(), k.idle, k.interval, k.probes) {
            tracing::warn!(frontend = %frontend.name, %err, "could not set TCP keepalive");
        }
    }
    while let Some((client, peer)) =
        crate::listener::accept(&listener, &mut shutdown, &frontend.name).await
    {
        let (frontend, datapath, metrics) = (frontend.clone(), datapath.clone(), metrics.clone());
        let span = tracing::info_span!("conn", frontend = %frontend.name, client = %peer);
        tokio::spawn(
            async move {
                handle_connection(client, &frontend, datapath.as_deref(), &metrics).await;
            }
            .instrument(span),
        );
    }
}

/// Serves one accepted connection to its end and reports what happened.
pub async fn handle_connection(
    mut client: TcpStream,
    frontend: &L4Frontend,
    datapath: Option<&Datapath>,
    metrics: &L4Metrics,
) -> Option<SessionReport> {
    let _active = ActiveGuard::new(&metrics.active);
    metrics::add(&metrics.accepted, 1);
    let _ = client.set_nodelay(true);

    let pool = match route(&client, frontend, metrics).await {
        Ok(pool) => pool,
        Err(reason) => {
            tracing::info!(%reason, "connection refused by routing");
            if reason.is_unknown_name() {
                // TLS alert unrecognized_name (fatal): the client's TLS stack says why.
                let _ = client
                    .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])
                    .await;
            }
            return None;
        }
    };
    let (upstream, upstream_addr) = match pool.connect().await {
        Ok(found) => found,
        Err(err) => {
            metrics::add(&metrics.upstream_connect_failed, 1);
            tracing::warn!(%err, "upstream unreachable; closing client");
            return None;
        }
    };
    if let Some(k) = frontend.keepalive {
        // The client's came with it from the listener (see `serve`).
        if let Err(err) = sys::set_keepalive(upstream.as_fd(), k.idle, k.interval, k.probes) {
            tracing::debug!(%err, "could not set TCP keepalive");
        }
    }

    // Listed for `forwarder conns` while it lives (needs the maps, not the splice).
    let mut registration = datapath.and_then(|dp| {
        crate::registry::Registration::new(dp, &frontend.name, &client, &upstream, frontend.kernel)
    });
    if let (true, Some(datapath)) = (frontend.kernel, datapath) {
        for s in [&client, &upstream] {
            if let Err(err) = sys::set_sndbuf_force(s.as_fd(), SPLICE_SNDBUF) {
                tracing::debug!(%err, "could not raise the send buffer");
            }
        }
        let written_before =
            session::WrittenBefore::measure(&client, &upstream).unwrap_or_default();
        match datapath.splice(client.as_fd(), upstream.as_fd(), frontend.session.max_lag) {
            Ok(pair) => {
                metrics::add(&metrics.kernel_spliced, 1);
                tracing::debug!(%upstream_addr, cookie = pair.client, "spliced in the kernel");
                let report = session::run(
                    datapath,
                    pair,
                    client,
                    upstream,
                    written_before,
                    &frontend.session,
                    metrics,
                )
                .await;
                return Some(finish(report, metrics));
            }
            Err(err) => {
                let counter = match err {
                    SpliceError::MapFull => &metrics.fallback_map_full,
                    SpliceError::NotEstablished => &metrics.fallback_not_established,
                    SpliceError::Io(_) => &metrics.fallback_other,
                };
                metrics::add(counter, 1);
                tracing::info!(%err, "kernel splice unavailable; serving in userspace");
            }
        }
    } else if frontend.kernel {
        metrics::add(&metrics.fallback_other, 1);
    }
    metrics::add(&metrics.userspace, 1);
    if let Some(registration) = registration.as_mut() {
        registration.set_userspace();
    }
    let report = copy::run(
        client,
        upstream,
        &frontend.session,
        metrics,
        registration.as_mut(),
    )
    .await;
    Some(finish(report, metrics))
}

fn finish(report: SessionReport, metrics: &L4Metrics) -> SessionReport {
    metrics::add(&metrics.bytes_up, report.bytes_up);
    metrics::add(&metrics.bytes_down, report.bytes_down);
    tracing::debug!(?report, "connection ended");
    report
}

#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("no route for server name {0:?} and no default backend")]
    UnknownName(Option<String>),
    #[error("no complete ClientHello within {0:?}")]
    HelloTimeout(Duration),
    #[error("client went away before sending a ClientHello: {0}")]
    Gone(String),
}

impl RouteError {
    fn is_unknown_name(&self) -> bool {
        matches!(self, Self::UnknownName(_))
    }
}

async fn route(
    client: &TcpStream,
    frontend: &L4Frontend,
    metrics: &L4Metrics,
) -> Result<Arc<Pool>, RouteError> {
    if frontend.sni_routes.is_empty() {
        return frontend
            .default_backend
            .clone()
            .ok_or(RouteError::UnknownName(None));
    }
    let name =
        match tokio::time::timeout(frontend.client_hello_timeout, peek_server_name(client)).await {
            Ok(Ok(name)) => name,
            Ok(Err(err)) => return Err(RouteError::Gone(err.to_string())),
            Err(_) => {
                metrics::add(&metrics.client_hello_timeout, 1);
                return Err(RouteError::HelloTimeout(frontend.client_hello_timeout));
            }
        };
    if let Some(pool) = name.as_deref().and_then(|n| frontend.sni_routes.get(n)) {
        return Ok(pool.clone());
    }
    match &frontend.default_backend {
        Some(pool) => Ok(pool.clone()),
        None => {
            metrics::add(&metrics.sni_unknown, 1);
            Err(RouteError::UnknownName(name))
        }
    }
}

/// Peeks (MSG_PEEK: the bytes stay queued for the upstream) until the ClientHello's
/// first record is complete.
async fn peek_server_name(client: &TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; sni::MAX_CLIENT_HELLO];
    let mut seen = 0;
    loop {
        let n = client.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "EOF",
            ));
        }
        match sni::parse_client_hello(&buf[..n]) {
            ClientHello::Parsed { server_name } => return Ok(server_name),
            ClientHello::NotTls => return Ok(None),
            ClientHello::Incomplete { need } if need > buf.len() || n == buf.len() => {
                return Ok(None);
            }
            ClientHello::Incomplete { .. } if n == seen => {
                // peek() reports readiness again for the same bytes: wait for more.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ClientHello::Incomplete { .. } => seen = n,
        }
    }
}
