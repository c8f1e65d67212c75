//! Which events a command works on: an inclusive id range and/or an inclusive time range on
//! the events' commit time (`ts`), checked before anything is read.

use chrono::DateTime;

use crate::error::ReplayError;

/// An inclusive id range and an inclusive `ts` range (ms since the epoch); `None` is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventFilter {
    pub from_id: Option<u64>,
    pub to_id: Option<u64>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        EventFilter::default()
    }

    /// Just the ids `from..=to`.
    pub fn ids(from: u64, to: u64) -> Result<Self, ReplayError> {
        EventFilter::new(Some(from), Some(to), None, None)
    }

    /// A filter, refused if a range is reversed (it would silently select nothing).
    pub fn new(
        from_id: Option<u64>,
        to_id: Option<u64>,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<Self, ReplayError> {
        if let (Some(from), Some(to)) = (from_id, to_id) {
            if from > to {
                return Err(ReplayError::BadRange(format!(
                    "--from-id {from} is after --to-id {to}; both are inclusive, so use --from-id {to} --to-id {from}"
                )));
            }
        }
        if let (Some(since), Some(until)) = (since_ms, until_ms) {
            if since > until {
                return Err(ReplayError::BadRange(format!(
                    "--since ({since} ms) is after --until ({until} ms)"
                )));
            }
        }
        Ok(EventFilter {
            from_id,
            to_id,
            since_ms,
            until_ms,
        })
    }

    /// How many ids the range can hold at most, when both ends are given (for a progress bar).
    pub fn id_span(&self) -> Option<u64> {
        match (self.from_id, self.to_id) {
            (Some(from), Some(to)) => Some(to.saturating_sub(from).saturating_add(1)),
            (None, Some(to)) => Some(to),
            _ => None,
        }
    }
}

/// A point in time as RFC 3339 (`2024-05-01T12:00:00Z`, any offset) or as whole milliseconds
/// since the epoch, to ms since the epoch. Used as clap's value parser.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .map_err(|_| format!("{text} is too large for epoch milliseconds"));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!(
                "{text:?} is neither RFC 3339 (like 2024-05-01T12:00:00Z) nor epoch milliseconds ({e})"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_epoch_ms() {
        // GIVEN the two accepted spellings of one instant  WHEN parsed  THEN they agree
        assert_eq!(parse_time("2024-05-01T12:00:00Z"), Ok(1_714_564_800_000));
        assert_eq!(
            parse_time("2024-05-01T14:00:00.5+02:00"),
            Ok(1_714_564_800_500)
        );
        assert_eq!(parse_time("1714564800000"), Ok(1_714_564_800_000));
        // AND anything else is refused with what is expected
        let err = parse_time("yesterday").expect_err("not a time");
        assert!(err.contains("RFC 3339"), "{err}");
        assert!(parse_time("").is_err());
    }

    #[test]
    fn reversed_ranges_are_refused() {
        // GIVEN ranges whose start is after their end  WHEN built  THEN they are errors
        let err = EventFilter::ids(9, 3).expect_err("reversed ids");
        assert!(
            err.to_string().contains("--from-id 9 is after --to-id 3"),
            "{err}"
        );
        assert!(EventFilter::new(None, None, Some(10), Some(5)).is_err());
        // AND a one-id range is fine
        assert_eq!(EventFilter::ids(4, 4).expect("one id").id_span(), Some(1));
    }
}
