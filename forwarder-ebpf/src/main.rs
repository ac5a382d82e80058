//! The forwarder's eBPF object: one file per program family.
// eBPF programs are `unsafe` by nature: each is an exported symbol in a named section
// (`#[unsafe(no_mangle)]`, `#[unsafe(link_section)]`) and reads its context and maps
// through aya-ebpf's raw helpers. Every block still needs its `// SAFETY:` line.
#![allow(unsafe_code)]
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod splice;

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
