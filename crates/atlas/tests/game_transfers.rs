//! Game gateway end to end: real WebSocket game servers (tests/support/game.rs)
//! register like Horizon; clients walk across region borders through Atlas.
//! Every client message must reach exactly one server, exactly once and in
//! order, and every reply must come back in order, across transfers.

mod common;
#[path = "support/game.rs"]
mod game;

use std::collections::HashMap;
use std::time::Duration;

use common::Atlas;
use game::{http_json, move_msg, GameServer, WsClient};

/// A game listener and its API on ephemeral ports.
fn config(extra: &str) -> String {
    format!("[listen]\naddress = \"127.0.0.1:0\"\nmode = \"game\"\n\n[api]\naddress = \"127.0.0.1:0\"\n\n[spatial]\nregion_size = 1000.0\n{extra}\n")
}

/// Server `name` for grid cell (x, 0, 0) of 1000-unit regions.
fn region_server(atlas: &Atlas, name: &str, x: i64) -> GameServer {
    let s = GameServer::start(name);
    let c = x as f64 * 1000.0 + 500.0;
    s.register(atlas.api.unwrap(), (x, 0, 0), (c, 500.0, 500.0), 500.0, 1000).expect("register");
    s
}

/// Sends `n` moves from x0 stepping dx, reading each ack; returns the
/// servers that acked, in order.
fn walk(c: &mut WsClient, n: u64, x0: f64, dx: f64) -> Vec<String> {
    let mut who = Vec::new();
    for seq in 1..=n {
        c.send_text(&move_msg(seq, x0 + dx * seq as f64, 500.0, 500.0));
        let v = c.recv_json().unwrap_or_else(|e| panic!("ack {seq}: {e}"));
        assert_eq!(v["seq"].as_u64(), Some(seq), "acks in order: {v}");
        who.push(v["server"].as_str().unwrap_or("").to_string());
    }
    who
}

#[test]
fn walking_across_a_border_moves_the_player_without_losing_a_message() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\"\nhysteresis = 5.0"));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=walker&x=900&y=500&z=500", &[]).expect("connect");
    // 900 -> 1100 in 2-unit steps: the border at 1000 (+5 hysteresis) is crossed once.
    let who = walk(&mut c, 100, 900.0, 2.0);
    assert_eq!(who.first().map(String::as_str), Some("a"));
    assert_eq!(who.last().map(String::as_str), Some("b"), "{who:?}");
    let switches = who.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(switches, 1, "one switch, no flapping: {who:?}");
    // Exactly once, in order, split between the two servers.
    let seqs = |s: &GameServer| -> Vec<u64> {
        s.received().iter().filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.text).ok()?.get("seq")?.as_u64()).collect()
    };
    let (sa, sb) = (seqs(&a), seqs(&b));
    let mut all = sa.clone();
    all.extend(&sb);
    assert_eq!(all, (1..=100).collect::<Vec<_>>(), "a got {sa:?}, b got {sb:?}");
    // The target saw the player id and a transfer token; the source a 1001 close.
    let conn = &b.connections()[0];
    assert_eq!(conn.header("x-atlas-player-id"), Some("walker"));
    assert!(conn.header("x-atlas-transfer-token").is_some_and(|t| t.len() > 40));
    assert!(game::wait_for(Duration::from_secs(3), || a.closes().iter().any(|(_, code)| *code == 1001)), "closes {:?}", a.closes());
    // The API shows the player on b.
    let (status, players) = http_json(atlas.api.unwrap(), "GET", "/api/v1/players", None, &[]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(players["players"][0]["server_id"].as_str(), b.server_id().as_deref(), "{players}");
}

/// Players, servers (one 1000-unit region each along x) and round trips:
/// each round trip crosses every border twice, so the run makes
/// PLAYERS x ROUNDS x 2 x (SERVERS - 1) transfers (20 x 6 x 2 x 5 = 1200).
const PLAYERS: usize = 20;
const SERVERS: i64 = 6;
const ROUNDS: usize = 6;
/// Steps per direction (25 per region).
const STEPS: usize = 25 * SERVERS as usize;

