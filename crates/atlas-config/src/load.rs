//! Turning TOML text into a [`RawConfig`], collecting every error.
//!
//! The document is parsed once into toml's spanned tree (`DeTable`), then
//! each top-level section (and each element of an array of tables) is
//! deserialised on its own. An error in `[[upstreams]]` #2 therefore does not
//! hide one in `[routing]`. Every error carries a byte span; `key_path_at`
//! walks the spanned tree to name the key it belongs to.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::raw::*;
use crate::ConfigError;

/// Collects errors against one source text.
pub(crate) struct Diag<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub errors: Vec<ConfigError>,
    /// Sections that did not deserialise: checks that depend on them are
    /// skipped so one mistake is not reported three times.
    pub failed: Vec<String>,
}

impl<'a> Diag<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Diag { file, text, errors: Vec::new(), failed: Vec::new() }
    }

    pub fn push(&mut self, span: Option<Range<usize>>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = match span {
            Some(s) => line_col(self.text, s.start),
            None => (0, 0),
        };
        self.errors.push(ConfigError { file: self.file.to_string(), line, column, key: key.into(), message: message.into() });
    }

    /// `file:line:column: key`, for errors found later (e.g. at TLS set-up).
    pub fn origin<T>(&self, v: &Spanned<T>, key: &str) -> String {
        let (line, column) = line_col(self.text, v.span().start);
        format!("{}:{line}:{column}: {key}", self.file)
    }

    pub fn at<T>(&mut self, v: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        self.push(Some(v.span()), key, message)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// Names the innermost key whose key or value span contains `span`.
///
/// The whole tree is searched: a table opened by a `[header]` has a span
/// that covers only the header, so containment of parents cannot be relied on.
fn key_path_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    walk_table(table, span, "", &mut best);
    best.map(|(_, k)| k)
}

fn consider(candidate: Range<usize>, span: &Range<usize>, key: &str, best: &mut Option<(usize, String)>) {
    if candidate.start <= span.start && span.end <= candidate.end {
        let len = candidate.end - candidate.start;
        if best.as_ref().is_none_or(|(l, _)| len <= *l) {
            *best = Some((len, key.to_string()));
        }
    }
}

fn walk_table(table: &DeTable<'_>, span: &Range<usize>, prefix: &str, best: &mut Option<(usize, String)>) {
    for (k, v) in table.iter() {
        let key = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        consider(k.span(), span, &key, best);
        walk_value(v, span, &key, best);
    }
}

fn walk_value(v: &Spanned<DeValue<'_>>, span: &Range<usize>, key: &str, best: &mut Option<(usize, String)>) {
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, span, key, best),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                walk_value(item, span, &format!("{key}[{i}]"), best);
            }
        }
        _ => consider(v.span(), span, key, best),
    }
}

fn section<T: DeserializeOwned>(diag: &mut Diag<'_>, root: &DeTable<'_>, key: &str, value: &Spanned<DeValue<'_>>) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(v) => Some(v),
        Err(e) => {
            let span = e.span().unwrap_or_else(|| value.span());
            let path = key_path_at(root, &span).filter(|p| !p.is_empty()).unwrap_or_else(|| key.to_string());
            diag.failed.push(key.to_string());
            diag.push(Some(span), path, e.message().to_string());
            None
        }
    }
}

/// Deserialises an array of tables element by element.
fn table_array<T: DeserializeOwned>(diag: &mut Diag<'_>, root: &DeTable<'_>, key: &str, value: &Spanned<DeValue<'_>>) -> Vec<Spanned<T>> {
    let Some(arr) = value.get_ref().as_array() else {
        diag.push(Some(value.span()), key, format!("`{key}` must be an array of tables ([[{key}]])"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in arr.iter() {
        if let Some(t) = section::<T>(diag, root, key, v) {
            out.push(Spanned::new(v.span(), t));
        }
    }
    out
}

const SECTIONS: &[&str] = &[
    "listen",
    "listeners",
    "upstreams",
    "routing",
    "static_files",
    "runtime",
    "api",
    "timeouts",
    "limits",
    "pool",
    "routes",
    "health",
    "spatial",
    "rooms",
    "store",
    "firehose",
];

pub(crate) fn parse_raw(diag: &mut Diag<'_>) -> RawConfig {
    let (doc, errors) = DeTable::parse_recoverable(diag.text);
    for e in errors {
        diag.push(e.span(), "(syntax)", e.message().to_string());
    }
    let root = doc.get_ref();
    let mut raw = RawConfig::default();
    for (k, v) in root.iter() {
        let key = k.get_ref().as_ref();
        match key {
            "listen" => raw.listen = section::<RawListener>(diag, root, key, v).map(|l| Spanned::new(v.span(), l)),
            "listeners" => raw.listeners = table_array(diag, root, key, v),
            "upstreams" => raw.upstreams = table_array(diag, root, key, v),
            "routing" => raw.routing = section(diag, root, key, v).unwrap_or_default(),
            "static_files" => raw.static_files = section(diag, root, key, v).unwrap_or_default(),
            "runtime" => raw.runtime = section(diag, root, key, v).unwrap_or_default(),
            "api" => raw.api = section::<RawApi>(diag, root, key, v).map(|a| Spanned::new(v.span(), a)),
            "timeouts" => raw.timeouts = section(diag, root, key, v).unwrap_or_default(),
            "limits" => raw.limits = section(diag, root, key, v).unwrap_or_default(),
            "pool" => raw.pool = section(diag, root, key, v).unwrap_or_default(),
            "routes" => raw.routes = table_array(diag, root, key, v),
            "health" => raw.health = section(diag, root, key, v).unwrap_or_default(),
            "spatial" => raw.spatial = section(diag, root, key, v).unwrap_or_default(),
            "rooms" => raw.rooms = section(diag, root, key, v).unwrap_or_default(),
            "store" => raw.store = section(diag, root, key, v).unwrap_or_default(),
            "firehose" => raw.firehose = section(diag, root, key, v).unwrap_or_default(),
            other => diag.push(
                Some(k.span()),
                if other.is_empty() { "(empty key)" } else { other },
                format!("unknown section `{other}`, expected one of: {}", SECTIONS.join(", ")),
            ),
        }
    }
    raw
}
