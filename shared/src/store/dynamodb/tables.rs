//! The two tables as the template defines them (keys, stream, TTL), for tests and local runs
//! against moto or DynamoDB Local; on AWS, CloudFormation creates them.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;

use super::expr::build_err;
use crate::config::Tables;
use crate::keys;
use crate::store::StoreError;

/// Creates the two tables with exactly the keys, stream and TTL of template.yaml, unless they
/// exist already, and waits until they are active. Used by tests and by local runs against
/// moto or DynamoDB Local; on AWS, CloudFormation creates them.
pub async fn create_tables(client: &Client, tables: &Tables) -> Result<(), StoreError> {
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build_err)
    };
    let attr = |name: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(t)
            .build()
            .map_err(build_err)
    };
    let specs = [
        (
            &tables.events,
            [
                key(keys::PK, KeyType::Hash)?,
                key(keys::SEQ, KeyType::Range)?,
            ],
            [
                attr(keys::PK, ScalarAttributeType::S)?,
                attr(keys::SEQ, ScalarAttributeType::N)?,
            ],
            Some(StreamViewType::NewImage),
        ),
        (
            &tables.connections,
            [
                key(keys::PK, KeyType::Hash)?,
                key(keys::SK, KeyType::Range)?,
            ],
            [
                attr(keys::PK, ScalarAttributeType::S)?,
                attr(keys::SK, ScalarAttributeType::S)?,
            ],
            // The old image: a TTL deletion's record carries the expired connection's rooms,
            // name and principal, which its leaves need (`crate::expiry`).
            Some(StreamViewType::OldImage),
        ),
    ];
    for (name, key_schema, attrs, stream) in specs {
        let mut req = client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(key_schema.to_vec()))
            .set_attribute_definitions(Some(attrs.to_vec()));
        if let Some(view) = stream {
            req = req.stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(view)
                    .build()
                    .map_err(build_err)?,
            );
        }
        match req.send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_in_use_exception()) =>
            {
                continue
            }
            Err(e) => return Err(StoreError::backend("CreateTable", e)),
        }
        wait_active(client, name).await?;
        client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(keys::EXPIRES_AT)
                    .enabled(true)
                    .build()
                    .map_err(build_err)?,
            )
            .send()
            .await
            .map_err(|e| StoreError::backend("UpdateTimeToLive", e))?;
    }
    Ok(())
}

/// Waits until `table` is ACTIVE (at most 60 s).
pub async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    for _ in 0..120 {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| StoreError::backend("DescribeTable", e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StoreError::backend(
        "DescribeTable",
        format!("table {table} did not become ACTIVE within 60 s"),
    ))
}
