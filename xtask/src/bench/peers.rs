//! The proxies under test (the forwarder spliced and in userspace, HAProxy, nginx), their
//! generated configurations, and the processes, stopped on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
}

impl Service {
    pub fn server_port(self) -> u16 {
        match self {
            Self::Echo => 7000,
            Self::Iperf => 5201,
            Self::Https => 8443,
        }
    }

    fn offset(self) -> u16 {
        match self {
            Self::Echo => 0,
            Self::Iperf => 201,
            Self::Https => 443,
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
        use std::os::unix::process::CommandExt as _;
        let log_file = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0);
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

/// Starts the proxy for `via` in the proxy namespace, listening for every service.
pub fn start_proxy(
    topology: &Topology,
    via: Via,
    dir: &Path,
    pki: Option<&Pki>,
) -> anyhow::Result<Option<Proxy>> {
    let log = dir.join(format!("{}.log", via.short()));
    let services = [Service::Echo, Service::Iperf];
    let (cmd, stop) = match via {
        Via::Direct => return Ok(None),
        Via::Splice | Via::Userspace => {
            let config = dir.join(format!("forwarder-{}.toml", via.short()));
            std::fs::write(&config, forwarder_config(topology, via, pki))?;
            let mut cmd = topology.command(Role::Proxy, forwarder_binary()?);
            cmd.args(["run", "--drain-secs", "1", "-c"]).arg(&config);
            if via == Via::Userspace {
                cmd.arg("--no-ebpf");
            }
            cmd.env("RUST_LOG", "info");
            (cmd, libc::SIGINT)
        }
        Via::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, haproxy_config(topology, pki))?;
            let mut cmd = topology.command(Role::Proxy, "haproxy");
            cmd.args(["-db", "-f"]).arg(&config);
            (cmd, libc::SIGTERM)
        }
        Via::Nginx => {
            let config = dir.join("nginx.conf");
            std::fs::write(&config, nginx_config(topology, dir))?;
            let mut cmd = topology.command(Role::Proxy, "nginx");
            cmd.arg("-p").arg(dir).arg("-c").arg(&config);
            (cmd, libc::SIGTERM)
        }
    };
    let mut process = Process::spawn(via.short(), cmd, &log, stop)?;
    let mut ports: Vec<u16> = services
        .iter()
        .map(|&s| target(topology, via, s).port())
        .collect();
    if pki.is_some() && matches!(via, Via::Splice | Via::Haproxy) {
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

fn forwarder_config(topology: &Topology, via: Via, pki: Option<&Pki>) -> String {
    let mut text = format!("instance = \"bench-{}\"\n", via.short());
    for (name, service) in [("echo", Service::Echo), ("iperf", Service::Iperf)] {
        text += &format!(
            "[[frontend]]\nname = \"{name}\"\nbind = \"{}\"\nbackend = \"{name}\"\n\
             [[backend]]\nname = \"{name}\"\nservers = [{{ address = \"{}\" }}]\n",
            target(topology, via, service),
            upstream(topology, service)
        );
    }
    if let (Some(pki), Via::Splice) = (pki, via) {
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

/// tcp mode with splice(2) forced both ways; http mode terminating TLS with the same
/// certificate as the forwarder and re-originating TLS to the hub with verification.
fn haproxy_config(topology: &Topology, pki: Option<&Pki>) -> String {
    let mut text = String::from(
        "global\n  maxconn 4000\n  nbthread 2\n\
         defaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    for (name, service) in [("echo", Service::Echo), ("iperf", Service::Iperf)] {
        text += &format!(
            "listen {name}\n  mode tcp\n  bind {}\n  option splice-request\n  option splice-response\n  server s {}\n",
            target(topology, Via::Haproxy, service),
            upstream(topology, service)
        );
    }
    if let Some(pki) = pki {
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

fn nginx_config(topology: &Topology, dir: &Path) -> String {
    let mut servers = String::new();
    for service in [Service::Echo, Service::Iperf] {
        servers += &format!(
            "  server {{ listen {}; proxy_pass {}; }}\n",
            target(topology, Via::Nginx, service),
            upstream(topology, service)
        );
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nworker_processes auto;\nworker_rlimit_nofile 20000;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 8000; }}\n\
         stream {{\n{servers}}}\n",
        dir = dir.display()
    )
}
