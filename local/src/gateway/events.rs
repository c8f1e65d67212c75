//! The Lambda proxy events API Gateway sends (`CONNECT`, `MESSAGE`, `DISCONNECT`), route
//! selection, and the AWS-shaped ids and timestamps they carry.

use aws_lambda_events::apigw::{
    ApiGatewayWebsocketProxyRequest, ApiGatewayWebsocketProxyRequestContext,
};
use aws_lambda_events::http::{HeaderMap, HeaderValue};
use aws_lambda_events::query_map::QueryMap;
use base64::Engine as _;

use super::GatewayConfig;

/// The route every frame goes to when no custom route key matches.
pub(super) const DEFAULT_ROUTE: &str = "$default";

/// What every event of one connection repeats.
#[derive(Clone, Debug)]
pub(super) struct ConnectionInfo {
    pub id: String,
    pub connected_at_ms: i64,
    pub source_ip: String,
    pub user_agent: Option<String>,
    /// The `Host` header of the upgrade request.
    pub domain_name: String,
}

/// A frame from the client, waiting for its `MESSAGE` invocation.
#[derive(Debug)]
pub(super) struct Inbound {
    pub route_key: String,
    pub body: String,
    pub is_base64_encoded: bool,
}

impl Inbound {
    /// A text frame: routed on `$request.body.action`.
    pub fn text(config: &GatewayConfig, body: String) -> Self {
        Self {
            route_key: select_route(config, &body).to_owned(),
            body,
            is_base64_encoded: false,
        }
    }

    /// A binary frame: never JSON, so `$default`, with the body base64-encoded as AWS does.
    pub fn binary(data: &[u8]) -> Self {
        Self {
            route_key: DEFAULT_ROUTE.to_owned(),
            body: base64::engine::general_purpose::STANDARD.encode(data),
            is_base64_encoded: true,
        }
    }
}

/// Evaluates `$request.body.action`: the route whose key equals the body's string `action`,
/// else `$default` (unknown action, not JSON, not an object, `action` not a string).
pub(super) fn select_route<'a>(config: &'a GatewayConfig, body: &str) -> &'a str {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(body)
    else {
        return DEFAULT_ROUTE;
    };
    let Some(serde_json::Value::String(action)) = object.get("action") else {
        return DEFAULT_ROUTE;
    };
    config
        .route_keys
        .iter()
        .find(|key| *key == action)
        .map_or(DEFAULT_ROUTE, String::as_str)
}

/// The `$connect` event, from the upgrade request.
pub(super) fn connect(
    config: &GatewayConfig,
    connection: &ConnectionInfo,
    request_headers: &HeaderMap,
    query: Option<&str>,
) -> ApiGatewayWebsocketProxyRequest {
    let mut headers = request_headers.clone();
    // API Gateway adds the caller's address, as its load balancer sees it.
    if !headers.contains_key("x-forwarded-for") {
        if let Ok(ip) = HeaderValue::from_str(&connection.source_ip) {
            headers.insert("x-forwarded-for", ip);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));

    let mut event = ApiGatewayWebsocketProxyRequest::default();
    event.multi_value_headers = headers.clone();
    event.headers = headers;
    // `QueryMap` keeps every value: `first` is the single-value view, `all` the multi-value one.
    let query: QueryMap = query.unwrap_or_default().parse().unwrap_or_default();
    event.query_string_parameters = query.clone();
    event.multi_value_query_string_parameters = query;
    event.request_context = context(config, connection, "$connect", "CONNECT");
    event.request_context.identity.user_agent = connection.user_agent.clone();
    event
}

/// The `MESSAGE` event for one client frame.
pub(super) fn message(
    config: &GatewayConfig,
    connection: &ConnectionInfo,
    frame: &Inbound,
) -> ApiGatewayWebsocketProxyRequest {
    let mut event = ApiGatewayWebsocketProxyRequest::default();
    event.request_context = context(config, connection, &frame.route_key, "MESSAGE");
    event.request_context.message_id = Some(new_id());
    event.body = Some(frame.body.clone());
    event.is_base64_encoded = frame.is_base64_encoded;
    event
}

