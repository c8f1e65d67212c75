//! Condition and update expressions, and the `TransactWriteItems` actions built from them.
//!
//! Every attribute goes through a `#placeholder` (`name` is a DynamoDB reserved word, and room
//! names are map keys that may be anything valid), and a request carries exactly the
//! placeholders its expressions use: DynamoDB rejects one that is declared but unused.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update,
};

use crate::keys;
use crate::store::StoreError;

/// An item key or a whole item.
pub(super) type Item = HashMap<String, AttributeValue>;

/// The fixed attribute placeholders; a room name is added per expression ([`Expr::name`]).
const NAMES: [(&str, &str); 17] = [
    ("#pk", keys::PK),
    ("#sk", keys::SK),
    ("#seq", keys::SEQ),
    ("#type", keys::TYPE),
    ("#name", keys::NAME),
    ("#conn", keys::CONNECTION_ID),
    ("#exp", keys::EXPIRES_AT),
    ("#nkey", keys::NAME_KEY),
    ("#ident", keys::IDENTITY),
    ("#rooms", keys::ROOMS),
    ("#renaming", keys::RENAMING),
    ("#last", keys::COUNTER_LAST),
    ("#members", keys::COUNTER_MEMBERS),
    ("#shards", keys::COUNTER_SHARDS),
    ("#large", keys::COUNTER_LARGE),
    ("#tokens", keys::RATE_TOKENS),
    ("#at", keys::RATE_AT),
];

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::backend("build request", e)
}

