//! Every table, key format and attribute name the chat stores, documented in one place.
//!
//! Layout version 2 (rooms). Both tables keep their key schema (`pk`/`seq` and `pk`/`sk`);
//! what changed from version 1 is which items share a partition. Version 1 kept every
//! connection, name claim, rate-limit bucket and the room's counter under one partition key
//! (`ROOM#lobby`): one hot partition, capped by DynamoDB at about 1,000 write units/s and
//! 3,000 read units/s. Version 2 spreads them:
//! - per-request writes (the rate-limit bucket) go to the connection's own partition;
//! - name claims each have their own partition;
//! - a room's members are sharded (`MEMBERS#<room>#<shard>`), so a broadcast reads its room
//!   only, members only, in parallel over the shards, and joins spread over the shards;
//! - a room's sequence counter lives **with the log it numbers**, in the events table (which
//!   the template retains), so replacing the connections table cannot restart ids at 0.
//!
//! ## Events table (`EVENTS_TABLE`) — the message history, one partition per room
//! | attribute      | type | meaning                                                        |
//! |----------------|------|----------------------------------------------------------------|
//! | `pk`           | S    | partition key, `ROOM#<room>`: one room's events read in order  |
//! | `seq`          | N    | sort key: the event id, a per-room sequence 1, 2, 3, …; 0 is the room's counter item |
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
//! | `reason`       | S    | leaves only: `disconnected`, `gone` (pruned on 410), `replaced`, `left` (a `leave` request) or `expired` (the connection's TTL ran out: see *TTL expiry* below) |
//!
//! Event items are immutable: the only REMOVE records of event items are TTL deletions.
//! Private messages are not room-scoped but are numbered in `lobby`'s log (`ROOM#lobby`), as
//! in layout 1: their frames carry that id.
//!
//! **The room's counter** is the item at `seq = 0` of the room's partition (history reads
//! ask for `seq >= 1`, so they never see it):
//! | attribute | type | meaning                                                             |
//! |-----------|------|---------------------------------------------------------------------|
//! | `pk`, `seq` | S, N | `ROOM#<room>`, `0`                                                |
//! | `type`    | S    | `Counter`                                                           |
//! | `last`    | N    | the last event id given out in the room (no TTL: never expires)     |
//! | `members` | N    | how many members the room has, kept with each sequenced join/leave  |
//! | `shards`  | N    | how many member shards the room uses (1, 2, 4, … ≤ [`MAX_MEMBER_SHARDS`]; absent = 1) |
//! | `large`   | BOOL | set once the room is past its large-room limit (sticky); absent = false |
//!
//! Every append is a compare-and-swap on `last` in the same transaction as the event item, so
//! ids are dense and committed in id order. Which attributes each append writes: always
//! `type` and `last`; a join or leave also `members`; a join also `shards` (its value after
//! the join). The first append of a room creates the item whole with a put (condition: it
//! does not exist), so its stream record is one `INSERT` with the whole item; later appends
//! update it (condition: `last` is as read), giving `MODIFY` records. The counter changes on every append, so it is on
//! the table's stream too (`INSERT` then `MODIFY` records of `type` `Counter`): the fan-out
//! skips them (and the template's event source mapping filters them out before Lambda).
//! A room whose counter is missing (a table written by layout 1, or restored) starts from
//! its newest event: a writer whose append collides with an existing id moves the counter up
//! to the log's newest id.
//!
//! **Unsequenced joins and leaves (large rooms, contended joins).** A room's counter is one
//! item: its compare-and-swap commits one append at a time, 50–100 a second at DynamoDB's
//! 10–20 ms per transaction, while API Gateway admits 500 new connections a second. So not
//! every join is an event. A join is *unsequenced* — a transaction of the connection's
//! `rooms` entry and its member item only (no counter move, no `MemberJoined`) — when:
//! - the room is **large** (`large` set): past the large-room limit (the fan-out's
//!   `PRESENCE_BROADCAST_LIMIT`, default 1,000), where presence is not broadcast anyway, so a
//!   `MemberJoined` would only cost the counter; or
//! - its counter is **contended**: a join cancelled [`SEQUENCED_JOIN_ATTEMPTS`] times on the
//!   counter joins unsequenced on its next attempt. Its presence is not lost, only coalesced:
//!   the next sequenced presence change of the room carries a `members` frame (the fan-out
//!   reads the member items), which lists it.
//!
//! A disconnect (or a prune) of a large room leaves it unsequenced too (its `rooms` entry and
//! member item go, nothing else); an explicit `leave` stays a sequenced `MemberLeft` (its
//! answer carries the event's id). The answer to an unsequenced `join` is
//! `{"joined":{"room","id"}}` with `id` the counter's `last` read strongly consistent before
//! the join commits. Catching up from there loses nothing: every event up to `last` was
//! committed before that read (an event commits with its counter move), so the joiner was not
//! a member for any of them and is owed none; every event after `last` is one it may have
//! missed live (its fan-out may have read the members before the join committed), and a
//! history read after `last` returns exactly those. A sequenced join's id is the same point
//! (its own `MemberJoined`).
//!
//! **The room's size without the counter.** `members` counts sequenced joins and leaves only.
//! An unsequenced join does not touch the counter, so it sizes the room by sampling: one join
//! in [`SIZE_SAMPLE_EVERY`] (by [`samples_size`], a hash of its connection id) counts the
//! members of the room's newest shard (`shards - 1`) after committing (a strongly consistent
//! `Query` with `Select: COUNT`, about 25 read units for 1,000 members), estimates the room at
//! that count times `shards`, and, if the estimate calls for more shards ([`shards_for`]) or is
//! past the limit, updates the counter's `shards` and `large` (an `UpdateItem` on the condition
//! that `shards` is as read, so two samplers cannot shrink each other's doubling; sequenced
//! joins likewise only write `shards` on the condition that it is as they read it). The newest
//! shard, because doubling moves no member: an older shard also holds the members of every
//! earlier era and would make the estimate run away (each doubling doubling the next), while
//! the newest one holds only joins since the last doubling — the estimate can only err low,
//! and a shard past [`MEMBERS_PER_SHARD`] still doubles. A sampled room (large, or contended
//! enough to join unsequenced) gets at least [`LARGE_ROOM_SHARDS`] shards, so a storm of joins
//! spreads its member writes over that many partitions. `large` is sticky (like `shards`): a room that was large
//! keeps unsequenced joins, which is the hysteresis; its members are still exact in the
//! member items, which is all the fan-out reads.
//!
//! **Batched connections** (`batch` on the connection and member items, `crate::batching`) get
//! a room's frames of one stream batch packed into `{"batch":[…]}` POSTs. A failure mid-batch:
//! a recipient whose POST keeps failing is owed every POST from that one on (a batched
//! recipient's whole batch when its first POST fails), written as redelivery items below
//! (split so no item holds more than 256 KB of frames) and retried round by round; a batch the
//! fan-out cannot finish is reported from its first record and Lambda retries it (at least
//! once; clients dedupe by id).
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
//! | `frames`       | L    | the POST bodies (JSON strings), in the order each recipient gets them: plain frames, or for connections that opted in (`batch`) the `{"batch":[…]}` frames they were owed as packed |
//! | `connectionIds`| L    | the connections still owed them (at most 500 per item)         |
//! | `round`, `notBefore` | N | which retry round this is (1-based), and not before when (ms) |
//!
//! ## Connections table (`CONNECTIONS_TABLE`) — current state, every item with TTL
//!
//! The table has a stream (`OLD_IMAGE`) for one reader: the fan-out's second event source
//! mapping, whose filter passes only **TTL deletions of connection items** — `eventName`
//! `REMOVE`, `userIdentity` `{"type": "Service", "principalId": "dynamodb.amazonaws.com"}`,
//! key `CONN#<connId>` / `CONN` ([`crate::stream::EXPIRY_FILTER_PATTERN`]). Every other write
//! (each request's rate-limit update, joins, `$disconnect`'s own delete, member items, claims)
//! is on the stream too but never invokes Lambda.
//!
//! **TTL expiry** ([`crate::expiry`]): a connection whose `$disconnect` was lost and that never
//! met a 410 ends when DynamoDB's TTL deletes its item. The record's old image is the item as
//! it was then; its `rooms` are exactly the rooms no leave had committed for (every leave
//! removes its `rooms` entry in its own transaction, and after the deletion no leave can
//! commit: each is conditioned on the item). For each of those rooms the fan-out commits, on
//! the condition that the connection's member item (`MEMBERS#<room>#<shard>` / `<connId>`, the
//! shard from `rooms`) still exists, its delete with a `MemberLeft` (reason `expired`, the
//! member item's name) and the counter's move (`members` − 1) — unsequenced (the delete
//! only) in a large room — one transaction per room, so a connection in more rooms than one
//! transaction holds leaves them all. Then its claim goes (deleted, or an identity's
//! reservation) only if it is still this connection's, and its principal's slot. A redelivered
//! record, or one for a membership another path already ended, finds the member item gone
//! and writes nothing; a newer holder of the name keeps its claim. **A member item outlives
//! its connection**: DynamoDB's TTL deletes expired items in no set order, "typically within
//! two days", so were the member item to expire with the connection it could go **before**
//! the connection item's record is handled, and that room would get no leave. So its TTL
//! attribute `expiresAt` is the connection's expiry plus [`MEMBER_TTL_GRACE_SECS`] (a week),
//! and its `liveUntil` is the connection's expiry: every read of members (the fan-out's member
//! queries, member lists, a sampler's count, `chat-replay rebuild`) treats a member whose
//! `liveUntil` has passed as absent — or, on an item written before `liveUntil` existed, whose
//! `expiresAt` has. The expiry path deletes the member item with its leave, so only a member
//! whose leave never ran waits out the grace.
//! | `pk`                      | `sk`       | other attributes                                  |
//! |---------------------------|------------|---------------------------------------------------|
//! | `CONN#<connId>`           | `CONN`     | the connection: `connectionId`, `connectedAt` (ms), `expiresAt`, `identity` when authenticated, once named `name`, `nameKey`; `rooms` (M: room → its member shard) for every room it is a member of; the rate-limit bucket `rlTokens`, `rlAt`; `renaming` while a rename is not yet in every room; `batch` (BOOL, absent = false) when it opted in to batched frames at `$connect` |
//! | `NAME#<nameKey>`          | `NAME`     | a name claim: `connectionId`, `name`, `expiresAt`, and `identity` when its holder is authenticated; without `connectionId` it is that identity's reservation |
//! | `MEMBERS#<room>#<shard>`  | `<connId>` | a member of the room: `connectionId`, `name`, `liveUntil` (the connection's expiry: reads treat the member as absent after it), `expiresAt` (TTL: `liveUntil` + [`MEMBER_TTL_GRACE_SECS`]; absent `liveUntil`, on items written before it, means `expiresAt`), `batch` (the connection's opt-in, copied by every write of the item: the fan-out's member read sees it) |
//! | `LIMIT#<principal>`       | `CONNS`    | the principal's connection slots: `conns` (M: connection id → that connection's `expiresAt`), `v` (N, bumped by every change, the compare-and-swap of an admission), `expiresAt` (the latest slot's) |
//! | `LIMIT#<principal>`       | `REQ#<window>` | the principal's request counter for one window: `n` (N), `expiresAt` (a minute after the window ends) |
//! | `PRESENCE#<room>`         | `W#<second>` | the room's presence budget for one second (epoch seconds, [`crate::presence`]): `n` (N, the `@connections` POSTs charged to it), `expiresAt` (a minute after the second) |
//! | `REQUEST#<scope>`         | `<requestId>` | a write request performed once (below)          |
//!
//! **Request items** (`crate::store::requests`): a write request that carried a `requestId`
//! (1–64 ASCII letters, digits, `-`, `_`, `.`, `:`), written **in the transaction of the
//! event it produced** on the condition that no live one exists (`attribute_not_exists(pk)
//! OR expiresAt <= now`), so it exists exactly when that transaction committed. `<scope>` is
//! `identity#<identity>` for an authenticated connection, else `conn#<connectionId>`: a
//! resend from a new connection of the same identity finds it. A resend finds it (a cancelled
//! transaction, or a refusal, is followed by a strongly consistent read of it) and is answered
//! from it; nothing else reads it. Attributes: `type` (`Request`), `action`, `fingerprint`
//! (SHA-256 hex of the request's action and fields: the same `requestId` with another request
//! is refused), `connectionId` (who sent it first), `name` (`setName` only), `events` (L of M
//! `{room, id}`: the ids of the answer), `ts` (ms), `expiresAt` (a day later). Where it is
//! written: `sendPublic`, `sendPrivate`, `join`, `leave` put it in their one transaction;
//! `setName` in the transaction that moves the claim (or joins lobby), with the events of that
//! transaction (a rename's other rooms follow in their own transactions, and their events are
//! not in it). The connections table's stream carries it, but its mapping's filter passes only
//! TTL deletions of connection items (below), so no reader of a stream sees it.
//!
//! `$connect` writes `rooms` as an empty map: a join sets `rooms.<room>`, which DynamoDB can
//! only do in a map that exists. A connection id is a partition key in `CONN#<connId>` (at most
//! 2,048 bytes) and a sort key in its member items (at most 1,024 bytes); API Gateway's ids
//! are about 16 characters.
//!
//! A member is a connection named and joined to a room: its `MEMBERS#` item and its
//! connection's `rooms` entry are written and removed together, in one transaction with the
//! room's `MemberJoined`/`MemberLeft` event. A rename rewrites the member item (a put of
//! the whole item, so it is never partial, on the condition that it still has the old name)
//! in the transaction of that room's `MemberRenamed`.
//!
//! **`renaming`** (S, on the connection item): the name the connection had before a rename
//! that is not yet in every room. A rename is one transaction per room; the first (which moves
//! the claim and the name) sets it when the connection is in other rooms too, and a last
//! small update removes it once every room has its `MemberRenamed`. A rename interrupted in
//! between (a store error) leaves it set, and the other rooms' member items with the old name:
//! the next `setName` (the same name retried, or another) finds it, gives each room whose
//! member item has another name than the connection its `MemberRenamed` (old name: the member
//! item's), then removes it. While it is set, a leave reads the member item for the name its
//! `MemberLeft` carries (the name that room knows), so no room hears of a name it never saw.
//! Without it, every member item has the connection's name, so the common same-name
//! `setName` reads nothing more than the connection.
//!
//! **Principals** (`crate::ratelimit`): a connection's principal is `id:<identity>` when
//! authenticated, else `ip:<source IP>`; it is recorded on the connection item as `principal`
//! (absent when neither was known, or on items written before principals), so a removal can
//! give the slot back and a request knows whom to charge. `$connect` takes a slot in the same
//! transaction that puts the connection item: the slots item is rewritten whole, without the
//! expired slots, on the condition that `v` is as read (or that it does not exist), so
//! concurrent admissions never overfill it. A removal drops the slot with one update
//! (condition: the slot is there; it also bumps `v`, so an admission that read the slot
//! cannot write it back). A slot whose removal never ran expires with its connection.
//! Each request adds 1 to the current window's `REQ#` item, on the condition that `n` is
//! still under the budget: one write, no read.
//!
//! **A room's presence budget** (`PRESENCE#<room>`): a rename, `join`, first `setName` or
//! `leave` reads the room's counter (`members`, `large`) and adds its cost, 2 × (members + 1)
//! (nothing in a large room), to the current second's `W#` item, on the condition that `n` is
//! absent or at most the budget less the cost: one write, in the room's own partition. The
//! handler does it before the change, so a refused change writes nothing else.
//!
//! The shard is `member_shard(connId, shards)` with
//! the room's `shards` when it joined, and is remembered in `rooms`, so a leave finds the
//! item whatever the room's shard count is by then. Shards only grow (a join that takes the
//! room above `shards × MEMBERS_PER_SHARD` members doubles `shards` in its transaction), so
//! reading shards `0..shards` finds every member. `setName` makes a connection a member of
//! [`DEFAULT_ROOM`].
//!
//! `nameKey` is the name's NFKC_Casefold without invisible characters (`validation::name_key`):
//! names are unique ignoring case and Unicode compatibility differences. `expiresAt` is epoch
//! seconds; DynamoDB deletes expired items only eventually, so every read also treats
//! `expiresAt <= now` as absent — a member item `liveUntil <= now` (its connection's expiry;
//! its `expiresAt` is a grace later, so the expiry path above still finds it): its rooms hear
//! of it when the connection item's TTL deletion reaches the fan-out, above.

