//! The agent's configuration: TOML, parsed once at the edge into typed values, unknown
//! keys rejected, then checked as a whole by `validate`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::l4::upstream::pacing::PacingLimits;

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the pin directory /sys/fs/bpf/forwarder/<instance>.
    #[serde(default = "default_instance")]
    pub instance: String,
    #[serde(default, rename = "frontend")]
    pub frontends: Vec<Frontend>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<Backend>,
    /// The XDP ingress guard; absent: no XDP program is attached.
    #[serde(default)]
    pub xdp: Option<XdpConfig>,
    /// Address of the admin HTTP server (Prometheus text at /metrics); absent: off.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// The user the agent becomes after start-up (see `privilege`); absent: stays root.
    #[serde(default)]
    pub user: Option<String>,
    /// Open client connections of all frontends together at most; absent: what the fd
    /// limit allows (see `agent::fd_budget`).
    #[serde(default, deserialize_with = "some_max_connections")]
    pub max_connections: Option<usize>,
    /// Where the agent keeps state across restarts (the XDP rules changed at run time),
    /// in a directory per instance; absent: `$STATE_DIRECTORY` (systemd's
    /// `StateDirectory=`) or /var/lib/forwarder. See `Config::state_dir`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// `[xdp]`: the XDP ingress guard on the listening interfaces (see `crate::xdp`).
#[derive(Debug, Deserialize, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    pub interfaces: Vec<String>,
    /// Take an interface over from another XDP program instead of refusing to start.
    #[serde(default)]
    pub replace: bool,
    #[serde(default)]
    pub mode: XdpAttach,
    /// CIDR prefixes; once any is set, sources matching none are dropped.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDR prefixes always dropped (checked before the allow-list).
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub syn_rate_per_sec: u64,
    /// SYNs a source may send at once; 0 turns the SYN limit off.
    #[serde(default)]
    pub syn_burst: u64,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic where the driver lacks XDP.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: String,
    pub bind: SocketAddr,
    #[serde(default)]
    pub mode: Mode,
    /// Backend for connections no SNI route matches.
    pub backend: Option<String>,
    /// Lower-case TLS server name -> backend name (passthrough ports serving several hubs).
    #[serde(default)]
    pub sni_routes: BTreeMap<String, String>,
    /// No byte either way for this long closes the connection (`idle_timeout_secs`).
    #[serde(
        rename = "idle_timeout_secs",
        default = "default_idle_timeout",
        deserialize_with = "idle_timeout"
    )]
    pub idle_timeout: Duration,
    /// Bytes the kernel may queue for a peer that stopped reading.
    #[serde(default = "default_max_lag", deserialize_with = "max_lag")]
    pub max_lag_bytes: u64,
    /// Time a client gets to send its ClientHello, when routing by name
    /// (`client_hello_timeout_ms`).
    #[serde(
        rename = "client_hello_timeout_ms",
        default = "default_client_hello_timeout",
        deserialize_with = "client_hello_timeout"
    )]
    pub client_hello_timeout: Duration,
    /// TCP keepalive idle seconds towards both peers (0: off).
    #[serde(default = "default_keepalive", deserialize_with = "keepalive")]
    pub tcp_keepalive_secs: u32,
    /// mode "http": PEM certificate chain devices are shown.
    pub tls_cert: Option<PathBuf>,
    /// mode "http": PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Open client connections at most (more wait in the accept queue); absent: the
    /// mode's default (`Frontend::max_connections`).
    #[serde(default, deserialize_with = "some_max_connections")]
    pub max_connections: Option<usize>,
    /// Open connections one source may hold (more are reset at once); absent: no cap.
    /// A site's devices behind one NAT address share it: size it for the largest site.
    #[serde(default, deserialize_with = "some_per_source")]
    pub max_connections_per_source: Option<u32>,
    /// Leading bits of an IPv4 client address that name its source (32: each address).
    #[serde(
        default = "default_source_prefix_ipv4",
        deserialize_with = "ipv4_prefix"
    )]
    pub source_prefix_ipv4: u8,
    /// Leading bits of an IPv6 client address that name its source (64: each /64).
    #[serde(
        default = "default_source_prefix_ipv6",
        deserialize_with = "ipv6_prefix"
    )]
    pub source_prefix_ipv6: u8,
    /// mode "http": time for the TLS handshake and for each request's headers
    /// (`header_read_timeout_ms`).
    #[serde(
        rename = "header_read_timeout_ms",
        default = "default_header_read_timeout",
        deserialize_with = "header_read_timeout"
    )]
    pub header_read_timeout: Duration,
    /// mode "http": request head size at most; larger heads get 431.
    #[serde(
        default = "default_max_header_bytes",
        deserialize_with = "max_header_bytes"
    )]
    pub max_header_bytes: usize,
    /// The keys the file gave this frontend (empty for one built in code): what
    /// `Config::warnings` checks against the mode.
    #[serde(skip)]
    pub given: BTreeSet<String>,
    /// mode "http": time a client connection may stay open with no request in progress
    /// (HTTP/2 without open streams, HTTP/1.1 between keep-alive requests).
    /// (`http_idle_timeout_ms`)
    #[serde(
        rename = "http_idle_timeout_ms",
        default = "default_http_idle_timeout",
        deserialize_with = "http_idle_timeout"
    )]
    pub http_idle_timeout: Duration,
    /// mode "transparent": destination ports whose connections through this host are
    /// intercepted and served here (see `crate::transparent`).
    #[serde(default)]
    pub intercept_ports: Vec<u16>,
    /// mode "transparent": destination prefixes (CIDR) intercepted; empty: any.
    #[serde(default)]
    pub intercept_destinations: Vec<String>,
    /// mode "transparent": host names whose addresses are intercepted (besides
    /// `intercept_destinations`), resolved at start and every
    /// `intercept_hosts_refresh_secs`.
    #[serde(default)]
    pub intercept_hosts: Vec<String>,
    #[serde(default = "default_hosts_refresh")]
    pub intercept_hosts_refresh_secs: u64,
    /// mode "transparent", no backend: PROXY v2 towards the original destination (a
    /// backend has its own `send_proxy_v2`).
    #[serde(default)]
    pub send_proxy_v2: bool,
    /// mode "transparent", no backend: connect from the device's own address.
    #[serde(default)]
    pub preserve_source: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// L4 passthrough spliced in the kernel (MQTT 8883, AMQP 5671, any TCP).
    #[default]
    Splice,
    /// Terminated HTTPS with Host rewrite (443).
    Http,
    /// Plain TCP in, TLS to the backend out (legacy MQTT on 1883: IoT Hub refuses MQTT
    /// without TLS). Relayed in userspace: it cannot be spliced, and X.509 devices cannot
    /// use it.
    Originate,
    /// On a gateway host: connections routed through it to `intercept_ports` are taken
    /// over (sk_lookup and policy routing, see `crate::transparent`) and forwarded to
    /// their original destination (or `backend`), spliced like `Splice`.
    Transparent,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub servers: Vec<ServerConfig>,
    /// Time to connect one server (`connect_timeout_ms`).
    #[serde(
        rename = "connect_timeout_ms",
        default = "default_connect_timeout",
        deserialize_with = "connect_timeout"
    )]
    pub connect_timeout: Duration,
    /// HTTP backends: the hub's name, sent as `Host` (default: the first server's host).
    pub host: Option<String>,
    /// HTTP backends: TLS server name (SNI and certificate check), if not `host`. IoT Hub
    /// also answers as `<hub>.device.azure-devices.net` for TLS 1.3.
    pub tls_server_name: Option<String>,
    /// HTTP backends: extra trusted CA certificates (PEM) besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// HTTP backends: time the hub gets to answer a request's headers (then 504).
    /// (`response_timeout_ms`)
    #[serde(
        rename = "response_timeout_ms",
        default = "default_response_timeout",
        deserialize_with = "response_timeout"
    )]
    pub response_timeout: Duration,
    /// New upstream connections per second at most, for reconnect storms (IoT Hub
    /// throttles new connections per unit and rejects the excess). Absent: no pacing.
    #[serde(default, deserialize_with = "connect_rate")]
    pub max_new_connections_per_sec: Option<u32>,
    /// With pacing: devices that may wait for a connect slot; more are refused at once.
    #[serde(default = "default_connect_queue", deserialize_with = "connect_queue")]
    pub connect_queue: u32,
    /// With pacing: how long a device may wait for its slot before it is refused.
    /// (`queue_timeout_ms`)
    #[serde(
        rename = "queue_timeout_ms",
        default = "default_queue_timeout",
        deserialize_with = "queue_timeout"
    )]
    pub queue_timeout: Duration,
    /// HTTP backends: upstream connections (pooled, busy or joined to a WebSocket) an
    /// http frontend holds to this backend at most; absent: no cap.
    #[serde(default, deserialize_with = "upstream_cap")]
    pub max_upstream_connections: Option<u32>,
    /// L4 frontends: write a PROXY protocol v2 header (the device's address) to each
    /// upstream connection before its bytes. Only for servers that expect it (HAProxy
    /// `accept-proxy`, nginx `proxy_protocol`, EMQX, HiveMQ); IoT Hub refuses it.
    #[serde(default)]
    pub send_proxy_v2: bool,
    /// L4 frontends: connect from the device's own address (`IP_TRANSPARENT`), so the
    /// server sees it; the server must route it back through this host.
    #[serde(default)]
    pub preserve_source: bool,
}

