//! What happened in the chat: immutable, past-tense events, and their items in the event table.
//!
//! An event is written once, in the same transaction as the state change it records, and
//! never updated. The fan-out turns each into frames; the history replays them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys;
use crate::protocol::{Frame, FrameBody};

/// Why a member left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaveReason {
    /// `$disconnect` arrived.
    Disconnected,
    /// `@connections` answered 410 Gone: the connection was pruned by the fan-out.
    Gone,
    /// The same authenticated identity took its name back from a newer connection.
    Replaced,
    /// The member asked to leave the room (`leave`).
    Left,
    /// The connection's item expired (its TTL) without a `$disconnect` or a 410: DynamoDB's
    /// TTL deletion reached the fan-out on the connections table's stream
    /// ([`crate::expiry`]).
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    MemberJoined {
        connection_id: String,
        name: String,
    },
    MemberRenamed {
        connection_id: String,
        old_name: String,
        name: String,
    },
    MemberLeft {
        connection_id: String,
        name: String,
        reason: LeaveReason,
    },
    MessagePosted {
        connection_id: String,
        name: String,
        message: String,
    },
    PrivateMessageSent {
        connection_id: String,
        name: String,
        to_connection_id: String,
        to_name: String,
        message: String,
        /// The sender's authenticated identity, if its connection had one.
        identity: Option<String>,
        /// The recipient's authenticated identity, if its connection had one. With
        /// `identity`, who may read the message back from history (a name is not an
        /// identity: a later user could take a departed user's name).
        to_identity: Option<String>,
    },
}

impl ChatEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            ChatEvent::MemberJoined { .. } => "MemberJoined",
            ChatEvent::MemberRenamed { .. } => "MemberRenamed",
            ChatEvent::MemberLeft { .. } => "MemberLeft",
            ChatEvent::MessagePosted { .. } => "MessagePosted",
            ChatEvent::PrivateMessageSent { .. } => "PrivateMessageSent",
        }
    }

    /// Whether the member list changed (so every member gets a `members` frame).
    pub fn changes_membership(&self) -> bool {
        matches!(
            self,
            ChatEvent::MemberJoined { .. }
                | ChatEvent::MemberRenamed { .. }
                | ChatEvent::MemberLeft { .. }
        )
    }
}

/// An event as committed: its room, its id (the room's sequence number) and commit time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub room: String,
    pub seq: u64,
    pub ts: i64,
    pub event: ChatEvent,
}

impl StoredEvent {
    fn frame(&self, body: FrameBody) -> Frame {
        // Private messages are addressed to a name, not a room: their frame has no `room`
        // (its id is in lobby's sequence, where the message is logged).
        let room = match self.event {
            ChatEvent::PrivateMessageSent { .. } => None,
            _ => Some(self.room.clone()),
        };
        Frame {
            body,
            room,
            id: Some(self.seq),
            ts: Some(self.ts),
        }
    }

    /// The frame everyone (or the recipient) gets for this event, other than `members`.
    /// Joins and leaves also need the member list, which the fan-out reads at delivery time.
    pub fn message_frame(&self) -> Frame {
        let body = match &self.event {
            ChatEvent::MemberJoined { name, .. } => {
                FrameBody::SystemMessage(format!("{name} has joined the chat"))
            }
            ChatEvent::MemberRenamed { old_name, name, .. } => {
                FrameBody::SystemMessage(format!("{old_name} is now known as {name}"))
            }
            ChatEvent::MemberLeft { name, .. } => {
                FrameBody::SystemMessage(format!("{name} has left the chat"))
            }
            ChatEvent::MessagePosted { name, message, .. } => {
                FrameBody::PublicMessage(format!("{name}: {message}"))
            }
            ChatEvent::PrivateMessageSent { name, message, .. } => {
                FrameBody::PrivateMessage(format!("{name}: {message}"))
            }
        };
        self.frame(body)
    }

    pub fn members_frame(&self, names: Vec<String>) -> Frame {
        self.frame(FrameBody::Members(names))
    }

    /// The frames each member gets, in the tutorial's order: a join (or rename) sends
    /// `members` first, then the `systemMessage`; a leave sends the `systemMessage`, then
    /// `members`.
    pub fn membership_frames(&self, names: Vec<String>) -> Vec<Frame> {
        let members = self.members_frame(names);
        let message = self.message_frame();
        match self.event {
            ChatEvent::MemberLeft { .. } => vec![message, members],
            _ => vec![members, message],
        }
    }
}

