//! Ranked lists of the read model: best-selling products, categories and customers. Every
//! list's SQL is in the one table [`SORTS`] below, so a change to how the read model stores
//! a view (e.g. shards to sum) is made in one place. Each `ORDER BY` matches a btree index of
//! `sql/read/008_list_indexes.sql` (the small category table needs none), so a request
//! reads `limit` index entries however many rows the view holds.

use crate::db::Pool;
use crate::error::{Error, Result};
use crate::event::format_timestamp;
use crate::http::{percent_decode, Request, Response};

/// The largest `limit` a list request may ask for.
pub const LIMIT_MAX: i64 = 100;
/// The `limit` when the request names none.
pub const LIMIT_DEFAULT: i64 = 10;

/// The three lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Products,
    Categories,
    Customers,
}

impl List {
    /// The JSON key of the list in the response body.
    fn key(self) -> &'static str {
        match self {
            List::Products => "products",
            List::Categories => "categories",
            List::Customers => "customers",
        }
    }
}

/// One way to rank a list: its `sort` value and its query. `$1` is the limit. Highest first,
/// ties by id (or category name, in code point order whatever the database's collation).
/// Money leaves as text under another name (`revenue_text`): an output column named like
/// the table's would be what `ORDER BY` sorts, as text.
struct Sort {
    list: List,
    name: &'static str,
    sql: &'static str,
}

/// Every list and sort, the first of each list being its default. Money is NUMERIC text.
const SORTS: &[Sort] = &[
    Sort {
        list: List::Products,
        name: "revenue",
        sql: "SELECT product_id, name, category, total_quantity_sold, total_revenue::text AS revenue_text, order_count
              FROM product_sales_view ORDER BY total_revenue DESC, product_id LIMIT $1",
    },
    Sort {
        list: List::Products,
        name: "quantity",
        sql: "SELECT product_id, name, category, total_quantity_sold, total_revenue::text AS revenue_text, order_count
              FROM product_sales_view ORDER BY total_quantity_sold DESC, product_id LIMIT $1",
    },
    Sort {
        list: List::Products,
        name: "orders",
        sql: "SELECT product_id, name, category, total_quantity_sold, total_revenue::text AS revenue_text, order_count
              FROM product_sales_view ORDER BY order_count DESC, product_id LIMIT $1",
    },
    Sort {
        list: List::Categories,
        name: "revenue",
        sql: "SELECT category_name, sum(total_revenue)::text AS revenue_text, sum(total_orders)::bigint AS total_orders
              FROM category_metrics_view GROUP BY category_name
              ORDER BY sum(total_revenue) DESC, category_name COLLATE \"C\" LIMIT $1",
    },
    Sort {
        list: List::Categories,
        name: "orders",
        sql: "SELECT category_name, sum(total_revenue)::text AS revenue_text, sum(total_orders)::bigint AS total_orders
              FROM category_metrics_view GROUP BY category_name
              ORDER BY sum(total_orders) DESC, category_name COLLATE \"C\" LIMIT $1",
    },
    Sort {
        list: List::Customers,
        name: "spent",
        sql: "SELECT customer_id, total_spent::text AS spent_text, order_count, last_order_date
              FROM customer_ltv_view ORDER BY total_spent DESC, customer_id LIMIT $1",
    },
    Sort {
        list: List::Customers,
        name: "orders",
        sql: "SELECT customer_id, total_spent::text AS spent_text, order_count, last_order_date
              FROM customer_ltv_view ORDER BY order_count DESC, customer_id LIMIT $1",
    },
];

/// Answers `GET /api/analytics/{products,categories,customers}?sort=..&limit=..`.
pub fn handle(read: &Pool, list: List, req: &Request) -> Result<Response> {
    let (sort, limit) = parse_params(list, req.query.as_deref())?;
    let mut conn = read.get()?;
    let stmt = conn.prepared(sort.sql)?;
    let rows = conn.client.query(&stmt, &[&limit])?;
    let mut body = String::with_capacity(32 + rows.len() * 160);
    body.push_str("{\"");
    body.push_str(list.key());
    body.push_str("\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        render_row(list, row, &mut body);
    }
    body.push_str("]}");
    Ok(Response::json(200, body))
}

