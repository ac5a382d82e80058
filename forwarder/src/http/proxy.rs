//! One request: rewritten for the hub, sent over a pooled TLS connection, the answer
//! streamed back. WebSocket upgrades are joined after the hub's `101`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;

use crate::admission::Admitted;
use crate::http::connector::{ConnectFailure, SlotWait, UpstreamAddr, UpstreamConnector};
use crate::http::counted::ConnCounts;
use crate::http::{headers, tunnel};
use crate::metrics::{self, HttpMetrics};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Where and how requests of one frontend go.
pub struct Proxy {
    pub frontend: String,
    /// The hub's name: the `Host` every forwarded request carries.
    pub hub_host: HeaderValue,
    pub client: Client<UpstreamConnector, Incoming>,
    /// Time the hub gets to answer a request's headers (504 after it).
    pub response_timeout: Duration,
    /// Idle timeout of upgraded (WebSocket) sessions.
    pub upgraded_idle_timeout: Duration,
    pub metrics: Arc<HttpMetrics>,
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        client_addr: SocketAddr,
        connection: Arc<ConnCounts>,
        admitted: Arc<Admitted>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        metrics::add(&self.metrics.requests, 1);
        let websocket = headers::is_websocket_upgrade(request.version(), request.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut request));
        let outbound = match self.outbound_request(request, client_addr, websocket) {
            Ok(outbound) => outbound,
            Err(response) => return Ok(response),
        };
        let slot_wait = SlotWait::default();
        let sent = slot_wait.scope(self.client.request(outbound));
        let mut response = match tokio::time::timeout(self.response_timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Ok(self.upstream_failed(&err)),
            Err(_) if slot_wait.waiting() => return Ok(self.at_capacity()),
            Err(_) => {
                metrics::add(&self.metrics.upstream_timeout, 1);
                tracing::warn!(frontend = %self.frontend, timeout = ?self.response_timeout,
                        "upstream did not answer in time: 504");
                return Ok(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timed out",
                ));
            }
        };
        metrics::add(&self.metrics.responses_relayed, 1);
        if let Some(client_upgrade) = client_upgrade
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            metrics::add(&self.metrics.websocket_upgrades, 1);
            connection.upgraded(response.extensions().get::<UpstreamAddr>().map(|a| a.0));
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel::join(
                client_upgrade,
                upstream_upgrade,
                self.upgraded_idle_timeout,
                self.metrics.clone(),
                admitted,
            ));
            // The 101 goes back as the hub sent it: Sec-WebSocket-Accept/Protocol intact.
            return Ok(response.map(|body| body.boxed()));
        }
        headers::strip_hop_by_hop(response.headers_mut(), false);
        Ok(response.map(|body| body.boxed()))
    }

    /// The request as the hub must see it: absolute URI for the pool, HTTP/1.1,
    /// hop-by-hop fields dropped, `Host` rewritten, `X-Forwarded-*` added.
    #[allow(clippy::result_large_err)]
    fn outbound_request(
        &self,
        request: Request<Incoming>,
        client_addr: SocketAddr,
        websocket: bool,
    ) -> Result<Request<Incoming>, Response<ProxyBody>> {
        let (mut parts, body) = request.into_parts();
        let original_host = parts.headers.get(HOST).cloned().or_else(|| {
            // HTTP/2 carries the name in :authority, which hyper puts in the URI.
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let hub = self.hub_host.to_str().unwrap_or_default();
        parts.uri = match Uri::try_from(format!("https://{hub}{path}")) {
            Ok(uri) => uri,
            Err(_) => {
                metrics::add(&self.metrics.bad_request, 1);
                return Err(error_response(
                    StatusCode::BAD_REQUEST,
                    "malformed request target",
                ));
            }
        };
        parts.version = Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers, websocket);
        headers::rewrite_for_upstream(
            &mut parts.headers,
            &self.hub_host,
            original_host,
            client_addr.ip(),
        );
        Ok(Request::from_parts(parts, body))
    }

    fn upstream_failed(&self, err: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
        let cause = connect_failure(err);
        if let Some(ConnectFailure::AtCapacity(_)) = cause {
            return self.at_capacity();
        }
        if cause.is_some_and(ConnectFailure::timed_out) {
            metrics::add(&self.metrics.upstream_timeout, 1);
            tracing::warn!(frontend = %self.frontend, reason = %describe(err), "upstream timed out: 504");
            return error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out");
        }
        metrics::add(&self.metrics.upstream_unreachable, 1);
        tracing::warn!(frontend = %self.frontend, reason = %describe(err), "upstream failed: 502");
        error_response(StatusCode::BAD_GATEWAY, "upstream unreachable")
    }

    /// 503: every upstream connection stayed busy for the request's whole time. The
    /// forwarder's own limit, not the hub's answer: clients retry later.
    fn at_capacity(&self) -> Response<ProxyBody> {
        metrics::add(&self.metrics.upstream_at_capacity, 1);
        tracing::warn!(frontend = %self.frontend, timeout = ?self.response_timeout,
            "no upstream connection free in time (max_upstream_connections): 503");
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connection limit reached",
        )
    }
}

fn connect_failure<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectFailure> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(failure) = e.downcast_ref::<ConnectFailure>() {
            return Some(failure);
        }
        source = e.source();
    }
    None
}

/// The whole cause chain on one line (hyper's top-level message alone says little).
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

pub fn error_response(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(message.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
