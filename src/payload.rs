//! The request body: Thorn's envelope `{"event", "ref", "sender", "data"}`,
//! as JSON or as a form.
//!
//! `data` arrives as the text PostgreSQL rendered for the event's jsonb and is
//! spliced in unchanged, so numbers beyond 2^53 and numeric precision survive
//! exactly. The spacing (`": "`, `", "`) is the one jsonb and Python's
//! `json.dumps` both use.

/// The two encodings a subscriber can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Json,
    Form,
}

impl ContentType {
    pub fn from_column(s: &str) -> Option<ContentType> {
        match s {
            "application/json" => Some(ContentType::Json),
            "application/x-www-form-urlencoded" => Some(ContentType::Form),
            _ => None,
        }
    }

    pub fn header_value(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// One captured change, as the daemon reads it from `thorn.event`.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    pub event: &'a str,
    pub reference: Option<&'a str>,
    pub sender: Option<&'a str>,
    /// The jsonb text of the row.
    pub data: &'a str,
}

impl Envelope<'_> {
    pub fn encode(&self, content_type: ContentType) -> Vec<u8> {
        match content_type {
            ContentType::Json => self.to_json().into_bytes(),
            ContentType::Form => self.to_form().into_bytes(),
        }
    }

    fn to_json(&self) -> String {
        let string = |s: &str| serde_json::Value::from(s).to_string();
        let nullable = |s: Option<&str>| s.map_or_else(|| "null".to_owned(), string);
        let mut out = String::with_capacity(self.data.len() + self.event.len() + 64);
        out.push_str("{\"event\": ");
        out.push_str(&string(self.event));
        out.push_str(", \"ref\": ");
        out.push_str(&nullable(self.reference));
        out.push_str(", \"sender\": ");
        out.push_str(&nullable(self.sender));
        out.push_str(", \"data\": ");
        out.push_str(self.data);
        out.push('}');
        out
    }

    /// `event=…&ref=…&sender=…&data=…`, null as an empty value.
    fn to_form(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("event", self.event)
            .append_pair("ref", self.reference.unwrap_or(""))
            .append_pair("sender", self.sender.unwrap_or(""))
            .append_pair("data", self.data)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article() -> Envelope<'static> {
        Envelope {
            event: "article.created",
            reference: Some("/article/1/"),
            sender: Some("alice"),
            data: r#"{"title": "Hello"}"#,
        }
    }

    #[test]
    fn json_matches_thorn_byte_for_byte() {
        assert_eq!(
            article().encode(ContentType::Json),
            br#"{"event": "article.created", "ref": "/article/1/", "sender": "alice", "data": {"title": "Hello"}}"#
        );
    }

    #[test]
    fn json_nulls_and_escapes() {
        let e = Envelope {
            event: "a.b",
            reference: None,
            sender: Some("q\"uote"),
            data: "{}",
        };
        assert_eq!(
            String::from_utf8(e.encode(ContentType::Json)).expect("utf-8"),
            r#"{"event": "a.b", "ref": null, "sender": "q\"uote", "data": {}}"#
        );
    }

    #[test]
    fn form_encoding() {
        let e = Envelope {
            sender: None,
            ..article()
        };
        assert_eq!(
            String::from_utf8(e.encode(ContentType::Form)).expect("utf-8"),
            "event=article.created&ref=%2Farticle%2F1%2F&sender=&data=%7B%22title%22%3A+%22Hello%22%7D"
        );
    }
}
