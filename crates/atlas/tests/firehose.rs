//! The firehose listener (connserver protocol v2) end to end: real Atlas
//! processes between test clients and test masters written from
//! `specs/firehose-protocol.md` (tests/support/firehose.rs).
//!
//! Covered: ids and data routing for 1000 clients; the reconnect with the
//! challenge (missed packets in order, same id, the opt-in notices), expiry,
//! wrong answers, the missed-packet buffer and its overflow, the stale limit,
//! kicks; the master link (redial after a close or an outage, failover and
//! balancing over two masters, malformed master frames); the persisted key
//! and clients reconnecting across a restart or a takeover;
//! malformed client input; WebSocket clients; the defences (handshake
//! timeout, per-IP connect rate, per-client frame rate); the connserver
//! environment variables and `--master/--listen`.

mod common;
#[path = "support/firehose.rs"]
mod firehose;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Atlas, TempDir};
use firehose::{
    frame, show_packets, wait_for, Answer, Control, FirehoseClient, HandshakeError, Identity, Packet, TestMaster, Transport, FLAG_CONNECT, FLAG_DATA,
    FLAG_DISCONNECT, FLAG_FAILURE, FLAG_RECONNECT,
};

/// Deadline of every "this must happen" wait.
const T: Duration = Duration::from_secs(5);
/// How long Atlas may take to (re)dial a master: the backoff is capped at 5 s.
const REDIAL: Duration = Duration::from_secs(8);
/// How long a "this must not happen" check watches.
const QUIET: Duration = Duration::from_millis(400);
/// Lets Atlas notice a closed client socket when no disconnect notice is on
/// (not an assertion: the notices tests check the event itself).
const SETTLE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Atlas on a firehose config
// ---------------------------------------------------------------------------

/// `[listen]` in firehose mode on an ephemeral port and `[firehose]` with
/// `masters`, `key_file` and the `extra` lines.
fn config(masters: &[SocketAddr], key: &Path, extra: &str) -> String {
    let list: Vec<String> = masters.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nmode = \"firehose\"\n\n[firehose]\nmasters = [{}]\nkey_file = \"{}\"\n{extra}\n",
        list.join(", "),
        key.display()
    )
}

/// An Atlas with its own key directory (removed after Atlas stopped: the
/// fields drop in order).
struct Fh {
    atlas: Atlas,
    _dir: TempDir,
}

impl Deref for Fh {
    type Target = Atlas;
    fn deref(&self) -> &Atlas {
        &self.atlas
    }
}

impl DerefMut for Fh {
    fn deref_mut(&mut self) -> &mut Atlas {
        &mut self.atlas
    }
}

/// Starts Atlas in front of `masters` and waits until it dialled each.
fn start(masters: &[&TestMaster], extra: &str) -> Fh {
    let dir = TempDir::new();
    let addrs: Vec<SocketAddr> = masters.iter().map(|m| m.addr()).collect();
    let before: Vec<usize> = masters.iter().map(|m| m.accepts()).collect();
    let atlas = Atlas::start(&config(&addrs, &dir.join("firehose.key"), extra));
    for (m, n) in masters.iter().zip(before) {
        assert!(m.wait_accepts(n + 1, T), "Atlas did not dial the master {} within {T:?}", m.addr());
    }
    Fh { atlas, _dir: dir }
}

fn notices(list: &[&str]) -> String {
    let q: Vec<String> = list.iter().map(|n| format!("\"{n}\"")).collect();
    format!("notices = [{}]\n", q.join(", "))
}

/// A free loopback port (bound once, then released).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------
// Client and master helpers
// ---------------------------------------------------------------------------

/// A new client over TCP; panics with the handshake error.
fn connect(addr: SocketAddr) -> FirehoseClient {
    FirehoseClient::connect_new(addr).unwrap_or_else(|e| panic!("new client on {addr}: {e}"))
}

/// A correct reconnect of `who`; panics with the handshake error.
fn resume(addr: SocketAddr, who: &Identity, when: &str) -> FirehoseClient {
    FirehoseClient::resume(addr, who).unwrap_or_else(|e| panic!("reconnect of client {} {when}: {e}", who.id))
}

/// Asserts that Atlas refused the reconnect of `who` by closing the socket
/// after its PubKey, without a Challenge (nor anything else).
fn assert_reconnect_refused(addr: SocketAddr, who: &Identity, why: &str) {
    match FirehoseClient::resume(addr, who) {
        Ok(_) => panic!("the reconnect of client {} was accepted although {why}", who.id),
        Err(e) => assert!(e.closed && e.step == "challenge", "reconnect of client {} ({why}): want the socket closed instead of a Challenge, got: {e}", who.id),
    }
}

/// Asserts `r` failed because Atlas closed the socket.
fn assert_closed_err(r: Result<FirehoseClient, HandshakeError>, what: &str) -> HandshakeError {
    match r {
        Ok(c) => panic!("{what}: the handshake succeeded (client id {})", c.id),
        Err(e) => {
            assert!(e.closed, "{what}: want the socket closed, got: {e}");
            e
        }
    }
}

/// The first packet with `flag` for `id`, or a panic naming `what`.
fn expect_flag(m: &TestMaster, id: u64, flag: u8, what: &str) -> Packet {
    m.wait_packet(T, |p| p.is(id, flag))
        .unwrap_or_else(|| panic!("the master got no {what} (flag 0x{flag:02X}) for client {id} within {T:?}; {}", show_packets(&m.packets())))
}

/// Waits for the data packet `data` (from any id) and asserts it carries `id`.
fn expect_data(m: &TestMaster, id: u64, data: &[u8]) -> Packet {
    let p = m
        .wait_packet(T, |p| p.flag == FLAG_DATA && p.data == data)
        .unwrap_or_else(|| panic!("the master did not get {:?} from client {id} within {T:?}; {}", String::from_utf8_lossy(data), show_packets(&m.packets())));
    assert_eq!(p.id, id, "{:?} reached the master under id {} instead of the client's id {id}", String::from_utf8_lossy(data), p.id);
    p
}

/// Asserts the client's next frame is `want`.
fn expect_recv(c: &mut FirehoseClient, want: &[u8], what: &str) {
    let id = c.id;
    let got = c.recv(T).unwrap_or_else(|e| panic!("client {id} did not receive {what} ({:?}): {e}", String::from_utf8_lossy(want)));
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want), "client {id}: wrong frame for {what}");
}

/// Asserts the master gets no packet matching `pred` during [`QUIET`].
fn assert_quiet(m: &TestMaster, what: &str, pred: impl Fn(&Packet) -> bool) {
    thread::sleep(QUIET);
    let got = m.filter(pred);
    assert!(got.is_empty(), "{what}; {}", show_packets(&got));
}

/// Data both ways for a live client: `tag` to the master under `c.id`, then
/// a reply from the master to the client.
fn round_trip(m: &TestMaster, c: &mut FirehoseClient, tag: &str) -> Packet {
    let up = format!("{tag} up {}", c.id);
    c.send_ok(up.as_bytes());
    let p = expect_data(m, c.id, up.as_bytes());
    let down = format!("{tag} down {}", c.id);
    m.send_data(c.id, down.as_bytes());
    expect_recv(c, down.as_bytes(), tag);
    p
}

