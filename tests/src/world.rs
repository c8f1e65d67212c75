//! A whole chat backend for end-to-end tests, built from the harness: chat-api-handler and the
//! fan-out (the Lambdas' own code) wired onto one moto server with fresh tables, that table's
//! stream read back, and a real `@connections` endpoint.
//!
//! This module owns that wiring and the helpers every end-to-end suite drives it with: API
//! Gateway events from the fixtures, connecting, sending frames, running the fan-out, reading
//! what each connection received. What the suites set differently (retry policy, handler limits)
//! is a [`WorldConfig`] they spell out; a setup failure is returned, so each suite decides how
//! it fails. Helpers only one suite needs stay in that suite.

use anyhow::Context;
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention, Tables};
use chat_shared::delivery::{Deliver, ManagementApi};
use chat_shared::fanout::handle_stream_event;
use chat_shared::handler::handle_request;
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::ChatStore;
use serde_json::{json, Value};

use crate::{fixture_json, unique_name, ConnectionsEndpoint, Moto, StreamReader};

/// The routes of the API's route selection (`$request.body.action`, template.yaml) besides
/// `$default`, which takes every other action.
const ACTION_ROUTES: [&str; 6] = [
    "setName",
    "sendPublic",
    "sendPrivate",
    "history",
    "join",
    "leave",
];

/// How the chat's two Lambdas are configured in a [`World`]. No `Default`: the Lambdas'
/// defaults retry too slowly for a test, so each suite states what it runs with.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// chat-api-handler's configuration.
    pub handler: HandlerConfig,
    /// The fan-out's configuration.
    pub fanout: FanoutConfig,
}

/// A running chat backend. The fields are public so a test can reach past the helpers: break
/// a table, fault the endpoint, run the fan-out with another store.
pub struct World {
    pub moto: Moto,
    pub tables: Tables,
    /// The store both Lambdas use, on `tables`.
    pub store: DynamoStore,
    /// The events table's stream, read from where the last fan-out stopped.
    pub stream: StreamReader,
    pub endpoint: ConnectionsEndpoint,
    /// The real `@connections` client, pointed at `endpoint`.
    pub api: ManagementApi,
    pub handler: HandlerConfig,
    pub fanout: FanoutConfig,
}

impl World {
    /// Starts moto, creates fresh tables and starts the `@connections` endpoint.
    pub async fn new(config: WorldConfig) -> anyhow::Result<World> {
        let moto = Moto::start().await.context("start moto")?;
        let tables = Tables {
            events: unique_name("events"),
            connections: unique_name("connections"),
        };
        create_tables(&moto.dynamodb(), &tables)
            .await
            .context("create tables")?;
        // Small pages so every broadcast walks several member pages.
        let store = DynamoStore::new(moto.dynamodb(), tables.clone(), Retention::default())
            .with_page_limit(2);
        let stream = StreamReader::new(&moto.dynamodb(), moto.streams(), &tables.events)
            .await
            .context("stream reader")?;
        let endpoint = ConnectionsEndpoint::start("prod")
            .await
            .context("@connections endpoint")?;
        let api = ManagementApi::new(&moto.sdk_config(), &endpoint.url());
        Ok(World {
            moto,
            tables,
            store,
            stream,
            endpoint,
            api,
            handler: config.handler,
            fanout: config.fanout,
        })
    }

    /// A real API Gateway WebSocket event from the fixtures, for this connection and route.
    pub fn event(
        route: &str,
        connection_id: &str,
        body: Option<&str>,
    ) -> ApiGatewayWebsocketProxyRequest {
        let (fixture, event_type) = match route {
            "$connect" => ("apigw-websocket-connect.json", "CONNECT"),
            "$disconnect" => ("apigw-websocket-disconnect.json", "DISCONNECT"),
            _ => ("apigw-websocket-sendpublic.json", "MESSAGE"),
        };
        let mut v = fixture_json(fixture);
        v["requestContext"]["connectionId"] = json!(connection_id);
        v["requestContext"]["routeKey"] = json!(route);
        v["requestContext"]["eventType"] = json!(event_type);
        if event_type == "MESSAGE" {
            v["body"] = body.map_or(Value::Null, |b| json!(b));
        }
        serde_json::from_value(v).expect("fixture is an API Gateway WebSocket event")
    }

    /// Runs chat-api-handler on one event, with the world's store.
    pub async fn call(
        &self,
        route: &str,
        connection_id: &str,
        body: Option<&str>,
    ) -> ApiGatewayProxyResponse {
        self.call_with(&self.store, route, connection_id, body)
            .await
    }