/// The room of the classic chat: `setName` joins it, and `sendPublic`/`history` without a
/// `room` mean it.
pub const DEFAULT_ROOM: &str = "lobby";

pub const PK: &str = "pk";
pub const SK: &str = "sk";
pub const SEQ: &str = "seq";
pub const TYPE: &str = "type";
pub const EXPIRES_AT: &str = "expiresAt";
/// A member item's liveness: the connection's expiry (its `expiresAt` is later, see
/// [`MEMBER_TTL_GRACE_SECS`]).
pub const LIVE_UNTIL: &str = "liveUntil";
pub const CONNECTION_ID: &str = "connectionId";
pub const CONNECTED_AT: &str = "connectedAt";
pub const NAME: &str = "name";
pub const NAME_KEY: &str = "nameKey";
/// The authenticated subject of a connection, and of the identity a name claim is bound to.
pub const IDENTITY: &str = "identity";
/// The connection's rate-limit bucket: thousandths of a token, and when it was last updated (ms).
pub const RATE_TOKENS: &str = "rlTokens";
pub const RATE_AT: &str = "rlAt";
/// The connection's rooms: a map from room name to the member shard its item is in.
pub const ROOMS: &str = "rooms";
/// The name a connection had before a rename not yet recorded in all its rooms (see above).
pub const RENAMING: &str = "renaming";
/// The connection's principal (`id:<identity>` or `ip:<source IP>`), see above.
pub const PRINCIPAL: &str = "principal";
/// BOOL on a connection item and on each of its member items: the connection opted in to
/// batched frames at `$connect` (see [`crate::batching`]); absent means false.
pub const BATCH: &str = "batch";
/// The slots item's map of connection id → expiry, and its version.
pub const LIMIT_CONNS: &str = "conns";
pub const LIMIT_VERSION: &str = "v";
/// A window counter's count.
pub const LIMIT_COUNT: &str = "n";
/// Sort key of a principal's slots item.
pub const LIMIT_SLOTS_SK: &str = "CONNS";