// ---------------------------------------------------------------------------
// The support code against the spec (no Atlas)
// ---------------------------------------------------------------------------

/// The bincode 2 standard encoding, as a reference for the hand-written one.
#[derive(bincode::Encode, bincode::Decode, Debug, PartialEq)]
enum Reference {
    Ping,
    ProtocolVersion(u32),
    PubKey(Vec<u8>),
    ClientId(u64),
    Challenge(Vec<u8>),
    ChallengeResponse(Vec<u8>),
}

#[test]
fn control_messages_and_crypto_of_the_test_client_match_the_spec() {
    // The examples of the spec's table.
    assert_eq!(Control::Ping.encode(), [0x00]);
    assert_eq!(Control::ProtocolVersion(2).encode(), [0x01, 0x02]);
    assert_eq!(Control::ClientId(7).encode(), [0x03, 0x07]);
    assert_eq!(Control::ClientId(300).encode(), [0x03, 0xFB, 0x2C, 0x01]);
    assert_eq!(Control::PubKey(vec![9; 33]).encode()[..2], [0x02, 0x21]);
    assert_eq!(Control::Challenge(vec![9; 72]).encode()[..2], [0x04, 0x48]);
    // The same bytes as bincode 2 itself, around every varint boundary.
    let cfg = bincode::config::standard();
    for v in [0u64, 1, 250, 251, 252, 65535, 65536, u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX] {
        let ours = Control::ClientId(v).encode();
        assert_eq!(ours, bincode::encode_to_vec(Reference::ClientId(v), cfg).unwrap(), "ClientId({v})");
        assert_eq!(Control::decode(&ours), Ok(Control::ClientId(v)));
        if let Ok(v32) = u32::try_from(v) {
            assert_eq!(Control::ProtocolVersion(v32).encode(), bincode::encode_to_vec(Reference::ProtocolVersion(v32), cfg).unwrap());
        }
    }
    for n in [0usize, 33, 72, 250, 251, 300] {
        let b = vec![0xAB; n];
        assert_eq!(Control::ChallengeResponse(b.clone()).encode(), bincode::encode_to_vec(Reference::ChallengeResponse(b.clone()), cfg).unwrap());
        assert_eq!(Control::PubKey(b.clone()).encode(), bincode::encode_to_vec(Reference::PubKey(b), cfg).unwrap());
    }
    assert!(Control::decode(&[0x07]).is_err() && Control::decode(&[0x01, 0xFF]).is_err() && Control::decode(&[0x01, 0xFC, 0x02]).is_err());
    // ECDH is symmetric, a sealed challenge is 72 bytes and opens.
    let (a, b) = (firehose::new_secret(), firehose::new_secret());
    let pa = firehose::public_bytes(&a);
    assert_eq!(pa.len(), 33, "SEC1 compressed");
    let k = firehose::shared_key(&a, &firehose::public_bytes(&b)).unwrap();
    assert_eq!(k, firehose::shared_key(&b, &pa).unwrap());
    let sealed = firehose::seal(&k, &[5; 32]);
    assert_eq!(sealed.len(), 72);
    assert_eq!(firehose::open(&k, &sealed).unwrap(), vec![5; 32]);
    assert_ne!(sealed, firehose::seal(&k, &[5; 32]), "a new nonce every time");
}

// ---------------------------------------------------------------------------
// 1. Many clients
// ---------------------------------------------------------------------------

/// Connects `n` clients, sends `frames` frames from each, then checks each
/// client got exactly its own frames back (echo master), in order.
fn drive_clients(addr: SocketAddr, n: usize, frames: usize) -> Vec<u64> {
    let mut clients: Vec<FirehoseClient> = (0..n).map(|_| connect(addr)).collect();
    for c in clients.iter_mut() {
        for k in 0..frames {
            c.send_ok(format!("client {} frame {k}", c.id).as_bytes());
        }
    }
    for c in clients.iter_mut() {
        for k in 0..frames {
            expect_recv(c, format!("client {} frame {k}", c.id).as_bytes(), &format!("its echoed frame {k}"));
        }
    }
    clients.iter().map(|c| c.id).collect()
}

