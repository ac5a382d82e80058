//! The proxies under test (the forwarder spliced and in userspace, HAProxy, nginx), their
//! generated configurations, and the processes, stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::topology::{Role, Topology};

/// One way from the client to the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    Direct,
    Splice,
    Userspace,
    Haproxy,
    Nginx,
}

impl Via {
    pub const ALL: [Via; 5] = [
        Via::Direct,
        Via::Splice,
        Via::Userspace,
        Via::Haproxy,
        Via::Nginx,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Splice => "forwarder, kernel splice",
            Self::Userspace => "forwarder, userspace (--no-ebpf)",
            Self::Haproxy => "HAProxy 2.6 tcp, splice",
            Self::Nginx => "nginx stream",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Splice => "splice",
            Self::Userspace => "userspace",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
        }
    }

    /// First port of this path's listeners; each service adds its own offset.
    fn base_port(self) -> u16 {
        match self {
            Self::Direct => 0,
            Self::Splice => 15000,
            Self::Userspace => 16000,
            Self::Haproxy => 17000,
            Self::Nginx => 18000,
        }
    }
}

/// What the servers offer (and the proxies pass on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Echo,
    Iperf,
    Https,
    /// The fleet's plain echo server (`fleet echo-server`, one task per connection).
    FleetEcho,
    /// The same echo server behind TLS, for the reconnect storm (passed through at L4).
    TlsEcho,
}

impl Service {
    pub fn server_port(self) -> u16 {
        match self {
            Self::Echo => 7000,
            Self::Iperf => 5201,
            Self::Https => 8443,
            Self::FleetEcho => 7100,
            Self::TlsEcho => 7443,
        }
    }

    fn offset(self) -> u16 {
        match self {
            Self::Echo => 0,
            Self::Iperf => 201,
            Self::Https => 443,
            Self::FleetEcho => 100,
            Self::TlsEcho => 543,
        }
    }

    /// Frontend, backend and listener name in the proxies' configurations.
    fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Iperf => "iperf",
            Self::Https => "https",
            Self::FleetEcho => "fleet-echo",
            Self::TlsEcho => "tls-echo",
        }
    }
}

/// Where a client connects to reach `service` by `via`.
pub fn target(topology: &Topology, via: Via, service: Service) -> SocketAddr {
    match via {
        Via::Direct => SocketAddr::new(topology.server_ip(), service.server_port()),
        _ => SocketAddr::new(topology.proxy_ip(), via.base_port() + service.offset()),
    }
}

fn upstream(topology: &Topology, service: Service) -> SocketAddr {
    SocketAddr::new(topology.server_ip(), service.server_port())
}

/// A process the bench started, in its own process group; stopped (then killed) on drop.
pub struct Process {
    pub name: String,
    child: Child,
    stop_signal: libc::c_int,
}

impl Process {
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_signal: libc::c_int,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null()).stdout(log_file.try_clone()?);
        Self::start(name, cmd, log_file, stop_signal)
    }

    /// Like `spawn`, with stdin and stdout piped to the caller (stderr goes to `log`): for
    /// a load generator that reports its phases as it goes and waits to be told to end.
    pub fn spawn_piped(
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_signal: libc::c_int,
    ) -> anyhow::Result<(Self, ChildStdin, ChildStdout)> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut this = Self::start(name, cmd, std::fs::File::create(log)?, stop_signal)?;
        let stdin = this.child.stdin.take().context("no stdin pipe")?;
        let stdout = this.child.stdout.take().context("no stdout pipe")?;
        Ok((this, stdin, stdout))
    }

    fn start(
        name: &str,
        mut cmd: Command,
        stderr: std::fs::File,
        stop_signal: libc::c_int,
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        cmd.stderr(stderr).process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.into(),
            child,
            stop_signal,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited (a bad config, a port in use).
    pub fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{} exited ({status}): {}", self.name, text.trim());
        }
        Ok(())
    }
}

