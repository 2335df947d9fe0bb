//! Where a player's position is found in the JSON text messages a client
//! sends (spec §2). A [`Rule`] says which messages carry a position (a
//! field with one of some values) and where the point is; the defaults
//! cover every form in the spec:
//!
//! - Horizon: `{"namespace": "movement", "data": {"target_x", "target_y", "target_z"}}`
//! - the seed's clients, `"type"` of `"move"` or `"position"`, with the
//!   point at the root (`x`, `y`, `z`), in `position{x,y,z}`, in
//!   `pos: [x, y, z]` or in `coords{x,y,z}`.
//!
//! A message is only parsed when it contains one of the rules' trigger
//! values as text, so chat and other traffic costs a substring search.
//! A missing `z` reads as 0 (2D games); non-numbers and non-finite values
//! are not positions.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub z: f64,
}

pub use atlas_config::{PositionPlace as Place, PositionRule as Rule};

fn xyz(path: &[&str], x: &str, y: &str, z: &str) -> Place {
    Place::Fields { path: path.iter().map(|s| s.to_string()).collect(), x: x.into(), y: y.into(), z: z.into() }
}

/// The rules used when the configuration gives none.
pub fn default_rules() -> Vec<Rule> {
    vec![
        Rule {
            field: "namespace".into(),
            values: vec!["movement".into()],
            places: vec![xyz(&["data"], "target_x", "target_y", "target_z"), xyz(&["data"], "x", "y", "z")],
        },
        Rule {
            field: "type".into(),
            values: vec!["move".into(), "position".into()],
            places: vec![
                xyz(&[], "x", "y", "z"),
                xyz(&["position"], "x", "y", "z"),
                Place::Array { path: vec!["pos".into()] },
                xyz(&["coords"], "x", "y", "z"),
            ],
        },
    ]
}

fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn num(v: Option<&Value>) -> Option<f64> {
    v?.as_f64().filter(|f| f.is_finite())
}

fn read(v: &Value, place: &Place) -> Option<Point> {
    match place {
        Place::Fields { path, x, y, z } => {
            let o = at(v, path)?;
            let z = match o.get(z) {
                None => 0.0,
                some => num(some)?,
            };
            Some(Point { x: num(o.get(x))?, y: num(o.get(y))?, z })
        }
        Place::Array { path } => {
            let a = at(v, path)?.as_array()?;
            if !(2..=3).contains(&a.len()) {
                return None;
            }
            let z = if a.len() == 3 { num(a.get(2))? } else { 0.0 };
            Some(Point { x: num(a.first())?, y: num(a.get(1))?, z })
        }
    }
}

/// The position in `text`, if a rule matches it.
pub fn extract(text: &str, rules: &[Rule]) -> Option<Point> {
    if !rules.iter().any(|r| r.values.iter().any(|v| text.contains(v.as_str()))) {
        return None;
    }
    let v: Value = serde_json::from_str(text).ok()?;
    rules
        .iter()
        .filter(|r| v.get(&r.field).and_then(Value::as_str).is_some_and(|f| r.values.iter().any(|x| x == f)))
        .find_map(|r| r.places.iter().find_map(|p| read(&v, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Option<(f64, f64, f64)> {
        extract(text, &default_rules()).map(|p| (p.x, p.y, p.z))
    }

    #[test]
    fn every_form_in_the_spec() {
        assert_eq!(
            p(r#"{"namespace": "movement", "event": "move_request", "data": {"target_x": 100.0, "target_y": 200.0, "target_z": 0.0}}"#),
            Some((100.0, 200.0, 0.0))
        );
        assert_eq!(p(r#"{"type":"move","x":1,"y":2,"z":3}"#), Some((1.0, 2.0, 3.0)));
        assert_eq!(p(r#"{"type":"position","position":{"x":-1.5,"y":2,"z":3}}"#), Some((-1.5, 2.0, 3.0)));
        assert_eq!(p(r#"{"type":"move","pos":[4,5,6]}"#), Some((4.0, 5.0, 6.0)));
        assert_eq!(p(r#"{"type":"move","coords":{"x":7,"y":8,"z":9}}"#), Some((7.0, 8.0, 9.0)));
        // 2D: z missing reads as 0.
        assert_eq!(p(r#"{"type":"move","x":1,"y":2}"#), Some((1.0, 2.0, 0.0)));
        assert_eq!(p(r#"{"type":"move","pos":[1,2]}"#), Some((1.0, 2.0, 0.0)));
    }

    #[test]
    fn other_messages_are_not_positions() {
        assert_eq!(p(r#"{"type":"chat","text":"move to x"}"#), None);
        assert_eq!(p(r#"{"namespace":"chat","data":{"target_x":1,"target_y":2}}"#), None);
        assert_eq!(p(r#"{"type":"move","x":"1","y":2}"#), None);
        assert_eq!(p(r#"{"type":"move","pos":[1]}"#), None);
        assert_eq!(p(r#"{"type":"move","x":1,"y":2,"z":null}"#), None);
        assert_eq!(p("not json move"), None);
        assert_eq!(p(r#"[{"type":"move","x":1,"y":2}]"#), None);
        assert_eq!(p(r#"{"type":"move","x":1e999,"y":2}"#), None);
    }

    #[test]
    fn custom_rules() {
        let rules = vec![Rule { field: "op".into(), values: vec!["walk".into()], places: vec![Place::Array { path: vec!["p".into(), "v".into()] }] }];
        assert_eq!(extract(r#"{"op":"walk","p":{"v":[1,2,3]}}"#, &rules), Some(Point { x: 1.0, y: 2.0, z: 3.0 }));
        assert_eq!(extract(r#"{"type":"move","x":1,"y":2}"#, &rules), None);
    }
}
