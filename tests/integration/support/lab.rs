//! The network lab: network namespaces joined by veth pairs, with bandwidth shaping and random
//! loss per client link, for tests of media quality on constrained links.
//!
//! # Topology
//!
//! ```text
//!   namespace <base>-sfu              <base>-r<i> (router)        <base>-c<i> (client)
//!  ┌────────────────────────────┐   ┌─────────────────────────┐  ┌───────────────────────┐
//!  │ lo 10.77.0.1/32 (the SFU)  │   │ forwarding on           │  │ lo 127.0.0.1          │
//!  │ c<i> 10.78.<i+1>.1/24 ─────┼───┼─ tosfu 10.78.<i+1>.2/24 │  │                       │
//!  │   nft input: uplink loss   │   │ tocli 10.77.<i+1>.1/24 ─┼──┼─ eth0 10.77.<i+1>.2/24│
//!  │ 10.77.<i+1>.0/24 via       │   │   egress: tbf (downlink)│  │   egress: tbf (uplink)│
//!  │   10.78.<i+1>.2            │   │ default via 10.78.<i+1>.1  │   nft input: downlink │
//!  └────────────────────────────┘   └─────────────────────────┘  │   loss; default via   │
//!                                                                 │   10.77.<i+1>.1       │
//!                                                                 └───────────────────────┘
//! ```
//!
//! Why a router: a queue on the SFU's own interface would hold the SFU socket's send buffer
//! (a packet waiting in a qdisc still counts against the socket that sent it), so shaping one
//! client's downlink there slowed the SFU's sends to every other client (an unshaped
//! subscriber's estimate fell with the shaped one's). On the way through a veth into another
//! namespace a packet leaves its socket's accounting, as it leaves a server's NIC for a
//! remote bottleneck in the field.
//!
//! The SFU (the real `conclave` binary, see `ConclaveOptions::in_lab`) runs in the SFU
//! namespace and listens on [`Lab::sfu_ip`]; each client runs in its own namespace
//! (`PyClientSpec::netns`, `BrowserSpec::netns`) and reaches the SFU through its router
//! (plain forwarding, no NAT); the SFU routes each client subnet via that client's router.
//! Every lab address lives inside lab namespaces; nothing is configured
//! in the root namespace (veth ends are created directly inside their namespaces), and no
//! test traffic leaves the lab.
//!
//! * Downlink (SFU → client i): shaped by a `tbf` qdisc on the router's `tocli` veth
//!   ([`Lab::shape_downlink`]), then random loss by an nftables rule on the client's input
//!   ([`Lab::set_downlink_loss`]): a slow last mile that also loses packets.
//! * Uplink (client i → SFU): `tbf` on the client's `eth0` ([`Lab::shape_uplink`]), loss on
//!   the SFU namespace's input from `c<i>` ([`Lab::set_uplink_loss`]).
//! * Loss is applied on *input* of the receiving namespace, never on output: an nftables
//!   drop on output makes the sender's `sendmsg` fail with `EPERM`, which a real link never
//!   does.
//! * Delay and jitter are **not** available: this machine's kernel has no `sch_netem`
//!   ("Specified qdisc kind is unknown") and no tc actions or classifiers, so the lab only
//!   offers what `tbf` (rate, burst, queue latency) and nftables (`numgen random`) can do.
//!   `tbf`'s queue does add queueing delay when a link is saturated, up to the shape's
//!   `latency_ms`.
//!
//! # Names and lifetime
//!
//! Namespaces are named `cclab-<pid>-<n>-sfu`, `cclab-<pid>-<n>-r<i>` and `cclab-<pid>-<n>-c<i>` (`n` counts labs in
//! this test process), so parallel tests and parallel test processes never collide.
//! [`Lab::new`] first deletes a stale lab of the same base name, and those of test processes
//! that are gone; dropping the [`Lab`] (also during a panic) kills what still runs inside
//! its namespaces and deletes them, which removes the veth pairs with them. Declare the lab
//! before the processes running in it, so they are dropped (killed) first.
//!
//! # Reaching the SFU from the test
//!
//! The test process stays in the root namespace, which has no route into the lab. HTTP
//! requests to the SFU (its readiness check, `/metrics`) are made by [`http_get`] from a
//! short-lived thread that entered the SFU namespace with `setns(2)` (a socket belongs to the
//! namespace its thread was in when it was created). Child processes are started with
//! `ip netns exec <ns> <program> …` ([`netns_command`]), which execs the program in place, so
//! its pid is the program's own.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), `ip` and `tc` (iproute2) and `nft` (nftables,
//! installed by `scripts/install-test-deps`). Errors name the failing command and its
//! stderr. See `docs/lab.md` for the same lab built by hand.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Prefix of every lab namespace name.
pub const PREFIX: &str = "cclab-";

