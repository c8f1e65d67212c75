//! The rules a display name and a message must meet before anything is written.
//!
//! Names: trimmed of surrounding whitespace, then 1–32 characters (Unicode scalar values),
//! with no control characters and no bidirectional-override or isolate characters (they let
//! a name render as a different one), and at least one visible character. Uniqueness ignores
//! case and Unicode compatibility differences: the claim key is the name's NFKC_Casefold (with
//! invisible characters dropped), so names that only look different in their encoding
//! (full-width letters, ligatures, composed and decomposed accents, zero-width characters,
//! `ß`/`ss`) are the same name. The name is shown as typed (trimmed). Messages: non-empty once whitespace is ignored,
//! and at most `max_bytes` bytes of UTF-8 (4096 by default, `MAX_MESSAGE_BYTES`).
//!
//! Room names: 1–[`ROOM_MAX_CHARS`] characters, each an ASCII letter, digit, `-`, `_` or `.`;
//! case matters (`Ops` and `ops` are two rooms). They become part of partition keys
//! (`ROOM#<room>`, `MEMBERS#<room>#<shard>`), so the alphabet keeps `#` (the keys' separator)
//! and anything that needs escaping out of them.
//!
//! Every DynamoDB key built from client input is bounded here, before anything is written:
//! DynamoDB refuses a sort key over 1,024 bytes with a `ValidationException`, and NFKC can
//! multiply a name's length (U+FDFA alone becomes 18 characters, 33 bytes), so 32 characters
//! are not a bound on the key. A name whose key is over [`NAME_KEY_MAX_BYTES`] is refused as
//! `invalid_name`; a `to` that no valid name can match is `unknown_recipient` without a read.

use crate::protocol::{ErrorCode, Refusal};

pub const NAME_MAX_CHARS: usize = 32;
/// The longest room name, in characters (ASCII, so also bytes).
pub const ROOM_MAX_CHARS: usize = 64;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4096;
/// The longest name key (UTF-8 bytes) accepted. It becomes part of a partition key
/// (`keys::name_pk`), which DynamoDB caps at 2,048 bytes; 256 leaves room for the prefix and
/// any room scoping, and no 32-character name that is not made of expanding ligatures comes
/// near it (32 four-byte characters are 128 bytes).
pub const NAME_KEY_MAX_BYTES: usize = 256;

/// A name that passed the rules: how it is shown, and the key that makes it unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidName {
    pub display: String,
    pub key: String,
}

/// Characters that reorder text: LRE, RLE, PDF, LRO, RLO (U+202A–U+202E) and the isolates
/// LRI, RLI, FSI, PDI (U+2066–U+2069).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// LINE SEPARATOR and PARAGRAPH SEPARATOR: not control characters to Rust, but they break a
/// name across lines wherever it is shown (and end a line in JavaScript string literals).
fn is_line_break(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
}

/// Unicode's Default_Ignorable_Code_Point: characters that render as nothing (zero-width
/// spaces and joiners, variation selectors, soft hyphens, tags, …). They cannot make a name
/// different, and a name made only of them shows as nothing.
fn is_default_ignorable(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}'..='\u{1160}' | '\u{17B4}'..='\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// The key that makes a name unique: Unicode's NFKC_Casefold, near enough — NFKC, full case
/// folding, invisible (default-ignorable) characters dropped, NFKC again. So `Alice`, `ALICE`,
/// `Ａｌｉｃｅ` (full-width), `Straße`/`STRASSE`, an `é` typed as `e` + combining accent, and
/// `bob` with a zero-width space inside all claim one name.
pub fn name_key(display: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let compatible: String = display.nfkc().collect();
    // Lower-casing after folding covers letters newer than the folding tables (Rust's own
    // case data follows the latest Unicode).
    let folded: String = caseless::default_case_fold_str(&compatible)
        .to_lowercase()
        .chars()
        .filter(|c| !is_default_ignorable(*c))
        .collect();
    folded.nfkc().collect()
}