/// The counter item's sort key in the room's event partition.
pub const COUNTER_SEQ: u64 = 0;
/// The counter item's `type`.
pub const COUNTER_TYPE: &str = "Counter";
/// The counter's last id given out.
pub const COUNTER_LAST: &str = "last";
/// The counter's member count.
pub const COUNTER_MEMBERS: &str = "members";
/// The counter's member shard count.
pub const COUNTER_SHARDS: &str = "shards";
/// The counter's large-room flag.
pub const COUNTER_LARGE: &str = "large";

/// A join whose append lost the counter this many times joins unsequenced on its next attempt.
pub const SEQUENCED_JOIN_ATTEMPTS: u32 = 3;
/// One unsequenced join in this many (by [`samples_size`]) counts its shard to size the room.
pub const SIZE_SAMPLE_EVERY: u32 = 16;
/// The fewest member shards of a large room.
pub const LARGE_ROOM_SHARDS: u32 = 8;

/// The `type` of a request item.
pub const REQUEST_TYPE: &str = "Request";

/// Sort key of a connection item.
pub const CONN_SK: &str = "CONN";
/// Sort key of a name claim.
pub const NAME_SK: &str = "NAME";

/// How long a member item outlives its connection (seconds): its TTL attribute `expiresAt` is
/// the connection's expiry plus this, its `liveUntil` the connection's expiry. DynamoDB deletes
/// expired items "typically within two days of expiration" (UpdateTimeToLive, DynamoDB API
/// Reference; the developer guide says "within a few days") and in no set order, and the
/// connection item's TTL `REMOVE` is then handled within the expiry mapping's
/// `MaximumRecordAgeInSeconds` (an hour; the stream keeps it 24 h at most): about three days
/// from the connection's expiry to its leaves in the usual worst case. A week is more than
/// twice that, so the member item the expiry path leaves the room by is still there. It
/// costs little: the expiry path deletes the member item when it leaves the room, so only a
/// member whose leave never ran waits out the grace (filtered out of every read meanwhile).
pub const MEMBER_TTL_GRACE_SECS: i64 = 7 * 86_400;