impl Config {
    /// A configuration of these frontends and backends, without XDP or admin server.
    pub fn new(
        instance: impl Into<String>,
        frontends: Vec<Frontend>,
        backends: Vec<Backend>,
    ) -> Self {
        Self {
            instance: instance.into(),
            frontends,
            backends,
            xdp: None,
            admin: None,
            max_connections: None,
            user: None,
            state_dir: None,
        }
    }

    /// This instance's state directory: `state_dir` (or `$STATE_DIRECTORY`, or
    /// /var/lib/forwarder) joined with the instance name. On disk, unlike the pins
    /// (bpffs) and /run (tmpfs), so it survives a reboot.
    pub fn state_dir(&self) -> PathBuf {
        let root = self.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .and_then(|dirs| {
                    // systemd lists one directory per StateDirectory= entry, ':'-separated.
                    let first = dirs.to_string_lossy().split(':').next()?.to_owned();
                    (!first.is_empty()).then(|| PathBuf::from(first))
                })
                .unwrap_or_else(|| PathBuf::from("/var/lib/forwarder"))
        });
        root.join(&self.instance)
    }
}

impl Frontend {
    /// A frontend with every setting at its default.
    pub fn new(name: &str, bind: SocketAddr, mode: Mode, backend: &str) -> Self {
        Self {
            name: name.into(),
            bind,
            mode,
            backend: Some(backend.into()),
            sni_routes: BTreeMap::new(),
            idle_timeout: default_idle_timeout(),
            max_lag_bytes: default_max_lag(),
            client_hello_timeout: default_client_hello_timeout(),
            tcp_keepalive_secs: default_keepalive(),
            tls_cert: None,
            tls_key: None,
            max_connections: None,
            max_connections_per_source: None,
            source_prefix_ipv4: default_source_prefix_ipv4(),
            source_prefix_ipv6: default_source_prefix_ipv6(),
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            given: BTreeSet::new(),
            http_idle_timeout: default_http_idle_timeout(),
            intercept_ports: Vec::new(),
            intercept_destinations: Vec::new(),
            intercept_hosts: Vec::new(),
            intercept_hosts_refresh_secs: default_hosts_refresh(),
            send_proxy_v2: false,
            preserve_source: false,
        }
    }

    /// `max_connections`, or the mode's default when absent.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(match self.mode {
            Mode::Http => DEFAULT_MAX_CONNECTIONS_HTTP,
            Mode::Splice | Mode::Originate | Mode::Transparent => DEFAULT_MAX_CONNECTIONS_L4,
        })
    }

    /// `tcp_keepalive_secs` as the keepalive its sockets get (`None`: off).
    pub fn keepalive(&self) -> Option<crate::keepalive::Keepalive> {
        crate::keepalive::Keepalive::after_idle(self.tcp_keepalive_secs)
    }

    /// The L4 limits of each connection.
    pub fn session(&self) -> crate::l4::SessionOptions {
        crate::l4::SessionOptions {
            idle_timeout: self.idle_timeout,
            max_lag: self.max_lag_bytes,
        }
    }

    /// mode "http": the certificate chain and key devices are shown.
    fn tls_files(&self) -> Result<(&Path, &Path), ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok((cert, key)),
            _ => Err(ConfigError::Invalid(format!(
                "frontend {:?}: mode \"http\" terminates TLS and needs tls_cert and tls_key",
                self.name
            ))),
        }
    }

    /// The per-source cap, when one is set.
    pub fn source_limit(&self) -> Option<crate::admission::SourceLimit> {
        self.max_connections_per_source
            .map(|max| crate::admission::SourceLimit {
                max,
                ipv4_prefix: self.source_prefix_ipv4,
                ipv6_prefix: self.source_prefix_ipv6,
            })
    }

    /// An out-of-range setting (also refused while parsing, with the line; this covers
    /// frontends built in code).
    fn bounds_problem(&self) -> Option<String> {
        let checks = [
            (IDLE_TIMEOUT, Some(self.idle_timeout.as_secs())),
            (MAX_LAG, Some(self.max_lag_bytes)),
            (
                CLIENT_HELLO_TIMEOUT,
                Some(millis(self.client_hello_timeout)),
            ),
            (KEEPALIVE, Some(u64::from(self.tcp_keepalive_secs))),
            (MAX_CONNECTIONS, self.max_connections.map(|n| n as u64)),
            (PER_SOURCE, self.max_connections_per_source.map(u64::from)),
            (IPV4_PREFIX, Some(u64::from(self.source_prefix_ipv4))),
            (IPV6_PREFIX, Some(u64::from(self.source_prefix_ipv6))),
            (HEADER_READ_TIMEOUT, Some(millis(self.header_read_timeout))),
            (MAX_HEADER_BYTES, Some(self.max_header_bytes as u64)),
        ];
        first_out_of_bounds(&checks).map(|m| format!("frontend {:?}: {m}", self.name))
    }

    /// Keys the file gave this frontend that its mode does not use.
    fn ignored_keys(&self) -> Vec<&str> {
        let unused: &[&str] = match self.mode {
            Mode::Splice => &[
                "header_read_timeout_ms",
                "max_header_bytes",
                "http_idle_timeout_ms",
            ],
            Mode::Originate => &[
                "header_read_timeout_ms",
                "max_header_bytes",
                "http_idle_timeout_ms",
                "max_lag_bytes",
                "client_hello_timeout_ms",
            ],
            Mode::Http => &["max_lag_bytes", "client_hello_timeout_ms"],
            Mode::Transparent => &[
                "header_read_timeout_ms",
                "max_header_bytes",
                "http_idle_timeout_ms",
            ],
        };
        let mut ignored: Vec<&str> = unused
            .iter()
            .copied()
            .filter(|k| self.given.contains(*k))
            .collect();
        // The ClientHello is only peeked to route by name.
        if matches!(self.mode, Mode::Splice | Mode::Transparent)
            && self.sni_routes.is_empty()
            && self.given.contains("client_hello_timeout_ms")
        {
            ignored.push("client_hello_timeout_ms (no sni_routes)");
        }
        ignored
    }
}

