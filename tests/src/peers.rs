//! Third-party processes for tests (mosquitto, haproxy, ...): started on free loopback
//! ports, waited for, and killed when the test ends however it ends.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A peer process started in its own process group; dropping it kills the whole group
/// (wrapper scripts such as rabbitmq-server leave the real server as a child).
pub struct KillOnDrop(Child);

impl KillOnDrop {
    /// Starts `command` as the leader of a new process group.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        command.process_group(0).spawn().map(Self)
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Waits up to `limit` for the process to exit by itself. Once it has, what it left
    /// running in its group is not killed (an agent's upgrade leaves its successor
    /// there); on a timeout the group is killed as on drop.
    pub fn wait_exit(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                std::mem::forget(self);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// SIGTERM, then up to `grace` for the process to exit on its own (killed after).
    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on the child we started; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for KillOnDrop {
    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) with a negative pid signals the group we created; no memory
            // is involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral loopback port")
        .port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `program` with `args`, output discarded; killed on drop.
pub fn spawn(program: &str, args: &[&std::ffi::OsStr]) -> KillOnDrop {
    KillOnDrop::spawn(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap_or_else(|e| panic!("starting {program} (installed by cargo xtask setup): {e}"))
}

/// mosquitto with the given listener lines (as root, so any port and file works).
pub fn mosquitto(dir: &Path, listeners: &str, port_to_wait_for: u16) -> KillOnDrop {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\n{listeners}\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\n"
        ),
    )
    .expect("write mosquitto.conf");
    let broker = spawn("mosquitto", &["-c".as_ref(), conf.as_os_str()]);
    wait_for_port(port_to_wait_for, "mosquitto");
    broker
}

/// mosquitto with one TLS listener on a free port, presenting `leaf`: (broker, port).
pub fn mosquitto_tls(
    dir: &Path,
    ca: &crate::pki::TestCa,
    leaf: &crate::pki::Leaf,
) -> (KillOnDrop, u16) {
    let port = free_port();
    let broker = mosquitto(
        dir,
        &format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}",
            ca.ca_pem.display(),
            leaf.cert.display(),
            leaf.key.display(),
        ),
        port,
    );
    (broker, port)
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fwd-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// RabbitMQ with its AMQP 1.0 plugin and one TLS listener, all its state in `dir`.
/// Dropping it kills the broker and stops Erlang's port mapper (which daemonizes itself)
/// unless another Erlang node still uses it.
pub struct Rabbit {
    process: Option<KillOnDrop>,
    pub tls_port: u16,
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        drop(self.process.take());
        // epmd notices the killed node a moment later.
        for _ in 0..30 {
            let names = Command::new("epmd").arg("-names").output();
            let registered = names.map_or(String::new(), |o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
            });
            if !registered.contains("name ") {
                let _ = Command::new("epmd").arg("-kill").output();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

pub fn rabbitmq(
    dir: &Path,
    ca: &crate::pki::TestCa,
    leaf: &crate::pki::Leaf,
) -> anyhow::Result<Rabbit> {
    let server = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    anyhow::ensure!(
        server.exists(),
        "rabbitmq-server is not installed (cargo xtask setup installs it)"
    );
    let tls_port = free_port();
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n\
             loopback_users = none\n",
            ca.ca_pem.display(),
            leaf.cert.display(),
            leaf.key.display(),
        ),
    )?;
    std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_amqp1_0].\n")?;
    // The packaged wrapper drops to the rabbitmq user; the server script itself runs as
    // us, with every path inside `dir`.
    let process = KillOnDrop::spawn(
        Command::new(server)
            .env("HOME", dir)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env(
                "RABBITMQ_NODENAME",
                format!("fwd{}x{}@localhost", std::process::id(), tls_port),
            )
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let rabbit = Rabbit {
        process: Some(process),
        tls_port,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "rabbitmq did not open its TLS listener on {tls_port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(rabbit)
}
