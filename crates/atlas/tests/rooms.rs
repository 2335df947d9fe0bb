//! Rooms end to end: the room gateway's REST API (`/api/v1/rooms`), join
//! tokens, joins through the game listener (`/rooms/{id}`), cleanup of empty
//! rooms from the servers' heartbeat reports, migration of a dead server's
//! rooms (and of the players in them), per-IP rates, and the `[store]`
//! backends: the same behavioural suite runs on `memory` and on `redis`
//! (a real `redis-server` per test, tests/support/redis.rs), then fleet tests
//! run three Atlas processes on one Redis (shared servers and rooms, hundreds
//! of concurrent creates that must never overfill a server, a Redis outage).
//!
//! Only std and serde_json: the join token's HMAC-SHA256 and base64url are
//! implemented below (and checked against published test vectors).

mod common;
#[path = "support/game.rs"]
mod game;
#[path = "support/redis.rs"]
mod redis_server;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Atlas;
use game::{http_json, http_raw, move_msg, random_u64, wait_for, GameServer, WsClient};
use redis_server::RedisServer;
use serde_json::{json, Value};

/// `[spatial] token_secret` of every test config: the join tokens' key.
const SECRET: &str = "test-secret";
/// How often the test game servers heartbeat (Atlas expects one a second).
const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
/// `[rooms]` of most tests: fast cleanup, no rate limits.
const DEFAULT_ROOMS: &str = "empty_grace = \"1s\"\ncreate_rate = 0\njoin_rate = 0\n";

// ---------------------------------------------------------------------------
// Backends and configs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

/// The `[store]` of one test: memory, or its own `redis-server` and a
/// prefix no other test uses.
struct Store {
    redis: Option<RedisServer>,
    prefix: String,
}

fn unique_prefix() -> String {
    format!("t{:016x}:", random_u64())
}

impl Store {
    fn new(b: Backend) -> Store {
        let redis = match b {
            Backend::Memory => None,
            Backend::Redis => Some(RedisServer::start()),
        };
        Store { redis, prefix: unique_prefix() }
    }

    fn section(&self) -> String {
        match &self.redis {
            None => "[store]\nbackend = \"memory\"\n".to_string(),
            Some(r) => redis_section(r, &self.prefix),
        }
    }
}

fn redis_section(r: &RedisServer, prefix: &str) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"\ntimeout = \"500ms\"\n", r.url())
}

/// A game listener and the API on ephemeral ports, 1 s heartbeats (a server
/// is down after 2 missed), the token secret, `rooms` as `[rooms]` and the
/// `[store]` section `store`.
fn config_with(store_section: &str, rooms: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nmode = \"game\"\n\n[api]\naddress = \"127.0.0.1:0\"\n\n[spatial]\nregion_size = 1000.0\n\
         heartbeat_interval = \"1s\"\nheartbeat_misses = 2\ntoken_secret = \"{SECRET}\"\n\n[rooms]\n{rooms}\n{store_section}\n"
    )
}

fn start(store: &Store, rooms: &str) -> Atlas {
    Atlas::start(&config_with(&store.section(), rooms))
}

