//! Limits across a principal's connections ([`crate::ratelimit`]): the connection slots taken at
//! `$connect` (in the transaction that records the connection) and given back on removal, and
//! the per-window request counter. Both items live in the principal's own partition
//! (`LIMIT#<principal>`, [`crate::keys`]).

use super::expr::{key, n, put, with_key, Expr, Item};
use super::txn::{backoff, MAX_ATTEMPTS};
use super::DynamoStore;
use crate::keys;
use crate::ratelimit;
use crate::store::items::SlotsItem;
use crate::store::{epoch_secs, Admission, StoreError};

fn slots_key(principal: &str) -> Item {
    key(keys::limit_pk(principal), keys::LIMIT_SLOTS_SK)
}

impl DynamoStore {
    /// The principal's slots item, read strongly consistent (an admission builds on it).
    async fn read_slots(&self, principal: &str) -> Result<Option<SlotsItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(slots_key(principal)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem connection slots", e))?;
        out.item
            .map(|item| {
                serde_dynamo::from_item(item)
                    .map_err(|e| StoreError::Malformed(format!("slots of {principal}: {e}")))
            })
            .transpose()
    }

    /// Takes a slot for `connection_id` and puts `conn_item` (the whole connection item, key
    /// included) in one transaction: `Ok(false)` when the principal has no slot free.
    pub(super) async fn admit(
        &self,
        admission: Admission<'_>,
        connection_id: &str,
        conn_item: Item,
        expires_at: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let now_s = epoch_secs(now_ms);
        for attempt in 1..=MAX_ATTEMPTS {
            let read = self.read_slots(admission.principal).await?;
            let current = read.clone().unwrap_or_default();
            let Some(mut live) = ratelimit::admit(&current.conns, admission.max_connections, now_s)
            else {
                return Ok(false);
            };
            live.insert(connection_id.to_owned(), expires_at);
            let next = SlotsItem {
                expires_at: live.values().copied().max().unwrap_or(expires_at),
                conns: live,
                v: current.v + 1,
            };
            let image = serde_dynamo::to_item(&next)
                .map_err(|e| StoreError::Malformed(format!("slots item: {e}")))?;
            // Written whole, expired slots dropped, only if nobody changed it since the read.
            let unchanged = match read {
                Some(r) => Expr::new("#v = :v")
                    .name("#v", keys::LIMIT_VERSION)
                    .value(":v", n(r.v)),
                None => Expr::new("attribute_not_exists(#pk)"),
            };
            let items = vec![
                put(
                    &self.tables.connections,
                    with_key(image, slots_key(admission.principal)),
                    Some(unchanged),
                )?,
                put(&self.tables.connections, conn_item.clone(), None)?,
            ];
            if self
                .transact("TransactWriteItems admit connection", items)
                .await?
            {
                return Ok(true);
            }
            backoff(attempt).await;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// Drops `connection_id`'s slot, if it still has one.
    pub(super) async fn release_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        // Bumping `v` makes an admission that read the slot fail its condition, so it cannot
        // write the slot back.
        let update = Expr::new("REMOVE #conns.#id ADD #v :one")
            .name("#conns", keys::LIMIT_CONNS)
            .name("#id", connection_id)
            .name("#v", keys::LIMIT_VERSION)
            .value(":one", n(1));
        let cond = Expr::new("attribute_exists(#conns.#id)")
            .name("#conns", keys::LIMIT_CONNS)
            .name("#id", connection_id);
        // Not there (released already, or it expired and an admission dropped it): done too.
        self.update_if(
            "UpdateItem release slot",
            slots_key(principal),
            update,
            cond,
        )
        .await
        .map(|_| ())
    }

    /// Counts one request against the principal's current window: `Ok(false)` when the
    /// window already holds `per_window` requests. One write, no read.
    pub(super) async fn take_principal_token(
        &self,
        principal: &str,
        per_window: u32,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (index, expires_at) = ratelimit::window(now_ms);
        let update = Expr::new("ADD #n :one SET #exp = :exp")
            .name("#n", keys::LIMIT_COUNT)
            .value(":one", n(1))
            .value(":exp", n(expires_at));
        let cond = Expr::new("attribute_not_exists(#n) OR #n < :max")
            .name("#n", keys::LIMIT_COUNT)
            .value(":max", n(per_window));
        self.update_if(
            "UpdateItem principal requests",
            key(keys::limit_pk(principal), &keys::limit_window_sk(index)),
            update,
            cond,
        )
        .await
    }
}