#[test]
fn a_thousand_clients_get_distinct_ids_and_only_their_own_data() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 125;
    const FRAMES: usize = 3;
    let master = TestMaster::start_echo();
    let mut fh = start(&[&master], "");
    let addr = fh.addr();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..THREADS).map(|_| thread::spawn(move || drive_clients(addr, PER_THREAD, FRAMES))).collect();
    let ids: Vec<u64> = workers.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| panic!("a client thread failed (its panic is printed above)"))).collect();
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), THREADS * PER_THREAD, "client ids are not distinct");
    for &id in &ids {
        let want: Vec<Vec<u8>> = (0..FRAMES).map(|k| format!("client {id} frame {k}").into_bytes()).collect();
        let got = master.data_from(id);
        assert_eq!(got, want, "the master's packets tagged {id}: {}", show_packets(&master.filter(|p| p.id == id)));
    }
    assert!(master.errors().is_empty(), "bad frames on the master link: {:?}", master.errors());
    assert!(fh.is_running(), "Atlas exited");
    eprintln!("1000 clients x {FRAMES} frames both ways in {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// 2. - 6. Reconnect, expiry, challenge, buffer, kick, stale limit
// ---------------------------------------------------------------------------

/// A client drops; the master sends it 5 packets; it reconnects and gets
/// them in order after the Ping, then talks under the same id.
fn reconnect_within_window(with_notices: bool) {
    let master = TestMaster::start();
    let n = if with_notices { notices(&["connect", "disconnect", "reconnect"]) } else { String::new() };
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 16\n{n}"));
    let mut c = connect(fh.addr());
    let who = c.identity();
    if with_notices {
        expect_flag(&master, who.id, FLAG_CONNECT, "connect notice");
    }
    round_trip(&master, &mut c, "before");
    drop(c);
    if with_notices {
        expect_flag(&master, who.id, FLAG_DISCONNECT, "disconnect notice");
    } else {
        thread::sleep(SETTLE);
    }
    for i in 0..5 {
        master.send_data(who.id, format!("missed {i}").as_bytes());
    }
    thread::sleep(Duration::from_millis(200)); // lets Atlas buffer them before the reconnect
    let mut r = resume(fh.addr(), &who, "within the stale window");
    for i in 0..5 {
        expect_recv(&mut r, format!("missed {i}").as_bytes(), &format!("missed packet {i} after the Ping"));
    }
    if with_notices {
        let p = expect_flag(&master, who.id, FLAG_RECONNECT, "reconnect notice");
        assert!(p.data.is_empty(), "reconnect notice with data {p}");
    }
    round_trip(&master, &mut r, "after the reconnect");
    let failures = master.filter(|p| p.flag == FLAG_FAILURE);
    assert!(failures.is_empty(), "the master was told a reconnected client is gone; {}", show_packets(&failures));
    let flags: Vec<u8> = master.filter(|p| p.id == who.id && p.flag != FLAG_DATA).iter().map(|p| p.flag).collect();
    if with_notices {
        assert_eq!(flags, [FLAG_CONNECT, FLAG_DISCONNECT, FLAG_RECONNECT], "notices for client {}, in order", who.id);
    } else {
        assert!(flags.is_empty(), "notices are off by default, yet the master got flags {flags:02x?}; {}", show_packets(&master.packets()));
    }
}

#[test]
fn reconnect_within_the_window_gets_missed_packets_in_order_under_the_same_id_with_notices() {
    reconnect_within_window(true);
}

#[test]
fn reconnect_within_the_window_without_notices_sends_no_notice_flags() {
    reconnect_within_window(false);
}

#[test]
fn reconnect_after_the_stale_timeout_is_refused_and_the_master_told() {
    let master = TestMaster::start();
    let fh = start(&[&master], "stale_timeout_secs = 1\nstale_reap_interval_secs = 1\nmissed_packets_buffer_size = 16\n");
    let c = connect(fh.addr());
    let who = c.identity();
    drop(c);
    let dropped = Instant::now();
    let f = master
        .wait_packet(Duration::from_secs(6), |p| p.is(who.id, FLAG_FAILURE))
        .unwrap_or_else(|| panic!("no failure (0x01) for the expired client {} within 6 s; {}", who.id, show_packets(&master.packets())));
    let after = f.at.duration_since(dropped);
    assert!(after >= Duration::from_millis(900), "client {} failed {after:?} after its drop, before its 1 s stale timeout", who.id);
    let reason = String::from_utf8(f.data.clone()).unwrap_or_else(|_| panic!("failure reason is not UTF-8: {f}"));
    assert!(!reason.trim().is_empty(), "the failure for client {} has an empty reason", who.id);
    assert_reconnect_refused(fh.addr(), &who, "its stale timeout expired");
}

#[test]
fn wrong_challenge_responses_are_refused_and_a_correct_one_still_works() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 4\n{}", notices(&["disconnect"])));
    let c = connect(fh.addr());
    let who = c.identity();
    drop(c);
    expect_flag(&master, who.id, FLAG_DISCONNECT, "disconnect notice");
    master.send_data(who.id, b"kept");
    for answer in [Answer::WrongPlaintext, Answer::Garbage] {
        let r = FirehoseClient::reconnect_with(fh.addr(), Transport::Tcp, who.id, &who.secret, &who.atlas_key, answer);
        let e = assert_closed_err(r, &format!("challenge answered with {answer:?}"));
        assert!(matches!(e.step, "response" | "ping"), "{answer:?}: closed at an unexpected step: {e}");
    }
    // Another key pair cannot even decrypt the challenge: the client gives up.
    let thief = Identity { secret: firehose::new_secret(), ..who.clone() };
    let e = FirehoseClient::resume(fh.addr(), &thief).err().expect("a reconnect with another key pair succeeded");
    assert!(e.step == "challenge" && e.detail.contains("decrypt"), "another key pair: {e}");
    let mut r = resume(fh.addr(), &who, "after refused attempts");
    expect_recv(&mut r, b"kept", "the packet buffered before the refused attempts");
    round_trip(&master, &mut r, "after the refused attempts");
    let failures = master.filter(|p| p.flag == FLAG_FAILURE);
    assert!(failures.is_empty(), "refused reconnects must leave the stale entry alone; {}", show_packets(&failures));
}

#[test]
fn without_a_missed_packet_buffer_a_packet_for_a_stale_client_fails_it_at_once() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 0\n{}", notices(&["disconnect"])));
    let c = connect(fh.addr());
    let who = c.identity();
    drop(c);
    expect_flag(&master, who.id, FLAG_DISCONNECT, "disconnect notice");
    assert_eq!(master.count(|p| p.flag == FLAG_FAILURE), 0, "a failure before any packet: {}", show_packets(&master.packets()));
    master.send_data(who.id, b"nobody to buffer this");
    let f = master
        .wait_packet(Duration::from_secs(2), |p| p.is(who.id, FLAG_FAILURE))
        .unwrap_or_else(|| panic!("no failure (0x01) for stale client {} after a packet with buffer size 0; {}", who.id, show_packets(&master.packets())));
    assert!(!f.data.is_empty(), "empty failure reason: {f}");
    assert_reconnect_refused(fh.addr(), &who, "it failed (no missed-packet buffer)");
}

#[test]
fn missed_packet_buffer_overflow_fails_the_client() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 2\n{}", notices(&["disconnect"])));
    let c = connect(fh.addr());
    let who = c.identity();
    drop(c);
    expect_flag(&master, who.id, FLAG_DISCONNECT, "disconnect notice");
    master.send_data(who.id, b"one");
    master.send_data(who.id, b"two");
    assert_quiet(&master, "two packets fit a buffer of 2, yet the client failed", |p| p.flag == FLAG_FAILURE);
    master.send_data(who.id, b"three");
    let f = master
        .wait_packet(Duration::from_secs(2), |p| p.is(who.id, FLAG_FAILURE))
        .unwrap_or_else(|| panic!("no failure (0x01) after the 3rd packet for a buffer of 2; {}", show_packets(&master.packets())));
    assert!(!f.data.is_empty(), "empty failure reason: {f}");
    assert_reconnect_refused(fh.addr(), &who, "its missed-packet buffer overflowed");
}

#[test]
fn master_data_for_an_unknown_client_gets_a_failure_back() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut c = connect(fh.addr());
    let ghost = c.id.wrapping_add(987_654_321);
    master.send_data(ghost, b"hello?");
    let f = master
        .wait_packet(T, |p| p.is(ghost, FLAG_FAILURE))
        .unwrap_or_else(|| panic!("no failure (0x01) for unknown id {ghost}; {}", show_packets(&master.packets())));
    assert!(!f.data.is_empty(), "empty failure reason: {f}");
    round_trip(&master, &mut c, "after the unknown id");
    assert_eq!(master.accepts(), 1, "Atlas redialled: an unknown id must not drop the link");
}

#[test]
fn kick_closes_the_client_and_it_cannot_reconnect() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 16\n{}", notices(&["disconnect"])));
    let mut other = connect(fh.addr());
    let mut c = connect(fh.addr());
    let who = c.identity();
    round_trip(&master, &mut c, "before the kick");
    master.kick(who.id);
    assert!(c.is_closed(Duration::from_secs(2)), "Atlas did not close client {} within 2 s of the kick", who.id);
    assert_reconnect_refused(fh.addr(), &who, "the master kicked it");
    round_trip(&master, &mut other, "another client after the kick");
}

#[test]
fn a_reconnect_for_a_connected_or_unknown_id_is_refused() {
    let master = TestMaster::start();
    let fh = start(&[&master], "missed_packets_buffer_size = 4\n");
    let mut live = connect(fh.addr());
    let who = live.identity();
    assert_reconnect_refused(fh.addr(), &who, "the client is still connected");
    let ghost = Identity { id: who.id.wrapping_add(1_000_003), ..who.clone() };
    assert_reconnect_refused(fh.addr(), &ghost, "no client has that id");
    round_trip(&master, &mut live, "the live client after a reconnect attempt for its id");
}

