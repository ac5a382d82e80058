//! Builds the eBPF object (nightly, bpfel-unknown-none, build-std=core) so that a plain
//! `cargo build` of the agent embeds an up-to-date program.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "forwarder-ebpf",
        root_dir: "../forwarder-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default()).context(
        "building the eBPF object failed; run `cargo xtask setup` to install rust-src and bpf-linker",
    )
}
