//! Picks and connects an upstream server: smooth weighted round robin (nginx's), failover
//! to the next server on a failed or timed-out connect, and optional pacing of new
//! connections (`pacing`). Every upstream connect of the agent goes through `Pool::connect`:
//! the L4 splice path, the originate path (plain MQTT 1883) and the HTTPS connector.

pub mod pacing;

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::{self, BackendMetrics};
use pacing::{Pacer, PacingLimits, Refusal};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// `host:port`; resolved on every connect so DNS changes of the hub are followed.
    pub address: String,
    pub weight: u32,
}

/// One backend: its servers and the round-robin state.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    servers: Vec<Server>,
    current: Mutex<Vec<i64>>,
    connect_timeout: Duration,
    /// New connections wait for a slot here first (`max_new_connections_per_sec`).
    pacer: Option<Pacer>,
    pub metrics: BackendMetrics,
    /// Write a PROXY v2 header before the client's bytes (`send_proxy_v2`).
    pub send_proxy_v2: bool,
    /// Connect from the client's own address (`preserve_source`, see
    /// `crate::transparent::upstream::connect_from`).
    pub preserve_source: bool,
}

#[derive(Debug)]
pub struct ConnectError {
    pub backend: String,
    pub attempts: String,
    /// True when every failure was a timeout (HTTP maps it to 504 rather than 502); also
    /// for a device refused by pacing's `queue_timeout_ms`.
    pub timed_out: bool,
    /// Set when pacing refused the connect: no server was tried.
    pub paced: Option<Refusal>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = &self.backend;
        match self.paced {
            Some(Refusal::QueueFull) => write!(
                f,
                "backend {backend}: connect queue full (pacing new connections); device refused"
            ),
            Some(Refusal::QueueTimeout) => write!(
                f,
                "backend {backend}: no connect slot within queue_timeout_ms (pacing new connections); device refused"
            ),
            None => write!(
                f,
                "no server of backend {backend} accepted a connection: {}",
                self.attempts
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

impl Pool {
    pub fn new(name: impl Into<String>, servers: Vec<Server>, connect_timeout: Duration) -> Self {
        let current = Mutex::new(vec![0; servers.len()]);
        Self {
            name: name.into(),
            servers,
            current,
            connect_timeout,
            pacer: None,
            metrics: BackendMetrics::default(),
            send_proxy_v2: false,
            preserve_source: false,
        }
    }

    /// Paces this backend's new connections (`None`: every connect goes at once).
    pub fn with_pacing(mut self, limits: Option<PacingLimits>) -> Self {
        self.pacer = limits.map(Pacer::new);
        self
    }

    /// Sends a PROXY v2 header on each new connection before the client's bytes.
    pub fn with_proxy_v2(mut self, on: bool) -> Self {
        self.send_proxy_v2 = on;
        self
    }

    /// Connects from the client's address (`connect_as`) rather than the host's.
    pub fn with_preserve_source(mut self, on: bool) -> Self {
        self.preserve_source = on;
        self
    }

    pub fn pacing(&self) -> Option<PacingLimits> {
        self.pacer.as_ref().map(Pacer::limits)
    }

    /// Order in which to try the servers for the next connection: the weighted pick
    /// first, then the others as failover.
    pub fn attempt_order(&self) -> Vec<usize> {
        let n = self.servers.len();
        if n == 0 {
            return Vec::new();
        }
        let total: i64 = self.servers.iter().map(|s| i64::from(s.weight)).sum();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        for (i, server) in self.servers.iter().enumerate() {
            current[i] += i64::from(server.weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        (0..n)
            .map(|k| (best + k) % n)
            .filter(|&i| self.servers[i].weight > 0 || n == 1)
            .collect()
    }

    /// Connects to the next server, failing over to the others; with pacing, first waits
    /// for a slot (or is refused). One slot per device: failover attempts after a failed
    /// connect are not paced again (the hub did not count a connection it never accepted).
    pub async fn connect(&self) -> Result<(TcpStream, SocketAddr), ConnectError> {
        self.connect_as(None).await
    }

    /// `connect`, from `source` (the client's address) when this pool preserves it.
    pub async fn connect_as(
        &self,
        source: Option<std::net::IpAddr>,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let source = source.filter(|_| self.preserve_source);
        if let Some(pacer) = &self.pacer
            && let Err(refusal) = pacer.admit(&self.metrics).await
        {
            return Err(ConnectError {
                backend: self.name.clone(),
                attempts: String::new(),
                timed_out: refusal == Refusal::QueueTimeout,
                paced: Some(refusal),
            });
        }
        self.connect_now(source).await
    }

    /// Tries the servers in `attempt_order`, each within the connect timeout.
    async fn connect_now(
        &self,
        source: Option<std::net::IpAddr>,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let mut attempts = Vec::new();
        let mut timed_out = true;
        for index in self.attempt_order() {
            let server = &self.servers[index];
            match tokio::time::timeout(self.connect_timeout, connect_any(&server.address, source))
                .await
            {
                Ok(Ok(found)) => {
                    metrics::add(&self.metrics.connects, 1);
                    return Ok(found);
                }
                Ok(Err(err)) => {
                    metrics::add(&self.metrics.connect_errors, 1);
                    timed_out = false;
                    attempts.push(format!("{}: {err}", server.address));
                }
                Err(_) => {
                    metrics::add(&self.metrics.connect_timeouts, 1);
                    attempts.push(format!(
                        "{}: timed out after {:?}",
                        server.address, self.connect_timeout
                    ));
                }
            }
        }
        metrics::add(&self.metrics.exhausted, 1);
        if attempts.is_empty() {
            timed_out = false;
            attempts.push("no servers configured".into());
        }
        Err(ConnectError {
            backend: self.name.clone(),
            attempts: attempts.join("; "),
            timed_out,
            paced: None,
        })
    }
}

async fn connect_any(
    address: &str,
    source: Option<std::net::IpAddr>,
) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in tokio::net::lookup_host(address).await? {
        let connected = match source {
            Some(source) => crate::transparent::upstream::connect_from(source, addr).await,
            None => TcpStream::connect(addr).await,
        };
        match connected {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok((stream, addr));
            }
            Err(err) => last = err,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Pool {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Server {
                address: format!("s{i}:1"),
                weight,
            })
            .collect();
        Pool::new("b", servers, Duration::from_secs(1))
    }

    #[test]
    fn weighted_round_robin_follows_weights_and_interleaves() {
        let p = pool(&[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| p.attempt_order()[0]).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 1);
        assert_eq!(
            picks,
            vec![0, 0, 1, 0, 2, 0, 0],
            "smooth: heavy server's picks are spread"
        );
    }

    #[test]
    fn failover_order_lists_every_other_server() {
        let p = pool(&[1, 1, 1]);
        let order = p.attempt_order();
        assert_eq!(order.len(), 3);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn refused_server_fails_over_to_the_next() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap().to_string();
        // A port that was just free: nothing listens there.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let p = Pool::new(
            "b",
            vec![
                Server {
                    address: dead.clone(),
                    weight: 1,
                },
                Server {
                    address: good.clone(),
                    weight: 1,
                },
            ],
            Duration::from_secs(2),
        );
        for _ in 0..4 {
            let (_, addr) = p.connect().await.expect("failover to the live server");
            assert_eq!(addr.to_string(), good);
        }
    }

    #[tokio::test]
    async fn a_paced_pool_refuses_without_trying_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server {
            address: listener.local_addr().unwrap().to_string(),
            weight: 1,
        };
        let p =
            Pool::new("b", vec![server], Duration::from_secs(2)).with_pacing(Some(PacingLimits {
                rate_per_sec: 1,
                queue: 10,
                queue_timeout: Duration::from_millis(1),
            }));
        p.connect().await.expect("the burst of one goes at once");
        // The next slot is a second away, beyond the 1 ms the queue allows.
        let err = p.connect().await.unwrap_err();
        assert_eq!(
            (err.paced, err.timed_out),
            (Some(Refusal::QueueTimeout), true)
        );
        assert!(err.to_string().contains("queue_timeout_ms"), "{err}");
        let m = &p.metrics;
        assert_eq!(
            [
                metrics::get(&m.connects),
                metrics::get(&m.exhausted),
                metrics::get(&m.connects_refused_queue_timeout),
            ],
            [1, 0, 1]
        );
    }
}
