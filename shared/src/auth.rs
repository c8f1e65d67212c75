//! Optional authentication at `$connect`: when a signing key is configured
//! (`AUTH_JWT_SECRET`), a connection must present a JWT signed with HMAC-SHA256 in the query
//! string (`?token=…`), with an `exp` in the future and a `sub`. The subject becomes the
//! connection's identity; names are then bound to identities (see `store`). Off by default,
//! so the tutorial client keeps working.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

/// The query-string parameter that carries the token.
pub const TOKEN_PARAMETER: &str = "token";

#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("Authenticator(HS256)")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token in the query string (?token=…)")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token has no subject")]
    NoSubject,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

impl Authenticator {
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        Authenticator {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The identity (the token's subject) if the token is valid.
    pub fn identity(&self, token: Option<&str>) -> Result<String, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        data.claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::NoSubject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct Token<'a> {
        sub: &'a str,
        exp: u64,
    }

    fn token(secret: &[u8], sub: &str, exp: u64) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &Token { sub, exp },
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    fn in_an_hour() -> u64 {
        (crate::now_ms() / 1000) as u64 + 3600
    }

    #[test]
    fn a_valid_token_gives_its_subject() {
        let auth = Authenticator::hs256(b"s3cret");
        assert_eq!(
            auth.identity(Some(&token(b"s3cret", "user-1", in_an_hour()))),
            Ok("user-1".into())
        );
    }

    #[test]
    fn missing_forged_expired_and_subjectless_tokens_are_refused() {
        let auth = Authenticator::hs256(b"s3cret");
        assert_eq!(auth.identity(None), Err(AuthError::Missing));
        assert_eq!(auth.identity(Some("")), Err(AuthError::Missing));
        assert!(matches!(
            auth.identity(Some("garbage")),
            Err(AuthError::Invalid(_))
        ));
        let forged = token(b"other key", "user-1", in_an_hour());
        assert!(matches!(
            auth.identity(Some(&forged)),
            Err(AuthError::Invalid(_))
        ));
        let expired = token(b"s3cret", "user-1", 1_000_000);
        assert!(matches!(
            auth.identity(Some(&expired)),
            Err(AuthError::Invalid(_))
        ));
        let empty_sub = token(b"s3cret", "", in_an_hour());
        assert_eq!(auth.identity(Some(&empty_sub)), Err(AuthError::NoSubject));
    }
}
