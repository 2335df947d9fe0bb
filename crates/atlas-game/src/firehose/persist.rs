//! The client table across a restart or a takeover, so that clients
//! reconnect to the next Atlas as they would to this one (same id, same
//! master, the packets they missed).
//!
//! When Atlas drains, the firehose closes its client sockets, lets the
//! masters' in-flight packets land in the now stale clients' buffers, then
//! writes every client it knows to `<key_file>.clients` (mode 0600, written
//! beside it and renamed, so a reader never sees half a file) and stops
//! taking master packets. The next Atlas imports the file: at start (a
//! restart), or, when it took the sockets over (started before the old one
//! drained), as soon as the file appears, which a reconnect naming an id it
//! does not know waits for. The file is removed once imported. A client
//! whose `stale_timeout_secs` ran out in between is failed to its master
//! (0x01) instead of imported.
//!
//! The format is ours (the file never leaves the host), little endian:
//! `ATLAS-FH-CLIENTS 1\n`, saved-at (u64, Unix ms), count (u32), then per
//! client: id (u64), time away (u64 ms), master address (u16 length +
//! bytes), public key (u16 + bytes), missed packets (u32 count, each u32
//! length + bytes). Written by hand: it is a flat list, and a parser with
//! bounds on every length is a few lines.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::hub::{lock, Entry, Hub, State};
use super::wire::FLAG_FAILURE;

const MAGIC: &[u8] = b"ATLAS-FH-CLIENTS 1\n";
/// Bounds for a damaged file: no length in it is trusted beyond these.
const MAX_ADDR: usize = 1024;
const MAX_KEY: usize = 256;
const MAX_PACKET: usize = 64 << 20;

/// One client as saved.
#[derive(Debug, PartialEq, Eq)]
pub struct Saved {
    pub id: u64,
    /// How long it had been away when saved (0: it was still connected).
    pub away: Duration,
    /// Its master's address as configured.
    pub master: String,
    pub pubkey: Vec<u8>,
    pub missed: Vec<Vec<u8>>,
}

/// Where the table of the firehose whose key is `key_file` is kept.
pub fn path_for(key_file: &Path) -> PathBuf {
    let mut p = key_file.as_os_str().to_owned();
    p.push(".clients");
    PathBuf::from(p)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn encode(clients: &[Saved], saved_at: SystemTime) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&unix_ms(saved_at).to_le_bytes());
    out.extend_from_slice(&(clients.len() as u32).to_le_bytes());
    for c in clients {
        out.extend_from_slice(&c.id.to_le_bytes());
        out.extend_from_slice(&(c.away.as_millis() as u64).to_le_bytes());
        out.extend_from_slice(&(c.master.len() as u16).to_le_bytes());
        out.extend_from_slice(c.master.as_bytes());
        out.extend_from_slice(&(c.pubkey.len() as u16).to_le_bytes());
        out.extend_from_slice(&c.pubkey);
        out.extend_from_slice(&(c.missed.len() as u32).to_le_bytes());
        for p in &c.missed {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
    }
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<usize, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default()) as usize)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()) as usize)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
    fn bytes(&mut self, n: usize, max: usize, what: &str) -> Result<Vec<u8>, String> {
        if n > max {
            return Err(format!("{what} of {n} bytes (at most {max})"));
        }
        Ok(self.take(n)?.to_vec())
    }
}

/// Parses a saved table: the clients and when they were saved.
pub fn decode(data: &[u8]) -> Result<(Vec<Saved>, SystemTime), String> {
    let mut c = Cursor(data);
    if c.take(MAGIC.len())? != MAGIC {
        return Err("not an Atlas firehose client table".into());
    }
    let saved_at = UNIX_EPOCH + Duration::from_millis(c.u64()?);
    let n = c.u32()?;
    let mut clients = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let id = c.u64()?;
        let away = Duration::from_millis(c.u64()?);
        let len = c.u16()?;
        let master = String::from_utf8(c.bytes(len, MAX_ADDR, "a master address")?).map_err(|_| "a master address is not UTF-8".to_string())?;
        let len = c.u16()?;
        let pubkey = c.bytes(len, MAX_KEY, "a public key")?;
        let count = c.u32()?;
        let mut missed = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let len = c.u32()?;
            missed.push(c.bytes(len, MAX_PACKET, "a missed packet")?);
        }
        clients.push(Saved { id, away, master, pubkey, missed });
    }
    if !c.0.is_empty() {
        return Err(format!("{} bytes after the last client", c.0.len()));
    }
    Ok((clients, saved_at))
}

