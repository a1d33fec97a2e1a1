//! The Debian packages install the way fleet operators install things: the
//! freshly built agent package goes onto this machine's real filesystem with
//! `dpkg -i` (as root), is checked (files, system user, state directory,
//! `--version`, the unit with `systemd-analyze verify`), and is purged again. The
//! man pages say every flag `--help` does, because both come from one definition.

use std::{path::Path, process::Command};

use secbeat_integration::{binary, repository_root};

/// Runs a command to completion; (success, stdout + stderr).
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Builds both packages from the binaries this test run already has.
fn package() -> Vec<std::path::PathBuf> {
    let bin_dir = binary("secbeat-agent").parent().unwrap().to_owned();
    let output = Command::new(repository_root().join("scripts/package"))
        .env("BIN_DIR", &bin_dir)
        // Debug binaries are large: compress fast; the release packages use xz.
        .env("DEB_COMPRESSION", "gzip")
        .current_dir(repository_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/package: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| repository_root().join(line.trim()))
        .collect()
}

#[test]
fn the_agent_package_installs_runs_and_purges_on_this_machine() {
    let root = run("id", &["-u"]).1.trim() == "0";
    if !root || !Path::new("/usr/bin/dpkg").exists() {
        eprintln!(
            "SKIPPED: installing a package needs root and dpkg (CI runs as root on Debian); nothing was checked"
        );
        return;
    }
    let debs = package();
    assert_eq!(debs.len(), 2, "{debs:?}");
    let agent = debs
        .iter()
        .find(|deb| deb.to_string_lossy().contains("secbeat-agent_"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (ok, info) = run("dpkg-deb", &["--info", &agent]);
    assert!(ok && info.contains("Package: secbeat-agent"), "{info}");

    // A clean slate (an earlier aborted run may have left it installed).
    let _ = run("dpkg", &["--purge", "secbeat-agent"]);
    let (ok, out) = run("dpkg", &["-i", &agent]);
    assert!(ok, "dpkg -i: {out}");
    let installed = || -> Result<(), String> {
        for file in [
            "/usr/bin/secbeat-agent",
            "/lib/systemd/system/secbeat-agent.service",
            "/etc/secbeat/agent.env",
            "/usr/share/man/man1/secbeat-agent.1.gz",
            "/usr/share/bash-completion/completions/secbeat-agent",
            "/usr/share/zsh/vendor-completions/_secbeat-agent",
            "/usr/share/fish/vendor_completions.d/secbeat-agent.fish",
            "/usr/share/doc/secbeat-agent/copyright",
        ] {
            if !Path::new(file).is_file() {
                return Err(format!("{file} is not installed"));
            }
        }
        let (ok, conffiles) = run("dpkg-query", &["-W", "-f=${Conffiles}", "secbeat-agent"]);
        if !(ok && conffiles.contains("/etc/secbeat/agent.env")) {
            return Err(format!("agent.env is not a conffile: {conffiles}"));
        }
        let (ok, user) = run("getent", &["passwd", "secbeat-agent"]);
        if !ok || !user.contains("/var/lib/secbeat-agent") {
            return Err(format!("no system user secbeat-agent: {user}"));
        }
        let (_, owner) = run("stat", &["-c", "%U %a", "/var/lib/secbeat-agent"]);
        if owner.trim() != "secbeat-agent 750" {
            return Err(format!("the state directory is {owner}"));
        }
        let (ok, version) = run("/usr/bin/secbeat-agent", &["--version"]);
        if !ok || version.trim() != format!("secbeat-agent {}", env!("CARGO_PKG_VERSION")) {
            return Err(format!("--version says {version}"));
        }
        let copyright = std::fs::read_to_string("/usr/share/doc/secbeat-agent/copyright").unwrap();
        if !(copyright.contains("License: Apache-2.0") && copyright.contains("tonic ")) {
            return Err(format!(
                "the copyright file does not name the linked crates: {copyright}"
            ));
        }
        if Path::new("/usr/bin/systemd-analyze").exists() {
            let (ok, out) = run(
                "systemd-analyze",
                &["verify", "/lib/systemd/system/secbeat-agent.service"],
            );
            if !ok {
                return Err(format!("systemd-analyze verify: {out}"));
            }
        } else {
            eprintln!("SKIPPED: systemd-analyze is not on this machine; the unit was not verified");
        }
        Ok(())
    };
    let checked = installed();
    let (purged, out) = run("dpkg", &["--purge", "secbeat-agent"]);
    if let Err(problem) = checked {
        panic!("{problem}");
    }
    assert!(purged, "dpkg --purge: {out}");
    assert!(!Path::new("/usr/bin/secbeat-agent").exists());
    assert!(
        !Path::new("/var/lib/secbeat-agent").exists(),
        "purge removes the state"
    );
    let (exists, _) = run("getent", &["passwd", "secbeat-agent"]);
    assert!(!exists, "purge removes the system user");
}

/// The long flags a `--help` text documents: those that start an entry
/// ("  -h, --help", "      --config <FILE>"), not ones its prose mentions.
fn flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| {
            line.split(|c: char| c.is_whitespace() || c == ',')
                .take_while(|word| word.starts_with('-'))
                .filter(|word| word.starts_with("--") && word.len() > 2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn every_flag_of_each_binary_is_in_its_man_page_and_completions() {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = run(
        binary("secbeat-docgen").to_str().unwrap(),
        &["--out", out.path().to_str().unwrap()],
    );
    assert!(ok, "{text}");
    for name in ["secbeat-agent", "secbeat-orchestrator"] {
        let (_, help) = run(binary(name).to_str().unwrap(), &["--help"]);
        let flags = flags(&help);
        assert!(flags.len() >= 15, "{name}: {flags:?}");
        // roff escapes dashes: \-\-state\-dir.
        let page = std::fs::read_to_string(out.path().join(format!("man/man1/{name}.1")))
            .unwrap()
            .replace("\\-", "-");
        let bash = std::fs::read_to_string(out.path().join(format!("completions/bash/{name}"))).unwrap();
        let zsh = std::fs::read_to_string(out.path().join(format!("completions/zsh/_{name}"))).unwrap();
        let fish = std::fs::read_to_string(out.path().join(format!("completions/fish/{name}.fish"))).unwrap();
        for flag in &flags {
            assert!(page.contains(flag.as_str()), "{name}'s man page lacks {flag}");
            assert!(
                bash.contains(flag.as_str()),
                "{name}'s bash completion lacks {flag}"
            );
            assert!(
                zsh.contains(flag.as_str()),
                "{name}'s zsh completion lacks {flag}"
            );
            let long = flag.trim_start_matches("--");
            assert!(
                fish.contains(&format!("-l {long}")),
                "{name}'s fish completion lacks {flag}"
            );
        }
    }
    // Subcommands get pages of their own.
    assert!(
        out.path()
            .join("man/man1/secbeat-orchestrator-backtest.1")
            .is_file()
    );
}
