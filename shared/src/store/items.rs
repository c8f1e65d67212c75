//! The items of layout 2 as stored: one serde definition of each shape, written and read by
//! the DynamoDB adapter and read by `chat-replay` (the embedded store keeps the same facts in
//! its own in-memory form). [`crate::keys`] documents every key and attribute; the key
//! attributes (`pk`, `sk`/`seq`) are not part of these shapes, the adapter adds them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::protocol::EventRef;

/// A connection (`CONN#<connectionId>` / `CONN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnItem {
    pub connection_id: String,
    pub connected_at: i64,
    /// TTL, epoch seconds.
    pub expires_at: i64,
    /// Set once the connection has set a name, always with `name_key`.
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
    /// The rooms it is a member of, each with the member shard its member item is in. Written
    /// as an empty map at `$connect` (an update can only set `rooms.<room>` in a map that
    /// exists); `None` only on an item written before layout 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<BTreeMap<String, u32>>,
    /// The old name while a rename is not yet recorded in every room it is in (`renaming`):
    /// some member items may still have it, and the next `setName` finishes the rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renaming: Option<String>,
    /// Whom the connection's requests and its connection slot count against
    /// (`crate::ratelimit`): `id:<identity>` or `ip:<source IP>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Set when the connection opted in to batched frames at `$connect` (`?batch=1`); absent
    /// means false. Copied to every member item it writes, where the fan-out reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<bool>,
}

impl ConnItem {
    /// The rooms it is a member of, in name order.
    pub fn room_names(&self) -> Vec<String> {
        self.rooms
            .as_ref()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The member shard of `room`, if it is a member.
    pub fn shard_in(&self, room: &str) -> Option<u32> {
        self.rooms.as_ref().and_then(|r| r.get(room).copied())
    }
}

/// A name claim (`NAME#<nameKey>` / `NAME`).
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

/// A member of a room (`MEMBERS#<room>#<shard>` / `<connectionId>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberItem {
    pub connection_id: String,
    pub name: String,
    /// TTL, epoch seconds: the connection's expiry plus [`keys::MEMBER_TTL_GRACE_SECS`], so
    /// DynamoDB's TTL deletes the member item only well after the connection item, whose TTL
    /// deletion leaves the room by it (see [`crate::keys`], *TTL expiry*).
    pub expires_at: i64,
    /// The connection's `batch` opt-in (absent: false), read by the fan-out with the member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<bool>,
    /// Epoch seconds: the connection's expiry, after which every read treats the member as
    /// absent. `None` on an item written before the grace existed: `expires_at` is then the
    /// connection's expiry ([`Self::live_until`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_until: Option<i64>,
}

impl MemberItem {
    /// The member item of a connection that expires at `conn_expires_at` (epoch seconds).
    pub fn new(connection_id: String, name: String, conn_expires_at: i64) -> Self {
        MemberItem {
            connection_id,
            name,
            expires_at: conn_expires_at.saturating_add(keys::MEMBER_TTL_GRACE_SECS),
            live_until: Some(conn_expires_at),
            batch: None,
        }
    }

    /// Until when (epoch seconds) the member is live: `liveUntil`, else (an item written
    /// before it) `expiresAt`.
    pub fn live_until(&self) -> i64 {
        self.live_until.unwrap_or(self.expires_at)
    }

    /// Whether the member is live at `now_s` (epoch seconds).
    pub fn is_live(&self, now_s: i64) -> bool {
        self.live_until() > now_s
    }
}

/// A room's sequence counter (`ROOM#<room>` / seq 0 in the events table). Every append writes
/// `type` and `last`; joins and leaves also `members`; joins also `shards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterItem {
    /// Always [`crate::keys::COUNTER_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The last event id given out in the room.
    pub last: u64,
    /// How many members the room has (approximate: TTL expiry does not decrement it); absent
    /// until a join or leave writes it, meaning 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u64>,
    /// How many member shards the room uses; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    /// Set (sticky) once the room is past its large-room limit: its joins and disconnects are
    /// then unsequenced (no event, no counter move); absent means false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large: Option<bool>,
}

impl CounterItem {
    /// The room's member count (0 when absent).
    pub fn members(&self) -> u64 {
        self.members.unwrap_or(0)
    }

    /// The shards the room uses (at least 1).
    pub fn shards(&self) -> u32 {
        self.shards.unwrap_or(1).max(1)
    }

    /// Whether the room is large (its joins are unsequenced).
    pub fn large(&self) -> bool {
        self.large.unwrap_or(false)
    }
}

/// A write request performed once (`REQUEST#<scope>` / `<requestId>`, see
/// [`crate::store::requests`]): written in the transaction of the event it produced, it
/// holds that request's answer, so a resend is answered from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestItem {
    /// Always [`crate::keys::REQUEST_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The request's action (`sendPublic`, `sendPrivate`, `setName`, `join`, `leave`).
    pub action: String,
    /// SHA-256 (hex) of the request's canonical form: a resend has the same.
    pub fingerprint: String,
    /// The connection that made it (for operators; the scope may be an identity).
    pub connection_id: String,
    /// `setName` only: the name it set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The events it recorded (room, id), in the order of its answer.
    pub events: Vec<EventRef>,
    /// When it was recorded (ms).
    pub ts: i64,
    /// TTL, epoch seconds: a day after `ts`.
    pub expires_at: i64,
}

/// A principal's connection slots (`LIMIT#<principal>` / `CONNS`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotsItem {
    /// Connection id → that connection's `expiresAt` (epoch seconds).
    #[serde(default)]
    pub conns: BTreeMap<String, i64>,
    /// Bumped by every change: an admission writes the item back only if it is as read.
    #[serde(default)]
    pub v: u64,
    /// TTL: the latest slot's expiry.
    #[serde(default)]
    pub expires_at: i64,
}
