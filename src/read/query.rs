//! The read API. Every route is a primary-key lookup (or a short range scan) on a view the
//! consumer keeps up to date; the query service never writes. Money comes out of
//! PostgreSQL as NUMERIC text and goes into the JSON as that same text, so it is exact.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use tiny_http::Method;

use crate::config::Config;
use crate::db::{self, Pool};
use crate::error::{Error, Result};
use crate::event::format_timestamp;
use crate::http::{self, percent_decode, Request, Response, Service};
use crate::read::cache::Cache;
use crate::read::lists::{self, List};

/// Hours returned by one hourly-sales request at most (more than a year).
const HOURS_MAX: i64 = 10_000;

pub struct QueryService {
    read: Pool,
    /// The write DB, read-only, to see events still waiting in the outbox.
    write: Pool,
    config: Config,
    broker: crate::broker::QueueProbe,
    cache: Arc<Cache>,
}

impl QueryService {
    pub fn new(read: Pool, write: Pool, config: Config, cache: Arc<Cache>) -> QueryService {
        QueryService {
            read,
            write,
            config,
            broker: crate::broker::QueueProbe::default(),
            cache,
        }
    }

    fn product_sales(&self, id: &str) -> Result<Response> {
        let id = positive_id(id, "product id")?;
        let mut conn = self.read.get()?;
        let row = exact_row(&mut conn, PRODUCT_SALES_FAST, PRODUCT_SALES, id)?
            .ok_or_else(|| Error::not_found(format!("product {id} has no sales record")))?;
        let qty: i64 = row.get(0);
        let revenue: String = row.get(1);
        let orders: i64 = row.get(2);
        Ok(Response::json(
            200,
            format!(
                r#"{{"productId":{id},"totalQuantitySold":{qty},"totalRevenue":{revenue},"orderCount":{orders}}}"#
            ),
        ))
    }

