//! `engine kernels`: the CUDA kernels (kernels/*.cu).

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Compile every kernel with NVRTC and ptxas (no GPU needed) and print
    /// registers, shared memory and spills; fails on a compile error or a spill.
    Check {
        /// GPU architectures, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
        arch: Vec<String>,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Check { arch } => {
            let report = engine::kernels_check::inspect(&arch)?;
            println!("{report}");
            report.ensure_no_spills()?;
        }
    }
    Ok(())
}