/// Whether `token` (`#name`, `:me`) occurs in `expr` as a whole placeholder, not as the
/// prefix of a longer one.
fn uses(expr: &str, token: &str) -> bool {
    expr.match_indices(token).any(|(i, _)| {
        expr[i + token.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// A condition or update expression with the values (and extra names) it uses.
#[derive(Debug, Clone)]
pub(super) struct Expr {
    pub text: String,
    values: Vec<(&'static str, AttributeValue)>,
    names: Vec<(&'static str, String)>,
}

impl Expr {
    pub fn new(text: impl Into<String>) -> Self {
        Expr {
            text: text.into(),
            values: Vec::new(),
            names: Vec::new(),
        }
    }

    pub fn value(mut self, placeholder: &'static str, v: AttributeValue) -> Self {
        self.values.push((placeholder, v));
        self
    }

    /// A placeholder for an attribute name that is data, such as a room in `rooms`.
    pub fn name(mut self, placeholder: &'static str, attribute: impl Into<String>) -> Self {
        self.names.push((placeholder, attribute.into()));
        self
    }

    /// This expression and `other`, both required (their placeholders merged).
    pub fn and(mut self, other: Expr) -> Self {
        self.text = format!("({}) AND ({})", self.text, other.text);
        self.values.extend(other.values);
        self.names.extend(other.names);
        self
    }
}

type Names = Option<HashMap<String, String>>;
type Values = Option<HashMap<String, AttributeValue>>;

/// The placeholders that one or two expressions (a condition and an update share them) use.
pub(super) fn placeholders(exprs: &[&Expr]) -> (Names, Values) {
    let used = |p: &str| exprs.iter().any(|e| uses(&e.text, p));
    let names: HashMap<String, String> = NAMES
        .iter()
        .map(|(p, a)| (*p, (*a).to_owned()))
        .chain(
            exprs
                .iter()
                .flat_map(|e| e.names.iter().map(|(p, a)| (*p, a.clone()))),
        )
        .filter(|(p, _)| used(p))
        .map(|(p, a)| (p.to_owned(), a))
        .collect();
    let values: HashMap<String, AttributeValue> = exprs
        .iter()
        .flat_map(|e| e.values.iter())
        .filter(|(p, _)| used(p))
        .map(|(p, v)| ((*p).to_owned(), v.clone()))
        .collect();
    (
        (!names.is_empty()).then_some(names),
        (!values.is_empty()).then_some(values),
    )
}

/// The key of a connections-table item.
pub(super) fn key(pk: String, sk: &str) -> Item {
    HashMap::from([(keys::PK.to_owned(), s(pk)), (keys::SK.to_owned(), s(sk))])
}

/// The key of an events-table item.
pub(super) fn event_key(room: &str, seq: u64) -> Item {
    HashMap::from([
        (keys::PK.to_owned(), s(keys::room_pk(room))),
        (keys::SEQ.to_owned(), n(seq)),
    ])
}

pub(super) fn conn_key(connection_id: &str) -> Item {
    key(keys::conn_pk(connection_id), keys::CONN_SK)
}

pub(super) fn claim_key(name_key: &str) -> Item {
    key(keys::name_pk(name_key), keys::NAME_SK)
}

pub(super) fn member_key(room: &str, shard: u32, connection_id: &str) -> Item {
    key(keys::members_pk(room, shard), connection_id)
}

/// `item` with its key attributes added.
pub(super) fn with_key(mut item: Item, key: Item) -> Item {
    item.extend(key);
    item
}

pub(super) fn put(
    table: &str,
    item: Item,
    cond: Option<Expr>,
) -> Result<TransactWriteItem, StoreError> {
    let mut b = Put::builder().table_name(table).set_item(Some(item));
    if let Some(cond) = cond {
        let (names, values) = placeholders(&[&cond]);
        b = b
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values);
    }
    Ok(TransactWriteItem::builder()
        .put(b.build().map_err(build_err)?)
        .build())
}

pub(super) fn update(
    table: &str,
    key: Item,
    update: Expr,
    cond: Option<Expr>,
) -> Result<TransactWriteItem, StoreError> {
    let none = Expr::new("");
    let (names, values) = placeholders(&[&update, cond.as_ref().unwrap_or(&none)]);
    let u = Update::builder()
        .table_name(table)
        .set_key(Some(key))
        .update_expression(update.text)
        .set_condition_expression(cond.map(|c| c.text))
        .set_expression_attribute_names(names)
        .set_expression_attribute_values(values)
        .build()
        .map_err(build_err)?;
    Ok(TransactWriteItem::builder().update(u).build())
}

pub(super) fn delete(
    table: &str,
    key: Item,
    cond: Option<Expr>,
) -> Result<TransactWriteItem, StoreError> {
    let none = Expr::new("");
    let (names, values) = placeholders(&[cond.as_ref().unwrap_or(&none)]);
    let d = Delete::builder()
        .table_name(table)
        .set_key(Some(key))
        .set_condition_expression(cond.map(|c| c.text))
        .set_expression_attribute_names(names)
        .set_expression_attribute_values(values)
        .build()
        .map_err(build_err)?;
    Ok(TransactWriteItem::builder().delete(d).build())
}

pub(super) fn check(table: &str, key: Item, cond: Expr) -> Result<TransactWriteItem, StoreError> {
    let (names, values) = placeholders(&[&cond]);
    let c = ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(key))
        .condition_expression(cond.text)
        .set_expression_attribute_names(names)
        .set_expression_attribute_values(values)
        .build()
        .map_err(build_err)?;
    Ok(TransactWriteItem::builder().condition_check(c).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_placeholders_an_expression_uses_are_declared() {
        // GIVEN a condition using #name (not #nkey) and :me (not :mine), and a room name
        let cond = Expr::new("#name = :me AND attribute_exists(#rooms.#room)")
            .value(":me", s("a"))
            .value(":mine", s("b"))
            .name("#room", "dev");
        // WHEN its placeholders are collected
        let (names, values) = placeholders(&[&cond]);
        // THEN exactly the used ones are there
        let names = names.expect("names");
        let mut declared: Vec<&str> = names.keys().map(String::as_str).collect();
        declared.sort_unstable();
        assert_eq!(declared, ["#name", "#room", "#rooms"]);
        assert_eq!(names["#room"], "dev");
        let values = values.expect("values");
        assert_eq!(values.keys().collect::<Vec<_>>(), [":me"]);
    }
}
