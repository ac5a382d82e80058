//! `forwarder run` with no arguments: a built-in stand-in upstream (an echo service on
//! loopback) behind a spliced frontend, so a fresh machine sees the kernel path work
//! without an Azure account.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;

use crate::config::{Backend, Config, Frontend, Mode};

pub const DEMO_PORT: u16 = 18883;
/// The demo agent's instance name.
pub const INSTANCE: &str = "demo";

/// Starts the echo upstream and returns a config that fronts it on 127.0.0.1:18883.
pub async fn start() -> anyhow::Result<Config> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    let bind = SocketAddr::from(([127, 0, 0, 1], DEMO_PORT));
    let frontend = Frontend::new("demo", bind, Mode::Splice, "echo");
    let mut backend = Backend::new("echo", &echo_addr.to_string());
    backend.connect_timeout = std::time::Duration::from_secs(2);
    tracing::info!(
        "demo: a stand-in upstream (echo) is behind 127.0.0.1:{DEMO_PORT}; try `socat - TCP:127.0.0.1:{DEMO_PORT}` and type; \
         `target/release/forwarder conns --instance demo` lists it \
         (bytes are spliced in the kernel, and echoed back). Ctrl-C stops."
    );
    Ok(Config::new(INSTANCE, vec![frontend], vec![backend]))
}
