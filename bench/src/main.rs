//! The `conclave-bench` binary: parse arguments, set up logging, run one benchmark, print its
//! report (Markdown, or one JSON object with `--json`), map errors to exit codes: 1 when a
//! benchmark could not run, 2 when the soak ran and found a leak or a dead server, or a
//! join-time probe failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use conclave_bench::jointime::{self, JoinTimeOptions};
use conclave_bench::scenario::{run_to_text, CommonArgs, Kind};
use conclave_bench::soak::{self, SoakOptions};
use conclave_bench::tokens::{self, TokenBenchOptions};
use conclave_bench::BenchError;

/// Conclave's benchmarks: loopback only, bounded in time. The server under test is the
/// `conclave` binary next to this one.
#[derive(Debug, Parser)]
#[command(name = "conclave-bench", version, about, long_about = None)]
struct Cli {
    /// Which benchmark.
    #[command(subcommand)]
    scenario: BenchCommand,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
enum BenchCommand {
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
        common: CommonArgs,
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
        common: CommonArgs,
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
        common: CommonArgs,
    },
    /// Soak: clients churn joins and leaves while appservice transactions toggle call
    /// memberships, for a bounded time; reports RSS drift, open fds and leaked rooms,
    /// participants and calls. Exits with 2 (after printing the report) if anything leaked or
    /// the server died.
    Soak {
        /// How long the load runs, seconds (a settle period of up to 45 s follows).
        #[arg(long, default_value_t = 60)]
        duration_secs: u64,
        /// Signalling clients churning in parallel.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Distinct rooms cycled through.
        #[arg(long, default_value_t = 20)]
        rooms: usize,
        /// Sampling interval, seconds.
        #[arg(long, default_value_t = 10.0)]
        sample_secs: f64,
        /// Print one JSON object instead of Markdown tables.
        #[arg(long)]
        json: bool,
    },
    /// Join time of the real LiveKit Python SDK (`tests/clients/lk_client.py`): start of
    /// `room.connect` → first remote audio and video frame, for signalling v1, v0 and v0 after
    /// the SDK's fallback from a 404 on `/rtc/v1`, side by side. Exits with 2 (after printing
    /// the report) if a probe failed.
    JoinTime {
        /// Measured probes per mode (modes take turns).
        #[arg(long, default_value_t = 10)]
        probes: usize,
        /// Unmeasured warm-up probes per mode before them.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// A probe's deadline, seconds.
        #[arg(long, default_value_t = 30.0)]
        probe_timeout: f64,
        /// Start no probe after this many seconds.
        #[arg(long, default_value_t = 900)]
        max_seconds: u64,
        /// The LiveKit Python SDK venv (from `scripts/install-test-deps`).
        #[arg(long, env = "CONCLAVE_LK_VENV")]
        lk_venv: Option<PathBuf>,
        /// The client script (default: `tests/clients/lk_client.py` of this checkout).
        #[arg(long)]
        client_script: Option<PathBuf>,
        /// The server binary (default: `conclave` next to this binary).
        #[arg(long)]
        server_exe: Option<PathBuf>,
        /// Publisher video width.
        #[arg(long, default_value_t = 320)]
        width: u32,
        /// Publisher video height.
        #[arg(long, default_value_t = 240)]
        height: u32,
        /// Publisher video frames per second.
        #[arg(long, default_value_t = 15)]
        fps: u32,
        /// Print one JSON object instead of Markdown tables.
        #[arg(long)]
        json: bool,
    },
}

/// A report as one JSON line (`--json`) or as its Markdown.
fn rendered<R: serde::Serialize>(
    report: &R,
    json: bool,
    markdown: impl FnOnce(&R) -> String,
) -> String {
    if json {
        format!("{}\n", serde_json::to_string(report).unwrap_or_default())
    } else {
        markdown(report)
    }
}

/// What a benchmark printed, and whether it found a failure it reports rather than errors on.
struct Outcome {
    /// The report.
    text: String,
    /// Why the run failed after reporting (exit code 2).
    failure: Option<String>,
}

impl From<String> for Outcome {
    fn from(text: String) -> Self {
        Self {
            text,
            failure: None,
        }
    }
}

impl BenchCommand {
    /// The subcommand's name, for error messages.
    fn name(&self) -> &'static str {
        match self {
            BenchCommand::Tokens { .. } => "tokens",
            BenchCommand::Audio { .. } => "audio",
            BenchCommand::Video { .. } => "video",
            BenchCommand::Livestream { .. } => "livestream",
            BenchCommand::Soak { .. } => "soak",
            BenchCommand::JoinTime { .. } => "join-time",
        }
    }
}

/// Runs the chosen benchmark and renders its report.
async fn run(scenario: BenchCommand) -> Result<Outcome, BenchError> {
    match scenario {
        BenchCommand::Tokens {
            requests,
            concurrency,
            max_seconds,
            json,
        } => {
            let report = tokens::run(TokenBenchOptions {
                requests,
                concurrency,
                max_duration: Duration::from_secs(max_seconds),
            })
            .await?;
            Ok(rendered(&report, json, |r| r.markdown()).into())
        }
        BenchCommand::Audio {
            publishers,
            subscribers,
            payload_bytes,
            common,
        } => {
            let opts = common.options(Kind::Audio, publishers, subscribers, payload_bytes, 0, 0);
            run_to_text(opts, common.json).await.map(Outcome::from)
        }
        BenchCommand::Video {
            participants,
            subscribers,
            bitrate_kbps,
            fps,
            common,
        } => {
            let opts = common.options(Kind::Video, participants, subscribers, 0, bitrate_kbps, fps);
            run_to_text(opts, common.json).await.map(Outcome::from)
        }
        BenchCommand::Livestream {
            subscribers,
            bitrate_kbps,
            fps,
            common,
        } => {
            let opts = common.options(Kind::Livestream, 1, subscribers, 0, bitrate_kbps, fps);
            run_to_text(opts, common.json).await.map(Outcome::from)
        }
        BenchCommand::Soak {
            duration_secs,
            concurrency,
            rooms,
            sample_secs,
            json,
        } => {
            let sample_interval = Duration::try_from_secs_f64(sample_secs)
                .map_err(|e| BenchError::Options(format!("--sample-secs {sample_secs}: {e}")))?;
            let report = soak::run(SoakOptions {
                duration: Duration::from_secs(duration_secs),
                concurrency,
                rooms,
                sample_interval,
            })
            .await?;
            Ok(Outcome {
                text: rendered(&report, json, |r| r.markdown()),
                failure: report.failure(),
            })
        }
        BenchCommand::JoinTime {
            probes,
            warmup,
            probe_timeout,
            max_seconds,
            lk_venv,
            client_script,
            server_exe,
            width,
            height,
            fps,
            json,
        } => {
            let probe_timeout = Duration::try_from_secs_f64(probe_timeout).map_err(|e| {
                BenchError::Options(format!("--probe-timeout {probe_timeout}: {e}"))
            })?;
            let report = jointime::run(JoinTimeOptions {
                probes,
                warmup,
                probe_timeout,
                max_duration: Duration::from_secs(max_seconds),
                lk_venv,
                client_script,
                server_exe,
                video: (width, height, fps),
            })
            .await?;
            Ok(Outcome {
                text: rendered(&report, json, |r| r.markdown()),
                failure: report.failure(),
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conclave-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let name = cli.scenario.name();
    let Outcome { text, failure } = match runtime.block_on(run(cli.scenario)) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("conclave-bench {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => match failure {
            None => ExitCode::SUCCESS,
            Some(why) => {
                eprintln!("conclave-bench {name}: {why}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("conclave-bench: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}