/// A duration in the milliseconds its key is written in (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first `(bounds, value)` whose value is out of its range, as a message.
fn first_out_of_bounds(checks: &[(Bounds, Option<u64>)]) -> Option<String> {
    checks
        .iter()
        .find_map(|(bounds, value)| bounds.check((*value)?).err())
}

impl Backend {
    /// A backend of one server (`host:port`) with every setting at its default.
    pub fn new(name: &str, address: &str) -> Self {
        Self {
            name: name.into(),
            servers: vec![ServerConfig {
                address: address.into(),
                weight: default_weight(),
            }],
            connect_timeout: default_connect_timeout(),
            host: None,
            tls_server_name: None,
            ca_file: None,
            response_timeout: default_response_timeout(),
            max_new_connections_per_sec: None,
            connect_queue: default_connect_queue(),
            queue_timeout: default_queue_timeout(),
            max_upstream_connections: None,
            send_proxy_v2: false,
            preserve_source: false,
        }
    }

    /// The pacing of new connections this backend asks for (`None`: off).
    pub fn pacing(&self) -> Option<PacingLimits> {
        self.max_new_connections_per_sec
            .map(|rate_per_sec| PacingLimits {
                rate_per_sec,
                queue: self.connect_queue,
                queue_timeout: self.queue_timeout,
            })
    }

    /// One line for `forwarder check`: the pacing in force.
    pub fn pacing_summary(&self) -> String {
        match self.pacing() {
            Some(p) => format!(
                "backend {:?}: max_new_connections_per_sec = {} (burst {}), connect_queue = {}, queue_timeout_ms = {}",
                self.name,
                p.rate_per_sec,
                p.burst(),
                self.connect_queue,
                millis(self.queue_timeout)
            ),
            None => format!(
                "backend {:?}: max_new_connections_per_sec off (connects are not paced)",
                self.name
            ),
        }
    }

    /// An out-of-range setting (also refused while parsing, with the line; this covers
    /// configurations built in code, e.g. `--connect-rate`).
    fn bounds_problem(&self) -> Option<String> {
        let checks = [
            (
                CONNECT_RATE,
                self.max_new_connections_per_sec.map(u64::from),
            ),
            (CONNECT_QUEUE, Some(u64::from(self.connect_queue))),
            (QUEUE_TIMEOUT, Some(millis(self.queue_timeout))),
            (CONNECT_TIMEOUT, Some(millis(self.connect_timeout))),
            (RESPONSE_TIMEOUT, Some(millis(self.response_timeout))),
            (UPSTREAM_CAP, self.max_upstream_connections.map(u64::from)),
        ];
        first_out_of_bounds(&checks).map(|m| format!("backend {:?}: {m}", self.name))
    }

    /// The name HTTP requests are addressed to: `host`, else the first server's host.
    pub fn http_host(&self) -> Option<String> {
        if let Some(host) = &self.host {
            return Some(host.clone());
        }
        let (host, _port) = self.servers.first()?.address.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| host.to_owned())
    }
}

/// The hub an http or originate frontend talks to (`Config::hub`).
#[derive(Debug, Clone)]
pub struct Hub<'c> {
    pub backend: &'c Backend,
    /// `Host` of every request: the backend's `host`, else its first server's host.
    pub host: http::HeaderValue,
    /// SNI and the name the hub's certificate must carry: `tls_server_name`, else `host`.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// An http frontend's certificate files and hub (`Config::terminating`).
#[derive(Debug, Clone)]
pub struct Terminating<'c> {
    pub hub: Hub<'c>,
    pub tls_cert: &'c Path,
    pub tls_key: &'c Path,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// host:port
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_hosts_refresh() -> u64 {
    crate::transparent::DEFAULT_HOSTS_REFRESH_SECS
}
fn default_instance() -> String {
    "default".into()
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS)
}
/// `max_lag_bytes` when absent (also `SessionOptions::default`'s).
pub const DEFAULT_MAX_LAG_BYTES: u64 = 32 << 20;
/// `client_hello_timeout_ms` when absent.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT_MS: u64 = 10_000;
/// `tcp_keepalive_secs` when absent: well inside the idle time of NATs and firewalls.
pub const DEFAULT_TCP_KEEPALIVE_SECS: u32 = 120;
/// `connect_timeout_ms` when absent.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// `--drain-secs` when absent: how long open connections get to finish after SIGTERM.
pub const DEFAULT_DRAIN_SECS: u64 = 30;
/// The same, for a stop that was given no deadline.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(DEFAULT_DRAIN_SECS);

fn default_max_lag() -> u64 {
    DEFAULT_MAX_LAG_BYTES
}
fn default_client_hello_timeout() -> Duration {
    Duration::from_millis(DEFAULT_CLIENT_HELLO_TIMEOUT_MS)
}
fn default_keepalive() -> u32 {
    DEFAULT_TCP_KEEPALIVE_SECS
}
fn default_connect_timeout() -> Duration {
    Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS)
}
fn default_weight() -> u32 {
    1
}
/// `max_connections` of a terminating frontend when absent: each client holds TLS and
/// HTTP state in the agent.
pub const DEFAULT_MAX_CONNECTIONS_HTTP: usize = 10_000;
/// ... of a passthrough (splice or originate) frontend: a spliced device costs the agent
/// two sockets and a few hundred bytes; the fd limit is the real bound.
pub const DEFAULT_MAX_CONNECTIONS_L4: usize = 100_000;

fn default_source_prefix_ipv4() -> u8 {
    32
}
fn default_source_prefix_ipv6() -> u8 {
    64
}
/// `header_read_timeout_ms` when absent.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// `max_header_bytes` when absent.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
/// `response_timeout_ms` when absent.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 60_000;

fn default_header_read_timeout() -> Duration {
    Duration::from_millis(DEFAULT_HEADER_READ_TIMEOUT_MS)
}
fn default_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn default_response_timeout() -> Duration {
    Duration::from_millis(DEFAULT_RESPONSE_TIMEOUT_MS)
}

/// `connect_queue` when absent: enough devices for a large reconnect storm, each holding
/// only its accepted socket while it waits.
pub const DEFAULT_CONNECT_QUEUE: u32 = 10_000;
/// `queue_timeout_ms` when absent: below the 30-60 s device SDKs give a connect (TLS and
/// MQTT CONNECT still have to follow).
pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 30_000;

fn default_connect_queue() -> u32 {
    DEFAULT_CONNECT_QUEUE
}
fn default_queue_timeout() -> Duration {
    Duration::from_millis(DEFAULT_QUEUE_TIMEOUT_MS)
}

