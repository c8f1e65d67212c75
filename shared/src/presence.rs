//! Presence: the frames a room's members get for its joins, renames and leaves, and the room's
//! budget of presence changes.
//!
//! ## Frames: a function of the events, not of batch boundaries
//! A client drops a frame whose (`room`, `id`, frame key) it has seen (README, *Guarantees*).
//! For that rule to suppress every duplicate and lose nothing, a presence frame must be the
//! same whichever stream batch carries its event: Lambda retries a batch with other boundaries
//! (it bisects on error, batch sizes vary), and `history` serves each event on its own. So:
//! - **every presence event gets its own `systemMessage`**, with its own `id` and `ts`, exactly
//!   the frame `history` serves for it ([`StoredEvent::message_frame`]): "alice has joined the
//!   chat", "alice is now known as al", "alice has left the chat";
//! - **`members` is a state snapshot**, not an event: one per run of consecutive changes of the
//!   room in a batch (so a run of N changes costs each member N + 1 frames, not 2N), carrying
//!   the id (and `ts`) of the run's last change and the room's list as read when it is sent.
//!   A client applies a `members` frame only if its `id` is higher than that of the last
//!   `members` frame it applied for the room (a redelivered run split at another boundary
//!   brings lists with older ids: they are stale, not news). The tutorial's client applies
//!   every list; a stale one is corrected by the next change.
//!
//! A single change keeps the tutorial's two frames in its order: a join or rename sends
//! `members` then the `systemMessage`; a leave the `systemMessage` then `members`. A run sends
//! `members` first, then the messages in id order, unless every change of the run is a leave
//! (messages first, then `members`, as for one leave).
//!
//! **Cost.** A run of N changes costs each of the room's M members N + 1 POSTs. Summaries (one
//! message for the whole run, the design this replaced) cost 2 per member but made the text and
//! id depend on where the batch was cut. The budget below bounds N per room per second instead.
//!
//! ## The room's presence budget (`ROOM_PRESENCE_POSTS_PER_SECOND`)
//! A change in a room of M members costs about 2M `@connections` POSTs (a `members` frame and a
//! `systemMessage` each): 2,000 at the presence limit of 1,000. One connection alternating
//! rename and post (5 requests/s) could spend the account's 10,000 requests/s alone. So each
//! room has a budget of POSTs per second for its presence: a rename, a `join`, a first
//! `setName` (a join of `lobby`) or a `leave` is charged 2 × (M + 1) in the room's budget item
//! for the current second (`PRESENCE#<room>`, [`crate::keys`]; M from the room's counter, as
//! read; a room past its large-room limit costs nothing: its presence is not broadcast), and is
//! refused with `presence_rate_limited`
//! and a `retryAfterMs` hint when the second's budget cannot pay for it. Nothing is written for
//! a refused request (the check comes first). A window always admits its first change, however
//! large the room, so every room can change at least once a second.
//!
//! **Joins are not refused: over the budget they are unsequenced.** A `join` (or a first
//! `setName`, which joins `lobby`) the budget cannot pay for is written as an unsequenced join
//! — the member item and the connection's `rooms` entry, no `MemberJoined`, so no broadcast —
//! exactly as a join of a large room or one that lost the room's counter three times
//! ([`crate::keys`], *Unsequenced joins*): the joiner is answered `{"joined":{"room","id"}}`
//! with the room's last id and catches up from there; the room's members see it in the next
//! `members` frame (the fan-out reads the member items), without a "has joined" message. A
//! join storm therefore completes without errors (issue #10 item 13: 500 joins/s into one room)
//! while the room's presence POSTs stay within the budget. The handler marks such a store call
//! with [`unsequenced_joins`]; both stores ask [`joins_unsequenced`] where they decide whether a
//! join is sequenced. Renames and `leave`s are refused instead: a rename storm is the abuse the
//! budget is for, and a refused leave is simply retried.
//!
//! The default, 2,000 POSTs/s, is a fifth of the account's 10,000 requests/s quota: one change
//! per second in a room at the presence limit, 100 per second in a room of 10. A room's
//! presence at its worst leaves four fifths of the quota to messages and to everyone else.
//! Disconnects (and prunes on 410) are not refused — a closed socket cannot be told to retry —
//! and not charged; each is the leave of a member whose join was charged, so over any stretch
//! of time they add at most what the joins cost.
//!
//! **What it does not do.** The budget protects the account's quota, not fairness inside a room:
//! one member renaming once a second can spend a room-at-the-limit's whole budget, and a
//! request refused for another reason after its charge (a `name_taken` rename, a `leave` of a
//! room it is not in) keeps its charge. The per-connection and per-principal rate limits bound
//! both. With the budget off, a storm of N joins into one room costs O(N × M) posts, as every
//! change is announced to every member.