#[test]
fn max_stale_clients_evicts_the_oldest_stale_client() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("max_stale_clients = 2\nmissed_packets_buffer_size = 4\n{}", notices(&["disconnect"])));
    let clients: Vec<FirehoseClient> = (0..3).map(|_| connect(fh.addr())).collect();
    let who: Vec<Identity> = clients.iter().map(|c| c.identity()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        if i == 1 {
            c.close_abruptly();
        } else {
            drop(c);
        }
        expect_flag(&master, who[i].id, FLAG_DISCONNECT, "disconnect notice");
        if i == 1 {
            assert_quiet(&master, "two stale clients fit max_stale_clients = 2", |p| p.flag == FLAG_FAILURE);
        }
    }
    let f = expect_flag(&master, who[0].id, FLAG_FAILURE, "failure of the oldest stale client");
    assert!(!f.data.is_empty(), "empty failure reason: {f}");
    let wrong = master.filter(|p| p.flag == FLAG_FAILURE && p.id != who[0].id);
    assert!(wrong.is_empty(), "only the oldest stale client may be evicted; {}", show_packets(&wrong));
    assert_reconnect_refused(fh.addr(), &who[0], "it was evicted by the stale limit");
    for w in &who[1..] {
        let mut r = resume(fh.addr(), w, "while within the stale limit");
        round_trip(&master, &mut r, "after the reconnect");
    }
}

// ---------------------------------------------------------------------------
// 7. - 8. The master link: redial, failover, balancing
// ---------------------------------------------------------------------------

#[test]
fn master_closing_the_link_is_redialled_and_clients_keep_their_ids() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut clients: Vec<FirehoseClient> = (0..3).map(|_| connect(fh.addr())).collect();
    for c in clients.iter_mut() {
        assert_eq!(round_trip(&master, c, "first").conn, 0);
    }
    master.close_conn();
    assert!(master.wait_accepts(2, REDIAL), "Atlas did not redial the master within {REDIAL:?}");
    for c in clients.iter_mut() {
        let p = round_trip(&master, c, "after the redial");
        assert_eq!(p.conn, 1, "data after the redial came on connection {}", p.conn);
    }
    assert!(fh.atlas.count_log("panicked") == 0, "Atlas panicked:\n{}", fh.logs());
}

#[test]
fn master_down_for_a_second_then_back_on_the_same_port() {
    let master = TestMaster::start();
    let mut fh = start(&[&master], "");
    let mut c = connect(fh.addr());
    round_trip(&master, &mut c, "before the outage");
    master.stop();
    thread::sleep(SETTLE);
    c.send_ok(b"sent during the outage");
    thread::sleep(Duration::from_millis(700));
    assert!(!c.is_closed(Duration::from_millis(10)), "Atlas closed client {} while its master was down", c.id);
    master.restart();
    assert!(master.wait_accepts(2, REDIAL), "Atlas did not redial the master (back on port {}) within {REDIAL:?}", master.port());
    let p = expect_data(&master, c.id, b"sent during the outage");
    assert_eq!(p.conn, 1, "queued data came on connection {}", p.conn);
    round_trip(&master, &mut c, "after the outage");
    let mut fresh = connect(fh.addr());
    round_trip(&master, &mut fresh, "a new client after the outage");
    assert!(fh.is_running(), "Atlas exited");
}

/// Connects `n` clients over two masters; returns (clients of a, of b).
fn spread(fh: &Fh, a: &TestMaster, b: &TestMaster, n: usize) -> (Vec<FirehoseClient>, Vec<FirehoseClient>) {
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut c = connect(fh.addr());
        let hello = format!("hello {}", c.id);
        c.send_ok(hello.as_bytes());
        let pred = |p: &Packet| p.is_data(c.id, hello.as_bytes());
        assert!(wait_for(T, || a.count(pred) + b.count(pred) > 0), "client {} reached neither master", c.id);
        if a.count(pred) > 0 {
            on_a.push(c);
        } else {
            on_b.push(c);
        }
    }
    (on_a, on_b)
}

#[test]
fn failover_moves_the_clients_of_a_dead_master_with_reconnect_notices() {
    let (a, b) = (TestMaster::start(), TestMaster::start());
    let fh = start(&[&a, &b], "failover = true\nbalance = \"least_clients\"\n");
    let (mut on_a, mut on_b) = spread(&fh, &a, &b, 6);
    assert!(on_a.len().abs_diff(on_b.len()) <= 1, "least_clients put {} clients on A and {} on B", on_a.len(), on_b.len());
    a.stop();
    for c in &on_a {
        let p = expect_flag(&b, c.id, FLAG_RECONNECT, "reconnect notice for a client moved from A");
        assert!(p.data.is_empty(), "reconnect notice with data: {p}");
    }
    for c in on_a.iter_mut() {
        round_trip(&b, c, "moved to B");
    }
    for c in on_b.iter_mut() {
        round_trip(&b, c, "B's own client");
    }
    let own: HashSet<u64> = on_b.iter().map(|c| c.id).collect();
    let extra = b.filter(|p| p.flag == FLAG_RECONNECT && own.contains(&p.id));
    assert!(extra.is_empty(), "B got reconnect notices for its own clients; {}", show_packets(&extra));
}

/// Clients keep sending numbered frames while their master dies: at the
/// new master each client's frames arrive in order (none overtakes one
/// queued before the failover), and none is left behind for the dead
/// master to get when it comes back. (The race this guards, a worker
/// appending to the failed link's outbox just after the failover emptied
/// it, is a window of a few instructions: this test passed against the code
/// before the fix too; it holds the properties, it does not reproduce it.)
#[test]
fn frames_sent_through_a_failover_reach_the_new_master_in_order() {
    let (a, b) = (TestMaster::start(), TestMaster::start());
    let fh = start(&[&a, &b], "failover = true\nbalance = \"least_clients\"\n");
    let (on_a, _on_b) = spread(&fh, &a, &b, 6);
    assert!(!on_a.is_empty(), "least_clients put no client on A");
    let ids: Vec<u64> = on_a.iter().map(|c| c.id).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = on_a
        .into_iter()
        .map(|mut c| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if c.send(format!("n {n}").as_bytes()).is_err() {
                        break;
                    }
                    n += 1;
                    if n % 16 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                (c, n)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(150));
    a.stop();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: Vec<(FirehoseClient, u64)> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    let num = |d: &[u8]| String::from_utf8_lossy(d).strip_prefix("n ").and_then(|n| n.parse::<u64>().ok()).expect("a numbered frame");
    for (c, n) in &sent {
        let last = format!("n {}", n - 1);
        assert!(wait_for(T, || b.count(|p| p.is_data(c.id, last.as_bytes())) > 0), "client {}: its last frame ({last}) never reached B", c.id);
        let at_b: Vec<u64> = b.data_from(c.id).iter().filter(|d| d.starts_with(b"n ")).map(|d| num(d)).collect();
        assert!(at_b.windows(2).all(|w| w[0] < w[1]), "client {}: frames out of order at the new master: {:?}", c.id, at_b);
    }
    a.restart();
    assert!(a.wait_accepts(2, REDIAL), "Atlas did not redial A within {REDIAL:?}");
    let ids: HashSet<u64> = ids.into_iter().collect();
    assert_quiet(&a, "frames of moved clients went to their old master once it was back", |p| p.conn > 0 && ids.contains(&p.id) && p.flag == FLAG_DATA);
}

