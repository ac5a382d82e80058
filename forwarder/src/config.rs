//! The agent's configuration: TOML, parsed once at the edge into typed values, unknown
//! keys rejected, then checked as a whole by `validate`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Seconds without a byte either way before the connection is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Bytes the kernel may queue for a peer that stopped reading.
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: u64,
    #[serde(default = "default_client_hello_timeout")]
    pub client_hello_timeout_ms: u64,
    /// TCP keepalive idle seconds towards both peers (0: off).
    #[serde(default = "default_keepalive")]
    pub tcp_keepalive_secs: u32,
    /// mode "http": PEM certificate chain devices are shown.
    pub tls_cert: Option<PathBuf>,
    /// mode "http": PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// mode "http": open client connections at most (more wait in the accept queue).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// mode "http": time for the TLS handshake and for each request's headers.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// mode "http": request head size at most; larger heads get 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
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
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub servers: Vec<ServerConfig>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// HTTP backends: the hub's name, sent as `Host` (default: the first server's host).
    pub host: Option<String>,
    /// HTTP backends: TLS server name (SNI and certificate check), if not `host`. IoT Hub
    /// also answers as `<hub>.device.azure-devices.net` for TLS 1.3.
    pub tls_server_name: Option<String>,
    /// HTTP backends: extra trusted CA certificates (PEM) besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// HTTP backends: time the hub gets to answer a request's headers (then 504).
    #[serde(default = "default_response_timeout")]
    pub response_timeout_ms: u64,
    /// New upstream connections per second at most, for reconnect storms (IoT Hub
    /// throttles new connections per unit and rejects the excess). Absent: no pacing.
    #[serde(default, deserialize_with = "connect_rate")]
    pub max_new_connections_per_sec: Option<u32>,
    /// With pacing: devices that may wait for a connect slot; more are refused at once.
    #[serde(default = "default_connect_queue", deserialize_with = "connect_queue")]
    pub connect_queue: u32,
    /// With pacing: how long a device may wait for its slot before it is refused.
    #[serde(default = "default_queue_timeout", deserialize_with = "queue_timeout")]
    pub queue_timeout_ms: u64,
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
        }
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
            idle_timeout_secs: default_idle_timeout(),
            max_lag_bytes: default_max_lag(),
            client_hello_timeout_ms: default_client_hello_timeout(),
            tcp_keepalive_secs: default_keepalive(),
            tls_cert: None,
            tls_key: None,
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
        }
    }
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
            connect_timeout_ms: default_connect_timeout(),
            host: None,
            tls_server_name: None,
            ca_file: None,
            response_timeout_ms: default_response_timeout(),
            max_new_connections_per_sec: None,
            connect_queue: default_connect_queue(),
            queue_timeout_ms: default_queue_timeout(),
        }
    }

    /// The pacing of new connections this backend asks for (`None`: off).
    pub fn pacing(&self) -> Option<PacingLimits> {
        self.max_new_connections_per_sec
            .map(|rate_per_sec| PacingLimits {
                rate_per_sec,
                queue: self.connect_queue,
                queue_timeout: std::time::Duration::from_millis(self.queue_timeout_ms),
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
                self.queue_timeout_ms
            ),
            None => format!(
                "backend {:?}: max_new_connections_per_sec off (connects are not paced)",
                self.name
            ),
        }
    }

    /// Out-of-range pacing settings (also refused while parsing, with the line; this
    /// covers configurations built in code, e.g. `--connect-rate`).
    fn pacing_problem(&self) -> Option<String> {
        let checks = [
            (
                CONNECT_RATE,
                self.max_new_connections_per_sec.map(u64::from),
            ),
            (CONNECT_QUEUE, Some(u64::from(self.connect_queue))),
            (QUEUE_TIMEOUT, Some(self.queue_timeout_ms)),
        ];
        checks
            .into_iter()
            .find_map(|(bounds, value)| bounds.check(value?).err())
            .map(|m| format!("backend {:?}: {m}", self.name))
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

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// host:port
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_instance() -> String {
    "default".into()
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_max_lag() -> u64 {
    32 << 20
}
fn default_client_hello_timeout() -> u64 {
    10_000
}
fn default_keepalive() -> u32 {
    120
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_weight() -> u32 {
    1
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_max_header_bytes() -> usize {
    64 << 10
}
fn default_response_timeout() -> u64 {
    60_000
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
fn default_queue_timeout() -> u64 {
    DEFAULT_QUEUE_TIMEOUT_MS
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
fn queue_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    QUEUE_TIMEOUT.read(d)
}

/// `max_connections` of an HTTP frontend at most: the permits a tokio semaphore can hold.
pub const MAX_HTTP_CONNECTIONS: usize = tokio::sync::Semaphore::MAX_PERMITS;

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
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.instance.is_empty()
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(format!(
                "instance {:?}: use letters, digits, '-' or '_'",
                self.instance
            ));
        }
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
            if f.backend.is_none() && f.sni_routes.is_empty() {
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
            if f.idle_timeout_secs == 0 {
                return invalid(format!(
                    "frontend {:?}: idle_timeout_secs must be > 0",
                    f.name
                ));
            }
            match f.mode {
                Mode::Http => self.validate_http_frontend(f)?,
                Mode::Originate => self.validate_originate_frontend(f)?,
                Mode::Splice => {
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
        if let Some(xdp) = &self.xdp {
            crate::xdp::validate(xdp).map_err(ConfigError::Invalid)?;
        }
        Ok(())
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
            if let Some(problem) = b.pacing_problem() {
                return invalid(problem);
            }
        }
        Ok(backends)
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
        self.hub_name_of(f).map(|_| ())
    }

    /// The backend's host name (what TLS towards it verifies), for http/originate modes.
    fn hub_name_of(&self, f: &Frontend) -> Result<String, ConfigError> {
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
        for name in std::iter::once(&host).chain(backend.tls_server_name.as_ref()) {
            if http::HeaderValue::from_str(name).is_err()
                || rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return invalid(format!(
                    "backend {:?}: {name:?} is not a valid host name",
                    backend.name
                ));
            }
        }
        Ok(host)
    }

    fn validate_http_frontend(&self, f: &Frontend) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("frontend {:?}: {m}", f.name)));
        if f.tls_cert.is_none() || f.tls_key.is_none() {
            return invalid("mode \"http\" terminates TLS and needs tls_cert and tls_key".into());
        }
        if !f.sni_routes.is_empty() {
            return invalid("sni_routes apply to splice frontends only".into());
        }
        // The limit becomes a semaphore's permits, which panics above its maximum.
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&f.max_connections) {
            return invalid(format!(
                "max_connections must be between 1 and {MAX_HTTP_CONNECTIONS}"
            ));
        }
        if !(8192..=1 << 20).contains(&f.max_header_bytes) {
            return invalid("max_header_bytes must be between 8192 and 1048576".into());
        }
        if f.header_read_timeout_ms == 0 {
            return invalid("header_read_timeout_ms must be > 0".into());
        }
        self.hub_name_of(f).map(|_| ())
    }

    /// Settings that work but are known to hurt IoT devices.
    pub fn warnings(&self) -> Vec<String> {
        self.frontends
            .iter()
            .filter(|f| f.idle_timeout_secs < MIN_SAFE_IDLE_SECS)
            .map(|f| {
                format!(
                    "frontend {:?}: idle timeout {} s is shorter than {} s; IoT Hub allows MQTT keep-alives up to 1,177 s (and waits 1.5x), so quiet devices will be dropped",
                    f.name, f.idle_timeout_secs, MIN_SAFE_IDLE_SECS
                )
            })
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
        assert_eq!(c.frontends[0].idle_timeout_secs, DEFAULT_IDLE_TIMEOUT_SECS);
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
    /// (`Semaphore::new` above `MAX_PERMITS`).
    #[test]
    fn max_connections_beyond_a_semaphore_is_refused() {
        let http = GOOD.replace(
            "[frontend.sni_routes]\n\"a.azure-devices.net\" = \"hub\"\n",
            "mode = \"http\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        );
        for (value, ok) in [
            ("0", false),
            ("1", true),
            (&MAX_HTTP_CONNECTIONS.to_string(), true),
            (&(MAX_HTTP_CONNECTIONS + 1).to_string(), false),
            ("9223372036854775807", false),
        ] {
            let text = http.replace(
                "mode = \"http\"\n",
                &format!("mode = \"http\"\nmax_connections = {value}\n"),
            );
            match Config::parse(&text, "x") {
                Ok(c) => {
                    assert!(ok, "{value} accepted");
                    let max = c.frontends[0].max_connections;
                    assert_eq!(tokio::sync::Semaphore::new(max).available_permits(), max);
                }
                Err(err) => {
                    assert!(!ok, "{value}: {err}");
                    assert!(
                        err.to_string()
                            .contains("max_connections must be between 1 and")
                    );
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
}
