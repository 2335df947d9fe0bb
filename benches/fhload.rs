//! Firehose load tool for `scripts/bench-firehose`, built as
//! `cargo build --release -p atlas --example fhload`.
//!
//!   fhload master LISTEN            echo master: every 0x00 packet goes back
//!                                   to the same client id (one thread per link)
//!   fhload direct LISTEN            echo server for raw frames (the baseline:
//!                                   clients connect to it instead of Atlas)
//!   fhload clients TARGET N SECS SIZE WINDOW THREADS [direct] [RATE]
//!                                   N clients (handshake unless `direct`),
//!                                   each keeping WINDOW frames of SIZE bytes in
//!                                   flight; prints round trips/s and RTT p50/p99.
//!                                   RATE (round trips/s in all): paced sweeps
//!                                   instead of as fast as possible (latency at
//!                                   a given load rather than at saturation)
//!   fhload idle TARGET N HOLD_SECS  N clients through the handshake, then idle
//!
//! Blocking sockets; a client thread drives N/THREADS clients in turn.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use k256::elliptic_curve::sec1::ToEncodedPoint;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let mut p = vec![0u8; u32::from_le_bytes(h) as usize];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// New-client handshake (spec §3.1): version, keys, id.
fn handshake(s: &mut TcpStream) -> std::io::Result<u64> {
    s.write_all(&frame(&[0x01, 0x02]))?;
    let pk = read_frame(s)?;
    if pk.first() != Some(&0x02) {
        return Err(std::io::Error::other(format!("expected PubKey, got {pk:?}")));
    }
    let secret = k256::SecretKey::random(&mut chacha20poly1305::aead::OsRng);
    let mut msg = vec![0x02, 33];
    msg.extend_from_slice(secret.public_key().to_encoded_point(true).as_bytes());
    s.write_all(&frame(&msg))?;
    let id = read_frame(s)?;
    match id.as_slice() {
        [0x03, b] if *b < 251 => Ok(u64::from(*b)),
        [0x03, 0xFB, a, b] => Ok(u64::from(u16::from_le_bytes([*a, *b]))),
        [0x03, 0xFC, rest @ ..] if rest.len() == 4 => Ok(u64::from(u32::from_le_bytes(rest.try_into().unwrap()))),
        [0x03, 0xFD, rest @ ..] if rest.len() == 8 => Ok(u64::from_le_bytes(rest.try_into().unwrap())),
        _ => Err(std::io::Error::other(format!("expected ClientId, got {id:?}"))),
    }
}

/// Accepts on `listen` for ever; each connection gets a thread running
/// `serve(reader, writer)` (TCP_NODELAY on).
fn serve_each(listen: &str, serve: fn(TcpStream, TcpStream)) {
    let l = TcpListener::bind(listen).expect("bind");
    for s in l.incoming().flatten() {
        let _ = s.set_nodelay(true);
        let r = s.try_clone().expect("clone");
        std::thread::spawn(move || serve(r, s));
    }
}