/// A room's member shards hold about this many members each before the room doubles them.
pub const MEMBERS_PER_SHARD: u64 = 1_000;
/// The most member shards a room uses (enough for 100,000 members at under 1,000 a shard).
pub const MAX_MEMBER_SHARDS: u32 = 256;

pub fn room_pk(room: &str) -> String {
    format!("ROOM#{room}")
}

/// The partition of a room's redelivery items in the event table.
pub fn redelivery_pk(room: &str) -> String {
    format!("REDELIVERY#{room}")
}

/// The partition of a connection's item.
pub fn conn_pk(connection_id: &str) -> String {
    format!("CONN#{connection_id}")
}

/// The partition of a name's claim.
pub fn name_pk(name_key: &str) -> String {
    format!("NAME#{name_key}")
}

/// The partition of a scope's request items (`scope`: [`crate::store::requests::scope`]);
/// the sort key is the `requestId`.
pub fn request_pk(scope: &str) -> String {
    format!("REQUEST#{scope}")
}

/// The partition of a principal's limits (its connection slots and request counters).
pub fn limit_pk(principal: &str) -> String {
    format!("LIMIT#{principal}")
}

/// The partition of a room's presence budget ([`crate::presence`]).
pub fn presence_budget_pk(room: &str) -> String {
    format!("PRESENCE#{room}")
}

