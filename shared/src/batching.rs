//! Batched delivery: the frames one connection is owed from one stream batch, packed into as
//! few `@connections` POSTs as fit.
//!
//! Every POST is a billed API Gateway message and counts against the account's 10,000
//! requests/s, so a room of N members receiving E events/s costs N × E POSTs/s unbatched: a
//! 10,000-member room tops out at one event a second. A connection that opts in gets, instead,
//! the frames of all the events of its room handled together in one invocation as one frame
//! `{"batch":[frame, frame, …]}`.
//!
//! - **Opt-in** at `$connect` with the query parameter [`BATCH_PARAMETER`] (`?batch=1`), the
//!   same place as `?token=`: API Gateway hands `$connect` its `queryStringParameters`, a
//!   browser's `WebSocket` constructor can set it, and it needs no answer from the server (a
//!   subprotocol must be echoed in the handshake's response headers by the `$connect`
//!   integration, or browsers fail the connection). It is recorded on the connection item and
//!   copied to every member item the connection writes (`batch`, see [`crate::keys`]), so the
//!   fan-out's member read sees it at no extra cost; a private message's recipient that is not
//!   among the members read is looked up by its connection item.
//! - **Packing** ([`pack`]): each inner frame is byte for byte the frame an unbatched
//!   connection gets (ids included, so dedupe by `(room, id, key)` is unchanged), in id order;
//!   a POST never exceeds [`MAX_POST_BYTES`] (API Gateway's 32 KB frame, its billing unit) —
//!   the frames go into as many POSTs as needed, each a `{"batch":[…]}` of consecutive frames.
//!   A POST that would carry one frame carries the frame itself: a batched client reads plain
//!   frames anyway (route responses, errors), and a quiet room then looks the same either way.
//! - **Groups** ([`by_room`], [`deliver_group`]): the units of one stream batch are grouped by
//!   room, in order of each room's first unit; a room's group reads its members once (and its
//!   member list once, when it has presence changes), and sends every member its frames of
//!   the group in id order: an unbatched member one POST per frame (exactly today's frames), a
//!   batched one the packed POSTs. A room with a single unit in the batch goes the per-unit
//!   path of [`crate::fanout`] (nothing to pack). The batch's size is the event source
//!   mapping's `BatchSize`, its wait the `MaximumBatchingWindowInSeconds`: the latency a busy
//!   room pays for the saving.
//! - **Guarantees** kept: per-recipient order by id; pacing, retries and the deadline per
//!   POST ([`crate::fanout`]'s sender); a 410 prunes the connection; a recipient whose POST
//!   keeps failing is owed **every frame from that POST on** (for a batched recipient, each of
//!   its remaining packed POSTs as they were: all of them when the first fails) and gets them
//!   through redelivery items ([`crate::redelivery`], their `frames` are the POST bodies),
//!   split so no item carries more than [`REDELIVERY_FRAME_BYTES`]. A group that cannot
//!   finish fails its first record, and Lambda retries from there: every member of the room
//!   then gets the whole group again (at least once, deduped by id), as with a unit.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::FanoutConfig;
use crate::delivery::{Deliver, DeliveryError};
use crate::events::{ChatEvent, LeaveReason, StoredEvent};
use crate::fanout::{members, presence_frames, DeliveryReport, FanoutError, Sender, Unit};
use crate::redelivery;
use crate::store::{ChatStore, Member};

/// The `$connect` query parameter that opts a connection in: `?batch=1`.
pub const BATCH_PARAMETER: &str = "batch";

/// The most bytes one POST carries when frames are packed: API Gateway's WebSocket frame size,
/// and the unit it meters messages in (32 KB).
pub const MAX_POST_BYTES: usize = 32 * 1024;

/// The most frame bytes one redelivery item holds (the item limit is 400 KB, and a few hundred
/// connection ids go beside them).
pub const REDELIVERY_FRAME_BYTES: usize = 256 * 1024;

const OPEN: &[u8] = br#"{"batch":["#;
const CLOSE: &[u8] = b"]}";

