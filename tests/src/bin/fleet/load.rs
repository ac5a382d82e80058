//! The fleet load: N connections opened first (paced, not measured), then each sends a
//! message R times a second, connections phased evenly across the period so the proxy
//! sees a steady stream rather than N messages at once, and times each echo.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::stats::Sample;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the devices connect (the proxy, or the echo server for the direct path).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// Messages per second per connection.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Bytes per message (at least 8: the first 8 carry a sequence number).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Seconds of traffic before the measurement starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connection attempts in flight at once while the fleet is set up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// A connect or a round trip taking longer than this counts as an error.
    #[arg(long, default_value_t = 5.0)]
    io_timeout: f64,
    /// After the measurement, keep every connection open until a line (or EOF) arrives on
    /// stdin, so the caller can sample memory while all of them are connected.
    #[arg(long)]
    hold: bool,
}

/// When every connection sends, shared by all of them.
#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    period: Duration,
    conns: usize,
    measure_start: Instant,
    measure_end: Instant,
    size: usize,
    io_timeout: Duration,
}

/// What one connection saw, and the connection itself (kept open until the end).
#[derive(Default)]
struct Outcome {
    sample: Sample,
    errors: u64,
    first_error: Option<String>,
    stream: Option<TcpStream>,
}

/// Every connection's outcome merged.
#[derive(Default)]
struct Totals {
    sample: Sample,
    errors: u64,
    lost: usize,
    first_error: Option<String>,
    streams: Vec<TcpStream>,
}

impl Totals {
    fn add(&mut self, outcome: Outcome) {
        self.sample.extend(outcome.sample);
        self.errors += outcome.errors;
        match outcome.stream {
            Some(stream) => self.streams.push(stream),
            None => self.lost += 1,
        }
        if self.first_error.is_none() {
            self.first_error = outcome.first_error;
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.size < 8 || args.rate <= 0.0 || args.secs <= 0.0 || args.conns == 0 {
        bail!("--size must be >= 8, --rate, --secs and --conns > 0");
    }
    let io_timeout = Duration::from_secs_f64(args.io_timeout);
    let (streams, failed, connect_error) = connect_all(
        args.target,
        args.conns,
        args.connect_concurrency,
        io_timeout,
    )
    .await;
    println!("connected ok={} failed={failed}", streams.len());
    if streams.is_empty() {
        bail!(
            "no connection to {} succeeded: {connect_error:?}",
            args.target
        );
    }
    let plan = plan(&args, streams.len(), io_timeout);
    let mut devices = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        devices.spawn(device(stream, i, plan));
    }
    tokio::time::sleep_until(plan.measure_start).await;
    println!("measure-start");
    tokio::time::sleep_until(plan.measure_end).await;
    println!("measure-end");
    let mut totals = Totals::default();
    while let Some(joined) = devices.join_next().await {
        totals.add(joined.unwrap_or_else(|err| Outcome {
            errors: 1,
            first_error: Some(format!("device task: {err}")),
            ..Outcome::default()
        }));
    }
    if args.hold {
        // The caller samples memory with every connection still open, then says go.
        let mut line = String::new();
        let _ = tokio::io::BufReader::new(tokio::io::stdin())
            .read_line(&mut line)
            .await;
    }
    let streams = std::mem::take(&mut totals.streams);
    report(&args, failed, connect_error, totals);
    drop(streams);
    Ok(())
}

fn plan(args: &Args, conns: usize, io_timeout: Duration) -> Plan {
    // A short lead so every task is spawned before the first send is due.
    let start = Instant::now() + Duration::from_millis(100);
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    Plan {
        start,
        period: Duration::from_secs_f64(1.0 / args.rate),
        conns,
        measure_start,
        measure_end: measure_start + Duration::from_secs_f64(args.secs),
        size: args.size,
        io_timeout,
    }
}

/// Opens `conns` connections, at most `concurrency` attempts at a time so the accept
/// queues never overflow (the set-up is not what this mode measures).
async fn connect_all(
    target: SocketAddr,
    conns: usize,
    concurrency: usize,
    timeout: Duration,
) -> (Vec<TcpStream>, usize, Option<String>) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut attempts = JoinSet::new();
    for _ in 0..conns {
        let slots = slots.clone();
        attempts.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let stream = tokio::time::timeout(timeout, TcpStream::connect(target)).await??;
            stream.set_nodelay(true)?;
            std::io::Result::Ok(stream)
        });
    }
    let (mut streams, mut failed, mut first_error) = (Vec::with_capacity(conns), 0, None);
    while let Some(joined) = attempts.join_next().await {
        match joined {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(err)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("connect: {err}"));
            }
            Err(err) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("connect task: {err}"));
            }
        }
    }
    (streams, failed, first_error)
}

/// One device: a message per tick, phased by its index across the period; the first
/// failed round trip ends it (a lost connection is what an IoT device would see).
async fn device(mut stream: TcpStream, index: usize, plan: Plan) -> Outcome {
    let offset = plan.period.mul_f64(index as f64 / plan.conns as f64);
    let mut ticks = tokio::time::interval_at(plan.start + offset, plan.period);
    // A late tick is sent once, not as a burst of the ones missed.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut out = vec![0x5a_u8; plan.size];
    let mut back = vec![0_u8; plan.size];
    let mut outcome = Outcome::default();
    for seq in 0_u64.. {
        let at = ticks.tick().await;
        if at >= plan.measure_end {
            break;
        }
        out[..8].copy_from_slice(&seq.to_le_bytes());
        match round_trip(&mut stream, &out, &mut back, plan.io_timeout).await {
            Ok(rtt) if at >= plan.measure_start => outcome.sample.push(rtt),
            Ok(_) => {}
            Err(err) => {
                outcome.errors += 1;
                outcome.first_error = Some(format!("device {index}: {err}"));
                return outcome;
            }
        }
    }
    outcome.stream = Some(stream);
    outcome
}

/// Writes `out`, reads as many bytes back and checks they are the same.
async fn round_trip(
    stream: &mut TcpStream,
    out: &[u8],
    back: &mut [u8],
    timeout: Duration,
) -> std::io::Result<Duration> {
    let sent = std::time::Instant::now();
    tokio::time::timeout(timeout, async {
        stream.write_all(out).await?;
        stream.read_exact(back).await
    })
    .await??;
    let rtt = sent.elapsed();
    if back != out {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the echo differs from the message sent",
        ));
    }
    Ok(rtt)
}

fn report(args: &Args, failed: usize, connect_error: Option<String>, totals: Totals) {
    let messages = totals.sample.len();
    let sorted = totals.sample.sorted();
    let line = json!({
        "conns": args.conns,
        "connected": args.conns - failed,
        "connect_failed": failed,
        "lost": totals.lost,
        "messages": messages,
        "errors": totals.errors,
        "seconds": args.secs,
        "offered_per_s": args.conns as f64 * args.rate,
        "p50_us": sorted.quantile_us(0.5),
        "p99_us": sorted.quantile_us(0.99),
        "p999_us": sorted.quantile_us(0.999),
        "max_us": sorted.quantile_us(1.0),
        "first_error": connect_error.or(totals.first_error),
    });
    println!("{line}");
}