    fn category_revenue(&self, raw: &str) -> Result<Response> {
        let category = percent_decode(raw, false)?;
        if category.is_empty() || category.contains('\0') {
            // No stored category is empty or holds NUL (the write side refuses both), and
            // PostgreSQL text cannot even carry NUL: say so instead of asking.
            return Err(Error::bad_request(
                "category must be a non-empty string without NUL",
            ));
        }
        let mut conn = self.read.get()?;
        let stmt = conn.prepared(CATEGORY_REVENUE)?;
        let row = conn.client.query_opt(&stmt, &[&category])?.ok_or_else(|| {
            Error::not_found(format!("category {category:?} has no revenue record"))
        })?;
        let revenue: String = row.get(0);
        let orders: i64 = row.get(1);
        let name = serde_json::to_string(&category).expect("strings serialise");
        Ok(Response::json(
            200,
            format!(r#"{{"category":{name},"totalRevenue":{revenue},"totalOrders":{orders}}}"#),
        ))
    }

    fn customer_ltv(&self, id: &str) -> Result<Response> {
        let id = positive_id(id, "customer id")?;
        let mut conn = self.read.get()?;
        let row = exact_row(&mut conn, CUSTOMER_LTV_FAST, CUSTOMER_LTV, id)?
            .ok_or_else(|| Error::not_found(format!("customer {id} has no orders")))?;
        let spent: String = row.get(0);
        let orders: i64 = row.get(1);
        let last: Option<DateTime<Utc>> = row.get(2);
        let last = last
            .map(|t| format!("\"{}\"", format_timestamp(&t)))
            .unwrap_or_else(|| "null".into());
        Ok(Response::json(
            200,
            format!(
                r#"{{"customerId":{id},"totalSpent":{spent},"orderCount":{orders},"lastOrderDate":{last}}}"#
            ),
        ))
    }

    fn hourly(&self, req: &Request) -> Result<Response> {
        let [from, to] = lists::known_params(req.query.as_deref(), ["from", "to"], "hourly sales")?;
        let bound = |name: &str, value: Option<String>| -> Result<Option<DateTime<Utc>>> {
            match value {
                None => Ok(None),
                Some(s) if s.is_empty() => Ok(None),
                Some(s) => DateTime::parse_from_rfc3339(&s)
                    .map(|t| Some(ceil_micros(t.with_timezone(&Utc))))
                    .map_err(|_| {
                        Error::bad_request(format!(
                            "`{name}` must be an RFC 3339 timestamp, e.g. 2026-02-11T16:00:00Z"
                        ))
                    }),
            }
        };
        let (from, to) = (bound("from", from)?, bound("to", to)?);
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(Error::bad_request("`from` must not be after `to`"));
            }
        }
        let mut conn = self.read.get()?;
        let stmt = conn.prepared(HOURLY)?;
        let rows = conn.client.query(&stmt, &[&from, &to, &HOURS_MAX])?;
        let mut body = String::with_capacity(32 + rows.len() * 80);
        body.push_str(r#"{"hours":["#);
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let hour: DateTime<Utc> = row.get(0);
            let orders: i64 = row.get(1);
            let revenue: String = row.get(2);
            body.push_str(&format!(
                r#"{{"hour":"{}","totalOrders":{orders},"totalRevenue":{revenue}}}"#,
                format_timestamp(&hour)
            ));
        }
        body.push_str("]}");
        Ok(Response::json(200, body))
    }

    /// The pipeline's state, gathered from the read DB, the write DB and the broker. This is
    /// the one place sync-status is computed.
    ///
    /// `lagSeconds` is the age of the oldest committed event not yet applied, wherever it
    /// waits: unpublished in the outbox, ready in a queue (the n-th newest published row,
    /// n = ready messages: queues are FIFO), or held unacked by a consumer (its batch and
    /// prefetch window, from `consumer_progress`). `consumerStalled`: a consumer says it holds
    /// deliveries it has not applied for `CONSUMER_STALL_SECS`, or events have waited that
    /// long while nothing was applied (e.g. no consumer runs at all). `lagIsLowerBound`: the
    /// write database or the broker could not be asked, or the oldest queued events' rows
    /// were pruned, so the lag is at least `lagSeconds`.
    fn sync_status(&self) -> Result<Response> {
        // Each stage is asked in the events' direction of travel: the outbox, the broker,
        // the consumers, the read model. An event only moves downstream, so one that has
        // left a stage before it was asked is found further down, or is applied. Asked the
        // other way round, an event could leave the outbox after the consumers and the
        // broker had been asked, and be missed by all three: sync-status said all was
        // applied while orders were not (in 8 of 20 rounds of a burst-then-poll check).
        let unpublished = self.outbox_unpublished();
        let queued = self.broker.ready(&self.config);
        let now = crate::event::now_millis();
        let outbox = unpublished.and_then(|unpublished| {
            self.backlog(unpublished, queued.as_ref().map(|q| q.events), now)
        });
        let read = self.read_side()?;
        // More consumers on the queues than the processes writing their rows account for:
        // one is fed by the broker but silent (frozen, or cut off from this database), and
        // what it holds is unknown. Its row used to count until it was 10 s old, saying what
        // it held before it fell silent, then not at all.
        let silent = queued
            .as_ref()
            .is_some_and(|q| q.consumers > read.reporting);
        // Every stage read empty: the newest published events are looked up by id (`unseen`).
        let all_empty = !silent
            && read.held_messages == 0
            && queued.as_ref().is_some_and(|q| q.events == 0)
            && outbox.as_ref().is_ok_and(|b| b.pending == 0);
        let unseen = self.unseen(all_empty, now);
        let (unseen_count, oldest_unseen) =
            unseen.as_ref().map_or((0, None), |u| (u.count, u.oldest));
        let age_ms = |t: Option<DateTime<Utc>>| t.map_or(0, |t| (now - t).num_milliseconds());
        let (unpublished, oldest_queued) = outbox
            .as_ref()
            .map(|b| (b.oldest_unpublished, b.oldest_queued))
            .unwrap_or_default();
        // Past the outbox, the consumers' side: what waits in the broker or in their hands.
        let consumer_lag_ms = age_ms(oldest_queued)
            .max(age_ms(read.oldest_held))
            .max(age_ms(oldest_unseen));
        let lag_ms = age_ms(unpublished).max(consumer_lag_ms);
        let stall_secs = self.config.consumer_stall.as_secs_f64();
        // Events the publisher cannot get to the broker are not the consumers' stall: the
        // command service's health says so (`brokerConnected`), and `pendingOutboxEvents`.
        let waited_too_long = consumer_lag_ms as f64 / 1000.0 >= stall_secs
            && read.idle_secs.is_none_or(|idle| idle >= stall_secs);
        let body = json!({
            "lastProcessedEventTimestamp": read.last.map(|t| format_timestamp(&t)),
            "lagSeconds": lag_ms.max(0) as f64 / 1000.0,
            // What a side that could not be asked holds, or the age of events whose outbox
            // rows were pruned, is not in the figure: the lag is at least this.
            "lagIsLowerBound": queued.is_none()
                || silent
                || unseen.is_err()
                || outbox.as_ref().map_or(true, |b| b.queued_bound_only),
            "eventsApplied": read.applied,
            "pendingOutboxEvents": outbox.as_ref().ok().map(|b| b.pending),
            "pendingBrokerMessages": queued.as_ref().map(|q| q.events),
            "deadLetterMessages": queued.as_ref().map(|q| q.dead_letters),
            "pendingConsumerMessages": (!silent).then_some(read.held_messages + unseen_count),
            "consumerStalled": read.consumer_says_stalled || waited_too_long,
            "endToEndLatencyMs": {
                "windowSeconds": 60,
                "samples": read.samples,
                "p50": read.p50.map(round_ms),
                "p99": read.p99.map(round_ms),
            },
            "writeSideReachable": outbox.is_ok(),
            "brokerReachable": queued.is_some(),
        });
        Ok(Response::json(200, body.to_string()))
    }

    /// The consumers' side and the read model's, for sync-status (asked last).
    fn read_side(&self) -> Result<ReadSide> {
        let mut conn = self.read.get()?;
        let held = conn.client.query_one(
            CONSUMERS_HOLDING,
            &[
                &(crate::read::progress::ROW_FRESH_SECS as f64),
                &crate::read::progress::ROW_SILENT_SECS,
            ],
        )?;
        let status = conn.client.query_one(SYNC_STATUS, &[])?;
        let latency = conn.client.query_one(LATENCY, &[])?;
        Ok(ReadSide {
            held_messages: held.get(0),
            oldest_held: held.get(1),
            consumer_says_stalled: held.get(2),
            reporting: held.get(3),
            last: status.get(0),
            applied: status.get(1),
            idle_secs: status.get(2),
            samples: latency.get(0),
            p50: latency.get(1),
            p99: latency.get(2),
        })
    }

    /// Events among the newest `UNSEEN_CHECKED` published ones that are neither applied nor
    /// dead-lettered, asked only when every stage read empty (`stages_empty`).
    ///
    /// The broker stops counting a message as ready when it sends it to a consumer; the
    /// consumer's process counts it once its reporter has written its row, normally within
    /// about 2 ms (`progress::WRITE_SPACING` plus the write), longer when that write waits.
    /// In between, the event is in no stage, and sync-status said all was applied while it
    /// was not (the burst-then-poll test met it about once in a dozen CI runs). Such an event
    /// was sent by the broker within that gap, and the broker had sent every older one in
    /// its queue before it (FIFO): it is among the newest published events. The ones the
    /// consumers held when every queue was empty are at most their prefetch windows, and
    /// what the reporters had not written yet far fewer; the 1000 newest cover that, give
    /// or take a publisher's batch published out of id order. A requeued event redelivered
    /// within the gap may be older: that case is left (see README).
    ///
    /// Only events newer than half the deduplication window are looked up: older ones'
    /// `processed_events` rows may be pruned. Dead-lettered events (as many failures as
    /// `CONSUMER_MAX_ATTEMPTS`) are left out, as the stages leave out the dead-letter queue.
    fn unseen(&self, stages_empty: bool, now: DateTime<Utc>) -> Result<Unseen> {
        if !stages_empty {
            return Ok(Unseen::default());
        }
        let since = self
            .config
            .retention
            .processed_events
            .and_then(|w| chrono::Duration::from_std(w / 2).ok())
            .and_then(|w| now.checked_sub_signed(w));
        let rows = {
            let mut conn = self.write.get()?;
            let stmt = conn.prepared(NEWEST_PUBLISHED)?;
            conn.client.query(&stmt, &[&since, &UNSEEN_CHECKED])?
        };
        // Rows without an event id (only ever written by hand) cannot be looked up.
        let rows: Vec<(uuid::Uuid, DateTime<Utc>)> = rows
            .iter()
            .filter_map(|r| Some((r.get::<_, Option<uuid::Uuid>>(0)?, r.get(1))))
            .collect();
        if rows.is_empty() {
            return Ok(Unseen::default());
        }
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
        let attempts = i32::try_from(self.config.consumer_attempts_max).unwrap_or(i32::MAX);
        let mut conn = self.read.get()?;
        let stmt = conn.prepared(UNSEEN)?;
        let missing = conn.client.query(&stmt, &[&ids, &attempts])?;
        Ok(Unseen {
            count: missing.len() as i64,
            oldest: missing
                .iter()
                .filter_map(|m| usize::try_from(m.get::<_, i64>(0) - 1).ok())
                .filter_map(|i| rows.get(i))
                .map(|r| r.1)
                .min(),
        })
    }

    /// The outbox's side: its unpublished rows (how many, the oldest one's timestamp), and
    /// the timestamp of the oldest of the `queued` events the broker holds ready.
    fn backlog(
        &self,
        (pending, oldest_unpublished): (i64, Option<DateTime<Utc>>),
        queued: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Backlog> {
        let (oldest_queued, queued_bound_only) = self.oldest_queued(queued, now)?;
        Ok(Backlog {
            pending,
            oldest_unpublished,
            oldest_queued,
            queued_bound_only,
        })
    }

    /// Unpublished outbox rows: how many, and the oldest one's timestamp.
    fn outbox_unpublished(&self) -> Result<(i64, Option<DateTime<Utc>>)> {
        let mut conn = self.write.get()?;
        let row = conn.client.query_one(OUTBOX_BACKLOG, &[])?;
        Ok((row.get(0), row.get(1)))
    }

    /// The timestamp of the oldest of the `queued` events waiting in the broker: the
    /// `queued`-th newest published row (queues are FIFO, so that is the oldest one
    /// waiting); if there are fewer rows, a bound (true): the oldest row left, and the
    /// retention window.
    fn oldest_queued(
        &self,
        queued: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<(Option<DateTime<Utc>>, bool)> {
        let n = match queued {
            Some(n) if n > 0 => n,
            _ => return Ok((None, false)),
        };
        let mut conn = self.write.get()?;
        if let Some(row) = conn.client.query_opt(OLDEST_QUEUED, &[&(n - 1)])? {
            return Ok((Some(row.get(0)), false));
        }
        // Fewer published rows than ready messages: the oldest waiting events' rows were
        // pruned while a consumer held them unacked (the pruner keeps as many of the newest
        // rows as messages are ready; unacked ones it cannot count). Those events are older
        // than every row left, and than the window: the lag is at least that.
        let oldest_left: Option<DateTime<Utc>> = conn
            .client
            .query_opt(OLDEST_PUBLISHED, &[])?
            .map(|row| row.get(0));
        let window = self
            .config
            .retention
            .outbox
            .and_then(|w| chrono::Duration::from_std(w).ok())
            .and_then(|w| now.checked_sub_signed(w));
        Ok((oldest_left.into_iter().chain(window).min(), true))
    }
}

/// The consumers' and the read model's side of sync-status.
struct ReadSide {
    /// Deliveries the consumers of fresh rows hold, and the oldest one's event time.
    held_messages: i64,
    oldest_held: Option<DateTime<Utc>>,
    consumer_says_stalled: bool,
    /// Consumers subscribed by the processes whose rows are not silent.
    reporting: i64,
    /// The newest event applied, how many were, and seconds since the last apply.
    last: Option<DateTime<Utc>>,
    applied: i64,
    idle_secs: Option<f64>,
    /// End-to-end latency over the last minute: samples, p50 and p99 in seconds.
    samples: i64,
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Published events that are in no stage and not applied (`QueryService::unseen`).
#[derive(Default)]
struct Unseen {
    count: i64,
    oldest: Option<DateTime<Utc>>,
}

/// The outbox's side of sync-status.
struct Backlog {
    pending: i64,
    oldest_unpublished: Option<DateTime<Utc>>,
    oldest_queued: Option<DateTime<Utc>>,
    /// `oldest_queued` is a bound: the rows of the oldest queued events were pruned.
    queued_bound_only: bool,
}

/// A read route's handler: the service, the request, the path segments.
type Handler = fn(&QueryService, &Request, &[&str]) -> Result<Response>;

/// `t` rounded up to a whole microsecond. PostgreSQL keeps microseconds and the postgres
/// crate drops the nanoseconds beyond them, which moved a bound between two microseconds
/// down: an hour starting before `to` was left out, one starting before `from` let in.
/// Every hour starts on a whole microsecond, so rounding up keeps `from` inclusive and
/// `to` exclusive exact. (RFC 3339 years stop at 9999: no overflow.)
fn ceil_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let below = t.timestamp_subsec_nanos() % 1_000;
    if below == 0 {
        return t;
    }
    t.checked_add_signed(chrono::Duration::nanoseconds(i64::from(1_000 - below)))
        .unwrap_or(t)
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0 * 100.0).round() / 100.0
}

