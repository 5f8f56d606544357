//! The load generator: a tiny HTTP/1.1 keep-alive client on std threads, closed loop (each
//! client has one request in flight), and the shapes of the requests it sends.
//!
//! The test harness' `request` opens a connection per request (`Connection: close`), which
//! is right for tests and far too slow for load; this client keeps its connection.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Categories products are spread over.
pub const CATEGORIES: &[&str] = &[
    "Electronics",
    "Books",
    "Home",
    "Garden",
    "Toys",
    "Sports",
    "Beauty",
    "Grocery",
];

pub struct Http {
    addr: SocketAddr,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
    buf: Vec<u8>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            conn: None,
            buf: Vec::with_capacity(1024),
        }
    }

    /// One request; reconnects once if a kept-alive connection turns out closed.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, String)> {
        self.request_keyed(method, path, body, None)
    }

    /// A request with an optional `Idempotency-Key` header.
    pub fn request_keyed(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> io::Result<(u16, String)> {
        self.try_request(method, path, body, key).or_else(|_| {
            self.conn = None;
            self.try_request(method, path, body, key)
        })
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> io::Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.conn = Some((BufReader::new(s.try_clone()?), s));
        }
        let (reader, writer) = self.conn.as_mut().expect("connected");
        self.buf.clear();
        write!(self.buf, "{method} {path} HTTP/1.1\r\nHost: bench\r\n")?;
        if let Some(k) = key {
            write!(self.buf, "Idempotency-Key: {k}\r\n")?;
        }
        match body {
            Some(b) => write!(
                self.buf,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )?,
            None => write!(self.buf, "\r\n")?,
        }
        writer.write_all(&self.buf)?;
        let (status, length, close) = read_head(reader)?;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Status line and headers: (status, Content-Length, Connection: close).
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, usize, bool)> {
    let eof = |what: &str| io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(eof("closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(eof("closed in headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, length, close));
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse().unwrap_or(0);
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked reply"));
        }
    }
}

/// xorshift64*: a dependency-free random number generator for request shapes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone)]
pub struct Product {
    pub id: i64,
    pub price: String,
}

/// Creates `n` products with a large stock over HTTP (prices 1.00 to 500.00).
pub fn create_products(
    addr: SocketAddr,
    n: usize,
    tag: &str,
    category: Option<&str>,
) -> Vec<Product> {
    let mut http = Http::new(addr);
    let mut rng = Rng::new(42);
    (0..n)
        .map(|i| {
            let cents = 100 + rng.below(49_901) as u64;
            let price = format!("{}.{:02}", cents / 100, cents % 100);
            let cat = category.unwrap_or(CATEGORIES[rng.below(CATEGORIES.len())]);
            let body = format!(
                r#"{{"name":"bench-{tag}-{i}","category":"{cat}","price":{price},"stock":1000000000}}"#
            );
            let (status, reply) = http
                .request("POST", "/api/products", Some(&body))
                .expect("creating a product");
            assert_eq!(status, 201, "creating a product: {reply}");
            let v: Value = serde_json::from_str(&reply).unwrap();
            Product {
                id: v["productId"].as_i64().unwrap(),
                price,
            }
        })
        .collect()
}

/// An order of 1 to 3 distinct products, quantity 1 to 3 each, at the catalogue price,
/// from one of `customers` customers.
pub fn order_body(rng: &mut Rng, products: &[Product], customers: usize) -> String {
    let n = (1 + rng.below(3)).min(products.len());
    let mut picked: Vec<usize> = Vec::with_capacity(n);
    while picked.len() < n {
        let k = rng.below(products.len());
        if !picked.contains(&k) {
            picked.push(k);
        }
    }
    let items: Vec<String> = picked
        .iter()
        .map(|&k| {
            format!(
                r#"{{"productId":{},"quantity":{},"price":{}}}"#,
                products[k].id,
                1 + rng.below(3),
                products[k].price
            )
        })
        .collect();
    format!(
        r#"{{"customerId":{},"items":[{}]}}"#,
        1 + rng.below(customers),
        items.join(",")
    )
}

/// How long a load runs.
#[derive(Clone, Copy)]
pub enum Until {
    Time(Duration),
    /// Stop after this many successful requests in total.
    Count(i64),
}