#[test]
fn without_failover_clients_wait_for_their_own_master() {
    let (a, b) = (TestMaster::start(), TestMaster::start());
    let fh = start(&[&a, &b], "failover = false\nbalance = \"least_clients\"\n");
    let (mut on_a, _on_b) = spread(&fh, &a, &b, 4);
    assert!(!on_a.is_empty(), "least_clients put no client on A");
    a.stop();
    thread::sleep(SETTLE);
    for c in on_a.iter_mut() {
        c.send_ok(format!("queued {}", c.id).as_bytes());
    }
    let ids: HashSet<u64> = on_a.iter().map(|c| c.id).collect();
    assert_quiet(&b, "without failover, B got packets of A's clients", |p| ids.contains(&p.id));
    a.restart();
    assert!(a.wait_accepts(2, REDIAL), "Atlas did not redial A within {REDIAL:?}");
    for c in on_a.iter_mut() {
        expect_data(&a, c.id, format!("queued {}", c.id).as_bytes());
        round_trip(&a, c, "back on A");
    }
}

#[test]
fn hash_balance_spreads_clients_and_keeps_each_on_one_master() {
    let (a, b) = (TestMaster::start(), TestMaster::start());
    let fh = start(&[&a, &b], "balance = \"hash\"\n");
    let (mut on_a, mut on_b) = spread(&fh, &a, &b, 16);
    assert!(!on_a.is_empty() && !on_b.is_empty(), "hash balance put all 16 clients on one master ({} on A, {} on B)", on_a.len(), on_b.len());
    for c in on_a.iter_mut() {
        round_trip(&a, c, "on A");
    }
    for c in on_b.iter_mut() {
        round_trip(&b, c, "on B");
    }
    let ids_a: HashSet<u64> = on_a.iter().map(|c| c.id).collect();
    let crossed = b.filter(|p| ids_a.contains(&p.id));
    assert!(crossed.is_empty(), "clients of A reached B; {}", show_packets(&crossed));
}

// ---------------------------------------------------------------------------
// 9. The key and the clients survive restarts and takeovers
// ---------------------------------------------------------------------------

#[test]
fn the_key_file_is_created_0600_and_keeps_the_pubkey_across_restarts() {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let key = dir.join("firehose.key");
    let cfg = config(&[master.addr()], &key, "");
    let mut first = Atlas::start(&cfg);
    assert!(wait_for(T, || key.exists()), "Atlas did not create its key file {}", key.display());
    assert_eq!(mode_of(&key), 0o600, "mode of the new key file {}", key.display());
    let bytes = std::fs::read(&key).expect("read the key file");
    assert!(!bytes.is_empty(), "empty key file");
    let k1 = connect(first.addr()).atlas_key;
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "Atlas did not exit within 10 s of SIGTERM");
    let second = Atlas::start(&cfg);
    let k2 = connect(second.addr()).atlas_key;
    assert_eq!(k2, k1, "Atlas' PubKey changed across a restart with the same key_file");
    assert_eq!(std::fs::read(&key).expect("read the key file"), bytes, "the key file changed on restart");
    assert_eq!(mode_of(&key), 0o600, "mode of the key file after the restart");
    let other = start(&[&master], "");
    assert_ne!(connect(other.addr()).atlas_key, k1, "another key_file gave the same PubKey");
}

/// A client that left (three packets missed since) and one still connected
/// when Atlas stops; the next Atlas (a restart, or a takeover when
/// `takeover`) on the same port and key lets both reconnect under their
/// ids, the first getting its missed packets in order.
fn clients_survive_a_handover(takeover: bool) {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let key = dir.join("firehose.key");
    let table = dir.join("firehose.key.clients");
    let addr = free_addr();
    let cfg = config(&[master.addr()], &key, "missed_packets_buffer_size = 16\n").replace("127.0.0.1:0", &addr.to_string());
    let mut first = Atlas::start(&cfg);
    assert!(master.wait_accepts(1, T), "Atlas did not dial the master");
    let mut away = connect(addr);
    let mut live = connect(addr);
    round_trip(&master, &mut away, "before");
    round_trip(&master, &mut live, "before");
    let (away_id, live_id) = (away.identity(), live.identity());
    drop(away);
    thread::sleep(SETTLE);
    for i in 0..3 {
        master.send_data(away_id.id, format!("missed {i}").as_bytes());
    }
    thread::sleep(SETTLE);
    let second = if takeover {
        let next = Atlas::start_takeover(&first, &cfg, 1);
        assert!(live.is_closed(T), "the old Atlas kept its client after the takeover");
        assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "the old Atlas did not exit after the takeover");
        next
    } else {
        first.signal("TERM");
        assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "Atlas did not exit within 10 s of SIGTERM");
        assert!(live.is_closed(T), "the client was not closed by the drain");
        assert!(table.exists(), "no client table at {} after the drain; {}", table.display(), first.logs());
        assert_eq!(mode_of(&table), 0o600, "mode of the client table");
        Atlas::start(&cfg)
    };
    let mut back = resume(addr, &away_id, "after the hand-over");
    for i in 0..3 {
        expect_recv(&mut back, format!("missed {i}").as_bytes(), &format!("missed packet {i} after the hand-over"));
    }
    let mut again = resume(addr, &live_id, "after the hand-over (it was connected)");
    round_trip(&master, &mut back, "after");
    round_trip(&master, &mut again, "after");
    assert!(wait_for(T, || !table.exists()), "the client table {} was not removed once imported", table.display());
    let failures = master.filter(|p| p.flag == FLAG_FAILURE);
    assert!(failures.is_empty(), "the master was told clients are gone; {}", show_packets(&failures));
    drop(second);
}

#[test]
fn clients_reconnect_after_a_restart_with_their_ids_and_missed_packets() {
    clients_survive_a_handover(false);
}

#[test]
fn clients_reconnect_after_a_takeover_with_their_ids_and_missed_packets() {
    clients_survive_a_handover(true);
}

