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
//!    to the connection caps (per frontend, agent-wide, per source).
//! 3. **Passthrough** (`l4`): the listener accepts; `l4::sni` peeks the ClientHello when
//!    the frontend routes by name; `l4::upstream` picks and connects a server. Then
//!    `ebpf::Datapath::splice` hands both sockets to the kernel and `l4::session` watches
//!    the pair, woken only by `l4::supervisor` (a FIN, a reset, or a report from the
//!    verdict), never per message. When the kernel cannot take the pair, `l4::copy`
//!    carries it in userspace. `l4::originate` serves plain MQTT by opening TLS to the hub.
//! 4. **Termination** (`http`): TLS ends here, `http::headers` rewrites the request for
//!    the hub, `http::connector` re-originates verified TLS, and WebSocket upgrades are
//!    joined by `relay`.
//! 5. **Finish**: every L4 path returns one `l4::Outcome`, which `l4::finish` turns into
//!    counters and the closing log line; `registry` lists each live connection for
//!    `forwarder conns` meanwhile.
//! 6. **Inspect** (`inspect`): `forwarder conns|stats|maps` read the pinned maps.
//!
//! **Transparent mode** (`transparent`): on a gateway host, policy routing and an sk_lookup
//! program hand the connections devices make to the hub's own address to a transparent
//! frontend's listener; from there they take the L4 path above, to their original
//! destination (or a backend).
//!
//! `sys` holds the few raw socket calls (and all of the agent's `unsafe`).
pub mod admin;
pub mod admission;
pub mod agent;
pub mod config;
pub mod demo;
pub mod ebpf;
pub mod http;
pub mod inspect;
pub mod instance_lock;
pub mod kernel;
pub mod l4;
pub mod listener;
pub mod log_limit;
pub mod metrics;
pub mod privilege;
pub mod registry;
pub mod relay;
pub mod sys;
pub mod transparent;
pub mod xdp;
