//! Placement and the memory backend's bookkeeping (the Redis backend runs
//! the same `pick` and is covered by the integration suite against a real
//! redis-server).

use std::collections::HashMap;

use serde_json::json;

use super::*;

fn cand(id: &str, capacity: u32, players: u64, preferred: bool) -> Candidate {
    Candidate { id: id.into(), address: format!("{id}:1"), capacity, players, preferred }
}

fn new_room(id: &str, capacity: u32) -> NewRoom {
    NewRoom { id: id.into(), mode: None, region: None, capacity, metadata: json!({}), now_ms: 1000 }
}

#[test]
fn pick_prefers_region_then_least_loaded_then_fewer_rooms_then_id() {
    let mut load = HashMap::new();
    let cs = [cand("a", 100, 0, false), cand("b", 100, 0, false)];
    assert_eq!(pick(&cs, 10, &load).unwrap().id, "a", "tie: smaller id");
    load.insert("a".to_string(), Load { reserved: 20, rooms: 2 });
    assert_eq!(pick(&cs, 10, &load).unwrap().id, "b", "b is less loaded");
    // Reported players count as load too.
    let cs2 = [cand("a", 100, 0, false), cand("b", 100, 50, false)];
    assert_eq!(pick(&cs2, 10, &load).unwrap().id, "a");
    // A preferred server wins while it has room ...
    let cs3 = [cand("a", 100, 0, false), cand("b", 100, 0, true)];
    load.insert("b".to_string(), Load { reserved: 80, rooms: 8 });
    assert_eq!(pick(&cs3, 10, &load).unwrap().id, "b");
    // ... and not when full.
    assert_eq!(pick(&cs3, 30, &load).unwrap().id, "a");
    assert_eq!(pick(&[], 1, &load).err(), Some(StoreError::Full { no_server: true }));
    assert_eq!(pick(&cs3, 200, &load).err(), Some(StoreError::Full { no_server: false }));
}

#[test]
fn memory_never_overfills_and_frees_slots() {
    let s = MemoryStore::open(None);
    let cs = [cand("a", 64, 0, false), cand("b", 64, 0, false)];
    let mut on = HashMap::<String, u32>::new();
    for i in 0..8 {
        let r = s.create(&new_room(&format!("r{i}"), 16), &cs).unwrap();
        *on.entry(r.server_id).or_default() += 1;
    }
    assert_eq!(on.get("a"), Some(&4));
    assert_eq!(on.get("b"), Some(&4));
    assert_eq!(s.create(&new_room("r8", 16), &cs), Err(StoreError::Full { no_server: false }));
    assert_eq!(s.create(&new_room("r0", 1), &cs), Err(StoreError::Exists));
    let gone = s.delete("r0").unwrap().unwrap();
    assert!(s.create(&new_room("r9", 16), &cs).is_ok_and(|r| r.server_id == gone.server_id));
    let (page, total) = s.list(0, 3).unwrap();
    assert_eq!(total, 8);
    assert_eq!(page.len(), 3);
    assert_eq!(s.load().unwrap().values().map(|l| l.reserved).sum::<u64>(), 128);
}

#[test]
fn memory_reports_sweep_and_migration() {
    let s = MemoryStore::open(None);
    let cs = [cand("a", 64, 0, false), cand("b", 64, 0, false)];
    let r1 = s.create(&new_room("r1", 16), &cs[..1]).unwrap();
    let r2 = s.create(&new_room("r2", 16), &cs[..1]).unwrap();
    assert_eq!((r1.server_id.as_str(), r2.server_id.as_str()), ("a", "a"));
    // Never reported: never swept.
    assert!(s.sweep(1_000_000, 10).unwrap().is_empty());
    // r1 has players, r2 is not reported.
    s.report("a", &HashMap::from([("r1".to_string(), 3)]), 2000).unwrap();
    assert_eq!(s.get("r1").unwrap().unwrap().players, 3);
    assert!(s.sweep(2005, 10).unwrap().is_empty(), "within the grace");
    let gone = s.sweep(2011, 10).unwrap();
    assert_eq!(gone.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["r2"]);
    // a dies: r1 moves to b.
    let m = s.migrate("r1", "a", &cs).unwrap().unwrap();
    assert_eq!((m.server_id.as_str(), m.migrated_from.as_deref(), m.lost), ("b", Some("a"), false));
    assert_eq!(s.load().unwrap().get("b").map(|l| l.reserved), Some(16));
    assert!(!s.load().unwrap().contains_key("a"));
    // Already moved: a second migration from a does nothing.
    assert_eq!(s.migrate("r1", "a", &cs).unwrap(), None);
    // b dies with nowhere to go: lost.
    let lost = s.migrate("r1", "b", &[]).unwrap().unwrap();
    assert!(lost.lost);
    assert!(s.get("r1").unwrap().unwrap().lost);
    // b comes back and is preferred: the room stays there, not announced.
    let mut back = cs.clone();
    back[1].preferred = true;
    let stay = s.migrate("r1", "b", &back).unwrap().unwrap();
    assert_eq!((stay.server_id.as_str(), stay.lost, stay.announce), ("b", false, false));
    assert_eq!(s.load().unwrap().get("b").map(|l| l.reserved), Some(16), "its slots counted once");
}

#[test]
fn memory_snapshot_survives_a_restart() {
    let p = std::env::temp_dir().join(format!("atlas-store-test-{}-{}.json", std::process::id(), fastrand::u64(..)));
    {
        let s = MemoryStore::open(Some(p.clone()));
        s.create(&new_room("keep", 4), &[cand("a", 10, 0, false)]).unwrap();
    }
    let s = MemoryStore::open(Some(p.clone()));
    assert_eq!(s.get("keep").unwrap().map(|r| r.server_id), Some("a".into()));
    assert_eq!(s.load().unwrap().get("a").map(|l| l.reserved), Some(4));
    let _ = std::fs::remove_file(p);
}
