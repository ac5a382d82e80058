//! `cargo xtask setup`: installs what is missing, leaves what is there. Every step says
//! what it does and fails with what to try next.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Debian packages the tests (and the demo) run as real peers.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "openssl",
    "mosquitto",
    "mosquitto-clients",
    "haproxy",
    "socat",
    "iperf3",
    // A real AMQP 1.0 broker (amqp1_0 plugin built in) and a real AMQP 1.0 client.
    "rabbitmq-server",
    "python3-qpid-proton",
];

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn run() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages()?;
    Ok(())
}

fn quiet_success(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup: is rustup installed?")?;
    if !out.status.success() {
        bail!("the nightly toolchain is missing: run `rustup toolchain install nightly`");
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain (for -Z build-std=core)");
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("could not add rust-src to nightly")
}

/// bpf-linker links the nightly toolchain's libLLVM, which only `rustup run nightly` puts
/// on the library path; aya-build runs it that way too.
fn bpf_linker_works() -> bool {
    quiet_success(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    // Prebuilt bpf-linker binaries are not reachable here; build it against the LLVM
    // shared library that ships inside the nightly toolchain.
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lib_dir = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major: String = llvm
        .trim_start_matches("libLLVM.so.")
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    if major.is_empty() {
        bail!("cannot tell the LLVM version from {llvm}");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".local/share/forwarder/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib_dir.join(&llvm), &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!(
        "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about 2 minutes)"
    );
    crate::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
    .context("could not build bpf-linker; see ../shared/TOOLCHAIN.md for the recipe")?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing (apt-get, as root).
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root (apt-get install {})",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    crate::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {missing:?}"))
}
