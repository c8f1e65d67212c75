//! DynamoDB's hard limits, and the errors it answers when a request breaks one.
//!
//! This module owns the numbers (from the DynamoDB developer guide, "Service, account, and table
//! quotas": <https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html>)
//! and the exact exception names and messages DynamoDB returns for them, so the embedded store
//! refuses what DynamoDB refuses, with the same words, in every mode (a limit is not latency:
//! an input AWS refuses must be refused locally too). The messages are the ones DynamoDB sends
//! (moto, which the contract suite also runs against, copies them for the key and item limits).
//!
//! A refused request surfaces as [`super::StoreError::Backend`] whose source is a
//! [`ServiceError`], just as the DynamoDB adapter's failures carry the SDK's service error:
//! [`service_error`] reads the code and message back from either.

use serde_dynamo::{AttributeValue, Item};
use thiserror::Error;

/// Partition key value, UTF-8 bytes.
pub const PARTITION_KEY_MAX_BYTES: usize = 2_048;
/// Sort key value, UTF-8 bytes.
pub const SORT_KEY_MAX_BYTES: usize = 1_024;
/// One item: attribute names plus values.
pub const ITEM_MAX_BYTES: usize = 400 * 1_024;
/// Actions in one `TransactWriteItems`.
pub const TRANSACT_MAX_ACTIONS: usize = 100;
/// Total size of one `TransactWriteItems`.
pub const TRANSACT_MAX_BYTES: usize = 4 * 1_024 * 1_024;
/// Put and delete requests in one `BatchWriteItem`.
pub const BATCH_WRITE_MAX_REQUESTS: usize = 25;
/// Data a `Query` or `Scan` reads before it ends the page (with `LastEvaluatedKey`). Not an
/// error: the page just ends.
pub const QUERY_PAGE_MAX_BYTES: usize = 1_024 * 1_024;

/// The exception DynamoDB answers for a request that breaks a limit.
pub const VALIDATION_EXCEPTION: &str = "ValidationException";

/// DynamoDB's words for each limit (moto copies them; the space missing after "of" in the hash
/// key message is DynamoDB's own).
pub const HASH_KEY_TOO_LONG: &str = "One or more parameter values were invalid: Size of hashkey has exceeded the maximum size limit of2048 bytes";
pub const RANGE_KEY_TOO_LONG: &str = "One or more parameter values were invalid: Aggregated size of all range keys has exceeded the size limit of 1024 bytes";
pub const ITEM_TOO_LARGE: &str = "Item size has exceeded the maximum allowed size";
pub const TOO_MANY_TRANSACT_ACTIONS: &str = "1 validation error detected at 'transactItems' failed to satisfy constraint: Member must have length less than or equal to 100.";
pub const TRANSACTION_TOO_LARGE: &str = "Transaction request cannot be larger than 4 MB";
pub const TOO_MANY_BATCH_REQUESTS: &str = "1 validation error detected: Value at 'requestItems' failed to satisfy constraint: Map value must satisfy constraint: [Member must have length less than or equal to 25, Member must have length greater than or equal to 1]";

/// An error as an AWS service names it: the exception's name (`code`) and its message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    pub code: String,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ServiceError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    fn validation(message: &str) -> Self {
        ServiceError::new(VALIDATION_EXCEPTION, message)
    }
}