/// Echo master: tagged packets back as they came (data only).
fn master(listen: &str) {
    serve_each(listen, |mut r, mut w| {
        let mut buf = vec![0u8; 1 << 20];
        let (mut start, mut end) = (0usize, 0usize);
        let mut out = Vec::with_capacity(1 << 20);
        loop {
            if start == end {
                start = 0;
                end = 0;
            } else if end == buf.len() {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            match r.read(&mut buf[end..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => end += n,
            }
            out.clear();
            while end - start >= 4 {
                let n = u32::from_le_bytes(buf[start..start + 4].try_into().unwrap()) as usize;
                if end - start < 4 + n {
                    break;
                }
                if n >= 9 && buf[start + 12] == 0 {
                    out.extend_from_slice(&buf[start..start + 4 + n]);
                }
                start += 4 + n;
            }
            if !out.is_empty() && w.write_all(&out).is_err() {
                return;
            }
        }
    });
}

/// Raw-frame echo server (thread per connection).
fn direct(listen: &str) {
    serve_each(listen, |mut r, mut w| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if w.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Log-spaced RTT histogram: bucket i holds [2^(i/8) µs, 2^((i+1)/8) µs).
struct Hist(Vec<u64>);

impl Hist {
    fn add(&mut self, us: f64) {
        let i = ((us.max(1.0).log2() * 8.0) as usize).min(self.0.len() - 1);
        self.0[i] += 1;
    }
    fn pct(&self, q: f64) -> f64 {
        let total: u64 = self.0.iter().sum();
        let mut seen = 0;
        for (i, n) in self.0.iter().enumerate() {
            seen += n;
            if seen as f64 >= q * total as f64 {
                return 2f64.powf((i as f64 + 0.5) / 8.0);
            }
        }
        0.0
    }
}

fn clients(args: &[String]) {
    let target = args[0].clone();
    let n: usize = args[1].parse().expect("N");
    let secs: f64 = args[2].parse().expect("SECS");
    let size: usize = args[3].parse::<usize>().expect("SIZE").max(16);
    let window: usize = args[4].parse().expect("WINDOW");
    let threads: usize = args[5].parse::<usize>().expect("THREADS").max(1);
    let raw = args.get(6).is_some_and(|a| a == "direct");
    let rate: f64 = args.get(7).and_then(|r| r.parse().ok()).unwrap_or(0.0);
    let epoch = Instant::now();
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let target = target.clone();
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                for _ in 0..per.min(n.saturating_sub(t * per)) {
                    let mut s = TcpStream::connect(&target).expect("connect");
                    let _ = s.set_nodelay(true);
                    if !raw {
                        handshake(&mut s).expect("handshake");
                    }
                    conns.push(s);
                }
                let mut payload = vec![0xABu8; size];
                let send = |s: &mut TcpStream, payload: &mut Vec<u8>| {
                    let ns = epoch.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&ns.to_le_bytes());
                    s.write_all(&frame(payload)).expect("send");
                };
                let mut hist = Hist(vec![0; 256]);
                let mut done = 0u64;
                let start = Instant::now();
                let deadline = start + Duration::from_secs_f64(secs);
                let record = |p: &[u8], hist: &mut Hist| {
                    let sent = u64::from_le_bytes(p[..8].try_into().unwrap());
                    hist.add((epoch.elapsed().as_nanos() as u64).saturating_sub(sent) as f64 / 1000.0);
                };
                if rate > 0.0 {
                    // Paced: every sweep sends one frame per client, then
                    // reads the replies; sweep k starts at k * clients / rate.
                    let every = Duration::from_secs_f64(conns.len().max(1) as f64 * threads as f64 / rate);
                    let mut k = 0u32;
                    while Instant::now() < deadline {
                        if let Some(wait) = (start + every * k).checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        k += 1;
                        for s in conns.iter_mut() {
                            send(s, &mut payload);
                        }
                        for s in conns.iter_mut() {
                            record(&read_frame(s).expect("reply"), &mut hist);
                            done += 1;
                        }
                    }
                } else {
                    for s in conns.iter_mut() {
                        for _ in 0..window {
                            send(s, &mut payload);
                        }
                    }
                    while Instant::now() < deadline {
                        for s in conns.iter_mut() {
                            record(&read_frame(s).expect("reply"), &mut hist);
                            done += 1;
                            send(s, &mut payload);
                        }
                    }
                }
                (done, start.elapsed(), hist)
            })
        })
        .collect();
    let mut total = 0u64;
    let mut took = Duration::ZERO;
    let mut hist = Hist(vec![0; 256]);
    for h in handles {
        let (d, t, hh) = h.join().expect("client thread");
        total += d;
        took = took.max(t);
        for (a, b) in hist.0.iter_mut().zip(hh.0) {
            *a += b;
        }
    }
    println!(
        "round_trips={total} secs={:.3} rate={:.0} p50_us={:.1} p99_us={:.1}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        hist.pct(0.5),
        hist.pct(0.99)
    );
}

fn idle(args: &[String]) {
    let n: usize = args[1].parse().expect("N");
    let hold: u64 = args[2].parse().expect("HOLD_SECS");
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(&args[0]).expect("connect");
        handshake(&mut s).expect("handshake");
        conns.push(s);
    }
    println!("connected={n}");
    std::thread::sleep(Duration::from_secs(hold));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("master") if args.len() >= 2 => master(&args[1]),
        Some("direct") if args.len() >= 2 => direct(&args[1]),
        Some("clients") if args.len() >= 7 => clients(&args[1..]),
        Some("idle") if args.len() >= 4 => idle(&args[1..]),
        _ => {
            eprintln!("usage: fhload master LISTEN | direct LISTEN | clients TARGET N SECS SIZE WINDOW THREADS [direct] | idle TARGET N HOLD_SECS");
            std::process::exit(2);
        }
    }
}