use std::future::Future;

use crate::events::{ChatEvent, StoredEvent};
use crate::protocol::Frame;

tokio::task_local! {
    /// Set by the handler around the store call of a join its room's presence budget could
    /// not pay for (see the module docs). A task-local rather than a parameter: the decision
    /// sits deep in both stores' append loops, beside the large-room and contended cases, and
    /// no other caller ever asks for it.
    static UNSEQUENCED_JOINS: bool;
}

/// Runs `store_call` (a `join_room` or a first `set_name`) with its joins unsequenced: no
/// `MemberJoined`, no broadcast (see the module docs).
pub async fn unsequenced_joins<F: Future>(store_call: F) -> F::Output {
    UNSEQUENCED_JOINS.scope(true, store_call).await
}

/// Whether the store call running now was asked to join unsequenced
/// ([`unsequenced_joins`]); false outside one.
pub fn joins_unsequenced() -> bool {
    UNSEQUENCED_JOINS.try_with(|on| *on).unwrap_or(false)
}

/// The frames every member of the room gets for a run of presence changes of that room (see
/// the module docs): one `systemMessage` per change, identical to the one `history` serves,
/// and one `members` snapshot (`names`) with the run's last id.
pub fn presence_frames(run: &[StoredEvent], names: Vec<String>) -> Vec<Frame> {
    let Some(last) = run.last() else {
        return Vec::new();
    };
    let messages = run.iter().map(StoredEvent::message_frame);
    let members = last.members_frame(names);
    let only_leaves = run
        .iter()
        .all(|e| matches!(e.event, ChatEvent::MemberLeft { .. }));
    if only_leaves {
        messages.chain(std::iter::once(members)).collect()
    } else {
        std::iter::once(members).chain(messages).collect()
    }
}

/// `ROOM_PRESENCE_POSTS_PER_SECOND`: the `@connections` POSTs per second one room's presence
/// changes may cost (0 turns the budget off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceBudget {
    pub posts_per_second: u32,
}

/// A fifth of the account's 10,000 requests/s (see the module docs).
pub const DEFAULT_ROOM_PRESENCE_POSTS_PER_SECOND: u32 = 2_000;

impl Default for PresenceBudget {
    fn default() -> Self {
        PresenceBudget {
            posts_per_second: DEFAULT_ROOM_PRESENCE_POSTS_PER_SECOND,
        }
    }
}

impl PresenceBudget {
    pub const OFF: PresenceBudget = PresenceBudget {
        posts_per_second: 0,
    };

    pub fn is_off(&self) -> bool {
        self.posts_per_second == 0
    }

    /// What one change costs in a room of `members` members (as its counter says), `large`
    /// or not: its `members` frame and its `systemMessage` to each member, the joiner included.
    pub fn cost(members: u64, large: bool) -> u64 {
        if large {
            0
        } else {
            2 * (members + 1)
        }
    }

    /// The most the window may hold before a change of `cost` is charged: the change is
    /// admitted if the window holds at most this (or is empty). Negative: only an empty window
    /// admits it.
    pub fn admits_up_to(&self, cost: u64) -> i64 {
        i64::from(self.posts_per_second) - cost as i64
    }
}