/// The accepted range of a numeric setting, and why.
#[derive(Clone, Copy)]
struct Bounds {
    key: &'static str,
    min: u64,
    max: u64,
    why: &'static str,
}

impl Bounds {
    fn check(&self, value: u64) -> Result<u64, String> {
        if (self.min..=self.max).contains(&value) {
            return Ok(value);
        }
        Err(format!(
            "{} = {value} is out of range {}..={} ({})",
            self.key, self.min, self.max, self.why
        ))
    }

    /// Reads the value and checks it, so the TOML parser's error carries the line.
    fn read<'de, D: Deserializer<'de>>(&self, d: D) -> Result<u64, D::Error> {
        let value = u64::deserialize(d)?;
        self.check(value).map_err(serde::de::Error::custom)
    }
}

/// IoT Hub S3 takes 6,000 new connections per second per unit; a million is beyond any hub.
pub const MAX_CONNECT_RATE: u32 = 1_000_000;
const CONNECT_RATE: Bounds = Bounds {
    key: "max_new_connections_per_sec",
    min: 1,
    max: MAX_CONNECT_RATE as u64,
    why: "leave it out to turn pacing off",
};
/// Each waiting device holds one socket of the agent.
const CONNECT_QUEUE: Bounds = Bounds {
    key: "connect_queue",
    min: 1,
    max: 1_000_000,
    why: "devices waiting for a connect slot",
};
/// Beyond ten minutes a device has long given up on its connect.
const QUEUE_TIMEOUT: Bounds = Bounds {
    key: "queue_timeout_ms",
    min: 1,
    max: 600_000,
    why: "how long a device may wait for a connect slot",
};

/// A deserializer that reads a number of type `$ty` (wrapped in `Some` with `some`; a
/// `Duration` of that many seconds or milliseconds with `secs` or `millis`) within
/// `$bounds`, so an out-of-range value is refused with its line.
macro_rules! bounded {
    ($name:ident: secs = $bounds:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            $bounds.read(d).map(Duration::from_secs)
        }
    };
    ($name:ident: millis = $bounds:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            $bounds.read(d).map(Duration::from_millis)
        }
    };
    ($name:ident: $ty:ty = $bounds:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            let value = $bounds.read(d)?;
            <$ty>::try_from(value).map_err(serde::de::Error::custom)
        }
    };
    ($name:ident: some $ty:ty = $bounds:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            let value = $bounds.read(d)?;
            <$ty>::try_from(value)
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
    };
}

const IDLE_TIMEOUT: Bounds = Bounds {
    key: "idle_timeout_secs",
    min: 1,
    max: 30 * 86_400,
    why: "seconds; IoT Hub drops a device after at most 29.45 min of silence",
};
/// Below a megabyte the verdict would ask the agent to move the budget along every few
/// segments: work per message, which the kernel path exists to avoid.
const MAX_LAG: Bounds = Bounds {
    key: "max_lag_bytes",
    min: 1 << 20,
    max: 1 << 30,
    why: "bytes the kernel may queue for a peer that does not read",
};
const CLIENT_HELLO_TIMEOUT: Bounds = Bounds {
    key: "client_hello_timeout_ms",
    min: 100,
    max: 300_000,
    why: "time a client gets to send its TLS ClientHello",
};
/// The kernel refuses TCP_KEEPIDLE above 32,767 s.
const KEEPALIVE: Bounds = Bounds {
    key: "tcp_keepalive_secs",
    min: 0,
    max: 32_767,
    why: "0 turns keepalive off; the kernel takes at most 32767",
};
const MAX_CONNECTIONS: Bounds = Bounds {
    key: "max_connections",
    min: 1,
    max: 10_000_000,
    why: "open client connections",
};
const PER_SOURCE: Bounds = Bounds {
    key: "max_connections_per_source",
    min: 1,
    max: 10_000_000,
    why: "leave it out for no per-source cap",
};
const IPV4_PREFIX: Bounds = Bounds {
    key: "source_prefix_ipv4",
    min: 1,
    max: 32,
    why: "leading bits that name a source",
};
const IPV6_PREFIX: Bounds = Bounds {
    key: "source_prefix_ipv6",
    min: 1,
    max: 128,
    why: "leading bits that name a source",
};
const HEADER_READ_TIMEOUT: Bounds = Bounds {
    key: "header_read_timeout_ms",
    min: 100,
    max: 300_000,
    why: "time for the TLS handshake and each request's headers",
};
const MAX_HEADER_BYTES: Bounds = Bounds {
    key: "max_header_bytes",
    min: 8_192,
    max: 1 << 20,
    why: "request head size",
};
const CONNECT_TIMEOUT: Bounds = Bounds {
    key: "connect_timeout_ms",
    min: 10,
    max: 300_000,
    why: "time to connect one upstream server",
};
const RESPONSE_TIMEOUT: Bounds = Bounds {
    key: "response_timeout_ms",
    min: 10,
    max: 3_600_000,
    why: "time the upstream gets to answer a request's headers",
};

bounded!(idle_timeout: secs = IDLE_TIMEOUT);
bounded!(max_lag: u64 = MAX_LAG);
bounded!(client_hello_timeout: millis = CLIENT_HELLO_TIMEOUT);
bounded!(keepalive: u32 = KEEPALIVE);
bounded!(some_max_connections: some usize = MAX_CONNECTIONS);
bounded!(some_per_source: some u32 = PER_SOURCE);
bounded!(ipv4_prefix: u8 = IPV4_PREFIX);
bounded!(ipv6_prefix: u8 = IPV6_PREFIX);
bounded!(header_read_timeout: millis = HEADER_READ_TIMEOUT);
bounded!(max_header_bytes: usize = MAX_HEADER_BYTES);
bounded!(connect_timeout: millis = CONNECT_TIMEOUT);
bounded!(response_timeout: millis = RESPONSE_TIMEOUT);

/// `http_idle_timeout_ms` when absent: a device's next REST call within a minute reuses
/// its connection; a connection left open by a client that went away is gone after one.
pub const DEFAULT_HTTP_IDLE_TIMEOUT_MS: u64 = 60_000;
const HTTP_IDLE_TIMEOUT: Bounds = Bounds {
    key: "http_idle_timeout_ms",
    min: 100,
    max: 3_600_000,
    why: "how long a client connection may wait for its next request",
};
/// Each upstream connection is one TLS session the hub holds for us.
const UPSTREAM_CAP: Bounds = Bounds {
    key: "max_upstream_connections",
    min: 1,
    max: 1_000_000,
    why: "leave it out for no cap",
};

fn default_http_idle_timeout() -> Duration {
    Duration::from_millis(DEFAULT_HTTP_IDLE_TIMEOUT_MS)
}
bounded!(http_idle_timeout: millis = HTTP_IDLE_TIMEOUT);
fn upstream_cap<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let value = UPSTREAM_CAP.read(d)?;
    u32::try_from(value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
fn connect_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let value = CONNECT_RATE.read(d)?;
    u32::try_from(value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
fn connect_queue<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let value = CONNECT_QUEUE.read(d)?;
    u32::try_from(value).map_err(serde::de::Error::custom)
}
bounded!(queue_timeout: millis = QUEUE_TIMEOUT);

/// SNI route keys as devices send them: lower case (names compare without case, and
/// two keys differing only in case would silently be one) and without a trailing dot
/// (RFC 6066: a ClientHello's name has none, so such a key never matches).
fn validate_sni_keys(f: &Frontend) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for key in f.sni_routes.keys() {
        let problem = if key.is_empty() {
            Some("is empty".to_owned())
        } else if key.ends_with('.') {
            Some(format!(
                "ends with a dot; clients send names without it: write {:?}",
                key.trim_end_matches('.')
            ))
        } else if !seen.insert(key.to_ascii_lowercase()) {
            Some("differs from another key only in case (names compare without case)".into())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ConfigError::Invalid(format!(
                "frontend {:?}: sni_routes key {key:?} {problem}",
                f.name
            )));
        }
    }
    Ok(())
}