/// A product's or customer's row as it is now: `fast` reads the view's row and whether the
/// key has pending rows (read migration 009), one relation and one index probe; only if it
/// has, or has no view row yet, `exact` adds the pending rows to the view's (two
/// relations, summed: about half the lookups per second in pgbench). Both answer the same
/// first columns, and each reads one snapshot.
fn exact_row(
    conn: &mut db::Conn,
    fast: &'static str,
    exact: &'static str,
    id: i64,
) -> Result<Option<postgres::Row>> {
    let stmt = conn.prepared(fast)?;
    match conn.client.query_opt(&stmt, &[&id])? {
        Some(row) if !row.get::<_, bool>(3) => Ok(Some(row)),
        _ => {
            let stmt = conn.prepared(exact)?;
            Ok(conn.client.query_opt(&stmt, &[&id])?)
        }
    }
}

/// Parses a path id that must be a positive 64-bit integer.
fn positive_id(s: &str, what: &str) -> Result<i64> {
    match s.parse::<i64>() {
        Ok(n) if n > 0 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(Error::bad_request(format!(
            "{what} must be a positive integer, got {s:?}"
        ))),
    }
}

const PRODUCT_SALES_FAST: &str = "SELECT total_quantity_sold, total_revenue::text, order_count,
            EXISTS (SELECT 1 FROM product_sales_delta d WHERE d.product_id = $1)
     FROM product_sales_view WHERE product_id = $1";
