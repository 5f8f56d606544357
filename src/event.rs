//! The events: the contract between the outbox (writer) and the consumer (reader). The
//! command service renders them as JSON text into the outbox row; the consumer parses the
//! same text back. Money travels as JSON numbers with two decimals and is parsed from the
//! number's text, so it stays exact to the cent end to end.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::json::{self, Object};

pub const PRODUCT_TOPIC: &str = "product-events";
pub const ORDER_TOPIC: &str = "order-events";
pub const PRODUCT_CREATED: &str = "ProductCreated";
pub const ORDER_CREATED: &str = "OrderCreated";

#[derive(Debug, Clone, PartialEq)]
pub struct ProductCreated {
    pub event_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub product_id: i64,
    pub name: String,
    pub category: String,
    pub price_cents: i64,
    pub stock: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderItem {
    pub product_id: i64,
    pub product_name: String,
    pub category: String,
    pub quantity: i64,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderCreated {
    pub event_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub order_id: i64,
    pub customer_id: i64,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ProductCreated(ProductCreated),
    OrderCreated(OrderCreated),
}

/// RFC 3339, UTC, milliseconds: `2026-02-11T16:35:00.000Z`.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time truncated to milliseconds, so that what we store equals what we print.
pub fn now_millis() -> DateTime<Utc> {
    let now: DateTime<Utc> = std::time::SystemTime::now().into();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

impl Event {
    pub fn event_id(&self) -> Uuid {
        match self {
            Event::ProductCreated(e) => e.event_id,
            Event::OrderCreated(e) => e.event_id,
        }
    }

    pub fn timestamp(&self) -> DateTime<Utc> {
        match self {
            Event::ProductCreated(e) => e.timestamp,
            Event::OrderCreated(e) => e.timestamp,
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Event::ProductCreated(_) => PRODUCT_CREATED,
            Event::OrderCreated(_) => ORDER_CREATED,
        }
    }

    /// The payload as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            Event::ProductCreated(e) => format!(
                r#"{{"eventId":"{}","eventType":"{PRODUCT_CREATED}","timestamp":"{}","productId":{},"name":{},"category":{},"price":{},"stock":{}}}"#,
                e.event_id,
                format_timestamp(&e.timestamp),
                e.product_id,
                quote(&e.name),
                quote(&e.category),
                json::format_cents(e.price_cents),
                e.stock
            ),
            Event::OrderCreated(e) => {
                let mut items = String::with_capacity(e.items.len() * 96);
                for (i, it) in e.items.iter().enumerate() {
                    if i > 0 {
                        items.push(',');
                    }
                    items.push_str(&format!(
                        r#"{{"productId":{},"productName":{},"category":{},"quantity":{},"price":{}}}"#,
                        it.product_id,
                        quote(&it.product_name),
                        quote(&it.category),
                        it.quantity,
                        json::format_cents(it.price_cents)
                    ));
                }
                format!(
                    r#"{{"eventId":"{}","eventType":"{ORDER_CREATED}","timestamp":"{}","orderId":{},"customerId":{},"items":[{items}],"total":{}}}"#,
                    e.event_id,
                    format_timestamp(&e.timestamp),
                    e.order_id,
                    e.customer_id,
                    json::format_cents(e.total_cents)
                )
            }
        }
    }

    /// Parses and validates a payload. Any failure here is permanent for that message.
    pub fn parse(body: &[u8]) -> Result<Event> {
        let text =
            std::str::from_utf8(body).map_err(|_| Error::bad_request("event is not UTF-8"))?;
        let mut o = Object::parse_str(text, "event")?;
        let event_id = uuid(&mut o, "eventId")?;
        let event_type = json::string(o.required("eventType", "")?, "eventType", 64)?;
        let timestamp = timestamp(&mut o)?;
        // Extra fields are tolerated: a newer writer may add some.
        match event_type.as_str() {
            PRODUCT_CREATED => Ok(Event::ProductCreated(ProductCreated {
                event_id,
                timestamp,
                product_id: id(&mut o, "productId", "")?,
                name: text_field(&mut o, "name", "")?,
                category: text_field(&mut o, "category", "")?,
                price_cents: money(&mut o, "price", "")?,
                stock: json::integer(o.required("stock", "")?, "stock", 0, i64::MAX)?,
            })),
            ORDER_CREATED => Ok(Event::OrderCreated(OrderCreated {
                event_id,
                timestamp,
                items: order_items(&mut o)?,
                order_id: id(&mut o, "orderId", "")?,
                customer_id: id(&mut o, "customerId", "")?,
                total_cents: money(&mut o, "total", "")?,
            })),
            other => Err(Error::bad_request(format!("unknown eventType {other:?}"))),
        }
    }
}