/// The `$disconnect` event.
pub(super) fn disconnect(
    config: &GatewayConfig,
    connection: &ConnectionInfo,
    status_code: u16,
    reason: &str,
) -> ApiGatewayWebsocketProxyRequest {
    let mut event = ApiGatewayWebsocketProxyRequest::default();
    // AWS sends a few headers on $disconnect (the Host among them), not the handshake's.
    if let Ok(host) = HeaderValue::from_str(&connection.domain_name) {
        event.headers.insert("host", host);
        event.multi_value_headers = event.headers.clone();
    }
    event.request_context = context(config, connection, "$disconnect", "DISCONNECT");
    event.request_context.identity.user_agent = connection.user_agent.clone();
    event.request_context.disconnect_status_code = Some(i64::from(status_code));
    event.request_context.disconnect_reason = Some(reason.to_owned());
    event
}

fn context(
    config: &GatewayConfig,
    connection: &ConnectionInfo,
    route_key: &str,
    event_type: &str,
) -> ApiGatewayWebsocketProxyRequestContext {
    let now = now_ms();
    let request_id = new_id();
    let mut context = ApiGatewayWebsocketProxyRequestContext::default();
    context.route_key = Some(route_key.to_owned());
    context.event_type = Some(event_type.to_owned());
    context.connection_id = Some(connection.id.clone());
    context.connected_at = connection.connected_at_ms;
    context.request_time_epoch = now;
    context.request_time = Some(request_time(now));
    // On AWS both ids are the same value.
    context.extended_request_id = Some(request_id.clone());
    context.request_id = Some(request_id);
    context.message_direction = Some("IN".to_owned());
    context.stage = Some(config.stage.clone());
    context.domain_name = Some(connection.domain_name.clone());
    context.apiid = Some(config.api_id.clone());
    context.identity.source_ip = Some(connection.source_ip.clone());
    context
}

/// A new connection, request or message id, shaped like AWS's: 11 random bytes in padded
/// base64, e.g. `L0SM9cOFvHcCIhw=`.
pub(super) fn new_id() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 11]>())
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// `requestTime` as API Gateway writes it: `27/Nov/2026:09:13:34 +0000`.
pub(super) fn request_time(epoch_ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = civil(epoch_ms);
    let month = MONTHS
        .get(usize::from(t.month).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day, t.year, t.hour, t.minute, t.second
    )
}

/// An ISO-8601 UTC timestamp with milliseconds, as the Management API returns them:
/// `2026-11-27T09:13:34.123Z`.
pub(super) fn iso8601(epoch_ms: i64) -> String {
    let t = civil(epoch_ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
    )
}

struct Civil {
    year: i64,
    month: u8,
    day: u8,
    hour: i64,
    minute: i64,
    second: i64,
    millis: i64,
}

/// UTC calendar fields of an epoch time (Howard Hinnant's `civil_from_days`), so the crate
/// needs no date library for two timestamp formats.
fn civil(epoch_ms: i64) -> Civil {
    let seconds = epoch_ms.div_euclid(1000);
    let millis = epoch_ms.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);

    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        // Both are in range by construction (1..=12, 1..=31).
        month: u8::try_from(month).unwrap_or(1),
        day: u8::try_from(day).unwrap_or(1),
        hour: of_day / 3600,
        minute: of_day % 3600 / 60,
        second: of_day % 60,
        millis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_like_aws() {
        // GIVEN 2026-11-27T09:13:34.123Z WHEN formatted THEN both AWS formats come out.
        let ms = 1_795_770_814_123;
        assert_eq!(request_time(ms), "27/Nov/2026:09:13:34 +0000");
        assert_eq!(iso8601(ms), "2026-11-27T09:13:34.123Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(request_time(951_782_400_000), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn ids_look_like_aws_ids() {
        let id = new_id();
        assert_eq!(id.len(), 16);
        assert!(id.ends_with('='));
    }

    #[test]
    fn selects_routes_on_the_action_key() {
        let config = GatewayConfig::default();
        assert_eq!(select_route(&config, r#"{"action":"setName"}"#), "setName");
        assert_eq!(select_route(&config, r#"{"action":"nope"}"#), "$default");
        assert_eq!(select_route(&config, r#"{"action":1}"#), "$default");
        assert_eq!(select_route(&config, r#"["setName"]"#), "$default");
        assert_eq!(select_route(&config, "setName"), "$default");
    }
}