/// The event table item, flat as stored (see [`crate::keys`] for each attribute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub pk: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub v: u32,
    pub ts: i64,
    pub expires_at: i64,
    pub connection_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_connection_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_identity: Option<String>,
}

pub const EVENT_ITEM_VERSION: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event item has no {0}")]
    MissingAttribute(&'static str),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("unsupported event item version {0}")]
    UnsupportedVersion(u32),
    #[error("partition key {0:?} is not a room key")]
    BadPartitionKey(String),
}

impl EventItem {
    pub fn new(stored: &StoredEvent, expires_at: i64) -> Self {
        let mut item = EventItem {
            pk: keys::room_pk(&stored.room),
            seq: stored.seq,
            kind: stored.event.type_name().to_owned(),
            v: EVENT_ITEM_VERSION,
            ts: stored.ts,
            expires_at,
            connection_id: String::new(),
            name: String::new(),
            old_name: None,
            message: None,
            to_connection_id: None,
            to_name: None,
            reason: None,
            identity: None,
            to_identity: None,
        };
        match &stored.event {
            ChatEvent::MemberJoined {
                connection_id,
                name,
            } => {
                item.connection_id.clone_from(connection_id);
                item.name.clone_from(name);
            }
            ChatEvent::MemberRenamed {
                connection_id,
                old_name,
                name,
            } => {
                item.connection_id.clone_from(connection_id);
                item.name.clone_from(name);
                item.old_name = Some(old_name.clone());
            }
            ChatEvent::MemberLeft {
                connection_id,
                name,
                reason,
            } => {
                item.connection_id.clone_from(connection_id);
                item.name.clone_from(name);
                item.reason = Some(*reason);
            }
            ChatEvent::MessagePosted {
                connection_id,
                name,
                message,
            } => {
                item.connection_id.clone_from(connection_id);
                item.name.clone_from(name);
                item.message = Some(message.clone());
            }
            ChatEvent::PrivateMessageSent {
                connection_id,
                name,
                to_connection_id,
                to_name,
                message,
                identity,
                to_identity,
            } => {
                item.connection_id.clone_from(connection_id);
                item.name.clone_from(name);
                item.to_connection_id = Some(to_connection_id.clone());
                item.to_name = Some(to_name.clone());
                item.message = Some(message.clone());
                item.identity.clone_from(identity);
                item.to_identity.clone_from(to_identity);
            }
        }
        item
    }
}

impl TryFrom<EventItem> for StoredEvent {
    type Error = DecodeError;

