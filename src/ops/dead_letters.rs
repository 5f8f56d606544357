//! `cqrs-analytics dead-letters list | replay --all | replay EVENT_ID... | discard
//! EVENT_ID...`: inspect the dead-letter queue, put its messages back on their work queues
//! after a fix, or remove the ones no fix will make apply (printed whole first).
//!
//! Both commands take the messages off the dead-letter queue unacked (at most
//! `DEAD_LETTERS_MAX` per run), so nothing else sees them meanwhile and a crash puts them
//! back. `list` returns them all untouched. `replay` first forgets the selected events'
//! failure records (`event_failures`): a replayed event gets the usual
//! `CONSUMER_MAX_ATTEMPTS` fresh attempts, and one that still fails goes back to the
//! dead-letter queue after them, where it stays until someone replays it again (no loop).
//! It then republishes each one to the events exchange with its original routing key
//! (persistent, mandatory, with publisher confirms) and only after the broker confirmed
//! every publish does it ack the dead-letter copies. A crash in between leaves a message in
//! both queues; the consumer's `processed_events` makes the second copy a no-op, so a
//! replayed event is applied exactly once.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use amiquip::{Channel, Confirm, ConfirmSmoother, Get, Publish, QueueDeclareOptions};
use chrono::{DateTime, Utc};
use postgres::NoTls;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::{format_timestamp, Event};

/// Messages one run takes off the dead-letter queue at most (they are held in memory).
pub const DEAD_LETTERS_MAX: usize = 10_000;
/// How long `replay` waits for the broker's confirms.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// What a `dead-letters` command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    List,
    /// `replay --all` (None) or `replay EVENT_ID...`.
    Replay(Option<BTreeSet<String>>),
    Discard(BTreeSet<String>),
}

impl Op {
    /// The operation `args` (after `dead-letters`) ask for; None is bad usage.
    pub fn parse(args: &[String]) -> Option<Op> {
        let ids = || args[1..].iter().cloned().collect::<BTreeSet<_>>();
        match args.first().map(String::as_str)? {
            "list" if args.len() == 1 => Some(Op::List),
            "replay" if args.len() == 2 && args[1] == "--all" => Some(Op::Replay(None)),
            "replay" if args.len() > 1 && args[1..].iter().all(|a| !a.starts_with('-')) => {
                Some(Op::Replay(Some(ids())))
            }
            // `-` is how `list` shows a message with no event id: `discard -` removes those.
            "discard"
                if args.len() > 1 && args[1..].iter().all(|a| a == "-" || !a.starts_with('-')) =>
            {
                Some(Op::Discard(ids()))
            }
            _ => None,
        }
    }
}

/// Runs the operation; Ok(false) means "done, but exit 1" (an id that was not there).
pub fn run(config: &Config, op: Op, out: &mut dyn Write) -> Result<bool> {
    match op {
        Op::List => list(config, out).map(|()| true),
        Op::Replay(wanted) => replay(config, wanted, out),
        Op::Discard(wanted) => discard(config, wanted, out),
    }
}

/// A message taken off the dead-letter queue, and what `event_failures` says about it.
struct DeadLetter {
    get: Get,
    id: String,
    event_type: String,
}

/// Failure record of one event: attempts, last error, when.
type Failure = (i32, String, DateTime<Utc>);

