//! `Config::parse` (TOML, then `validate`) on any text: errors, never panics. A config
//! that passes is run through the helpers `forwarder check` and the agent call, and the
//! limits the agent hands to libraries at start are checked against what those accept.
#![no_main]

use forwarder::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    // Validation is idempotent and what parse accepted stays valid.
    config.validate().expect("a parsed config validates again");
    let _ = config.warnings();
    for backend in &config.backends {
        let _ = backend.pacing();
        let _ = backend.pacing_summary();
        let _ = backend.http_host();
    }
    for frontend in &config.frontends {
        // Every frontend's gate bounds open connections with a semaphore of this many
        // permits (and the agent's with the top-level cap).
        let slots = tokio::sync::Semaphore::new(frontend.max_connections());
        assert_eq!(slots.available_permits(), frontend.max_connections());
        let _ = frontend.source_limit();
    }
    if let Some(max) = config.max_connections {
        assert_eq!(tokio::sync::Semaphore::new(max).available_permits(), max);
    }
});