/// IoT Hub lets a device set an MQTT keep-alive of up to 1,177 s and waits 1.5 times
/// that (29.45 min) before it drops the device: a shorter idle timeout here cuts devices
/// the hub still considers connected.
pub const MIN_SAFE_IDLE_SECS: u64 = 1_767;
/// The default idle timeout: above `MIN_SAFE_IDLE_SECS` (SDK defaults are 240-300 s).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 1_800;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; errors carry the line and column (from the TOML parser).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let mut config = config;
        config.note_given_keys(text);
        config.validate()?;
        Ok(config)
    }

    /// Records which keys each `[[frontend]]` of the file set (for `warnings`).
    fn note_given_keys(&mut self, text: &str) {
        let Ok(table) = toml::from_str::<toml::Table>(text) else {
            return;
        };
        let Some(toml::Value::Array(frontends)) = table.get("frontend") else {
            return;
        };
        for (f, raw) in self.frontends.iter_mut().zip(frontends) {
            if let toml::Value::Table(keys) = raw {
                f.given = keys.keys().cloned().collect();
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.validate_instance()?;
        let backends = self.validate_backends()?;
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for f in &self.frontends {
            if !names.insert(f.name.as_str()) {
                return invalid(format!("frontend {:?} is defined twice", f.name));
            }
            // Port 0 (an ephemeral port each) never collides.
            if f.bind.port() != 0 && !binds.insert(f.bind) {
                return invalid(format!(
                    "frontend {:?}: {} is already bound by another frontend",
                    f.name, f.bind
                ));
            }
            // A transparent frontend without either sends each device to its original
            // destination.
            if f.backend.is_none() && f.sni_routes.is_empty() && f.mode != Mode::Transparent {
                return invalid(format!(
                    "frontend {:?} needs a backend or sni_routes",
                    f.name
                ));
            }
            for target in f.backend.iter().chain(f.sni_routes.values()) {
                if !backends.contains(target.as_str()) {
                    return invalid(format!(
                        "frontend {:?} names unknown backend {target:?}",
                        f.name
                    ));
                }
            }
            if let Some(problem) = f.bounds_problem() {
                return invalid(problem);
            }
            validate_sni_keys(f)?;
            match f.mode {
                Mode::Http => self.validate_http_frontend(f)?,
                Mode::Originate => self.validate_originate_frontend(f)?,
                Mode::Splice | Mode::Transparent => {
                    if f.tls_cert.is_some() || f.tls_key.is_some() {
                        return invalid(format!(
                            "frontend {:?}: tls_cert/tls_key only apply to mode \"http\" (splice passes TLS through untouched)",
                            f.name
                        ));
                    }
                }
            }
        }
        if self.frontends.is_empty() {
            return invalid("no frontends configured".into());
        }
        self.validate_agent_wide()
    }

    /// The instance names a pin directory and a lock file: a plain name.
    fn validate_instance(&self) -> Result<(), ConfigError> {
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.instance.is_empty() || !self.instance.chars().all(plain) {
            return Err(ConfigError::Invalid(format!(
                "instance {:?}: use letters, digits, '-' or '_'",
                self.instance
            )));
        }
        Ok(())
    }

    /// The settings of the whole agent: its connection cap, admin server and XDP guard.
    fn validate_agent_wide(&self) -> Result<(), ConfigError> {
        if let Some(problem) =
            first_out_of_bounds(&[(MAX_CONNECTIONS, self.max_connections.map(|n| n as u64))])
        {
            return Err(ConfigError::Invalid(format!("agent: {problem}")));
        }
        self.validate_admin()?;
        if let Some(xdp) = &self.xdp {
            crate::xdp::validate(xdp).map_err(ConfigError::Invalid)?;
        }
        crate::transparent::validate(self).map_err(ConfigError::Invalid)
    }

    /// Each backend on its own; returns the backend names, for the frontends' references.
    fn validate_backends(&self) -> Result<HashSet<&str>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut backends = HashSet::new();
        for b in &self.backends {
            if !backends.insert(b.name.as_str()) {
                return invalid(format!("backend {:?} is defined twice", b.name));
            }
            if b.servers.is_empty() {
                return invalid(format!("backend {:?} has no servers", b.name));
            }
            for s in &b.servers {
                if s.address
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    return invalid(format!(
                        "backend {:?}: server address {:?} is not host:port",
                        b.name, s.address
                    ));
                }
            }
            if b.servers.iter().all(|s| s.weight == 0) {
                return invalid(format!("backend {:?}: every server has weight 0", b.name));
            }
            if let Some(problem) = b.bounds_problem() {
                return invalid(problem);
            }
        }
        Ok(backends)
    }

    /// The admin server must not listen on a frontend's port: both sockets use
    /// SO_REUSEPORT, so the kernel would hand some device connections to the metrics
    /// server (same address) or all local ones (a specific address beside a wildcard).
    fn validate_admin(&self) -> Result<(), ConfigError> {
        let Some(admin) = self.admin else {
            return Ok(());
        };
        match self.frontends.iter().find(|f| binds_overlap(admin, f.bind)) {
            Some(f) => Err(ConfigError::Invalid(format!(
                "admin = \"{admin}\" overlaps frontend {:?} (bind {}): both would listen on port {} and share its connections; give admin a port of its own",
                f.name,
                f.bind,
                admin.port()
            ))),
            None => Ok(()),
        }
    }

    fn validate_originate_frontend(&self, f: &Frontend) -> Result<(), ConfigError> {
        let invalid = |m: String| {
            Err(ConfigError::Invalid(format!(
                "frontend {:?} (mode \"originate\"): {m}",
                f.name
            )))
        };
        if f.tls_cert.is_some() || f.tls_key.is_some() || !f.sni_routes.is_empty() {
            return invalid(
                "devices connect without TLS here: tls_cert, tls_key and sni_routes do not apply"
                    .into(),
            );
        }
        self.hub(f).map(|_| ())
    }

    /// The hub an http or originate frontend talks to, resolved and checked: `validate`
    /// refuses a configuration where this fails, so the agent's build step only reads it.
    pub fn hub(&self, f: &Frontend) -> Result<Hub<'_>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("frontend {:?}: {m}", f.name)));
        let Some(backend) = self
            .backends
            .iter()
            .find(|b| f.backend.as_deref() == Some(b.name.as_str()))
        else {
            return invalid("needs a backend".into());
        };
        let Some(host) = backend.http_host() else {
            return invalid(format!("backend {:?} needs a host name", backend.name));
        };
        // Each name must do as a `Host` header and as a TLS server name.
        let checked = |name: &String| {
            let header = http::HeaderValue::from_str(name).ok();
            let server = rustls_pki_types::ServerName::try_from(name.clone()).ok();
            header.zip(server).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "frontend {:?}: backend {:?}: {name:?} is not a valid host name",
                    f.name, backend.name
                ))
            })
        };
        let (host, host_as_server) = checked(&host)?;
        let server_name = match &backend.tls_server_name {
            Some(name) => checked(name)?.1,
            None => host_as_server,
        };
        Ok(Hub {
            backend,
            host,
            server_name,
        })
    }

    /// An http frontend's certificate files and hub, resolved and checked (see `hub`).
    pub fn terminating<'c>(&'c self, f: &'c Frontend) -> Result<Terminating<'c>, ConfigError> {
        let (tls_cert, tls_key) = f.tls_files()?;
        Ok(Terminating {
            hub: self.hub(f)?,
            tls_cert,
            tls_key,
        })
    }

    fn validate_http_frontend(&self, f: &Frontend) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("frontend {:?}: {m}", f.name)));
        f.tls_files()?;
        if !f.sni_routes.is_empty() {
            return invalid("sni_routes apply to splice frontends only".into());
        }
        if let Err(problem) = HTTP_IDLE_TIMEOUT.check(millis(f.http_idle_timeout)) {
            return invalid(problem);
        }
        self.terminating(f).map(|_| ())
    }

    /// Settings that work but are known to hurt IoT devices, or that do nothing.
    pub fn warnings(&self) -> Vec<String> {
        let short_idle = self
            .frontends
            .iter()
            .filter(|f| f.idle_timeout.as_secs() < MIN_SAFE_IDLE_SECS)
            .map(|f| {
                format!(
                    "frontend {:?}: idle timeout {} s is shorter than {} s; IoT Hub allows MQTT keep-alives up to 1,177 s (and waits 1.5x), so quiet devices will be dropped",
                    f.name,
                    f.idle_timeout.as_secs(),
                    MIN_SAFE_IDLE_SECS
                )
            });
        let ignored = self.frontends.iter().filter_map(|f| {
            let keys = f.ignored_keys();
            (!keys.is_empty()).then(|| {
                format!(
                    "frontend {:?}: mode {:?} does not use {}; the setting does nothing",
                    f.name,
                    f.mode,
                    keys.join(", ")
                )
            })
        });
        short_idle
            .chain(ignored)
            .chain(crate::transparent::warnings(self))
            .collect()
    }

    /// The Azure IoT Hub layout for `--hub NAME`: MQTT and AMQP over TLS spliced to the
    /// hub; with a certificate, 443 terminated with `Host` rewrite and WebSockets too.
    pub fn for_hub(
        hub: &str,
        bind_ip: std::net::IpAddr,
        https: Option<(PathBuf, PathBuf)>,
        extras: HubExtras,
    ) -> Self {
        let frontend = |name: &str, port: u16, mode: Mode| {
            Frontend::new(name, SocketAddr::new(bind_ip, port), mode, name)
        };
        let backend = |name: &str, port: u16| Backend::new(name, &format!("{hub}:{port}"));
        let mut config = Self::new(
            default_instance(),
            vec![
                frontend("mqtt", 8883, Mode::Splice),
                frontend("amqp", 5671, Mode::Splice),
            ],
            vec![backend("mqtt", 8883), backend("amqp", 5671)],
        );
        if extras.dps {
            // Devices reach DPS first, on the same ports: route by the TLS server name.
            for (i, (name, port)) in [("mqtt", 8883), ("amqp", 5671)].into_iter().enumerate() {
                let dps = format!("dps-{name}");
                let routes = &mut config.frontends[i].sni_routes;
                routes.insert(hub.to_ascii_lowercase(), name.into());
                routes.insert(DPS_HOST.into(), dps.clone());
                config
                    .backends
                    .push(Backend::new(&dps, &format!("{DPS_HOST}:{port}")));
            }
        }
        if let Some((cert, key)) = https {
            let mut https = frontend("https", 443, Mode::Http);
            https.tls_cert = Some(cert);
            https.tls_key = Some(key);
            config.frontends.push(https);
            config.backends.push(backend("https", 443));
        }
        if extras.plain_mqtt {
            // Plain MQTT in, TLS to the hub's 8883 out: IoT Hub refuses MQTT without TLS.
            let mut plain = frontend("mqtt-plain", 1883, Mode::Originate);
            plain.backend = Some("mqtt".into());
            config.frontends.push(plain);
        }
        // The hub's own backends only: DPS is another service with its own limits.
        for b in &mut config.backends {
            if !b.name.starts_with("dps-") {
                b.max_new_connections_per_sec = extras.connect_rate;
            }
        }
        config
    }
}

