//! Joins an upgraded (WebSocket) client stream to the upstream's after the `101`: bytes
//! copied both ways untouched until either side closes, half-close passed on, and an
//! idle timeout long enough for MQTT keep-alives.

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::admission::Admitted;
use crate::metrics::{self, ActiveGuard, HttpMetrics};
use crate::relay;

/// Waits for both upgrades, then relays until both directions end or the session idles.
/// The session holds its client's slot under the connection caps (`admitted`) until it
/// ends: hyper ends the connection itself at the upgrade.
pub async fn join(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
    metrics: Arc<HttpMetrics>,
    admitted: Arc<Admitted>,
) {
    let _slot = admitted;
    let _active = ActiveGuard::new(&metrics.websockets_active);
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%err, "upgrade did not complete");
            return;
        }
    };
    let relayed = relay::join(TokioIo::new(client), TokioIo::new(upstream), idle_timeout).await;
    if relayed.idle_timeout {
        metrics::add(&metrics.websocket_idle_timeouts, 1);
        tracing::info!(?idle_timeout, "upgraded session closed: idle timeout");
    }
    metrics::add(&metrics.websocket_bytes_up, relayed.bytes_a_to_b);
    metrics::add(&metrics.websocket_bytes_down, relayed.bytes_b_to_a);
}