/// The budget's window: one second. Returns the window's index (epoch seconds) and when its
/// item may expire (epoch seconds: a minute after it ends).
pub fn window(now_ms: i64) -> (i64, i64) {
    let index = now_ms.div_euclid(1000);
    (index, index + 61)
}

/// How long until the next window opens: the `retryAfterMs` of a refusal.
pub fn retry_after_ms(now_ms: i64) -> u64 {
    (1000 - now_ms.rem_euclid(1000)) as u64
}

/// What the budget said about one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetVerdict {
    /// Charged (or free: a large room, or the budget is off).
    Allowed,
    /// The room's window cannot pay for it: retry after this many ms.
    Exceeded { retry_after_ms: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::LeaveReason;
    use crate::protocol::FrameBody;

    fn event(seq: u64, event: ChatEvent) -> StoredEvent {
        StoredEvent {
            room: "lobby".into(),
            seq,
            ts: seq as i64 * 10,
            event,
        }
    }

    fn joined(seq: u64, name: &str) -> StoredEvent {
        event(
            seq,
            ChatEvent::MemberJoined {
                connection_id: name.into(),
                name: name.into(),
            },
        )
    }

    fn left(seq: u64, name: &str) -> StoredEvent {
        event(
            seq,
            ChatEvent::MemberLeft {
                connection_id: name.into(),
                name: name.into(),
                reason: LeaveReason::Disconnected,
            },
        )
    }

    #[test]
    fn one_change_gets_the_tutorials_frames() {
        for e in [joined(4, "alice"), left(4, "alice")] {
            let frames = presence_frames(std::slice::from_ref(&e), vec!["alice".into()]);
            assert_eq!(frames, e.membership_frames(vec!["alice".into()]));
        }
    }

    #[test]
    fn a_run_is_one_message_per_change_as_history_serves_it_and_one_list() {
        // GIVEN two joins, a leave and a rename in one run
        let run = vec![
            joined(1, "a"),
            joined(2, "b"),
            left(3, "z"),
            event(
                4,
                ChatEvent::MemberRenamed {
                    connection_id: "a".into(),
                    old_name: "a".into(),
                    name: "aa".into(),
                },
            ),
        ];
        // WHEN framed
        let frames = presence_frames(&run, vec!["aa".into(), "b".into()]);
        // THEN the list first, with the last change's id, then each change's own frame
        assert_eq!(frames.len(), 5);
        assert_eq!(
            frames[0],
            run[3].members_frame(vec!["aa".into(), "b".into()])
        );
        for (frame, e) in frames[1..].iter().zip(&run) {
            assert_eq!(frame, &e.message_frame());
            assert_eq!(
                Some(frame.to_json()),
                crate::history::history_frame(e, None)
            );
        }
        // AND leaves only keep the tutorial's order: the messages before the list
        let frames = presence_frames(&[left(1, "x"), left(2, "y")], vec![]);
        assert_eq!(
            frames[0].body,
            FrameBody::SystemMessage("x has left the chat".into())
        );
        assert_eq!((frames[1].id, frames[2].id), (Some(2), Some(2)));
        assert_eq!(frames[2].body, FrameBody::Members(vec![]));
    }

    #[test]
    fn the_budget_charges_two_posts_per_member_and_nothing_in_a_large_room() {
        assert_eq!(PresenceBudget::cost(9, false), 20);
        assert_eq!(PresenceBudget::cost(5_000, true), 0);
        let b = PresenceBudget::default();
        // A room at the presence limit: one change a second.
        assert_eq!(b.admits_up_to(PresenceBudget::cost(999, false)), 0);
        assert_eq!(window(1_999), (1, 62));
        assert_eq!(retry_after_ms(1_999), 1);
        assert_eq!(retry_after_ms(2_000), 1_000);
    }
}