#[test]
fn a_client_whose_stale_timeout_ran_out_while_atlas_was_down_is_refused_and_failed() {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let addr = free_addr();
    let cfg = config(&[master.addr()], &dir.join("firehose.key"), "stale_timeout_secs = 1\nmissed_packets_buffer_size = 16\n")
        .replace("127.0.0.1:0", &addr.to_string());
    let mut first = Atlas::start(&cfg);
    assert!(master.wait_accepts(1, T), "Atlas did not dial the master");
    let c = connect(addr);
    let who = c.identity();
    drop(c);
    thread::sleep(SETTLE);
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "Atlas did not exit within 10 s of SIGTERM");
    thread::sleep(Duration::from_millis(1200));
    let _second = Atlas::start(&cfg);
    assert_reconnect_refused(addr, &who, "its stale timeout ran out while no Atlas ran");
    let p = expect_flag(&master, who.id, FLAG_FAILURE, "failure notice for the expired client");
    assert!(String::from_utf8_lossy(&p.data).contains("stale timeout"), "failure reason: {p}");
}

/// A damaged client table is reported and skipped; Atlas serves anyway.
#[test]
fn a_damaged_client_table_is_skipped_with_a_warning() {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let key = dir.join("firehose.key");
    std::fs::write(dir.join("firehose.key.clients"), b"ATLAS-FH-CLIENTS 1\n\x01\x02").unwrap();
    let fh = Atlas::start(&config(&[master.addr()], &key, ""));
    assert!(fh.wait_log("client table is unreadable", 1, T), "no warning about the damaged table; {}", fh.logs());
    let mut c = connect(fh.addr());
    assert!(master.wait_accepts(1, T));
    round_trip(&master, &mut c, "with a damaged table");
}

/// Master links run on worker 0 for literal addresses and on a thread of
/// their own for a host name (its DNS lookup must not stall a worker):
/// both carry clients of every worker.
#[test]
fn master_links_by_address_or_host_name_serve_clients_of_every_worker() {
    for (host, workers) in [("127.0.0.1", 2), ("localhost", 2), ("localhost", 1)] {
        let master = TestMaster::start();
        let dir = TempDir::new();
        let cfg = config(&[master.addr()], &dir.join("firehose.key"), "")
            .replace(&format!("\"{}\"", master.addr()), &format!("\"{host}:{}\"", master.port()))
            .replace("mode = \"firehose\"\n", &format!("mode = \"firehose\"\nworkers = {workers}\n"));
        let fh = Atlas::start(&cfg);
        assert!(master.wait_accepts(1, T), "{host}: Atlas did not dial the master; {}", fh.logs());
        // Enough clients that each worker has some (SO_REUSEPORT spreads them).
        let mut clients: Vec<FirehoseClient> = (0..16).map(|_| connect(fh.addr())).collect();
        for c in &mut clients {
            round_trip(&master, c, host);
        }
        assert_eq!(master.accepts(), 1, "{host}: one link per master, whatever the workers");
    }
}

// ---------------------------------------------------------------------------
// 10. Malformed input
// ---------------------------------------------------------------------------

#[test]
fn a_client_frame_over_max_frame_length_closes_only_that_client() {
    let master = TestMaster::start();
    let mut fh = start(&[&master], "max_frame_length = 1024\n");
    let mut good = connect(fh.addr());
    let mut bad = connect(fh.addr());
    let full = vec![b'x'; 1024];
    good.send_ok(&full);
    expect_data(&master, good.id, &full);
    let mut over = 2000u32.to_le_bytes().to_vec();
    over.extend_from_slice(&[b'y'; 100]);
    bad.send_raw(&over).expect("send the oversized frame head");
    assert!(bad.is_closed(Duration::from_secs(2)), "Atlas kept client {} after a 2000-byte frame (max 1024)", bad.id);
    let mut early = FirehoseClient::raw(fh.addr());
    early.send_raw(&u32::MAX.to_le_bytes()).unwrap();
    assert!(early.is_closed(Duration::from_secs(2)), "Atlas kept a handshaking socket after a 4 GiB frame length");
    assert!(master.count(|p| p.id == bad.id && p.flag == FLAG_DATA) == 0, "part of the oversized frame reached the master");
    round_trip(&master, &mut good, "the other client");
    let mut fresh = connect(fh.addr());
    round_trip(&master, &mut fresh, "a new client");
    assert!(fh.is_running(), "Atlas exited");
}

/// Opens a socket, optionally does ProtocolVersion(2) (and reads the
/// PubKey), sends `payload` as a frame and asserts Atlas closes without
/// sending a ClientId.
fn assert_bad_frame_closes(addr: SocketAddr, after_version: bool, payload: &[u8], what: &str) {
    let mut c = FirehoseClient::raw(addr);
    if after_version {
        c.send_ok(&Control::ProtocolVersion(2).encode());
        let k = c.recv(T).unwrap_or_else(|e| panic!("{what}: no PubKey: {e}"));
        assert!(matches!(Control::decode(&k), Ok(Control::PubKey(_))), "{what}: want a PubKey first, got {k:02x?}");
    }
    c.send_ok(payload);
    assert!(c.is_closed(Duration::from_secs(2)), "{what}: Atlas did not close the socket within 2 s");
    assert!(c.pending().is_empty(), "{what}: Atlas answered {:02x?} before closing", c.pending());
}

#[test]
fn unknown_control_variants_and_garbage_varints_in_the_handshake_close_the_socket() {
    let master = TestMaster::start();
    let mut fh = start(&[&master], "");
    let addr = fh.addr();
    let mut not_a_point = vec![0x02, 0x21, 0x02];
    not_a_point.extend_from_slice(&[0xFF; 32]);
    let cases: Vec<(bool, Vec<u8>, &str)> = vec![
        (false, vec![0x07], "variant 7 first"),
        (false, vec![0x01, 0xFF], "ProtocolVersion with varint marker 0xFF"),
        (false, vec![0x01, 0xFC, 0x02], "ProtocolVersion with a truncated u32 varint"),
        (false, vec![0xFD, 0x01], "a truncated u64 variant index"),
        (false, vec![], "an empty first frame"),
        (false, vec![0x00], "Ping instead of ProtocolVersion"),
        (true, vec![0x07], "variant 7 instead of PubKey"),
        (true, vec![0x02, 0xFF], "PubKey with a bad length varint"),
        (true, vec![0x02, 0x21, 0x02, 0x03], "PubKey truncated"),
        (true, not_a_point, "PubKey that is not a curve point"),
        (true, vec![0x05, 0x48], "ChallengeResponse unasked"),
    ];
    for (after_version, payload, what) in &cases {
        assert_bad_frame_closes(addr, *after_version, payload, what);
    }
    let mut c = connect(addr);
    round_trip(&master, &mut c, "after the malformed handshakes");
    assert!(fh.is_running(), "Atlas exited");
}

#[test]
fn protocol_versions_other_than_2_are_closed_without_a_pubkey() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    for v in [3u32, 1, 0, 300, u32::MAX] {
        assert_bad_frame_closes(fh.addr(), false, &Control::ProtocolVersion(v).encode(), &format!("ProtocolVersion({v})"));
    }
    let mut c = connect(fh.addr());
    round_trip(&master, &mut c, "after the wrong versions");
}

