//! Phase `broker`: RabbitMQ alone, with our message shape and our windows, via amiquip over
//! the same connection code as the services (`broker::connect`, TCP_NODELAY): publish N
//! persistent, mandatory messages of the size of our order events to our topology with
//! confirms, `BATCHES_IN_FLIGHT` batches of `OUTBOX_BATCH_SIZE` in flight as the outbox
//! publisher does; then consume them with `CONSUMER_PREFETCH` and one `ack_multiple` per
//! batch of up to `CONSUMER_BATCH_SIZE` (filled, as the consumer's are under a backlog).
//! No database (a CHECKPOINT first, so earlier phases' writes are not flushed meanwhile).
//! The backlog drains are stated as ratios of these two rates.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use cqrs_analytics::config::Config;
use cqrs_analytics::event::ORDER_TOPIC;
use cqrs_analytics::{broker, write::outbox};
use serde_json::{json, Value};

use crate::ceiling::Ceilings;
use crate::harness::{broker_url, TestEnv};
use crate::report::{Figures, Row};
use crate::sample::{cpu_delta, cpu_snapshot};
use crate::{log, round, Settings};

pub struct BrokerFigures {
    pub messages: usize,
    pub message_bytes: usize,
    pub confirms_per_s: f64,
    pub delivers_per_s: f64,
    pub publish_cpu: Value,
    pub consume_cpu: Value,
    pub window: String,
    pub error: Option<String>,
}

pub fn run(s: &Settings, message_bytes: usize) -> BrokerFigures {
    let env = TestEnv::new();
    let mut config = Config::from_lookup(|k| match k {
        "BROKER_URL" => Some(broker_url()),
        _ => std::env::var(k).ok(),
    })
    .expect("the binary's variables in the environment");
    config.broker = env.broker.clone();
    let n = s.backlog.max(1) as usize;
    let mut f = BrokerFigures {
        messages: n,
        message_bytes,
        confirms_per_s: f64::NAN,
        delivers_per_s: f64::NAN,
        publish_cpu: Value::Null,
        consume_cpu: Value::Null,
        window: format!(
            "{} batches of {} in flight; prefetch {}, ack per {}",
            outbox::BATCHES_IN_FLIGHT,
            config.outbox_batch_size_max,
            config.consumer_prefetch,
            config.consumer_batch_size_max
        ),
        error: None,
    };
    log(format!(
        "broker alone: {n} messages of {message_bytes} bytes ({})",
        f.window
    ));
    crate::services::checkpoint();
    let c0 = cpu_snapshot(&[]);
    match publish(&config, n, message_bytes) {
        Ok(secs) => f.confirms_per_s = n as f64 / secs,
        Err(e) => f.error = Some(format!("publishing: {e}")),
    }
    let c1 = cpu_snapshot(&[]);
    f.publish_cpu = cpu_delta(&c0, &c1);
    if f.error.is_none() {
        match consume(&config, n) {
            Ok(secs) => f.delivers_per_s = n as f64 / secs,
            Err(e) => f.error = Some(format!("consuming: {e}")),
        }
        f.consume_cpu = cpu_delta(&c1, &cpu_snapshot(&[]));
    }
    log(format!(
        "broker alone: {:.0} confirms/s, {:.0} delivers/s",
        f.confirms_per_s, f.delivers_per_s
    ));
    f
}