    /// Runs chat-api-handler on one event, with `store` in place of the world's.
    pub async fn call_with(
        &self,
        store: &dyn ChatStore,
        route: &str,
        connection_id: &str,
        body: Option<&str>,
    ) -> ApiGatewayProxyResponse {
        handle_request(
            store,
            &self.handler,
            Self::event(route, connection_id, body),
            chat_shared::now_ms(),
        )
        .await
        .expect("handler")
    }

    pub async fn connect(&self, id: &str) {
        let r = self.call("$connect", id, None).await;
        assert_eq!(r.status_code, 200, "$connect accepted");
    }

    pub async fn disconnect(&self, id: &str) {
        let r = self.call("$disconnect", id, None).await;
        assert_eq!(r.status_code, 200);
    }

    /// Sends a frame; returns the frame the sender got back (an error, a history page), if any.
    pub async fn send(&self, id: &str, frame: Value) -> Option<Value> {
        self.send_with(&self.store, id, frame).await
    }

    /// [`World::send`] through `store` in place of the world's.
    pub async fn send_with(&self, store: &dyn ChatStore, id: &str, frame: Value) -> Option<Value> {
        self.send_raw_with(store, id, &frame.to_string()).await
    }

    /// Sends a body that need not be a valid frame (or JSON at all).
    pub async fn send_raw(&self, id: &str, body: &str) -> Option<Value> {
        self.send_raw_with(&self.store, id, body).await
    }

    async fn send_raw_with(&self, store: &dyn ChatStore, id: &str, body: &str) -> Option<Value> {
        let route = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["action"].as_str().map(str::to_owned))
            .filter(|a| ACTION_ROUTES.contains(&a.as_str()))
            .unwrap_or_else(|| "$default".into());
        let r = self.call_with(store, &route, id, Some(body)).await;
        assert_eq!(r.status_code, 200);
        match r.body {
            None | Some(Body::Empty) => None,
            Some(Body::Text(t)) => Some(serde_json::from_str(&t).expect("response is JSON")),
            Some(other) => panic!("unexpected response body {other:?}"),
        }
    }

    /// Connects `id` and takes `name`.
    pub async fn join(&self, id: &str, name: &str) {
        self.connect(id).await;
        let err = self.send(id, json!({"action":"setName","name":name})).await;
        assert_eq!(err, None, "{name} joins");
    }

    /// Runs the fan-out on every stream record written since the last call that the
    /// template's filter lets through (as the deployed mapping does).
    pub async fn fan_out(&mut self) -> DynamoDbEventResponse {
        let event = self.stream.next_lambda_event().await.expect("read stream");
        self.fan_out_event(event).await
    }

    /// Runs the fan-out on `event`, as the world's Lambda would, without a deadline.
    pub async fn fan_out_event(&self, event: Event) -> DynamoDbEventResponse {
        self.fan_out_via(&self.store, &self.api, event, None).await
    }

    /// Runs the fan-out on `event` with another store, delivery or invocation deadline.
    pub async fn fan_out_via(
        &self,
        store: &dyn ChatStore,
        deliver: &dyn Deliver,
        event: Event,
        deadline: Option<tokio::time::Instant>,
    ) -> DynamoDbEventResponse {
        handle_stream_event(
            store,
            deliver,
            &self.fanout,
            event,
            chat_shared::now_ms,
            deadline,
        )
        .await
    }

    /// The frames delivered to `id` of `lobby` (and private ones, which have no room),
    /// without `room`, `id` and `ts` (checked separately). Panics on a frame of another room:
    /// the suites that use this one stay in `lobby`; [`World::room_frames`] reads the others.
    pub fn frames(&self, id: &str) -> Vec<Value> {
        self.endpoint
            .frames_for(id)
            .into_iter()
            .map(|mut f| {
                let room = f.get("room").cloned();
                assert!(
                    room.is_none() || room == Some(json!("lobby")),
                    "a frame of another room: {f}"
                );
                if let Some(o) = f.as_object_mut() {
                    o.remove("id");
                    o.remove("ts");
                    o.remove("room");
                }
                f
            })
            .collect()
    }

    /// The frames delivered to `id`, each as (room, frame without `room` and `ts`), `id` kept;
    /// a private message's room is `None`.
    pub fn room_frames(&self, id: &str) -> Vec<(Option<String>, Value)> {
        self.endpoint
            .frames_for(id)
            .into_iter()
            .map(|mut f| {
                let room = f["room"].as_str().map(str::to_owned);
                if let Some(o) = f.as_object_mut() {
                    o.remove("ts");
                    o.remove("room");
                }
                (room, f)
            })
            .collect()
    }
}

/// The error code of the frame a sender got back, or `<no error>`.
pub fn code(frame: &Option<Value>) -> &str {
    frame
        .as_ref()
        .and_then(|f| f["error"]["code"].as_str())
        .unwrap_or("<no error>")
}