pub fn validate_name(raw: &str) -> Result<ValidName, Refusal> {
    let refuse = |message: String| {
        Err(Refusal::new(
            ErrorCode::InvalidName,
            message,
            Some("setName"),
        ))
    };
    let display = raw.trim();
    let chars = display.chars().count();
    if chars == 0 {
        return refuse("A name must have at least one visible character.".into());
    }
    if chars > NAME_MAX_CHARS {
        return refuse(format!(
            "A name can have at most {NAME_MAX_CHARS} characters; this one has {chars}."
        ));
    }
    if display.chars().any(|c| c.is_control() || is_line_break(c)) {
        return refuse("A name cannot contain control characters or line breaks.".into());
    }
    if display.chars().any(is_bidi_control) {
        return refuse("A name cannot contain bidirectional override characters.".into());
    }
    if display
        .chars()
        .all(|c| c.is_whitespace() || is_default_ignorable(c))
    {
        return refuse("A name must have at least one visible character.".into());
    }
    let key = name_key(display);
    if key.len() > NAME_KEY_MAX_BYTES {
        return refuse(format!(
            "This name is too long once normalised ({} bytes; at most {NAME_KEY_MAX_BYTES}): choose a shorter one.",
            key.len()
        ));
    }
    Ok(ValidName {
        display: display.to_owned(),
        key,
    })
}

/// The key a private message's `to` is looked up by, or `None` when no valid name can have it
/// (so nobody can be its recipient, and the store is not asked — nor handed an oversized key).
pub fn recipient_key(to: &str) -> Option<String> {
    let to = to.trim();
    if to.is_empty() || to.chars().count() > NAME_MAX_CHARS {
        return None;
    }
    Some(name_key(to)).filter(|key| key.len() <= NAME_KEY_MAX_BYTES)
}

/// Whether a character may be part of a room name.
fn is_room_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks a room name (see the module docs) for the request `action`: `invalid_room`, with
/// what is wrong, when it breaks the rules. Not trimmed: `" ops"` is refused, not read as
/// `ops`, so a client never posts to a room it did not name.
pub fn validate_room(raw: &str, action: &str) -> Result<(), Refusal> {
    let refuse = |message: String| Err(Refusal::new(ErrorCode::InvalidRoom, message, Some(action)));
    if raw.is_empty() {
        return refuse("A room name cannot be empty.".into());
    }
    let chars = raw.chars().count();
    if chars > ROOM_MAX_CHARS {
        return refuse(format!(
            "A room name can have at most {ROOM_MAX_CHARS} characters; this one has {chars}."
        ));
    }
    if let Some(bad) = raw.chars().find(|c| !is_room_char(*c)) {
        return refuse(format!(
            "A room name can only use ASCII letters, digits, '-', '_' and '.'; it has {:?}.",
            bad
        ));
    }
    Ok(())
}