#[test]
fn over_a_thousand_transfers_every_message_exactly_once_in_order() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\"\nhysteresis = 5.0"));
    let servers: Vec<GameServer> = (0..SERVERS).map(|i| region_server(&atlas, &format!("s{i}"), i)).collect();
    let addr = atlas.addr();
    let span = SERVERS as f64 * 1000.0 - 40.0;
    let step = span / (STEPS - 1) as f64;
    let handles: Vec<_> = (0..PLAYERS)
        .map(|p| {
            std::thread::spawn(move || {
                let mut c = WsClient::connect(addr, &format!("/play?player_id=p{p}&x=20&y=500&z=500"), &[]).expect("connect");
                let mut seq = 0u64;
                let mut who = Vec::new();
                for _round in 0..ROUNDS {
                    for dir in [1.0f64, -1.0] {
                        for i in 0..STEPS {
                            seq += 1;
                            let x = if dir > 0.0 { 20.0 + step * i as f64 } else { 20.0 + span - step * i as f64 };
                            c.send_text(&move_msg(seq, x, 500.0, 500.0));
                            // Every reply comes back, in order, from the server the player is on.
                            let v = c.recv_json().unwrap_or_else(|e| panic!("p{p} ack {seq}: {e}"));
                            assert_eq!(v["seq"].as_u64(), Some(seq), "p{p}: {v}");
                            who.push(v["server"].as_str().unwrap_or("").to_string());
                            // A step a millisecond (a region in ~25 ms): a
                            // transfer whose connect is slowed by a busy
                            // machine still lands before the next border,
                            // so every crossing is one switch.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                // The last crossing's switch may land after the walk on a busy
                // machine: keep going until s0 answers.
                for _ in 0..1000 {
                    if who.last().map(String::as_str) == Some("s0") {
                        break;
                    }
                    seq += 1;
                    c.send_text(&move_msg(seq, 20.0, 500.0, 500.0));
                    let v = c.recv_json().unwrap_or_else(|e| panic!("p{p} ack {seq}: {e}"));
                    assert_eq!(v["seq"].as_u64(), Some(seq), "p{p}: {v}");
                    who.push(v["server"].as_str().unwrap_or("").to_string());
                    std::thread::sleep(Duration::from_millis(2));
                }
                (seq, who.windows(2).filter(|w| w[0] != w[1]).count())
            })
        })
        .collect();
    let mut switches = 0;
    let mut sent = HashMap::new();
    for (p, h) in handles.into_iter().enumerate() {
        let (seq, n) = h.join().expect("player thread");
        switches += n;
        sent.insert(format!("p{p}"), seq);
    }
    // Every message exactly once, in order, per player, across all servers.
    let mut per_player: HashMap<String, Vec<u64>> = HashMap::new();
    let mut by_time: Vec<(std::time::Instant, String, u64)> = Vec::new();
    for s in &servers {
        for r in s.received() {
            let seq = serde_json::from_str::<serde_json::Value>(&r.text).ok().and_then(|v| v["seq"].as_u64()).expect("seq");
            by_time.push((r.at, r.player.clone().unwrap_or_default(), seq));
        }
    }
    by_time.sort();
    for (_, p, seq) in by_time {
        per_player.entry(p).or_default().push(seq);
    }
    assert_eq!(per_player.len(), PLAYERS);
    for (p, seqs) in &per_player {
        let total = sent[p];
        assert!(total >= (ROUNDS * 2 * STEPS) as u64);
        assert_eq!(seqs, &(1..=total).collect::<Vec<_>>(), "{p}");
    }
    // Each border crossing moved the player once (no flapping, no misses),
    // and Atlas counted every one as a successful transfer.
    let expected = PLAYERS * ROUNDS * 2 * (SERVERS as usize - 1);
    assert_eq!(switches, expected, "switches seen by the players");
    assert!(expected > 1000);
    assert_eq!(game::metric(atlas.api.unwrap(), "atlas_game_transfers_total{result=\"ok\"}"), expected as f64);
    assert_eq!(game::metric(atlas.api.unwrap(), "atlas_game_transfers_total{result=\"failed\"}"), 0.0);
}

/// After a walk of `sent` messages, keeps sending moves at `x` (2 ms
/// apart, at most 1000) until the server named `to` acks one: the switch
/// runs beside the client's messages, so on a busy machine it may land
/// after the walk. Returns the number of messages sent in all.
fn until_on(c: &mut WsClient, to: &str, mut sent: u64, x: f64) -> u64 {
    for _ in 0..1000 {
        sent += 1;
        c.send_text(&move_msg(sent, x, 500.0, 500.0));
        let v = c.recv_json().unwrap_or_else(|e| panic!("ack {sent}: {e}"));
        assert_eq!(v["seq"].as_u64(), Some(sent), "acks in order: {v}");
        if v["server"] == to {
            return sent;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("never moved to {to}");
}

/// Text messages a server got, parsed.
fn texts(s: &GameServer) -> Vec<serde_json::Value> {
    s.received().iter().filter_map(|r| serde_json::from_str(&r.text).ok()).collect()
}

#[test]
fn transfer_messages_hand_the_player_state_from_the_old_server_to_the_new() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\"\nhysteresis = 5.0\ntransfer_messages = true"));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=handoff&x=900&y=500&z=500", &[]).expect("connect");
    // Every reply the client gets is its ack, in order: the old server's
    // TransferAccepted is Atlas's, never relayed.
    let who = walk(&mut c, 100, 900.0, 2.0);
    assert_eq!(who.windows(2).filter(|w| w[0] != w[1]).count(), 1, "{who:?}");
    let (ta, tb) = (texts(&a), texts(&b));
    // The source's last message is InitiateTransfer, with the token the target got.
    let init = ta.last().expect("a got messages");
    assert_eq!(init["type"], "InitiateTransfer", "a got {ta:?}");
    assert_eq!(init["payload"]["player_id"], "handoff");
    assert_eq!(init["payload"]["target_server"].as_str(), b.server_id().as_deref());
    let token = b.connections()[0].header("x-atlas-transfer-token").expect("token header").to_string();
    assert_eq!(init["payload"]["token"].as_str(), Some(token.as_str()));
    // The target's first message is AcceptTransfer with the source's state.
    let accept = tb.first().expect("b got messages");
    assert_eq!(accept["type"], "AcceptTransfer", "b got {tb:?}");
    assert_eq!(accept["payload"]["token"].as_str(), Some(token.as_str()));
    assert_eq!(accept["payload"]["source_server"].as_str(), a.server_id().as_deref());
    let last_at_a = ta.iter().filter_map(|v| v["seq"].as_u64()).max().expect("a got moves");
    assert_eq!(accept["payload"]["player_state"]["last_seq"].as_u64(), Some(last_at_a), "{accept}");
    assert_eq!(accept["payload"]["player_state"]["server"], "a");
    // Client messages: exactly once, in order, a's before b's.
    let mut seqs: Vec<u64> = ta.iter().filter_map(|v| v["seq"].as_u64()).collect();
    seqs.extend(tb.iter().filter_map(|v| v["seq"].as_u64()));
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
}

#[test]
fn transfer_messages_a_silent_old_server_delays_the_transfer_but_loses_nothing() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\"\nhysteresis = 5.0\ntransfer_messages = true\ntransfer_drain_timeout = \"400ms\""));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    a.set_answer_transfers(false);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=silent&x=990&y=500&z=500", &[]).expect("connect");
    // 990, 1000, ..., 1090: the crossing happens past 1005.
    let started = std::time::Instant::now();
    let who = walk(&mut c, 10, 990.0, 10.0);
    let n = until_on(&mut c, "b", 10, 1090.0);
    let took = started.elapsed();
    assert_eq!(who.first().map(String::as_str), Some("a"));
    // The message after the switch waited for the answer's timeout.
    assert!(took >= Duration::from_millis(350), "walk took {took:?}");
    let tb = texts(&b);
    assert_eq!(tb.first().map(|v| v["type"].clone()), Some("AcceptTransfer".into()), "{tb:?}");
    assert!(tb[0]["payload"]["player_state"].is_null(), "{}", tb[0]);
    let mut seqs: Vec<u64> = texts(&a).iter().filter_map(|v| v["seq"].as_u64()).collect();
    seqs.extend(tb.iter().filter_map(|v| v["seq"].as_u64()));
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    assert!(atlas.logs().contains("no TransferAccepted"), "the timeout is logged");
}

#[test]
fn transfer_messages_a_40_kib_player_state_is_handed_over_whole() {
    let atlas = Atlas::start(&config("predict_horizon = \"0s\"\nhysteresis = 5.0\ntransfer_messages = true"));
    let a = region_server(&atlas, "a", 0);
    let b = region_server(&atlas, "b", 1);
    a.set_state_padding(40 * 1024);
    let mut c = WsClient::connect(atlas.addr(), "/play?player_id=big&x=990&y=500&z=500", &[]).expect("connect");
    walk(&mut c, 10, 990.0, 10.0);
    until_on(&mut c, "b", 10, 1090.0);
    let tb = texts(&b);
    assert_eq!(tb[0]["type"], "AcceptTransfer", "{:?}", tb.first().map(|v| v["type"].clone()));
    assert_eq!(tb[0]["payload"]["player_state"]["pad"].as_str().map(str::len), Some(40 * 1024));
    assert!(!atlas.logs().contains("no TransferAccepted"), "answered in time");
}
