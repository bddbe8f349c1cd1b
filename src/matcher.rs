//! Which subscribers receive an event: event patterns and Thorn's sender rule
//! (DESIGN.md §3).
//!
//! A pattern is dot-separated segments; `*` matches exactly one segment,
//! except a trailing `*`, which matches one or more. An event with a sender
//! goes only to subscribers whose owner is that sender.

use std::collections::HashMap;

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Any,
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Vec<Segment>);

impl Pattern {
    pub fn parse(pattern: &str) -> Pattern {
        Pattern(
            pattern
                .split('.')
                .map(|s| match s {
                    "*" => Segment::Any,
                    name => Segment::Name(name.to_owned()),
                })
                .collect(),
        )
    }

    pub fn matches(&self, event: &str) -> bool {
        let mut names = event.split('.');
        let last = self.0.len().saturating_sub(1);
        for (i, segment) in self.0.iter().enumerate() {
            match (segment, names.next()) {
                (_, None) => return false,
                (Segment::Any, Some(_)) if i == last => return true,
                (Segment::Any, Some(_)) => {}
                (Segment::Name(want), Some(got)) if want == got => {}
                (Segment::Name(_), Some(_)) => return false,
            }
        }
        names.next().is_none()
    }
}

/// Event names whose matches are remembered at most.
const MAX_REMEMBERED: usize = 4096;

/// An active subscriber, as far as matching is concerned.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: Uuid,
    pub pattern: Pattern,
    pub owner: Option<String>,
}

/// The active subscribers of one `thorn.subscriber_version`, with the
/// matches of each event name remembered (events repeat a few names).
#[derive(Debug, Default)]
pub struct Matcher {
    pub version: i64,
    subscribers: Vec<Subscriber>,
    by_event: HashMap<String, Vec<usize>>,
}

impl Matcher {
    pub fn new(version: i64, subscribers: Vec<Subscriber>) -> Matcher {
        Matcher {
            version,
            subscribers,
            by_event: HashMap::new(),
        }
    }

    /// The subscribers that receive an event named `event` sent by `sender`.
    pub fn recipients(&mut self, event: &str, sender: Option<&str>) -> Vec<Uuid> {
        // Names are few in practice, but anything may write the outbox: a
        // stream of distinct names must not grow the daemon without end.
        if self.by_event.len() >= MAX_REMEMBERED && !self.by_event.contains_key(event) {
            self.by_event.clear();
        }
        let subscribers = &self.subscribers;
        let matching = self.by_event.entry(event.to_owned()).or_insert_with(|| {
            (0..subscribers.len())
                .filter(|&i| subscribers[i].pattern.matches(event))
                .collect()
        });
        matching
            .iter()
            .map(|&i| &subscribers[i])
            .filter(|s| sender.is_none() || s.owner.as_deref() == sender)
            .map(|s| s.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, event: &str) -> bool {
        Pattern::parse(pattern).matches(event)
    }

    #[test]
    fn remembered_names_are_bounded() {
        let id = Uuid::new_v4();
        let subscriber = Subscriber {
            id,
            pattern: Pattern::parse("a.*"),
            owner: None,
        };
        let mut matcher = Matcher::new(1, vec![subscriber]);
        for i in 0..3 * MAX_REMEMBERED {
            assert_eq!(matcher.recipients(&format!("a.{i}"), None), [id]);
            assert!(matcher.by_event.len() <= MAX_REMEMBERED);
        }
        assert!(matcher.recipients("b.x", None).is_empty());
    }

    #[test]
    fn pattern_semantics() {
        assert!(m("article.created", "article.created"));
        assert!(!m("article.created", "article.created.x"));
        assert!(m("article.*", "article.created"));
        assert!(m("article.*", "article.tag.added"));
        assert!(!m("article.*", "article"));
        assert!(!m("article.*", "articles.created"));
        assert!(m("*.created", "article.created"));
        assert!(!m("*.created", "a.b.created"));
        assert!(m("*", "article"));
        assert!(m("*", "a.b.c"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.b.d"));
        assert!(!m("a.*.c", "a.b.x.c"));
        assert!(m("a.*.*", "a.b.c.d"));
        assert!(!m("a.*.*", "a.b"));
    }

    fn sub(n: u128, pattern: &str, owner: Option<&str>) -> Subscriber {
        Subscriber {
            id: Uuid::from_u128(n),
            pattern: Pattern::parse(pattern),
            owner: owner.map(str::to_owned),
        }
    }

    #[test]
    fn thorns_matching_table() {
        // THORN.md: A foo.*, C foo.created, E *.created, G baz.*, H *.
        let mut matcher = Matcher::new(
            1,
            vec![
                sub(0xA, "foo.*", None),
                sub(0xC, "foo.created", None),
                sub(0xE, "*.created", None),
                sub(0x6, "baz.*", None),
                sub(0x8, "*", None),
            ],
        );
        let ids = |v: &[u128]| v.iter().map(|&n| Uuid::from_u128(n)).collect::<Vec<_>>();
        assert_eq!(
            matcher.recipients("foo.created", None),
            ids(&[0xA, 0xC, 0xE, 0x8])
        );
        assert_eq!(matcher.recipients("foo.updated", None), ids(&[0xA, 0x8]));
        assert_eq!(
            matcher.recipients("baz.created", None),
            ids(&[0xE, 0x6, 0x8])
        );
        assert_eq!(matcher.recipients("bar.deleted", None), ids(&[0x8]));
    }

    #[test]
    fn sender_rule() {
        let mut matcher = Matcher::new(
            1,
            vec![
                sub(1, "a.*", Some("alice")),
                sub(2, "a.*", Some("bob")),
                sub(3, "a.*", None),
            ],
        );
        assert_eq!(
            matcher.recipients("a.x", Some("alice")),
            vec![Uuid::from_u128(1)]
        );
        assert_eq!(matcher.recipients("a.x", Some("carol")), Vec::<Uuid>::new());
        assert_eq!(matcher.recipients("a.x", None).len(), 3);
    }
}