pub fn validate_message(raw: &str, max_bytes: usize, action: &str) -> Result<(), Refusal> {
    if raw.trim().is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidMessage,
            "A message cannot be empty.",
            Some(action),
        ));
    }
    if raw.len() > max_bytes {
        return Err(Refusal::new(
            ErrorCode::MessageTooLarge,
            format!(
                "A message can be at most {max_bytes} bytes; this one is {} bytes.",
                raw.len()
            ),
            Some(action),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_keyed_without_case() {
        // GIVEN a padded mixed-case name  WHEN validated  THEN trimmed, key lower-cased
        let n = validate_name("  Alice ").expect("valid");
        assert_eq!(n.display, "Alice");
        assert_eq!(n.key, "alice");
        assert_eq!(validate_name("ALICE").expect("valid").key, n.key);
    }

    #[test]
    fn names_that_differ_only_in_case_or_normalisation_share_a_key() {
        let key = |n: &str| validate_name(n).expect("valid").key;
        assert_eq!(key("Alice"), key("ＡＬＩＣＥ"));
        assert_eq!(key("José"), key("Jose\u{301}"));
        assert_eq!(key("ﬁona"), key("Fiona"));
        assert_eq!(key("Straße"), key("STRASSE"));
        assert_eq!(key("bob"), key("b\u{200B}ob"));
        assert!(validate_name("\u{200B}\u{FEFF}").is_err());
        assert_ne!(key("alice"), key("alicia"));
        // Shown as typed.
        assert_eq!(
            validate_name(" ＡＬＩＣＥ ").expect("valid").display,
            "ＡＬＩＣＥ"
        );
    }

    #[test]
    fn name_length_counts_characters_not_bytes() {
        assert!(validate_name(&"é".repeat(32)).is_ok());
        assert!(validate_name(&"a".repeat(32)).is_ok());
        let r = validate_name(&"a".repeat(33)).expect_err("too long");
        assert_eq!(r.code, ErrorCode::InvalidName);
    }

    #[test]
    fn bad_names_are_refused_with_invalid_name() {
        for bad in [
            "",
            "   ",
            "\t\n",
            "a\u{0}b",
            "a\nb",
            "bob\u{7}",
            "\u{202E}evil",
            "x\u{2066}y",
            "a\u{202A}",
        ] {
            let r = validate_name(bad).expect_err(bad);
            assert_eq!(r.code, ErrorCode::InvalidName, "{bad:?}");
            assert_eq!(r.action.as_deref(), Some("setName"));
        }
    }

    #[test]
    fn names_whose_key_would_break_dynamodbs_key_limit_are_refused() {
        // GIVEN 32 copies of U+FDFA, which NFKC expands to 18 characters each
        let ligatures = "\u{FDFA}".repeat(32);
        assert!(
            name_key(&ligatures).len() > 1024,
            "the sort key would be over DynamoDB's cap"
        );
        // WHEN validated THEN refused as a name, before any key is built
        let r = validate_name(&ligatures).expect_err("key too long");
        assert_eq!(r.code, ErrorCode::InvalidName);
        assert!(r.message.contains("normalised"), "{}", r.message);
        // AND a few of them are still a name
        assert!(validate_name(&"\u{FDFA}".repeat(4)).is_ok());
        // AND no recipient can have that key: `to` never reaches the store
        assert_eq!(recipient_key(&ligatures), None);
        assert_eq!(recipient_key(&"a".repeat(33)), None);
        assert_eq!(recipient_key("  "), None);
        assert_eq!(recipient_key(" Bob "), Some("bob".into()));
    }

    #[test]
    fn line_and_paragraph_separators_are_not_allowed_in_names() {
        for bad in ["a\u{2028}b", "x\u{2029}y"] {
            let r = validate_name(bad).expect_err(bad);
            assert_eq!(r.code, ErrorCode::InvalidName, "{bad:?}");
        }
    }

    #[test]
    fn unicode_names_are_allowed() {
        for ok in ["Zoë", "山田", "a b", "🙂"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn room_names_are_ascii_words_up_to_64_characters() {
        // GIVEN names at the rules' edges  WHEN validated  THEN accepted
        for ok in [
            "lobby",
            "a",
            "Ops",
            "rust-lang.dev_1",
            "...",
            "-",
            &"r".repeat(64),
        ] {
            assert!(validate_room(ok, "join").is_ok(), "{ok}");
        }
        // AND every break of a rule is invalid_room, with the action and a precise reason
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&"r".repeat(65), "at most 64 characters; this one has 65"),
            ("a b", "' '"),
            (" ops", "' '"),
            ("ops\n", "'\\n'"),
            ("ROOM#x", "'#'"),
            ("a/b", "'/'"),
            ("café", "'é'"),
            ("ｏｐｓ", "'ｏ'"),
            ("a\u{200B}b", "'\\u{200b}'"),
        ];
        for (bad, why) in cases {
            let r = validate_room(bad, "sendPublic").expect_err(bad);
            assert_eq!(r.code, ErrorCode::InvalidRoom, "{bad:?}");
            assert_eq!(r.action.as_deref(), Some("sendPublic"));
            assert!(r.message.contains(why), "{bad:?}: {}", r.message);
        }
    }

    #[test]
    fn messages_must_be_non_empty_and_within_the_limit() {
        assert!(validate_message("hi", 4096, "sendPublic").is_ok());
        assert!(validate_message(&"x".repeat(4096), 4096, "sendPublic").is_ok());
        let big = validate_message(&"x".repeat(4097), 4096, "sendPublic").expect_err("big");
        assert_eq!(big.code, ErrorCode::MessageTooLarge);
        // The limit is in bytes: 2,049 two-byte characters are 4,098 bytes.
        let wide = validate_message(&"é".repeat(2049), 4096, "sendPrivate").expect_err("wide");
        assert_eq!(wide.code, ErrorCode::MessageTooLarge);
        assert_eq!(wide.action.as_deref(), Some("sendPrivate"));
        for empty in ["", " ", "\n\t"] {
            let r = validate_message(empty, 4096, "sendPublic").expect_err("empty");
            assert_eq!(r.code, ErrorCode::InvalidMessage);
        }
    }
}