const PRODUCT_SALES: &str =
    "SELECT sum(q)::bigint, sum(r)::text, sum(o)::bigint FROM (
         SELECT total_quantity_sold, total_revenue, order_count FROM product_sales_view WHERE product_id = $1
         UNION ALL
         SELECT quantity, revenue, orders FROM product_sales_delta WHERE product_id = $1) AS x(q, r, o)
     HAVING count(*) > 0";
// Categories, hours and the sync counters are sums over shards (sql/read/006).
const CATEGORY_REVENUE: &str = "SELECT sum(total_revenue)::text, sum(total_orders)::bigint
FROM category_metrics_view WHERE category_name = $1 GROUP BY category_name";
const CUSTOMER_LTV_FAST: &str = "SELECT total_spent::text, order_count, last_order_date,
            EXISTS (SELECT 1 FROM customer_ltv_delta d WHERE d.customer_id = $1)
     FROM customer_ltv_view WHERE customer_id = $1";
const CUSTOMER_LTV: &str =
    "SELECT sum(s)::text, sum(o)::bigint, max(l) FROM (
         SELECT total_spent, order_count, last_order_date FROM customer_ltv_view WHERE customer_id = $1
         UNION ALL
         SELECT spent, orders, last_order FROM customer_ltv_delta WHERE customer_id = $1) AS x(s, o, l)
     HAVING count(*) > 0";
