//! RabbitMQ connections and topology. Whoever connects first declares everything
//! (declarations are idempotent): a durable direct exchange, one durable queue per topic
//! bound by the topic name, and a dead-letter exchange and queue for events that cannot be
//! applied. amiquip does not reconnect, so callers wrap sessions in `retry_forever`.

use std::time::Duration;

use amiquip::{
    AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable,
    QueueDeclareOptions,
};
use log::warn;

use crate::config::{BrokerNames, Config, QueueType};
use crate::error::Result;
use crate::event::{ORDER_TOPIC, PRODUCT_TOPIC};
use crate::shutdown::Shutdown;

/// Opens a connection with heartbeats and a connect timeout added to the URL unless the URL
/// already sets them.
pub fn connect(config: &Config) -> Result<Connection> {
    let url = with_defaults(
        &config.broker_url,
        config.broker_heartbeat_secs,
        config.db.connect,
    );
    Ok(Connection::insecure_open(&url)?)
}

fn with_defaults(url: &str, heartbeat_secs: u16, timeout: Duration) -> String {
    let mut url = url.to_string();
    for (key, value) in [
        ("heartbeat", heartbeat_secs.to_string()),
        ("connection_timeout", timeout.as_millis().to_string()),
    ] {
        if !url.contains(&format!("{key}=")) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    }
    url
}

/// Declares the exchanges, queues and bindings; safe to call from every process.
pub fn declare_topology(channel: &Channel, names: &BrokerNames) -> Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare(
        ExchangeType::Direct,
        names.exchange.as_str(),
        durable.clone(),
    )?;
    channel.exchange_declare(
        ExchangeType::Fanout,
        names.dead_letter_exchange.as_str(),
        durable,
    )?;
    let mut dlq_args = FieldTable::new();
    queue_type_arg(&mut dlq_args, names.queue_type);
    channel.queue_declare(
        names.dead_letter_queue.as_str(),
        QueueDeclareOptions {
            durable: true,
            arguments: dlq_args,
            ..Default::default()
        },
    )?;
    channel.queue_bind(
        names.dead_letter_queue.as_str(),
        names.dead_letter_exchange.as_str(),
        "",
        FieldTable::new(),
    )?;
    for (queue, topic) in [
        (&names.product_queue, PRODUCT_TOPIC),
        (&names.order_queue, ORDER_TOPIC),
    ] {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(names.dead_letter_exchange.clone()),
        );
        queue_type_arg(&mut args, names.queue_type);
        channel.queue_declare(
            queue.as_str(),
            QueueDeclareOptions {
                durable: true,
                arguments: args,
                ..Default::default()
            },
        )?;
        channel.queue_bind(
            queue.as_str(),
            names.exchange.as_str(),
            topic,
            FieldTable::new(),
        )?;
    }
    Ok(())
}

fn queue_type_arg(args: &mut FieldTable, queue_type: QueueType) {
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
    } else {
        // Classic queue storage v2 (RabbitMQ 3.10+; older brokers ignore the argument):
        // persistent messages are confirmed faster than with v1.
        args.insert("x-queue-version".into(), AmqpValue::LongInt(2));
    }
}

/// Runs `session` until it returns Ok (a clean stop) or shutdown; after an error, waits with
/// exponential backoff (100 ms doubling up to `max_backoff`) and starts a new session.
pub fn retry_forever(
    what: &str,
    shutdown: &Shutdown,
    max_backoff: Duration,
    mut on_error: impl FnMut(),
    mut session: impl FnMut() -> Result<()>,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_triggered() {
        let started = std::time::Instant::now();
        match session() {
            Ok(()) => return,
            Err(e) => {
                on_error();
                // A session that ran for a while was healthy: start the backoff over.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                warn!("{what}: {e}; retrying in {} ms", backoff.as_millis());
                if shutdown.sleep(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_defaults_are_added_once() {
        let u = with_defaults("amqp://h/%2f", 10, Duration::from_millis(3000));
        assert_eq!(u, "amqp://h/%2f?heartbeat=10&connection_timeout=3000");
        let u = with_defaults("amqp://h/?heartbeat=5", 10, Duration::from_millis(3000));
        assert_eq!(u, "amqp://h/?heartbeat=5&connection_timeout=3000");
    }
}
