//! The memory backend: one Atlas, rooms in a map under a mutex (calls are
//! short and come from the control-plane threads), written to an optional
//! snapshot file on every change so a restart keeps them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::{expired, pick, reported, Candidate, Load, NewRoom, Room, RoomStore, StoreError};

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    /// (seq, id) for listing in creation order.
    order: BTreeMap<(u64, String), ()>,
    load: HashMap<String, Load>,
    /// The next room's `seq`.
    next_seq: u64,
}

impl State {
    fn insert(&mut self, r: Room) {
        let l = self.load.entry(r.server_id.clone()).or_default();
        l.reserved += u64::from(r.capacity);
        l.rooms += 1;
        self.order.insert((r.seq, r.id.clone()), ());
        self.next_seq = self.next_seq.max(r.seq + 1);
        self.rooms.insert(r.id.clone(), r);
    }

    fn remove(&mut self, id: &str) -> Option<Room> {
        let r = self.rooms.remove(id)?;
        self.order.remove(&(r.seq, r.id.clone()));
        self.release(&r);
        Some(r)
    }

    fn release(&mut self, r: &Room) {
        if let Some(l) = self.load.get_mut(&r.server_id) {
            l.reserved = l.reserved.saturating_sub(u64::from(r.capacity));
            l.rooms = l.rooms.saturating_sub(1);
            if l.rooms == 0 {
                self.load.remove(&r.server_id);
            }
        }
    }
}

pub struct MemoryStore {
    state: Mutex<State>,
    snapshot: Option<PathBuf>,
}

impl MemoryStore {
    /// A store, with the rooms of `snapshot` when the file exists. A
    /// snapshot that cannot be read is reported and ignored (start empty).
    pub fn open(snapshot: Option<PathBuf>) -> MemoryStore {
        let mut st = State::default();
        if let Some(p) = &snapshot {
            match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<Vec<Room>>(&bytes) {
                    Ok(rooms) => {
                        let n = rooms.len();
                        rooms.into_iter().for_each(|r| st.insert(r));
                        tracing::info!(path = %p.display(), rooms = n, "room snapshot restored");
                    }
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "config: room snapshot unreadable; starting with no rooms"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "config: cannot read the room snapshot; starting with no rooms"),
            }
        }
        MemoryStore { state: Mutex::new(st), snapshot }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the snapshot (temp file + rename, so a crash leaves the old one).
    fn save(&self, st: &State) {
        let Some(p) = &self.snapshot else { return };
        let rooms: Vec<&Room> = st.order.keys().filter_map(|(_, id)| st.rooms.get(id)).collect();
        let tmp = p.with_extension("tmp");
        let res = serde_json::to_vec(&rooms).map_err(std::io::Error::other).and_then(|b| std::fs::write(&tmp, b)).and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = res {
            tracing::warn!(path = %p.display(), error = %e, "internal: cannot write the room snapshot");
        }
    }
}

impl RoomStore for MemoryStore {
    fn create(&self, room: &NewRoom, candidates: &[Candidate]) -> Result<Room, StoreError> {
        let mut st = self.lock();
        if st.rooms.contains_key(&room.id) {
            return Err(StoreError::Exists);
        }
        let c = pick(candidates, room.capacity, &st.load)?;
        let r = Room::placed(room, c, st.next_seq);
        st.insert(r.clone());
        self.save(&st);
        Ok(r)
    }

    fn get(&self, id: &str) -> Result<Option<Room>, StoreError> {
        Ok(self.lock().rooms.get(id).cloned())
    }

    fn cached(&self, id: &str) -> Option<Room> {
        self.lock().rooms.get(id).cloned()
    }

    fn list(&self, offset: usize, limit: usize) -> Result<(Vec<Room>, usize), StoreError> {
        let st = self.lock();
        let page = st.order.keys().skip(offset).take(limit).filter_map(|(_, id)| st.rooms.get(id).cloned()).collect();
        Ok((page, st.rooms.len()))
    }

    fn delete(&self, id: &str) -> Result<Option<Room>, StoreError> {
        let mut st = self.lock();
        let r = st.remove(id);
        if r.is_some() {
            self.save(&st);
        }
        Ok(r)
    }

    fn report(&self, server_id: &str, rooms: &HashMap<String, u32>, now_ms: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        let ids: Vec<String> = st.rooms.values().filter(|r| r.server_id == server_id).map(|r| r.id.clone()).collect();
        for id in ids {
            if let Some(r) = st.rooms.remove(&id) {
                st.rooms.insert(id, reported(r, rooms, now_ms));
            }
        }
        Ok(())
    }

    fn sweep(&self, now_ms: u64, grace_ms: u64) -> Result<Vec<Room>, StoreError> {
        let mut st = self.lock();
        let ids: Vec<String> = st.rooms.values().filter(|r| expired(r, now_ms, grace_ms)).map(|r| r.id.clone()).collect();
        let gone: Vec<Room> = ids.iter().filter_map(|id| st.remove(id)).collect();
        if !gone.is_empty() {
            self.save(&st);
        }
        Ok(gone)
    }

    fn rooms_on(&self, server_id: &str) -> Result<Vec<Room>, StoreError> {
        Ok(self.lock().rooms.values().filter(|r| r.server_id == server_id).cloned().collect())
    }

    fn migrate(&self, id: &str, from: &str, candidates: &[Candidate]) -> Result<Option<Room>, StoreError> {
        let mut st = self.lock();
        let Some(r) = st.rooms.get(id).cloned() else { return Ok(None) };
        if r.server_id != from {
            return Ok(None);
        }
        // Its own slots count as free when it may stay.
        let mut load = st.load.clone();
        if let Some(l) = load.get_mut(from) {
            l.reserved = l.reserved.saturating_sub(u64::from(r.capacity));
        }
        let moved = match pick(candidates, r.capacity, &load) {
            Ok(c) => {
                st.remove(id);
                let m = r.moved(from, c);
                st.insert(m.clone());
                m
            }
            Err(_) => {
                let lost = Room { lost: true, ..r };
                st.rooms.insert(id.to_string(), lost.clone());
                lost
            }
        };
        self.save(&st);
        Ok(Some(moved))
    }

    fn load(&self) -> Result<HashMap<String, Load>, StoreError> {
        Ok(self.lock().load.clone())
    }

    fn take_announcements(&self, server_id: &str) -> Result<Vec<Room>, StoreError> {
        let mut st = self.lock();
        let out: Vec<Room> = st
            .rooms
            .values_mut()
            .filter(|r| r.server_id == server_id && r.announce)
            .map(|r| {
                r.announce = false;
                r.clone()
            })
            .collect();
        if !out.is_empty() {
            self.save(&st);
        }
        Ok(out)
    }
}