/// Publishes `n` messages in batches, the outbox publisher's window; seconds from the
/// first publish to the last confirm.
fn publish(config: &Config, n: usize, bytes: usize) -> Result<f64, String> {
    let mut conn = broker::connect(config).map_err(|e| e.to_string())?;
    let ch = conn.open_channel(None).map_err(|e| e.to_string())?;
    broker::declare_topology(&ch, &config.broker).map_err(|e| e.to_string())?;
    ch.enable_publisher_confirms().map_err(|e| e.to_string())?;
    let confirms = ch
        .listen_for_publisher_confirms()
        .map_err(|e| e.to_string())?;
    let _returns = ch.listen_for_returns().map_err(|e| e.to_string())?;
    let mut smoother = ConfirmSmoother::new();
    let body = vec![b'x'; bytes];
    let batch = config.outbox_batch_size_max.max(1);
    let (mut sent, mut confirmed) = (0usize, 0u64);
    let mut in_flight: VecDeque<u64> = VecDeque::with_capacity(outbox::BATCHES_IN_FLIGHT);
    let start = Instant::now();
    while sent < n || !in_flight.is_empty() {
        while sent < n && in_flight.len() < outbox::BATCHES_IN_FLIGHT {
            let k = batch.min(n - sent);
            for _ in 0..k {
                let properties = AmqpProperties::default()
                    .with_message_id(uuid::Uuid::new_v4().to_string())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_type_("OrderCreated".into())
                    .with_timestamp(1_700_000_000);
                let publish = Publish {
                    body: &body,
                    routing_key: ORDER_TOPIC.into(),
                    mandatory: true,
                    immediate: false,
                    properties,
                };
                ch.basic_publish(config.broker.exchange.as_str(), publish)
                    .map_err(|e| e.to_string())?;
            }
            sent += k;
            in_flight.push_back(sent as u64);
        }
        let end = in_flight.pop_front().expect("a batch in flight");
        while confirmed < end {
            let raw = confirms
                .recv_timeout(Duration::from_secs(30))
                .map_err(|e| format!("no confirm: {e}"))?;
            for c in smoother.process(raw) {
                let amiquip::Confirm::Ack(p) = c else {
                    return Err("the broker nacked a message".into());
                };
                confirmed = confirmed.max(p.delivery_tag);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = conn.close();
    Ok(secs)
}

/// Consumes `n` messages the consumer's way; seconds from the first delivery to the last ack.
fn consume(config: &Config, n: usize) -> Result<f64, String> {
    let mut conn = broker::connect(config).map_err(|e| e.to_string())?;
    let ch = conn.open_channel(None).map_err(|e| e.to_string())?;
    ch.qos(0, config.consumer_prefetch, false)
        .map_err(|e| e.to_string())?;
    let consumer = ch
        .basic_consume(
            config.broker.order_queue.as_str(),
            ConsumerOptions::default(),
        )
        .map_err(|e| e.to_string())?;
    let rx = consumer.receiver();
    let next = |wait: bool| -> Result<Option<amiquip::Delivery>, String> {
        let m = if wait {
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|e| format!("no delivery: {e}"))?
        } else {
            // Under a backlog our consumer's batches are full (the prefetch window refills
            // while a batch is applied); wait a moment for the next delivery so these are
            // too, instead of acking whatever has arrived this microsecond.
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(m) => m,
                Err(_) => return Ok(None),
            }
        };
        match m {
            ConsumerMessage::Delivery(d) => Ok(Some(d)),
            other => Err(format!("consumer stopped: {other:?}")),
        }
    };
    let (mut got, mut start) = (0usize, None);
    while got < n {
        let first = next(true)?.expect("waited for a delivery");
        start.get_or_insert_with(Instant::now);
        let mut last = first;
        let mut in_batch = 1;
        while in_batch < config.consumer_batch_size_max {
            match next(false)? {
                Some(d) => last = d,
                None => break,
            }
            in_batch += 1;
        }
        last.ack_multiple(&ch).map_err(|e| e.to_string())?;
        got += in_batch;
    }
    let secs = start.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    let _ = conn.close();
    Ok(secs)
}

impl Figures for BrokerFigures {
    fn rows(&self, _: &Ceilings) -> Vec<Row> {
        let detail = format!(
            "{} msgs of {} B; {}",
            self.messages, self.message_bytes, self.window
        );
        let mut rows = vec![
            Row::info("broker alone: confirms/s", self.confirms_per_s, "msg/s").detail(detail),
            Row::info("broker alone: delivers/s", self.delivers_per_s, "msg/s"),
        ];
        if let Some(e) = &self.error {
            rows.push(Row::info("broker alone failed", f64::NAN, "-").detail(e.clone()));
        }
        rows
    }

    fn json(&self) -> Value {
        json!({"messages": self.messages, "message_bytes": self.message_bytes, "window": self.window,
               "confirms_per_second": round(self.confirms_per_s, 0), "delivers_per_second": round(self.delivers_per_s, 0),
               "publish_cpu_cores": self.publish_cpu, "consume_cpu_cores": self.consume_cpu, "error": self.error})
    }
}
