use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::NaiveDate;
use keel_domain::money::Currency;
use keel_domain::order::OrderStatus;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{AppState, decode_cursor, limit, one_of, raw, raw_page, serve};
use crate::error::ApiError;

pub(super) fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::BadRequest {
        detail: e.body_text(),
        field: None,
    })
}

/// One row by key, as the JSON text PostgreSQL makes of it (`sql` selects `…::text`),
/// passed through without parsing.
async fn one(state: &AppState, sql: &str, id: &str, what: &str) -> Result<Box<RawValue>, ApiError> {
    let json = sqlx::query_scalar::<_, String>(sql)
        .bind(id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no {what} {id:?}")))?;
    raw(json)
}

/// `GET /v1/orders/{id}`.
pub(super) async fn order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&state, &headers, "orders", Some(("order", &id)), async {
        let plain = "SELECT to_jsonb(o)::text FROM orders o WHERE order_id = $1";
        if !state.fulfilment.runs(&state.pool).await? {
            return one(&state, plain, &id, "order").await;
        }
        // With where the fulfilment process is with it, when it follows it.
        let with_process = "SELECT (to_jsonb(o) || jsonb_build_object('fulfilment_process', (
                     SELECT jsonb_build_object('step', f.step, 'since', f.step_since,
                                               'payment_due', f.payment_due)
                     FROM fulfilment f WHERE f.order_id = o.order_id)))::text
                 FROM orders o WHERE order_id = $1";
        match one(&state, with_process, &id, "order").await {
            // Unavailable: the table may be gone (a database restored without it), so it
            // is looked up again; meanwhile the order is served without it.
            Err(ApiError::Unavailable(_)) => {
                state.fulfilment.forget();
                one(&state, plain, &id, "order").await
            }
            other => other,
        }
    })
    .await
}

/// Whether the fulfilment process has run on the views' database (its table exists):
/// once seen, for good (until a read of it fails); until then looked up at most once
/// every ten seconds.
#[derive(Clone, Debug, Default)]
pub struct FulfilmentSeen(
    std::sync::Arc<(std::sync::atomic::AtomicBool, std::sync::atomic::AtomicI64)>,
);

impl FulfilmentSeen {
    /// How long a lookup that found no table stands.
    const LOOK_AGAIN_MS: i64 = 10_000;

    async fn runs(&self, pool: &sqlx::PgPool) -> Result<bool, ApiError> {
        use std::sync::atomic::Ordering;
        let (seen, looked) = &*self.0;
        if seen.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let now = chrono::Utc::now().timestamp_millis();
        if now - looked.load(Ordering::Relaxed) < Self::LOOK_AGAIN_MS {
            return Ok(false);
        }
        looked.store(now, Ordering::Relaxed);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('fulfilment') IS NOT NULL")
            .fetch_one(pool)
            .await?;
        seen.store(exists, Ordering::Relaxed);
        Ok(exists)
    }

    /// Looks the table up again at the next read.
    fn forget(&self) {
        use std::sync::atomic::Ordering;
        self.0.0.store(false, Ordering::Relaxed);
        self.0.1.store(0, Ordering::Relaxed);
    }
}

/// `GET /v1/products/{sku}`.
pub(super) async fn product(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(
        &state,
        &headers,
        "products",
        Some(("product", &sku)),
        one(
            &state,
            "SELECT (to_jsonb(p) - 'reservations')::text FROM products p WHERE sku = $1",
            &sku,
            "product",
        ),
    )
    .await
}