/// Whether the value of `?batch=` opts in (`1` or `true`).
pub fn opts_in(value: Option<&str>) -> bool {
    matches!(value, Some("1" | "true"))
}

/// Packs frames (JSON texts, in order) into POST bodies of at most [`MAX_POST_BYTES`] each:
/// `{"batch":[f1,f2,…]}` of consecutive frames, or a frame alone as itself. A frame that does
/// not fit in a batch with anything else goes alone.
pub fn pack<F: AsRef<[u8]>>(frames: &[F]) -> Vec<Vec<u8>> {
    let mut posts = Vec::new();
    let mut current: Vec<&[u8]> = Vec::new();
    let mut size = OPEN.len() + CLOSE.len();
    for frame in frames {
        let frame = frame.as_ref();
        if !current.is_empty() && size + 1 + frame.len() > MAX_POST_BYTES {
            posts.push(wrap(&current));
            current.clear();
            size = OPEN.len() + CLOSE.len();
        }
        size += frame.len() + usize::from(!current.is_empty());
        current.push(frame);
    }
    if !current.is_empty() {
        posts.push(wrap(&current));
    }
    posts
}

fn wrap(frames: &[&[u8]]) -> Vec<u8> {
    if let [one] = frames {
        return one.to_vec();
    }
    let len = OPEN.len() + CLOSE.len() + frames.iter().map(|f| f.len() + 1).sum::<usize>();
    let mut post = Vec::with_capacity(len);
    post.extend_from_slice(OPEN);
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            post.push(b',');
        }
        post.extend_from_slice(frame);
    }
    post.extend_from_slice(CLOSE);
    post
}

