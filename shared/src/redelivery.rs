//! Redelivery: the recipients a broadcast could not reach, retried on their own.
//!
//! When a few recipients keep failing (5xx, or 429 after every attempt) the fan-out must not
//! fail the whole record: Lambda would re-send the event to all N members up to six times,
//! hold the room behind it, and then discard it. Instead the fan-out writes what is left —
//! the frames, and the connections still owed them — as a **redelivery item** in the event
//! table, under its own partition key (`REDELIVERY#<room>`, never read as history). The item
//! comes back on the table's stream like any event, so it is as durable as the events
//! themselves: a crash after it is written loses nothing, and a crash before it is written
//! fails the record, which Lambda then retries whole.
//!
//! Each redelivery is one **round**: every connection in it gets one more try (two for 429),
//! no earlier than the item's `notBefore`. Those still failing go into the next round's item,
//! with a longer backoff, up to [`MAX_ROUNDS`]; then they are given up (logged with the
//! count: history still has the event for a client that catches up). A 410 in a round prunes
//! the connection as in a broadcast. So a broadcast to N members with k that fail forever
//! costs N − k + k × (`max_attempts` + [`MAX_ROUNDS`]) POSTs — 10,080 for N = 10,000, k = 10 —
//! instead of up to 6 × N.
//!
//! **What it costs the guarantees.** A redelivered frame reaches its few recipients after
//! frames of later events: clients that order by id (the README's rule, and the client
//! library's) see the usual order, others may see it late. Rounds run beside the batch's
//! in-order units, so they never hold the room back; a round waits for its `notBefore` at
//! most [`MAX_WAIT`], which bounds how long it can lengthen an invocation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys;

/// Rounds after the broadcast's own attempts.
pub const MAX_ROUNDS: u32 = 5;
/// The most a round waits for its `notBefore` inside an invocation (the stream's own polling
/// adds a few hundred ms on AWS between rounds).
pub const MAX_WAIT: Duration = Duration::from_secs(1);
/// Connections per redelivery item: 500 ids of ~16 bytes, far under the 400 KB item limit
/// beside two frames of at most 128 KB.
pub const IDS_PER_ITEM: usize = 500;
/// Redelivery items expire an hour after they are written (the stream mapping's maximum
/// record age: by then the fan-out would discard the record anyway).
pub const TTL_SECS: i64 = 3600;
/// `type` of a redelivery item.
pub const ITEM_TYPE: &str = "Redelivery";

/// The backoff before round `round` (1-based): 250 ms, 500 ms, then 1 s.
pub fn backoff(round: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << round.saturating_sub(1).min(4))).min(MAX_WAIT)
}

/// What is still owed: the frames of one unit (in order), to these connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redelivery {
    pub room: String,
    /// The id of the event (the last of a presence run) the frames carry.
    pub event_id: u64,
    pub frames: Vec<String>,
    pub connection_ids: Vec<String>,
    /// 1 for the first redelivery after the broadcast.
    pub round: u32,
    /// Not to be sent before this (ms since the epoch).
    pub not_before_ms: i64,
}

/// The redelivery item, flat as stored in the event table (see [`crate::keys`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedeliveryItem {
    pub pk: String,
    /// A unique number within the partition (not an event id).
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub ts: i64,
    pub expires_at: i64,
    pub room: String,
    pub event_id: u64,
    pub frames: Vec<String>,
    pub connection_ids: Vec<String>,
    pub round: u32,
    pub not_before: i64,
}

impl RedeliveryItem {
    /// The item for `r`, written at `now_ms` under the unique `seq`.
    pub fn new(r: &Redelivery, seq: u64, now_ms: i64) -> Self {
        RedeliveryItem {
            pk: keys::redelivery_pk(&r.room),
            seq,
            kind: ITEM_TYPE.to_owned(),
            v: 1,
            ts: now_ms,
            expires_at: crate::store::epoch_secs(now_ms) + TTL_SECS,
            room: r.room.clone(),
            event_id: r.event_id,
            frames: r.frames.clone(),
            connection_ids: r.connection_ids.clone(),
            round: r.round,
            not_before: r.not_before_ms,
        }
    }

    pub fn into_redelivery(self) -> Redelivery {
        Redelivery {
            room: self.room,
            event_id: self.event_id,
            frames: self.frames,
            connection_ids: self.connection_ids,
            round: self.round,
            not_before_ms: self.not_before,
        }
    }
}

/// A `seq` for a redelivery item: microseconds plus randomness, so two fan-outs writing at
/// once do not collide (the write is also conditional on the key being new).
pub fn unique_seq(now_ms: i64) -> u64 {
    use rand::Rng;
    (now_ms.max(0) as u64)
        .saturating_mul(1_000_000)
        .saturating_add(rand::rng().random_range(0..1_000_000))
}

/// Splits the connections owed `frames` into items of at most [`IDS_PER_ITEM`].
pub fn chunks(
    room: &str,
    event_id: u64,
    frames: &[String],
    connection_ids: Vec<String>,
    round: u32,
    not_before_ms: i64,
) -> Vec<Redelivery> {
    connection_ids
        .chunks(IDS_PER_ITEM)
        .map(|ids| Redelivery {
            room: room.to_owned(),
            event_id,
            frames: frames.to_vec(),
            connection_ids: ids.to_vec(),
            round,
            not_before_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let ms: Vec<u128> = (1..=MAX_ROUNDS).map(|r| backoff(r).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 1000, 1000]);
    }

    #[test]
    fn items_round_trip_and_chunk() {
        let ids: Vec<String> = (0..1_001).map(|i| format!("c{i}")).collect();
        let parts = chunks("lobby", 7, &["{}".into()], ids, 2, 99);
        assert_eq!(
            parts
                .iter()
                .map(|p| p.connection_ids.len())
                .collect::<Vec<_>>(),
            [500, 500, 1]
        );
        let item = RedeliveryItem::new(&parts[2], 5, 1_000);
        assert_eq!(item.pk, "REDELIVERY#lobby");
        assert_eq!(item.expires_at, 1 + TTL_SECS);
        let image: serde_dynamo::Item = serde_dynamo::to_item(&item).expect("item");
        let back: RedeliveryItem = serde_dynamo::from_item(image).expect("decode");
        assert_eq!(back.into_redelivery(), parts[2]);
    }
}