#[test]
fn after_the_handshake_every_client_frame_is_opaque_data() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut c = connect(fh.addr());
    for payload in [Control::Ping.encode(), Control::ProtocolVersion(2).encode(), Control::ClientId(c.id).encode(), vec![0x07], vec![]] {
        c.send_ok(&payload);
        let got = master.wait_packet(T, |p| p.id == c.id && p.flag == FLAG_DATA && p.data == payload);
        assert!(got.is_some(), "the frame {payload:02x?} after the handshake did not reach the master as data; {}", show_packets(&master.packets()));
    }
    assert!(!c.is_closed(Duration::from_millis(50)), "Atlas closed the client");
    master.send_data(c.id, &[]);
    expect_recv(&mut c, b"", "an empty data packet");
}

/// A client that pipelines data right behind its PubKey (before its
/// ClientId arrives), in the same write, loses none of it, however large.
#[test]
fn data_pipelined_behind_the_handshake_is_forwarded_in_order() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut c = FirehoseClient::raw(fh.addr());
    let secret = firehose::new_secret();
    let big = firehose::random_bytes(4000);
    let mut bytes = frame(&Control::ProtocolVersion(2).encode());
    bytes.extend(frame(&Control::PubKey(firehose::public_bytes(&secret)).encode()));
    bytes.extend(frame(&big));
    bytes.extend(frame(b"second"));
    c.send_raw(&bytes).expect("send the pipelined handshake");
    assert!(matches!(Control::decode(&c.recv(T).expect("PubKey")), Ok(Control::PubKey(_))));
    let id = match Control::decode(&c.recv(T).expect("ClientId")) {
        Ok(Control::ClientId(id)) => id,
        other => panic!("expected ClientId, got {other:?}"),
    };
    assert!(master.wait_packet(T, |p| p.is_data(id, b"second")).is_some(), "{}", show_packets(&master.packets()));
    let data: Vec<Vec<u8>> = master.packets().iter().filter(|p| p.id == id && p.flag == FLAG_DATA).map(|p| p.data.clone()).collect();
    assert_eq!(data, vec![big, b"second".to_vec()], "the pipelined frames, in order");
}

/// SIGTERM closes the connected clients at once (they reconnect to the
/// successor) instead of holding the process until the drain timeout.
#[test]
fn sigterm_closes_connected_clients_and_exits_promptly() {
    let master = TestMaster::start();
    let mut fh = start(&[&master], "");
    let mut c = connect(fh.addr());
    round_trip(&master, &mut c, "before the drain");
    fh.expect_exit();
    let t = Instant::now();
    fh.signal("TERM");
    assert!(c.is_closed(Duration::from_secs(3)), "the client is still connected 3 s after SIGTERM");
    assert!(fh.wait_exit(Duration::from_secs(5)).is_some(), "Atlas did not exit within 5 s of SIGTERM (drain_timeout is 30 s)");
    eprintln!("closed and exited {:?} after SIGTERM", t.elapsed());
}

/// Sends `bytes` on the master link and checks that Atlas drops it, redials,
/// stays up, and its clients work again.
fn assert_bad_master_frame_redials(max_frame_length: usize, bytes: &[u8], what: &str) {
    let master = TestMaster::start();
    let mut fh = start(&[&master], &format!("max_frame_length = {max_frame_length}\n"));
    let mut c = connect(fh.addr());
    round_trip(&master, &mut c, "before");
    master.send_raw(bytes).unwrap_or_else(|e| panic!("send {what}: {e}"));
    assert!(master.wait_conn_closed(0, Duration::from_secs(3)), "Atlas kept the master link after {what}");
    assert!(master.wait_accepts(2, REDIAL), "Atlas did not redial after dropping the link for {what}");
    assert!(fh.is_running(), "Atlas exited after {what}");
    let p = round_trip(&master, &mut c, &format!("after {what}"));
    assert_eq!(p.conn, 1);
    let mut fresh = connect(fh.addr());
    round_trip(&master, &mut fresh, "a new client");
    assert!(fh.count_log("panicked") == 0, "Atlas panicked after {what}");
}

#[test]
fn a_master_frame_of_8_bytes_drops_the_link_and_atlas_redials() {
    assert_bad_master_frame_redials(65536, &frame(&[1, 0, 0, 0, 0, 0, 0, 0]), "an 8-byte master frame");
}

#[test]
fn a_master_frame_with_a_huge_length_drops_the_link_and_atlas_redials() {
    let mut bytes = 0xFFFF_FFF0u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 13]);
    assert_bad_master_frame_redials(65536, &bytes, "a master frame of 4 GiB");
}

#[test]
fn a_master_frame_over_max_frame_length_drops_the_link_and_atlas_redials() {
    // Well past the limit whether or not the 9 bytes of id and flag count.
    let mut payload = 1u64.to_le_bytes().to_vec();
    payload.push(FLAG_DATA);
    payload.extend_from_slice(&[b'z'; 4096]);
    assert_bad_master_frame_redials(1024, &frame(&payload), "a 4105-byte master frame (max_frame_length = 1024)");
}

#[test]
fn an_unknown_master_flag_is_ignored() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut c = connect(fh.addr());
    master.send_packet(c.id, 0x42, b"unknown flag").unwrap();
    master.send_data(c.id, b"next");
    expect_recv(&mut c, b"next", "the packet after an unknown flag");
    round_trip(&master, &mut c, "after an unknown flag");
    assert_eq!(master.accepts(), 1, "Atlas redialled after an unknown flag");
    assert!(!master.conn_closed(0), "Atlas dropped the link after an unknown flag");
}

// ---------------------------------------------------------------------------
// 11. WebSocket
// ---------------------------------------------------------------------------

#[test]
fn websocket_and_tcp_clients_share_the_listener() {
    let master = TestMaster::start();
    let fh = start(&[&master], "");
    let mut ws = FirehoseClient::connect_new_over(fh.addr(), Transport::Ws).unwrap_or_else(|e| panic!("WebSocket client: {e}"));
    let mut tcp = connect(fh.addr());
    assert_ne!(ws.id, tcp.id, "the WebSocket and TCP clients got the same id");
    assert_eq!(ws.atlas_key, tcp.atlas_key, "one PubKey for both transports");
    round_trip(&master, &mut ws, "ws");
    round_trip(&master, &mut tcp, "tcp");
    let big = firehose::random_bytes(3000);
    ws.send_ok(&big);
    expect_data(&master, ws.id, &big);
    master.send_data(ws.id, &big);
    let got = ws.recv(T).expect("the 3000-byte message");
    assert!(got == big, "the 3000-byte message came back different ({} bytes)", got.len());
    master.send_data(tcp.id, b"only tcp");
    expect_recv(&mut tcp, b"only tcp", "its own data");
    master.send_data(ws.id, b"only ws");
    expect_recv(&mut ws, b"only ws", "its own data, not the TCP client's");
}