/// `GET /v1/customers/{id}`.
pub(super) async fn customer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(
        &state,
        &headers,
        "customers",
        // A customer's row holds the totals of its orders too: held back by any parked
        // stream the view holds back.
        None,
        one(
            &state,
            "SELECT to_jsonb(c)::text FROM customers c WHERE customer_id = $1",
            &id,
            "customer",
        ),
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OrderFilter {
    customer_id: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/orders?customer_id=&status=&limit=&cursor=`, ordered by order id.
pub(super) async fn list_orders(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<OrderFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = params(query)?;
    let statuses = OrderStatus::ALL.map(OrderStatus::as_str);
    let status = one_of("status", q.status, &statuses)?;
    let limit = limit(q.limit.as_deref())?;
    let after = decode_cursor(q.cursor.as_deref(), 1)?.map(|mut k| k.remove(0));
    let rows = async {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT order_id, to_jsonb(o)::text FROM orders o
             WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR order_id > $3)
             ORDER BY order_id LIMIT $4",
        )
        .bind(&q.customer_id)
        .bind(&status)
        .bind(&after)
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
        raw_page(
            rows.into_iter()
                .map(|(id, json)| (vec![id], json))
                .collect(),
            limit,
        )
    };
    serve(&state, &headers, "orders", None, rows).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProductFilter {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/products?status=&limit=&cursor=`, ordered by SKU.
pub(super) async fn list_products(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ProductFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = params(query)?;
    let status = one_of("status", q.status, &keel_views::PRODUCT_STATUSES)?;
    let limit = limit(q.limit.as_deref())?;
    let after = decode_cursor(q.cursor.as_deref(), 1)?.map(|mut k| k.remove(0));
    let rows = async {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT sku, (to_jsonb(p) - 'reservations')::text FROM products p
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR sku > $2)
             ORDER BY sku LIMIT $3",
        )
        .bind(&status)
        .bind(&after)
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
        raw_page(
            rows.into_iter()
                .map(|(sku, json)| (vec![sku], json))
                .collect(),
            limit,
        )
    };
    serve(&state, &headers, "products", None, rows).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SalesFilter {
    from: Option<String>,
    to: Option<String>,
    currency: Option<String>,
}

/// `GET /v1/reports/daily-sales?from=&to=&currency=` (dates as YYYY-MM-DD, inclusive).
pub(super) async fn daily_sales(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<SalesFilter>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = params(query)?;
    let date = |field: &str, v: &Option<String>| -> Result<Option<NaiveDate>, ApiError> {
        v.as_deref()
            .map(|d| {
                NaiveDate::parse_from_str(d, "%Y-%m-%d")
                    .map_err(|_| ApiError::bad(field, "must be a date like 2026-11-21"))
            })
            .transpose()
    };
    let (from, to) = (date("from", &q.from)?, date("to", &q.to)?);
    if let Some(currency) = q.currency.as_deref() {
        Currency::parse(currency).map_err(|e| ApiError::bad("currency", e.reason))?;
    }
    let rows = async {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT to_jsonb(d)::text FROM daily_sales d
             WHERE ($1::date IS NULL OR day >= $1) AND ($2::date IS NULL OR day <= $2)
               AND ($3::text IS NULL OR currency = $3)
             ORDER BY day, currency",
        )
        .bind(from)
        .bind(to)
        .bind(&q.currency)
        .fetch_all(&state.pool)
        .await?;
        #[derive(serde::Serialize)]
        struct Items {
            items: Vec<Box<RawValue>>,
        }
        let items = rows.into_iter().map(raw).collect::<Result<_, _>>()?;
        Ok(Items { items })
    };
    serve(&state, &headers, "daily_sales", None, rows).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PageOnly {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/reports/flagged-payments?limit=&cursor=`: payments of 10,000.00 or more.
pub(super) async fn flagged_payments(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<PageOnly>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = params(query)?;
    let limit = limit(q.limit.as_deref())?;
    let after = decode_cursor(q.cursor.as_deref(), 2)?;
    let rows = async {
        let (order, payment) = after
            .map(|k| (Some(k[0].clone()), Some(k[1].clone())))
            .unwrap_or_default();
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT order_id, payment_ref, to_jsonb(f)::text FROM flagged_payments f
             WHERE $1::text IS NULL OR (order_id, payment_ref) > ($1, $2)
             ORDER BY order_id, payment_ref LIMIT $3",
        )
        .bind(order)
        .bind(payment)
        .bind(limit + 1)
        .fetch_all(&state.pool)
        .await?;
        raw_page(
            rows.into_iter()
                .map(|(order, payment, json)| (vec![order, payment], json))
                .collect(),
            limit,
        )
    };
    serve(&state, &headers, "flagged_payments", None, rows).await
}