/// Connects, and takes the lock that makes dead-letter commands run one at a time (for as
/// long as the connection is open): an exclusive queue named after the dead-letter queue,
/// which the broker lets only one connection declare and deletes when that one closes, also
/// when its process dies. Two commands at once each took part of the messages off the
/// queue: `replay --all` could exit 0 having replayed nothing, `replay ID` call a present id
/// missing.
fn open(config: &Config) -> Result<(amiquip::Connection, Channel)> {
    let mut connection = crate::broker::connect(config)?;
    let channel = connection.open_channel(None)?;
    crate::broker::declare_topology(&channel, &config.broker)?;
    let lock = format!("{}.command-lock", config.broker.dead_letter_queue);
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    match channel.queue_declare(lock, exclusive) {
        Ok(_) => Ok((connection, channel)),
        // RESOURCE_LOCKED: another connection has it.
        Err(amiquip::Error::ServerClosedChannel { code: 405, .. }) => Err(Error::unavailable(
            "another dead-letters command is running on this dead-letter queue; run this one when it is done",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Takes up to `DEAD_LETTERS_MAX` messages off the dead-letter queue, unacked.
fn take_all(channel: &Channel, config: &Config) -> Result<(Vec<DeadLetter>, u32)> {
    let mut taken = Vec::new();
    let mut left = 0;
    while taken.len() < DEAD_LETTERS_MAX {
        let Some(get) = channel.basic_get(config.broker.dead_letter_queue.as_str(), false)? else {
            break;
        };
        left = get.message_count;
        let props = &get.delivery.properties;
        let parsed = Event::parse(&get.delivery.body).ok();
        let id = props
            .message_id()
            .clone()
            .filter(|id| !id.is_empty())
            .or_else(|| parsed.as_ref().map(|e| e.event_id().to_string()))
            .unwrap_or_else(|| "-".into());
        let event_type = props
            .type_()
            .clone()
            .or_else(|| parsed.as_ref().map(|e| e.event_type().to_string()))
            .unwrap_or_else(|| "(not an event)".into());
        taken.push(DeadLetter {
            get,
            id,
            event_type,
        });
    }
    Ok((taken, left))
}

fn read_db(config: &Config) -> Result<postgres::Client> {
    let mut c = config.read_db.clone();
    c.application_name("cqrs-analytics-dead-letters");
    Ok(c.connect(NoTls)?)
}

fn failures(config: &Config, ids: &[&str]) -> Result<HashMap<String, Failure>> {
    let rows = read_db(config)?.query(
        "SELECT message_key, attempts, last_error, updated_at FROM event_failures
         WHERE message_key = ANY($1)",
        &[&ids],
    )?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect())
}

fn list(config: &Config, out: &mut dyn Write) -> Result<()> {
    let (connection, channel) = open(config)?;
    let (taken, left) = take_all(&channel, config)?;
    let ids: Vec<&str> = taken.iter().map(|d| d.id.as_str()).collect();
    let known = failures(config, &ids)?;
    writeln!(out, "ID\tTYPE\tATTEMPTS\tWHEN\tLAST ERROR")?;
    for d in &taken {
        let (attempts, when, error) = match known.get(&d.id) {
            Some((n, error, at)) => (n.to_string(), format_timestamp(at), error.as_str()),
            None => (
                "1".into(),
                "-".into(),
                "not a valid event (dead-lettered at once)",
            ),
        };
        let error = error.replace(['\n', '\t'], " ");
        writeln!(
            out,
            "{}\t{}\t{attempts}\t{when}\t{error}",
            d.id, d.event_type
        )?;
    }
    writeln!(
        out,
        "{} dead-lettered message(s)",
        taken.len() + left as usize
    )?;
    // Everything goes back, in order, untouched.
    channel.nack_all(true)?;
    drop(channel.close());
    drop(connection.close());
    Ok(())
}

/// Takes the dead letters off the queue unacked and splits them: those `wanted` names (all
/// if None), and the ids asked for that were not there. The rest go back untouched when
/// the caller nacks all.
struct Selection {
    connection: amiquip::Connection,
    channel: Channel,
    selected: Vec<DeadLetter>,
    missing: Vec<String>,
    left: u32,
}

impl Selection {
    fn take(config: &Config, wanted: Option<&BTreeSet<String>>) -> Result<Selection> {
        let (connection, channel) = open(config)?;
        let (taken, left) = take_all(&channel, config)?;
        let selected: Vec<DeadLetter> = taken
            .into_iter()
            .filter(|d| wanted.is_none_or(|w| w.contains(&d.id)))
            .collect();
        let missing = wanted
            .into_iter()
            .flatten()
            .filter(|id| !selected.iter().any(|d| &d.id == *id))
            .cloned()
            .collect();
        Ok(Selection {
            connection,
            channel,
            selected,
            missing,
            left,
        })
    }

    /// Forgets the selected events' failure records.
    fn forget_failures(&self, config: &Config) -> Result<()> {
        let ids: Vec<&str> = self.selected.iter().map(|d| d.id.as_str()).collect();
        read_db(config)?.execute(
            "DELETE FROM event_failures WHERE message_key = ANY($1)",
            &[&ids],
        )?;
        Ok(())
    }

    /// Acks the selected messages (they leave the dead-letter queue), puts every other one
    /// back, reports the ids that were not there; Ok(false) if some were not.
    fn finish(self, out: &mut dyn Write) -> Result<bool> {
        for d in self.selected {
            d.get.ack(&self.channel)?;
        }
        self.channel.nack_all(true)?;
        for id in &self.missing {
            writeln!(out, "not in the dead-letter queue: {id}")?;
        }
        drop(self.channel.close());
        drop(self.connection.close());
        Ok(self.missing.is_empty())
    }
}

fn replay(config: &Config, wanted: Option<BTreeSet<String>>, out: &mut dyn Write) -> Result<bool> {
    let s = Selection::take(config, wanted.as_ref())?;
    if !s.selected.is_empty() {
        // A fresh count of attempts: the replay follows a fix.
        s.forget_failures(config)?;
        republish(&s.channel, config, &s.selected)?;
    }
    for d in s.selected.iter() {
        writeln!(out, "replayed {} ({})", d.id, d.event_type)?;
    }
    if s.left > 0 && wanted.is_none() {
        writeln!(out, "{} more remain; run the replay again", s.left)?;
    }
    s.finish(out)
}

/// Removes the chosen dead letters for good, each printed first on one line (id, type, the
/// body as a JSON string) so that the output is the record of what was dropped.
fn discard(config: &Config, wanted: BTreeSet<String>, out: &mut dyn Write) -> Result<bool> {
    let s = Selection::take(config, Some(&wanted))?;
    for d in s.selected.iter() {
        let body = serde_json::Value::String(String::from_utf8_lossy(&d.get.delivery.body).into());
        writeln!(out, "discarded {} ({}): {body}", d.id, d.event_type)?;
    }
    out.flush()?;
    if !s.selected.is_empty() {
        s.forget_failures(config)?;
    }
    s.finish(out)
}

/// Publishes copies of `letters` to the events exchange and waits until the broker has
/// confirmed every one (and returned none as unroutable).
fn republish(channel: &Channel, config: &Config, letters: &[DeadLetter]) -> Result<()> {
    channel.enable_publisher_confirms()?;
    let confirms = channel.listen_for_publisher_confirms()?;
    let returns = channel.listen_for_returns()?;
    for d in letters {
        channel.basic_publish(
            config.broker.exchange.as_str(),
            Publish {
                body: &d.get.delivery.body,
                routing_key: d.get.delivery.routing_key.clone(),
                mandatory: true,
                immediate: false,
                properties: d.get.delivery.properties.clone().with_delivery_mode(2),
            },
        )?;
    }
    let mut smoother = ConfirmSmoother::new();
    let mut acked = 0;
    let deadline = Instant::now() + CONFIRM_TIMEOUT;
    while acked < letters.len() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let confirm = confirms
            .recv_timeout(wait)
            .map_err(|_| Error::unavailable("the broker did not confirm the replayed messages"))?;
        for c in smoother.process(confirm) {
            match c {
                Confirm::Ack(_) => acked += 1,
                Confirm::Nack(_) => {
                    return Err(Error::unavailable(
                        "the broker refused a replayed message; nothing was removed from the dead-letter queue",
                    ))
                }
            }
        }
    }
    if let Ok(r) = returns.try_recv() {
        return Err(Error::unavailable(format!(
            "a replayed message was unroutable ({}); nothing was removed from the dead-letter queue",
            r.reply_text
        )));
    }
    Ok(())
}
