//! Counters of the agent, per frontend and per backend. Cheap atomics, read by `stats` and the tests.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($name:ident { $($(#[$doc:meta])* $field:ident),* $(,)? }) => {
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$doc])* pub $field: AtomicU64,)* }

        impl $name {
            /// (name, value) of every counter, for tables and the Prometheus page.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(L4Metrics {
    /// Connections accepted.
    accepted,
    /// Connections open now.
    active,
    /// Times the accept loop waited because a `max_connections` cap (the frontend's or
    /// the agent's) was reached: new clients wait in the accept queue meanwhile.
    at_capacity,
    /// Clients reset at once because their source held `max_connections_per_source`.
    refused_per_source,
    /// Connections spliced in the kernel.
    kernel_spliced,
    /// Connections served by the userspace copy path, for any reason.
    userspace,
    /// ... of which because the socket map was full.
    fallback_map_full,
    /// ... of which because a socket closed during set-up.
    fallback_not_established,
    /// ... of which because eBPF is off (flag) or failed in another way.
    fallback_other,
    /// Times a spliced direction paused on the userspace path because its peer fell a
    /// whole lag budget behind (the kernel gives redirects no backpressure).
    diverted_slow_peer,
    /// Times such a direction caught up and went back to the kernel path.
    resumed_kernel,
    /// Bytes the verdict cut from the front of retransmitted segments because they
    /// repeated bytes already forwarded (TCP queues such a segment whole; without the cut
    /// the kernel would forward them twice). Non-zero under packet loss; harmless.
    retransmit_overlap_bytes,
    /// Spliced connections reset because a repeated segment could not be cut (should
    /// stay 0: the stream would otherwise carry bytes twice).
    kernel_stream_errors,
    /// Bytes the verdict saw beyond what TCP received, at the end of a connection: bytes
    /// forwarded twice. A safety net for the cut above; should stay 0.
    kernel_duplicated_bytes,
    /// Upstream connect failed or timed out on every server.
    upstream_connect_failed,
    /// TLS ClientHello named a host with no route and no default backend.
    sni_unknown,
    /// Client sent no complete ClientHello in time (SNI routing only).
    client_hello_timeout,
    /// Connections closed by the idle timeout.
    idle_timeouts,
    /// Connections ended because the agent could not go on (a failed socket or map call;
    /// logged with the error). Should stay 0.
    session_errors,
    /// Times a spliced session woke to look at its connection: a FIN, a reset, a report
    /// from the verdict, its idle deadline or a tick while it copies. A few per connection;
    /// never one per message (the kernel's data wake-ups do not reach the agent).
    session_wakeups,
    /// Verdict events lost because the agent's event ring was full: the sessions they
    /// concerned were looked at by their safety tick instead (at most 30 s later).
    kernel_events_lost,
    /// Connections ended by a reset from either side.
    resets,
    /// Spliced connections handed to the agent's next binary by `forwarder upgrade`
    /// (counted by the agent that handed them over).
    handed_over,
    /// Spliced connections taken over from the previous agent by `forwarder upgrade`
    /// (counted by the agent that took them; their bytes count here at their end).
    adopted,
    /// Payload bytes client -> upstream, kernel and userspace.
    bytes_up,
    /// Payload bytes upstream -> client.
    bytes_down,
    /// Payload bytes the agent itself read (userspace path or diverted): zero for a
    /// connection that stays in the kernel.
    userspace_payload_bytes,
});

counters!(HttpMetrics {
    /// TCP connections accepted.
    accepted,
    /// Connections open now (TLS and HTTP; upgraded sessions are counted apart).
    active,
    /// Times the accept loop waited because a `max_connections` cap (the frontend's or
    /// the agent's) was reached: new clients wait in the accept queue meanwhile.
    at_capacity,
    /// Clients reset at once because their source held `max_connections_per_source`.
    refused_per_source,
    /// Client TLS handshakes that failed or timed out.
    tls_handshake_failed,
    /// Requests received (each HTTP/1.1 request or HTTP/2 stream).
    requests,
    /// Responses relayed from the upstream, any status.
    responses_relayed,
    /// 502: no upstream server could be reached (refused, DNS, TLS or certificate).
    upstream_unreachable,
    /// 504: the upstream did not connect or answer in time.
    upstream_timeout,
    /// 400: the client sent a request hyper could not parse.
    bad_request,
    /// 431: request headers over the configured size.
    headers_too_large,
    /// Connections closed because request headers did not arrive in time.
    header_timeout,
    /// HTTP/2 clients closed because their connection preface (magic and SETTINGS) did
    /// not arrive within `header_read_timeout_ms`.
    preface_timeout,
    /// Connections closed after `http_idle_timeout_ms` with no request in progress
    /// (HTTP/2 without open streams, HTTP/1.1 between keep-alive requests).
    idle_timeout,
    /// HTTP/2 clients closed because they stopped answering keep-alive PINGs.
    ping_timeout,
    /// 503: no upstream connection within `response_timeout_ms` because
    /// `max_upstream_connections` were open.
    upstream_at_capacity,
    /// Upstream connections open now (pooled, busy or joined to a WebSocket): a gauge.
    upstream_connections,
    /// WebSocket upgrades joined after the upstream's 101.
    websocket_upgrades,
    /// Upgraded sessions open now.
    websockets_active,
    /// Upgraded sessions closed by the idle timeout.
    websocket_idle_timeouts,
    /// Sides of upgraded sessions whose TCP socket the relay could not reach under
    /// hyper's upgrade: their resets pass on as FINs. Should stay 0.
    websocket_sockets_unreached,
    /// Bytes client -> upstream on upgraded sessions.
    websocket_bytes_up,
    /// Bytes upstream -> client on upgraded sessions.
    websocket_bytes_down,
});

counters!(BackendMetrics {
    /// Connections opened to a server of this backend.
    connects,
    /// Connect attempts that failed on one server (refused, unreachable, DNS).
    connect_errors,
    /// Connect attempts that timed out on one server.
    connect_timeouts,
    /// Connections for which no server of the backend could be reached.
    exhausted,
    /// Devices waiting now for a connect slot (`max_new_connections_per_sec`): a gauge.
    connect_queue_depth,
    /// Connects that waited for a slot before going out (pacing).
    connects_paced,
    /// Devices refused at once because `connect_queue` devices were already waiting.
    connects_refused_queue_full,
    /// Devices refused because their slot was further away than `queue_timeout_ms`.
    connects_refused_queue_timeout,
});

impl L4Metrics {
    pub fn gate(&self) -> crate::admission::GateCounters<'_> {
        crate::admission::GateCounters {
            at_capacity: &self.at_capacity,
            refused_per_source: &self.refused_per_source,
        }
    }
}

impl HttpMetrics {
    pub fn gate(&self) -> crate::admission::GateCounters<'_> {
        crate::admission::GateCounters {
            at_capacity: &self.at_capacity,
            refused_per_source: &self.refused_per_source,
        }
    }
}
counters!(AdminMetrics {
    /// Times the admin server waited because its connection cap was reached.
    at_capacity,
    /// Admin connections closed because request headers did not arrive in time.
    header_timeout,
    /// Admin connections closed because they stayed open longer than allowed.
    lifetime_exceeded,
});

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// For gauges only (counters only go up).
pub fn sub(gauge: &AtomicU64, n: u64) {
    gauge.fetch_sub(n, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Decrements `active` when a connection's task ends, however it ends.
pub struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    pub fn new(active: &'a AtomicU64) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self(active)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
