//! Ranked lists over HTTP against read tables seeded in SQL: exact order (ties by id or
//! category name), exact money, limits, and 400s that name the bad parameter.

use cqrs_analytics::app::Role;
use serde_json::{json, Value};

use crate::harness::*;

fn seed(env: &TestEnv) {
    env.read()
        .batch_execute(
            "INSERT INTO product_sales_view (product_id, name, category, total_quantity_sold, total_revenue, order_count) VALUES
                (1, 'Mouse', 'Electronics', 30, 899.70, 12),
                (2, 'Laptop', 'Electronics', 2, 2599.98, 2),
                (3, 'Chair', 'Home & Garden', 4, 899.70, 4),
                (4, '<img src=x onerror=alert(1)>', 'Café', 30, 0.10, 12),
                (5, 'Lamp', 'Home & Garden', 0, 0, 0),
                (6, 'Desk \"Pro\"', 'Home & Garden', 1, 12345678901234.56, 1);
             INSERT INTO category_metrics_view (category_name, total_revenue, total_orders) VALUES
                ('Electronics', 3499.68, 14), ('Home & Garden', 899.70, 5), ('Café', 0.10, 14),
                ('apple', 899.70, 5), ('Zebra', 899.70, 1), ('Empty', 0, 0);
             INSERT INTO customer_ltv_view (customer_id, total_spent, order_count, last_order_date) VALUES
                (100, 3899.97, 3, '2026-02-11T16:35:00Z'),
                (7, 0.01, 9, '2026-02-11T16:35:00.123Z'),
                (50, 3899.97, 1, '2026-01-01T00:00:00Z'),
                (8, 10.00, 9, NULL);",
        )
        .unwrap();
}

fn list(addr: std::net::SocketAddr, path: &str) -> Value {
    let r = get(addr, path);
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    assert!(
        r.headers.contains("Content-Type: application/json"),
        "GET {path}: {}",
        r.headers
    );
    r.json()
}

/// The ids (or names) of a list, in order.
fn keys(body: &Value, list: &str, key: &str) -> Vec<Value> {
    body[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} array in {body}"))
        .iter()
        .map(|e| e[key].clone())
        .collect()
}

#[test]
fn product_lists_rank_with_ties_by_id_and_exact_money() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    let body = list(q, "/api/analytics/products");
    assert_eq!(keys(&body, "products", "productId"), [6, 2, 1, 3, 4, 5]);
    assert_eq!(
        body["products"][0],
        json!({"productId": 6, "name": "Desk \"Pro\"", "category": "Home & Garden",
               "totalQuantitySold": 1, "totalRevenue": 12345678901234.56, "orderCount": 1})
    );
    assert_eq!(
        body["products"][4],
        json!({"productId": 4, "name": "<img src=x onerror=alert(1)>", "category": "Café",
               "totalQuantitySold": 30, "totalRevenue": 0.1, "orderCount": 12})
    );
    let raw = get(q, "/api/analytics/products?limit=1").body;
    assert!(
        raw.contains(r#""totalRevenue":12345678901234.56,"#),
        "money is the exact decimal text: {raw}"
    );
    let by_qty = list(q, "/api/analytics/products?sort=quantity&limit=3");
    assert_eq!(keys(&by_qty, "products", "productId"), [1, 4, 3]);
    let by_orders = list(q, "/api/analytics/products?limit=100&sort=orders");
    assert_eq!(
        keys(&by_orders, "products", "productId"),
        [1, 4, 3, 2, 6, 5]
    );
    let revenue_2 = list(q, "/api/analytics/products?sort=revenue&limit=2");
    assert_eq!(keys(&revenue_2, "products", "productId"), [6, 2]);
}

#[test]
fn category_and_customer_lists_rank_with_ties() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    let body = list(q, "/api/analytics/categories");
    // Ties by name in code point order: "Home & Garden" < "Zebra" < "apple".
    assert_eq!(
        keys(&body, "categories", "category"),
        [
            "Electronics",
            "Home & Garden",
            "Zebra",
            "apple",
            "Café",
            "Empty"
        ]
    );
    assert_eq!(
        body["categories"][0],
        json!({"category": "Electronics", "totalRevenue": 3499.68, "totalOrders": 14})
    );
    let by_orders = list(q, "/api/analytics/categories?sort=orders&limit=4");
    assert_eq!(
        keys(&by_orders, "categories", "category"),
        ["Café", "Electronics", "Home & Garden", "apple"]
    );
    let body = list(q, "/api/analytics/customers");
    assert_eq!(keys(&body, "customers", "customerId"), [50, 100, 8, 7]);
    assert_eq!(
        body["customers"][0],
        json!({"customerId": 50, "totalSpent": 3899.97, "orderCount": 1,
               "lastOrderDate": "2026-01-01T00:00:00.000Z"})
    );
    assert_eq!(body["customers"][2]["lastOrderDate"], Value::Null);
    let by_orders = list(q, "/api/analytics/customers?sort=orders&limit=3");
    assert_eq!(keys(&by_orders, "customers", "customerId"), [7, 8, 100]);
    assert_eq!(
        by_orders["customers"][0],
        json!({"customerId": 7, "totalSpent": 0.01, "orderCount": 9,
               "lastOrderDate": "2026-02-11T16:35:00.123Z"})
    );
}

#[test]
fn lists_of_an_empty_read_model_are_empty() {
    let env = TestEnv::new();
    let app = env.start(Role::Query);
    let q = app.query();
    for (path, key) in [
        ("/api/analytics/products", "products"),
        ("/api/analytics/categories?sort=orders", "categories"),
        ("/api/analytics/customers?limit=100", "customers"),
    ] {
        assert_eq!(list(q, path), json!({ key: [] }), "GET {path}");
    }
}

#[test]
fn bad_list_parameters_are_400_naming_the_parameter() {
    let env = TestEnv::new();
    seed(&env);
    let app = env.start(Role::Query);
    let q = app.query();
    for (path, field) in [
        ("/api/analytics/products?sort=spent", "sort"),
        ("/api/analytics/products?sort=", "sort"),
        ("/api/analytics/categories?sort=quantity", "sort"),
        ("/api/analytics/customers?sort=revenue", "sort"),
        ("/api/analytics/products?limit=0", "limit"),
        ("/api/analytics/products?limit=101", "limit"),
        ("/api/analytics/customers?limit=-3", "limit"),
        ("/api/analytics/categories?limit=ten", "limit"),
        ("/api/analytics/products?limit=5&limit=5", "limit"),
        ("/api/analytics/products?page=2", "page"),
        ("/api/analytics/customers?sort=spent&order=asc", "order"),
    ] {
        let r = get(q, path);
        assert_eq!(r.status, 400, "GET {path}: {}", r.body);
        let body = r.json();
        assert_eq!(body["field"], field, "GET {path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(&format!("`{field}`")), "GET {path}: {error}");
    }
    let r = get(q, "/api/analytics/products?sort=%ZZ");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(q, "POST", "/api/analytics/products", &[], b"");
    assert_eq!(r.status, 405, "{}", r.body);
}
