//! Transparent mode's eBPF object (the sk_lookup steering program). A binary of its own,
//! like the XDP guard's: an agent without transparent frontends never loads it, and it
//! attaches to the network namespace independently of the splice data path.
// As in the crate's main object: eBPF programs are `unsafe` by nature (see main.rs).
#![allow(unsafe_code)]
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[path = "../transparent.rs"]
mod transparent;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never run.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Host builds (cargo test/clippy of the workspace) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
