//! A first rough measurement of the HTTPS path (not the benchmark): requests per second
//! and latency of REST telemetry POSTs, direct to the stand-in hub and through the
//! forwarder, from keep-alive HTTP/1.1 clients. Everything runs on loopback in one
//! process, so absolute figures understate both; the ratio is the point.
//!
//! Usage: http_rough [SECONDS] [CLIENTS]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::agent::{self, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder_tests::hub::TestHub;
use forwarder_tests::peers::scratch_dir;
use forwarder_tests::pki::TestCa;
use http::Request;
use http::header::HOST;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

const PATH: &str = "/devices/dev1/messages/events?api-version=2021-04-12";

struct Figures {
    requests: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn run_clients(
    addr: SocketAddr,
    ca: &TestCa,
    name: &'static str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
        let tls = connector
            .connect(ServerName::try_from(name)?, TcpStream::connect(addr).await?)
            .await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let request = Request::post(PATH)
                    .header(HOST, name)
                    .body(Full::new(Bytes::from_static(br#"{"temperature":21.5}"#)))?;
                let started = Instant::now();
                let response = sender.send_request(request).await?;
                anyhow::ensure!(response.status().is_success(), "{}", response.status());
                response.into_body().collect().await?;
                latencies.push(started.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort();
    let pick = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok(Figures {
        requests: all.len(),
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(5), |s| s.parse())?;
    let clients: usize = args.next().map_or(Ok(16), |s| s.parse())?;
    let dir = scratch_dir("http-rough");
    let ca = TestCa::new(&dir);
    let hub_leaf = ca.issue("hub", &["hub.test"]);
    let proxy_leaf = ca.issue("proxy", &["proxy.test"]);
    let hub = TestHub::start("hub.test", &hub_leaf.cert, &hub_leaf.key, None).await;

    let mut frontend = Frontend::new("https", "127.0.0.1:0".parse()?, Mode::Http, "hub");
    frontend.tls_cert = Some(proxy_leaf.cert);
    frontend.tls_key = Some(proxy_leaf.key);
    let mut backend = Backend::new("hub", &hub.addr.to_string());
    backend.host = Some("hub.test".into());
    backend.ca_file = Some(ca.ca_pem.clone());
    let config = Config::new("http-rough", vec![frontend], vec![backend]);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let (running, _) = agent::start(&config, &RunOptions::default(), stopped).await?;
    let forwarder = running[0].addr;

    let duration = Duration::from_secs(seconds);
    println!("| path | clients | requests | req/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for round in 0..2 {
        for (label, addr, name) in [
            ("direct to hub", hub.addr, "hub.test"),
            ("through forwarder", forwarder, "proxy.test"),
        ] {
            let f = run_clients(addr, &ca, name, clients, duration).await?;
            println!(
                "| {label} (round {}) | {clients} | {} | {:.0} | {:.2} ms | {:.2} ms |",
                round + 1,
                f.requests,
                f.rps,
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
