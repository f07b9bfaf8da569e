//! Topic name / topic filter validation and the naive single-filter matcher.
//!
//! These follow MQTT 3.1.1 §4.7 and MQTT 5.0 §4.7 (and §4.8.2 for shared
//! subscriptions). All functions work on `&str`, so "well-formed UTF-8" is
//! already guaranteed by the caller's decoding step; what remains is length,
//! U+0000 and wildcard placement.

use std::fmt;

/// Longest topic name / filter the protocol can carry (a UTF-8 string is
/// prefixed by a two-byte length).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Most levels a topic filter may have. The spec sets no limit, but the
/// subscription trie recurses once per filter level (matching, removal and
/// dropping a branch), so an unbounded depth chosen by a client could overflow
/// the stack. 1024 levels is far beyond any real filter yet keeps the
/// recursion to a few tens of KiB. Topic names need no such limit: matching
/// never goes deeper than the deepest stored filter.
pub const MAX_FILTER_LEVELS: usize = 1024;

/// Prefix that marks a shared subscription filter (MQTT 5.0 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// Why a topic name or filter is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Zero-length topic name or filter (§4.7.3: must be at least one character).
    Empty,
    /// Longer than 65 535 bytes.
    TooLong,
    /// Contains U+0000, which §1.5.4 forbids in every UTF-8 string.
    NullChar,
    /// A topic name (PUBLISH) contains `+` or `#`.
    WildcardInTopicName,
    /// `#` is not the whole last level, or `+` is not a whole level.
    InvalidWildcard,
    /// The filter has more than [`MAX_FILTER_LEVELS`] levels (a broker limit,
    /// not a spec rule; it bounds the trie's recursion depth).
    TooManyLevels,
    /// `$share/{group}/...` with an empty group or a group containing `+`, `#` or `/`.
    InvalidSharedGroup,
    /// `$share/{group}` or `$share/{group}/` with no filter after the group.
    SharedFilterEmpty,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            TopicError::Empty => "topic is empty",
            TopicError::TooLong => "topic is longer than 65535 bytes",
            TopicError::NullChar => "topic contains U+0000",
            TopicError::WildcardInTopicName => "topic name contains a wildcard ('+' or '#')",
            TopicError::InvalidWildcard => {
                "wildcard misplaced: '#' must be the whole last level and '+' a whole level"
            }
            TopicError::TooManyLevels => "topic filter has more than 1024 levels",
            TopicError::InvalidSharedGroup => {
                "shared subscription group is empty or contains '+', '#' or '/'"
            }
            TopicError::SharedFilterEmpty => "shared subscription has no topic filter",
        };
        f.write_str(msg)
    }
}

impl std::error::Error for TopicError {}

/// A parsed SUBSCRIBE topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionFilter<'a> {
    /// An ordinary filter such as `sport/+/player1`.
    Plain(&'a str),
    /// `$share/{group}/{filter}`: one member of `group` receives each message.
    Shared {
        /// The share name, e.g. `g` in `$share/g/a/b`.
        group: &'a str,
        /// The inner filter, e.g. `a/b` in `$share/g/a/b`.
        filter: &'a str,
    },
}

impl<'a> SubscriptionFilter<'a> {
    /// The filter that is matched against topic names (the inner one for shared).
    pub fn filter(&self) -> &'a str {
        match *self {
            SubscriptionFilter::Plain(f) => f,
            SubscriptionFilter::Shared { filter, .. } => filter,
        }
    }

    /// The share group, if this is a shared subscription.
    pub fn group(&self) -> Option<&'a str> {
        match *self {
            SubscriptionFilter::Plain(_) => None,
            SubscriptionFilter::Shared { group, .. } => Some(group),
        }
    }
}

/// Checks the rules common to names and filters: non-empty, length, U+0000.
fn validate_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    // memchr-style byte scan; U+0000 is encoded as a single 0 byte in UTF-8.
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullChar);
    }
    Ok(())
}

/// Validates a PUBLISH topic name: non-empty, at most 65 535 bytes, no U+0000,
/// and no `+` or `#` anywhere.
///
/// ```
/// use topic_trie::{validate_topic_name, TopicError};
/// assert!(validate_topic_name("sport/tennis/player1").is_ok());
/// assert!(validate_topic_name("/").is_ok()); // two empty levels
/// assert_eq!(validate_topic_name("sport/+"), Err(TopicError::WildcardInTopicName));
/// assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
/// ```
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    validate_common(topic)?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// Validates a plain topic filter (no `$share` parsing — see
/// [`parse_subscription_filter`] for that): non-empty, at most 65 535 bytes,
/// no U+0000, `#` only as the whole last level, `+` only as a whole level,
/// and (a broker limit) at most [`MAX_FILTER_LEVELS`] levels.
///
/// ```
/// use topic_trie::{validate_filter, TopicError};
/// assert!(validate_filter("sport/tennis/#").is_ok());
/// assert!(validate_filter("#").is_ok());
/// assert!(validate_filter("+/tennis/+").is_ok());
/// assert!(validate_filter("+").is_ok());
/// assert_eq!(validate_filter("sport/tennis#"), Err(TopicError::InvalidWildcard));
/// assert_eq!(validate_filter("sport/#/ranking"), Err(TopicError::InvalidWildcard));
/// assert_eq!(validate_filter("sport+"), Err(TopicError::InvalidWildcard));
/// ```
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    validate_common(filter)?;
    let mut levels = filter.split('/').peekable();
    let mut count = 0usize;
    while let Some(level) = levels.next() {
        count += 1;
        if count > MAX_FILTER_LEVELS {
            return Err(TopicError::TooManyLevels);
        }
        let is_last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && is_last) {
            return Err(TopicError::InvalidWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::InvalidWildcard);
        }
    }
    Ok(())
}

