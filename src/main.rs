//! The `engine` binary: parses the command line and dispatches to the
//! command's module under `src/cli/` (each a thin layer over the library),
//! then prints any error as one line, as ripgrep does.

mod cli;

use anyhow::{bail, Context, Result};
use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(err) = run(cli) {
        // One line: the error and its causes, as ripgrep prints them.
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn run(cli: cli::Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    // The server's engine thread runs on the pool; its HTTP side must not
    // hold a worker.
    if let cli::Command::Serve(args) = cli.command {
        return cli::serve::run(*args);
    }
    // The command runs on a thread of the pool, so that each CPU op's
    // parallel loop starts where it is called. From outside the pool every
    // op wakes a worker and sleeps until it is done: on one thread that
    // round trip cost a third of a decoded token's time.
    rayon::scope(|_| cli.command.run())
}
