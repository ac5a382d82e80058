//! The echo servers behind the proxies (the bench's fleet, the soak's AMQP stand-in): one task per connection on a tokio runtime, so
//! thousands of idle devices cost a few KiB each instead of a thread each.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_rustls::TlsAcceptor;

/// A device that connected but never finished its TLS handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages are 1 KiB at most; a read of this size takes a whole one.
const BUFFER: usize = 4096;

/// Accepts forever; each connection echoes until its peer closes.
pub async fn serve(listen: SocketAddr, tls: Option<(PathBuf, PathBuf)>) -> anyhow::Result<()> {
    let acceptor = match tls {
        Some((cert, key)) => Some(acceptor(&cert, &key)?),
        None => None,
    };
    // The forwarder's own listener (same accept queue): a reconnect storm must not be
    // throttled by the stand-in hub's queue before the proxy's.
    let listener =
        forwarder::listener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                // EMFILE and friends: pause instead of spinning, then go on.
                eprintln!("fleet echo-server: accept: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        match acceptor.clone() {
            None => {
                tokio::spawn(echo(tcp));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    if let Ok(Ok(tls)) = handshake.await {
                        echo(tls).await;
                    }
                });
            }
        }
    }
}

fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Writes back whatever arrives (flushed: a TLS stream holds records until then).
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() || stream.flush().await.is_err() {
            break;
        }
    }
    let _ = stream.shutdown().await;
}