const HOURLY: &str = "
SELECT hour_timestamp, sum(total_orders)::bigint, sum(total_revenue)::text FROM hourly_sales_view
WHERE ($1::timestamptz IS NULL OR hour_timestamp >= $1) AND ($2::timestamptz IS NULL OR hour_timestamp < $2)
GROUP BY hour_timestamp ORDER BY hour_timestamp LIMIT $3";
const SYNC_STATUS: &str = "
SELECT max(last_processed_event_timestamp), sum(events_applied)::bigint,
       extract(epoch FROM now() - max(last_applied_at))::float8
FROM sync_status";
const CONSUMERS_HOLDING: &str = "
SELECT coalesce(sum(held_messages), 0)::bigint, min(oldest_held_event_at),
       coalesce(bool_or(stalled_reason IS NOT NULL), false),
       coalesce(sum(consumers) FILTER (WHERE updated_at > now() - make_interval(secs => $2)), 0)::bigint
FROM consumer_progress WHERE updated_at > now() - make_interval(secs => $1)";
const LATENCY: &str = "
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - event_timestamp))::float8,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - event_timestamp))::float8
FROM (SELECT processed_at, event_timestamp FROM processed_events
      WHERE processed_at > now() - interval '60 seconds'
      ORDER BY processed_at DESC LIMIT 10000) recent";
