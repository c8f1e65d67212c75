//! Request items in the DynamoDB adapter ([`crate::store::requests`]): the put that goes in a
//! request's transaction, and the strongly consistent read that tells a resend.
//!
//! The put's condition (no live item) makes a resend's transaction cancel; the loop then
//! builds again, and the build reads the item first ([`DynamoStore::done_before`]) on every
//! attempt after the first. A refusal (not a member any more, …) also reads it before it is
//! given ([`DynamoStore::unless_done`]): a resend of a request that was done is answered from
//! its item, whatever has changed since. The common path (a first send that commits) reads
//! nothing more than without a `requestId`.

use aws_sdk_dynamodb::types::TransactWriteItem;

use super::expr::{key, n, put, with_key, Expr};
use super::DynamoStore;
use crate::keys;
use crate::protocol::EventRef;
use crate::store::aws_like::ReadOp;
use crate::store::items::{ConnItem, RequestItem};
use crate::store::requests::{scope, RequestKey};
use crate::store::{epoch_secs, StoreError};

/// A request with a `requestId`, and the scope it is unique in.
pub(super) struct Requested<'k> {
    pub key: &'k RequestKey,
    pub scope: String,
}

impl<'k> Requested<'k> {
    /// `key` sent by `conn` (its scope: its identity, else itself).
    pub fn new(key: &'k RequestKey, conn: &ConnItem) -> Self {
        Requested {
            key,
            scope: scope(&conn.connection_id, conn.identity.as_deref()),
        }
    }

    fn item_key(&self) -> super::expr::Item {
        key(keys::request_pk(&self.scope), &self.key.request_id)
    }
}

/// `key` sent by `conn`, when there is a key.
pub(super) fn requested<'k>(key: Option<&'k RequestKey>, conn: &ConnItem) -> Option<Requested<'k>> {
    key.map(|k| Requested::new(k, conn))
}

impl DynamoStore {
    /// The live request item of `r`, if any: `Err(RequestIdReused)` if it recorded another
    /// request.
    pub(super) async fn find_request(
        &self,
        r: &Requested<'_>,
        now_ms: i64,
    ) -> Result<Option<RequestItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(r.item_key()))
            .consistent_read(ReadOp::GetRequest.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem request", e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let item: RequestItem = serde_dynamo::from_item(item)
            .map_err(|e| StoreError::Malformed(format!("request item: {e}")))?;
        if item.expires_at <= epoch_secs(now_ms) {
            return Ok(None);
        }
        r.key.matches(item).map(Some)
    }

    /// On an attempt after the first (the last one's transaction was cancelled, perhaps by
    /// this request's own item), the request's item if it is done already.
    pub(super) async fn done_before(
        &self,
        r: Option<&Requested<'_>>,
        attempt: u32,
        now_ms: i64,
    ) -> Result<Option<RequestItem>, StoreError> {
        match r {
            Some(r) if attempt > 1 => self.find_request(r, now_ms).await,
            _ => Ok(None),
        }
    }

    /// A refusal `err` of a request, unless it was done already: then its item (a resend in a
    /// state its first send changed is answered as the first was).
    pub(super) async fn unless_done(
        &self,
        r: Option<&Requested<'_>>,
        err: StoreError,
        now_ms: i64,
    ) -> Result<RequestItem, StoreError> {
        if err.is_failure() {
            return Err(err);
        }
        match r {
            Some(r) => self.find_request(r, now_ms).await?.ok_or(err),
            None => Err(err),
        }
    }

    /// The put of `r`'s request item, recording `events` (and `name`), for its transaction:
    /// on the condition that no live one exists.
    pub(super) fn request_put(
        &self,
        r: &Requested<'_>,
        connection_id: &str,
        name: Option<&str>,
        events: Vec<EventRef>,
        now_ms: i64,
    ) -> Result<TransactWriteItem, StoreError> {
        let record = r.key.record(connection_id, name, events, now_ms);
        let item = serde_dynamo::to_item(&record)
            .map_err(|e| StoreError::Malformed(format!("request item: {e}")))?;
        put(
            &self.tables.connections,
            with_key(item, r.item_key()),
            Some(
                Expr::new("attribute_not_exists(#pk) OR #exp <= :now")
                    .value(":now", n(epoch_secs(now_ms))),
            ),
        )
    }

    /// Sets the events of `r`'s item to the whole answer (a rename's later rooms).
    pub(super) async fn complete_request(
        &self,
        r: &Requested<'_>,
        events: Vec<EventRef>,
    ) -> Result<(), StoreError> {
        let events = serde_dynamo::to_attribute_value(&events)
            .map_err(|e| StoreError::Malformed(format!("request events: {e}")))?;
        self.client
            .update_item()
            .table_name(&self.tables.connections)
            .set_key(Some(r.item_key()))
            .update_expression("SET #events = :events")
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#events", "events")
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_values(":events", events)
            .send()
            .await
            .map_err(|e| StoreError::backend("UpdateItem request", e))?;
        Ok(())
    }
}