/// Whether two listening addresses take connections for the same port and address: the
/// same port, and the same address or a wildcard (0.0.0.0 or [::], which on Linux also
/// takes IPv4) on either side. Port 0 (an ephemeral port each) never overlaps.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let (ip_a, ip_b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port()
        && a.port() != 0
        && (ip_a == ip_b || ip_a.is_unspecified() || ip_b.is_unspecified())
}

/// The global Device Provisioning Service endpoint devices contact before their hub.
pub const DPS_HOST: &str = "global.azure-devices-provisioning.net";

/// Optional parts of the `--hub` layout.
#[derive(Clone, Copy, Debug, Default)]
pub struct HubExtras {
    /// Also route the Device Provisioning Service on the passthrough ports (by SNI).
    pub dps: bool,
    /// Also accept plain MQTT on 1883 and originate TLS to the hub (legacy devices).
    pub plain_mqtt: bool,
    /// `max_new_connections_per_sec` of each of the hub's backends (`--connect-rate`).
    pub connect_rate: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
instance = "edge1"
[[frontend]]
name = "mqtt"
bind = "0.0.0.0:8883"
backend = "hub"
[frontend.sni_routes]
"a.azure-devices.net" = "hub"

[[backend]]
name = "hub"
servers = [{ address = "a.azure-devices.net:8883", weight = 2 }]
"#;

    #[test]
    fn a_good_config_parses_with_safe_defaults() {
        let c = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.frontends[0].idle_timeout, default_idle_timeout());
        assert_eq!(c.frontends[0].mode, Mode::Splice);
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_line() {
        let bad = GOOD.replace(
            "backend = \"hub\"\n[frontend",
            "backend = \"hub\"\nidle_timout_secs = 5\n[frontend",
        );
        let err = Config::parse(&bad, "bad.toml").unwrap_err().to_string();
        assert!(
            err.contains("idle_timout_secs") && err.contains("line 7"),
            "{err}"
        );
    }

