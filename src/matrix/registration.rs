//! The appservice registration file (`appservice.yaml`) Synapse loads from
//! `app_service_config_files`.

use serde::Serialize;

use crate::config::Config;
use crate::secrets::Secrets;

/// One namespace entry.
#[derive(Debug, Serialize)]
pub struct Namespace {
    /// Whether only this appservice may use matching IDs.
    pub exclusive: bool,
    /// Regular expression over full IDs.
    pub regex: String,
}

/// The `namespaces` block.
#[derive(Debug, Serialize)]
pub struct Namespaces {
    /// Users Conclave owns.
    pub users: Vec<Namespace>,
    /// Aliases Conclave owns (none).
    pub aliases: Vec<Namespace>,
    /// Rooms whose events Conclave wants (all: it follows memberships of every room).
    pub rooms: Vec<Namespace>,
}

/// A Synapse-ready registration.
#[derive(Debug, Serialize)]
pub struct Registration {
    /// Registration id.
    pub id: String,
    /// Where the homeserver reaches Conclave.
    pub url: String,
    /// Conclave → homeserver token.
    pub as_token: String,
    /// Homeserver → Conclave token.
    pub hs_token: String,
    /// The bot's localpart.
    pub sender_localpart: String,
    /// Namespaces.
    pub namespaces: Namespaces,
    /// Conclave's own users are not rate limited.
    pub rate_limited: bool,
    /// MSC2409 ephemeral events (stable name).
    pub receive_ephemeral: bool,
    /// MSC2409 ephemeral events (unstable name, still read by Synapse).
    #[serde(rename = "de.sorunome.msc2409.push_ephemeral")]
    pub push_ephemeral_unstable: bool,
    /// MSC4512: the client and federation API paths the homeserver forwards to Conclave
    /// (`/_matrix/{client,federation}/<version>/rtc/livekit/…`; Synapse's `msc4512_enabled`).
    #[serde(rename = "io.element.msc4512.proxy_prefix")]
    pub proxy_prefix: String,
    /// MSC4512: where the homeserver forwards them (the same path under this URL).
    #[serde(rename = "io.element.msc4512.proxy_url")]
    pub proxy_url: String,
    /// MSC4502: the scopes granted to Conclave (asking whether a user is joined to a room).
    #[serde(rename = "io.element.msc4502.scopes")]
    pub scopes: Vec<String>,
}

/// The path prefix Conclave claims under MSC4512 (the only one Synapse allows).
pub const PROXY_PREFIX: &str = "rtc/livekit";

/// The MSC4502 scope of `GET …/rooms/{roomId}/is_joined`.
pub const IS_JOINED_SCOPE: &str = "urn:matrix:client:io.element.msc4502:rooms:is_joined";

/// Escapes regex metacharacters in a literal.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Registration {
    /// The registration for `config`, with the tokens of `secrets`, reachable at `url`.
    pub fn new(config: &Config, secrets: &Secrets, url: &str) -> Self {
        let server = regex_escape(config.matrix.server_name.as_str());
        let url = url.trim_end_matches('/').to_owned();
        Self {
            id: config.appservice.id.clone(),
            url: url.clone(),
            as_token: secrets.as_token.expose().to_owned(),
            hs_token: secrets.hs_token.expose().to_owned(),
            sender_localpart: config.appservice.sender_localpart.clone(),
            namespaces: Namespaces {
                users: vec![Namespace {
                    exclusive: true,
                    regex: format!(
                        "@{}.*:{server}",
                        regex_escape(&config.appservice.user_prefix)
                    ),
                }],
                aliases: Vec::new(),
                rooms: vec![Namespace {
                    exclusive: false,
                    regex: "!.*".to_owned(),
                }],
            },
            rate_limited: false,
            receive_ephemeral: true,
            push_ephemeral_unstable: true,
            proxy_prefix: PROXY_PREFIX.to_owned(),
            proxy_url: url,
            scopes: vec![IS_JOINED_SCOPE.to_owned()],
        }
    }

    /// YAML text with a header comment.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let body = serde_yaml::to_string(self)?;
        Ok(format!(
            "# Conclave appservice registration. Add this file to Synapse's\n\
             # app_service_config_files and restart Synapse. Contains secrets: keep private.\n{body}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn registration_has_synapse_fields() {
        let mut config = Config::default();
        config.matrix.server_name = "min.example.gouv.fr".try_into().expect("name");
        let secrets = Secrets {
            as_token: Secret::new("AS"),
            hs_token: Secret::new("HS"),
            livekit_key: "K".into(),
            livekit_secret: Secret::new("S"),
        };
        let yaml = Registration::new(&config, &secrets, "http://127.0.0.1:8080/")
            .to_yaml()
            .expect("yaml");
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("parse");
        assert_eq!(v["id"], "conclave");
        assert_eq!(v["url"], "http://127.0.0.1:8080");
        assert_eq!(v["as_token"], "AS");
        assert_eq!(v["hs_token"], "HS");
        assert_eq!(v["rate_limited"], false);
        assert_eq!(v["receive_ephemeral"], true);
        assert_eq!(
            v["namespaces"]["users"][0]["regex"],
            "@_conclave_.*:min\\.example\\.gouv\\.fr"
        );
        assert_eq!(v["namespaces"]["users"][0]["exclusive"], true);
        assert_eq!(v["io.element.msc4512.proxy_prefix"], "rtc/livekit");
        assert_eq!(v["io.element.msc4512.proxy_url"], "http://127.0.0.1:8080");
        assert_eq!(v["io.element.msc4502.scopes"][0], IS_JOINED_SCOPE);
    }
}
