//! Plain MQTT (1883) for legacy devices: IoT Hub refuses MQTT without TLS, so this path
//! cannot be spliced. The agent accepts the plain connection, opens TLS to the hub itself
//! (SNI and certificate verified) and relays in userspace. Opt-in, and never for X.509
//! devices (they need their own TLS session with the hub: use the passthrough port).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::admission::Gate;
use crate::keepalive::{Keepalive, set_keepalive_or_warn};
use crate::l4::upstream::Pool;
use crate::l4::{Outcome, finish};
use crate::metrics::{self, ActiveGuard, L4Metrics};
use crate::relay;

pub struct OriginateFrontend {
    pub pool: Arc<Pool>,
    pub tls: TlsConnector,
    /// The hub's name: SNI and the name its certificate must carry.
    pub server_name: ServerName<'static>,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// Connection caps in front of the listener.
    pub gate: Gate,
}

pub async fn serve(
    listener: TcpListener,
    frontend: Arc<OriginateFrontend>,
    metrics: Arc<L4Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let counters = metrics.gate();
    let serve = |client, _, admitted| {
        let frontend = frontend.clone();
        let metrics = metrics.clone();
        async move {
            handle(client, &frontend, &metrics).await;
            drop(admitted);
        }
    };
    frontend
        .gate
        .serve(&listener, shutdown, &counters, serve)
        .await;
}

async fn handle(client: TcpStream, frontend: &OriginateFrontend, metrics: &L4Metrics) {
    let _active = ActiveGuard::new(&metrics.active);
    metrics::add(&metrics.accepted, 1);
    metrics::add(&metrics.userspace, 1);
    let _ = client.set_nodelay(true);
    let (upstream, server) = match frontend.pool.connect().await {
        Ok(found) => found,
        Err(err) => {
            crate::l4::upstream_failed(&err, metrics);
            return;
        }
    };
    for s in [&client, &upstream] {
        set_keepalive_or_warn(s.as_fd(), frontend.keepalive);
    }
    let handshake = frontend.tls.connect(frontend.server_name.clone(), upstream);
    let tls = match tokio::time::timeout(frontend.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            metrics::add(&metrics.upstream_connect_failed, 1);
            tracing::warn!(%server, %err, "TLS to the hub failed (certificate or name?); closing client");
            return;
        }
        Err(_) => {
            metrics::add(&metrics.upstream_connect_failed, 1);
            tracing::warn!(%server, "TLS handshake with the hub timed out; closing client");
            return;
        }
    };
    // This path is userspace by nature: every byte is payload the agent handled.
    let copied = relay::join(client, relay::Polled(tls), frontend.idle_timeout, |_| {}).await;
    finish(&Outcome::copied(copied), metrics);
}