/// Parses a SUBSCRIBE topic filter. `$share/{group}/{filter}` becomes
/// [`SubscriptionFilter::Shared`], anything else [`SubscriptionFilter::Plain`].
/// The (inner) filter is checked with [`validate_filter`].
///
/// ```
/// use topic_trie::{parse_subscription_filter, SubscriptionFilter, TopicError};
/// assert_eq!(
///     parse_subscription_filter("$share/g/a/b"),
///     Ok(SubscriptionFilter::Shared { group: "g", filter: "a/b" })
/// );
/// assert_eq!(parse_subscription_filter("a/+"), Ok(SubscriptionFilter::Plain("a/+")));
/// assert_eq!(parse_subscription_filter("$share/g"), Err(TopicError::SharedFilterEmpty));
/// assert_eq!(parse_subscription_filter("$share//a"), Err(TopicError::InvalidSharedGroup));
/// assert_eq!(parse_subscription_filter("$share/g+/a"), Err(TopicError::InvalidSharedGroup));
/// ```
pub fn parse_subscription_filter(s: &str) -> Result<SubscriptionFilter<'_>, TopicError> {
    validate_common(s)?;
    let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
        validate_filter(s)?;
        return Ok(SubscriptionFilter::Plain(s));
    };
    // The group ends at the first '/', so it can never contain one.
    let (group, filter) = match rest.split_once('/') {
        Some((g, f)) => (g, f),
        None => (rest, ""),
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(TopicError::InvalidSharedGroup);
    }
    if filter.is_empty() {
        return Err(TopicError::SharedFilterEmpty);
    }
    validate_filter(filter)?;
    Ok(SubscriptionFilter::Shared { group, filter })
}

