//! Command-line interface (clap): `serve`, `generate-config`, `generate-registration`,
//! `check-config`, `print-discovery`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Conclave: sovereign video calls for a Matrix homeserver.
#[derive(Debug, Parser)]
#[command(name = "conclave", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (appservice, token service, SFU) on embedded defaults or a config file.
    Serve {
        /// TOML configuration file; without it, defaults plus CONCLAVE_* environment apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a commented configuration file with every key and its default.
    GenerateConfig,
    /// Write a Synapse-ready appservice registration consistent with the configuration.
    GenerateRegistration {
        /// URL at which the homeserver reaches Conclave (default: http.public_url or
        /// http://<http.bind>).
        #[arg(long)]
        url: Option<String>,
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where to write it (`-` for standard output). Default: <data_dir>/appservice.yaml.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Print what to paste into Synapse's config (MSC4143 `matrix_rtc` transports) and into
    /// `/.well-known/matrix/client` so clients discover this SFU.
    PrintDiscovery {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print one JSON object (`synapse`, `well_known_client`) instead of annotated text.
        #[arg(long)]
        json: bool,
        /// For a homeserver that forwards MSC4195's endpoints to Conclave (MSC4512, Synapse's
        /// `msc4512_enabled`, with `msc4502_enabled` for membership): its flags and the
        /// transport naming the SFU's WebSocket URL.
        #[arg(long)]
        msc4512: bool,
    },
    /// Validate the configuration and print the effective values.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}