/// Writes the table (0600, through a temporary file and a rename).
pub fn save(path: &Path, clients: &[Saved]) -> std::io::Result<()> {
    let data = encode(clients, SystemTime::now());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Takes the table at `path` if there is one: the file is claimed by a
/// rename (so two importers cannot both read it), read and removed.
/// `Ok(None)`: no file. The time away of each client includes the time
/// since the file was written.
pub fn take(path: &Path) -> Result<Option<Vec<Saved>>, String> {
    let mut claimed = path.as_os_str().to_owned();
    claimed.push(format!(".{}.importing", std::process::id()));
    let claimed = PathBuf::from(claimed);
    match std::fs::rename(path, &claimed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot claim {}: {e}", path.display())),
    }
    let data = std::fs::read(&claimed);
    let _ = std::fs::remove_file(&claimed);
    let data = data.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (mut clients, saved_at) = decode(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    let since = SystemTime::now().duration_since(saved_at).unwrap_or_default();
    for c in &mut clients {
        c.away += since;
    }
    Ok(Some(clients))
}

impl Hub {
    /// Takes every client out of the table for the next Atlas (live ones
    /// as if they had just left) and stops taking master packets.
    pub fn export(&self) -> Vec<Saved> {
        let now = Instant::now();
        self.handed_off.store(true, Ordering::SeqCst);
        let mut t = lock(&self.table);
        let out = t
            .clients
            .drain()
            .map(|(id, e)| {
                let master = self.links.get(e.route.load(Ordering::Relaxed)).map(|l| l.addr.clone()).unwrap_or_default();
                let (away, missed) = match e.state {
                    State::Stale { since, missed } => (now.saturating_duration_since(since), missed.into_iter().collect()),
                    State::Live { .. } => (Duration::ZERO, Vec::new()),
                };
                Saved { id, away, master, pubkey: e.pubkey, missed }
            })
            .collect();
        t.stale.clear();
        t.nstale = 0;
        drop(t);
        for l in &self.links {
            l.clients.store(0, Ordering::Relaxed);
        }
        out
    }

    /// Adds the previous Atlas' clients as stale ones (same ids, same
    /// master when it is still configured). Those whose stale timeout ran
    /// out, or whose missed packets no longer fit, are failed to their
    /// master. Returns how many were imported.
    pub fn import(&self, saved: Vec<Saved>) -> usize {
        let s = self.settings.load();
        let now = Instant::now();
        let mut imported = 0;
        let mut failed: Vec<(usize, u64, &'static str)> = Vec::new();
        let mut evicted = Vec::new();
        {
            let mut t = lock(&self.table);
            for c in saved {
                if t.clients.contains_key(&c.id) {
                    tracing::warn!(client = c.id, "firehose: a client of the previous Atlas has an id already in use here; not imported");
                    continue;
                }
                let m = self.links.iter().position(|l| l.addr == c.master).unwrap_or_else(|| self.assign(c.id, &s));
                if c.away >= s.stale_timeout || s.max_stale_clients == 0 {
                    failed.push((m, c.id, "stale timeout: the client did not reconnect within stale_timeout_secs (across an Atlas restart)"));
                    continue;
                }
                if c.missed.len() > s.missed_packets_buffer_size {
                    failed.push((m, c.id, "missed-packet buffer overflow while the client was disconnected (across an Atlas restart)"));
                    continue;
                }
                let since = now.checked_sub(c.away).unwrap_or(now);
                let entry = Entry { route: Arc::new(AtomicUsize::new(m)), pubkey: c.pubkey, state: State::Stale { since, missed: c.missed.into() } };
                t.clients.insert(c.id, entry);
                t.stale.push_back((c.id, since));
                t.nstale += 1;
                if let Some(l) = self.links.get(m) {
                    l.clients.fetch_add(1, Ordering::Relaxed);
                }
                imported += 1;
            }
            // Oldest first, as the reaper and the eviction expect.
            t.stale.make_contiguous().sort_by_key(|&(_, since)| since);
            evicted.extend(t.evict_over(s.max_stale_clients));
        }
        for (m, id, why) in failed {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(l) = self.links.get(m) {
                l.push(id, FLAG_FAILURE, why.as_bytes());
            }
        }
        for (id, why) in evicted {
            self.fail(id, why);
        }
        imported
    }

    /// Imports the table left at `path` by the previous Atlas, if any.
    pub fn import_file(&self, path: &Path) {
        match take(path) {
            Ok(None) => {}
            Ok(Some(saved)) => {
                let n = saved.len();
                let imported = self.import(saved);
                *lock(&self.awaiting) = None;
                tracing::info!(path = %path.display(), clients = n, imported, "firehose: took over the previous Atlas' clients; they can reconnect");
            }
            Err(e) => tracing::warn!(error = %e, "config: the previous Atlas' firehose client table is unreadable; its clients cannot reconnect"),
        }
    }

    /// Whether a reconnect for an id not in the table should wait for the
    /// previous Atlas' table.
    pub fn awaiting_handoff(&self) -> bool {
        lock(&self.awaiting).is_some_and(|until| Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Saved> {
        vec![
            Saved { id: 7, away: Duration::from_millis(1500), master: "127.0.0.1:42001".into(), pubkey: vec![2; 33], missed: vec![b"a".to_vec(), vec![]] },
            Saved { id: u64::MAX, away: Duration::ZERO, master: "m:1".into(), pubkey: vec![3; 33], missed: vec![] },
        ]
    }

    #[test]
    fn a_table_round_trips() {
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let (back, when) = decode(&encode(&sample(), at)).unwrap();
        assert_eq!(back, sample());
        assert_eq!(when, at);
        // The fuzz seed is such a table.
        let seed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/firehose/client-table")).unwrap();
        assert_eq!(decode(&seed).unwrap().0, sample());
    }

    #[test]
    fn damaged_tables_are_errors_not_panics() {
        let good = encode(&sample(), SystemTime::now());
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "a table cut at {cut} bytes parsed");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }

    #[test]
    fn save_is_0600_and_take_removes_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("atlas-fh-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("key"));
        save(&path, &sample()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let got = take(&path).unwrap().expect("the table");
        assert_eq!(got.len(), 2);
        assert!(got[0].away >= Duration::from_millis(1500));
        assert!(!path.exists());
        assert_eq!(take(&path).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