/// The SFU's address, on `lo` of the SFU namespace.
pub const SFU_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// Most clients in one lab (client subnets are `10.77.1.0/24` to `10.77.250.0/24`).
pub const MAX_CLIENTS: usize = 250;

/// Name of the client-side veth end in every client namespace.
const CLIENT_IF: &str = "eth0";

/// The link [`Lab::move_client`] moves a client to: its router end, its client end.
const MOVED_ROUTER_IF: &str = "tocli2";
const MOVED_CLIENT_IF: &str = "eth1";

/// A router namespace's veth ends: towards the SFU, and towards its client.
const ROUTER_UP_IF: &str = "tosfu";
const ROUTER_DOWN_IF: &str = "tocli";

/// The nftables table the lab adds to a namespace (one per namespace).
const NFT_TABLE: &str = "cclab";
/// The chain of [`Lab::block_udp`] in a client namespace.
const NO_UDP_CHAIN: &str = "noudp";
/// The chains of [`Lab::cut`] in a client namespace.
const CUT_IN: &str = "cutin";
const CUT_OUT: &str = "cutout";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A `tbf` shape: rate, bucket size and queue limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Rate in kbit/s (1000 bit/s).
    pub rate_kbit: u32,
    /// Bucket size in bytes: how much may leave at line rate after an idle period. Must hold
    /// at least one full packet (1514 bytes).
    pub burst_bytes: u32,
    /// Queue limit as time: a packet that would wait longer than this behind the rate is
    /// dropped (tail drop, counted in [`LinkStats::shaper_dropped`]).
    pub latency_ms: u32,
}

impl Shape {
    /// `rate_kbit` with the lab's defaults: a bucket of 50 ms at that rate but at least
    /// 4 KiB (two full packets plus headroom), and a queue of 200 ms (a modest home-router
    /// buffer; a saturated link adds up to that much delay).
    pub fn kbit(rate_kbit: u32) -> Self {
        let per_50ms = u64::from(rate_kbit) * 1000 / 8 / 20;
        Self {
            rate_kbit,
            burst_bytes: u32::try_from(per_50ms.max(4096)).unwrap_or(u32::MAX),
            latency_ms: 200,
        }
    }

    /// A link that carries `rate_kbit` and nothing faster: a bucket of one full packet
    /// (1600 bytes), so even a short burst leaves at the rate, and the same 200 ms queue.
    /// Why: the default 4 KiB bucket passes a 15 ms bandwidth probe (a handful of packets) at
    /// line rate, and the SFU's estimator then measured 500–1000 kbit/s on a 300 kbit/s
    /// shape (a token-bucket policer does that to real probes too: `docs/quality.md`).
    pub fn link(rate_kbit: u32) -> Self {
        Self {
            rate_kbit,
            burst_bytes: 1600,
            latency_ms: 200,
        }
    }
}

/// Counters of one direction of a client link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// A `tbf` is installed on the sending end.
    pub shaped: bool,
    /// Packets the sending end's root qdisc sent (the tbf's, since it was last installed;
    /// 0 when unshaped: a veth's default `noqueue` counts nothing).
    pub shaper_sent_packets: u64,
    /// Bytes the root qdisc sent (as above).
    pub shaper_sent_bytes: u64,
    /// Packets the tbf dropped because its queue was full (over `latency_ms`).
    pub shaper_dropped: u64,
    /// Times the tbf held a packet back because the bucket was empty.
    pub shaper_overlimits: u64,
    /// Packets the sending veth end transmitted since the lab was made (`ip -s link`).
    pub link_tx_packets: u64,
    /// Bytes the sending veth end transmitted since the lab was made.
    pub link_tx_bytes: u64,
    /// Packets the loss rule dropped at the receiver since the loss was last set.
    pub loss_dropped_packets: u64,
    /// Bytes the loss rule dropped.
    pub loss_dropped_bytes: u64,
}