/// The units of one batch grouped by room (a private message goes with `lobby`, whose log
/// numbers it), each group in stream order, groups in the order of their first unit, each
/// with the sequence number of its first record (what a failure reports: every record before
/// it belongs to an earlier group).
pub(crate) fn by_room(units: Vec<(Option<String>, Unit)>) -> Vec<(Option<String>, Vec<Unit>)> {
    let mut groups: Vec<(Option<String>, Vec<Unit>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (seq_no, unit) in units {
        let room = unit
            .events()
            .first()
            .map(|e| e.room.clone())
            .unwrap_or_default();
        match index.get(&room) {
            Some(&i) => groups[i].1.push(unit),
            None => {
                index.insert(room, groups.len());
                groups.push((seq_no, vec![unit]));
            }
        }
    }
    groups
}

/// The first and last events of a group (for its log span and outcome line).
pub(crate) fn ends(group: &[Unit]) -> Vec<StoredEvent> {
    let first = group.first().and_then(|u| u.events().first());
    let last = group.last().and_then(|u| u.events().last());
    first.into_iter().chain(last).cloned().collect()
}

/// Who a frame of a group is for.
enum Audience {
    /// The room's members.
    Room,
    /// One connection (a private message).
    Only(String),
}

/// Delivers a room's units of one batch together (see the module docs): one member read,
/// each member's frames in id order, packed for those that opted in.
pub(crate) async fn deliver_group(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    units: &[Unit],
    now_ms: i64,
    deadline: Option<Instant>,
) -> Result<DeliveryReport, FanoutError> {
    let Some(last) = units.last().and_then(|u| u.events().last()) else {
        return Ok(DeliveryReport::default());
    };
    let room = last.room.as_str();
    let last_id = last.seq;
    let has_room_frames = units.iter().any(|u| match u {
        Unit::Single(e) => !matches!(e.event, ChatEvent::PrivateMessageSent { .. }),
        Unit::Presence(_) => true,
    });
    let mut report = DeliveryReport::default();
    let mut failed_read = None;
    let listing = members(store, room, now_ms);
    let mut listing = pin!(listing);
    // Presence frames need the room's whole list (as `deliver_presence` reads it): held only
    // up to the presence limit; past it presence is not broadcast (the units' messages are).
    let mut held: Vec<Member> = Vec::new();
    let mut names = None;
    if units.iter().any(|u| matches!(u, Unit::Presence(_))) {
        let mut over = false;
        while let Some(member) = listing.next().await {
            held.push(member?);
            if held.len() > config.presence_limit {
                debug!(
                    limit = config.presence_limit,
                    "room over the presence limit; not broadcasting presence"
                );
                over = true;
                break;
            }
        }
        if over {
            report.presence_skipped = true;
        } else {
            let mut sorted: Vec<&Member> = held.iter().collect();
            sorted.sort_by_key(|m| m.name.to_lowercase());
            names = Some(sorted.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
        }
    }
    let mut frames: Vec<(Audience, Vec<u8>)> = Vec::new();
    for unit in units {
        match unit {
            Unit::Single(e) => match &e.event {
                ChatEvent::PrivateMessageSent {
                    to_connection_id, ..
                } => frames.push((
                    Audience::Only(to_connection_id.clone()),
                    e.message_frame().to_json().into_bytes(),
                )),
                ChatEvent::MessagePosted { .. } => {
                    frames.push((Audience::Room, e.message_frame().to_json().into_bytes()))
                }
                // A lone presence change is a run of one (`fanout::handle_stream_event`
                // builds them so); kept for completeness.
                _ => push_presence(&mut frames, std::slice::from_ref(e), names.as_ref()),
            },
            Unit::Presence(run) => push_presence(&mut frames, run, names.as_ref()),
        }
    }
    let room_frames: Vec<&[u8]> = frames
        .iter()
        .filter(|(a, _)| matches!(a, Audience::Room))
        .map(|(_, f)| f.as_slice())
        .collect();
    let plain: Arc<[Vec<u8>]> = room_frames.iter().map(|f| f.to_vec()).collect();
    let packed: Arc<[Vec<u8>]> = pack(&room_frames).into();
    // Private recipients get their own lists; `true` once met among the members.
    let mut privates: HashMap<String, bool> = frames
        .iter()
        .filter_map(|(a, _)| match a {
            Audience::Only(id) => Some((id.clone(), false)),
            Audience::Room => None,
        })
        .collect();
    let frames = &frames;
    let sender = Sender {
        deliver,
        config,
        deadline,
    };
    let mut tally = GroupTally::default();
    if has_room_frames && !plain.is_empty() {
        let recipients = stream::iter(held.into_iter().map(Ok))
            .chain(listing)
            .filter_map(|m| {
                let member = match m {
                    Ok(member) => Some(member),
                    Err(e) => {
                        failed_read.get_or_insert(e);
                        None
                    }
                };
                async move { member }
            })
            .map(|m| {
                let posts = match privates.get_mut(&m.connection_id) {
                    Some(met) => {
                        *met = true;
                        posts_for(frames, &m.connection_id, true, m.batch)
                    }
                    None if m.batch => Arc::clone(&packed),
                    None => Arc::clone(&plain),
                };
                (m.connection_id, posts)
            });
        tally = send(&sender, recipients, tally).await;
    }
    if let Some(e) = failed_read {
        return Err(e.into());
    }
    let mut others = Vec::new();
    for (id, met) in privates {
        if met {
            continue;
        }
        // Not read as a member of this room: its connection item says whether it opted in
        // (gone or unknown: unbatched, and the POST's 410 prunes it as before).
        let batch = store
            .connection(&id, now_ms)
            .await?
            .is_some_and(|c| c.batch);
        // Not a member read here: its private frames only.
        let posts = posts_for(frames, &id, false, batch);
        others.push((id, posts));
    }
    tally = send(&sender, stream::iter(others), tally).await;
    settle(store, tally, report, room, last_id, now_ms).await
}

fn push_presence(
    frames: &mut Vec<(Audience, Vec<u8>)>,
    run: &[StoredEvent],
    names: Option<&Vec<String>>,
) {
    if let Some(names) = names {
        for frame in presence_frames(run, names.clone()) {
            frames.push((Audience::Room, frame.to_json().into_bytes()));
        }
    }
}

/// The POSTs of one connection: the room's frames if it is a `member` of the room, and its
/// own private ones, in id order.
fn posts_for(
    frames: &[(Audience, Vec<u8>)],
    connection_id: &str,
    member: bool,
    batch: bool,
) -> Arc<[Vec<u8>]> {
    let mine: Vec<&[u8]> = frames
        .iter()
        .filter(|(a, _)| match a {
            Audience::Room => member,
            Audience::Only(id) => id == connection_id,
        })
        .map(|(_, f)| f.as_slice())
        .collect();
    if batch {
        pack(&mine).into()
    } else {
        mine.iter().map(|f| f.to_vec()).collect()
    }
}

/// Recipients owed the same POSTs: their list, the first POST not delivered, who they are.
type Owing = (Arc<[Vec<u8>]>, usize, Vec<String>);

/// The outcomes of a group's deliveries.
#[derive(Default)]
struct GroupTally {
    delivered: usize,
    pruned: Vec<String>,
    rejected: usize,
    out_of_time: bool,
    /// Recipients still failing, by what they are owed: (their POST list, the first POST not
    /// delivered) → the list and the connections.
    failing: HashMap<(usize, usize), Owing>,
}

impl GroupTally {
    fn record(
        &mut self,
        connection_id: String,
        posts: &Arc<[Vec<u8>]>,
        outcome: Result<(), (usize, DeliveryError)>,
    ) {
        match outcome {
            Ok(()) => self.delivered += 1,
            Err((_, DeliveryError::Gone)) => self.pruned.push(connection_id),
            Err((_, DeliveryError::OutOfTime)) => self.out_of_time = true,
            Err((from, e)) if e.is_retryable() => {
                debug!(connection_id, error = %e, "still failing after retries");
                // One entry per distinct list (shared lists by pointer) and starting POST.
                let key = (Arc::as_ptr(posts) as *const u8 as usize, from);
                self.failing
                    .entry(key)
                    .or_insert_with(|| (Arc::clone(posts), from, Vec::new()))
                    .2
                    .push(connection_id);
            }
            Err((_, e)) => {
                warn!(connection_id, error = %e, "frame refused; not retrying");
                self.rejected += 1;
            }
        }
    }
}

/// Sends each recipient its POSTs in order, `concurrency` recipients at a time.
async fn send(
    sender: &Sender<'_>,
    recipients: impl futures::Stream<Item = (String, Arc<[Vec<u8>]>)>,
    tally: GroupTally,
) -> GroupTally {
    recipients
        .map(|(connection_id, posts)| async move {
            let mut outcome = Ok(());
            for (i, post) in posts.iter().enumerate() {
                if let Err(e) = sender.send_with_retry(&connection_id, post).await {
                    outcome = Err((i, e));
                    break;
                }
            }
            (connection_id, posts, outcome)
        })
        .buffer_unordered(sender.config.concurrency)
        .fold(tally, |mut tally, (id, posts, outcome)| async move {
            tally.record(id, &posts, outcome);
            tally
        })
        .await
}

/// Prunes the gone, writes what the failing are owed as redelivery items (first round), and
/// fails the group if it ran out of time.
async fn settle(
    store: &dyn ChatStore,
    tally: GroupTally,
    mut report: DeliveryReport,
    room: &str,
    last_id: u64,
    now_ms: i64,
) -> Result<DeliveryReport, FanoutError> {
    report.delivered = tally.delivered;
    report.rejected = tally.rejected;
    report.pruned = tally.pruned;
    if !report.pruned.is_empty() {
        store
            .remove_connections(&report.pruned, LeaveReason::Gone, now_ms)
            .await?;
    }
    if tally.out_of_time {
        return Err(FanoutError::OutOfTime);
    }
    let not_before = now_ms + redelivery::backoff(1).as_millis() as i64;
    for (_, (posts, from, ids)) in tally.failing {
        report.redelivering += ids.len();
        for frames in redelivery_parts(&posts[from..]) {
            for round in redelivery::chunks(room, last_id, &frames, ids.clone(), 1, not_before) {
                // Written before the records are checkpointed: if this fails, the group fails
                // and Lambda retries it whole, so nothing owed is lost.
                store.schedule_redelivery(&round, now_ms).await?;
            }
        }
    }
    Ok(report)
}

/// Owed POSTs as the `frames` of redelivery items, at most [`REDELIVERY_FRAME_BYTES`] an item
/// (one POST over it goes alone), in order.
fn redelivery_parts(posts: &[Vec<u8>]) -> Vec<Vec<String>> {
    let mut parts: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0;
    for post in posts {
        let text = String::from_utf8_lossy(post).into_owned();
        match parts.last_mut() {
            Some(part) if bytes + text.len() <= REDELIVERY_FRAME_BYTES => {
                bytes += text.len();
                part.push(text);
            }
            _ => {
                bytes = text.len();
                parts.push(vec![text]);
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: usize, len: usize) -> Vec<u8> {
        let pad = "x".repeat(len.saturating_sub(31));
        format!(r#"{{"publicMessage":"{pad}","id":{:05}}}"#, i + 10_000).into_bytes()
    }

    #[test]
    fn one_frame_goes_as_itself() {
        // GIVEN one frame WHEN packed THEN the POST is the frame, byte for byte
        let f = frame(1, 100);
        assert_eq!(pack(std::slice::from_ref(&f)), vec![f]);
        assert!(pack::<Vec<u8>>(&[]).is_empty());
    }

    #[test]
    fn frames_are_packed_in_order_and_split_at_32_kb() {
        // GIVEN 100 frames of 1,000 bytes (100 KB in all)
        let frames: Vec<Vec<u8>> = (0..100).map(|i| frame(i, 1_000)).collect();
        // WHEN packed
        let posts = pack(&frames);
        // THEN no POST exceeds 32 KB, each is {"batch":[…]} of consecutive frames, and the
        // inner frames are the frames, byte for byte, in order
        assert_eq!(posts.len(), 4);
        let mut next = 0;
        for post in &posts {
            assert!(post.len() <= MAX_POST_BYTES, "{} bytes", post.len());
            let v: serde_json::Value = serde_json::from_slice(post).expect("json");
            let n = v["batch"].as_array().expect("batch").len();
            let mut expected = OPEN.to_vec();
            expected.extend(frames[next..next + n].join(&b','));
            expected.extend_from_slice(CLOSE);
            assert_eq!(post, &expected);
            next += n;
        }
        assert_eq!(next, frames.len());
        // AND a POST is as full as it can be: the next frame would not have fitted
        assert!(posts[0].len() + 1 + 1_000 > MAX_POST_BYTES);
    }

    #[test]
    fn a_frame_too_big_to_share_goes_alone() {
        // GIVEN a small frame, one of 40 KB, another small one
        let frames = vec![frame(1, 100), frame(2, 40_000), frame(3, 100)];
        // WHEN packed THEN three POSTs, each the frame itself
        assert_eq!(pack(&frames), frames);
    }

    #[test]
    fn exactly_32_kb_fits() {
        // GIVEN two frames that fill 32 KB exactly with the wrapper
        let overhead = OPEN.len() + CLOSE.len() + 1;
        let a = frame(1, 1_000);
        let b = frame(2, MAX_POST_BYTES - overhead - a.len());
        // WHEN packed THEN one POST of exactly 32 KB; one byte more splits it
        let posts = pack(&[a.clone(), b.clone()]);
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].len(), MAX_POST_BYTES);
        let c = frame(2, MAX_POST_BYTES - overhead - a.len() + 1);
        assert_eq!(pack(&[a.clone(), c.clone()]), vec![a, c]);
    }

    #[test]
    fn owed_posts_split_into_items_under_the_byte_budget() {
        let posts: Vec<Vec<u8>> = (0..20).map(|i| frame(i, 30_000)).collect();
        let parts = redelivery_parts(&posts);
        assert!(parts.len() > 1);
        assert!(parts
            .iter()
            .all(|p| p.iter().map(String::len).sum::<usize>() <= REDELIVERY_FRAME_BYTES));
        let flat: Vec<Vec<u8>> = parts.concat().into_iter().map(String::into_bytes).collect();
        assert_eq!(flat, posts);
    }

    #[test]
    fn opting_in() {
        assert!(opts_in(Some("1")));
        assert!(opts_in(Some("true")));
        assert!(!opts_in(Some("0")));
        assert!(!opts_in(None));
    }
}
