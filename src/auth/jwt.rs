//! LiveKit access tokens: HS256 JWTs with a `video` grant, exactly as LiveKit servers and SDKs
//! expect (`livekit/protocol` `auth/`). Tokens minted by any LiveKit tool with the same key and
//! secret verify here, and ours verify there.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;

/// The `video` grant (`livekit.VideoGrant`, camelCase JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VideoGrant {
    /// Room the token is for.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub room: String,
    /// May join `room`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_join: bool,
    /// May create rooms (server API).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_create: bool,
    /// May list rooms (server API).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_list: bool,
    /// May administer `room` (server API).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_admin: bool,
    /// May publish tracks (absent means true in LiveKit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    /// May subscribe (absent means true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    /// May publish data (absent means true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish_data: Option<bool>,
    /// May update its own metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_update_own_metadata: Option<bool>,
    /// Hidden participant.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

/// LiveKit JWT claims.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// API key.
    pub iss: String,
    /// Participant identity.
    #[serde(default)]
    pub sub: String,
    /// Not before (Unix seconds).
    #[serde(default)]
    pub nbf: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Display name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Participant metadata.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metadata: String,
    /// Grants.
    #[serde(default)]
    pub video: VideoGrant,
}

impl Claims {
    /// Permissions from the token's grant, with LiveKit's defaults for absent keys.
    pub fn permission(&self) -> livekit_protocol::ParticipantPermission {
        let v = &self.video;
        let can_publish = v.can_publish.unwrap_or(true);
        livekit_protocol::ParticipantPermission {
            can_subscribe: v.can_subscribe.unwrap_or(true),
            can_publish,
            can_publish_data: v.can_publish_data.unwrap_or(can_publish),
            hidden: v.hidden,
            can_update_metadata: v.can_update_own_metadata.unwrap_or(false),
            ..Default::default()
        }
    }
}

/// Signs and verifies tokens with one key/secret pair.
#[derive(Clone)]
pub struct TokenSigner {
    key: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenSigner {
    /// A signer for API `key` with `secret`.
    pub fn new(key: &str, secret: &str) -> Self {
        Self {
            key: key.to_owned(),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// The API key (`iss`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Signs `claims` (HS256, `typ: JWT`).
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let header = Header::new(Algorithm::HS256);
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Internal(format!("signing JWT: {e}")))
    }

    /// Verifies signature, issuer, `exp` and `nbf` against `now` (Unix seconds, 10 s leeway).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Time is checked below against the injected clock, not the library's.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[&self.key]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let c = data.claims;
        const LEEWAY: u64 = 10;
        if c.exp + LEEWAY < now {
            return Err(AuthError::InvalidToken("token expired".into()));
        }
        if c.nbf > now + LEEWAY {
            return Err(AuthError::InvalidToken("token not valid yet".into()));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: u64) -> Claims {
        Claims {
            iss: "APIkey".into(),
            sub: "ident".into(),
            nbf: now,
            exp: now + 3600,
            name: String::new(),
            metadata: String::new(),
            video: VideoGrant {
                room: "room".into(),
                room_join: true,
                can_publish: Some(true),
                can_subscribe: Some(true),
                can_publish_data: Some(true),
                can_update_own_metadata: Some(true),
                ..VideoGrant::default()
            },
        }
    }

    #[test]
    fn round_trip_and_wire_shape() {
        let s = TokenSigner::new("APIkey", "0123456789abcdef0123456789abcdef");
        let jwt = s.sign(&claims(1000)).unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwt.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "HS256");
        assert_eq!(header["typ"], "JWT");
        let payload: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwt.split('.').nth(1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(payload["video"]["roomJoin"], true);
        assert_eq!(payload["video"]["canPublishData"], true);
        assert!(payload["video"].get("roomCreate").is_none());
        assert_eq!(s.verify(&jwt, 1000).unwrap(), claims(1000));
    }

    #[test]
    fn rejects_forged_expired_and_future_tokens() {
        let s = TokenSigner::new("APIkey", "0123456789abcdef0123456789abcdef");
        let other = TokenSigner::new("APIkey", "another-secret-another-secret-xx");
        let jwt = other.sign(&claims(1000)).unwrap();
        assert!(matches!(
            s.verify(&jwt, 1000),
            Err(AuthError::InvalidToken(_))
        ));
        let jwt = s.sign(&claims(1000)).unwrap();
        assert!(s.verify(&jwt, 1000 + 3600 + 11).is_err());
        assert!(s.verify(&jwt, 1000 - 11).is_err());
        let wrong_iss = TokenSigner::new("APIother", "0123456789abcdef0123456789abcdef");
        assert!(wrong_iss.verify(&jwt, 1000).is_err());
        assert!(s.verify("garbage", 1000).is_err());
    }
}
