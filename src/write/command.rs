//! The write API. Each POST is validated completely before the database is touched, then
//! runs as ONE statement in an implicit transaction (one round trip; a second only for the
//! Idempotency-Key replay lookup) that writes the business rows, the outbox row carrying
//! the event and, when the client sent one, the Idempotency-Key record. An order is the
//! call of `place_order` (its outcomes in sql/write/003_place_order.sql, its body now in
//! 008): stock is checked under row locks taken in product-id order, so concurrent orders
//! can neither oversell nor deadlock, and a rejected order comes back as an outcome row
//! that `order_rejected` maps to its 4xx.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use tiny_http::Method;
use uuid::Uuid;

use crate::broker::LinkStatus;
use crate::db::{self, Pool};
use crate::error::{Error, Result};
use crate::event::{self, Event, ProductCreated};
use crate::http::{self, Request, Response, Service};
use crate::json::{self, ItemField, Object};
use crate::metrics::Counter;
use crate::ops::retention::{RetentionMetrics, Table};
use crate::write::outbox::Wake;

const NAME_CHARS_MAX: usize = 200;
const PRICE_CENTS_MAX: i64 = 100_000_000_000; // prices are below 1,000,000,000.00
const STOCK_MAX: i64 = i32::MAX as i64;
const ITEMS_MAX: usize = 100;
const QUANTITY_MAX: i64 = 10_000;
const KEY_CHARS_MAX: usize = 255;

/// A validated product.
#[derive(Debug)]
pub struct NewProduct {
    pub name: String,
    pub category: String,
    pub price_cents: i64,
    pub stock: i64,
}

/// A validated order line; `price_cents` is the client's expectation, if it sent one.
#[derive(Debug)]
pub struct NewOrderLine {
    pub product_id: i64,
    pub quantity: i64,
    pub price_cents: Option<i64>,
}

#[derive(Debug)]
pub struct NewOrder {
    pub customer_id: i64,
    pub lines: Vec<NewOrderLine>,
}

pub fn parse_product(body: &[u8]) -> Result<NewProduct> {
    let mut o = Object::parse(body)?;
    let p = NewProduct {
        name: json::string(o.required("name", "")?, "name", NAME_CHARS_MAX)?,
        category: json::string(o.required("category", "")?, "category", NAME_CHARS_MAX)?,
        price_cents: json::money(o.required("price", "")?, "price", PRICE_CENTS_MAX)?,
        stock: json::integer(o.required("stock", "")?, "stock", 0, STOCK_MAX)?,
    };
    o.finish("")?;
    Ok(p)
}

pub fn parse_order(body: &[u8]) -> Result<NewOrder> {
    let mut o = Object::parse(body)?;
    let customer_id = json::integer(o.required("customerId", "")?, "customerId", 1, i64::MAX)?;
    let raw_items = o.required("items", "")?;
    o.finish("")?;
    let items_error = || {
        Error::bad_request(format!(
            "`items` must be an array of 1 to {ITEMS_MAX} order lines"
        ))
        .with_field("field", "items")
    };
    let list: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(raw_items.get()).map_err(|_| items_error())?;
    if list.is_empty() || list.len() > ITEMS_MAX {
        return Err(items_error());
    }
    let mut lines: Vec<NewOrderLine> = Vec::with_capacity(list.len());
    for (i, raw) in list.iter().enumerate() {
        let path = ItemField(i, "");
        let mut it = Object::parse_str(raw.get(), format_args!("items[{i}]"))?;
        let line = NewOrderLine {
            product_id: json::integer(
                it.required("productId", path)?,
                ItemField(i, "productId"),
                1,
                i64::MAX,
            )?,
            quantity: json::integer(
                it.required("quantity", path)?,
                ItemField(i, "quantity"),
                1,
                QUANTITY_MAX,
            )?,
            price_cents: match it.optional("price") {
                Some(raw) => Some(json::money(raw, ItemField(i, "price"), PRICE_CENTS_MAX)?),
                None => None,
            },
        };
        it.finish(path)?;
        if lines.iter().any(|l| l.product_id == line.product_id) {
            return Err(Error::bad_request(format!(
                "product {} appears more than once in the order",
                line.product_id
            ))
            .with_field("productId", line.product_id));
        }
        lines.push(line);
    }
    Ok(NewOrder { customer_id, lines })
}

