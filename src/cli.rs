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
    },
    /// Run a benchmark (loopback only, bounded in time).
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        scenario: BenchCommand,
    },
    /// Validate the configuration and print the effective values.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// `/get_token` requests/s and latency with a cached OpenID verification.
    Tokens {
        /// Total requests.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Stop after this many seconds whatever the count.
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
        /// Print one JSON object instead of a Markdown table.
        #[arg(long)]
        json: bool,
    },
    /// Audio forwarding: P publishers → S subscribers, Opus-sized packets at 50 pkt/s, against
    /// Conclave, the raw sendto/sendmmsg/GSO limit and Janus VideoRoom.
    Audio {
        /// Publishers.
        #[arg(long, default_value_t = 10)]
        publishers: usize,
        /// Subscribers (receive only).
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Payload bytes per packet.
        #[arg(long, default_value_t = 80)]
        payload_bytes: usize,
        /// Common options.
        #[command(flatten)]
        common: crate::bench::scenario::CommonArgs,
    },
    /// Video conference: N participants each publish VP8-like frames and receive the N − 1
    /// others.
    Video {
        /// Participants (each publishes one video track).
        #[arg(long, default_value_t = 10)]
        participants: usize,
        /// Extra receive-only participants.
        #[arg(long, default_value_t = 0)]
        subscribers: usize,
        /// Bitrate per publisher, kbit/s.
        #[arg(long, default_value_t = 1000)]
        bitrate_kbps: u32,
        /// Frames per second.
        #[arg(long, default_value_t = 30)]
        fps: u32,
        /// Common options.
        #[command(flatten)]
        common: crate::bench::scenario::CommonArgs,
    },
    /// Livestream: one video publisher → S subscribers.
    Livestream {
        /// Subscribers (receive only).
        #[arg(long, default_value_t = 300)]
        subscribers: usize,
        /// Bitrate, kbit/s.
        #[arg(long, default_value_t = 1500)]
        bitrate_kbps: u32,
        /// Frames per second.
        #[arg(long, default_value_t = 30)]
        fps: u32,
        /// Common options.
        #[command(flatten)]
        common: crate::bench::scenario::CommonArgs,
    },
}
