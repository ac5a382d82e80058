//! The header rules of the terminating HTTPS proxy (`http::headers`), in the order the
//! proxy applies them to a request (and, for stripping, to a response). The input is an
//! HTTP/1.x request head; lines that are not valid fields are skipped, as hyper would
//! refuse them before the rules run.
#![no_main]

use std::net::IpAddr;

use forwarder::http::headers::{is_websocket_upgrade, rewrite_for_upstream, strip_hop_by_hop};
use http::Version;
use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, UPGRADE};
use libfuzzer_sys::fuzz_target;

/// hyper's default limit of fields in a request head.
const MAX_FIELDS: usize = 100;
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
const HUB: &str = "myhub.azure-devices.net";

fn parse_head(data: &[u8]) -> (Version, HeaderMap) {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let version = match lines.next().and_then(|l| l.rsplit(|&b| b == b' ').next()) {
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/2") | Some(b"HTTP/2.0") => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if headers.len() == MAX_FIELDS {
            break;
        }
        headers.append(name, value);
    }
    (version, headers)
}

fn connection_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (version, original) = parse_head(data);
    let client: IpAddr = match data.len() % 3 {
        0 => "203.0.113.7".parse().unwrap(),
        1 => "2001:db8::7".parse().unwrap(),
        _ => "::ffff:10.1.2.3".parse().unwrap(),
    };
    let named = connection_names(&original);

    // The request, as `Proxy::outbound_request` treats it.
    let mut headers = original.clone();
    let websocket = is_websocket_upgrade(version, &headers);
    let original_host = headers.get(HOST).cloned();
    strip_hop_by_hop(&mut headers, websocket);
    let kept_forwarded_host = headers.get("x-forwarded-host").cloned();
    let hub = HeaderValue::from_static(HUB);
    rewrite_for_upstream(&mut headers, &hub, original_host.clone(), client);

    assert_eq!(headers.get_all(HOST).iter().collect::<Vec<_>>(), [HUB]);
    assert_eq!(
        headers
            .get_all("x-forwarded-proto")
            .iter()
            .collect::<Vec<_>>(),
        ["https"]
    );
    let forwarded_for: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(forwarded_for.len(), 1, "{forwarded_for:?}");
    let client_text = client.to_canonical().to_string();
    assert!(
        forwarded_for[0]
            .as_bytes()
            .ends_with(client_text.as_bytes()),
        "{forwarded_for:?}"
    );
    match (kept_forwarded_host, original_host) {
        (Some(kept), _) => assert_eq!(headers["x-forwarded-host"], kept),
        (None, Some(host)) => assert_eq!(headers["x-forwarded-host"], host),
        (None, None) => assert!(!headers.contains_key("x-forwarded-host")),
    }
    let readded = [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    for name in &named {
        if readded.contains(&name.as_str()) || (websocket && name == UPGRADE) {
            continue;
        }
        if websocket && name == CONNECTION {
            continue;
        }
        assert!(
            !headers.contains_key(name),
            "{name} named by Connection survived"
        );
    }
    for name in HOP_BY_HOP {
        if websocket && (name == "connection" || name == "upgrade") {
            continue;
        }
        assert!(!headers.contains_key(name), "hop-by-hop {name} survived");
    }
    if websocket {
        assert_eq!(
            headers.get_all(CONNECTION).iter().collect::<Vec<_>>(),
            ["upgrade"]
        );
        assert_eq!(
            headers.get_all(UPGRADE).iter().collect::<Vec<_>>(),
            [original
                .get(UPGRADE)
                .expect("an upgrade request has Upgrade")]
        );
    }

    // The same fields as a response from the hub: every hop-by-hop field goes.
    let mut response = original;
    strip_hop_by_hop(&mut response, false);
    for name in HOP_BY_HOP
        .into_iter()
        .chain(named.iter().map(|n| n.as_str()))
    {
        assert!(
            !response.contains_key(name),
            "{name} survived in a response"
        );
    }
});