/// Counters exported at /metrics.
#[derive(Default)]
pub struct CommandMetrics {
    pub products_created: Counter,
    pub orders_created: Counter,
    pub orders_rejected_stock: Counter,
    pub idempotent_replays: Counter,
}

pub struct CommandService {
    pool: Pool,
    /// Tells the outbox publishers of this process about each commit (never blocks).
    outbox_wake: Option<Arc<Wake>>,
    pub metrics: Arc<CommandMetrics>,
    outbox_metrics: Option<Arc<crate::write::outbox::OutboxMetrics>>,
    /// The publishers' broker connections and how long they may all be down before
    /// `/health` reports `brokerConnected: false`.
    broker_link: Option<(Arc<LinkStatus>, Duration)>,
    /// Seconds after which an Idempotency-Key is forgotten; 0: never.
    idempotency_key_ttl_secs: f64,
    retention_metrics: Option<Arc<RetentionMetrics>>,
}

impl CommandService {
    pub fn new(
        pool: Pool,
        outbox_wake: Option<Arc<Wake>>,
        outbox_metrics: Option<Arc<crate::write::outbox::OutboxMetrics>>,
    ) -> CommandService {
        CommandService {
            pool,
            outbox_wake,
            metrics: Arc::default(),
            outbox_metrics,
            broker_link: None,
            idempotency_key_ttl_secs: 0.0,
            retention_metrics: None,
        }
    }

    /// Reports the publishers' broker connections in `/health` (`brokerConnected`).
    pub fn with_broker_link(mut self, link: Arc<LinkStatus>, grace: Duration) -> CommandService {
        self.broker_link = Some((link, grace));
        self
    }

    /// Forgets Idempotency-Keys older than `ttl` (None: keeps them forever) and reports the
    /// pruner's counters and the write side's table sizes at /metrics.
    pub fn with_retention(
        mut self,
        ttl: Option<std::time::Duration>,
        metrics: Arc<RetentionMetrics>,
    ) -> CommandService {
        self.idempotency_key_ttl_secs = ttl.map_or(0.0, |t| t.as_secs_f64());
        self.retention_metrics = Some(metrics);
        self
    }

    fn wake_outbox(&self, event_id: Uuid) {
        if let Some(wake) = &self.outbox_wake {
            wake.committed(event_id);
        }
    }

    /// Outbox rows not yet published.
    /// Left out of a scrape while the outbox is locked (a stale backlog would mislead).
    fn outbox_backlog(&self) -> Result<i64> {
        db::with_short_lock_wait(&self.pool, |conn| {
            let stmt = conn.prepared("SELECT count(*) FROM outbox WHERE published_at IS NULL")?;
            Ok(conn.client.query_one(&stmt, &[])?.get(0))
        })
    }

    fn create_product(&self, req: &Request) -> Result<Response> {
        req.require_json()?;
        let product = parse_product(&req.body)?;
        let (conn, record) = match self.checkout(req, "/api/products")? {
            Checkout::Replay(response) => return Ok(response),
            Checkout::Fresh(conn, record) => (conn, record),
        };
        let (key, request) = IdempotencyRecord::params(&record);
        let (event_id, timestamp) = (Uuid::now_v7(), event::now_millis());
        let payload = Event::ProductCreated(ProductCreated {
            event_id,
            timestamp,
            product_id: 0, // set by the database, in the same statement
            name: product.name.clone(),
            category: product.category.clone(),
            price_cents: product.price_cents,
            stock: product.stock,
        })
        .to_json();
        let stock = product.stock as i32; // validated to fit
        let params: [&(dyn postgres::types::ToSql + Sync); 9] = [
            &product.name,
            &product.category,
            &product.price_cents,
            &stock,
            &payload,
            &key,
            &request,
            &event_id,
            &timestamp,
        ];
        // The product, its outbox row and the key: one statement, one implicit transaction.
        let (mut conn, row) =
            match self.write(conn, Created::Product, INSERT_PRODUCT, &params, event_id)? {
                (conn, Written::Answered(row)) => (conn, row),
                (_, Written::Found(id)) => return Ok(self.created(Created::Product, id, event_id)),
            };
        if !row.get::<_, bool>(1) {
            // A concurrent request with the same key won the race; its response stands.
            return self.replay_after_race(&mut conn, record.as_ref());
        }
        Ok(self.created(Created::Product, row.get(0), event_id))
    }