const OUTBOX_BACKLOG: &str =
    "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL";
const OLDEST_QUEUED: &str =
    "SELECT created_at FROM outbox WHERE published_at IS NOT NULL ORDER BY id DESC OFFSET $1 LIMIT 1";
/// How many of the newest published events `unseen` looks up.
const UNSEEN_CHECKED: i64 = 1000;
const NEWEST_PUBLISHED: &str = "
SELECT (payload->>'eventId')::uuid, created_at FROM outbox
WHERE published_at IS NOT NULL AND ($1::timestamptz IS NULL OR created_at > $1)
ORDER BY id DESC LIMIT $2";
const UNSEEN: &str = "
SELECT x.i FROM unnest($1::uuid[]) WITH ORDINALITY AS x(id, i)
WHERE NOT EXISTS (SELECT 1 FROM processed_events p WHERE p.event_id = x.id)
  AND NOT EXISTS (SELECT 1 FROM event_failures f
                  WHERE f.message_key = x.id::text AND f.attempts >= $2)";
const OLDEST_PUBLISHED: &str =
    "SELECT created_at FROM outbox WHERE published_at IS NOT NULL ORDER BY id LIMIT 1";

impl Service for QueryService {
    fn handle(&self, req: &Request) -> (&'static str, Result<Response>) {
        if let Some((route, page)) = crate::read::dashboard::asset(&req.path) {
            if req.method != Method::Get && req.method != Method::Head {
                return http::method_not_allowed(route, "GET, HEAD");
            }
            return (route, Ok(page));
        }
        let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let (route, result): (&'static str, Handler) = match segments.as_slice() {
            ["api", "analytics", "products", _, "sales"] => {
                ("/api/analytics/products/{id}/sales", |s, _, p| {
                    s.product_sales(p[3])
                })
            }
            ["api", "analytics", "categories", _, "revenue"] => {
                ("/api/analytics/categories/{category}/revenue", |s, _, p| {
                    s.category_revenue(p[3])
                })
            }
            ["api", "analytics", "customers", _, "lifetime-value"] => {
                ("/api/analytics/customers/{id}/lifetime-value", |s, _, p| {
                    s.customer_ltv(p[3])
                })
            }
            ["api", "analytics", "products"] => ("/api/analytics/products", |s, r, _| {
                lists::handle(&s.read, List::Products, r)
            }),
            ["api", "analytics", "categories"] => ("/api/analytics/categories", |s, r, _| {
                lists::handle(&s.read, List::Categories, r)
            }),
            ["api", "analytics", "customers"] => ("/api/analytics/customers", |s, r, _| {
                lists::handle(&s.read, List::Customers, r)
            }),
            ["api", "analytics", "sync-status"] => {
                ("/api/analytics/sync-status", |s, _, _| s.sync_status())
            }
            ["api", "analytics", "sales", "hourly"] => {
                ("/api/analytics/sales/hourly", |s, r, _| s.hourly(r))
            }
            _ => return http::not_found(),
        };
        if req.method != Method::Get && req.method != Method::Head {
            return http::method_not_allowed(route, "GET, HEAD");
        }
        if route == "/api/analytics/sync-status" {
            // Asks the write side and the broker too: never kept. And a client that saw
            // events applied here must then read them, though the notification of a batch
            // it saw may not have reached the cache yet: a new generation once it has read.
            let answer = result(self, req, &segments);
            self.cache.invalidate();
            return (route, answer);
        }
        // Every other route reads the read model alone: its answer is kept until it changes.
        let key = match &req.query {
            Some(q) => format!("{}?{q}", req.path),
            None => req.path.clone(),
        };
        let answer = self.cache.through(key, || result(self, req, &segments));
        (route, answer)
    }

