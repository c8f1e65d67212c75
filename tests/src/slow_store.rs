//! A [`ChatStore`] with store latency: every call sleeps before it reaches the store it wraps
//! (5 ms for a read, 10 ms for a write by default), roughly a DynamoDB round trip from a
//! Lambda. Wrapped around the embedded store it gives the AWS-like timing — calls that take
//! long enough to overlap — without moto, whose server answers one request at a time.
//!
//! The sleep happens before the call is delegated, outside the wrapped store's own critical
//! section, so the wrapped store's atomicity is untouched: only the interleaving of callers
//! changes.

use std::time::Duration;

use async_trait::async_trait;
use chat_shared::events::{LeaveReason, StoredEvent};
use chat_shared::ratelimit::RateLimit;
use chat_shared::redelivery::Redelivery;
use chat_shared::store::{ChatStore, Connection, EventRange, EventsPage, MembersPage, StoreError};
use chat_shared::validation::ValidName;

/// Sleeps `read` before every read and `write` before every write, then delegates.
pub struct SlowStore<S> {
    inner: S,
    read: Duration,
    write: Duration,
}

impl<S: ChatStore> SlowStore<S> {
    /// `inner` with 5 ms reads and 10 ms writes.
    pub fn new(inner: S) -> Self {
        Self::with_latency(inner, Duration::from_millis(5), Duration::from_millis(10))
    }

    pub fn with_latency(inner: S, read: Duration, write: Duration) -> Self {
        SlowStore { inner, read, write }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: ChatStore> ChatStore for SlowStore<S> {
    async fn add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner
            .add_identified_connection(connection_id, identity, now_ms)
            .await
    }

    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        tokio::time::sleep(self.read).await;
        self.inner.connection(connection_id, now_ms).await
    }

    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner.set_name(connection_id, name, now_ms).await
    }

    async fn post_public(
        &self,
        connection_id: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner.post_public(connection_id, message, now_ms).await
    }

    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner
            .post_private(connection_id, to, message, now_ms)
            .await
    }

    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner
            .remove_connection(connection_id, reason, now_ms)
            .await
    }

    async fn remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // One batch, one round trip: the wrapped store's own batching is kept.
        tokio::time::sleep(self.write).await;
        self.inner
            .remove_connections(connection_ids, reason, now_ms)
            .await
    }

    async fn take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner
            .take_request_token(connection_id, limit, now_ms)
            .await
    }

    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        tokio::time::sleep(self.write).await;
        self.inner.schedule_redelivery(redelivery, now_ms).await
    }

    async fn members_page(
        &self,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        tokio::time::sleep(self.read).await;
        self.inner.members_page(after, now_ms).await
    }

    async fn read_events(
        &self,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        tokio::time::sleep(self.read).await;
        self.inner.read_events(range, limit, now_ms).await
    }
}
