//! `secbeat-docgen`: writes the man pages and shell completions of
//! `secbeat-orchestrator` and `secbeat-agent` from the same clap definitions as
//! their `--help` (clap_mangen, clap_complete), so the three can never disagree.
//! `scripts/package` ships what it writes.
//!
//! Layout under `--out DIR`: `man/man1/<name>.1` (and `<name>-<subcommand>.1`),
//! `completions/bash/<name>`, `completions/zsh/_<name>`,
//! `completions/fish/<name>.fish`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory, Parser};
use clap_complete::Shell;

/// Write man pages and shell completions for the SecBeat binaries.
#[derive(Debug, Parser)]
#[command(name = "secbeat-docgen", version)]
struct Args {
    /// Directory to write man/ and completions/ into (created if missing)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn write_man(command: &clap::Command, dir: &Path, name: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(&path, page)?;
    written.push(path);
    let pages = command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help");
    for sub in pages {
        let sub_name = format!("{name}-{}", sub.get_name());
        let sub = sub.clone().name(sub_name.clone());
        written.extend(write_man(&sub, dir, &sub_name)?);
    }
    Ok(written)
}

fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man/man1");
    std::fs::create_dir_all(&man)?;
    for mut command in [
        secbeat_orchestrator::cli::Cli::command(),
        secbeat_agent::AgentArgs::command(),
    ] {
        command.build();
        let name = command.get_name().to_owned();
        written.extend(write_man(&command, &man, &name)?);
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir)?;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, name.clone(), &mut script);
            let path = dir.join(file);
            std::fs::write(&path, script)?;
            written.push(path);
        }
    }
    Ok(written)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match generate(&args.out) {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("secbeat-docgen: {}: {error}", args.out.display());
            ExitCode::FAILURE
        }
    }
}
