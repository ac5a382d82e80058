//! The userspace path: bytes copied through the agent with tokio, for connections the
//! kernel cannot take (eBPF off, map full, socket closed during set-up). Same contract
//! as the kernel path: half-close passed on, resets passed on, idle timeout.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

use crate::ebpf::Datapath;
use crate::l4::{Carrier, End, Outcome, SessionOptions, Side};
use crate::registry::Registration;
use crate::sys;

const COPY_BUF: usize = 64 * 1024;

pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    options: &SessionOptions,
    mut registration: Option<&mut Registration<&Datapath>>,
) -> Outcome {
    let last_io = AtomicU64::new(sys::monotonic_ns());
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (client_r, client_w) = client.into_split();
    let (upstream_r, upstream_w) = upstream.into_split();

    let ended = Ended::default();
    let pumps = async {
        tokio::try_join!(
            pump((client_r, upstream_w), Side::Client, &up, &last_io, &ended),
            pump(
                (upstream_r, client_w),
                Side::Upstream,
                &down,
                &last_io,
                &ended
            ),
        )
    };
    let idle_ns = u64::try_from(options.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let watchdog = async {
        let period =
            (options.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            let last = last_io.load(Ordering::Relaxed);
            if let Some(registration) = registration.as_mut() {
                registration.update(
                    up.load(Ordering::Relaxed),
                    down.load(Ordering::Relaxed),
                    last,
                );
            }
            if sys::monotonic_ns().saturating_sub(last) > idle_ns {
                return;
            }
        }
    };
    let end = tokio::select! {
        result = pumps => match result {
            Ok(_) => End::Closed,
            Err(failed) => End::Reset { side: Some(failed) },
        },
        () = watchdog => End::IdleTimeout,
    };
    let (up, down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    Outcome {
        carrier: Carrier::Userspace,
        bytes_up: up,
        bytes_down: down,
        userspace_bytes: up + down,
        diverted: false,
        end,
    }
}

/// How many directions reached their EOF; the second wakes the first.
#[derive(Default)]
struct Ended {
    count: AtomicU64,
    both: Notify,
}

/// Copies one direction until EOF (then half-closes the sink) or an error (then resets
/// the sink, so the other peer learns the connection broke). After its EOF, while the
/// other direction still runs, `src` is no longer read, so it is watched for a reset.
async fn pump(
    (mut src, mut sink): (OwnedReadHalf, OwnedWriteHalf),
    src_side: Side,
    bytes: &AtomicU64,
    last_io: &AtomicU64,
    ended: &Ended,
) -> Result<(), Side> {
    let sink_side = src_side.other();
    let mut buf = vec![0u8; COPY_BUF];
    let result = async {
        loop {
            let n = src.read(&mut buf).await.map_err(|_| src_side)?;
            if n == 0 {
                sink.shutdown().await.map_err(|_| sink_side)?;
                break;
            }
            sink.write_all(&buf[..n]).await.map_err(|_| sink_side)?;
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            last_io.store(sys::monotonic_ns(), Ordering::Relaxed);
        }
        if ended.count.fetch_add(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit if the first direction is not waiting yet.
            ended.both.notify_one();
            return Ok(());
        }
        tokio::select! {
            // After its EOF the source is only watched for a reset.
            _ = src.ready(Interest::ERROR) => Err(src_side),
            () = ended.both.notified() => Ok(()),
        }
    }
    .await;
    if result.is_err() {
        let _ = sys::set_linger_zero(sink.as_ref().as_fd());
    }
    result
}
