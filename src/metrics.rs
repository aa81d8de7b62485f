//! Process-wide counters exported at `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters. Cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Appservice transactions applied.
    pub transactions_applied: AtomicU64,
    /// Appservice transactions received again after being applied (acknowledged, no effect).
    pub transactions_replayed: AtomicU64,
    /// Transactions refused (auth, size, JSON, store failure).
    pub transactions_rejected: AtomicU64,
    /// Events received in transactions.
    pub events_received: AtomicU64,
    /// Events skipped because they could not be parsed.
    pub events_malformed: AtomicU64,
    /// `POST /_matrix/app/v1/ping` calls received from the homeserver.
    pub pings_received: AtomicU64,
    /// Successful ping round trips Conclave started (`/_matrix/client/v1/appservice/{id}/ping`).
    pub homeserver_pings_ok: AtomicU64,
    /// Failed ping attempts towards the homeserver.
    pub homeserver_pings_failed: AtomicU64,
    /// Requests answered with a 5xx status that is Conclave's own failure.
    pub internal_errors: AtomicU64,
    /// Requests answered 502/504 because another server (a homeserver) failed.
    pub upstream_errors: AtomicU64,
    /// SFU tokens issued.
    pub tokens_issued: AtomicU64,
    /// Token requests refused.
    pub tokens_refused: AtomicU64,
    /// Token endpoint requests refused by a rate limit (429; also counted as refused when
    /// they asked for a token).
    pub tokens_rate_limited: AtomicU64,
    /// HTTP connections refused because every slot was taken (caps and reserved slots).
    pub http_connections_refused: AtomicU64,
    /// HTTP connections served on a reserved slot (caps reached).
    pub http_connections_reserved: AtomicU64,
    /// HTTP connections closed by the header, idle or WebSocket-handshake timeout.
    pub http_connection_timeouts: AtomicU64,
    /// Signalling sessions accepted on v0 (`/rtc`, two peer connections).
    pub signal_sessions_v0: AtomicU64,
    /// Signalling sessions accepted on v1 (`/rtc/v1`, one peer connection).
    pub signal_sessions_v1: AtomicU64,
    /// Participants resumed on a new signalling connection (same SID, nobody saw a leave).
    pub signal_resumes: AtomicU64,
    /// Signalling WebSockets open now (gauge; a graceful shutdown waits for it to reach 0).
    pub signal_sessions_open: AtomicU64,
    /// Relay grants issued to peer Conclaves (`docs/cascade.md`).
    pub cascade_relays_granted: AtomicU64,
    /// Relay grant requests refused.
    pub cascade_relays_refused: AtomicU64,
    /// Relays cut because Matrix says the peer's server no longer belongs in the room.
    pub cascade_relays_cut: AtomicU64,
    /// Token requests of peers' users answered with their own Conclave's mirror.
    pub cascade_mirrored: AtomicU64,
    /// Token requests of peers' users answered directly because their Conclave failed,
    /// refused or was too slow (the log says why).
    pub cascade_fallbacks: AtomicU64,
    /// WHIP sessions created (`docs/bridges.md`).
    pub whip_sessions: AtomicU64,
    /// WHEP sessions created.
    pub whep_sessions: AtomicU64,
    /// WHIP and WHEP requests refused (4xx).
    pub bridge_refused: AtomicU64,
}