impl Drop for Process {
    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    fn drop(&mut self) {
        let pgid = -(self.child.id() as i32);
        // SAFETY: signals only the process group this bench created for this child.
        unsafe { libc::kill(pgid, self.stop_signal) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever is left of the group is ended.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Certificates for the HTTPS comparison (made by `bench_http pki`).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// A started proxy: its process and the log it writes.
pub struct Proxy {
    pub via: Via,
    pub process: Process,
    pub log: PathBuf,
}

/// What a proxy is started for.
pub struct Setup<'a> {
    /// One L4 listener each (the HTTPS frontend comes with `pki`).
    pub services: &'a [Service],
    /// The HTTPS comparison's certificates: adds the TLS-terminating frontend.
    pub pki: Option<&'a Pki>,
    /// Client connections it must hold at once (sizes HAProxy's maxconn and nginx's
    /// worker_connections; the forwarder has no such limit at L4).
    pub max_conns: usize,
    /// Prefix of its configuration and log files in the scratch directory.
    pub tag: &'a str,
}

/// Starts the proxy for `via` in the proxy namespace, listening for every service.
pub fn start_proxy(
    topology: &Topology,
    via: Via,
    dir: &Path,
    setup: &Setup,
) -> anyhow::Result<Option<Proxy>> {
    let file = |ext: &str| dir.join(format!("{}-{}.{ext}", setup.tag, via.short()));
    let log = file("log");
    let (cmd, stop) = match via {
        Via::Direct => return Ok(None),
        Via::Splice | Via::Userspace => {
            let config = file("toml");
            std::fs::write(&config, forwarder_config(topology, via, setup))?;
            let mut cmd = topology.command(Role::Proxy, forwarder_binary()?);
            cmd.args(["run", "--drain-secs", "1", "-c"]).arg(&config);
            if via == Via::Userspace {
                cmd.arg("--no-ebpf");
            }
            cmd.env("RUST_LOG", "info");
            (cmd, libc::SIGINT)
        }
        Via::Haproxy => {
            let config = file("cfg");
            std::fs::write(&config, haproxy_config(topology, setup))?;
            let mut cmd = topology.command(Role::Proxy, "haproxy");
            cmd.args(["-db", "-f"]).arg(&config);
            (cmd, libc::SIGTERM)
        }
        Via::Nginx => {
            let config = file("conf");
            std::fs::write(&config, nginx_config(topology, dir, setup))?;
            let mut cmd = topology.command(Role::Proxy, "nginx");
            cmd.arg("-p").arg(dir).arg("-c").arg(&config);
            (cmd, libc::SIGTERM)
        }
    };
    let mut process = Process::spawn(via.short(), cmd, &log, stop)?;
    let mut ports: Vec<u16> = setup
        .services
        .iter()
        .map(|&s| target(topology, via, s).port())
        .collect();
    if setup.pki.is_some() && matches!(via, Via::Splice | Via::Haproxy) {
        ports.push(target(topology, via, Service::Https).port());
    }
    wait_listening(topology, Role::Proxy, &ports, &mut process, &log)?;
    Ok(Some(Proxy { via, process, log }))
}

pub fn forwarder_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_dir()?.join("target/release/forwarder");
    if !path.exists() {
        bail!("{} is missing: the bench builds it first", path.display());
    }
    Ok(path)
}

/// Waits until every port listens in `role`'s namespace (asked with `ss`, which opens no
/// connection: a probe connection would be a bogus iperf3 test).
pub fn wait_listening(
    topology: &Topology,
    role: Role,
    ports: &[u16],
    process: &mut Process,
    log: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        process.check_alive(log)?;
        let out = topology
            .command(role, "ss")
            .args(["-Hltn"])
            .output()
            .context("running ss")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let listening = |port: u16| {
            text.lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
        };
        if ports.iter().all(|&p| listening(p)) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("{} did not listen on {ports:?} within 15 s", process.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Idle timeout of the bench's frontends, as the agent's default: fleet connections sit
/// open through a whole run and must never be reaped in the middle of one.
const IDLE_TIMEOUT_SECS: u64 = 1800;

fn forwarder_config(topology: &Topology, via: Via, setup: &Setup) -> String {
    let mut text = format!("instance = \"bench-{}\"\n", via.short());
    for &service in setup.services {
        text += &format!(
            "[[frontend]]\nname = \"{name}\"\nbind = \"{}\"\nbackend = \"{name}\"\n\
             idle_timeout_secs = {IDLE_TIMEOUT_SECS}\n\
             [[backend]]\nname = \"{name}\"\nservers = [{{ address = \"{}\" }}]\n",
            target(topology, via, service),
            upstream(topology, service),
            name = service.name(),
        );
    }
    if let (Some(pki), Via::Splice) = (setup.pki, via) {
        text += &format!(
            "[[frontend]]\nname = \"https\"\nmode = \"http\"\nbind = \"{}\"\nbackend = \"hub\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [[backend]]\nname = \"hub\"\nservers = [{{ address = \"{}\" }}]\nhost = \"hub.test\"\nca_file = \"{}\"\n",
            target(topology, via, Service::Https),
            pki.dir.join("proxy.pem").display(),
            pki.dir.join("proxy.key").display(),
            upstream(topology, Service::Https),
            pki.ca().display(),
        );
    }
    text
}

/// HAProxy's connection limit (global and per listener, which defaults lower): the
/// clients asked for plus headroom; HAProxy sizes its own fd limit from it (and refuses
/// to start if it cannot have it: `strict-limits` is on by default in 2.6).
pub fn haproxy_maxconn(max_conns: usize) -> usize {
    (max_conns + 1000).max(4000)
}

/// nginx's per-worker limit: either worker may end up holding every connection, and each
/// proxied connection takes two.
pub fn nginx_worker_connections(max_conns: usize) -> usize {
    (2 * max_conns + 1000).max(8000)
}

/// tcp mode with splice(2) forced both ways; http mode terminating TLS with the same
/// certificate as the forwarder and re-originating TLS to the hub with verification.
fn haproxy_config(topology: &Topology, setup: &Setup) -> String {
    let maxconn = haproxy_maxconn(setup.max_conns);
    let mut text = format!(
        "global\n  maxconn {maxconn}\n  nbthread 2\n\
         defaults\n  maxconn {maxconn}\n  timeout connect 5s\n\
         \x20 timeout client {IDLE_TIMEOUT_SECS}s\n  timeout server {IDLE_TIMEOUT_SECS}s\n",
    );
    for &service in setup.services {
        text += &format!(
            "listen {}\n  mode tcp\n  bind {}\n  option splice-request\n  option splice-response\n  server s {}\n",
            service.name(),
            target(topology, Via::Haproxy, service),
            upstream(topology, service)
        );
    }
    if let Some(pki) = setup.pki {
        text += &format!(
            "listen https\n  mode http\n  bind {} ssl crt {} alpn http/1.1\n\
             \x20 http-request set-header Host hub.test\n  http-reuse always\n\
             \x20 server hub {} ssl verify required ca-file {} sni str(hub.test) verifyhost hub.test alpn http/1.1\n",
            target(topology, Via::Haproxy, Service::Https),
            pki.dir.join("proxy-full.pem").display(),
            upstream(topology, Service::Https),
            pki.ca().display()
        );
    }
    text
}

/// The hard RLIMIT_NOFILE of this process (and of what it starts).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn nofile_hard_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit.rlim_max)
}

/// Two workers (`auto` on this machine), each allowed every connection (see
/// `nginx_worker_connections`). The accept queue is the forwarder's (nginx asks for 511
/// by default), so a storm meets the same queue on every path.
fn nginx_config(topology: &Topology, dir: &Path, setup: &Setup) -> String {
    let worker_connections = nginx_worker_connections(setup.max_conns);
    // Asking for more than the hard limit only logs an alert (nginx keeps what it has).
    let rlimit =
        nofile_hard_limit().map_or(20_000, |hard| (worker_connections as u64 + 1000).min(hard));
    let mut servers = String::new();
    for &service in setup.services {
        servers += &format!(
            "  server {{ listen {} backlog=4096; proxy_pass {}; }}\n",
            target(topology, Via::Nginx, service),
            upstream(topology, service)
        );
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nworker_processes auto;\nworker_rlimit_nofile {rlimit};\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections {worker_connections}; }}\n\
         stream {{\n{servers}}}\n",
        dir = dir.display()
    )
}