/// The AWS error code and message behind a store error, if it has one: a [`ServiceError`]
/// from the embedded store, or a service error from the DynamoDB SDK.
pub fn service_error(error: &super::StoreError) -> Option<(String, String)> {
    use aws_sdk_dynamodb::operation::{
        batch_write_item::BatchWriteItemError, get_item::GetItemError, put_item::PutItemError,
        query::QueryError, transact_write_items::TransactWriteItemsError,
        update_item::UpdateItemError,
    };
    let super::StoreError::Backend { source, .. } = error else {
        return None;
    };
    let source: &(dyn std::error::Error + 'static) = source.as_ref();
    if let Some(e) = source.downcast_ref::<ServiceError>() {
        return Some((e.code.clone(), e.message.clone()));
    }
    sdk::<GetItemError>(source)
        .or_else(|| sdk::<PutItemError>(source))
        .or_else(|| sdk::<QueryError>(source))
        .or_else(|| sdk::<TransactWriteItemsError>(source))
        .or_else(|| sdk::<BatchWriteItemError>(source))
        .or_else(|| sdk::<UpdateItemError>(source))
}

/// The code and message of an SDK error of operation error type `E`, if `source` is one.
fn sdk<E>(source: &(dyn std::error::Error + 'static)) -> Option<(String, String)>
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_dynamodb::config::http::HttpResponse;
    let e = source.downcast_ref::<aws_sdk_dynamodb::error::SdkError<E, HttpResponse>>()?;
    let se = e.as_service_error()?;
    Some((
        se.code()?.to_owned(),
        se.message().unwrap_or_default().to_owned(),
    ))
}

/// Checks a key's sizes as DynamoDB does before it reads or writes the item.
pub fn check_key(partition_key: &str, sort_key: &str) -> Result<(), ServiceError> {
    if partition_key.len() > PARTITION_KEY_MAX_BYTES {
        return Err(ServiceError::validation(HASH_KEY_TOO_LONG));
    }
    if sort_key.len() > SORT_KEY_MAX_BYTES {
        return Err(ServiceError::validation(RANGE_KEY_TOO_LONG));
    }
    Ok(())
}

/// Checks an item's size as DynamoDB does before it writes it.
pub fn check_item(item: &Item) -> Result<usize, ServiceError> {
    let size = item_size(item);
    if size > ITEM_MAX_BYTES {
        return Err(ServiceError::validation(ITEM_TOO_LARGE));
    }
    Ok(size)
}

/// Checks one `TransactWriteItems`: its number of actions and their total size.
pub fn check_transaction(actions: usize, bytes: usize) -> Result<(), ServiceError> {
    if actions > TRANSACT_MAX_ACTIONS {
        return Err(ServiceError::validation(TOO_MANY_TRANSACT_ACTIONS));
    }
    if bytes > TRANSACT_MAX_BYTES {
        return Err(ServiceError::validation(TRANSACTION_TOO_LARGE));
    }
    Ok(())
}

/// Checks one `BatchWriteItem`'s number of requests.
pub fn check_batch_write(requests: usize) -> Result<(), ServiceError> {
    if requests == 0 || requests > BATCH_WRITE_MAX_REQUESTS {
        return Err(ServiceError::validation(TOO_MANY_BATCH_REQUESTS));
    }
    Ok(())
}

/// An item's size by DynamoDB's rules ("Item sizes and formats" in the developer guide):
/// every attribute name's UTF-8 length plus its value's size.
pub fn item_size(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

/// A value's size: strings and binaries their length, numbers about one byte per two significant
/// digits plus one, booleans and nulls one byte, lists and maps three bytes plus their contents
/// (a map's keys included).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(v) => v.iter().map(Vec::len).sum(),
        AttributeValue::L(v) => 3 + v.iter().map(|e| 1 + value_size(e)).sum::<usize>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, v)| 1 + k.len() + value_size(v))
                .sum::<usize>()
        }
    }
}

fn number_size(n: &str) -> usize {
    let digits = n
        .trim_start_matches(['-', '+'])
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(message: &str) -> Result<(), ServiceError> {
        Err(ServiceError::new(VALIDATION_EXCEPTION, message))
    }

    #[test]
    fn transactions_over_100_actions_or_4_mb_are_refused() {
        // GIVEN transactions at and just past each limit
        // WHEN they are checked THEN exactly the ones past a limit are refused, in DynamoDB's words
        assert_eq!(check_transaction(100, TRANSACT_MAX_BYTES), Ok(()));
        assert_eq!(
            check_transaction(101, 10),
            validation(TOO_MANY_TRANSACT_ACTIONS)
        );
        assert_eq!(
            check_transaction(2, TRANSACT_MAX_BYTES + 1),
            validation(TRANSACTION_TOO_LARGE)
        );
    }

    #[test]
    fn batch_writes_take_1_to_25_requests() {
        // GIVEN batch writes of 0, 1, 25 and 26 requests WHEN checked THEN only 1..=25 pass
        assert_eq!(check_batch_write(1), Ok(()));
        assert_eq!(check_batch_write(25), Ok(()));
        assert_eq!(check_batch_write(26), validation(TOO_MANY_BATCH_REQUESTS));
        assert_eq!(check_batch_write(0), validation(TOO_MANY_BATCH_REQUESTS));
    }

    #[test]
    fn keys_are_measured_in_utf8_bytes() {
        // GIVEN keys at and past their limits, counted in bytes (a 2-byte letter counts twice)
        let sk_at = "é".repeat(SORT_KEY_MAX_BYTES / 2);
        let sk_over = format!("{sk_at}x");
        let pk_over = "p".repeat(PARTITION_KEY_MAX_BYTES + 1);
        // WHEN checked THEN only those past a limit are refused, with DynamoDB's message
        assert_eq!(check_key("p", &sk_at), Ok(()));
        assert_eq!(check_key("p", &sk_over), validation(RANGE_KEY_TOO_LONG));
        assert_eq!(check_key(&pk_over, "s"), validation(HASH_KEY_TOO_LONG));
    }

    #[test]
    fn item_size_counts_names_and_values() {
        // GIVEN an item with a string, a number and a boolean
        let item = Item::from(std::collections::HashMap::from([
            ("ab".to_owned(), AttributeValue::S("héllo".to_owned())),
            ("n".to_owned(), AttributeValue::N("12300".to_owned())),
            ("b".to_owned(), AttributeValue::Bool(true)),
        ]));
        // WHEN measured THEN names and values count: 2 + 6, 1 + (3 significant digits → 3), 1 + 1
        assert_eq!(item_size(&item), 8 + 4 + 2);
        // AND an item just over 400 KB is refused
        let big = Item::from(std::collections::HashMap::from([(
            "m".to_owned(),
            AttributeValue::S("x".repeat(ITEM_MAX_BYTES)),
        )]));
        assert_eq!(check_item(&big).map(|_| ()), validation(ITEM_TOO_LARGE));
    }
}