/// Naive, spec-exact matcher of one (valid) filter against one topic name.
///
/// Used for retained messages (one topic name per retained message, checked
/// against a new subscription's filter) and as the test oracle for
/// [`crate::TopicTrie`]. For an invalid filter the result is unspecified but
/// it never panics.
///
/// ```
/// use topic_trie::filter_matches;
/// assert!(filter_matches("sport/#", "sport"));           // '#' includes the parent
/// assert!(filter_matches("+/+", "/finance"));            // '+' matches an empty level
/// assert!(!filter_matches("sport/+", "sport"));          // '+' needs exactly one level
/// assert!(!filter_matches("#", "$SYS/uptime"));          // '$' topics hide from leading wildcards
/// assert!(filter_matches("$SYS/#", "$SYS/uptime"));
/// ```
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    // §4.7.2: a filter starting with a wildcard must not match a topic
    // starting with '$'.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            // '#' swallows the rest, including zero further levels (parent match).
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TopicError::*;

    #[test]
    fn topic_name_rules() {
        assert_eq!(validate_topic_name("a/b"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name("$SYS/x"), Ok(()));
        assert_eq!(validate_topic_name(" "), Ok(()));
        assert_eq!(validate_topic_name("ünïcödé/☃"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(Empty));
        assert_eq!(validate_topic_name("a\0b"), Err(NullChar));
        assert_eq!(validate_topic_name("a/+"), Err(WildcardInTopicName));
        assert_eq!(validate_topic_name("#"), Err(WildcardInTopicName));
        assert_eq!(validate_topic_name("a#b"), Err(WildcardInTopicName));
        assert_eq!(validate_topic_name(&"a".repeat(MAX_TOPIC_LEN)), Ok(()));
        assert_eq!(
            validate_topic_name(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TooLong)
        );
        // Topic names have no level limit: matching depth is bounded by filters.
        assert_eq!(validate_topic_name(&"/".repeat(MAX_TOPIC_LEN)), Ok(()));
    }

    #[test]
    fn filter_rules() {
        for ok in [
            "a",
            "a/b",
            "#",
            "+",
            "+/+",
            "/",
            "//",
            "a/#",
            "+/#",
            "/#",
            "a/+/b",
            "$SYS/#",
            "$share",
            "$share/g",
            "a/$share/g/#",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in [
            "a#", "a/#/b", "#/", "##", "a/b#", "a+", "+a/b", "a/++", "a/+#", "#/#",
        ] {
            assert_eq!(validate_filter(bad), Err(InvalidWildcard), "{bad}");
        }
        assert_eq!(validate_filter(""), Err(Empty));
        assert_eq!(validate_filter("a/\0"), Err(NullChar));
        assert_eq!(
            validate_filter(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TooLong)
        );
        let deep_ok = vec!["+"; MAX_FILTER_LEVELS].join("/");
        assert_eq!(validate_filter(&deep_ok), Ok(()));
        let deep_bad = vec!["+"; MAX_FILTER_LEVELS + 1].join("/");
        assert_eq!(validate_filter(&deep_bad), Err(TooManyLevels));
    }

    #[test]
    fn shared_parsing() {
        use SubscriptionFilter::*;
        assert_eq!(
            parse_subscription_filter("$share/g/a/b"),
            Ok(Shared {
                group: "g",
                filter: "a/b"
            })
        );
        assert_eq!(
            parse_subscription_filter("$share/g/#"),
            Ok(Shared {
                group: "g",
                filter: "#"
            })
        );
        assert_eq!(
            parse_subscription_filter("$share/g//"),
            Ok(Shared {
                group: "g",
                filter: "/"
            })
        );
        assert_eq!(parse_subscription_filter("a/+"), Ok(Plain("a/+")));
        assert_eq!(parse_subscription_filter("$share"), Ok(Plain("$share")));
        assert_eq!(
            parse_subscription_filter("$SHARE/g/a"),
            Ok(Plain("$SHARE/g/a"))
        );
        assert_eq!(
            parse_subscription_filter("$share/g"),
            Err(SharedFilterEmpty)
        );
        assert_eq!(
            parse_subscription_filter("$share/g/"),
            Err(SharedFilterEmpty)
        );
        assert_eq!(
            parse_subscription_filter("$share/"),
            Err(InvalidSharedGroup)
        );
        assert_eq!(
            parse_subscription_filter("$share//a"),
            Err(InvalidSharedGroup)
        );
        assert_eq!(
            parse_subscription_filter("$share/g+/a"),
            Err(InvalidSharedGroup)
        );
        assert_eq!(
            parse_subscription_filter("$share/+/a"),
            Err(InvalidSharedGroup)
        );
        assert_eq!(
            parse_subscription_filter("$share/#/a"),
            Err(InvalidSharedGroup)
        );
        assert_eq!(
            parse_subscription_filter("$share/g/a#"),
            Err(InvalidWildcard)
        );
        assert_eq!(parse_subscription_filter("a/#/b"), Err(InvalidWildcard));
        assert_eq!(parse_subscription_filter(""), Err(Empty));
        assert_eq!(parse_subscription_filter("$share/g/\0"), Err(NullChar));
        let p = parse_subscription_filter("$share/g/a").unwrap();
        assert_eq!((p.group(), p.filter()), (Some("g"), "a"));
        let p = parse_subscription_filter("a").unwrap();
        assert_eq!((p.group(), p.filter()), (None, "a"));
    }

    #[test]
    fn naive_matcher_spec_examples() {
        let yes = [
            ("sport/tennis/player1/#", "sport/tennis/player1"),
            ("sport/tennis/player1/#", "sport/tennis/player1/ranking"),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
            ),
            ("sport/#", "sport"),
            ("#", "sport/tennis"),
            ("#", "/"),
            ("sport/tennis/+", "sport/tennis/player1"),
            ("sport/+", "sport/"),
            ("+/+", "/finance"),
            ("/+", "/finance"),
            ("+", "sport"),
            ("+/tennis/#", "sport/tennis"),
            ("$SYS/#", "$SYS/monitor/Clients"),
            ("$SYS/monitor/+", "$SYS/monitor/Clients"),
            ("a//b", "a//b"),
            ("a/+/b", "a//b"),
        ];
        for (f, t) in yes {
            assert!(filter_matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("sport/tennis/+", "sport/tennis/player1/ranking"),
            ("sport/+", "sport"),
            ("+", "/finance"),
            ("#", "$SYS/monitor/Clients"),
            ("+/monitor/Clients", "$SYS/monitor/Clients"),
            ("+", "$SYS"),
            ("a/b", "a//b"),
            ("a/b", "a/b/"),
            ("a", "A"),
        ];
        for (f, t) in no {
            assert!(!filter_matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn errors_display() {
        for e in [
            Empty,
            TooLong,
            NullChar,
            WildcardInTopicName,
            InvalidWildcard,
            TooManyLevels,
            InvalidSharedGroup,
            SharedFilterEmpty,
        ] {
            assert!(!e.to_string().is_empty());
            let _: &dyn std::error::Error = &e;
        }
    }
}
