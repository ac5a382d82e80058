//! Reads the server name (SNI) from a TLS ClientHello without consuming it, so a
//! passthrough port can route by hub name while the TLS bytes stay untouched.

/// Outcome of looking at the first bytes a client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// More bytes are needed: at least this many in total.
    Incomplete { need: usize },
    /// A ClientHello, with the name it asked for (None: no SNI extension).
    Parsed { server_name: Option<String> },
    /// Not a TLS ClientHello (plain MQTT, HTTP, garbage): route to the default backend.
    NotTls,
}

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// A ClientHello larger than this (post-quantum key shares make ~1.8 KiB common) is
/// routed without SNI rather than buffered further.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + RECORD_HEADER;

/// Parses the first TLS record of a connection. Only the first record is read: a
/// ClientHello split across records (legal, never seen from IoT SDKs) counts as no SNI.
pub fn parse_client_hello(buf: &[u8]) -> ClientHello {
    if buf.len() < RECORD_HEADER {
        if !buf.is_empty() && buf[0] != CONTENT_HANDSHAKE {
            return ClientHello::NotTls;
        }
        return ClientHello::Incomplete {
            need: RECORD_HEADER,
        };
    }
    if buf[0] != CONTENT_HANDSHAKE || buf[1] != 3 {
        return ClientHello::NotTls;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let total = RECORD_HEADER + record_len;
    if buf.len() < total {
        return ClientHello::Incomplete { need: total };
    }
    let mut r = Reader(&buf[RECORD_HEADER..total]);
    match server_name(&mut r) {
        Some(name) => ClientHello::Parsed { server_name: name },
        None => ClientHello::NotTls,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u8()?);
        self.take(n).map(Reader)
    }
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        self.take(n).map(Reader)
    }
}

/// None: malformed. Some(None): well formed, no SNI.
fn server_name(r: &mut Reader<'_>) -> Option<Option<String>> {
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let body_len = r.u24()?;
    // The handshake message may continue in the next record; parse what this one holds.
    let mut body = Reader(r.take(body_len.min(r.0.len()))?);
    body.take(2)?; // legacy_version
    body.take(32)?; // random
    body.vec8()?; // legacy_session_id
    body.vec16()?; // cipher_suites
    body.vec8()?; // legacy_compression_methods
    if body.0.is_empty() {
        return Some(None);
    }
    let mut extensions = body.vec16()?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut names = data.vec16()?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == NAME_TYPE_HOST {
                let name = std::str::from_utf8(name.0).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a ClientHello record the way a TLS client lays it out.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        // An unrelated extension first (supported_versions), as real clients send many.
        ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let name = name.as_bytes();
            let list_len = 3 + name.len();
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list_len as u16).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
            ext.extend_from_slice(name);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_the_server_name_case_folded() {
        let hello = client_hello(Some("MyHub.Azure-Devices.net"));
        assert_eq!(
            parse_client_hello(&hello),
            ClientHello::Parsed {
                server_name: Some("myhub.azure-devices.net".into())
            }
        );
    }

    #[test]
    fn no_sni_extension_is_parsed_as_none() {
        assert_eq!(
            parse_client_hello(&client_hello(None)),
            ClientHello::Parsed { server_name: None }
        );
    }

    #[test]
    fn every_truncation_asks_for_more_bytes() {
        let hello = client_hello(Some("hub.example"));
        for cut in 0..hello.len() {
            match parse_client_hello(&hello[..cut]) {
                ClientHello::Incomplete { need } => assert!(need > cut && need <= hello.len()),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn plain_mqtt_and_http_are_not_tls() {
        assert_eq!(
            parse_client_hello(&[0x10, 0x0c, 0x00, 0x04, b'M', b'Q']),
            ClientHello::NotTls
        );
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            ClientHello::NotTls
        );
    }

    #[test]
    fn garbage_inside_a_handshake_record_is_not_tls() {
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1, 0, 10];
        rec.extend_from_slice(&[HANDSHAKE_CLIENT_HELLO, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6]);
        assert_eq!(parse_client_hello(&rec), ClientHello::NotTls);
    }
}
