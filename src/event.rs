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

    pub fn topic(&self) -> &'static str {
        match self {
            Event::ProductCreated(_) => PRODUCT_TOPIC,
            Event::OrderCreated(_) => ORDER_TOPIC,
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
        let event = match event_type.as_str() {
            PRODUCT_CREATED => Event::ProductCreated(ProductCreated {
                event_id,
                timestamp,
                product_id: json::integer(o.required("productId", "")?, "productId", 1, i64::MAX)?,
                name: json::string(o.required("name", "")?, "name", 200)?,
                category: json::string(o.required("category", "")?, "category", 200)?,
                price_cents: json::money(o.required("price", "")?, "price", i64::MAX)?,
                stock: json::integer(o.required("stock", "")?, "stock", 0, i64::MAX)?,
            }),
            ORDER_CREATED => {
                let raw_items = o.required("items", "")?;
                let list: Vec<&serde_json::value::RawValue> = serde_json::from_str(raw_items.get())
                    .map_err(|_| Error::bad_request("`items` must be an array"))?;
                if list.is_empty() {
                    return Err(Error::bad_request("`items` must not be empty"));
                }
                let mut items = Vec::with_capacity(list.len());
                for raw in list {
                    let mut it = Object::parse_str(raw.get(), "item")?;
                    items.push(OrderItem {
                        product_id: json::integer(
                            it.required("productId", "items[].")?,
                            "productId",
                            1,
                            i64::MAX,
                        )?,
                        product_name: json::string(
                            it.required("productName", "items[].")?,
                            "productName",
                            200,
                        )?,
                        category: json::string(
                            it.required("category", "items[].")?,
                            "category",
                            200,
                        )?,
                        quantity: json::integer(
                            it.required("quantity", "items[].")?,
                            "quantity",
                            1,
                            i64::from(i32::MAX),
                        )?,
                        price_cents: json::money(
                            it.required("price", "items[].")?,
                            "price",
                            i64::MAX,
                        )?,
                    });
                }
                Event::OrderCreated(OrderCreated {
                    event_id,
                    timestamp,
                    order_id: json::integer(o.required("orderId", "")?, "orderId", 1, i64::MAX)?,
                    customer_id: json::integer(
                        o.required("customerId", "")?,
                        "customerId",
                        1,
                        i64::MAX,
                    )?,
                    total_cents: json::money(o.required("total", "")?, "total", i64::MAX)?,
                    items,
                })
            }
            other => return Err(Error::bad_request(format!("unknown eventType {other:?}"))),
        };
        // Extra fields are tolerated: a newer writer may add some.
        Ok(event)
    }
}

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