    #[test]
    fn unknown_backend_and_bad_address_are_rejected() {
        let err = Config::parse(
            &GOOD.replace("backend = \"hub\"", "backend = \"nope\""),
            "x",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown backend \"nope\""),
            "{err}"
        );
        let err = Config::parse(
            &GOOD.replace("a.azure-devices.net:8883", "a.azure-devices.net"),
            "x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not host:port"), "{err}");
    }

    #[test]
    fn short_idle_timeouts_warn() {
        let c = Config::parse(
            &GOOD.replace(
                "backend = \"hub\"\n[frontend",
                "backend = \"hub\"\nidle_timeout_secs = 60\n[frontend",
            ),
            "x",
        )
        .unwrap();
        assert_eq!(c.warnings().len(), 1);
    }

    #[test]
    fn xdp_table_parses_and_bad_cidrs_are_rejected() {
        let with_xdp = format!(
            "{GOOD}\n[xdp]\ninterfaces = [\"eth0\"]\ndeny = [\"192.0.2.0/24\"]\nsyn_rate_per_sec = 50\nsyn_burst = 100\n"
        );
        let c = Config::parse(&with_xdp, "x").unwrap();
        let xdp = c.xdp.unwrap();
        assert_eq!(
            (xdp.mode, xdp.replace, xdp.syn_burst),
            (XdpAttach::Auto, false, 100)
        );
        let err = Config::parse(&with_xdp.replace("192.0.2.0/24", "192.0.2.1/24"), "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("xdp.deny[0]") && err.contains("host bits"),
            "{err}"
        );
        let err = Config::parse(&format!("{with_xdp}bogus = 1\n"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn hub_shortcut_is_valid() {
        let c = Config::for_hub(
            "myhub.azure-devices.net",
            "0.0.0.0".parse().unwrap(),
            None,
            HubExtras::default(),
        );
        c.validate().unwrap();
        assert_eq!(
            c.backends[0].servers[0].address,
            "myhub.azure-devices.net:8883"
        );
        let c = Config::for_hub(
            "myhub.azure-devices.net",
            "0.0.0.0".parse().unwrap(),
            Some(("c.pem".into(), "k.pem".into())),
            HubExtras {
                dps: true,
                plain_mqtt: true,
                connect_rate: Some(200),
            },
        );
        c.validate().unwrap();
        for b in &c.backends {
            let expected = (!b.name.starts_with("dps-")).then_some(200);
            assert_eq!(b.max_new_connections_per_sec, expected, "{}", b.name);
        }
        assert_eq!(c.frontends[0].sni_routes[DPS_HOST], "dps-mqtt");
        assert_eq!(c.frontends[1].sni_routes["myhub.azure-devices.net"], "amqp");
        assert_eq!(c.frontends[3].mode, Mode::Originate);
        assert_eq!(c.frontends[3].bind.port(), 1883);
        assert_eq!(c.frontends[2].mode, Mode::Http);
        let https = c.backends.iter().find(|b| b.name == "https").unwrap();
        assert_eq!(
            https.http_host().as_deref(),
            Some("myhub.azure-devices.net")
        );
    }

    #[test]
    fn http_frontends_need_a_certificate_and_splice_ones_refuse_it() {
        let http = GOOD.replace(
            "[frontend.sni_routes]\n\"a.azure-devices.net\" = \"hub\"\n",
            "mode = \"http\"\n",
        );
        let err = Config::parse(&http, "x").unwrap_err().to_string();
        assert!(err.contains("needs tls_cert and tls_key"), "{err}");
        let with_cert = http.replace(
            "mode = \"http\"\n",
            "mode = \"http\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        );
        Config::parse(&with_cert, "x").unwrap();
        let splice_with_cert = GOOD.replace(
            "backend = \"hub\"\n[frontend",
            "backend = \"hub\"\ntls_cert = \"c.pem\"\n[frontend",
        );
        let err = Config::parse(&splice_with_cert, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only apply to mode"), "{err}");
    }

    /// Found while writing the `config` fuzz target (which now checks it): a huge
    /// `max_connections` passed validation, then panicked the agent at start
    /// (`Semaphore::new` above `MAX_PERMITS`). Now bounded, on every mode.
    #[test]
    fn max_connections_beyond_a_semaphore_is_refused() {
        let http = GOOD.replace(
            "[frontend.sni_routes]\n\"a.azure-devices.net\" = \"hub\"\n",
            "mode = \"http\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        );
        for (value, ok) in [
            ("0", false),
            ("1", true),
            ("10000000", true),
            ("10000001", false),
            ("9223372036854775807", false),
        ] {
            let text = http.replace(
                "mode = \"http\"\n",
                &format!("mode = \"http\"\nmax_connections = {value}\n"),
            );
            match Config::parse(&text, "x") {
                Ok(c) => {
                    assert!(ok, "{value} accepted");
                    let max = c.frontends[0].max_connections();
                    assert_eq!(tokio::sync::Semaphore::new(max).available_permits(), max);
                }
                Err(err) => {
                    assert!(!ok, "{value}: {err}");
                    assert!(err.to_string().contains("is out of range 1..=10000000"));
                }
            }
        }
    }

    #[test]
    fn http_host_comes_from_the_first_server_unless_set() {
        let c = Config::parse(GOOD, "x").unwrap();
        assert_eq!(
            c.backends[0].http_host().as_deref(),
            Some("a.azure-devices.net")
        );
        let mut b = c.backends[0].clone();
        b.servers[0].address = "[2001:db8::1]:443".into();
        assert_eq!(b.http_host().as_deref(), Some("2001:db8::1"));
        b.host = Some("hub.example".into());
        assert_eq!(b.http_host().as_deref(), Some("hub.example"));
    }

    #[test]
    fn pacing_is_off_by_default_and_parses_with_its_defaults() {
        let c = Config::parse(GOOD, "x").unwrap();
        let b = &c.backends[0];
        assert_eq!(b.max_new_connections_per_sec, None);
        assert_eq!(b.pacing(), None);
        assert!(b.pacing_summary().contains("off"), "{}", b.pacing_summary());
        let paced = GOOD.replace(
            "weight = 2 }]\n",
            "weight = 2 }]\nmax_new_connections_per_sec = 500\n",
        );
        let c = Config::parse(&paced, "x").unwrap();
        let p = c.backends[0].pacing().expect("pacing on");
        assert_eq!(
            (p.rate_per_sec, p.queue, p.queue_timeout.as_millis()),
            (
                500,
                DEFAULT_CONNECT_QUEUE,
                u128::from(DEFAULT_QUEUE_TIMEOUT_MS)
            )
        );
        let summary = c.backends[0].pacing_summary();
        assert!(
            summary.contains("max_new_connections_per_sec = 500 (burst 50)")
                && summary.contains("connect_queue = 10000")
                && summary.contains("queue_timeout_ms = 30000"),
            "{summary}"
        );
        let tuned = paced.replace(
            "= 500\n",
            "= 500\nconnect_queue = 5\nqueue_timeout_ms = 1500\n",
        );
        let p = Config::parse(&tuned, "x").unwrap().backends[0].pacing();
        assert_eq!(
            p.map(|p| (p.queue, p.queue_timeout.as_millis())),
            Some((5, 1500))
        );
    }

    #[test]
    fn an_admin_address_on_a_frontends_port_is_refused() {
        // GOOD's frontend binds 0.0.0.0:8883.
        for admin in [
            "0.0.0.0:8883",
            "127.0.0.1:8883",
            "[::]:8883",
            "[::1]:8883",
            "[::ffff:10.0.0.1]:8883",
        ] {
            let config = format!("admin = \"{admin}\"\n{GOOD}");
            let err = Config::parse(&config, "x").unwrap_err().to_string();
            assert!(
                err.contains(&format!("admin = \"{admin}\""))
                    && err.contains("frontend \"mqtt\" (bind 0.0.0.0:8883)")
                    && err.contains("a port of its own"),
                "{admin}: {err}"
            );
        }
        for admin in ["0.0.0.0:9100", "127.0.0.1:8884"] {
            Config::parse(&format!("admin = \"{admin}\"\n{GOOD}"), "x").unwrap();
        }
        // A specific frontend address: only a wildcard or the same address overlaps.
        let specific = GOOD.replace("0.0.0.0:8883", "10.0.0.1:8883");
        for (admin, overlaps) in [
            ("0.0.0.0:8883", true),
            ("[::]:8883", true),
            ("10.0.0.1:8883", true),
            ("10.0.0.2:8883", false),
            ("127.0.0.1:8883", false),
        ] {
            let parsed = Config::parse(&format!("admin = \"{admin}\"\n{specific}"), "x");
            assert_eq!(parsed.is_err(), overlaps, "{admin}: {parsed:?}");
        }
        // Ephemeral ports never overlap.
        let mut c = Config::parse(GOOD, "x").unwrap();
        c.frontends[0].bind = "127.0.0.1:0".parse().unwrap();
        c.admin = Some("127.0.0.1:0".parse().unwrap());
        c.validate().unwrap();
    }

    #[test]
    fn http_idle_timeout_and_upstream_cap_have_defaults_and_bounds() {
        let c = Config::parse(GOOD, "x").unwrap();
        assert_eq!(
            c.frontends[0].http_idle_timeout,
            Duration::from_millis(DEFAULT_HTTP_IDLE_TIMEOUT_MS)
        );
        assert_eq!(c.backends[0].max_upstream_connections, None);
        let tuned = GOOD
            .replace(
                "backend = \"hub\"\n[frontend",
                "backend = \"hub\"\nhttp_idle_timeout_ms = 5000\n[frontend",
            )
            .replace(
                "weight = 2 }]\n",
                "weight = 2 }]\nmax_upstream_connections = 64\n",
            );
        let c = Config::parse(&tuned, "x").unwrap();
        assert_eq!(
            c.frontends[0].http_idle_timeout,
            Duration::from_millis(5000)
        );
        assert_eq!(c.backends[0].max_upstream_connections, Some(64));
        for (from, to, why) in [
            (
                "= 5000",
                "= 0",
                "http_idle_timeout_ms = 0 is out of range 100..=3600000",
            ),
            (
                "= 64",
                "= 0",
                "max_upstream_connections = 0 is out of range 1..=1000000",
            ),
        ] {
            let err = Config::parse(&tuned.replace(from, to), "x")
                .unwrap_err()
                .to_string();
            assert!(err.contains(why) && err.contains("line "), "{err}");
        }
        // Built in code: refused by validate, naming the backend.
        let mut c = Config::parse(GOOD, "x").unwrap();
        c.backends[0].max_upstream_connections = Some(0);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("backend \"hub\": max_upstream_connections = 0"),
            "{err}"
        );
    }

    #[test]
    fn pacing_values_out_of_range_are_refused_with_the_line() {
        for (setting, why) in [
            (
                "max_new_connections_per_sec = 0",
                "out of range 1..=1000000",
            ),
            ("max_new_connections_per_sec = 5000000", "out of range"),
            ("max_new_connections_per_sec = -3", "invalid value"),
            ("connect_queue = 0", "connect_queue = 0 is out of range"),
            (
                "queue_timeout_ms = 0",
                "queue_timeout_ms = 0 is out of range",
            ),
            ("queue_timeout_ms = 86400000", "out of range 1..=600000"),
        ] {
            let bad = GOOD.replace("weight = 2 }]\n", &format!("weight = 2 }}]\n{setting}\n"));
            let err = Config::parse(&bad, "bad.toml").unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("line 13"),
                "{setting}: {err}"
            );
        }
        // Built in code (e.g. `--connect-rate 0`): refused by validate, naming the backend.
        let mut c = Config::parse(GOOD, "x").unwrap();
        c.backends[0].max_new_connections_per_sec = Some(0);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("backend \"hub\"") && err.contains("max_new_connections_per_sec = 0"),
            "{err}"
        );
    }

    #[test]
    fn frontend_settings_out_of_range_are_refused_with_their_line() {
        for (setting, why) in [
            ("max_lag_bytes = 0", "max_lag_bytes = 0 is out of range"),
            ("max_lag_bytes = 4096", "out of range 1048576..="),
            ("client_hello_timeout_ms = 0", "client_hello_timeout_ms = 0"),
            (
                "tcp_keepalive_secs = 40000",
                "the kernel takes at most 32767",
            ),
            ("idle_timeout_secs = 0", "idle_timeout_secs = 0"),
            (
                "max_connections = 99999999999",
                "max_connections = 99999999999 is out of range",
            ),
            ("max_connections = 0", "max_connections = 0"),
            ("max_connections_per_source = 0", "for no per-source cap"),
            ("source_prefix_ipv6 = 129", "source_prefix_ipv6 = 129"),
            ("header_read_timeout_ms = 0", "header_read_timeout_ms = 0"),
        ] {
            let bad = GOOD.replace(
                "backend = \"hub\"\n[frontend",
                &format!("backend = \"hub\"\n{setting}\n[frontend"),
            );
            let err = Config::parse(&bad, "bad.toml").unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("line 7"),
                "{setting}: {err}"
            );
        }
        for (setting, why) in [
            ("connect_timeout_ms = 0", "connect_timeout_ms = 0"),
            ("response_timeout_ms = 0", "response_timeout_ms = 0"),
        ] {
            let bad = GOOD.replace("weight = 2 }]\n", &format!("weight = 2 }}]\n{setting}\n"));
            let err = Config::parse(&bad, "bad.toml").unwrap_err().to_string();
            assert!(err.contains(why), "{setting}: {err}");
        }
        let err = Config::parse(&format!("max_connections = 0\n{GOOD}"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        // Built in code: refused by validate, naming the frontend.
        let mut c = Config::parse(GOOD, "x").unwrap();
        c.frontends[0].max_lag_bytes = 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("frontend \"mqtt\": max_lag_bytes"), "{err}");
    }

    #[test]
    fn caps_default_by_mode() {
        let c = Config::parse(GOOD, "x").unwrap();
        assert_eq!(c.frontends[0].max_connections(), DEFAULT_MAX_CONNECTIONS_L4);
        assert_eq!(c.frontends[0].source_limit(), None);
        let capped = GOOD.replace(
            "backend = \"hub\"\n[frontend",
            "backend = \"hub\"\nmax_connections = 7\nmax_connections_per_source = 3\n[frontend",
        );
        let f = &Config::parse(&capped, "x").unwrap().frontends[0];
        assert_eq!(f.max_connections(), 7);
        let limit = f.source_limit().unwrap();
        assert_eq!(
            (limit.max, limit.ipv4_prefix, limit.ipv6_prefix),
            (3, 32, 64)
        );
    }

    #[test]
    fn sni_keys_with_a_dot_or_differing_only_in_case_are_refused() {
        let dotted = GOOD.replace("\"a.azure-devices.net\" = ", "\"a.azure-devices.net.\" = ");
        let err = Config::parse(&dotted, "x").unwrap_err().to_string();
        assert!(err.contains("ends with a dot"), "{err}");
        let twice = GOOD.replace(
            "\"a.azure-devices.net\" = \"hub\"",
            "\"a.azure-devices.net\" = \"hub\"\n\"A.Azure-Devices.net\" = \"hub\"",
        );
        let err = Config::parse(&twice, "x").unwrap_err().to_string();
        assert!(err.contains("only in case"), "{err}");
    }

    #[test]
    fn settings_the_mode_ignores_warn() {
        let c = Config::parse(
            &GOOD.replace(
                "backend = \"hub\"\n[frontend",
                "backend = \"hub\"\nheader_read_timeout_ms = 5000\n[frontend",
            ),
            "x",
        )
        .unwrap();
        let warnings = c.warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains("does not use header_read_timeout_ms"),
            "{warnings:?}"
        );
    }
}
