//! `cargo xtask fuzz --seconds N [--target NAME]`: a bounded libFuzzer run of every
//! cargo-fuzz target in `fuzz/` (nightly, AddressSanitizer), one after the other. Fails
//! on the first target that crashes and names the input that did it. Not part of
//! `cargo xtask test`: fuzzing is open-ended, CI is not.
//!
//! Seeds come from the committed `fuzz/corpus/<target>/` (and tokens from
//! `fuzz/dict/<target>.dict` when there is one); what a run finds goes to
//! `fuzz/target/xtask-corpus/<target>/` (ignored by git), so later runs start from it
//! and the committed corpus stays small. Fold it in with
//! `cargo +nightly fuzz cmin <target>` after copying, if it is worth keeping.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (see `fuzz/fuzz_targets/`).
    #[arg(long)]
    target: Option<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let fuzz_dir = root.join("fuzz");
    ensure_cargo_fuzz()?;
    let all = targets(&fuzz_dir)?;
    let chosen: Vec<String> = match &options.target {
        Some(name) if all.contains(name) => vec![name.clone()],
        Some(name) => bail!("no fuzz target {name:?}; there are {all:?}"),
        None => all.into_iter().collect(),
    };
    for target in &chosen {
        run_target(&root, &fuzz_dir, target, options.seconds)?;
    }
    eprintln!(
        "xtask: {} fuzz target(s) ran {} s each without a crash",
        chosen.len(),
        options.seconds
    );
    Ok(())
}

/// `cargo` of the nightly toolchain, without the package variables `cargo run` gave
/// xtask: build scripts (ring's, through cc) rerun when those differ from the last
/// build, so a `cargo +nightly fuzz` by hand and this would rebuild each other's work.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                &*key,
                "CARGO"
                    | "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let works = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz (about a minute)");
    crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("could not install cargo-fuzz")
}

/// The targets, by file name in `fuzz/fuzz_targets/`.
fn targets(fuzz_dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(names)
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn run_target(root: &Path, fuzz_dir: &Path, target: &str, seconds: u64) -> anyhow::Result<()> {
    let work_corpus = fuzz_dir.join("target/xtask-corpus").join(target);
    std::fs::create_dir_all(&work_corpus)
        .with_context(|| format!("creating {}", work_corpus.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let before = files_in(&artifacts);
    let seeds = fuzz_dir.join("corpus").join(target);
    let mut cmd = nightly_cargo();
    // The first corpus directory receives new inputs; the committed seeds are read only.
    cmd.current_dir(root)
        .args(["fuzz", "run", target])
        .arg(&work_corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1");
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if status.success() {
        return Ok(());
    }
    let found: Vec<_> = files_in(&artifacts).difference(&before).cloned().collect();
    if found.is_empty() {
        bail!("fuzz target {target} failed with {status} (no new artifact: see its output above)");
    }
    for path in &found {
        eprintln!("xtask: {target} crashed on {}", path.display());
    }
    bail!(
        "fuzz target {target} crashed; reproduce with `cargo +nightly fuzz run {target} {}`",
        found[0].display()
    )
}