/// One network lab: an SFU namespace and `clients` client namespaces. Torn down on drop.
pub struct Lab {
    base: String,
    sfu_ns: String,
    /// Per client, the router namespace between the SFU and it (its last mile's queue).
    routers: Vec<String>,
    clients: Vec<String>,
    torn_down: bool,
}

impl Lab {
    /// Builds the SFU namespace and `clients` client namespaces with their links (see the
    /// module docs). Fails with a hint when not root or when a tool is missing.
    pub fn new(clients: usize) -> Result<Lab> {
        if clients > MAX_CLIENTS {
            bail!("a lab has at most {MAX_CLIENTS} clients, not {clients}");
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the network lab needs root (it creates network namespaces, veth pairs, \
                 tc qdiscs and nftables rules); run the lab tests as root"
            );
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        remove_stale(&base)?;
        let mut lab = Lab {
            sfu_ns: format!("{base}-sfu"),
            clients: (0..clients).map(|i| format!("{base}-c{i}")).collect(),
            routers: (0..clients).map(|i| format!("{base}-r{i}")).collect(),
            base,
            torn_down: false,
        };
        // On error the partly built lab is dropped, which deletes what exists.
        lab.build()
            .with_context(|| format!("building network lab {}", lab.base))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let sfu = self.sfu_ns.clone();
        ip(&["netns", "add", &sfu])?;
        ip(&["-n", &sfu, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &sfu,
            "addr",
            "add",
            &format!("{SFU_IP}/32"),
            "dev",
            "lo",
        ])?;
        for i in 0..self.clients.len() {
            let ns = self.clients[i].clone();
            let sfu_if = sfu_if(i);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let net = i + 1;
            let router = self.routers[i].clone();
            ip(&["netns", "add", &router])?;
            ip(&["-n", &router, "link", "set", "lo", "up"])?;
            // SFU ↔ router, then router ↔ client (the client's last mile). Both ends of each
            // pair are created inside their namespaces: no name in the root namespace.
            ip(&[
                "link",
                "add",
                &sfu_if,
                "netns",
                &sfu,
                "type",
                "veth",
                "peer",
                "name",
                ROUTER_UP_IF,
                "netns",
                &router,
            ])?;
            ip(&[
                "link",
                "add",
                ROUTER_DOWN_IF,
                "netns",
                &router,
                "type",
                "veth",
                "peer",
                "name",
                CLIENT_IF,
                "netns",
                &ns,
            ])?;
            for (space, dev, addr) in [
                (&sfu, sfu_if.as_str(), format!("10.78.{net}.1/24")),
                (&router, ROUTER_UP_IF, format!("10.78.{net}.2/24")),
                (&router, ROUTER_DOWN_IF, format!("10.77.{net}.1/24")),
                (&ns, CLIENT_IF, format!("10.77.{net}.2/24")),
            ] {
                ip(&["-n", space, "addr", "add", &addr, "dev", dev])?;
                ip(&["-n", space, "link", "set", dev, "up"])?;
            }
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &router,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
            ip(&[
                "-n",
                &router,
                "route",
                "add",
                "default",
                "via",
                &format!("10.78.{net}.1"),
            ])?;
            ip(&[
                "-n",
                &sfu,
                "route",
                "add",
                &format!("10.77.{net}.0/24"),
                "via",
                &format!("10.78.{net}.2"),
            ])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{net}.1"),
            ])?;
        }
        Ok(())
    }

    /// The base name (`cclab-<pid>-<n>`), the prefix of all its namespaces.
    pub fn name(&self) -> &str {
        &self.base
    }

    /// The SFU namespace.
    pub fn sfu_ns(&self) -> &str {
        &self.sfu_ns
    }

    /// The SFU's address (`10.77.0.1`), reachable from every client namespace.
    pub fn sfu_ip(&self) -> Ipv4Addr {
        SFU_IP
    }

    /// Number of client namespaces.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Client `i`'s namespace. Panics if `i` is out of range (a test bug).
    pub fn client_ns(&self, i: usize) -> &str {
        &self.clients[i]
    }

    /// Client `i`'s address (`10.77.<i+1>.2`).
    pub fn client_ip(&self, i: usize) -> Ipv4Addr {
        self.check(i);
        Ipv4Addr::new(10, 77, net_octet(i), 2)
    }

    /// The SFU-side veth end of client `i` (`c<i>`, in the SFU namespace).
    pub fn sfu_if(&self, i: usize) -> String {
        self.check(i);
        sfu_if(i)
    }

    /// Every namespace of this lab (the SFU's first).
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.sfu_ns.clone())
            .chain(self.clients.iter().cloned())
            .chain(self.routers.iter().cloned())
            .collect()
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.clients.len(),
            "client {i} out of range: lab {} has {} clients",
            self.base,
            self.clients.len()
        );
    }

    /// Shapes client `i`'s downlink (SFU → client) to `rate_kbit` with [`Shape::kbit`]'s
    /// bucket and queue. Replaces any earlier shape (and resets the tbf's counters).
    pub fn shape_downlink(&self, i: usize, rate_kbit: u32) -> Result<()> {
        self.shape_downlink_with(i, Shape::kbit(rate_kbit))
    }

    /// Shapes client `i`'s downlink with an explicit [`Shape`].
    pub fn shape_downlink_with(&self, i: usize, shape: Shape) -> Result<()> {
        self.check(i);
        set_tbf(&self.routers[i], ROUTER_DOWN_IF, shape)
    }

    /// Removes client `i`'s downlink shape (no-op when unshaped).
    pub fn unshape_downlink(&self, i: usize) -> Result<()> {
        self.check(i);
        del_root_qdisc(&self.routers[i], ROUTER_DOWN_IF)
    }

    /// Shapes client `i`'s uplink (client → SFU) to `rate_kbit` with [`Shape::kbit`]'s
    /// defaults.
    pub fn shape_uplink(&self, i: usize, rate_kbit: u32) -> Result<()> {
        self.shape_uplink_with(i, Shape::kbit(rate_kbit))
    }

    /// Shapes client `i`'s uplink with an explicit [`Shape`].
    pub fn shape_uplink_with(&self, i: usize, shape: Shape) -> Result<()> {
        self.check(i);
        set_tbf(&self.clients[i], CLIENT_IF, shape)
    }

    /// Removes client `i`'s uplink shape (no-op when unshaped).
    pub fn unshape_uplink(&self, i: usize) -> Result<()> {
        self.check(i);
        del_root_qdisc(&self.clients[i], CLIENT_IF)
    }

    /// Drops `percent` % of the packets client `i` receives from the SFU, at random and
    /// independently (Bernoulli loss, nftables `numgen random mod 100 < percent`), after the
    /// downlink shaper. 0 removes the loss (and its counter). At most 100.
    pub fn set_downlink_loss(&self, i: usize, percent: u32) -> Result<()> {
        self.check(i);
        set_loss(&self.clients[i], "down", CLIENT_IF, percent)
    }

    /// Drops `percent` % of the packets the SFU receives from client `i` (as
    /// [`Lab::set_downlink_loss`], on the SFU namespace's input from `c<i>`).
    pub fn set_uplink_loss(&self, i: usize, percent: u32) -> Result<()> {
        self.check(i);
        set_loss(&self.sfu_ns, &format!("up{i}"), &sfu_if(i), percent)
    }

    /// Drops every UDP packet client `i` sends (nftables, on its output), as a network that
    /// allows TCP only; `false` lets UDP through again.
    pub fn block_udp(&self, i: usize, blocked: bool) -> Result<()> {
        self.check(i);
        let mut script = format!(
            "table inet {NFT_TABLE} {{\n  chain {NO_UDP_CHAIN} {{\n    type filter hook output priority 0; policy accept;\n  }}\n}}\nflush chain inet {NFT_TABLE} {NO_UDP_CHAIN}\n"
        );
        if blocked {
            script.push_str(&format!(
                "add rule inet {NFT_TABLE} {NO_UDP_CHAIN} meta l4proto udp counter drop\n"
            ));
        }
        nft(&self.clients[i], &["-f", "-"], Some(&script)).map(|_| ())
    }

    /// Client `i`'s network lets only TCP to the SFU's `ports` out (as a corporate proxy
    /// that passes HTTPS and nothing else): every UDP packet, and TCP to any other port of
    /// the SFU's host, is dropped (nftables, on its output). [`Lab::udp_blocked_packets`]
    /// counts what was dropped.
    pub fn allow_only_tcp_to_sfu(&self, i: usize, ports: &[u16]) -> Result<()> {
        self.block_udp(i, true)?;
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let script = format!(
            "add rule inet {NFT_TABLE} {NO_UDP_CHAIN} ip daddr {SFU_IP} tcp dport != {{ {} }} counter drop\n",
            ports.join(", ")
        );
        nft(&self.clients[i], &["-f", "-"], Some(&script)).map(|_| ())
    }

    /// Moves client `i` to a new network, as a laptop going from Wi-Fi to 4G: a second link
    /// (`eth1`, address `10.76.<i+1>.2`, through the same router) comes up, then the old one
    /// (`eth0` and its address) is deleted and the default route goes over the new one. The
    /// client's sockets bound to the old address are left with no way out. Shaping, loss and
    /// [`Lab::cut`] rules named the old link do not follow it. Returns the new address.
    pub fn move_client(&self, i: usize) -> Result<Ipv4Addr> {
        self.check(i);
        let (ns, router, sfu) = (&self.clients[i], &self.routers[i], &self.sfu_ns);
        let net = net_octet(i);
        let new_ip = Ipv4Addr::new(10, 76, net, 2);
        ip(&[
            "link",
            "add",
            MOVED_ROUTER_IF,
            "netns",
            router,
            "type",
            "veth",
            "peer",
            "name",
            MOVED_CLIENT_IF,
            "netns",
            ns,
        ])?;
        for (space, dev, addr) in [
            (router, MOVED_ROUTER_IF, format!("10.76.{net}.1/24")),
            (ns, MOVED_CLIENT_IF, format!("{new_ip}/24")),
        ] {
            ip(&["-n", space, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", space, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            sfu,
            "route",
            "add",
            &format!("10.76.{net}.0/24"),
            "via",
            &format!("10.78.{net}.2"),
        ])?;
        ip(&["-n", ns, "link", "del", CLIENT_IF])?;
        ip(&[
            "-n",
            ns,
            "route",
            "replace",
            "default",
            "via",
            &format!("10.76.{net}.1"),
        ])?;
        Ok(new_ip)
    }

    /// Cuts client `i`'s link both ways (every packet in and out of its interface is dropped,
    /// as a Wi-Fi that drops out), or restores it: its sockets and connections stay as they
    /// are, only nothing passes.
    pub fn cut(&self, i: usize, cut: bool) -> Result<()> {
        self.check(i);
        let mut script = String::new();
        for (chain, hook, dir) in [(CUT_IN, "input", "iifname"), (CUT_OUT, "output", "oifname")] {
            script.push_str(&format!(
                "table inet {NFT_TABLE} {{\n  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n  }}\n}}\nflush chain inet {NFT_TABLE} {chain}\n"
            ));
            if cut {
                script.push_str(&format!(
                    "add rule inet {NFT_TABLE} {chain} {dir} \"{CLIENT_IF}\" counter drop\n"
                ));
            }
        }
        nft(&self.clients[i], &["-f", "-"], Some(&script)).map(|_| ())
    }

    /// Packets dropped by the cut in force on client `i`'s link: (received, sent); restoring
    /// the link resets them.
    pub fn cut_packets(&self, i: usize) -> Result<(u64, u64)> {
        self.check(i);
        let (inbound, _) = loss_counter(&self.clients[i], CUT_IN)?;
        let (outbound, _) = loss_counter(&self.clients[i], CUT_OUT)?;
        Ok((inbound, outbound))
    }

    /// Packets client `i` tried to send while [`Lab::block_udp`] (or
    /// [`Lab::allow_only_tcp_to_sfu`]) dropped them.
    pub fn udp_blocked_packets(&self, i: usize) -> Result<u64> {
        self.check(i);
        loss_counter(&self.clients[i], NO_UDP_CHAIN).map(|(packets, _)| packets)
    }

    /// Counters of client `i`'s downlink: the SFU-side tbf and veth, the client's loss rule.
    pub fn downlink_stats(&self, i: usize) -> Result<LinkStats> {
        self.check(i);
        link_stats(&self.routers[i], ROUTER_DOWN_IF, &self.clients[i], "down")
    }

    /// Counters of client `i`'s uplink: the client-side tbf and veth, the SFU's loss rule.
    pub fn uplink_stats(&self, i: usize) -> Result<LinkStats> {
        self.check(i);
        link_stats(&self.clients[i], CLIENT_IF, &self.sfu_ns, &format!("up{i}"))
    }

    /// Kills what still runs in the lab's namespaces and deletes them (their veth pairs go
    /// with them). Idempotent; also done on drop.
    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let existing = list_namespaces()?;
        let mut errors = Vec::new();
        for ns in self.namespaces() {
            if existing.contains(&ns) {
                if let Err(e) = delete_namespace(&ns) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        if !errors.is_empty() {
            bail!("tearing down lab {}: {}", self.base, errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("network lab: {e:#}");
        }
    }
}

fn net_octet(i: usize) -> u8 {
    u8::try_from(i + 1).unwrap_or(u8::MAX)
}

fn sfu_if(i: usize) -> String {
    format!("c{i}")
}

// ---------------------------------------------------------------- running commands

/// Runs `program args…`; its stdout on success, else an error with the command, exit
/// status, stderr and a hint.
fn run(program: &str, args: &[&str]) -> Result<String> {
    run_stdin(program, args, None)
}

fn run_stdin(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let line = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|e| {
        let hint = match program {
            "nft" => "install nftables (scripts/install-test-deps does: apt-get install nftables)",
            _ => "install iproute2 (apt-get install iproute2)",
        };
        anyhow!("cannot run `{line}`: {e}; {hint}")
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing the input of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("Operation not permitted") {
            " (the lab needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        } else if stderr.contains("exec of \"nft\" failed") {
            " (nft is missing: install nftables; scripts/install-test-deps does)"
        } else if stderr.contains("Specified qdisc kind is unknown") {
            " (this kernel lacks that qdisc; the lab uses only tbf)"
        } else {
            ""
        };
        bail!(
            "`{line}` failed ({}): {}{hint}{}",
            out.status,
            stderr.trim(),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Runs `nft` inside `ns`.
fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, "nft"];
    full.extend_from_slice(args);
    run_stdin("ip", &full, stdin)
}

/// `ip netns exec <ns> <program>`: a command that runs `program` inside the namespace `ns`
/// (`ip` execs it in place: the child's pid is the program's). Add arguments and spawn it
/// as usual.
pub fn netns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Like [`netns_command`], a `std::process::Command`.
pub fn netns_std_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

// ---------------------------------------------------------------- namespaces

/// The names of all network namespaces (`ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The lab namespaces that exist now (any test process's).
pub fn lab_namespaces() -> Result<Vec<String>> {
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect())
}

/// Deletes the namespaces of a stale lab named `base` and those of lab-using test processes
/// that no longer run.
fn remove_stale(base: &str) -> Result<()> {
    for ns in lab_namespaces()? {
        let same = ns.starts_with(&format!("{base}-"));
        let owner_gone = ns
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if same || owner_gone {
            delete_namespace(&ns).with_context(|| format!("removing stale lab namespace {ns}"))?;
        }
    }
    Ok(())
}

/// Kills the processes left in `ns` (started by the test inside its own lab) and deletes it.
fn delete_namespace(ns: &str) -> Result<()> {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    ip(&["netns", "delete", ns]).map(|_| ())
}

/// Runs `f` on a new thread that entered the network namespace `ns` (sockets it creates
/// belong to `ns`), and returns its result.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path)
        .with_context(|| format!("opening {path} (does namespace {ns} exist?)"))?;
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd changes only this thread's network
            // namespace; the thread ends after `f`, so no other code runs in it.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!(
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .context("spawning a thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("the thread in namespace {ns} panicked"))?
}

/// A blocking HTTP/1.0 `GET path` to `addr` from inside namespace `ns`: status and body.
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    http_get_with(ns, addr, path, None, timeout)
}

/// [`http_get`] with `Authorization: Bearer <bearer>` when given.
pub fn http_get_with(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let owned = path.to_owned();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    in_netns(ns, move || -> Result<(u16, String)> {
        let path = owned;
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status in {head:?}"))?;
        Ok((status, body.to_owned()))
    })?
    .with_context(|| format!("GET http://{addr}{path} from namespace {ns}"))
}

// ---------------------------------------------------------------- tc and nft

fn set_tbf(ns: &str, dev: &str, shape: Shape) -> Result<()> {
    if shape.rate_kbit == 0 {
        bail!("a shape needs a rate above 0 kbit/s");
    }
    run(
        "tc",
        &[
            "-n",
            ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &format!("{}kbit", shape.rate_kbit),
            "burst",
            &shape.burst_bytes.max(1600).to_string(),
            "latency",
            &format!("{}ms", shape.latency_ms),
        ],
    )
    .map(|_| ())
}

/// The root qdisc of `dev` in `ns` as `tc -s -j` reports it.
fn root_qdisc(ns: &str, dev: &str) -> Result<Value> {
    let out = run("tc", &["-n", ns, "-s", "-j", "qdisc", "show", "dev", dev])?;
    let all: Value =
        serde_json::from_str(&out).with_context(|| format!("parsing tc's JSON: {out}"))?;
    Ok(all
        .as_array()
        .and_then(|qs| {
            qs.iter()
                .find(|q| q.get("root").and_then(Value::as_bool) == Some(true))
        })
        .cloned()
        .unwrap_or(Value::Null))
}

fn del_root_qdisc(ns: &str, dev: &str) -> Result<()> {
    if root_qdisc(ns, dev)?.get("kind").and_then(Value::as_str) == Some("tbf") {
        run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"])?;
    }
    Ok(())
}

/// One nft table per namespace, one input chain per loss rule: setting flushes and refills
/// that chain.
fn set_loss(ns: &str, chain: &str, iif: &str, percent: u32) -> Result<()> {
    if percent > 100 {
        bail!("loss is a percentage (0 to 100), not {percent}");
    }
    let mut script = format!(
        "table inet {NFT_TABLE} {{\n  chain {chain} {{\n    type filter hook input priority 0; policy accept;\n  }}\n}}\nflush chain inet {NFT_TABLE} {chain}\n"
    );
    if percent > 0 {
        script.push_str(&format!(
            "add rule inet {NFT_TABLE} {chain} iifname \"{iif}\" numgen random mod 100 < {percent} counter drop\n"
        ));
    }
    nft(ns, &["-f", "-"], Some(&script)).map(|_| ())
}

/// `(packets, bytes)` of the counter in `chain` of the lab's table in `ns`; zeros without one.
fn loss_counter(ns: &str, chain: &str) -> Result<(u64, u64)> {
    let tables = nft(ns, &["-j", "list", "tables"], None)?;
    if !tables.contains(&format!("\"name\": \"{NFT_TABLE}\""))
        && !tables.contains(&format!("\"name\":\"{NFT_TABLE}\""))
    {
        return Ok((0, 0));
    }
    let out = match nft(ns, &["-j", "list", "chain", "inet", NFT_TABLE, chain], None) {
        Ok(out) => out,
        // No such chain: that loss was never set.
        Err(_) => return Ok((0, 0)),
    };
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("parsing nft's JSON: {out}"))?;
    let mut total = (0, 0);
    for item in v["nftables"].as_array().into_iter().flatten() {
        for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
            if let Some(c) = expr.get("counter") {
                total.0 += c["packets"].as_u64().unwrap_or(0);
                total.1 += c["bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

fn link_stats(send_ns: &str, send_dev: &str, recv_ns: &str, chain: &str) -> Result<LinkStats> {
    let q = root_qdisc(send_ns, send_dev)?;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let link = ip(&["-n", send_ns, "-s", "-j", "link", "show", "dev", send_dev])?;
    let link: Value =
        serde_json::from_str(&link).with_context(|| format!("parsing ip's JSON: {link}"))?;
    let tx = &link[0]["stats64"]["tx"];
    let (loss_packets, loss_bytes) = loss_counter(recv_ns, chain)?;
    Ok(LinkStats {
        shaped: q.get("kind").and_then(Value::as_str) == Some("tbf"),
        shaper_sent_packets: num(&q, "packets"),
        shaper_sent_bytes: num(&q, "bytes"),
        shaper_dropped: num(&q, "drops"),
        shaper_overlimits: num(&q, "overlimits"),
        link_tx_packets: num(tx, "packets"),
        link_tx_bytes: num(tx, "bytes"),
        loss_dropped_packets: loss_packets,
        loss_dropped_bytes: loss_bytes,
    })
}
