//! Write requests performed at most once: what a `requestId` binds, where it is remembered,
//! and how a resend is told apart from a new request.
//!
//! A write request (`setName`, `sendPublic`, `sendPrivate`, `join`, `leave`) that carries a
//! `requestId` is recorded by a *request item* ([`crate::store::items::RequestItem`], keyed
//! as [`crate::keys`] documents) written **in the same transaction** as the event it produced,
//! on the condition that no live one exists. So a request whose transaction committed is
//! recorded, whether or not its sender heard back (a timeout, a 5xx, a dropped connection);
//! one whose transaction did not commit is not. A resend in the same scope finds the item and
//! is answered from it — the same ids as the first answer — and writes nothing; the same
//! `requestId` with another request is refused ([`StoreError::RequestIdReused`]).
//!
//! The scope is the identity when the connection is authenticated (a client that reconnects
//! resends from a new connection), else the connection. A refused request is not recorded:
//! it wrote nothing, so its resend is evaluated afresh.

use sha2::{Digest, Sha256};

use super::items::RequestItem;
use super::{epoch_secs, StoreError};
use crate::events::StoredEvent;
use crate::protocol::EventRef;

/// How long a request item is kept: a resend within it is performed at most once.
pub const REQUEST_RETENTION_SECS: i64 = 24 * 3600;

/// A write request with a `requestId`, as the store needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// The client's `requestId` (validated by the protocol: 1–64 safe ASCII characters).
    pub request_id: String,
    /// The request's action (`sendPublic`, …).
    pub action: String,
    /// A hash of the request (action and fields): a resend has the same.
    pub fingerprint: String,
}

impl RequestKey {
    /// The key of the request whose canonical form ([`crate::protocol::ClientRequest::canonical`])
    /// is `canonical`.
    pub fn new(request_id: &str, action: &str, canonical: &str) -> Self {
        let digest = Sha256::digest(canonical.as_bytes());
        let fingerprint = digest.iter().map(|b| format!("{b:02x}")).collect();
        RequestKey {
            request_id: request_id.to_owned(),
            action: action.to_owned(),
            fingerprint,
        }
    }

    /// The request item recording that this request produced `events` (and, for `setName`,
    /// set `name`), written at `now_ms` by `connection_id`.
    pub fn record(
        &self,
        connection_id: &str,
        name: Option<&str>,
        events: Vec<EventRef>,
        now_ms: i64,
    ) -> RequestItem {
        RequestItem {
            kind: crate::keys::REQUEST_TYPE.to_owned(),
            action: self.action.clone(),
            fingerprint: self.fingerprint.clone(),
            connection_id: connection_id.to_owned(),
            name: name.map(str::to_owned),
            events,
            ts: now_ms,
            expires_at: epoch_secs(now_ms) + REQUEST_RETENTION_SECS,
        }
    }

    /// What a live request item found in this key's scope means for this request: `Ok(item)`
    /// when it recorded this same request (a resend), [`StoreError::RequestIdReused`] when it
    /// recorded another.
    pub fn matches(&self, item: RequestItem) -> Result<RequestItem, StoreError> {
        if item.action == self.action && item.fingerprint == self.fingerprint {
            Ok(item)
        } else {
            Err(StoreError::RequestIdReused(self.request_id.clone()))
        }
    }
}

/// The scope a `requestId` is unique in: the identity when authenticated, else the connection.
/// The two kinds are prefixed so an identity can never collide with a connection id.
pub fn scope(connection_id: &str, identity: Option<&str>) -> String {
    match identity {
        Some(identity) => format!("identity#{identity}"),
        None => format!("conn#{connection_id}"),
    }
}

/// The events as a request item and an answer name them.
pub fn event_refs<'a>(events: impl IntoIterator<Item = &'a StoredEvent>) -> Vec<EventRef> {
    events
        .into_iter()
        .map(|e| EventRef {
            room: e.room.clone(),
            id: e.seq,
        })
        .collect()
}

/// What a write with a `requestId` did: performed now, or found already done (the first's
/// request item, from which the answer is given again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Once<T> {
    First(T),
    Again(RequestItem),
}

impl<T> Once<T> {
    /// The result of a write made without a `requestId`, which is always `First`.
    pub fn first(self) -> Result<T, StoreError> {
        match self {
            Once::First(t) => Ok(t),
            Once::Again(item) => Err(StoreError::Malformed(format!(
                "a write without a requestId was answered from the request item of a {}",
                item.action
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resend_matches_and_another_request_under_the_same_id_does_not() {
        // GIVEN a recorded sendPublic
        let key = RequestKey::new("r1", "sendPublic", r#"["sendPublic",["lobby","hi"]]"#);
        let item = key.record("c1", None, vec![], 1_000);
        // WHEN the same request comes again THEN it matches
        assert_eq!(key.matches(item.clone()).ok(), Some(item.clone()));
        // AND another message under the same id is refused
        let other = RequestKey::new("r1", "sendPublic", r#"["sendPublic",["lobby","ho"]]"#);
        assert!(matches!(
            other.matches(item.clone()),
            Err(StoreError::RequestIdReused(id)) if id == "r1"
        ));
        // AND so is another action with the same fields
        let join = RequestKey::new("r1", "join", r#"["sendPublic",["lobby","hi"]]"#);
        assert!(join.matches(item).is_err());
        // AND the fingerprint is a SHA-256 in hex, the item expires a day later
        assert_eq!(key.fingerprint.len(), 64);
        assert_eq!(
            key.record("c1", None, vec![], 1_000).expires_at,
            1 + 24 * 3600
        );
        // AND scopes of an identity and of a connection never collide
        assert_ne!(scope("x", Some("x")), scope("x", None));
    }
}
