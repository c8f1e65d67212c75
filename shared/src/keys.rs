//! Every table, key format and attribute name the chat stores, documented in one place.
//!
//! Both tables use string partition keys so one room's data sits together.
//!
//! ## Events table (`EVENTS_TABLE`) — the message history
//! | attribute      | type | meaning                                                        |
//! |----------------|------|----------------------------------------------------------------|
//! | `pk`           | S    | partition key, `ROOM#<room>`: one room's events read in order  |
//! | `seq`          | N    | sort key: the event id, a per-room sequence 1, 2, 3, …         |
//! | `type`         | S    | `MemberJoined`, `MemberRenamed`, `MemberLeft`, `MessagePosted`, `PrivateMessageSent` |
//! | `v`            | N    | schema version of the item (1), for upcasting later            |
//! | `ts`           | N    | commit time, ms since the epoch                                |
//! | `expiresAt`    | N    | TTL (epoch seconds): the history's retention                   |
//! | `connectionId` | S    | who caused the event                                           |
//! | `name`         | S    | their name at the time                                         |
//! | `oldName`      | S    | renames only                                                   |
//! | `message`      | S    | messages only                                                  |
//! | `toConnectionId`, `toName` | S | private messages only: the recipient at send time     |
//! | `identity`, `toIdentity` | S | private messages only, when authenticated: the sender's and the recipient's identity, the two who may read it back from history |
//! | `reason`       | S    | leaves only: `disconnected`, `gone` (pruned on 410) or `replaced` |
//!
//! Items are immutable: the only REMOVE records on its stream are TTL deletions.
//!
//! The same table holds **redelivery items** (`crate::redelivery`): frames a broadcast still
//! owes a few connections, brought back to the fan-out by the stream. Their partition is
//! `REDELIVERY#<room>`, so no history read (which queries `ROOM#<room>`) ever sees them.
//! | attribute      | type | meaning                                                        |
//! |----------------|------|----------------------------------------------------------------|
//! | `pk`           | S    | `REDELIVERY#<room>`                                            |
//! | `seq`          | N    | a unique number (µs of the write plus randomness), not an event id |
//! | `type`         | S    | `Redelivery`                                                   |
//! | `v`, `ts`      | N    | schema version (1), write time (ms)                            |
//! | `expiresAt`    | N    | TTL: an hour after the write                                   |
//! | `room`, `eventId` | S, N | the event the frames are of                                |
//! | `frames`       | L    | the frames (JSON strings), in the order each recipient gets them |
//! | `connectionIds`| L    | the connections still owed them (at most 500 per item)         |
//! | `round`, `notBefore` | N | which retry round this is (1-based), and not before when (ms) |
//!
//! ## Connections table (`CONNECTIONS_TABLE`) — current state, all items with TTL
//! | `pk`          | `sk`               | other attributes                                  |
//! |---------------|--------------------|---------------------------------------------------|
//! | `ROOM#<room>` | `CONN#<connId>`    | `connectionId`, `connectedAt` (ms), `expiresAt`, `identity` when authenticated, once joined `name`, `nameKey`; the rate-limit bucket `rlTokens`, `rlAt` |
//! | `ROOM#<room>` | `NAME#<nameKey>`   | a name claim: `connectionId`, `name`, `expiresAt`, and `identity` when its holder is authenticated; without `connectionId` it is that identity's reservation |
//! | `ROOM#<room>` | `SEQ`              | `seq`: the last event id given out in the room (no TTL) |
//!
//! `nameKey` is the name's NFKC_Casefold without invisible characters (`validation::name_key`):
//! names are unique ignoring case and Unicode compatibility differences. A member is a
//! `CONN#` item with a `name`. `expiresAt` is epoch seconds; DynamoDB deletes expired items
//! only eventually, so every read also treats `expiresAt <= now` as absent.

/// The one room of the classic chat. Keys carry the room so more can come without a migration.
pub const DEFAULT_ROOM: &str = "lobby";

pub const PK: &str = "pk";
pub const SK: &str = "sk";
pub const SEQ: &str = "seq";
pub const TYPE: &str = "type";
pub const EXPIRES_AT: &str = "expiresAt";
pub const CONNECTION_ID: &str = "connectionId";
pub const CONNECTED_AT: &str = "connectedAt";
pub const NAME: &str = "name";
pub const NAME_KEY: &str = "nameKey";
/// The authenticated subject of a connection, and of the identity a name claim is bound to.
pub const IDENTITY: &str = "identity";
/// The connection's rate-limit bucket: thousandths of a token, and when it was last updated (ms).
pub const RATE_TOKENS: &str = "rlTokens";
pub const RATE_AT: &str = "rlAt";

/// The sort key of a room's sequence counter item.
pub const SEQ_SK: &str = "SEQ";
/// Sort-key prefix of connection items, for `begins_with` member queries.
pub const CONN_PREFIX: &str = "CONN#";
/// Sort-key prefix of name claims.
pub const NAME_PREFIX: &str = "NAME#";

pub fn room_pk(room: &str) -> String {
    format!("ROOM#{room}")
}

/// The partition of a room's redelivery items in the event table.
pub fn redelivery_pk(room: &str) -> String {
    format!("REDELIVERY#{room}")
}

pub fn conn_sk(connection_id: &str) -> String {
    format!("{CONN_PREFIX}{connection_id}")
}

pub fn name_sk(name_key: &str) -> String {
    format!("{NAME_PREFIX}{name_key}")
}
