//! A strict reader of the Prometheus text exposition format 0.0.4, for
//! the metrics tests: every line must be a HELP, a TYPE or a well-formed
//! sample of a declared family; no duplicate series; histograms cumulative
//! and consistent. `prometheus-parse` skips lines it cannot read, so on its
//! own it would let a malformed exposition pass.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use prometheus_parse::{Sample, Value};
// ---------------------------------------------------------------------------
// A strict reader of the text exposition format 0.0.4
// ---------------------------------------------------------------------------

pub type LabelSet = BTreeMap<String, String>;

#[derive(Debug)]
pub struct Series {
    pub name: String,
    pub labels: LabelSet,
    pub value: f64,
}

pub struct Exposition {
    /// Family name -> type, in the order of the TYPE lines.
    pub types: Vec<(String, String)>,
    pub series: Vec<Series>,
}

impl Exposition {
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.iter().find(|(n, _)| n == family).map(|(_, t)| t.as_str())
    }
}

pub fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':') && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

pub fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_') && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `k="v",k2="v2"` (escapes: `\\`, `\"`, `\n`) up to the closing brace;
/// returns the labels and the rest after `}`.
pub fn parse_labels(s: &str) -> Result<(LabelSet, &str), String> {
    let mut labels = LabelSet::new();
    let mut rest = s;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} value is not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                '\n' => return Err("raw newline in a label value".into()),
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated value of label {name}"))?;
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected `,` or `}}` after label {name}"));
        }
    }
}

/// The family a sample name belongs to, given the declared types.
pub fn family_of<'a>(name: &'a str, types: &[(String, String)]) -> Option<&'a str> {
    if types.iter().any(|(n, _)| n == name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.iter().any(|(n, t)| n == base && (t == "histogram" || (t == "summary" && suffix != "_bucket"))) {
                return Some(base);
            }
        }
    }
    None
}

pub fn parse_strict(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut types: Vec<(String, String)> = Vec::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut series: Vec<Series> = Vec::new();
    let mut seen: BTreeSet<(String, LabelSet)> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !is_metric_name(name) || !helps.insert(name.to_string()) {
                return Err(at("bad or repeated HELP".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !is_metric_name(name) || parts.next().is_some() {
                return Err(at("bad TYPE line".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind:?}")));
            }
            if types.iter().any(|(n, _)| n == name) {
                return Err(at("second TYPE line for a family".into()));
            }
            if series.iter().any(|s| family_of(&s.name, &[(name.to_string(), kind.to_string())]).is_some()) {
                return Err(at("TYPE after samples of the family".into()));
            }
            types.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r).map_err(at)?,
            None => (LabelSet::new(), &line[name_end..]),
        };
        let rest = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = fields.next().and_then(parse_value).ok_or_else(|| at("bad value".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &types).ok_or_else(|| at("sample of a family without a TYPE line".into()))?.to_string();
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at(format!("samples of {family} are not grouped together")));
            }
            if let Some(prev) = current.take() {
                finished.insert(prev);
            }
            current = Some(family.clone());
        }
        let is_bucket = name.ends_with("_bucket") && name != family;
        if is_bucket != labels.contains_key("le") {
            return Err(at("`le` belongs on histogram buckets only".into()));
        }
        if is_bucket && labels.get("le").and_then(|v| parse_value(v)).is_none() {
            return Err(at("bad `le`".into()));
        }
        if !seen.insert((name.to_string(), labels.clone())) {
            return Err(at("duplicate series".into()));
        }
        series.push(Series { name: name.to_string(), labels, value });
    }
    // Histograms: cumulative buckets ending in +Inf, equal to _count; _sum present.
    for (fam, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut groups: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
        for s in series.iter().filter(|s| s.name == format!("{fam}_bucket")) {
            let mut l = s.labels.clone();
            let le = parse_value(&l.remove("le").unwrap()).unwrap();
            groups.entry(l).or_default().push((le, s.value));
        }
        for (labels, buckets) in &groups {
            if buckets.windows(2).any(|w| w[1].0 <= w[0].0 || w[1].1 < w[0].1) {
                return Err(format!("{fam}{labels:?}: buckets not in increasing `le` order or not cumulative: {buckets:?}"));
            }
            if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
                return Err(format!("{fam}{labels:?}: no +Inf bucket"));
            }
            let count = series.iter().find(|s| s.name == format!("{fam}_count") && &s.labels == labels).map(|s| s.value);
            if count != buckets.last().map(|b| b.1) {
                return Err(format!("{fam}{labels:?}: _count {count:?} differs from the +Inf bucket {:?}", buckets.last()));
            }
            if !series.iter().any(|s| s.name == format!("{fam}_sum") && &s.labels == labels) {
                return Err(format!("{fam}{labels:?}: no _sum"));
            }
        }
        let sums = series.iter().filter(|s| s.name == format!("{fam}_sum")).count();
        if sums != groups.len() {
            return Err(format!("{fam}: {sums} _sum series for {} bucket groups", groups.len()));
        }
    }
    Ok(Exposition { types, series })
}

pub fn labels_of(s: &Sample) -> LabelSet {
    s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn scalar(v: &Value) -> Option<f64> {
    match v {
        Value::Counter(f) | Value::Gauge(f) | Value::Untyped(f) => Some(*f),
        _ => None,
    }
}

pub fn pairs_match(labels: &LabelSet, pairs: &[(&str, &str)]) -> bool {
    pairs.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}