    fn try_from(item: EventItem) -> Result<Self, DecodeError> {
        if item.v != EVENT_ITEM_VERSION {
            return Err(DecodeError::UnsupportedVersion(item.v));
        }
        let room = item
            .pk
            .strip_prefix("ROOM#")
            .ok_or_else(|| DecodeError::BadPartitionKey(item.pk.clone()))?
            .to_owned();
        let need =
            |v: Option<String>, what: &'static str| v.ok_or(DecodeError::MissingAttribute(what));
        let EventItem {
            connection_id,
            name,
            ..
        } = item.clone();
        let event = match item.kind.as_str() {
            "MemberJoined" => ChatEvent::MemberJoined {
                connection_id,
                name,
            },
            "MemberRenamed" => ChatEvent::MemberRenamed {
                connection_id,
                old_name: need(item.old_name, "oldName")?,
                name,
            },
            "MemberLeft" => ChatEvent::MemberLeft {
                connection_id,
                name,
                reason: item.reason.ok_or(DecodeError::MissingAttribute("reason"))?,
            },
            "MessagePosted" => ChatEvent::MessagePosted {
                connection_id,
                name,
                message: need(item.message, "message")?,
            },
            "PrivateMessageSent" => ChatEvent::PrivateMessageSent {
                connection_id,
                name,
                to_connection_id: need(item.to_connection_id, "toConnectionId")?,
                to_name: need(item.to_name, "toName")?,
                message: need(item.message, "message")?,
                identity: item.identity,
                to_identity: item.to_identity,
            },
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        };
        Ok(StoredEvent {
            room,
            seq: item.seq,
            ts: item.ts,
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(event: ChatEvent) -> StoredEvent {
        StoredEvent {
            room: "lobby".into(),
            seq: 3,
            ts: 1_000,
            event,
        }
    }

    #[test]
    fn every_event_round_trips_through_its_item() {
        let events = [
            ChatEvent::MemberJoined {
                connection_id: "c1".into(),
                name: "alice".into(),
            },
            ChatEvent::MemberRenamed {
                connection_id: "c1".into(),
                old_name: "alice".into(),
                name: "al".into(),
            },
            ChatEvent::MemberLeft {
                connection_id: "c1".into(),
                name: "al".into(),
                reason: LeaveReason::Gone,
            },
            ChatEvent::MessagePosted {
                connection_id: "c1".into(),
                name: "al".into(),
                message: "hi".into(),
            },
            ChatEvent::PrivateMessageSent {
                connection_id: "c1".into(),
                name: "al".into(),
                to_connection_id: "c2".into(),
                to_name: "bob".into(),
                message: "psst".into(),
                identity: None,
                to_identity: None,
            },
            ChatEvent::PrivateMessageSent {
                connection_id: "c1".into(),
                name: "al".into(),
                to_connection_id: "c2".into(),
                to_name: "bob".into(),
                message: "psst".into(),
                identity: Some("user-1".into()),
                to_identity: Some("user-2".into()),
            },
        ];
        for event in events {
            // GIVEN a stored event  WHEN written as an item and as DynamoDB attributes, then read back
            let s = stored(event);
            let item = EventItem::new(&s, 99);
            let attrs: serde_dynamo::Item = serde_dynamo::to_item(&item).expect("to item");
            let back: EventItem = serde_dynamo::from_item(attrs).expect("from item");
            // THEN nothing is lost
            assert_eq!(back, item);
            assert_eq!(StoredEvent::try_from(back).expect("decode"), s);
        }
    }

    #[test]
    fn frames_follow_the_tutorial_wording_and_order() {
        let join = stored(ChatEvent::MemberJoined {
            connection_id: "c".into(),
            name: "alice".into(),
        });
        let frames = join.membership_frames(vec!["alice".into()]);
        assert_eq!(frames[0].body, FrameBody::Members(vec!["alice".into()]));
        assert_eq!(
            frames[1].body,
            FrameBody::SystemMessage("alice has joined the chat".into())
        );
        let leave = stored(ChatEvent::MemberLeft {
            connection_id: "c".into(),
            name: "alice".into(),
            reason: LeaveReason::Disconnected,
        });
        let frames = leave.membership_frames(vec![]);
        assert_eq!(
            frames[0].body,
            FrameBody::SystemMessage("alice has left the chat".into())
        );
        assert_eq!(frames[1].body, FrameBody::Members(vec![]));
        assert!(frames
            .iter()
            .all(|f| f.id == Some(3) && f.ts == Some(1_000) && f.room.as_deref() == Some("lobby")));
        let public = stored(ChatEvent::MessagePosted {
            connection_id: "c".into(),
            name: "alice".into(),
            message: "hello".into(),
        });
        assert_eq!(
            public.message_frame().body,
            FrameBody::PublicMessage("alice: hello".into())
        );
        // AND a room's frames carry that room; a private message's carry none
        let in_ops = StoredEvent {
            room: "ops".into(),
            ..public
        };
        assert_eq!(
            in_ops.message_frame().to_json(),
            r#"{"publicMessage":"alice: hello","room":"ops","id":3,"ts":1000}"#
        );
        let private = stored(ChatEvent::PrivateMessageSent {
            connection_id: "c".into(),
            name: "alice".into(),
            to_connection_id: "d".into(),
            to_name: "bob".into(),
            message: "psst".into(),
            identity: None,
            to_identity: None,
        });
        assert_eq!(
            private.message_frame().to_json(),
            r#"{"privateMessage":"alice: psst","id":3,"ts":1000}"#
        );
    }

    #[test]
    fn items_that_cannot_be_events_are_decode_errors() {
        let s = stored(ChatEvent::MessagePosted {
            connection_id: "c".into(),
            name: "a".into(),
            message: "m".into(),
        });
        let mut item = EventItem::new(&s, 1);
        item.kind = "Exploded".into();
        assert_eq!(
            StoredEvent::try_from(item.clone()),
            Err(DecodeError::UnknownType("Exploded".into()))
        );
        item.kind = "MessagePosted".into();
        item.message = None;
        assert_eq!(
            StoredEvent::try_from(item.clone()),
            Err(DecodeError::MissingAttribute("message"))
        );
        item.v = 9;
        assert_eq!(
            StoredEvent::try_from(item),
            Err(DecodeError::UnsupportedVersion(9))
        );
    }
}