    /// The 201 for a product or order written, counted, with the publisher woken.
    fn created(&self, created: Created, id: i64, event_id: Uuid) -> Response {
        let (field, counter) = match created {
            Created::Product => ("productId", &self.metrics.products_created),
            Created::Order => ("orderId", &self.metrics.orders_created),
        };
        counter.inc();
        self.wake_outbox(event_id);
        Response::json(201, format!(r#"{{"{field}":{id}}}"#))
    }

    /// Runs a write statement (it is its own transaction) and survives the loss of its
    /// connection. The statement may then have committed before its answer was lost, or may
    /// still be running on the server (waiting for a lock, say) and commit later. So the
    /// lost connection's server process is ended first and waited for (`db::fence`); then
    /// the write is looked up by its event id (unique indexes of write migration 005): found,
    /// it is answered as written. Not found and the process ended, it never committed and
    /// never will, and the statement runs once more on the new connection. It was answered
    /// 503 while the statement could still commit, and a client that retried without an
    /// Idempotency-Key placed the order twice. The 503 stands when the process could not
    /// be ended (the server could not be reached, or the process did not end in time).
    fn write(
        &self,
        mut conn: db::Pooled,
        created: Created,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        event_id: Uuid,
    ) -> Result<(db::Pooled, Written)> {
        let mut again = false;
        loop {
            let answer = conn
                .prepared_or_lost(sql)
                .and_then(|stmt| conn.client.query_one(&stmt, params));
            let e = match answer {
                Ok(row) => return Ok((conn, Written::Answered(row))),
                Err(e) if db::connection_lost(&e) => e,
                Err(e) => return Err(e.into()),
            };
            let backend = conn.backend();
            drop(conn);
            let Ok((mut fresh, fenced)) = db::fence(&self.pool, backend) else {
                return Err(e.into());
            };
            let lookup = match created {
                Created::Product => "SELECT id FROM products WHERE event_id = $1",
                Created::Order => "SELECT id FROM orders WHERE event_id = $1",
            };
            let found = fresh
                .prepared(lookup)
                .and_then(|stmt| Ok(fresh.client.query_opt(&stmt, &[&event_id])?));
            match found {
                Ok(Some(row)) => {
                    let id: i64 = row.get(0);
                    warn!("the database connection was lost after event {event_id} was committed (id {id}); answered 201");
                    return Ok((fresh, Written::Found(id)));
                }
                Ok(None) if fenced == db::Fenced::Ended && !again => {
                    warn!("the database connection was lost before event {event_id} was committed, and its server process has ended; writing it again");
                    (conn, again) = (fresh, true);
                }
                _ => return Err(e.into()),
            }
        }
    }

    /// Checks the Idempotency-Key, checks out a connection and, if the key already has a
    /// recorded response for this request, returns that instead.
    fn checkout(&self, req: &Request, route: &str) -> Result<Checkout> {
        let record = idempotency_key(req)?.map(|key| IdempotencyRecord {
            key,
            request: canonical_request(route, &req.body),
        });
        let conn = self.pool.get()?;
        let Some(g) = &record else {
            return Ok(Checkout::Fresh(conn, record));
        };
        // The key's lookup changes nothing that matters (it may drop an expired record), so
        // a connection found dead on it is replaced and the lookup runs again.
        let ttl = self.ttl();
        let (conn, stored) =
            db::on_live_connection(&self.pool, conn, |c| stored_key(c, &g.key, ttl))?;
        match stored? {
            Some(row) => {
                let response = recorded_response(row.get(0), &g.request, row.get(1), row.get(2))?;
                self.metrics.idempotent_replays.inc();
                Ok(Checkout::Replay(response))
            }
            None => Ok(Checkout::Fresh(conn, record)),
        }
    }

    /// A concurrent request with the same key committed first: its response stands.
    fn replay_after_race(
        &self,
        conn: &mut db::Conn,
        record: Option<&IdempotencyRecord>,
    ) -> Result<Response> {
        let g = record.ok_or_else(|| Error::internal("replay without a key"))?;
        let response = replay(conn, &g.key, &g.request, self.ttl())?
            .ok_or_else(|| Error::unavailable("idempotency key race; retry"))?;
        self.metrics.idempotent_replays.inc();
        Ok(response)
    }

    fn ttl(&self) -> f64 {
        self.idempotency_key_ttl_secs
    }

    fn create_order(&self, req: &Request) -> Result<Response> {
        req.require_json()?;
        let order = parse_order(&req.body)?;
        let (conn, record) = match self.checkout(req, "/api/orders")? {
            Checkout::Replay(response) => return Ok(response),
            Checkout::Fresh(conn, record) => (conn, record),
        };
        let (key, request) = IdempotencyRecord::params(&record);
        let ids: Vec<i64> = order.lines.iter().map(|l| l.product_id).collect();
        let quantities: Vec<i32> = order.lines.iter().map(|l| l.quantity as i32).collect();
        let prices: Vec<Option<i64>> = order.lines.iter().map(|l| l.price_cents).collect();
        let timestamp = event::format_timestamp(&event::now_millis());
        let event_id = Uuid::now_v7();
        // Row locks, validation and every write: one statement in an implicit transaction
        // (sql/write/003_place_order.sql, body in 008).
        let params: [&(dyn postgres::types::ToSql + Sync); 8] = [
            &ids,
            &quantities,
            &prices,
            &order.customer_id,
            &event_id,
            &timestamp,
            &key,
            &request,
        ];
        let row = match self.write(conn, Created::Order, PLACE_ORDER, &params, event_id)? {
            (_, Written::Answered(row)) => row,
            (_, Written::Found(id)) => return Ok(self.created(Created::Order, id, event_id)),
        };
        match row.get::<_, Option<&str>>(0) {
            Some("ok") => Ok(self.created(Created::Order, row.get(1), event_id)),
            Some("key") => {
                // A request with the same key committed first: its response stands.
                let stored: Option<String> = row.get(6);
                let stored =
                    stored.ok_or_else(|| Error::unavailable("idempotency key race; retry"))?;
                let response =
                    recorded_response(&stored, request.unwrap_or(""), row.get(7), row.get(8))?;
                self.metrics.idempotent_replays.inc();
                Ok(response)
            }
            _ => Err(self.order_rejected(&row, &order)),
        }
    }

    /// The error for an order `place_order` rejected (nothing was written).
    fn order_rejected(&self, row: &postgres::Row, order: &NewOrder) -> Error {
        let product_id: i64 = row.get(2);
        match row.get::<_, Option<&str>>(0) {
            Some("missing") => Error::bad_request(format!("product {product_id} does not exist"))
                .with_field("productId", product_id),
            Some("price") => {
                let price_cents: i64 = row.get(5);
                let client_price = order
                    .lines
                    .iter()
                    .find(|l| l.product_id == product_id)
                    .and_then(|l| l.price_cents)
                    .unwrap_or_default();
                Error::conflict(format!(
                    "the price of product {product_id} is {}, not {}",
                    json::format_cents(price_cents),
                    json::format_cents(client_price)
                ))
                .with_field("productId", product_id)
                .with_field("currentPrice", money_value(price_cents))
            }
            Some("stock") => {
                self.metrics.orders_rejected_stock.inc();
                let (available, requested): (i32, i32) = (row.get(3), row.get(4));
                // 400, not 409: the original system answers 400 and its clients expect it.
                let message = format!(
                    "Insufficient stock for product {product_id}: \
                     available {available}, requested {requested}"
                );
                Error::bad_request(message)
                    .with_field("productId", product_id)
                    .with_field("available", available)
                    .with_field("requested", requested)
            }
            other => Error::internal(format!("place_order answered {other:?}")),
        }
    }
}

fn money_value(cents: i64) -> serde_json::Value {
    // Exact: any cents value below 2^53 divided by 100 prints as its two-decimal form.
    serde_json::Value::from(cents as f64 / 100.0)
}

/// An Idempotency-Key and the canonical request it was sent with: the row of
/// `idempotency_keys` a fresh request will write.
struct IdempotencyRecord {
    key: String,
    request: String,
}

impl IdempotencyRecord {
    /// The key and request as SQL parameters (NULL without a key).
    fn params(record: &Option<IdempotencyRecord>) -> (Option<&str>, Option<&str>) {
        match record {
            Some(g) => (Some(g.key.as_str()), Some(g.request.as_str())),
            None => (None, None),
        }
    }
}

/// A checked-out connection and the request's key, or the response recorded for the key.
/// It lives for one call, on the stack, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Checkout {
    Fresh(db::Pooled, Option<IdempotencyRecord>),
    Replay(Response),
}

/// The Idempotency-Key header, if present and well-formed (1 to 255 visible ASCII characters).
fn idempotency_key(req: &Request) -> Result<Option<String>> {
    match &req.idempotency_key {
        None => Ok(None),
        Some(k) if k.contains(", ") => Err(Error::bad_request(
            "send one Idempotency-Key, not a list of them",
        )),
        Some(k)
            if !k.is_empty()
                && k.len() <= KEY_CHARS_MAX
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k.clone()))
        }
        Some(_) => Err(Error::bad_request(format!(
            "Idempotency-Key must be 1 to {KEY_CHARS_MAX} visible ASCII characters"
        ))),
    }
}

