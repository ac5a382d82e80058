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
}

impl Drop for KillOnDrop {
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

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fwd-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}