#[test]
fn a_websocket_client_reconnects_with_the_challenge() {
    let master = TestMaster::start();
    let fh = start(&[&master], &format!("missed_packets_buffer_size = 4\n{}", notices(&["disconnect"])));
    let ws = FirehoseClient::connect_new_over(fh.addr(), Transport::Ws).unwrap_or_else(|e| panic!("WebSocket client: {e}"));
    let who = ws.identity();
    drop(ws);
    expect_flag(&master, who.id, FLAG_DISCONNECT, "disconnect notice");
    master.send_data(who.id, b"missed");
    let mut r = FirehoseClient::reconnect_with(fh.addr(), Transport::Ws, who.id, &who.secret, &who.atlas_key, Answer::Correct)
        .unwrap_or_else(|e| panic!("WebSocket reconnect: {e}"));
    expect_recv(&mut r, b"missed", "the missed packet");
    round_trip(&master, &mut r, "after the WebSocket reconnect");
}

// ---------------------------------------------------------------------------
// 12. Defences
// ---------------------------------------------------------------------------

#[test]
fn the_handshake_timeout_closes_silent_and_stalled_sockets_only() {
    let master = TestMaster::start();
    let fh = start(&[&master], "handshake_timeout = \"500ms\"\n");
    let t0 = Instant::now();
    let mut silent = FirehoseClient::raw(fh.addr());
    let mut stalled = FirehoseClient::raw(fh.addr());
    stalled.send_ok(&Control::ProtocolVersion(2).encode());
    let mut done = connect(fh.addr());
    assert!(silent.is_closed(Duration::from_millis(1500)), "a silent socket was still open {:?} after connecting", t0.elapsed());
    let closed_after = t0.elapsed();
    assert!(closed_after >= Duration::from_millis(350), "a silent socket was closed after {closed_after:?}, before the 500 ms handshake timeout");
    assert!(stalled.is_closed(Duration::from_millis(1000)), "a socket stalled after ProtocolVersion was not closed by the handshake timeout");
    assert!(!done.is_closed(Duration::from_millis(300)), "a client that finished its handshake was closed by the handshake timeout");
    round_trip(&master, &mut done, "after the handshake timeout of others");
}

#[test]
fn per_ip_connect_rate_closes_excess_connections_at_once() {
    let master = TestMaster::start();
    let fh = start(&[&master], "per_ip_connect_rate = 5\n");
    let mut socks: Vec<FirehoseClient> = (0..20).map(|_| FirehoseClient::raw(fh.addr())).collect();
    thread::sleep(SETTLE);
    let closed: Vec<bool> = socks.iter_mut().map(|s| s.is_closed(Duration::from_millis(20))).collect();
    let n_closed = closed.iter().filter(|c| **c).count();
    assert!(n_closed >= 10, "only {n_closed} of 20 rapid connections were closed with per_ip_connect_rate = 5");
    assert!(n_closed < 20, "all 20 connections were closed: none within the rate got through");
    let i = closed.iter().position(|c| !*c).unwrap();
    socks[i].handshake_new().unwrap_or_else(|e| panic!("a connection within the rate: {e}"));
    round_trip(&master, &mut socks[i], "within the rate");
    drop(socks);
    thread::sleep(Duration::from_millis(1200));
    let mut later = connect(fh.addr());
    round_trip(&master, &mut later, "a connection after the rate window");
}

#[test]
fn client_rate_throttles_without_losing_frames() {
    let master = TestMaster::start();
    let fh = start(&[&master], "client_rate = 50\n");
    let mut c = connect(fh.addr());
    let t0 = Instant::now();
    for i in 0..100 {
        c.send_ok(format!("frame {i:03}").as_bytes());
    }
    let got = master.wait_count(100, Duration::from_secs(10), |p| p.id == c.id && p.flag == FLAG_DATA);
    let want: Vec<String> = (0..100).map(|i| format!("frame {i:03}")).collect();
    let seen: Vec<String> = got.iter().map(|p| String::from_utf8_lossy(&p.data).into_owned()).collect();
    assert_eq!(seen, want, "client_rate = 50 lost or reordered frames");
    let took = got.last().unwrap().at.duration_since(t0);
    assert!(took >= Duration::from_millis(800), "100 frames at client_rate = 50 reached the master in {took:?}: not throttled");
    master.send_data(c.id, b"still there");
    expect_recv(&mut c, b"still there", "data after being throttled");
}

// ---------------------------------------------------------------------------
// 13. connserver environment variables and command line
// ---------------------------------------------------------------------------

#[test]
fn voltlane_environment_variables_override_the_config() {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let listen = free_addr();
    let cfg = config(&[common::refused_addr()], &dir.join("firehose.key"), "stale_timeout_secs = 300\nmissed_packets_buffer_size = 0\n");
    let path = common::write_config(&cfg);
    let mut cmd = Command::new(common::BIN);
    cmd.arg(&path).current_dir(dir.path());
    cmd.env("VOLTLANE_MASTER_ADDRESS", master.addr().to_string())
        .env("VOLTLANE_LISTENER_ADDRESS", listen.to_string())
        .env("VOLTLANE_CLIENTS_STALE_TIMEOUT_SECS", "1")
        .env("VOLTLANE_CLIENTS_STALE_REAP_INTERVAL_SECS", "1")
        .env("VOLTLANE_CLIENTS_MISSED_PACKETS_BUFFER_SIZE", "4");
    let atlas = Atlas::spawn(cmd, Some(path), 1, false);
    assert_eq!(atlas.addr(), listen, "VOLTLANE_LISTENER_ADDRESS was not used");
    assert!(master.wait_accepts(1, T), "Atlas did not dial VOLTLANE_MASTER_ADDRESS {}", master.addr());
    let mut c = connect(atlas.addr());
    round_trip(&master, &mut c, "through the env master");
    let id = c.id;
    drop(c);
    thread::sleep(SETTLE);
    master.send_data(id, b"buffered");
    let dropped = Instant::now();
    assert_quiet(&master, "VOLTLANE_CLIENTS_MISSED_PACKETS_BUFFER_SIZE=4 ignored: a packet for a stale client failed it", |p| p.flag == FLAG_FAILURE);
    let f = master.wait_packet(Duration::from_secs(4), |p| p.is(id, FLAG_FAILURE));
    assert!(f.is_some(), "VOLTLANE_CLIENTS_STALE_TIMEOUT_SECS=1 ignored: no expiry within {:?}; {}", dropped.elapsed(), show_packets(&master.packets()));
}

#[test]
fn master_and_listen_options_run_a_firehose_without_a_config_file() {
    let master = TestMaster::start();
    let dir = TempDir::new();
    let listen = free_addr();
    let mut cmd = Command::new(common::BIN);
    cmd.arg("--master").arg(master.addr().to_string()).arg("--listen").arg(listen.to_string()).current_dir(dir.path());
    let atlas = Atlas::spawn(cmd, None, 1, false);
    assert_eq!(atlas.addr(), listen, "--listen was not used");
    assert!(master.wait_accepts(1, T), "Atlas did not dial --master {}", master.addr());
    let mut c = connect(atlas.addr());
    round_trip(&master, &mut c, "with --master/--listen");
    let key = dir.join("firehose.key");
    assert!(key.exists(), "no firehose.key in the working directory {}", dir.path().display());
    assert_eq!(mode_of(&key), 0o600, "mode of {}", key.display());
}
