//! The `forwarder` command: a thin CLI over the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use forwarder::agent::{self, RunOptions};
use forwarder::config::{Config, HubExtras};
use forwarder::inspect::Pinned;
use std::io::stdout;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "eBPF-accelerated forwarder for Azure IoT Hub: MQTT/AMQP passthrough spliced in the kernel, HTTPS/WebSocket terminated with the Host rewritten"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. No arguments: the built-in demo (no Azure account needed).
    Run {
        /// Configuration file (TOML); see forwarder.example.toml.
        #[arg(short, long, conflicts_with = "hub")]
        config: Option<PathBuf>,
        /// IoT Hub host name: splice MQTT 8883 and AMQP 5671 to it (X.509 devices keep
        /// working); with --cert and --key also terminate 443 (HTTPS, MQTT/AMQP over
        /// WebSocket) with the Host rewritten to the hub.
        #[arg(long)]
        hub: Option<String>,
        /// PEM certificate chain devices see on 443 (with --hub).
        #[arg(long, requires_all = ["hub", "key"])]
        cert: Option<PathBuf>,
        /// PEM private key of --cert.
        #[arg(long, requires_all = ["hub", "cert"])]
        key: Option<PathBuf>,
        /// Also forward the Device Provisioning Service (global.azure-devices-provisioning.net)
        /// on 8883 and 5671, routed by the TLS server name (devices contact DPS first).
        #[arg(long, requires = "hub")]
        dps: bool,
        /// Also accept plain MQTT on 1883 for legacy devices. IoT Hub refuses MQTT without
        /// TLS, so the forwarder originates TLS to the hub's 8883 itself: this port is
        /// relayed in userspace and cannot be spliced, and X.509 devices cannot use it.
        #[arg(long, requires = "hub")]
        mqtt_1883: bool,
        /// Pace new connections to the hub: at most N per second on each of the hub's
        /// backends (MQTT, AMQP, HTTPS; not DPS), devices beyond that wait in a queue
        /// (10,000 at most, 30 s at most). IoT Hub accepts S1 12/s per unit (at least
        /// 100/s), S2 120/s per unit, S3 6,000/s per unit. Off when absent.
        #[arg(long, requires = "hub", value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=i64::from(forwarder::config::MAX_CONNECT_RATE)))]
        connect_rate: Option<u32>,
        /// Transparent mode on a gateway host: intercept the connections routed through
        /// this host to ports 8883, 5671 and 443 and pass them through, spliced, to
        /// their original destination (see deploy/DEPLOYMENT.md, "Transparent mode").
        #[arg(long, conflicts_with_all = ["config", "hub"])]
        transparent: bool,
        /// Address the --hub frontends bind to.
        #[arg(long, default_value = "0.0.0.0", requires = "hub")]
        bind_ip: std::net::IpAddr,
        /// Copy every connection in userspace instead of splicing it in the kernel.
        #[arg(long)]
        no_ebpf: bool,
        /// Splice even on a kernel below the sockmap floor (6.1.142, 6.6.94, 6.12.34,
        /// 6.15.3, >= 6.16): for a distribution kernel known to carry the 2025 fixes
        /// under an older version number. Without it such a kernel is served in userspace.
        #[arg(long)]
        allow_old_kernel: bool,
        /// Seconds open connections get to finish after SIGTERM.
        #[arg(long, default_value_t = forwarder::config::DEFAULT_DRAIN_SECS)]
        drain_secs: u64,
        /// After start-up, run as this user with only CAP_BPF, CAP_NET_ADMIN and
        /// CAP_NET_BIND_SERVICE (overrides `user` in the config).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Validate a configuration file without starting anything.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Hands the running agent over to the binary on disk without dropping a device:
    /// listeners, pinned maps and every spliced connection move to the new process, and
    /// the old one exits (userspace and HTTPS connections are drained by it first). The
    /// same as sending the agent SIGUSR2.
    Upgrade {
        #[arg(long, default_value = "default")]
        instance: String,
        /// How long to wait for the old agent to be gone.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Open connections of a running agent: client, upstream, bytes, age, idle, path.
    Conns(Inspect),
    /// Counters of a running agent per frontend (and the XDP guard's).
    Stats(Inspect),
    /// Every pinned map of a running agent, entry by entry.
    Maps(Inspect),
    /// Change or read the running agent's XDP ingress guard (allow|deny add|del, list, stats).
    Xdp {
        #[command(subcommand)]
        command: forwarder::xdp::cli::XdpCommand,
    },
}

#[derive(clap::Args)]
struct Inspect {
    /// The agent instance (maps pinned in /sys/fs/bpf/forwarder/<instance>; the demo's is "demo").
    #[arg(long, default_value = "default")]
    instance: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn init_logging(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `forwarder check`: validates, prints the warnings, then the connection budget and
/// what each backend's connect pacing will be (so an operator sees the defaults that
/// apply). The fd limit is this process's hard limit: the agent raises its soft limit
/// to it (under systemd, `LimitNOFILE` sets both).
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let budget = forwarder::agent::fd_budget::FdBudget::hard();
    for w in config
        .warnings()
        .into_iter()
        .chain(budget.warnings(&config))
    {
        println!("warning: {w}");
    }
    println!(
        "ok: {} frontend(s), {} backend(s)",
        config.frontends.len(),
        config.backends.len()
    );
    println!(
        "connections: at most {} at once for the agent (fd limit {}); per frontend: {}",
        budget.agent_cap(&config),
        budget.limit,
        config
            .frontends
            .iter()
            .map(|f| format!("{} {}", f.name, f.max_connections()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for b in &config.backends {
        println!("{}", b.pacing_summary());
    }
    let kernel = forwarder::kernel::Status::running();
    let splices = config.frontends.iter().any(|f| {
        matches!(
            f.mode,
            forwarder::config::Mode::Splice | forwarder::config::Mode::Transparent
        )
    });
    println!(
        "kernel: {kernel}{}",
        if splices { "" } else { " (no splice frontend)" }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    forwarder::upgrade::remember_exe();
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Upgrade {
            instance,
            wait_secs,
        } => upgrade(&instance, std::time::Duration::from_secs(wait_secs)),
        Command::Conns(i) => {
            forwarder::inspect::print_conns(&Pinned::open(&i.instance)?, i.json, &mut stdout())
        }
        Command::Stats(i) => {
            forwarder::inspect::print_stats(&Pinned::open(&i.instance)?, i.json, &mut stdout())
        }
        Command::Maps(i) => {
            forwarder::inspect::print_maps(&Pinned::open(&i.instance)?, i.json, &mut stdout())
        }
        Command::Xdp { command } => forwarder::xdp::cli::run(command, &mut std::io::stdout()),
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            hub,
            cert,
            key,
            dps,
            mqtt_1883,
            connect_rate,
            bind_ip,
            no_ebpf,
            allow_old_kernel,
            drain_secs,
            user,
            transparent,
        } => {
            let source = match (config, hub) {
                (None, None) if transparent => {
                    Source::Hub(Box::new(forwarder::transparent::default_config()))
                }
                (Some(path), _) => Source::File(path),
                (None, Some(hub)) => Source::Hub(Box::new(Config::for_hub(
                    &hub,
                    bind_ip,
                    cert.zip(key),
                    HubExtras {
                        dps,
                        plain_mqtt: mqtt_1883,
                        connect_rate,
                    },
                ))),
                (None, None) => Source::Demo,
            };
            let options = RunOptions {
                no_ebpf,
                drain_deadline: Some(std::time::Duration::from_secs(drain_secs)),
                config_path: source.path(),
                allow_old_kernel,
            };
            run(source, options, user)
        }
    }
}

/// Where `forwarder run` gets its configuration.
/// Signals the instance's agent to upgrade itself and waits until a new process holds
/// the instance and the old one is gone.
fn upgrade(instance: &str, wait: std::time::Duration) -> anyhow::Result<()> {
    use forwarder::instance_lock::InstanceLock;
    let old = InstanceLock::holder(instance)?;
    anyhow::ensure!(
        running(old),
        "no agent of instance {instance:?} runs (pid {old} is gone)"
    );
    forwarder::sys::send_signal(old, libc::SIGUSR2)
        .with_context(|| format!("signalling the agent (pid {old})"))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let holder = InstanceLock::holder(instance).unwrap_or(old);
        let old_gone = !running(old);
        if holder != old && old_gone {
            println!("upgraded: instance {instance} now runs as pid {holder} (was {old})");
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the upgrade did not complete within {wait:?} (old pid {old}, lock holder {holder}): \
             see the agent's log; a refused upgrade leaves the old agent serving"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The process exists and has not exited (a zombie waiting for its parent has).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

enum Source {
    File(PathBuf),
    Hub(Box<Config>),
    /// The built-in demo: its stand-in upstream runs on the agent's runtime.
    Demo,
}

impl Source {
    fn path(&self) -> Option<PathBuf> {
        match self {
            Self::File(path) => Some(path.clone()),
            _ => None,
        }
    }
}

/// Runs the agent. With a user to become, the privileged start-up runs on a one-thread
/// runtime, privileges are dropped while the process is one thread (capabilities are
/// per thread), and only then are the serving runtime's threads created.
fn run(source: Source, options: RunOptions, user: Option<String>) -> anyhow::Result<()> {
    // Started by `forwarder upgrade`: the running agent's offer comes first, so that any
    // failure after it (a broken configuration too) is reported back to that agent.
    let inherited = forwarder::upgrade::Inherited::receive()?;
    let reporter = inherited.as_ref().and_then(|i| i.reporter().ok());
    let result = load_and_run(source, options, user, inherited);
    if let (Err(err), Some(reporter)) = (&result, &reporter) {
        // After a hand-over the previous agent is gone and this goes nowhere.
        forwarder::upgrade::report_failure(reporter, err);
    }
    result
}

fn load_and_run(
    source: Source,
    options: RunOptions,
    user: Option<String>,
    inherited: Option<forwarder::upgrade::Inherited>,
) -> anyhow::Result<()> {
    let config = match &source {
        Source::File(path) => Some(Config::load(path)?),
        Source::Hub(config) => Some((**config).clone()),
        Source::Demo => None,
    };
    let user = user.or_else(|| config.as_ref().and_then(|c| c.user.clone()));
    run_with(config, options, user, inherited)
}

fn run_with(
    config: Option<Config>,
    options: RunOptions,
    user: Option<String>,
    mut inherited: Option<forwarder::upgrade::Inherited>,
) -> anyhow::Result<()> {
    let serving = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
    };
    let root = forwarder::sys::effective_uid() == 0;
    if !root && let Some(user) = &user {
        tracing::warn!(%user, "not started as root: already unprivileged, `user` has no effect");
    }
    let Some(user) = user.filter(|_| root) else {
        if !root && config.is_some() {
            // Started unprivileged with capabilities (systemd `User=`): keep only those
            // the agent needs after start-up.
            let config = config.context("a configuration")?;
            config.validate()?;
            let prepared = one_thread_runtime()?.block_on(agent::prepare_with(
                config,
                options,
                inherited.take(),
            ))?;
            forwarder::privilege::trim()?;
            return serving()?.block_on(serve_until_stopped(prepared));
        }
        return serving()?.block_on(async move {
            let config = match config {
                Some(config) => config,
                None => forwarder::demo::start().await?,
            };
            config.validate()?;
            serve_until_stopped(agent::prepare_with(config, options, inherited).await?).await
        });
    };
    let config =
        config.context("--user needs -c FILE or --hub (the built-in demo runs as root)")?;
    config.validate()?;
    let target = forwarder::privilege::Target::lookup(&user)?;
    let prepared =
        one_thread_runtime()?.block_on(agent::prepare_with(config, options, inherited.take()))?;
    let own = prepared.own_dirs()?;
    forwarder::privilege::drop_to(&target, &own)?;
    serving()?.block_on(serve_until_stopped(prepared))
}

/// The runtime of the privileged start-up: no thread besides the main one.
fn one_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the start-up runtime")
}

/// Serves until SIGTERM or SIGINT (then drains); SIGHUP reloads.
async fn serve_until_stopped(prepared: agent::Prepared) -> anyhow::Result<()> {
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            // A reload already queued covers this one too.
            let _ = reload.try_send(());
        }
    });
    let (upgrade, upgrades) = tokio::sync::mpsc::channel(1);
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            tracing::info!("SIGUSR2: upgrading to the binary on disk");
            let _ = upgrade.try_send(());
        }
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        let _ = stop.send(true);
    });
    agent::serve_with_upgrades(prepared, stopped, reloads, upgrades).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_rate(args: &[&str]) -> Result<Option<u32>, clap::Error> {
        let base = ["forwarder", "run"];
        let cli = Cli::try_parse_from(base.iter().chain(args))?;
        match cli.command {
            Command::Run { connect_rate, .. } => Ok(connect_rate),
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn connect_rate_goes_with_hub_and_must_be_positive() {
        let hub = ["--hub", "h.azure-devices.net"];
        assert_eq!(connect_rate(&hub).unwrap(), None);
        let with = |n: &'static str| connect_rate(&[hub[0], hub[1], "--connect-rate", n]);
        assert_eq!(with("500").unwrap(), Some(500));
        assert!(with("0").is_err(), "a rate of 0 would refuse every device");
        assert!(with("2000000").is_err());
        assert!(
            connect_rate(&["--connect-rate", "5"]).is_err(),
            "needs --hub"
        );
    }
}
