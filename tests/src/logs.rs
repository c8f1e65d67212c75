//! What code under test logged: a `tracing` subscriber that keeps the chat's own events (those
//! of the `chat_*` crates: level, message and fields as text) for one future, for tests whose claim is "logged" or "logged as a
//! warning". It is scoped to the future it wraps ([`Logs::capture`]), so tests running in
//! parallel in one process do not see each other's events.

use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::field::{Field, Visit};
use tracing::instrument::WithSubscriber;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub level: Level,
    pub message: String,
    /// The other fields, `name=value` (values as `Debug` prints them, strings unquoted).
    pub fields: Vec<(String, String)>,
}

impl Logged {
    /// The value of field `name`, if the event has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The events captured so far.
#[derive(Clone, Default)]
pub struct Logs {
    events: Arc<Mutex<Vec<Logged>>>,
}

impl Logs {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Logged>> {
        // A panic while holding the lock cannot leave a half-written event behind.
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `future` with every event the chat's crates log in it (at any level) captured here.
    /// The SDK's and hyper's own events are left out: they are not what a test asserts on, and
    /// they would bury a failure message.
    pub async fn capture<F: Future>(&self, future: F) -> F::Output {
        let subscriber = tracing_subscriber::registry().with(Capture(self.clone()));
        future.with_subscriber(subscriber).await
    }

    /// Every event captured, in order.
    pub fn all(&self) -> Vec<Logged> {
        self.lock().clone()
    }

    /// The events at `level` whose message is `message`.
    pub fn find(&self, level: Level, message: &str) -> Vec<Logged> {
        self.lock()
            .iter()
            .filter(|e| e.level == level && e.message == message)
            .cloned()
            .collect()
    }

    /// The events at `level` or more severe (WARN also finds ERROR).
    pub fn at_least(&self, level: Level) -> Vec<Logged> {
        self.lock()
            .iter()
            .filter(|e| e.level <= level)
            .cloned()
            .collect()
    }
}

struct Capture(Logs);

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("chat_") {
            return;
        }
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        self.0.lock().push(Logged {
            level: *event.metadata().level(),
            message: visitor.message,
            fields: visitor.fields,
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name().to_owned(), value));
        }
    }
}