/// Sort key of a room's presence budget for the second `index` (epoch seconds).
pub fn presence_window_sk(index: i64) -> String {
    format!("W#{index}")
}

/// Sort key of a principal's request counter for window `index`.
pub fn limit_window_sk(index: i64) -> String {
    format!("REQ#{index}")
}

/// The partition of one shard of a room's members.
pub fn members_pk(room: &str, shard: u32) -> String {
    format!("MEMBERS#{room}#{shard}")
}

/// The shard a connection's member item goes to in a room of `shards` shards: a stable hash
/// (FNV-1a, the same in every process and release), so retries land on the same shard.
pub fn member_shard(connection_id: &str, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in connection_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

/// Whether the unsequenced join of `connection_id` counts its shard to size the room: one id
/// in [`SIZE_SAMPLE_EVERY`], by a hash independent of [`member_shard`]'s (so the samplers are
/// spread over every shard), stable across processes.
pub fn samples_size(connection_id: &str) -> bool {
    let mut h: u32 = 0x811c_9dc5;
    for b in connection_id.bytes().rev() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h >> 7).is_multiple_of(SIZE_SAMPLE_EVERY)
}

/// What a sampler concludes from `counted` members in the newest shard of a room of `shards`
/// shards (`large` already or not) with large-room limit `limit`: the room's shards and whether
/// it is large, from the estimate `counted × shards` (never fewer shards than now, never large
/// no more; at least [`LARGE_ROOM_SHARDS`]: a room whose joins are unsequenced is busy).
pub fn sized(counted: u64, shards: u32, large: bool, limit: u64) -> (u32, bool) {
    let shards = shards.max(1);
    let estimate = counted.saturating_mul(u64::from(shards));
    let large = large || estimate > limit;
    let s = shards_for(estimate, shards).max(LARGE_ROOM_SHARDS.min(MAX_MEMBER_SHARDS));
    (s, large)
}

