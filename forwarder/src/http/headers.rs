//! Header rules of a forwarding proxy: hop-by-hop fields dropped (RFC 9110 7.6.1),
//! `Host` rewritten to the hub, `X-Forwarded-*` added, WebSocket upgrades recognised.

use std::net::IpAddr;

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, UPGRADE};
use http::{HeaderMap, Version};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Fields that describe one connection, never the message (RFC 9110 7.6.1, plus the
/// legacy `Keep-Alive` and `Proxy-Connection` that clients still send).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Comma-separated tokens of every `Connection` field, lower-cased.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// True for an HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket` request. Other
/// upgrade protocols are not passed on (the request is forwarded as a plain one).
pub fn is_websocket_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && connection_tokens(headers).iter().any(|t| t == "upgrade")
        && headers
            .get_all(UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| {
                p.trim()
                    .split('/')
                    .next()
                    .is_some_and(|name| name.eq_ignore_ascii_case("websocket"))
            })
}

/// Removes hop-by-hop fields, including those the `Connection` field names. With
/// `keep_upgrade`, the upgrade handshake (`Connection: upgrade`, `Upgrade`) survives.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| headers.get(UPGRADE).cloned())
        .flatten();
    for token in connection_tokens(headers) {
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade);
    }
}

/// Points the request at the hub: `Host` is the hub's name (what IoT Hub routes on),
/// the device's own view is kept in `X-Forwarded-Host`, and the client address is
/// appended to `X-Forwarded-For`.
pub fn rewrite_for_upstream(
    headers: &mut HeaderMap,
    hub_host: &HeaderValue,
    original_host: Option<HeaderValue>,
    client_ip: IpAddr,
) {
    headers.insert(HOST, hub_host.clone());
    if let Some(original) = original_host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, original);
    }
    let client = client_ip.to_canonical().to_string();
    let forwarded_for = match headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        earlier if earlier.is_empty() => client,
        earlier => format!("{}, {client}", earlier.join(", ")),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("authorization", "SharedAccessSignature sr=x"),
            ("content-length", "12"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization", "content-length"]);
    }

    #[test]
    fn websocket_handshake_survives_stripping() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", "mqtt"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert!(is_websocket_upgrade(Version::HTTP_11, &h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-protocol"], "mqtt");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn only_http11_websocket_upgrades_count() {
        let ws = map(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert!(is_websocket_upgrade(Version::HTTP_11, &ws));
        assert!(!is_websocket_upgrade(Version::HTTP_10, &ws));
        assert!(!is_websocket_upgrade(Version::HTTP_2, &ws));
        let h2c = map(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        assert!(!is_websocket_upgrade(Version::HTTP_11, &h2c));
        let no_connection = map(&[("upgrade", "websocket")]);
        assert!(!is_websocket_upgrade(Version::HTTP_11, &no_connection));
    }

    #[test]
    fn host_is_rewritten_and_forwarded_fields_appended() {
        let mut h = map(&[
            ("host", "proxy.example.net"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        let original = h.get(HOST).cloned();
        rewrite_for_upstream(
            &mut h,
            &HeaderValue::from_static("myhub.azure-devices.net"),
            original,
            "::ffff:10.1.2.3".parse().unwrap(),
        );
        assert_eq!(h["host"], "myhub.azure-devices.net");
        assert_eq!(h["x-forwarded-host"], "proxy.example.net");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