    fn health(&self) -> Result<()> {
        db::ping(&self.read)
            .map_err(|e| Error::unavailable(format!("read database unreachable: {e}")))
    }

    fn health_details(&self) -> serde_json::Map<String, serde_json::Value> {
        let cache = match (self.config.query_cache_bytes, self.cache.trusted()) {
            (0, _) => "off",
            (_, true) => "on",
            (_, false) => "off until its listener listens",
        };
        serde_json::Map::from_iter([("responseCache".to_string(), cache.into())])
    }

    fn metrics(&self, out: &mut String) {
        crate::metrics::render_pool(out, "read", &self.read);
        crate::metrics::render_pool(out, "write_readonly", &self.write);
        let c = &self.cache;
        c.hits.render(out, "query_cache_hits_total", "");
        c.misses.render(out, "query_cache_misses_total", "");
        c.changes.render(out, "query_cache_changes_total", "");
        crate::metrics::render_gauge(out, "query_cache_bytes", "", c.bytes());
        crate::metrics::render_gauge(out, "query_cache_on", "", u8::from(c.trusted()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_positive_integers() {
        assert_eq!(positive_id("42", "id").unwrap(), 42);
        for bad in [
            "0",
            "-1",
            "1.5",
            "abc",
            "",
            "+1",
            "99999999999999999999",
            " 1",
        ] {
            assert!(positive_id(bad, "id").is_err(), "{bad}");
        }
    }
}
