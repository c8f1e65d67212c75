//! The rooms' logs: public posts in a room, private messages (numbered in lobby's log), the
//! history reads, and the redelivery items that share the events table.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;

use super::connections::live;
use super::expr::{check, claim_key, conn_key, n, s, Expr};
use super::requests::requested;
use super::rooms::name_unchanged;
use super::txn::{Attempt, Change, Membership};
use super::DynamoStore;
use crate::events::{ChatEvent, EventItem, StoredEvent};
use crate::keys::{self, DEFAULT_ROOM};
use crate::protocol::EventRef;
use crate::redelivery::{Redelivery, RedeliveryItem};
use crate::store::aws_like::ReadOp;
use crate::store::requests::{Once, RequestKey};
use crate::store::{epoch_secs, EventRange, EventsPage, StoreError};
use crate::validation::recipient_key;

impl DynamoStore {
    /// `MessagePosted` in `room` from a member of it; with `request`, at most once
    /// ([`super::requests`]).
    pub(super) async fn post(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        let posted = self
            .append_one(
                "TransactWriteItems post",
                room,
                now_ms,
                move |counter, attempt| {
                    Box::pin(async move {
                        let conn = live(self.get_conn(connection_id).await?, now_ms)
                            .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                        let req = requested(request, &conn);
                        if let Some(done) = self.done_before(req.as_ref(), attempt, now_ms).await? {
                            return Ok(Attempt::Done(done));
                        }
                        let checked = match &conn.name {
                            None => Err(StoreError::NameRequired),
                            Some(_) if conn.shard_in(room).is_none() => {
                                Err(StoreError::NotAMember(room.to_owned()))
                            }
                            Some(name) => Ok(name.clone()),
                        };
                        let name = match checked {
                            Ok(name) => name,
                            Err(e) => {
                                return self
                                    .unless_done(req.as_ref(), e, now_ms)
                                    .await
                                    .map(Attempt::Done)
                            }
                        };
                        // The condition is on the connection item, not the member item: it is the
                        // one item that says both that the sender is a member and by which name,
                        // and it has been read already (the member item is only written with it).
                        let mut items = vec![check(
                            &self.tables.connections,
                            conn_key(connection_id),
                            name_unchanged(&conn).and(
                                Expr::new("attribute_exists(#rooms.#room)").name("#room", room),
                            ),
                        )?];
                        if let Some(r) = &req {
                            let id = EventRef {
                                room: room.to_owned(),
                                id: counter.last + 1,
                            };
                            items.push(self.request_put(
                                r,
                                connection_id,
                                None,
                                vec![id],
                                now_ms,
                            )?);
                        }
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::MessagePosted {
                                connection_id: connection_id.to_owned(),
                                name,
                                message: message.to_owned(),
                            }],
                            membership: Membership::Unchanged,
                        }))
                    })
                },
            )
            .await?;
        Ok(match posted {
            Ok(event) => Once::First(event),
            Err(done) => Once::Again(done),
        })
    }

    /// `PrivateMessageSent` from a named connection to the holder of the name `to`, numbered
    /// in lobby's log whether or not either is a member of lobby; with `request`, at most once.
    pub(super) async fn whisper(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        // `None`: no valid name has this key, and it may be too long to be a DynamoDB key.
        let to_key = recipient_key(to);
        let to_key = to_key.as_deref();
        let sent = self
            .append_one(
                "TransactWriteItems sendPrivate",
                DEFAULT_ROOM,
                now_ms,
                move |counter, attempt| {
                    Box::pin(async move {
                        let conn = live(self.get_conn(connection_id).await?, now_ms)
                            .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                        let req = requested(request, &conn);
                        if let Some(done) = self.done_before(req.as_ref(), attempt, now_ms).await? {
                            return Ok(Attempt::Done(done));
                        }
                        let found = async {
                            let name = conn.name.clone().ok_or(StoreError::NameRequired)?;
                            let unknown = || StoreError::UnknownRecipient(to.to_owned());
                            let to_key = to_key.ok_or_else(unknown)?;
                            if conn.name_key.as_deref() == Some(to_key) {
                                return Err(StoreError::SelfRecipient);
                            }
                            let recipient = self
                                .get_claim(to_key)
                                .await?
                                .filter(|c| c.expires_at > now_s)
                                .ok_or_else(unknown)?;
                            let recipient_id = recipient.connection_id.ok_or_else(unknown)?;
                            let to_conn = live(self.get_conn(&recipient_id).await?, now_ms)
                                .filter(|c| c.name_key.as_deref() == Some(to_key))
                                .ok_or_else(unknown)?;
                            Ok((name, to_key, to_conn))
                        }
                        .await;
                        let (name, to_key, to_conn) = match found {
                            Ok(found) => found,
                            Err(e) => {
                                return self
                                    .unless_done(req.as_ref(), e, now_ms)
                                    .await
                                    .map(Attempt::Done)
                            }
                        };
                        let mut items = vec![
                            check(
                                &self.tables.connections,
                                conn_key(connection_id),
                                name_unchanged(&conn),
                            )?,
                            check(
                                &self.tables.connections,
                                claim_key(to_key),
                                Expr::new("#conn = :to").value(":to", s(&to_conn.connection_id)),
                            )?,
                        ];
                        if let Some(r) = &req {
                            let id = EventRef {
                                room: DEFAULT_ROOM.to_owned(),
                                id: counter.last + 1,
                            };
                            items.push(self.request_put(
                                r,
                                connection_id,
                                None,
                                vec![id],
                                now_ms,
                            )?);
                        }
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::PrivateMessageSent {
                                connection_id: connection_id.to_owned(),
                                name,
                                to_name: to_conn.name.clone().unwrap_or_default(),
                                to_connection_id: to_conn.connection_id,
                                message: message.to_owned(),
                                identity: conn.identity.clone(),
                                to_identity: to_conn.identity,
                            }],
                            membership: Membership::Unchanged,
                        }))
                    })
                },
            )
            .await?;
        Ok(match sent {
            Ok(event) => Once::First(event),
            Err(done) => Once::Again(done),
        })
    }

    pub(super) async fn query_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        let limit = limit.max(1);
        // Events are `seq >= 1`: the room's counter (seq 0) is never part of a read.
        let (condition, lo, hi, forward) = match range {
            EventRange::After(after) => ("#pk = :pk AND #seq > :lo", after, None, true),
            EventRange::Before(Some(before)) if before <= 1 => {
                return Ok(EventsPage::default());
            }
            EventRange::Before(Some(before)) => (
                "#pk = :pk AND #seq BETWEEN :lo AND :hi",
                1,
                Some(before - 1),
                false,
            ),
            EventRange::Before(None) => ("#pk = :pk AND #seq > :lo", 0, None, false),
        };
        let names = HashMap::from([
            ("#pk".to_owned(), keys::PK.to_owned()),
            ("#seq".to_owned(), keys::SEQ.to_owned()),
            ("#exp".to_owned(), keys::EXPIRES_AT.to_owned()),
        ]);
        let mut values = HashMap::from([
            (":pk".to_owned(), s(keys::room_pk(room))),
            (":now".to_owned(), n(epoch_secs(now_ms))),
            (":lo".to_owned(), n(lo)),
        ]);
        if let Some(hi) = hi {
            values.insert(":hi".to_owned(), n(hi));
        }
        let mut events = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        // Expired items are filtered out, so one Query page can come back short: keep reading
        // until the page is full or the range is exhausted.
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.tables.events)
                .key_condition_expression(condition)
                .filter_expression("#exp > :now")
                .set_expression_attribute_names(Some(names.clone()))
                .set_expression_attribute_values(Some(values.clone()))
                .scan_index_forward(forward)
                .consistent_read(ReadOp::QueryEvents.consistent_read())
                .limit(i32::try_from(limit - events.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| StoreError::backend("Query events", e))?;
            for item in out.items.unwrap_or_default() {
                // An item that is not an event (written by hand, or by a newer version) is
                // skipped, as the fan-out skips it: one bad item must not make the history
                // unreadable for its whole retention.
                let seq = item.get(keys::SEQ).and_then(|v| v.as_n().ok()).cloned();
                match serde_dynamo::from_item::<_, EventItem>(item)
                    .map_err(|e| e.to_string())
                    .and_then(|i| StoredEvent::try_from(i).map_err(|e| e.to_string()))
                {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::warn!(?seq, error = %e, "skipping an events-table item that is not a chat event")
                    }
                }
            }
            match out.last_evaluated_key {
                Some(key) if events.len() < limit => start = Some(key),
                Some(_) => break,
                None => return Ok(EventsPage { events, next: None }),
            }
        }
        let next = events.last().map(|e| e.seq);
        Ok(EventsPage { events, next })
    }

    pub(super) async fn put_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // A fresh random key each attempt: the condition makes a collision a retry, never an
        // overwrite of another fan-out's item.
        for _ in 0..3 {
            let seq = crate::redelivery::unique_seq(now_ms);
            let item = serde_dynamo::to_item(RedeliveryItem::new(redelivery, seq, now_ms))
                .map_err(|e| StoreError::Malformed(format!("redelivery item: {e}")))?;
            let put = self
                .client
                .put_item()
                .table_name(&self.tables.events)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", keys::PK)
                .send()
                .await;
            match put {
                Ok(_) => return Ok(()),
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    continue
                }
                Err(e) => return Err(StoreError::backend("PutItem redelivery", e)),
            }
        }
        Err(StoreError::Contention(3))
    }
}