/// Increments a counter by one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Renders every counter in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 24] = [
            (
                "conclave_appservice_transactions_applied_total",
                "Appservice transactions applied.",
                &self.transactions_applied,
            ),
            (
                "conclave_appservice_transactions_replayed_total",
                "Appservice transactions received again and acknowledged without effect.",
                &self.transactions_replayed,
            ),
            (
                "conclave_appservice_transactions_rejected_total",
                "Appservice transactions refused.",
                &self.transactions_rejected,
            ),
            (
                "conclave_appservice_events_received_total",
                "Events received in appservice transactions.",
                &self.events_received,
            ),
            (
                "conclave_appservice_events_malformed_total",
                "Events skipped because they could not be parsed.",
                &self.events_malformed,
            ),
            (
                "conclave_appservice_pings_received_total",
                "Pings received from the homeserver.",
                &self.pings_received,
            ),
            (
                "conclave_homeserver_pings_ok_total",
                "Successful appservice ping round trips through the homeserver.",
                &self.homeserver_pings_ok,
            ),
            (
                "conclave_homeserver_pings_failed_total",
                "Failed appservice ping attempts.",
                &self.homeserver_pings_failed,
            ),
            (
                "conclave_http_internal_errors_total",
                "HTTP requests answered with a 5xx status because Conclave failed.",
                &self.internal_errors,
            ),
            (
                "conclave_http_upstream_errors_total",
                "HTTP requests answered 502/504 because another server (a homeserver) failed.",
                &self.upstream_errors,
            ),
            (
                "conclave_http_connections_refused_total",
                "HTTP connections refused because the connection caps and reserved slots were full.",
                &self.http_connections_refused,
            ),
            (
                "conclave_http_connections_reserved_total",
                "HTTP connections served on a reserved slot (healthz and appservice API only).",
                &self.http_connections_reserved,
            ),
            (
                "conclave_http_connection_timeouts_total",
                "HTTP connections closed by the header, idle or WebSocket-handshake timeout.",
                &self.http_connection_timeouts,
            ),
            (
                "conclave_tokens_issued_total",
                "SFU tokens issued.",
                &self.tokens_issued,
            ),
            (
                "conclave_tokens_refused_total",
                "SFU token requests refused.",
                &self.tokens_refused,
            ),
            (
                "conclave_cascade_relays_granted_total",
                "Relay grants issued to peer Conclaves.",
                &self.cascade_relays_granted,
            ),
            (
                "conclave_cascade_relays_refused_total",
                "Relay grant requests of (would-be) peer Conclaves refused.",
                &self.cascade_relays_refused,
            ),
            (
                "conclave_cascade_relays_cut_total",
                "Relays cut because the peer's server no longer belongs in the room.",
                &self.cascade_relays_cut,
            ),
            (
                "conclave_cascade_mirrored_total",
                "Token requests of peers' users answered with their own Conclave's mirror.",
                &self.cascade_mirrored,
            ),
            (
                "conclave_cascade_fallbacks_total",
                "Token requests of peers' users answered directly: their Conclave failed or refused.",
                &self.cascade_fallbacks,
            ),
            (
                "conclave_whip_sessions_total",
                "WHIP sessions created (media pushed into a room over WHIP).",
                &self.whip_sessions,
            ),
            (
                "conclave_whep_sessions_total",
                "WHEP sessions created (a participant's media played out over WHEP).",
                &self.whep_sessions,
            ),
            (
                "conclave_bridge_refused_total",
                "WHIP and WHEP requests refused (4xx).",
                &self.bridge_refused,
            ),
            (
                "conclave_tokens_rate_limited_total",
                "Token endpoint requests refused by a rate limit (429).",
                &self.tokens_rate_limited,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "conclave_signal_sessions_open";
        let _ = writeln!(
            out,
            "# HELP {name} Signalling WebSockets open now.\n# TYPE {name} gauge\n{name} {}",
            self.signal_sessions_open.load(Ordering::Relaxed)
        );
        let name = "conclave_signal_resumes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Participants resumed on a new signalling connection (same participant, no rejoin).\n# TYPE {name} counter\n{name} {}",
            self.signal_resumes.load(Ordering::Relaxed)
        );
        let name = "conclave_signal_sessions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Signalling sessions accepted (joined), by signalling version."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (signalling, value) in [
            ("v0", &self.signal_sessions_v0),
            ("v1", &self.signal_sessions_v1),
        ] {
            let _ = writeln!(
                out,
                "{name}{{signalling=\"{signalling}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        inc(&m.transactions_applied);
        inc(&m.transactions_applied);
        let text = m.render();
        assert!(text.contains("conclave_appservice_transactions_applied_total 2\n"));
        assert!(text.contains("# TYPE conclave_homeserver_pings_ok_total counter"));
        inc(&m.signal_sessions_v1);
        let text = m.render();
        assert!(text.contains("conclave_signal_sessions_total{signalling=\"v0\"} 0\n"));
        assert!(text.contains("conclave_signal_sessions_total{signalling=\"v1\"} 1\n"));
        assert_eq!(
            text.matches("# TYPE conclave_signal_sessions_total")
                .count(),
            1
        );
    }
}
