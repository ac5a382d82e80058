//! forwarder: an eBPF-accelerated forwarder for Azure IoT Hub and any MQTT/AMQP/HTTPS
//! endpoint.
//!
//! # A connection's life, and the module at each step
//!
//! ```text
//! device ─▶ [xdp] guard ─▶ listener ─┬─▶ l4: route (sni) ─▶ upstream ─▶ splice ─▶ session ─┐
//!                                    │                                  └▶ copy (fallback) ├▶ finish
//!                                    └─▶ http: tls ─▶ proxy (headers) ─▶ connector ─▶ hub │
//!                                               └▶ tunnel (WebSocket, relay)              │
//! ```
//!
//! 1. **Start** (`agent`): `config` is parsed and validated once; `agent` loads the eBPF
//!    data path (`ebpf`: the verdict program and its maps, pinned for the CLI), binds
//!    every frontend (`listener`), optionally attaches the XDP guard (`xdp`), and serves
//!    Prometheus text on the admin port (`admin`, from `metrics`).
//! 2. **Ingress** (`xdp`): unwanted TCP to a frontend port is dropped before a socket sees
//!    it (deny/allow lists, per-source SYN rate). `admission` then holds every accept
//!    to the connection caps (per frontend, agent-wide, per source); `keepalive` sets
//!    TCP keepalive on every socket that needs it.
//! 3. **Passthrough** (`l4`): the listener accepts; `l4::sni` peeks the ClientHello when
//!    the frontend routes by name; `l4::upstream` picks and connects a server. Then
//!    `ebpf::Datapath::splice` hands both sockets to the kernel and `l4::session` watches
//!    the pair, woken only by `l4::supervisor` (a FIN, a reset, or a report from the
//!    verdict), never per message. When the kernel cannot take the pair, `l4::copy`
//!    carries it in userspace. `l4::originate` serves plain MQTT by opening TLS to the hub.
//!    Every userspace path (this fallback, originate, WebSocket tunnels) runs on one copy
//!    engine, `relay`: half-close, resets, idle timeout and counting, one contract.
//! 4. **Termination** (`http`): TLS ends here, `http::headers` rewrites the request for
//!    the hub, `http::connector` re-originates verified TLS, and WebSocket upgrades are
//!    joined by `http::tunnel` (on `relay`). Every accept loop is `admission::Gate::serve`.
//! 5. **Finish**: every L4 path returns one `l4::Outcome`, which `l4::finish` turns into
//!    counters and the closing log line; `conn_list` lists each live connection for
//!    `forwarder conns` meanwhile.
//! 6. **Inspect** (`inspect`): `forwarder conns|stats|maps` read the pinned maps.
//! 7. **Upgrade** (`upgrade`, `agent::upgrade`): SIGUSR2 starts the binary on disk, hands
//!    it the lock, listeners and pinned maps, then every spliced session
//!    (`l4::session::HandedSession`), and exits; `notify` keeps systemd informed.
//!
//! **Transparent mode** (`transparent`): on a gateway host, policy routing and an sk_lookup
//! program hand the connections devices make to the hub's own address to a transparent
//! frontend's listener; from there they take the L4 path above, to their original
//! destination (or a backend).
//!
//! `sys` holds the few raw socket calls (and all of the agent's `unsafe`); `log_limit`
//! keeps hostile clients from flooding the log; `instance_lock` keeps one agent per
//! instance; `privilege` drops root after start-up; `kernel` knows the sockmap floor;
//! `demo` is the built-in stand-in upstream. Modules the binary and the tests do not use
//! are `pub(crate)`.
pub(crate) mod admin;
pub mod admission;
pub mod agent;
pub mod config;
pub(crate) mod conn_list;
pub mod demo;
pub mod ebpf;
pub mod http;
pub mod inspect;
pub mod instance_lock;
pub mod keepalive;
pub mod kernel;
pub mod l4;
pub mod listener;
pub(crate) mod log_limit;
pub mod metrics;
pub(crate) mod notify;
pub mod privilege;
pub(crate) mod relay;
pub mod sys;
pub mod transparent;
pub mod upgrade;
pub mod xdp;
