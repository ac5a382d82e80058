//! The ClientHello peek of SNI-routed passthrough ports (`l4::sni`): any bytes a client
//! sends first. Never panics; asks for more bytes only when more could change the answer.
#![no_main]

use forwarder::l4::sni::{ClientHello, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let verdict = parse_client_hello(data);
    match &verdict {
        // The peek loop waits for `need` bytes: asking for what it has would spin.
        ClientHello::Incomplete { need } => assert!(*need > data.len(), "{verdict:?}"),
        ClientHello::Parsed {
            server_name: Some(name),
        } => {
            assert_eq!(*name, name.to_ascii_lowercase());
            assert!(!name.ends_with('.'), "{name:?}");
        }
        ClientHello::Parsed { server_name: None } | ClientHello::NotTls => {
            // Only the first record counts: more bytes after it change nothing.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0x16, 0x03, 0x01, 0x00]);
            assert_eq!(parse_client_hello(&longer), verdict);
        }
    }
});