/// Appends one row as a JSON object; strings go through serde_json, money is the NUMERIC's
/// own text (a JSON number, exact).
fn render_row(list: List, row: &postgres::Row, out: &mut String) {
    let text = |s: Option<String>| serde_json::to_string(&s).expect("strings serialise");
    let line = match list {
        List::Products => {
            let (id, qty, revenue, orders): (i64, i64, String, i64) =
                (row.get(0), row.get(3), row.get(4), row.get(5));
            let (name, category) = (text(row.get(1)), text(row.get(2)));
            format!(
                r#"{{"productId":{id},"name":{name},"category":{category},"totalQuantitySold":{qty},"totalRevenue":{revenue},"orderCount":{orders}}}"#
            )
        }
        List::Categories => {
            let (name, revenue, orders): (String, String, i64) =
                (row.get(0), row.get(1), row.get(2));
            let name = text(Some(name));
            format!(r#"{{"category":{name},"totalRevenue":{revenue},"totalOrders":{orders}}}"#)
        }
        List::Customers => {
            let (id, spent, orders): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
            let last: Option<chrono::DateTime<chrono::Utc>> = row.get(3);
            let last = text(last.map(|t| format_timestamp(&t)));
            format!(
                r#"{{"customerId":{id},"totalSpent":{spent},"orderCount":{orders},"lastOrderDate":{last}}}"#
            )
        }
    };
    out.push_str(&line);
}

/// Reads `sort` and `limit`. Anything else is refused: an unknown or repeated parameter, a
/// sort the list does not have, a limit that is not an integer from 1 to [`LIMIT_MAX`]. The
/// error's `field` names the parameter.
fn parse_params(list: List, query: Option<&str>) -> Result<(&'static Sort, i64)> {
    let [sort, limit] = known_params(query, ["sort", "limit"], "this list")?;
    let sorts = || SORTS.iter().filter(|s| s.list == list);
    let sort = match sort {
        None => sorts().next().expect("every list has a sort"),
        Some(name) => sorts().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = sorts().map(|s| s.name).collect();
            param_error("sort", &format!("must be one of {}", names.join(", ")))
        })?,
    };
    let limit = match limit {
        None => LIMIT_DEFAULT,
        Some(s) => parse_limit(&s)?,
    };
    Ok((sort, limit))
}

/// The values of the parameters `names` in `query` (percent-decoded), each at most once;
/// any other parameter is refused, naming it in the error's `field` (a typo such as
/// `?limt=5` must not be ignored). `what` says whose parameters they are.
pub fn known_params<const N: usize>(
    query: Option<&str>,
    names: [&str; N],
    what: &str,
) -> Result<[Option<String>; N]> {
    let mut values: [Option<String>; N] = std::array::from_fn(|_| None);
    let pairs = query.unwrap_or("").split('&').filter(|p| !p.is_empty());
    for pair in pairs {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k, true)?, percent_decode(v, true)?);
        let Some(slot) = names.iter().position(|n| *n == k) else {
            return Err(param_error(
                &k,
                &format!("is not a parameter of {what} (use {})", names.join(", ")),
            ));
        };
        if values[slot].is_some() {
            return Err(param_error(&k, "is given more than once"));
        }
        values[slot] = Some(v);
    }
    Ok(values)
}

/// A decimal integer from 1 to [`LIMIT_MAX`], digits only (no sign, no spaces).
fn parse_limit(s: &str) -> Result<i64> {
    let digits = !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    match s.parse::<i64>() {
        Ok(n) if digits && (1..=LIMIT_MAX).contains(&n) => Ok(n),
        _ => Err(param_error(
            "limit",
            &format!("must be an integer from 1 to {LIMIT_MAX}"),
        )),
    }
}

fn param_error(name: &str, problem: &str) -> Error {
    let shown: String = name.chars().take(64).collect();
    Error::bad_request(format!("query parameter `{shown}` {problem}"))
        .with_field("field", shown.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(list: List, q: &str) -> std::result::Result<(&'static str, i64), String> {
        parse_params(list, Some(q))
            .map(|(s, l)| (s.name, l))
            .map_err(|e| {
                let body: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
                body["field"].as_str().unwrap().to_string()
            })
    }

    #[test]
    fn defaults_and_valid_parameters() {
        assert_eq!(parsed(List::Products, ""), Ok(("revenue", 10)));
        assert_eq!(parsed(List::Customers, ""), Ok(("spent", 10)));
        assert_eq!(
            parsed(List::Categories, "sort=orders&limit=100"),
            Ok(("orders", 100))
        );
        assert_eq!(
            parsed(List::Products, "limit=1&sort=quantity"),
            Ok(("quantity", 1))
        );
        assert_eq!(parsed(List::Products, "limit=007"), Ok(("revenue", 7)));
        assert_eq!(parse_params(List::Products, None).unwrap().1, 10);
    }

    #[test]
    fn bad_parameters_name_the_parameter() {
        for (list, q, field) in [
            (List::Products, "sort=spent", "sort"),
            (List::Customers, "sort=revenue", "sort"),
            (List::Categories, "sort=quantity", "sort"),
            (List::Products, "sort=", "sort"),
            (List::Products, "sort=Revenue", "sort"),
            (List::Products, "limit=0", "limit"),
            (List::Products, "limit=101", "limit"),
            (List::Products, "limit=-1", "limit"),
            (List::Products, "limit=+5", "limit"),
            (List::Products, "limit=1.5", "limit"),
            (List::Products, "limit=", "limit"),
            (List::Products, "limit=99999999999999999999", "limit"),
            (List::Products, "limit=5&limit=6", "limit"),
            (List::Products, "page=2", "page"),
            (List::Products, "sort=revenue&limit=5&x=1", "x"),
        ] {
            assert_eq!(parsed(list, q), Err(field.to_string()), "{list:?} {q}");
        }
    }

    #[test]
    fn every_list_has_its_contract_sorts() {
        let names = |l: List| -> Vec<&str> {
            SORTS
                .iter()
                .filter(|s| s.list == l)
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(names(List::Products), ["revenue", "quantity", "orders"]);
        assert_eq!(names(List::Categories), ["revenue", "orders"]);
        assert_eq!(names(List::Customers), ["spent", "orders"]);
    }
}