/// Requests per second per client when paced (open loop at a fixed rate); `None` runs
/// closed loop as fast as the service answers.
pub type Pace = Option<f64>;

#[derive(Default)]
pub struct LoadResult {
    pub ok: u64,
    pub other: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Sorted.
    pub latencies_us: Vec<u64>,
    pub statuses: HashMap<u16, u64>,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
    pub fn pct_ms(&self, p: f64) -> f64 {
        pct(&self.latencies_us, p) / 1000.0
    }
    fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.other += other.other;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_insert(0) += v;
        }
    }
}

/// Percentile of sorted values (nearest rank); NaN when empty.
pub fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64
}

/// What a request generator returns: method, path, body, Idempotency-Key.
pub type Request = (&'static str, String, Option<String>, Option<String>);

/// `clients` threads, each with its own connection and one request at a time, until
/// `until`; a reply with status `expect` counts as ok.
pub fn load<F>(addr: SocketAddr, clients: usize, until: Until, expect: u16, make: F) -> LoadResult
where
    F: Fn(&mut Rng) -> Request + Sync,
{
    load_paced(addr, clients, until, None, expect, make)
}

/// A closed-loop burst of random orders: `clients` clients for `seconds`, 201 counts as ok.
pub fn order_burst(
    addr: SocketAddr,
    clients: usize,
    seconds: u64,
    products: &[Product],
    customers: usize,
) -> LoadResult {
    load(
        addr,
        clients,
        Until::Time(Duration::from_secs(seconds)),
        201,
        |rng| {
            (
                "POST",
                "/api/orders".into(),
                Some(order_body(rng, products, customers)),
                None,
            )
        },
    )
}

/// Like `load`, optionally paced: each client sends at most `pace` requests per second.
pub fn load_paced<F>(
    addr: SocketAddr,
    clients: usize,
    until: Until,
    pace: Pace,
    expect: u16,
    make: F,
) -> LoadResult
where
    F: Fn(&mut Rng) -> Request + Sync,
{
    let remaining = AtomicI64::new(match until {
        Until::Count(n) => n,
        Until::Time(_) => i64::MAX,
    });
    let start = Instant::now();
    let deadline = match until {
        Until::Time(d) => Some(start + d),
        Until::Count(_) => None,
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut total = LoadResult::default();
    let parts: Vec<LoadResult> = thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (make, remaining) = (&make, &remaining);
                let rng = Rng::new(seed ^ ((c as u64 + 1) * 0x1234_5678_9abc));
                let client = Client {
                    addr,
                    deadline,
                    pace,
                    expect,
                };
                s.spawn(move || client.run(rng, remaining, make))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    total.seconds = start.elapsed().as_secs_f64();
    for p in parts {
        total.merge(p);
    }
    total.latencies_us.sort_unstable();
    total
}

/// One load client's loop.
struct Client {
    addr: SocketAddr,
    deadline: Option<Instant>,
    pace: Pace,
    expect: u16,
}

impl Client {
    fn run<F>(&self, mut rng: Rng, remaining: &AtomicI64, make: &F) -> LoadResult
    where
        F: Fn(&mut Rng) -> Request + Sync,
    {
        let mut http = Http::new(self.addr);
        let mut r = LoadResult {
            latencies_us: Vec::with_capacity(1 << 16),
            ..Default::default()
        };
        let interval = self.pace.map(|p| Duration::from_secs_f64(1.0 / p));
        let mut next_send = Instant::now();
        loop {
            if self.deadline.is_some_and(|d| Instant::now() >= d)
                || remaining.load(Ordering::Relaxed) <= 0
            {
                return r;
            }
            if let Some(i) = interval {
                thread::sleep(next_send.saturating_duration_since(Instant::now()));
                next_send += i;
            }
            let (method, path, body, key) = make(&mut rng);
            let t = Instant::now();
            match http.request_keyed(method, &path, body.as_deref(), key.as_deref()) {
                Ok((status, _)) => {
                    r.latencies_us.push(t.elapsed().as_micros() as u64);
                    *r.statuses.entry(status).or_insert(0) += 1;
                    if status == self.expect {
                        r.ok += 1;
                        remaining.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        r.other += 1;
                    }
                }
                Err(_) => {
                    r.errors += 1;
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}
