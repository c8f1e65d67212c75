//! The connections table's items as stored: one definition of each shape, read by the
//! DynamoDB adapter and by `chat-replay rebuild` (the embedded store keeps the same facts in
//! its own in-memory form). [`crate::keys`] documents every key and attribute.

use serde::{Deserialize, Serialize};

/// A connection (`CONN#<connectionId>` / `CONN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnItem {
    pub connection_id: String,
    pub connected_at: i64,
    /// TTL, epoch seconds.
    pub expires_at: i64,
    /// Set once the connection has joined, always with `name_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_key: Option<String>,
    /// The rate-limit bucket: thousandths of a token, and when it was last updated (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_at: Option<i64>,
    /// The authenticated subject, when `$connect` authentication is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The rooms it is a member of, each with the member shard its item is in.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rooms: std::collections::BTreeMap<String, u32>,
}

/// A name claim (`NAME#<nameKey>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimItem {
    /// The holder; `None` once released by an authenticated holder: the name is then a
    /// reservation for `identity` until `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// The holder's identity, when authenticated (always set on a reservation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The name as shown (kept for operators; nothing reads it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TTL, epoch seconds.
    pub expires_at: i64,
}

impl ClaimItem {
    /// Whether this is an identity's reservation rather than a connection's claim.
    pub fn is_reservation(&self) -> bool {
        self.connection_id.is_none()
    }
}

/// The room's sequence counter (`SEQ`, layout 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqItem {
    pub seq: u64,
}

/// The room's counter (events table, `ROOM#<room>` / `seq = 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterItem {
    #[serde(default)]
    pub last: u64,
    #[serde(default)]
    pub members: u64,
    #[serde(default)]
    pub shards: Option<u32>,
}

/// A member of a room (`MEMBERS#<room>#<shard>` / `<connectionId>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberItem {
    pub connection_id: String,
    pub name: String,
    #[serde(default)]
    pub expires_at: i64,
}
