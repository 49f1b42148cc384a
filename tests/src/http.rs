//! Raw HTTP requests for the tests that probe the APIs' edges: exactly the headers and
//! body given, no default token, the answer read whole.

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub bytes: Vec<u8>,
}

impl Reply {
    /// The body as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Sends `method url` with exactly `headers` (a value that cannot be a header value is left
/// out) and `body`. An error means no whole answer came: a refused or dropped connection.
pub async fn send_raw(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> reqwest::Result<Reply> {
    let method = method.parse().unwrap_or(reqwest::Method::GET);
    let mut request = reqwest::Client::new().request(method, url);
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            request = request.header(*name, value);
        }
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await?.to_vec();
    Ok(Reply {
        status,
        headers,
        bytes,
    })
}