/// The `items` of an `OrderCreated`: a non-empty array of line objects.
fn order_items(o: &mut Object) -> Result<Vec<OrderItem>> {
    let raw_items = o.required("items", "")?;
    let list: Vec<&serde_json::value::RawValue> = serde_json::from_str(raw_items.get())
        .map_err(|_| Error::bad_request("`items` must be an array"))?;
    if list.is_empty() {
        return Err(Error::bad_request("`items` must not be empty"));
    }
    let mut items = Vec::with_capacity(list.len());
    for raw in list {
        let mut it = Object::parse_str(raw.get(), "item")?;
        let path = "items[].";
        items.push(OrderItem {
            product_id: id(&mut it, "productId", path)?,
            product_name: text_field(&mut it, "productName", path)?,
            category: text_field(&mut it, "category", path)?,
            quantity: json::integer(
                it.required("quantity", path)?,
                "quantity",
                1,
                i64::from(i32::MAX),
            )?,
            price_cents: money(&mut it, "price", path)?,
        });
    }
    Ok(items)
}

/// A positive id.
fn id(o: &mut Object, field: &str, path: &str) -> Result<i64> {
    json::integer(o.required(field, path)?, field, 1, i64::MAX)
}

/// A name or category, as long as the write API allows and more.
fn text_field(o: &mut Object, field: &str, path: &str) -> Result<String> {
    json::string(o.required(field, path)?, field, TEXT_CHARS_MAX)
}

fn money(o: &mut Object, field: &str, path: &str) -> Result<i64> {
    json::money(o.required(field, path)?, field, i64::MAX)
}

/// The longest name or category an event may carry.
const TEXT_CHARS_MAX: usize = 200;

fn uuid(o: &mut Object, field: &str) -> Result<Uuid> {
    let s = json::string(o.required(field, "")?, field, 64)?;
    Uuid::parse_str(&s).map_err(|_| Error::bad_request(format!("`{field}` must be a UUID")))
}

fn timestamp(o: &mut Object) -> Result<DateTime<Utc>> {
    let s = json::string(o.required("timestamp", "")?, "timestamp", 64)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Error::bad_request("`timestamp` must be an RFC 3339 timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_round_trips() {
        let e = Event::OrderCreated(OrderCreated {
            event_id: Uuid::new_v4(),
            timestamp: now_millis(),
            order_id: 7,
            customer_id: 50,
            items: vec![OrderItem {
                product_id: 1,
                product_name: "Mouse \"Pro\"".into(),
                category: "Electronics".into(),
                quantity: 3,
                price_cents: 2999,
            }],
            total_cents: 8997,
        });
        let text = e.to_json();
        assert!(text.contains(r#""total":89.97"#), "{text}");
        assert_eq!(Event::parse(text.as_bytes()).unwrap(), e);
    }

    #[test]
    fn product_round_trips() {
        let e = Event::ProductCreated(ProductCreated {
            event_id: Uuid::new_v4(),
            timestamp: now_millis(),
            product_id: 1,
            name: "Laptop".into(),
            category: "Electronics".into(),
            price_cents: 129999,
            stock: 50,
        });
        assert_eq!(Event::parse(e.to_json().as_bytes()).unwrap(), e);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Event::parse(b"not json").is_err());
        assert!(Event::parse(br#"{"eventId":"x","eventType":"OrderCreated"}"#).is_err());
    }
}
