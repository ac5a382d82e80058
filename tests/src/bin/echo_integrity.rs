//! Reproduces a known defect (open in issue 3): under a sustained echo load through the
//! kernel splice, when a direction's lag budget trips (the verdict switches from redirect
//! to pass), whole segments are sometimes delivered twice, and the connection may stall.
//! Each run echoes a counting byte pattern for a few seconds and reports where the echo
//! first departs from what was sent. Not a test: a diagnostic to run while fixing it.
//!
//! Usage: echo_integrity [RUNS] [SECONDS] [MAX_LAG_BYTES]

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forwarder::agent::{self, FrontendMetrics, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};

/// Byte `i` of the stream: a pattern whose every 4-byte window is unique within 4 GiB.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = ((at / 4) >> ((at % 4) * 8)) as u8;
    }
}

fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// One run: (bytes sent, bytes echoed, offset of the first wrong byte, stalled).
fn run(addr: SocketAddr, seconds: u64) -> anyhow::Result<(u64, u64, Option<u64>, bool)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(4)))?;
    stream.set_write_timeout(Some(Duration::from_secs(4)))?;
    let mut writer = stream.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let sender = std::thread::spawn(move || -> (u64, bool) {
        let mut chunk = vec![0u8; 128 << 10];
        let mut sent = 0u64;
        while !stop_writer.load(Ordering::Relaxed) {
            // A reader slower than the writer (as a busy device is): the echo's way back
            // fills up, so the budget of that direction trips too.
            std::thread::sleep(Duration::from_micros(20));
            pattern(sent, &mut chunk);
            if writer.write_all(&chunk).is_err() {
                return (sent, true);
            }
            sent += chunk.len() as u64;
        }
        let _ = writer.shutdown(Shutdown::Write);
        (sent, false)
    });
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut reader = stream;
    let mut buf = vec![0u8; 256 << 10];
    let mut expected = vec![0u8; 256 << 10];
    let (mut got, mut first_wrong, mut stalled) = (0u64, None, false);
    loop {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
        }
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                std::thread::sleep(Duration::from_micros(50));
                if first_wrong.is_none() {
                    pattern(got, &mut expected[..n]);
                    if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
                        first_wrong = Some(got + i as u64);
                    }
                }
                got += n as u64;
            }
            Err(_) => {
                stalled = true;
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    let (sent, write_stalled) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    Ok((sent, got, first_wrong, stalled || write_stalled))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map_or(Ok(8), |s| s.parse())?;
    let seconds: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    // Against a forwarder (and echo server) running elsewhere, e.g. `forwarder run -c`.
    if let Ok(target) = std::env::var("ECHO_TARGET") {
        let addr: SocketAddr = target.parse()?;
        for i in 1..=runs {
            let (sent, got, first_wrong, stalled) =
                tokio::task::spawn_blocking(move || run(addr, seconds)).await??;
            println!(
                "run {i}: sent {sent} B, echoed {got} B ({:+} B), first wrong byte at {first_wrong:?}, stalled {stalled}",
                got as i64 - sent as i64
            );
        }
        return Ok(());
    }
    let echo = echo_server()?;
    let mut frontend = Frontend::new("echo", "127.0.0.1:0".parse()?, Mode::Splice, "echo");
    if let Some(lag) = args.next() {
        frontend.max_lag_bytes = lag.parse()?;
    }
    let config = Config::new(
        format!("echo-integrity-{}", std::process::id()),
        vec![frontend],
        vec![Backend::new("echo", &echo.to_string())],
    );
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let (running, _datapath) = agent::start(&config, &RunOptions::default(), stopped).await?;
    let addr = running[0].addr;
    let FrontendMetrics::L4(metrics) = running[0].metrics.clone() else {
        anyhow::bail!("not an L4 frontend");
    };
    let mut bad = 0;
    for i in 1..=runs {
        let (sent, got, first_wrong, stalled) =
            tokio::task::spawn_blocking(move || run(addr, seconds)).await??;
        let verdict = match (first_wrong, stalled, got == sent) {
            (None, false, true) => "ok",
            (Some(_), _, _) => "WRONG BYTES",
            (None, true, _) => "STALLED",
            (None, false, false) => "SHORT",
        };
        if verdict != "ok" {
            bad += 1;
        }
        println!(
            "run {i}: {verdict}: sent {sent} B, echoed {got} B ({:+} B), first wrong byte at {first_wrong:?}",
            got as i64 - sent as i64
        );
    }
    let counters: Vec<String> = metrics
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{bad} of {runs} runs went wrong; counters: {}",
        counters.join(" ")
    );
    Ok(())
}