fn api(atlas: &Atlas) -> SocketAddr {
    atlas.api.expect("the API address")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Game servers
// ---------------------------------------------------------------------------

/// A game server registered with `api` for grid cell (slot, 0, 0) with the
/// registration `metadata`, heartbeating every 200 ms (the first heartbeat
/// is done before this returns).
fn game_server(api: SocketAddr, name: &str, slot: i64, capacity: u32, metadata: Value) -> GameServer {
    let s = GameServer::start(name);
    let c = slot as f64 * 1000.0 + 500.0;
    s.register_with_metadata(api, (slot, 0, 0), (c, 500.0, 500.0), 500.0, capacity, metadata).unwrap_or_else(|e| panic!("register {name}: {e}"));
    s.heartbeat(api).unwrap_or_else(|e| panic!("first heartbeat of {name}: {e}"));
    s.start_heartbeats(api, HEARTBEAT_EVERY);
    s
}

fn sid(s: &GameServer) -> String {
    s.server_id().expect("the server is registered")
}

fn address_of(s: &GameServer) -> String {
    format!("127.0.0.1:{}", s.addr().port())
}

/// The x of the center of grid cell `slot` (see [`game_server`]).
fn center_x(slot: i64) -> f64 {
    slot as f64 * 1000.0 + 500.0
}

// ---------------------------------------------------------------------------
// The rooms API
// ---------------------------------------------------------------------------

/// One JSON call; panics on a transport error.
fn call(api: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    http_json(api, method, path, body, &[]).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn create(api: SocketAddr, body: Value) -> (u16, Value) {
    call(api, "POST", "/api/v1/rooms", Some(&body))
}

/// Creates a room; asserts the 201.
fn create_ok(api: SocketAddr, body: Value) -> Value {
    let (status, v) = create(api, body.clone());
    assert_eq!(status, 201, "POST /api/v1/rooms {body}: {v}");
    v
}

/// Asserts a 503 with `reason`.
fn create_refused(api: SocketAddr, body: Value, reason: &str) {
    let (status, v) = create(api, body.clone());
    assert_eq!(status, 503, "POST /api/v1/rooms {body} must be refused ({reason}): {v}");
    assert_eq!(v["reason"].as_str(), Some(reason), "POST /api/v1/rooms {body}: {v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "a 503 has an error text: {v}");
}

fn get_room(api: SocketAddr, id: &str) -> (u16, Value) {
    call(api, "GET", &format!("/api/v1/rooms/{id}"), None)
}

fn delete_room(api: SocketAddr, id: &str) -> u16 {
    call(api, "DELETE", &format!("/api/v1/rooms/{id}"), None).0
}

fn room_id(v: &Value) -> String {
    v["room_id"].as_str().unwrap_or_else(|| panic!("no room_id in {v}")).to_string()
}

fn server_of(v: &Value) -> String {
    v["server_id"].as_str().unwrap_or_else(|| panic!("no server_id in {v}")).to_string()
}

/// One page of `GET /api/v1/rooms`.
fn list_page(api: SocketAddr, query: &str) -> Value {
    let path = format!("/api/v1/rooms{query}");
    let (status, v) = call(api, "GET", &path, None);
    assert_eq!(status, 200, "GET {path}: {v}");
    assert!(v["rooms"].is_array(), "GET {path}: no rooms list in {v}");
    v
}

fn ids_of(page: &Value) -> Vec<String> {
    page["rooms"].as_array().map(|a| a.iter().map(room_id).collect()).unwrap_or_default()
}

/// Every room, paging 50 at a time.
fn list_all(api: SocketAddr) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let page = list_page(api, &format!("?offset={}&limit=50", out.len()));
        let rooms = page["rooms"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or_else(|| panic!("no total in {page}")) as usize;
        out.extend(rooms.iter().cloned());
        if rooms.is_empty() || out.len() >= total {
            return out;
        }
    }
}

/// Per server: (rooms, sum of their capacities), from a listing.
fn reserved_by_server(rooms: &[Value]) -> HashMap<String, (usize, u64)> {
    let mut m: HashMap<String, (usize, u64)> = HashMap::new();
    for r in rooms {
        let e = m.entry(server_of(r)).or_default();
        e.0 += 1;
        e.1 += r["capacity"].as_u64().unwrap_or_else(|| panic!("no capacity in {r}"));
    }
    m
}

/// The ids in `GET /api/v1/servers`.
fn server_ids(api: SocketAddr) -> Vec<String> {
    let (status, v) = call(api, "GET", "/api/v1/servers", None);
    assert_eq!(status, 200, "GET /api/v1/servers: {v}");
    v["servers"].as_array().map(|a| a.iter().filter_map(|s| s["server_id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// A WebSocket upgrade request for `path` (for statuses other than 101).
fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: atlas.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Joins room `id` through the game listener `addr` as `player`.
fn join(addr: SocketAddr, id: &str, player: &str) -> WsClient {
    WsClient::connect(addr, &format!("/rooms/{id}?player_id={player}"), &[]).unwrap_or_else(|e| panic!("join /rooms/{id} through {addr}: {e}"))
}

fn send_seq(c: &mut WsClient, seq: u64) {
    c.send_text(&json!({"type": "chat", "text": format!("message {seq}"), "seq": seq}).to_string());
}

/// Reads messages until the ack of `seq` (other messages are skipped and
/// logged); panics on a close, EOF or timeout.
fn ack_of(c: &mut WsClient, seq: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let v = c.recv_json().unwrap_or_else(|e| panic!("waiting for the ack of seq {seq}: {e}"));
        if v["type"] == "ack" && v["seq"].as_u64() == Some(seq) {
            return v;
        }
        eprintln!("(while waiting for the ack of {seq}: skipped {v})");
        assert!(Instant::now() < deadline, "no ack of seq {seq} within 6 s");
    }
}

/// Sends `seq` and returns the name of the server that acked it.
fn acked_by(c: &mut WsClient, seq: u64) -> String {
    send_seq(c, seq);
    ack_of(c, seq)["server"].as_str().unwrap_or_default().to_string()
}

/// The connection of `s` that joined room `id`, if any.
fn room_conn(s: &GameServer, id: &str) -> Option<game::Conn> {
    s.connections().into_iter().find(|c| c.header("x-atlas-room-id") == Some(id))
}

// ---------------------------------------------------------------------------
// Join tokens: base64url, SHA-256, HMAC-SHA256
// ---------------------------------------------------------------------------

/// base64url without padding (RFC 4648 §5).
fn base64url_decode(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 4 == 1 {
        return Err(format!("{} characters cannot be base64", s.len()));
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return Err(format!("{:?} is not a base64url character", c as char)),
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74,
    0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d,
    0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e,
    0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5,
    0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// SHA-256 (FIPS 180-4) of `data`.
fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K256[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(v);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = if key.len() > 64 { sha256(key).to_vec() } else { key.to_vec() };
    k.resize(64, 0);
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a join token: `<payload>.<sig>`, the payload base64url without
/// padding of `{"room_id","server_id","expires_at_ms","nonce"}`, the
/// signature the lowercase hex HMAC-SHA256 of the payload text with
/// [`SECRET`]. Returns the payload.
fn check_token(token: &str, room: &str, server: &str) -> Value {
    let (payload, sig) = token.rsplit_once('.').unwrap_or_else(|| panic!("join token {token:?} is not <payload>.<sig>"));
    assert!(
        !payload.is_empty() && payload.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "the token payload must be base64url without padding: {token:?}"
    );
    assert!(
        sig.len() == 64 && sig.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "the signature must be 64 lowercase hex digits: {token:?}"
    );
    let expected = hex(&hmac_sha256(SECRET.as_bytes(), payload.as_bytes()));
    assert_eq!(sig, expected, "the signature is HMAC-SHA256(token_secret, payload) of {token:?}");
    let bytes = base64url_decode(payload).unwrap_or_else(|e| panic!("token payload of {token:?}: {e}"));
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("token payload {:?} is not JSON: {e}", String::from_utf8_lossy(&bytes)));
    assert_eq!(v["room_id"].as_str(), Some(room), "token payload {v}");
    assert_eq!(v["server_id"].as_str(), Some(server), "token payload {v}");
    assert!(v["expires_at_ms"].as_u64().is_some(), "token payload without a numeric expires_at_ms: {v}");
    let nonce_ok = match &v["nonce"] {
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
        _ => false,
    };
    assert!(nonce_ok, "token payload without a nonce: {v}");
    v
}

#[test]
fn token_helpers_match_published_vectors() {
    assert_eq!(hex(&sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(hex(&sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(hex(&sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // RFC 4231 test cases 2 and 6 (a key longer than the block).
    assert_eq!(hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    assert_eq!(
        hex(&hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar", &[0xfb, 0xff, 0xfe, 0x00, 0x7f]] {
        let url = game::base64_encode(data).trim_end_matches('=').replace('+', "-").replace('/', "_");
        assert_eq!(base64url_decode(&url).unwrap(), data, "{url}");
    }
    assert!(base64url_decode("ab+c").is_err());
}

// ---------------------------------------------------------------------------
// The behavioural suite (both backends)
// ---------------------------------------------------------------------------

/// `POST /api/v1/rooms` answers every field and a join token signed with
/// the token secret; the defaults and the `geo` alias; `GET` answers the
/// same fields plus `players`.
fn case_create_returns_the_room_and_a_signed_join_token(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let s = game_server(api, "s1", 0, 100, json!({"region": "eu"}));
    let before = now_ms();
    let metadata = json!({"map": "dust", "tags": [1, 2], "ranked": true});
    let v = create_ok(api, json!({"mode": "duel", "region": "eu", "capacity": 4, "metadata": metadata}));
    let after = now_ms();
    eprintln!("created {v}");
    let id = room_id(&v);
    assert!(!id.is_empty() && !id.contains('/') && !id.contains('?'), "room_id {id:?} must fit in a path");
    assert_eq!(v["server_id"].as_str(), Some(sid(&s).as_str()), "{v}");
    assert_eq!(v["address"].as_str(), Some(address_of(&s).as_str()), "{v}");
    assert_eq!(v["capacity"].as_u64(), Some(4), "{v}");
    assert_eq!(v["mode"], "duel", "{v}");
    assert_eq!(v["region"], "eu", "{v}");
    assert_eq!(v["metadata"], metadata, "{v}");
    let created = v["created_at_ms"].as_u64().unwrap_or_else(|| panic!("no numeric created_at_ms in {v}"));
    assert!(created + 1000 >= before && created <= after + 1000, "created_at_ms {created} is not between {before} and {after}");
    let token = v["join_token"].as_str().unwrap_or_else(|| panic!("no join_token in {v}"));
    let payload = check_token(token, &id, &sid(&s));
    let expires = payload["expires_at_ms"].as_u64().unwrap();
    // join_token_ttl defaults to 60 s.
    assert!(expires >= before + 55_000 && expires <= after + 65_000, "expires_at_ms {expires}: about 60 s after {before}");

    // Every field is optional: capacity defaults to [rooms] default_capacity (16).
    let d = create_ok(api, json!({}));
    assert_eq!(d["capacity"].as_u64(), Some(16), "{d}");
    assert_ne!(room_id(&d), id, "room ids are unique");
    let token2 = d["join_token"].as_str().unwrap_or_else(|| panic!("no join_token in {d}"));
    let payload2 = check_token(token2, &room_id(&d), &sid(&s));
    assert_ne!(payload["nonce"], payload2["nonce"], "every token has its own nonce");
    // `geo` is an alias of `region`.
    let g = create_ok(api, json!({"geo": "eu", "capacity": 2}));
    assert_eq!(g["region"], "eu", "{g}");
    assert_eq!(g["capacity"].as_u64(), Some(2), "{g}");

    // GET: the same fields plus players (none reported yet).
    let (status, got) = get_room(api, &id);
    assert_eq!(status, 200, "GET /api/v1/rooms/{id}: {got}");
    for key in ["room_id", "server_id", "address", "capacity", "mode", "region", "metadata", "created_at_ms"] {
        assert_eq!(got[key], v[key], "GET and POST differ on {key}: {got} vs {v}");
    }
    assert_eq!(got["players"].as_u64(), Some(0), "{got}");
    assert!(got.get("migrated_from").is_none_or(Value::is_null), "never migrated: {got}");
    let t = got["join_token"].as_str().unwrap_or_else(|| panic!("GET has no join_token: {got}"));
    check_token(t, &id, &sid(&s));
}

/// The listing is in creation order, also for rooms created within the
/// same millisecond, and pages join up without gaps or repeats.
fn case_listing_keeps_creation_order(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let _s = game_server(api, "s1", 0, 1000, json!({}));
    let created: Vec<String> = (0..20).map(|_| room_id(&create_ok(api, json!({"capacity": 1})))).collect();
    let all = list_page(api, "?offset=0&limit=50");
    assert_eq!(ids_of(&all), created, "creation order");
    assert_eq!(all["total"].as_u64(), Some(20), "{all}");
    let mut paged = Vec::new();
    for offset in (0..20).step_by(7) {
        let page = list_page(api, &format!("?offset={offset}&limit=7"));
        assert_eq!(page["offset"].as_u64(), Some(offset as u64), "{page}");
        assert_eq!(page["limit"].as_u64(), Some(7), "{page}");
        assert_eq!(page["total"].as_u64(), Some(20), "{page}");
        paged.extend(ids_of(&page));
    }
    assert_eq!(paged, created, "pages of 7 in creation order");
    let past = list_page(api, "?offset=40&limit=7");
    assert_eq!(ids_of(&past), Vec::<String>::new(), "{past}");
    assert_eq!(past["total"].as_u64(), Some(20), "{past}");
}

/// 503 `no_server` without servers, 404 for unknown rooms, the listing
/// (creation order, offset/limit/total), DELETE (404 the second time) and
/// the slots a deleted room frees.
fn case_get_list_and_delete(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    create_refused(api, json!({"capacity": 2}), "no_server");
    let (status, v) = get_room(api, "no-such-room");
    assert_eq!(status, 404, "{v}");
    let page = list_page(api, "");
    assert_eq!(page["total"].as_u64(), Some(0), "{page}");

    // 9 slots: rooms of 2, 3 and 4 fill it.
    let s = game_server(api, "s1", 0, 9, json!({}));
    let r1 = room_id(&create_ok(api, json!({"capacity": 2, "mode": "one"})));
    let r2 = room_id(&create_ok(api, json!({"capacity": 3, "mode": "two"})));
    let r3 = room_id(&create_ok(api, json!({"capacity": 4, "mode": "three"})));
    create_refused(api, json!({"capacity": 1}), "full");

    let first = list_page(api, "?offset=0&limit=2");
    assert_eq!(ids_of(&first), vec![r1.clone(), r2.clone()], "{first}");
    assert_eq!(first["total"].as_u64(), Some(3), "{first}");
    assert_eq!(first["offset"].as_u64(), Some(0), "{first}");
    assert_eq!(first["limit"].as_u64(), Some(2), "{first}");
    let second = list_page(api, "?offset=2&limit=2");
    assert_eq!(ids_of(&second), vec![r3.clone()], "{second}");
    assert_eq!(second["total"].as_u64(), Some(3), "{second}");
    assert_eq!(second["offset"].as_u64(), Some(2), "{second}");
    let all = list_page(api, "");
    assert_eq!(ids_of(&all), vec![r1.clone(), r2.clone(), r3.clone()], "{all}");
    assert_eq!(all["offset"].as_u64(), Some(0), "defaults: {all}");
    // The default page size is not part of the contract; it holds these 3.
    assert!(all["limit"].as_u64().is_some_and(|l| l >= 3), "defaults: {all}");
    let rooms = all["rooms"].as_array().unwrap();
    assert!(rooms.iter().all(|r| r["server_id"].as_str() == Some(sid(&s).as_str())), "{all}");
    let caps: Vec<u64> = rooms.iter().filter_map(|r| r["capacity"].as_u64()).collect();
    assert_eq!(caps, vec![2, 3, 4], "{all}");
    assert_eq!(rooms[1]["mode"], "two", "{all}");

    assert_eq!(delete_room(api, &r2), 200);
    let (status, v) = get_room(api, &r2);
    assert_eq!(status, 404, "deleted: {v}");
    assert_eq!(delete_room(api, &r2), 404, "deleting twice");
    assert_eq!(delete_room(api, "no-such-room"), 404);
    let all = list_page(api, "");
    assert_eq!(ids_of(&all), vec![r1.clone(), r3.clone()], "{all}");
    assert_eq!(all["total"].as_u64(), Some(2), "{all}");
    // The 3 slots are free again, and only those.
    let again = create_ok(api, json!({"capacity": 3}));
    assert_eq!(server_of(&again), sid(&s));
    create_refused(api, json!({"capacity": 1}), "full");
    assert_eq!(get_room(api, &r1).0, 200);
}

/// Two servers of 64 slots, rooms of 16: placement alternates (least
/// loaded; ties to fewer rooms, then the smaller id), 4 rooms each, the 9th
/// is refused (`full`) and no server ever holds more than its capacity.
fn case_least_loaded_placement_never_overfills(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let s1 = game_server(api, "s1", 0, 64, json!({}));
    let s2 = game_server(api, "s2", 1, 64, json!({}));
    let (lo, hi) = if sid(&s1) < sid(&s2) { (sid(&s1), sid(&s2)) } else { (sid(&s2), sid(&s1)) };
    let mut placed = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let v = create_ok(api, json!({"capacity": 16}));
        placed.push(server_of(&v));
        ids.push(room_id(&v));
    }
    let expected: Vec<String> = (0..8).map(|i| if i % 2 == 0 { lo.clone() } else { hi.clone() }).collect();
    assert_eq!(placed, expected, "least loaded first; ties to fewer rooms, then to the smaller server id ({lo} < {hi})");
    create_refused(api, json!({"capacity": 16}), "full");
    create_refused(api, json!({"capacity": 1}), "full");
    // A room bigger than any server can never be placed.
    create_refused(api, json!({"capacity": 65}), "full");
    let by = reserved_by_server(&list_all(api));
    assert_eq!(by.get(&lo), Some(&(4, 64)), "{by:?}");
    assert_eq!(by.get(&hi), Some(&(4, 64)), "{by:?}");

    // Free 16 slots on `lo`: 17 do not fit anywhere, 16 go to `lo`.
    let on_lo = ids[0].clone();
    assert_eq!(delete_room(api, &on_lo), 200);
    create_refused(api, json!({"capacity": 17}), "full");
    let v = create_ok(api, json!({"capacity": 16}));
    assert_eq!(server_of(&v), lo, "{v}");
    create_refused(api, json!({"capacity": 1}), "full");
    let by = reserved_by_server(&list_all(api));
    assert!(by.values().all(|(_, slots)| *slots <= 64), "{by:?}");
}

/// Load is max(reserved slots, reported players) / capacity: a server
/// reporting 60 of 100 players gets rooms only once the other one is more
/// loaded than that.
fn case_reported_players_count_as_load(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let busy = game_server(api, "busy", 0, 100, json!({}));
    let idle = game_server(api, "idle", 1, 100, json!({}));
    busy.set_reported_players(Some(60));
    idle.set_reported_players(Some(0));
    busy.heartbeat(api).expect("heartbeat busy");
    idle.heartbeat(api).expect("heartbeat idle");
    let (busy_id, idle_id) = (sid(&busy), sid(&idle));
    let placed: Vec<String> = (0..6).map(|_| server_of(&create_ok(api, json!({"capacity": 16})))).collect();
    // idle: 0, .16, .32, .48 < busy .6; then idle .64 > busy max(16, 60)/100 = .6, and again at max(32, 60).
    let name = |id: &String| {
        if *id == busy_id {
            "busy"
        } else if *id == idle_id {
            "idle"
        } else {
            "?"
        }
    };
    let names: Vec<&str> = placed.iter().map(name).collect();
    assert_eq!(names, vec!["idle", "idle", "idle", "idle", "busy", "busy"], "placement {placed:?}");
}

/// A server whose registration `metadata.region` matches the requested
/// region is preferred while it has room; otherwise least loaded.
fn case_region_is_preferred_while_it_has_room(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let eu = game_server(api, "eu", 0, 32, json!({"region": "eu"}));
    let us = game_server(api, "us", 1, 1000, json!({"region": "us"}));
    let (eu_id, us_id) = (sid(&eu), sid(&us));

    // Both empty: the region decides, whatever the ids.
    let v = create_ok(api, json!({"region": "us", "capacity": 16}));
    assert_eq!(server_of(&v), us_id, "{v}");
    assert_eq!(v["region"], "us", "{v}");
    // eu is preferred for "eu" even when it is the more loaded one.
    let v = create_ok(api, json!({"region": "eu", "capacity": 16}));
    assert_eq!(server_of(&v), eu_id, "{v}");
    let v = create_ok(api, json!({"geo": "eu", "capacity": 16}));
    assert_eq!(server_of(&v), eu_id, "eu (32 slots) takes a second room of 16 although us is far less loaded: {v}");
    // eu is full: an "eu" room still gets a server.
    let v = create_ok(api, json!({"region": "eu", "capacity": 16}));
    assert_eq!(server_of(&v), us_id, "{v}");
    let v = create_ok(api, json!({"region": "mars", "capacity": 1}));
    assert_eq!(server_of(&v), us_id, "{v}");
    let by = reserved_by_server(&list_all(api));
    assert_eq!(by.get(&eu_id), Some(&(2, 32)), "{by:?}");
}

/// Malformed bodies are 400 and create nothing; a valid capacity no server
/// can hold is 503 `full`.
fn case_bad_bodies_are_400(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let _s = game_server(api, "s1", 0, 100, json!({}));
    for body in ["{nope", "not json", "{\"capacity\": 0}", "{\"capacity\": \"x\"}", "{\"capacity\": -3}", "{\"capacity\": 2.5}"] {
        let req = format!(
            "POST /api/v1/rooms HTTP/1.1\r\nHost: atlas\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, text) = http_raw(api, &req);
        assert_eq!(status, 400, "body {body:?}: {text}");
    }
    let page = list_page(api, "");
    assert_eq!(page["total"].as_u64(), Some(0), "a 400 creates nothing: {page}");
    create_refused(api, json!({"capacity": 101}), "full");
    let v = create_ok(api, json!({"capacity": 100}));
    assert_eq!(v["capacity"].as_u64(), Some(100), "{v}");
}

/// Heartbeat `rooms` reports: a room reported empty, or no longer reported,
/// for longer than `empty_grace` is removed and its slots freed; a reported
/// room shows its players; a server that never reports keeps its rooms.
fn case_empty_rooms_are_cleaned_up(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let reporter = game_server(api, "reporter", 0, 48, json!({}));
    let silent = game_server(api, "silent", 1, 48, json!({}));
    let (mut on_r, mut on_s) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        let v = create_ok(api, json!({"capacity": 16}));
        if server_of(&v) == sid(&reporter) {
            on_r.push(room_id(&v));
        } else {
            on_s.push(room_id(&v));
        }
    }
    let created = Instant::now();
    assert_eq!((on_r.len(), on_s.len()), (3, 3), "3 rooms of 16 on each 48-slot server");
    create_refused(api, json!({"capacity": 16}), "full");

    // reporter: room 0 empty, room 1 with 3 players, room 2 not reported.
    let set_at = Instant::now();
    reporter.set_room_reports(Some(&[(on_r[0].as_str(), 0), (on_r[1].as_str(), 3)]));
    reporter.heartbeat(api).expect("heartbeat with rooms");
    let (status, v) = get_room(api, &on_r[0]);
    if set_at.elapsed() < Duration::from_millis(500) {
        assert_eq!(status, 200, "an empty room stays for empty_grace (1 s): {v}");
    }
    assert!(
        wait_for(Duration::from_secs(3), || get_room(api, &on_r[1]).1["players"].as_u64() == Some(3)),
        "players as last reported: {}",
        get_room(api, &on_r[1]).1
    );
    // Gone after the grace, not before.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut empty_gone_after = None;
    while Instant::now() < deadline {
        let (st, _) = get_room(api, &on_r[0]);
        if st == 404 {
            empty_gone_after = Some(set_at.elapsed());
            break;
        }
        assert_eq!(st, 200);
        thread::sleep(Duration::from_millis(50));
    }
    let after = empty_gone_after.unwrap_or_else(|| panic!("the room reported empty is still there 6 s later: {}", get_room(api, &on_r[0]).1));
    eprintln!("the empty room was removed {after:?} after the first report");
    assert!(after >= Duration::from_millis(900), "removed {after:?} after being reported empty: before empty_grace (1 s)");
    assert!(
        wait_for(Duration::from_secs(3), || get_room(api, &on_r[2]).0 == 404),
        "the room its server stopped reporting is still there: {}",
        get_room(api, &on_r[2]).1
    );
    let (status, v) = get_room(api, &on_r[1]);
    assert_eq!(status, 200, "a room with players stays: {v}");
    assert_eq!(v["players"].as_u64(), Some(3), "{v}");

    // The silent server never sent `rooms`: its rooms stay, well past the grace.
    let quiet_for = Duration::from_millis(2500);
    if let Some(left) = quiet_for.checked_sub(created.elapsed()) {
        thread::sleep(left);
    }
    for id in &on_s {
        let (status, v) = get_room(api, id);
        assert_eq!(status, 200, "a server that never reports rooms keeps them: {v}");
        assert_eq!(server_of(&v), sid(&silent), "{v}");
    }
    // The two removed rooms freed 32 slots on reporter.
    for _ in 0..2 {
        let v = create_ok(api, json!({"capacity": 16}));
        assert_eq!(server_of(&v), sid(&reporter), "{v}");
    }
    create_refused(api, json!({"capacity": 16}), "full");
}

/// A WebSocket upgrade to `/rooms/{id}` is proxied to the room's server
/// with the room id, a valid join token and the player id; messages flow
/// both ways; far positions do not move the player; unknown rooms are 404.
fn case_join_through_atlas(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let s1 = game_server(api, "s1", 0, 100, json!({}));
    let s2 = game_server(api, "s2", 5, 100, json!({}));
    let v = create_ok(api, json!({"capacity": 4, "mode": "duel"}));
    let id = room_id(&v);
    let (home, other, other_slot) = if server_of(&v) == sid(&s1) { (&s1, &s2, 5) } else { (&s2, &s1, 0) };

    let mut c = join(atlas.addr(), &id, "alice");
    assert!(wait_for(Duration::from_secs(3), || room_conn(home, &id).is_some()), "the room's server saw no connection: {:?}", home.connections());
    let conn = room_conn(home, &id).unwrap();
    assert_eq!(conn.header("x-atlas-player-id"), Some("alice"), "{:?}", conn.headers);
    let token = conn.header("x-atlas-join-token").unwrap_or_else(|| panic!("no X-Atlas-Join-Token: {:?}", conn.headers));
    let payload = check_token(token, &id, &sid(home));
    assert!(payload["expires_at_ms"].as_u64().unwrap() > now_ms(), "the token is not expired: {payload}");

    // Both ways.
    assert_eq!(acked_by(&mut c, 1), home.name());
    assert_eq!(home.push_all(r#"{"type":"state","tick":7}"#), 1);
    let pushed = c.recv_json().expect("the server's message");
    assert_eq!(pushed, json!({"type": "state", "tick": 7}));
    // Positions in another server's region do not move a room session.
    for seq in 2..=6u64 {
        c.send_text(&move_msg(seq, center_x(other_slot), 500.0, 500.0));
        let ack = ack_of(&mut c, seq);
        assert_eq!(ack["server"].as_str(), Some(home.name()), "{ack}");
    }
    thread::sleep(Duration::from_millis(300));
    assert!(other.connections().is_empty(), "the other server got a connection: {:?}", other.connections());
    assert!(home.wait_received(6, Duration::from_secs(2)), "{:?}", home.received());

    // Unknown rooms.
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &upgrade_request("/rooms/no-such-room"));
    assert_eq!(status, 404, "{head}");
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &upgrade_request("/rooms/no-such-room?player_id=bob"));
    assert_eq!(status, 404, "{head}");
    // A deleted room is unknown too.
    let gone = room_id(&create_ok(api, json!({"capacity": 2})));
    assert_eq!(delete_room(api, &gone), 200);
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &upgrade_request(&format!("/rooms/{gone}")));
    assert_eq!(status, 404, "{head}");
    // The first player is still connected.
    assert_eq!(acked_by(&mut c, 7), home.name());
}

/// Kills (`kill: true`) or unregisters the server of a room with a player in
/// it: the room moves to the other server (GET shows it with
/// `migrated_from`), that server's next heartbeat answer has a
/// `RoomMigrated` command, and the player's connection through Atlas stays
/// open, its next messages acked by the new server.
fn migration(b: Backend, kill: bool) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let s1 = game_server(api, "s1", 0, 100, json!({}));
    let s2 = game_server(api, "s2", 1, 100, json!({}));
    let v = create_ok(api, json!({"capacity": 4}));
    let id = room_id(&v);
    let (home, spare) = if server_of(&v) == sid(&s1) { (&s1, &s2) } else { (&s2, &s1) };
    let (home_id, spare_id) = (sid(home), sid(spare));
    let mut c = join(atlas.addr(), &id, "bob");
    assert_eq!(acked_by(&mut c, 1), home.name());
    // Let the gateway settle (its background work runs a few times a
    // second) before the server goes: the test is about an established room.
    thread::sleep(Duration::from_millis(600));

    let t0 = Instant::now();
    if kill {
        home.kill();
    } else {
        home.stop_heartbeats();
        assert_eq!(home.unregister(api), Ok(200), "DELETE /api/v1/servers/{home_id}");
    }
    let moved = wait_for(Duration::from_secs(8), || {
        let (st, v) = get_room(api, &id);
        st == 200 && v["server_id"].as_str() == Some(spare_id.as_str()) && v["migrated_from"].as_str() == Some(home_id.as_str())
    });
    let (st, now) = get_room(api, &id);
    assert!(moved, "the room did not move from {home_id} to {spare_id} within 8 s: {st} {now}; servers listed: {:?}", server_ids(api));
    eprintln!("migrated {:?} after the server {}", t0.elapsed(), if kill { "died" } else { "was unregistered" });
    assert_eq!(now["address"].as_str(), Some(address_of(spare).as_str()), "{now}");
    assert_eq!(now["capacity"].as_u64(), Some(4), "{now}");

    let migrated_cmd = |cmds: &[Value]| {
        cmds.iter().any(|c| c["type"] == "RoomMigrated" && c["room_id"].as_str() == Some(id.as_str()) && c["from_server"].as_str() == Some(home_id.as_str()))
    };
    assert!(wait_for(Duration::from_secs(3), || migrated_cmd(&spare.commands())), "no RoomMigrated for {id} in {:?}", spare.commands());
    assert!(!migrated_cmd(&home.commands()), "the old server got the RoomMigrated: {:?}", home.commands());

    // The player was moved: same connection, every message acked (none
    // lost), by the new server from now on. An unregistered server is still
    // alive, so a message sent in the moment between the room's move and the
    // session's switch may still be answered by it; never after the switch.
    let mut who = Vec::new();
    let mut seq = 1u64;
    let switch_by = Instant::now() + Duration::from_secs(3);
    while who.last().map(String::as_str) != Some(spare.name()) {
        assert!(Instant::now() < switch_by, "the player was not moved to {} within 3 s of the migration: acks from {who:?}", spare.name());
        seq += 1;
        who.push(acked_by(&mut c, seq));
        if who.last().map(String::as_str) != Some(spare.name()) {
            assert!(!kill, "seq {seq} acked by {:?} after its server was killed", who.last());
            thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("acks after the migration: {who:?}");
    for _ in 0..4 {
        seq += 1;
        assert_eq!(acked_by(&mut c, seq), spare.name(), "seq {seq}, after the switch (acks before: {who:?})");
    }
    let conn = room_conn(spare, &id).unwrap_or_else(|| panic!("the new server saw no connection for the room: {:?}", spare.connections()));
    assert_eq!(conn.header("x-atlas-player-id"), Some("bob"), "{:?}", conn.headers);
    let token = conn.header("x-atlas-join-token").unwrap_or_else(|| panic!("no join token: {:?}", conn.headers));
    check_token(token, &id, &spare_id);
    // And new joins go to the new server.
    let mut c2 = join(atlas.addr(), &id, "carol");
    assert_eq!(acked_by(&mut c2, 1), spare.name());
}

fn case_dead_server_rooms_migrate_with_their_players(b: Backend) {
    migration(b, true);
}

fn case_unregistered_server_rooms_migrate_with_their_players(b: Backend) {
    migration(b, false);
}

/// A dead server's room that no other server can take is gone: GET and
/// joins answer 410; rooms elsewhere are untouched.
fn case_lost_rooms_are_410(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let big = game_server(api, "big", 0, 100, json!({}));
    let small = game_server(api, "small", 1, 8, json!({}));
    let lost = create_ok(api, json!({"capacity": 16}));
    assert_eq!(server_of(&lost), sid(&big), "only big holds 16: {lost}");
    let kept = create_ok(api, json!({"capacity": 4}));
    assert_eq!(server_of(&kept), sid(&small), "least loaded: {kept}");
    let (lost, kept) = (room_id(&lost), room_id(&kept));
    big.kill();
    assert!(
        wait_for(Duration::from_secs(8), || get_room(api, &lost).0 == 410),
        "a room no server could take is 410 once its server is down: {:?}",
        get_room(api, &lost)
    );
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &upgrade_request(&format!("/rooms/{lost}")));
    assert_eq!(status, 410, "{head}");
    let (status, v) = get_room(api, &kept);
    assert_eq!(status, 200, "{v}");
    assert_eq!(server_of(&v), sid(&small), "{v}");
    assert_eq!(get_room(api, "no-such-room").0, 404);
}

/// `create_rate = 2`: a burst of 2, then 429 until tokens come back.
fn case_create_rate_limit(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, "empty_grace = \"30s\"\ncreate_rate = 2\njoin_rate = 0\n");
    let api = api(&atlas);
    let _s = game_server(api, "s1", 0, 1000, json!({}));
    let statuses: Vec<u16> = (0..6).map(|_| create(api, json!({"capacity": 1})).0).collect();
    eprintln!("create statuses: {statuses:?}");
    assert_eq!(&statuses[..2], &[201, 201], "the burst: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 429), "{statuses:?}");
    assert!(statuses[2..].iter().filter(|s| **s == 429).count() >= 3, "over 2 per second: {statuses:?}");
    // Reads are not creates.
    assert_eq!(list_page(api, "")["total"].as_u64(), Some(statuses.iter().filter(|s| **s == 201).count() as u64));
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(create(api, json!({"capacity": 1})).0, 201, "a second later the bucket has refilled");
}

/// `join_rate = 2`: a burst of 2 joins per IP, then 429.
fn case_join_rate_limit(b: Backend) {
    let store = Store::new(b);
    let atlas = start(&store, "empty_grace = \"30s\"\ncreate_rate = 0\njoin_rate = 2\n");
    let api = api(&atlas);
    let _s = game_server(api, "s1", 0, 1000, json!({}));
    let id = room_id(&create_ok(api, json!({"capacity": 100})));
    let path = format!("/rooms/{id}");
    let statuses: Vec<u16> = (0..6).map(|_| WsClient::raw_handshake(atlas.addr(), &upgrade_request(&path)).0).collect();
    eprintln!("join statuses: {statuses:?}");
    assert_eq!(&statuses[..2], &[101, 101], "the burst: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 101 || *s == 429), "{statuses:?}");
    assert!(statuses[2..].iter().filter(|s| **s == 429).count() >= 3, "over 2 per second: {statuses:?}");
    thread::sleep(Duration::from_millis(1100));
    let (status, head) = WsClient::raw_handshake(atlas.addr(), &upgrade_request(&path));
    assert_eq!(status, 101, "a second later the bucket has refilled: {head}");
}

/// `mod memory { #[test] fn case() { super::case(Backend::Memory) } }` and
/// the same in `mod redis`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $case() { super::$case(super::Backend::Memory) } )*
        }
        mod redis {
            $( #[test] fn $case() { super::$case(super::Backend::Redis) } )*
        }
    };
}

on_both_backends!(
    case_create_returns_the_room_and_a_signed_join_token,
    case_get_list_and_delete,
    case_listing_keeps_creation_order,
    case_least_loaded_placement_never_overfills,
    case_reported_players_count_as_load,
    case_region_is_preferred_while_it_has_room,
    case_bad_bodies_are_400,
    case_empty_rooms_are_cleaned_up,
    case_join_through_atlas,
    case_dead_server_rooms_migrate_with_their_players,
    case_unregistered_server_rooms_migrate_with_their_players,
    case_lost_rooms_are_410,
    case_create_rate_limit,
    case_join_rate_limit,
);

// ---------------------------------------------------------------------------
// Config errors
// ---------------------------------------------------------------------------

/// `atlas --check` (and a plain start) on a config with `store`:
/// (exit code, stdout, stderr).
fn run_with_store(args: &[&str], store: &str) -> (Option<i32>, String, String) {
    let path = common::write_config(&config_with(store, DEFAULT_ROOMS));
    let p = path.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.push(&p);
    let r = common::run_cli(&all, &[]);
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn bad_store_backend_or_url_is_a_config_error() {
    for (store, key) in [
        ("[store]\nbackend = \"mongo\"\n", "store.backend"),
        ("[store]\nbackend = \"redis\"\nurl = \"http://127.0.0.1:6379/0\"\n", "store.url"),
        ("[store]\nbackend = \"redis\"\nurl = \"127.0.0.1:6379\"\n", "store.url"),
    ] {
        let (code, out, err) = run_with_store(&["--check"], store);
        assert!(code.is_some_and(|c| c != 0), "--check with {store:?}: exit {code:?}: {out}{err}");
        assert!(err.contains(key), "--check with {store:?} must name {key}: {err}");
        let (code, out, err) = run_with_store(&[], store);
        assert!(code.is_some_and(|c| c != 0), "start with {store:?}: exit {code:?}: {out}{err}");
        assert!(err.contains(key), "start with {store:?} must name {key}: {err}");
    }
    let (code, out, err) = run_with_store(&["--check"], "[store]\nbackend = \"memory\"\n");
    assert_eq!(code, Some(0), "{out}{err}");
}

/// No server can take the room: with `auto_scale`, Maestro is asked for
/// one (once within the cooldown); without it, nobody is asked.
#[test]
fn full_fleet_asks_maestro_for_a_server_when_auto_scale_is_on() {
    for auto in [true, false] {
        let (maestro, log) = game::fake_maestro();
        let spatial = format!("auto_scale = {auto}\nmaestro_url = \"http://{maestro}\"\nscale_cooldown = \"60s\"\n");
        let cfg = config_with("[store]\nbackend = \"memory\"\n", DEFAULT_ROOMS).replace("[spatial]\n", &format!("[spatial]\n{spatial}"));
        let atlas = Atlas::start(&cfg);
        let api = api(&atlas);
        create_refused(api, json!({"capacity": 4}), "no_server");
        let _s = game_server(api, "small", 0, 4, json!({}));
        create_ok(api, json!({"capacity": 4}));
        create_refused(api, json!({"capacity": 4}), "full");
        create_refused(api, json!({"capacity": 4}), "full");
        if auto {
            assert!(wait_for(Duration::from_secs(3), || !log.lock().unwrap().is_empty()), "Maestro was not asked; logs:\n{}", atlas.logs());
            thread::sleep(Duration::from_millis(500));
            let reqs = log.lock().unwrap().clone();
            assert_eq!(reqs.len(), 1, "one request within the cooldown: {reqs:?}");
            assert_eq!((reqs[0].0.as_str(), reqs[0].1.as_str()), ("POST", "/instances"), "{reqs:?}");
        } else {
            thread::sleep(Duration::from_millis(1500));
            assert!(log.lock().unwrap().is_empty(), "auto_scale is off: {:?}", log.lock().unwrap());
        }
    }
}

/// `[store] snapshot` (rooms) and `[spatial] snapshot` (servers): after a
/// restart the room is still there, on the same server, and joinable.
#[test]
fn memory_store_snapshot_keeps_rooms_and_servers_across_a_restart() {
    let rooms_file = common::temp_path("rooms.json");
    let servers_file = common::temp_path("servers.json");
    let store = format!("[store]\nbackend = \"memory\"\nsnapshot = {:?}\n", rooms_file.display().to_string());
    let cfg = config_with(&store, DEFAULT_ROOMS).replace("[spatial]\n", &format!("[spatial]\nsnapshot = {:?}\n", servers_file.display().to_string()));
    let mut first = Atlas::start(&cfg);
    let s = game_server(api(&first), "kept", 0, 100, json!({}));
    s.set_room_reports(None);
    let v = create_ok(api(&first), json!({"capacity": 4, "mode": "duel"}));
    let id = room_id(&v);
    first.expect_exit();
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "Atlas did not stop on SIGTERM");
    drop(first);

    let second = Atlas::start(&cfg);
    let (status, got) = get_room(api(&second), &id);
    assert_eq!(status, 200, "the room did not survive the restart: {got}");
    assert_eq!(server_of(&got), sid(&s), "{got}");
    assert_eq!(got["mode"], "duel", "{got}");
    assert!(server_ids(api(&second)).contains(&sid(&s)), "the server did not survive the restart: {:?}", server_ids(api(&second)));
    // The server heartbeats the new process; a join through it reaches the room.
    s.heartbeat(api(&second)).expect("heartbeat after the restart");
    let mut p = join(second.addr(), &id, "back");
    assert_eq!(acked_by(&mut p, 1), s.name());
    let _ = std::fs::remove_file(&rooms_file);
    let _ = std::fs::remove_file(&servers_file);
}

#[test]
fn room_counters_in_metrics() {
    let store = Store::new(Backend::Memory);
    let atlas = start(&store, DEFAULT_ROOMS);
    let api = api(&atlas);
    let s = game_server(api, "m", 0, 20, json!({}));
    let a = create_ok(api, json!({"capacity": 16}));
    create_refused(api, json!({"capacity": 16}), "full");
    let mut c = join(atlas.addr(), &room_id(&a), "dora");
    assert_eq!(acked_by(&mut c, 1), s.name());
    let (status, _) = WsClient::raw_handshake(atlas.addr(), &upgrade_request("/rooms/nope"));
    assert_eq!(status, 404);
    assert_eq!(delete_room(api, &room_id(&a)), 200);
    assert_eq!(game::metric(api, "atlas_rooms_created_total"), 1.0);
    assert_eq!(game::metric(api, "atlas_rooms_create_refused_total{reason=\"full\"}"), 1.0);
    assert_eq!(game::metric(api, "atlas_rooms_joins_total{result=\"ok\"}"), 1.0);
    assert_eq!(game::metric(api, "atlas_rooms_joins_total{result=\"refused\"}"), 1.0);
    assert_eq!(game::metric(api, "atlas_rooms_removed_total{cause=\"deleted\"}"), 1.0);
    // The server hears that its room closed (in a heartbeat answer; they
    // run every 200 ms in the background).
    assert!(
        game::wait_for(Duration::from_secs(2), || s.commands().iter().any(|c| c["type"] == "RoomClosed" && c["room_id"] == a["room_id"])),
        "{:?}",
        s.commands()
    );
}

// ---------------------------------------------------------------------------
// Fleets: several Atlas processes on one Redis
// ---------------------------------------------------------------------------

mod fleet {
    use super::*;

    /// `n` Atlas processes on `redis` with `prefix`.
    fn fleet(redis: &RedisServer, prefix: &str, n: usize, rooms: &str) -> Vec<Atlas> {
        let cfg = config_with(&redis_section(redis, prefix), rooms);
        (0..n).map(|_| Atlas::start(&cfg)).collect()
    }

    /// The harness itself: a kill -9 and a restart on the same port keep the
    /// data (what the outage test relies on).
    #[test]
    fn redis_harness_keeps_data_across_a_crash() {
        let mut redis = RedisServer::start();
        let key = format!("{}k", unique_prefix());
        assert_eq!(redis.command(&["SET", &key, "v1"]), Ok(redis_server::Resp::Simple("OK".into())));
        let port = redis.port();
        redis.kill();
        assert!(!redis_server::ping(port), "redis still answers after the kill");
        redis.restart();
        assert_eq!(redis.port(), port);
        assert_eq!(redis.command(&["GET", &key]), Ok(redis_server::Resp::Bulk(Some(b"v1".to_vec()))));
        assert_eq!(redis.keys(), vec![key]);
    }

    /// Waits until `api` lists every id in `ids`.
    fn wait_listed(api: SocketAddr, ids: &[String], within: Duration) {
        let ok = wait_for(within, || {
            let listed = server_ids(api);
            ids.iter().all(|id| listed.contains(id))
        });
        assert!(ok, "{api} does not list {ids:?} within {within:?}: it lists {:?}", server_ids(api));
    }

    #[test]
    fn instances_share_servers_and_rooms() {
        let redis = RedisServer::start();
        let prefix = unique_prefix();
        let atlases = fleet(&redis, &prefix, 3, DEFAULT_ROOMS);
        let (a, b, c) = (&atlases[0], &atlases[1], &atlases[2]);
        let s1 = game_server(api(a), "s1", 0, 100, json!({}));
        let s2 = game_server(api(b), "s2", 1, 100, json!({}));
        let ids = vec![sid(&s1), sid(&s2)];
        let t0 = Instant::now();
        for atlas in &atlases {
            wait_listed(api(atlas), &ids, Duration::from_secs(3));
        }
        eprintln!("every instance lists both servers after {:?}", t0.elapsed());
        // The same record everywhere.
        let (status, one) = call(api(c), "GET", &format!("/api/v1/servers/{}", sid(&s1)), None);
        assert_eq!(status, 200, "{one}");
        assert_eq!(one["address"].as_str(), Some(address_of(&s1).as_str()), "{one}");

        // A room created on A: GET on B and C, joined through C.
        let v = create_ok(api(a), json!({"capacity": 4, "mode": "ffa", "metadata": {"k": "v"}}));
        let id = room_id(&v);
        for atlas in [b, c] {
            let (status, got) = get_room(api(atlas), &id);
            assert_eq!(status, 200, "{got}");
            for key in ["server_id", "address", "capacity", "mode", "metadata", "created_at_ms"] {
                assert_eq!(got[key], v[key], "{key}: {got} vs {v}");
            }
        }
        let home = if server_of(&v) == sid(&s1) { &s1 } else { &s2 };
        let mut player = join(c.addr(), &id, "dora");
        assert_eq!(acked_by(&mut player, 1), home.name());
        let conn = room_conn(home, &id).expect("the room's server got the player");
        check_token(conn.header("x-atlas-join-token").expect("join token"), &id, &sid(home));
        assert_eq!(conn.header("x-atlas-player-id"), Some("dora"));

        // A room created on C is listed on A; deleted on B, it is gone on A.
        let id2 = room_id(&create_ok(api(c), json!({"capacity": 2})));
        assert!(
            wait_for(Duration::from_secs(2), || list_all(api(a)).iter().any(|r| r["room_id"].as_str() == Some(id2.as_str()))),
            "A does not list the room created on C"
        );
        assert_eq!(get_room(api(a), &id2).0, 200);
        assert_eq!(delete_room(api(b), &id2), 200);
        assert!(wait_for(Duration::from_secs(2), || get_room(api(a), &id2).0 == 404), "deleted on B, still on A: {:?}", get_room(api(a), &id2));
        assert!(wait_for(Duration::from_secs(2), || get_room(api(c), &id2).0 == 404), "deleted on B, still on C: {:?}", get_room(api(c), &id2));
        assert_eq!(acked_by(&mut player, 2), home.name());

        // Every key Atlas wrote is under its prefix.
        let keys = redis.keys();
        assert!(!keys.is_empty(), "nothing in Redis");
        let stray: Vec<&String> = keys.iter().filter(|k| !k.starts_with(&prefix)).collect();
        assert!(stray.is_empty(), "keys outside the prefix {prefix:?}: {stray:?}");
    }

    /// Commands for a server registered with another instance go through
    /// Redis: a room deleted on B, and one swept for being empty, reach the
    /// server (registered with A) as `RoomClosed` in A's heartbeat answers.
    #[test]
    fn room_closed_reaches_a_server_registered_with_another_instance() {
        let redis = RedisServer::start();
        let prefix = unique_prefix();
        let atlases = fleet(&redis, &prefix, 2, DEFAULT_ROOMS);
        let (a, b) = (api(&atlases[0]), api(&atlases[1]));
        let s = game_server(a, "s1", 0, 100, json!({}));
        wait_listed(b, &[sid(&s)], Duration::from_secs(3));
        let closed = |id: &str, reason: &str| s.commands().iter().any(|c| c["type"] == "RoomClosed" && c["room_id"] == id && c["reason"] == reason);

        let deleted = room_id(&create_ok(b, json!({"capacity": 2})));
        let kept = room_id(&create_ok(b, json!({"capacity": 2})));
        assert_eq!(delete_room(b, &deleted), 200);
        assert!(wait_for(Duration::from_secs(3), || closed(&deleted, "deleted")), "no RoomClosed for the room deleted on B: {:?}", s.commands());

        // Reported empty: swept after empty_grace (1 s) by either instance.
        let empty = room_id(&create_ok(b, json!({"capacity": 2})));
        s.set_room_reports(Some(&[(empty.as_str(), 0), (kept.as_str(), 1)]));
        assert!(wait_for(Duration::from_secs(6), || closed(&empty, "empty")), "no RoomClosed for the swept room: {:?}", s.commands());
        assert_eq!(get_room(b, &empty).0, 404);
        assert_eq!(get_room(a, &kept).0, 200, "the room with a player stays");
        assert!(!s.commands().iter().any(|c| c["room_id"] == kept.as_str()), "a command for the room that stays: {:?}", s.commands());
        // The sweep's index of idle rooms no longer holds it (nor the room
        // with a player).
        let idle = format!("{prefix}idle");
        assert_eq!(redis.command(&["ZCARD", &idle]), Ok(redis_server::Resp::Int(0)), "{:?}", redis.command(&["ZRANGE", &idle, "0", "-1"]));
        // Handed over once: nothing is left waiting in Redis.
        let left: Vec<String> = redis.keys().into_iter().filter(|k| k.contains(":cmd:")).collect();
        assert!(left.is_empty(), "commands left in Redis after delivery: {left:?}");
    }

    /// `url = "redis://:password@host:port/db"` against a server with
    /// `requirepass`; a wrong password is refused (503, Redis's reason in
    /// the log) and Atlas keeps running.
    #[test]
    fn redis_password_in_the_url() {
        let redis = RedisServer::start_with_password("s3cr3t-pw");
        let prefix = unique_prefix();
        let good = Atlas::start(&config_with(&redis_section(&redis, &prefix), DEFAULT_ROOMS));
        let s = game_server(api(&good), "s1", 0, 100, json!({}));
        let v = create_ok(api(&good), json!({"capacity": 2}));
        assert_eq!(server_of(&v), sid(&s));
        let keys = redis.keys();
        assert!(keys.iter().any(|k| k == &format!("{prefix}room:{}", room_id(&v))), "the room is not in Redis: {keys:?}");

        let wrong = redis_section(&redis, &prefix).replace(":s3cr3t-pw@", ":wrong@");
        assert!(wrong.contains(":wrong@"), "{wrong}");
        let mut bad = Atlas::start(&config_with(&wrong, DEFAULT_ROOMS));
        let (status, body) = create(api(&bad), json!({"capacity": 2}));
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["reason"].as_str(), Some("store_unavailable"), "{body}");
        assert_eq!(get_room(api(&bad), &room_id(&v)).0, 503, "an unknown room without the store is 503, not 404");
        assert!(
            wait_for(Duration::from_secs(3), || bad.logs().contains("AuthenticationFailed")),
            "the log does not say the password was refused:\n{}",
            bad.logs()
        );
        assert!(!bad.logs().contains("wrong@"), "the password is in the log:\n{}", bad.logs());
        assert!(bad.is_running());
    }

    /// An instance killed with -9 leaves nothing that routes: its servers'
    /// records expire with their lease (1 s here), the others stop listing
    /// them and move their rooms; the server registers with a live
    /// instance and is routable again.
    #[test]
    fn a_dead_instance_leaves_no_stale_servers() {
        let redis = RedisServer::start();
        let cfg = config_with(&format!("{}lease = \"1s\"\n", redis_section(&redis, &unique_prefix())), DEFAULT_ROOMS);
        let mut doomed = Atlas::start(&cfg);
        let live = Atlas::start(&cfg);
        let (d, l) = (api(&doomed), api(&live));
        let orphan = game_server(d, "orphan", 0, 100, json!({}));
        let other = game_server(l, "other", 1, 100, json!({}));
        wait_listed(l, &[sid(&orphan), sid(&other)], Duration::from_secs(3));
        // A room on the orphan's server, made through the live instance.
        let mut on_orphan = None;
        for _ in 0..4 {
            let v = create_ok(l, json!({"capacity": 2}));
            if server_of(&v) == sid(&orphan) {
                on_orphan = Some(room_id(&v));
                break;
            }
        }
        let room = on_orphan.expect("least-loaded placement put a room on each server");

        doomed.expect_exit();
        doomed.signal("KILL");
        let killed = Instant::now();
        assert!(doomed.wait_exit(Duration::from_secs(2)).is_some(), "kill -9 did not stop it");
        assert!(
            wait_for(Duration::from_secs(5), || !server_ids(l).contains(&sid(&orphan))),
            "the dead instance's server is still listed {:?} after the kill: {:?}",
            killed.elapsed(),
            server_ids(l)
        );
        let gone_after = killed.elapsed();
        eprintln!("the dead instance's server left the fleet {gone_after:?} after the kill");
        assert!(gone_after >= Duration::from_millis(500), "removed after {gone_after:?}: before its lease could run out");
        assert!(wait_for(Duration::from_secs(3), || server_of(&get_room(l, &room).1) == sid(&other)), "its room did not move: {}", get_room(l, &room).1);
        // Registered again, through the live instance: routable again.
        orphan.register_with_metadata(l, (0, 0, 0), (500.0, 500.0, 500.0), 500.0, 100, json!({})).expect("register with the live instance");
        wait_listed(l, &[sid(&orphan)], Duration::from_secs(2));
        let mut p = join(live.addr(), &room, "eve");
        assert_eq!(acked_by(&mut p, 1), other.name());
    }

    #[test]
    fn prefixes_keep_fleets_apart() {
        let redis = RedisServer::start();
        let x = fleet(&redis, &unique_prefix(), 1, DEFAULT_ROOMS).pop().unwrap();
        let y = fleet(&redis, &unique_prefix(), 1, DEFAULT_ROOMS).pop().unwrap();
        let sx = game_server(api(&x), "sx", 0, 100, json!({}));
        let id = room_id(&create_ok(api(&x), json!({"capacity": 2})));
        thread::sleep(Duration::from_millis(1500));
        assert!(!server_ids(api(&y)).contains(&sid(&sx)), "another prefix's server is listed: {:?}", server_ids(api(&y)));
        assert_eq!(get_room(api(&y), &id).0, 404, "another prefix's room is visible");
        create_refused(api(&y), json!({"capacity": 2}), "no_server");
        assert_eq!(get_room(api(&x), &id).0, 200);
    }

    #[test]
    fn concurrent_creates_on_three_instances_never_overfill_a_server() {
        const ROOM: u64 = 4;
        const CREATES: usize = 300;
        const THREADS: usize = 30;
        let redis = RedisServer::start();
        let atlases = fleet(&redis, &unique_prefix(), 3, DEFAULT_ROOMS);
        let apis: Vec<SocketAddr> = atlases.iter().map(api).collect();
        // 50 + 30 + 15 + 7 = 102 rooms of 4 fit (62 and 30 leave slots unused).
        let capacities = [200u32, 120, 62, 30];
        let fits: usize = capacities.iter().map(|c| (*c as u64 / ROOM) as usize).sum();
        let servers: Vec<GameServer> =
            capacities.iter().enumerate().map(|(i, cap)| game_server(apis[i % 3], &format!("s{i}"), i as i64, *cap, json!({}))).collect();
        let ids: Vec<String> = servers.iter().map(sid).collect();
        let capacity_of: HashMap<String, u64> = ids.iter().cloned().zip(capacities.iter().map(|c| *c as u64)).collect();
        for a in &apis {
            wait_listed(*a, &ids, Duration::from_secs(3));
        }

        let t0 = Instant::now();
        let results: Vec<(usize, u16, Value)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let apis = apis.clone();
                    scope.spawn(move || {
                        (0..CREATES / THREADS)
                            .map(|i| {
                                let which = (t + i) % apis.len();
                                let (status, v) = create(apis[which], json!({"capacity": ROOM}));
                                (which, status, v)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("a create thread panicked")).collect()
        });
        eprintln!("{CREATES} creates in {:?}", t0.elapsed());

        let created: Vec<&Value> = results.iter().filter(|(_, s, _)| *s == 201).map(|(_, _, v)| v).collect();
        let mut statuses: HashMap<u16, usize> = HashMap::new();
        let mut reasons: HashMap<String, usize> = HashMap::new();
        for (_, s, v) in &results {
            *statuses.entry(*s).or_default() += 1;
            if *s != 201 {
                *reasons.entry(v["reason"].as_str().unwrap_or("-").to_string()).or_default() += 1;
            }
        }
        eprintln!("statuses {statuses:?}, refusal reasons {reasons:?}");
        let per_instance: Vec<usize> = (0..3).map(|i| results.iter().filter(|(w, s, _)| *w == i && *s == 201).count()).collect();
        eprintln!("201s per instance: {per_instance:?}");
        assert_eq!(created.len(), fits, "exactly as many rooms as fit: statuses {statuses:?}, reasons {reasons:?}");
        assert_eq!(statuses.get(&503).copied().unwrap_or(0), CREATES - fits, "every other create is a 503: {statuses:?}");
        assert_eq!(reasons.get("full").copied().unwrap_or(0), CREATES - fits, "refused because full: {reasons:?}");

        // From the answers: no server over its capacity, unique ids.
        let mut from_answers: HashMap<String, u64> = HashMap::new();
        let mut created_ids = HashSet::new();
        for v in &created {
            assert_eq!(v["capacity"].as_u64(), Some(ROOM), "{v}");
            *from_answers.entry(server_of(v)).or_default() += ROOM;
            assert!(created_ids.insert(room_id(v)), "room id {} given twice", room_id(v));
        }
        for (server, slots) in &from_answers {
            let cap = capacity_of.get(server).unwrap_or_else(|| panic!("a room on unknown server {server}"));
            assert!(slots <= cap, "server {server}: {slots} slots given out of {cap}");
        }
        // From the listing (on each instance): the same rooms, the same bound.
        for a in &apis {
            let listed = list_all(*a);
            let listed_ids: HashSet<String> = listed.iter().map(room_id).collect();
            assert_eq!(listed.len(), fits, "{a} lists {} rooms", listed.len());
            assert_eq!(listed_ids, created_ids, "{a} lists other rooms than the 201s");
            for (server, (_, slots)) in reserved_by_server(&listed) {
                let cap = capacity_of[&server];
                assert!(slots <= cap, "{a}: server {server} holds {slots} slots of {cap}");
            }
        }
    }

    #[test]
    fn a_redis_outage_keeps_cached_rooms_and_refuses_creates_quickly() {
        let mut redis = RedisServer::start();
        let mut atlases = fleet(&redis, &unique_prefix(), 2, DEFAULT_ROOMS);
        let (aa, ab) = (api(&atlases[0]), api(&atlases[1]));
        let s = game_server(aa, "s1", 0, 1000, json!({}));
        wait_listed(ab, &[sid(&s)], Duration::from_secs(3));
        let v = create_ok(aa, json!({"capacity": 4}));
        let id = room_id(&v);
        // Both instances have seen it.
        assert_eq!(get_room(aa, &id).0, 200);
        assert_eq!(get_room(ab, &id).0, 200);

        redis.kill();
        eprintln!("redis killed");
        let outage = Instant::now();
        while outage.elapsed() < Duration::from_millis(2500) {
            for (name, api) in [("A", aa), ("B", ab)] {
                let t = Instant::now();
                let (status, got) = get_room(api, &id);
                eprintln!("{name}: GET during the outage: {status} in {:?}", t.elapsed());
                assert_eq!(status, 200, "{name}: a room it has seen is served from its cache while Redis is down: {got}");
                assert_eq!(server_of(&got), server_of(&v), "{got}");
                let t = Instant::now();
                let (status, body) = create(api, json!({"capacity": 4}));
                let took = t.elapsed();
                eprintln!("{name}: POST during the outage: {status} in {took:?}: {body}");
                assert_eq!(status, 503, "{name}: no create without the store: {body}");
                assert_eq!(body["reason"].as_str(), Some("store_unavailable"), "{body}");
                assert!(took < Duration::from_secs(2), "{name}: the 503 took {took:?}");
            }
            thread::sleep(Duration::from_millis(200));
        }
        for (i, atlas) in atlases.iter_mut().enumerate() {
            assert!(atlas.is_running(), "Atlas #{i} exited while Redis was down");
        }

        redis.restart();
        let back = Instant::now();
        eprintln!("redis restarted");
        let mut created = None;
        while back.elapsed() < Duration::from_secs(10) {
            let (status, body) = create(aa, json!({"capacity": 4}));
            if status == 201 {
                created = Some(body);
                break;
            }
            thread::sleep(Duration::from_millis(250));
        }
        let created = created.unwrap_or_else(|| panic!("A: creates still fail 10 s after Redis came back: {:?}", create(aa, json!({"capacity": 4}))));
        eprintln!("A creates again {:?} after the restart", back.elapsed());
        assert!(
            wait_for(Duration::from_secs(10), || create(ab, json!({"capacity": 4})).0 == 201),
            "B: creates still fail after Redis came back: {:?}",
            create(ab, json!({"capacity": 4}))
        );
        eprintln!("B creates again {:?} after the restart", back.elapsed());
        // Nothing was lost, and the instances agree again.
        assert_eq!(get_room(ab, &room_id(&created)).0, 200, "the room created on A after the outage, on B");
        assert_eq!(get_room(ab, &id).0, 200, "the room from before the outage");
        for (i, atlas) in atlases.iter_mut().enumerate() {
            assert!(atlas.is_running(), "Atlas #{i} exited");
        }
    }
}