/// How many shards a room of `members` members uses, given it uses `shards` now: doubled
/// while over [`MEMBERS_PER_SHARD`] each, never fewer than now, at most [`MAX_MEMBER_SHARDS`].
pub fn shards_for(members: u64, shards: u32) -> u32 {
    let mut s = shards.max(1);
    while members > u64::from(s) * MEMBERS_PER_SHARD && s < MAX_MEMBER_SHARDS {
        s *= 2;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_grow_by_doubling_and_never_shrink() {
        assert_eq!(shards_for(0, 1), 1);
        assert_eq!(shards_for(1_000, 1), 1);
        assert_eq!(shards_for(1_001, 1), 2);
        assert_eq!(shards_for(100_000, 1), 128);
        assert_eq!(shards_for(10, 8), 8);
        assert_eq!(shards_for(10_000_000, 1), MAX_MEMBER_SHARDS);
    }

    #[test]
    fn one_join_in_sample_every_sizes_the_room_and_samplers_spread_over_shards() {
        // GIVEN 16,000 connection ids
        let sampled: Vec<String> = (0..16_000)
            .map(|i| format!("conn-{i}="))
            .filter(|id| samples_size(id))
            .collect();
        // THEN about one in SIZE_SAMPLE_EVERY samples, and the samplers land on every shard
        assert!(
            sampled.len() > 700 && sampled.len() < 1_300,
            "{}",
            sampled.len()
        );
        let mut shards = [0u32; 16];
        for id in &sampled {
            shards[member_shard(id, 16) as usize] += 1;
        }
        assert!(shards.iter().all(|&c| c > 20), "{shards:?}");
    }

    #[test]
    fn a_sample_doubles_shards_and_flags_a_large_room() {
        // 600 in one of 2 shards: 1,200 members, more than 1,000 per shard over 1: 2 shards
        // stay; past a limit of 1,000 → large, at least LARGE_ROOM_SHARDS
        assert_eq!(sized(600, 2, false, 1_000), (LARGE_ROOM_SHARDS, true));
        assert_eq!(sized(400, 2, false, 1_000), (LARGE_ROOM_SHARDS, false));
        // 1,500 in one of 8 shards: 12,000 members → 16 shards
        assert_eq!(sized(1_500, 8, true, 1_000), (16, true));
        // never fewer shards than now, and large stays large (with its shards)
        assert_eq!(sized(0, 64, false, 1_000), (64, false));
        assert_eq!(sized(1, 1, true, 1_000), (LARGE_ROOM_SHARDS, true));
    }

    #[test]
    fn member_shard_is_stable_and_in_range() {
        assert_eq!(member_shard("abc=", 1), 0);
        let s = member_shard("Xk3fGdmLIAMCJfA=", 128);
        assert!(s < 128);
        assert_eq!(s, member_shard("Xk3fGdmLIAMCJfA=", 128));
        // Spread: 10,000 ids over 16 shards, none empty or with more than twice its share.
        let mut counts = [0u32; 16];
        for i in 0..10_000 {
            counts[member_shard(&format!("conn-{i}="), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 300 && c < 1_250), "{counts:?}");
    }

    #[test]
    fn doubling_the_shards_splits_each_shard_in_two() {
        // A member of shard k among s is in shard k or k + s among 2s: doubling moves no member
        // into a shard other than those two, so a room that grew still finds its old members
        // by the shard their connection remembers, and new joins spread over all 2s.
        for i in 0..2_000 {
            let id = format!("conn-{i}=");
            for s in [1, 2, 4, 64, 128] {
                let before = member_shard(&id, s);
                let after = member_shard(&id, 2 * s);
                assert!(
                    after == before || after == before + s,
                    "{id}: {before} of {s}, {after}"
                );
            }
        }
        // AND a room at the limit stays there, however many join
        assert_eq!(shards_for(u64::MAX, MAX_MEMBER_SHARDS), MAX_MEMBER_SHARDS);
        assert_eq!(shards_for(2_001, 2), 4);
        assert_eq!(shards_for(2_000, 2), 2);
    }
}
