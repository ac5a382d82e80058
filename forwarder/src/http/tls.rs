//! rustls configurations: the server side that devices see (our certificate), and the
//! client side towards the hub (verified against system roots plus an optional CA file).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::crypto::CryptoProvider;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing PEM certificates in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// TLS 1.2 and 1.3 with the configured chain and key; ALPN h2 and http/1.1.
pub fn server_config(cert_chain: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = read_certificates(cert_chain)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading a PEM private key from {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13, &TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate chain and the private key do not belong together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Verifying client configuration: TLS 1.2 minimum (IoT Hub enforces it), the system's
/// trusted roots plus `extra_ca`. There is deliberately no way to switch verification off.
pub fn client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(system.certs);
    if added == 0 {
        tracing::debug!(errors = ?system.errors, "no system root certificates found");
    }
    if let Some(path) = extra_ca {
        for cert in read_certificates(path)? {
            roots
                .add(cert)
                .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
        }
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no trusted root certificates: install the ca-certificates package or set ca_file"
    );
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13, &TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