/// The route plus the body's canonical JSON (sorted keys, no whitespace, whole numbers
/// written as integers), so that a retry that re-serialises the same document still
/// matches: `5`, `5.00` and `5e0` are one price (serde_json keeps `5.00` a float, whose
/// text is `5.0`: such a retry got 422).
fn canonical_request(route: &str, body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .map(|mut v| {
            whole_numbers_as_integers(&mut v);
            v.to_string()
        })
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    format!("POST {route}\n{canonical}")
}

/// Rewrites every float with no fractional part, within the range where a double holds
/// every integer exactly (2^53), as that integer.
fn whole_numbers_as_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) {
                if f.abs() <= EXACT {
                    *n = serde_json::Number::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// Returns the recorded response for `key`, 422 if the key was used for another request,
/// or None if the key is new or has expired (older than `ttl_secs`, unless that is 0).
fn replay(
    conn: &mut db::Conn,
    key: &str,
    request: &str,
    ttl_secs: f64,
) -> Result<Option<Response>> {
    let Some(row) = stored_key(conn, key, ttl_secs)? else {
        return Ok(None);
    };
    recorded_response(row.get(0), request, row.get(1), row.get(2)).map(Some)
}

/// The record of `key` unless it has expired (`SELECT_KEY`), with the database's error as
/// it came.
fn stored_key(
    conn: &mut db::Conn,
    key: &str,
    ttl_secs: f64,
) -> std::result::Result<Option<postgres::Row>, postgres::Error> {
    let stmt = conn.prepared_or_lost(SELECT_KEY)?;
    conn.client.query_opt(&stmt, &[&key, &ttl_secs])
}

/// The response recorded with a key, or 422 if the key guarded another request.
fn recorded_response(stored: &str, request: &str, status: i16, body: String) -> Result<Response> {
    if stored != request {
        return Err(Error::unprocessable(
            "this Idempotency-Key was already used with a different request",
        ));
    }
    Ok(Response::json(status as u16, body))
}

/// What a write statement came to (`CommandService::write`).
enum Written {
    /// The statement's answer.
    Answered(postgres::Row),
    /// Its connection was lost after it committed: the id written, found by the event id.
    Found(i64),
}

/// What a write created.
#[derive(Clone, Copy)]
enum Created {
    Product,
    Order,
}

/// The key's record unless it has expired. An expired record is deleted in the same
/// statement (committed before the request's own transaction begins), so the request can
/// record the key afresh even before the pruner has come by.
const SELECT_KEY: &str = "
WITH expired AS (
    DELETE FROM idempotency_keys
    WHERE key = $1 AND $2::float8 > 0 AND created_at <= now() - make_interval(secs => $2::float8)
)
SELECT request, response_status, response_body FROM idempotency_keys
WHERE key = $1 AND ($2::float8 = 0 OR created_at > now() - make_interval(secs => $2::float8))";

/// The product, its outbox row and the key's record in one statement. The id is drawn first
/// so that the key can be recorded before anything else: when a concurrent request already
/// holds the key, `ON CONFLICT` leaves `k` empty and neither the product nor its event is
/// written (the statement is its own transaction, so nothing can be rolled back after it).
const INSERT_PRODUCT: &str = "
WITH n AS (
    SELECT nextval('products_id_seq') AS id
), k AS (
    INSERT INTO idempotency_keys (key, request, response_status, response_body)
    SELECT $6::text, $7::text, 201, '{\"productId\":' || n.id || '}' FROM n WHERE $6::text IS NOT NULL
    ON CONFLICT (key) DO NOTHING
    RETURNING 1
), p AS (
    INSERT INTO products (id, name, category, price, stock, event_id, created_at)
    SELECT n.id, $1, $2, $3::bigint / 100.0, $4, $8, $9 FROM n
    WHERE $6::text IS NULL OR EXISTS (SELECT 1 FROM k)
    RETURNING id
), o AS (
    INSERT INTO outbox (topic, payload)
    SELECT 'product-events', jsonb_set($5::text::jsonb, '{productId}', to_jsonb(p.id)) FROM p
)
SELECT n.id, EXISTS (SELECT 1 FROM p) FROM n";

/// POST /api/orders in one round trip: see sql/write/003_place_order.sql (the outcomes) and
/// 008 (the body).
const PLACE_ORDER: &str = "SELECT r_outcome, r_order_id, r_product_id, r_available, r_requested,
    r_price_cents, r_key_request, r_key_status, r_key_body
FROM place_order($1::bigint[], $2::int[], $3::bigint[], $4::bigint, $5::uuid, $6::text, $7::text, $8::text)";

impl Service for CommandService {
    fn handle(&self, req: &Request) -> (&'static str, Result<Response>) {
        match req.path.as_str() {
            "/api/products" if req.method == Method::Post => {
                ("/api/products", self.create_product(req))
            }
            "/api/products" => http::method_not_allowed("/api/products", "POST"),
            "/api/orders" if req.method == Method::Post => ("/api/orders", self.create_order(req)),
            "/api/orders" => http::method_not_allowed("/api/orders", "POST"),
            _ => http::not_found(),
        }
    }

    fn health(&self) -> Result<()> {
        db::ping(&self.pool)
            .map_err(|e| Error::unavailable(format!("write database unreachable: {e}")))
    }

    /// The outbox absorbs a broker outage, so a lost broker leaves the service healthy
    /// (orders are still taken) but says so.
    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut details = serde_json::Map::new();
        if let Some((link, grace)) = &self.broker_link {
            details.insert("brokerConnected".into(), link.connected(*grace).into());
        }
        details
    }

    fn metrics(&self, out: &mut String) {
        let m = &self.metrics;
        m.products_created.render(out, "products_created_total", "");
        m.orders_created.render(out, "orders_created_total", "");
        m.orders_rejected_stock
            .render(out, "orders_rejected_insufficient_stock_total", "");
        m.idempotent_replays
            .render(out, "idempotent_replays_total", "");
        crate::metrics::render_pool(out, "write", &self.pool);
        if let Some(o) = &self.outbox_metrics {
            o.render(out);
        }
        if let Some(r) = &self.retention_metrics {
            r.render(out, &self.pool, &[Table::Outbox, Table::IdempotencyKeys]);
        }
        // The backlog is counted at scrape time: one index-only query per scrape.
        if let Ok(backlog) = self.outbox_backlog() {
            let _ = writeln!(
                out,
                "# TYPE outbox_backlog_events gauge\noutbox_backlog_events {backlog}"
            );
        }
    }
}
